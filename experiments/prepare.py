"""CREMA-D and Kinetics-Sounds, from their published layouts to a data folder (data.py), with the
authors' settings (their repository and the OGM-GE code it points to), a seeded validation split
carved from training, and each step row by row: the set is never held in memory.

    python -m experiments.prepare cremad CREMA-D/ --out runs/cremad
    python -m experiments.prepare kinetics-sounds KS/ --out runs/ks
    python train.py --data runs/cremad --rollingq ...            (docs/paper-experiment.md)

CREMA-D: ROOT/AudioWAV/<clip>.wav, ROOT/Image-01-FPS/<clip>/*.jpg (1 frame a second), and the split
files ROOT/train.csv, ROOT/test.csv of the authors' format: one "clip,label" line a clip, label
one of NEU HAP SAD FEA DIS ANG (classes 0..5 in that order, theirs).
  audio   the WAV resampled to 22 050 Hz, tiled to 3 s, clipped to [-1, 1]; log(|STFT| + 1e-7) with
          n_fft 512, hop 353, a Hann window, centred: 257 x 188, stored float16; 16 x 16 patches on
          the device: 16 x 11 = 176 tokens (the 257th frequency row falls outside, as in their conv)
  visual  3 frames at 224 x 224, uint8, ImageNet's mean and std: 3 x 196 = 588 tokens
Kinetics-Sounds: ROOT/audio/<clip>.wav, ROOT/frames/<clip>/*.jpg, ROOT/train.csv, ROOT/test.csv
("clip,label"; the label names, sorted, are the classes; the authors' split files are published
nowhere: yours say which clips).
  audio   Kaldi's fbank (AST's settings: 25 ms Hann windows every 10 ms, 128 mel bands, no dither),
          after removing the waveform's mean; 1024 frames, cut or padded with zeros; stored as
          128 x 1024 float16, normalised on the device as (x + 4.503877) / (2 x 5.141276): 512 tokens
  visual  3 frames evenly spaced over the clip's frames, 224 x 224, ImageNet's mean and std: 588 tokens

Where we depart from the authors:
  - frames: they draw 3 frames at random with replacement, at test time too (CREMA-D), and crop and
    flip at random in training; we take 3 evenly spaced frames, resized to 224 x 224, fixed: the
    test set is the same set every time, and augmentation is left out;
  - resampling to 22 050 Hz: theirs is librosa's (soxr); ours is band-limited by the FFT (numpy);
    a clip under 1 s is tiled as often as 3 s take (theirs: 3 times, too short for it);
  - resizing: torch's bilinear, antialiased, where torchvision's Resize works on PIL images;
  - a validation split (--val-fraction of each class of training, drawn from --seed): they have
    none and choose the epoch on the test split.
Images: binary PPM (P6) is read here; JPEG and PNG need Pillow (pip install pillow), imported
only when a frame is no PPM. Extracting the frames: ffmpeg -i CLIP -vf fps=1 DIR/CLIP/%05d.jpg.
"""

import argparse
import csv
import sys
import wave
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import data as datasets

CREMAD_CLASSES = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]          # the authors' class_dict order
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
FRAMES, SIZE = 3, 224


class PrepareError(ValueError):
    """An input that cannot be used; one line saying which and why."""


# ----------------------------------------------------------------------------------------
# Audio


def read_wav(path):
    """A PCM WAV file as mono float64 in [-1, 1] and its sample rate."""
    try:
        with wave.open(str(path), "rb") as w:
            rate, width, channels, n = w.getframerate(), w.getsampwidth(), w.getnchannels(), w.getnframes()
            raw = w.readframes(n)
    except (OSError, EOFError, wave.Error) as e:
        raise PrepareError(f"{path}: not a PCM WAV file ({e})") from None
    if width not in (1, 2, 4):
        raise PrepareError(f"{path}: {8 * width}-bit samples; expected 8, 16 or 32-bit PCM")
    x = np.frombuffer(raw, {1: np.uint8, 2: np.int16, 4: np.int32}[width]).astype(np.float64)
    x = (x - 128) / 128 if width == 1 else x / 2 ** (8 * width - 1)
    return x.reshape(-1, channels).mean(1), rate


def resample(x, rate, to):
    """x at `rate` -> at `to`, band-limited by the FFT (the spectrum cut or padded)."""
    if rate == to:
        return x
    n = int(round(len(x) * to / rate))
    X = np.fft.rfft(x)
    X = X[:n // 2 + 1] if len(X) > n // 2 + 1 else np.pad(X, (0, n // 2 + 1 - len(X)))
    return np.fft.irfft(X, n) * (n / len(x))


def cremad_spectrogram(x, rate):
    """The authors' CREMA-D audio: 22 050 Hz, tiled to 3 s, log |STFT| (n_fft 512, hop 353): (257, 188)."""
    x = resample(x, rate, 22050)
    x = np.clip(np.resize(x, 22050 * 3), -1, 1)                      # tiled to 3 s: theirs, np.tile(x, 3)[:3 s], for 1 s or more
    X = torch.stft(torch.from_numpy(x), 512, hop_length=353, window=torch.hann_window(512, dtype=torch.float64),
                   center=True, pad_mode="constant", return_complex=True)   # (257, 188), as librosa.stft
    return np.log(X.abs().numpy() + 1e-7)


def kaldi_fbank(x, rate, bins=128, shift_ms=10.0, length_ms=25.0):
    """Kaldi's log mel filterbank (torchaudio.compliance.kaldi.fbank with AST's settings: htk_compat,
    use_energy False, Hann window, no dither): (frames, bins)."""
    x = torch.from_numpy(x - x.mean())                                # AST removes the mean first
    shift, size = int(rate * shift_ms / 1000), int(rate * length_ms / 1000)
    n_fft = 1 << (size - 1).bit_length()                              # round to a power of two
    frames = x.unfold(0, size, shift) if len(x) >= size else x.new_zeros(0, size)   # (T, size): snip_edges
    frames = frames - frames.mean(1, keepdim=True)                    # remove_dc_offset
    frames = torch.cat([frames[:, :1] * (1 - 0.97), frames[:, 1:] - 0.97 * frames[:, :-1]], 1)   # preemphasis
    frames = frames * torch.hann_window(size, periodic=False, dtype=torch.float64)
    power = torch.fft.rfft(frames, n_fft).abs() ** 2                  # (T, n_fft / 2 + 1)
    mel = lambda f: 1127.0 * torch.log1p(f / 700.0)                   # noqa: E731
    low, high = mel(torch.tensor(20.0, dtype=torch.float64)), mel(torch.tensor(rate / 2, dtype=torch.float64))
    edges = low + (high - low) / (bins + 1) * torch.arange(bins + 2, dtype=torch.float64)   # (bins + 2,)
    f = mel(torch.arange(n_fft // 2, dtype=torch.float64) * rate / n_fft)   # (n_fft / 2,) the bins' mels
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    banks = torch.clamp(torch.minimum((f - left) / (centre - left), (right - f) / (right - centre)), min=0)
    banks = F.pad(banks, (0, 1))                                      # (bins, n_fft / 2 + 1): Nyquist weight 0
    energies = power @ banks.T                                        # (T, bins)
    return torch.clamp(energies, min=torch.finfo(torch.float32).eps).log().numpy()   # float32 eps: an empty band, as theirs


def kinetics_fbank(x, rate, length=1024):
    """The authors' Kinetics-Sounds audio: the fbank cut or zero-padded to `length` frames, as (128, length)."""
    fb = kaldi_fbank(x, rate)
    fb = fb[:length] if len(fb) >= length else np.pad(fb, ((0, length - len(fb)), (0, 0)))
    return fb.T


# ----------------------------------------------------------------------------------------
# Frames


def read_image(path):
    """An image as uint8 (H, W, 3): binary PPM here, anything else through Pillow."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(2)
        if head == b"P6":
            fields = []
            while len(fields) < 3:                                    # width, height, maxval; comments skipped
                line = f.readline()
                fields += line.split(b"#")[0].split()
            w, h, top = map(int, fields)
            x = np.frombuffer(f.read(w * h * 3 * (2 if top > 255 else 1)), ">u2" if top > 255 else np.uint8)
            return (x.reshape(h, w, 3).astype(np.float64) * 255 / top).round().astype(np.uint8)
    try:
        from PIL import Image
    except ImportError:
        raise PrepareError(f"{path}: reading JPEG or PNG frames needs Pillow (pip install pillow), or give PPM frames")
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def clip_frames(folder, n=FRAMES, size=SIZE):
    """n frames evenly spaced over a clip's frames (sorted by name), resized: (n, 3, size, size) uint8."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file()) if Path(folder).is_dir() else []
    if not files:
        raise PrepareError(f"{folder}: no frames (extract them: ffmpeg -i CLIP -vf fps=1 {folder}/%05d.jpg)")
    picked = [files[int(i)] for i in np.linspace(0, len(files) - 1, n).round()]
    x = torch.stack([torch.from_numpy(read_image(p).copy()).permute(2, 0, 1) for p in picked])   # (n, 3, H, W)
    x = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).numpy()


# ----------------------------------------------------------------------------------------
# The folder


def read_split(path, classes=None):
    """A split file: one 'clip,label' line a clip -> [(clip, label name)]."""
    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r]
    except OSError as e:
        raise PrepareError(f"{path}: cannot read the split file ({e.strerror})") from None
    if any(len(r) < 2 for r in rows):
        raise PrepareError(f"{path}: expected one 'clip,label' line a clip")
    unknown = sorted({r[1] for r in rows} - set(classes)) if classes else []
    if unknown:
        raise PrepareError(f"{path}: labels {', '.join(unknown)} are none of {', '.join(classes)}")
    return [(r[0], r[1]) for r in rows]


SETS = {  # name -> classes (None: the split files' names, sorted), audio file, audio, frames folder, audio shape, spec
    "cremad": (CREMAD_CLASSES, "AudioWAV/{}.wav", cremad_spectrogram, "Image-01-FPS/{}", (1, 257, 188), {"patch": 16}),
    "kinetics-sounds": (None, "audio/{}.wav", kinetics_fbank, "frames/{}", (1, 128, 1024),
                        {"patch": 16, "mean": [-4.503877], "std": [2 * 5.141276]}),
}


def prepare(name, root, out, val_fraction=0.1, seed=0, log=print):
    """Write the data folder `out` from the set `name` at `root`; returns its splits' sizes."""
    classes, audio_file, audio_of, frames_dir, audio_shape, audio_spec = SETS[name]
    root, out = Path(root), Path(out)
    clips = {split: read_split(root / f"{split}.csv", classes) for split in ("train", "test")}
    classes = classes or sorted({label for rows in clips.values() for _, label in rows})
    labels = {split: np.array([classes.index(label) for _, label in rows]) for split, rows in clips.items()}
    if val_fraction:                                                  # the validation split, as train.py carves one
        train, val = datasets.validation_split(labels["train"], val_fraction, seed)
        clips["val"], labels["val"] = [clips["train"][i] for i in val], labels["train"][val]
        clips["train"], labels["train"] = [clips["train"][i] for i in train], labels["train"][train]
    for split, rows in clips.items():
        n = len(rows)
        log(f"{split}: {n} clips")
        np.save(_mkdir(out / split) / "y.npy", labels[split])

        def audio():
            for clip, _ in rows:
                x, rate = read_wav(root / audio_file.format(clip))
                yield audio_of(x, rate)[None, None]                   # (1, 1, H, W)

        def visual():
            for clip, _ in rows:
                yield clip_frames(root / frames_dir.format(clip))[None]   # (1, F, 3, 224, 224)

        datasets.write_npy(out / split / "audio.npy", (n, *audio_shape), np.float16, audio())
        datasets.write_npy(out / split / "visual.npy", (n, FRAMES, 3, SIZE, SIZE), np.uint8, visual())
    datasets.write_meta(out, ["audio", "visual"], {"audio": audio_spec, "visual": {"patch": 16, **IMAGENET}})
    (out / "classes.txt").write_text("\n".join(classes) + "\n")
    return {split: len(rows) for split, rows in clips.items()}


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("set", choices=sorted(SETS), help="the data set and its layout (see the module docstring)")
    p.add_argument("root", help="the folder holding the set as published")
    p.add_argument("--out", required=True, help="the data folder to write")
    p.add_argument("--val-fraction", type=float, default=0.1, help="of each class of training, for validation")
    p.add_argument("--seed", type=int, default=0, help="which training samples go to validation")
    args = p.parse_args(argv)
    try:
        sizes = prepare(args.set, args.root, args.out, args.val_fraction, args.seed)
    except (PrepareError, datasets.DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {args.out}: " + ", ".join(f"{n} {split}" for split, n in sizes.items()))


if __name__ == "__main__":
    main()
