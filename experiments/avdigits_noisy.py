"""AV digits, noisy: AV digits degraded AV-MNIST's way (Vielzeuf et al. 2018), so that neither modality alone solves it.

    python -m experiments.avdigits_noisy [--source DIR] [--out PATH] [--k K] [--snr=LO,HI]

The same recordings, split and image pairing as experiments/avdigits.py (seed 0); only the
degradation differs.

Sources (raw, as published; default folder ../shared/avdigits next to the repository):
- fsdd/ and mnist/: as experiments/avdigits.py (FSDD, CC BY-SA 4.0; MNIST, commonly CC BY-SA 3.0).
- noise/: the `_background_noise_` WAVs of Speech Commands (P. Warden 2018, arXiv 1804.03209; as
  copied in github.com/chaeyoung-lee/wids_tutorial, commit 7d028e7), 16 kHz mono 16-bit PCM, CC BY 4.0:
  four recordings of real noise and two generated (pink, white).
The derived set is licensed CC BY-SA 4.0 (see datasets/LICENSE).

Degradation:
- visual (N, 16, 49): PCA of the training images / 255 (the 2400 paired with training recordings;
  the test images play no part in the fit); each image, in both splits, is replaced by its
  reconstruction from the top k components (default 5), then cut into avdigits' 16 patches of 7 x 7.
- audio (N, 16, 64): every noise file is resampled to 8 kHz (a 101-tap Hamming-windowed sinc low-pass
  at 3.6 kHz, then every second sample). Each file's first 80 % is the training span, its last 20 %
  the test span, so no test mix shares noise with a training mix. Per recording, from
  numpy default_rng(0), in this order for all recordings: an SNR in dB uniform in [lo, hi] (default
  -10..10, one distribution for both splits), a noise file (uniform), an offset (uniform over the
  starts whose 5280 samples fit in the split's span). The recording, zero-padded or cropped to the
  5280 samples (32 frames) the features see, plus that noise segment scaled so that the recording's
  mean power (over all its samples) over the segment's is the SNR: the noise fills the whole clip.
  Then avdigits' log-mel features, per-band standardisation with the training statistics, tokens.
- side information, not a modality: side_train_snr, side_test_snr (N,) float32, each sample's SNR in dB.
Stored as float16 (labels int64, SNR float32) in an .npz written byte-for-byte deterministically.
"""

import argparse
import math
import time
from pathlib import Path

import numpy as np

import train
from data import DataError
from experiments.avdigits import (FRAMES, HOP, RATE, SOURCE, WINDOW, audio_tokens, log_mel, mnist_images, pair_images,
                                  patches, read_wav, recordings_split, write_and_report)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "datasets" / "avdigits-noisy.npz"
NOISES = ("doing_the_dishes", "dude_miaowing", "exercise_bike", "pink_noise", "running_tap", "white_noise")
NOISE_RATE, TAPS, CUTOFF = 16000, 101, 3600                          # Speech Commands' rate; the low-pass before / 2
CLIP = (FRAMES - 1) * HOP + WINDOW                                    # 5280 samples: what log_mel sees
TRAIN_SHARE, SEED, K, SNR = 0.8, 0, 5, (-10.0, 10.0)


def read_noise(path):
    """One Speech Commands noise file, resampled from 16 to 8 kHz: (T,) floats."""
    n = np.arange(TAPS) - (TAPS - 1) / 2
    h = np.sinc(2 * CUTOFF / NOISE_RATE * n) * np.hamming(TAPS)       # (101,) windowed-sinc low-pass
    return np.convolve(read_wav(path, NOISE_RATE), h / h.sum(), mode="same")[::NOISE_RATE // RATE]


def noise_segments(g, lengths, is_test, n=CLIP):
    """From generator g, per sample a noise file (N,) and the offset (N,) of its n samples: within the file's
    first TRAIN_SHARE for training samples, within the rest for test samples (is_test (N,) bool)."""
    lengths = np.asarray(lengths)                                     # (F,) samples per file
    if (lengths - (lengths * TRAIN_SHARE).astype(int) < n).any():
        raise DataError(f"a noise file's test span is shorter than a clip ({n} samples): lengths {lengths.tolist()}")
    files = g.integers(0, len(lengths), len(is_test))                 # (N,)
    cut = (lengths[files] * TRAIN_SHARE).astype(int)                  # (N,) where the test span starts
    first = np.where(is_test, cut, 0)
    last = np.where(is_test, lengths[files], cut) - n                 # (N,) the last start that fits
    return files, first + (g.random(len(is_test)) * (last - first + 1)).astype(int)


def mix(signal, noise, snr):
    """The recording, zero-padded or cropped to len(noise) samples, plus the noise at `snr` dB below the
    recording's mean power: (len(noise),)."""
    clip = np.zeros(len(noise))
    clip[:min(len(clip), len(signal))] = signal[:len(clip)]
    return clip + noise * np.sqrt(np.mean(signal ** 2) / np.mean(noise ** 2) / 10 ** (snr / 10))


def pca_images(train_images, test_images, k):
    """Both splits' images (N, 28, 28) / 255 rebuilt from the top k principal components of the training
    images alone, and the fraction of the training images' variance those k keep."""
    x = train_images.reshape(len(train_images), -1) / 255             # (N_train, 784)
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)           # vt (784, 784), rows by variance
    basis = vt[:k]                                                    # (k, 784)

    def rebuild(images):                                              # (n, 28, 28) -> (n, 28, 28)
        return (mean + (images.reshape(len(images), -1) / 255 - mean) @ basis.T @ basis).reshape(-1, 28, 28)
    return rebuild(train_images), rebuild(test_images), float((s[:k] ** 2).sum() / (s ** 2).sum())


def build(source=SOURCE, k=K, snr=SNR):
    """The arrays (train_y, test_y, train/test_audio (N, 16, 64), train/test_visual (N, 16, 49),
    side_train_snr, side_test_snr (N,)) and the fraction of the images' variance kept."""
    if not 1 <= k <= 784:
        raise DataError(f"k = {k}: expected a number of principal components in 1..784")
    recordings, is_test = recordings_split(source)
    noises = [read_noise(Path(source) / "noise" / f"{name}.wav") for name in NOISES]
    g = np.random.default_rng(SEED)
    snrs = g.uniform(*snr, len(recordings))                           # (N,) dB
    files, offsets = noise_segments(g, [len(x) for x in noises], is_test)
    spectra = np.stack([log_mel(mix(read_wav(Path(source) / "fsdd" / f"{d}_{s}_{i}.wav"),
                                    noises[f][o:o + CLIP], db))
                        for (d, s, i), db, f, o in zip(recordings, snrs, files, offsets)])   # (N, 32, 32)
    audio = audio_tokens(spectra, ~is_test)                           # (N, 16, 64)
    mnist = mnist_images(source)
    splits = (("train", ~is_test), ("test", is_test))
    recs = {split: [r for r, keep in zip(recordings, rows) if keep] for split, rows in splits}
    images = {split: pair_images(recs[split], *mnist[split], split) for split in recs}   # (N, 28, 28) uint8
    images["train"], images["test"], kept = pca_images(images["train"], images["test"], k)
    arrays = {}
    for split, rows in splits:
        arrays[f"{split}_y"] = np.array([d for d, _, _ in recs[split]], np.int64)
        arrays[f"{split}_audio"] = audio[rows]
        # (N, 16, 49); + 0: pixels no image inks rebuild to about +-1e-17, whose sign varies with BLAS threads
        arrays[f"{split}_visual"] = patches(images[split], 7, 7).astype(np.float16) + np.float16(0)
    arrays = {key: arrays[key] for key in ("train_y", "test_y", "train_audio", "test_audio", "train_visual", "test_visual")}
    arrays["side_train_snr"], arrays["side_test_snr"] = snrs[~is_test].astype(np.float32), snrs[is_test].astype(np.float32)
    return arrays, kept


def snr_range(text):
    """--snr LO,HI in dB, LO <= HI: (lo, hi)."""
    try:
        lo, hi = map(float, text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI in dB, e.g. -10,10; got {text!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise argparse.ArgumentTypeError(f"expected finite LO <= HI in dB, got {text!r}")
    return lo, hi


def main(argv=None):
    p = train.ArgumentParser(prog="python -m experiments.avdigits_noisy", description="Build the noisy AV digits set "
                             "(AV digits with PCA-reduced images and audio mixed with Speech Commands noise).")
    p.add_argument("--source", default=str(SOURCE), help="folder with fsdd/, mnist/ and noise/ (default: %(default)s)")
    p.add_argument("--out", default=str(OUT), help="the .npz to write (default: %(default)s)")
    p.add_argument("--k", type=int, default=K, help="principal components the images keep (default: %(default)s)")
    p.add_argument("--snr", type=snr_range, default=SNR, metavar="LO,HI", help="the range of the uniform SNR draw in "
                   "dB; a negative LO as --snr=-10,10 (default: -10,10)")
    args = p.parse_args(argv)
    start = time.time()
    arrays, kept = build(args.source, args.k, args.snr)
    drawn = ", ".join(f"{split} {arrays[f'side_{split}_snr'].min():.2f}..{arrays[f'side_{split}_snr'].max():.2f}"
                      for split in ("train", "test"))
    write_and_report(arrays, args.out, start, notes=(
        f"images: {args.k} principal components keep {kept:.1%} of the training images' variance",
        f"SNR: uniform in [{args.snr[0]:g}, {args.snr[1]:g}] dB; drawn {drawn}"))


if __name__ == "__main__":
    train.cli(main=main)
