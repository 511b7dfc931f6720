"""AV digits: an audio-visual digit set built from real recordings and real handwriting.

    python -m experiments.avdigits [--source DIR] [--out PATH] [--test-speakers NAME[,NAME]]

Each sample pairs one spoken digit with one handwritten image of the same digit.

Sources (raw, as published; default folder ../shared/avdigits next to the repository):
- fsdd/: the Free Spoken Digit Dataset (Zohar Jackson and contributors,
  github.com/Jakobovski/free-spoken-digit-dataset), 3000 WAV files {digit}_{speaker}_{index}.wav,
  10 digits x 6 speakers x index 0-49, 8 kHz mono 16-bit PCM. License CC BY-SA 4.0.
- mnist/: MNIST (Yann LeCun, Corinna Cortes, Christopher J.C. Burges), commonly redistributed
  under CC BY-SA 3.0: the t10k test images and labels (IDX) and mnist_5k.csv.gz (500 training
  images per digit: 784 pixels 0-255, then the label).
The derived set is licensed CC BY-SA 4.0 (see datasets/LICENSE).

Split (default, by index): recordings with index 0-9 are the test split (600), 10-49 the training
split (2400); every speaker is in both. With --test-speakers, all recordings of those speakers are
the test split and the others train (one speaker: 500 test samples). Training recordings are paired
with mnist_5k images, test recordings with t10k images, so no image is in both splits. Within a digit,
recordings sorted by (speaker, index) take, in order, the images of a fixed permutation
(numpy default_rng(0), fresh per digit and split) of that digit's images; none is used twice.
Samples are ordered by (digit, speaker, index) of the recording.

Features (modality order: audio, then visual):
- audio (N, 16, 64): log-mel spectrogram, samples / 32768, Hann window (numpy.hanning) of 320 samples,
  hop 160, FFT 512, power, 32 HTK mel bands from 0 to 4000 Hz, log(power + 1e-6). The signal is
  zero-padded (or cropped, keeping its start) to 5280 samples = exactly 32 frames, so a short
  recording ends in frames of silence, log(1e-6). Standardised per mel band with the mean and std
  of all training frames, then cut in time: 16 tokens of 2 consecutive frames (40 ms of hop) x 32
  bands, each token's 64 values frame-major (frame, band). (2-D patches of 8 bands x 8 frames were
  tried first: audio learned no faster than the images, see docs/reproduction.md.)
- visual (N, 16, 49): image / 255, 16 patches of 7 x 7, row-major patch order, pixels row-major.
Stored as float16 (labels int64) in an .npz written byte-for-byte deterministically.
"""

import gzip
import hashlib
import io
import time
import wave
import zipfile
from pathlib import Path

import numpy as np

import train
from data import DataError, load_npz

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "avdigits"
OUT = ROOT / "datasets" / "avdigits.npz"
SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
RATE, WINDOW, HOP, NFFT, BANDS, FRAMES, FLOOR = 8000, 320, 160, 512, 32, 32, 1e-6


def read_wav(path, rate=RATE):
    """One 16-bit mono recording at `rate` Hz (default: FSDD's 8 kHz) as float samples in [-1, 1): (T,)."""
    expected = f"{rate / 1000:g} kHz mono 16-bit"
    try:
        with wave.open(str(path), "rb") as w:
            shape = (w.getnchannels(), w.getsampwidth(), w.getframerate())
            n, raw = w.getnframes(), w.readframes(w.getnframes())
    except FileNotFoundError:
        raise DataError(f"no such file: {path}; expected a recording ({expected} WAV)") from None
    except (wave.Error, EOFError, OSError) as e:
        raise DataError(f"{path} is not a readable WAV file ({e}); expected {expected} PCM") from None
    if shape != (1, 2, rate):
        raise DataError(f"{path} has {shape[0]} channel(s), {8 * shape[1]}-bit, {shape[2]} Hz; "
                        f"expected {expected} PCM")
    if n == 0 or len(raw) != 2 * n:
        raise DataError(f"{path} is truncated: its header says {n} samples, it holds {len(raw) // 2}")
    return np.frombuffer(raw, dtype="<i2").astype(np.float64) / 32768


def mel_filters():
    """Triangular HTK mel filters from 0 to RATE/2: (BANDS, NFFT/2 + 1)."""
    mel = lambda f: 2595 * np.log10(1 + f / 700)                       # noqa: E731
    edges = 700 * (10 ** (np.linspace(0, mel(RATE / 2), BANDS + 2) / 2595) - 1)   # (BANDS + 2,) Hz
    f = np.arange(NFFT // 2 + 1) * RATE / NFFT                        # (257,) Hz of each FFT bin
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    return np.maximum(0, np.minimum((f - lo) / (mid - lo), (hi - f) / (hi - mid)))


FILTERS = mel_filters()                                               # (32, 257)


def log_mel(signal):
    """Log-mel spectrogram of one recording, zero-padded or cropped to 32 frames: (32 bands, 32 frames)."""
    x = np.zeros((FRAMES - 1) * HOP + WINDOW)                         # (5280,)
    x[:min(len(x), len(signal))] = signal[:len(x)]
    frames = x[np.arange(FRAMES)[:, None] * HOP + np.arange(WINDOW)] * np.hanning(WINDOW)   # (32, 320)
    power = np.abs(np.fft.rfft(frames, NFFT)) ** 2                    # (32, 257)
    return np.log(FILTERS @ power.T + FLOOR)                          # (32, 32)


def read_idx(path):
    """An MNIST IDX file of unsigned bytes (images (N, 28, 28) or labels (N,)): uint8 array."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"no such file: {path}; expected a gzipped MNIST IDX file") from None
    except (OSError, EOFError) as e:
        raise DataError(f"{path} is not a readable gzipped IDX file ({e})") from None
    magic = int.from_bytes(raw[:4], "big")                            # 0x0000 08 ndim: unsigned bytes
    if len(raw) < 4 or magic >> 8 != 0x08 or not 1 <= magic & 0xFF <= 3:
        raise DataError(f"{path}: wrong magic number {magic:#010x}; expected an IDX file of unsigned bytes "
                        f"(0x00000801 labels or 0x00000803 images)")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    data = raw[4 + 4 * ndim:]
    if len(raw) < 4 + 4 * ndim or len(data) != np.prod(dims):
        raise DataError(f"{path}: its header says {' x '.join(map(str, dims))} bytes of data, "
                        f"it holds {len(data)}")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def read_mnist_csv(path):
    """mnist_5k.csv.gz: images (N, 28, 28) uint8 and labels (N,) int64."""
    rows = []
    try:
        with gzip.open(path, "rt") as f:
            for i, line in enumerate(f, 1):
                values = line.strip().split(",")
                if len(values) != 785:
                    raise DataError(f"{path}, row {i}: {len(values)} values; expected 784 pixels then the label")
                rows.append(values)
    except FileNotFoundError:
        raise DataError(f"no such file: {path}; expected MNIST training images as gzipped CSV") from None
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not a readable gzipped CSV file ({e})") from None
    try:
        table = np.array(rows, dtype=np.int64)                        # (N, 785)
    except ValueError as e:
        raise DataError(f"{path}: a value is not a whole number ({e})") from None
    if not rows or table.min() < 0 or table[:, :784].max() > 255 or table[:, 784].max() > 9:
        raise DataError(f"{path}: expected rows of 784 pixels in 0-255 then a label in 0-9")
    return table[:, :784].reshape(-1, 28, 28).astype(np.uint8), table[:, 784]


def patches(x, ph, pw):
    """(N, H, W) -> (N, H/ph * W/pw, ph * pw): row-major patches, each patch's values row-major."""
    n, h, w = x.shape
    return x.reshape(n, h // ph, ph, w // pw, pw).transpose(0, 1, 3, 2, 4).reshape(n, -1, ph * pw)


def pair_images(recordings, images, labels, split):
    """For each recording (digit, speaker, index), in order, one unused image of its digit: (N, 28, 28)."""
    chosen = np.zeros((len(recordings), 28, 28), np.uint8)
    for digit in range(10):
        rows = [i for i, r in enumerate(recordings) if r[0] == digit]  # sorted by (speaker, index)
        pool = np.flatnonzero(labels == digit)
        if len(pool) < len(rows):
            raise DataError(f"the {split} images hold {len(pool)} of digit {digit}; the pairing needs {len(rows)}")
        chosen[rows] = images[pool[np.random.default_rng(0).permutation(len(pool))[:len(rows)]]]
    return chosen


def recordings_split(source=SOURCE, test_speakers=None):
    """The recordings (digit, speaker, index), sorted, and whether each is in the test split: (N,) bool."""
    unknown = sorted(set(test_speakers or ()) - set(SPEAKERS))
    if unknown:
        raise DataError(f"unknown speaker {', '.join(map(repr, unknown))}; the speakers are {', '.join(SPEAKERS)}")
    if test_speakers and set(test_speakers) == set(SPEAKERS):
        raise DataError("every speaker is in the test split; leave at least one for training")
    source = Path(source)
    if not source.is_dir():
        raise DataError(f"no such folder: {source}; expected the raw AV digits sources (fsdd/ and mnist/)")
    recordings = [(d, s, i) for d in range(10) for s in SPEAKERS for i in range(50)]   # sorted (digit, speaker, index)
    is_test = np.array([(s in test_speakers) if test_speakers else i < 10 for d, s, i in recordings])
    return recordings, is_test


def mnist_images(source=SOURCE):
    """Per split the MNIST images (n, 28, 28) uint8 and labels (n,) the pairing draws from."""
    source = Path(source)
    t10k = read_idx(source / "mnist" / "t10k-images-idx3-ubyte.gz"), read_idx(source / "mnist" / "t10k-labels-idx1-ubyte.gz")
    if t10k[0].shape[1:] != (28, 28) or t10k[1].ndim != 1 or len(t10k[0]) != len(t10k[1]):
        raise DataError(f"{source / 'mnist'}: t10k images {t10k[0].shape} and labels {t10k[1].shape} do not match; "
                        f"expected (N, 28, 28) and (N,)")
    return {"train": read_mnist_csv(source / "mnist" / "mnist_5k.csv.gz"), "test": t10k}


def audio_tokens(spectra, train_rows):
    """Log-mel spectra (N, 32 bands, 32 frames), standardised per band with the statistics of the training
    rows (N,) bool, cut in time into tokens: (N, 16, 2 frames x 32 bands) float16."""
    mean = spectra[train_rows].mean(axis=(0, 2))[:, None]            # (32, 1): one per mel band
    std = spectra[train_rows].std(axis=(0, 2))[:, None]
    frames = ((spectra - mean) / std).transpose(0, 2, 1)              # (N, 32 frames, 32 bands)
    return frames.reshape(-1, 16, 64).astype(np.float16)


def build(source=SOURCE, test_speakers=None):
    """The AV digits arrays: train_y, test_y (int64), train/test_audio (N, 16, 64), train/test_visual (N, 16, 49)."""
    recordings, is_test = recordings_split(source, test_speakers)
    spectra = np.stack([log_mel(read_wav(Path(source) / "fsdd" / f"{d}_{s}_{i}.wav")) for d, s, i in recordings])
    audio = audio_tokens(spectra, ~is_test)                           # (N, 16, 64)
    mnist = mnist_images(source)
    arrays = {}
    for split, rows in (("train", ~is_test), ("test", is_test)):
        recs = [r for r, keep in zip(recordings, rows) if keep]
        images = pair_images(recs, *mnist[split], split)             # (N, 28, 28)
        arrays[f"{split}_y"] = np.array([d for d, _, _ in recs], np.int64)
        arrays[f"{split}_audio"] = audio[rows]
        arrays[f"{split}_visual"] = patches(images / 255, 7, 7).astype(np.float16)              # (N, 16, 49)
    return {k: arrays[k] for k in ("train_y", "test_y", "train_audio", "test_audio", "train_visual", "test_visual")}


def write_npz(arrays, path):
    """An .npz that numpy.load reads, with fixed timestamps so the same arrays give the same bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type, info.external_attr, info.create_system = zipfile.ZIP_DEFLATED, 0o644 << 16, 3
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            z.writestr(info, buffer.getvalue())


def main(argv=None):
    p = train.ArgumentParser(prog="python -m experiments.avdigits", description="Build the AV digits set "
                             "(FSDD spoken digits paired with MNIST images) from the raw sources.")
    p.add_argument("--source", default=str(SOURCE), help="folder with fsdd/ and mnist/ (default: %(default)s)")
    p.add_argument("--out", default=str(OUT), help="the .npz to write (default: %(default)s)")
    p.add_argument("--test-speakers", help="comma-separated speakers whose recordings are the test split "
                   f"(one of {', '.join(SPEAKERS)}); default: recordings with index 0-9")
    args = p.parse_args(argv)
    speakers = [s.strip() for s in args.test_speakers.split(",")] if args.test_speakers is not None else None
    start = time.time()
    write_and_report(build(args.source, speakers), args.out, start)


def write_and_report(arrays, path, start, notes=()):
    """Write the arrays (write_npz), check that the project's loader accepts the file, and print
    its splits, shapes, the `notes` lines, its size, sha256 and the seconds since `start`."""
    write_npz(arrays, path)
    data = load_npz(path)                                             # numpy.load and the project's checks accept it
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    print(f"train {len(data.train_y)}, test {len(data.test_y)}, {data.n_classes} classes")
    for name, x in zip(data.names, data.train_x):
        print(f"  {name}: {tuple(x.shape[1:])}")
    for line in notes:
        print(line)
    print(f"wrote {path}: {Path(path).stat().st_size / 1e6:.2f} MB, sha256 {digest}, {time.time() - start:.1f} s")


if __name__ == "__main__":
    train.cli(main=main)
