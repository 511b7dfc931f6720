"""Data in, tensors out: the sets in the box, by name, and your own features from one .npz, or
from a data folder when they do not fit in memory.

    avdigits         real spoken digits paired with real handwritten digits (datasets/README.md)
    avdigits-noisy   the same, degraded: images rebuilt from 5 principal components, audio mixed
                     with real background noise at -10..10 dB SNR (side information: the SNR)
    synthetic        built-in synthetic data, drawn from a seed

Each gives a `Data`: per modality a float32 tensor (N, L_m, D_m) for train and test, and
integer labels (N,), and any side information (Data.side: per-sample values such as
avdigits-noisy's SNR, never a modality); a data folder's modalities are Stored, read batch by
batch, indexed as the tensors are. Bad input raises DataError with a one-line message a user
can act on.
"""

import json
import zipfile
from dataclasses import dataclass, field
from typing import Optional
from pathlib import Path

import numpy as np
import torch


class DataError(ValueError):
    """Input data that cannot be used; the message says what was wrong and what was expected."""


@dataclass
class Data:
    names: list                       # modality names, in input order
    train_x: list                     # M x (N_train, L_m, D_m) float32
    train_y: torch.Tensor             # (N_train,) int64 in 0..n_classes-1
    test_x: list                      # M x (N_test, L_m, D_m) float32
    test_y: torch.Tensor              # (N_test,)
    n_classes: int
    test_noise: Optional[torch.Tensor] = None   # (N_test, M) bool: modality m of sample i drawn as pure noise (built-in data)
    side: dict = field(default_factory=dict)    # name -> {"train": (N_train,), "test": (N_test,)} float32: no modality
    val_x: Optional[list] = None      # M x (N_val, L_m, D_m): a validation split, if the data has one
    val_y: Optional[torch.Tensor] = None        # (N_val,)

    @property
    def modalities(self):
        """name -> (tokens L_m, features D_m), as rollingq.Config takes it."""
        return {m: tuple(x.shape[1:]) for m, x in zip(self.names, self.train_x)}

    @property
    def sizes(self):
        """'N train / N val / N test' (val where there is one)."""
        return " / ".join(f"{len(y)} {split}" for split, y in (("train", self.train_y), ("val", self.val_y),
                                                                ("test", self.test_y)) if y is not None)

    def select(self, name):
        """The one modality `name` alone (train.py --unimodal)."""
        if name not in self.names:
            raise DataError(f"no modality {name!r} in the data; it has {', '.join(self.names)}")
        j = self.names.index(name)
        return Data([name], [self.train_x[j]], self.train_y, [self.test_x[j]], self.test_y, self.n_classes,
                    None if self.test_noise is None else self.test_noise[:, j:j + 1], self.side,
                    None if self.val_y is None else [self.val_x[j]], self.val_y)


def validation_split(y, fraction, seed=0):
    """(train, val): sorted row numbers of labels y (N,) with `fraction` of each class (rounded, at
    least one sample) drawn from `seed` for validation, the rest for training."""
    g = np.random.default_rng(seed)
    val = np.sort(np.concatenate([g.permutation(np.flatnonzero(y == c))[:max(1, round(fraction * (y == c).sum()))]
                                  for c in np.unique(y)]))           # stratified: each class in proportion
    train = np.setdiff1d(np.arange(len(y)), val)                      # sorted
    if len(np.unique(y[train])) < len(np.unique(y)):
        raise DataError(f"a validation fraction of {fraction} leaves a class with no training sample")
    return train, val


def carve_validation(data, fraction, seed=0):
    """A validation split carved from `data`'s training split (validation_split); the rest stays
    training, in its order."""
    if data.val_y is not None:
        raise DataError("the data brings its own validation split (val_y); carve none from training")
    train, val = validation_split(data.train_y.numpy(), fraction, seed)
    val_i, train_i = torch.from_numpy(val), torch.from_numpy(train)

    def take(x, i):                                                   # a data folder's modality: a view, nothing read
        return x.view(rows=i.numpy()) if isinstance(x, Stored) else x[i]
    side = {k: {**v, "train": v["train"][train_i], "val": v["train"][val_i]} for k, v in data.side.items()}
    return Data(data.names, [take(x, train_i) for x in data.train_x], data.train_y[train_i], data.test_x, data.test_y,
                data.n_classes, data.test_noise, side, [take(x, val_i) for x in data.train_x], data.train_y[val_i])


# ----------------------------------------------------------------------------------------
# Built-in synthetic data


@dataclass
class Modality:
    """One synthetic modality. Its tokens are s * `signal` * (class prototype) + N(0, 1) noise,
    with s = 1, or with `flip` a random sign per sample: then the class lies in the pattern's
    shape, not its sign, so the encoder must learn a non-linear read-out, and learns it more
    slowly. A fraction `corrupt` of the samples is drawn to carry no class signal at all in this
    modality (pure noise), so the best fusion differs from sample to sample; synthetic() restores
    one modality where every one was drawn, so the realised fraction is a little lower."""
    name: str
    tokens: int                       # L: tokens per sample
    features: int                     # D: features per token
    signal: float                     # class-signal amplitude
    corrupt: float                    # probability that a sample's copy is drawn as pure noise (see synthetic)
    flip: bool = False                # a random sign per sample: a slower, non-linear read-out


# The default, built on the paper's premise: both modalities end up about equally informative
# alone (unimodal accuracies about 5 points apart), but audio is learned several times faster: its
# class signal is plain (linear), visual's carries a random sign per sample (non-linear) and is
# spread over twice as many weaker tokens. Each is drawn as pure noise for 30 % of the samples;
# where both were, one is restored, so each ends up noise on about 25.5 %, never both.
# docs/reproduction.md measures these properties.
DEFAULT_MODALITIES = (Modality("audio", 8, 16, 1.0, 0.3), Modality("visual", 16, 16, 0.7, 0.3, flip=True))


# The authors' Kinetics-Sounds token counts, for train.py --preset paper: 512 audio patches (a
# 128 x 1024 spectrogram in 16 x 16 patches) and 588 video patches (3 frames of 14 x 14), each
# encoder adding its CLS token; 128 features a patch (theirs: 256 and 768) keep the set under
# 1 GB. A throughput setting, not a data set to learn.
PAPER_SIZE = {"n_train": 1024, "n_test": 256, "modalities": (Modality("audio", 512, 128, 1.0, 0.3),
                                                            Modality("visual", 588, 128, 0.7, 0.3, flip=True))}


def synthetic(seed=0, n_train=4000, n_test=2000, n_classes=8, modalities=DEFAULT_MODALITIES):
    """Make a synthetic multimodal classification set in memory from a seed."""
    if len(modalities) < 2:
        raise DataError(f"synthetic data needs at least 2 modalities, got {len(modalities)}")
    g = np.random.default_rng(seed)
    n = n_train + n_test
    y = g.integers(0, n_classes, n)                                   # (N,)
    M = len(modalities)
    corrupt = g.random((n, M)) < np.array([m.corrupt for m in modalities])   # (N, M)
    # a sample keeps at least one informative modality
    all_bad = corrupt.all(1)
    corrupt[all_bad, g.integers(0, M, all_bad.sum())] = False
    xs = []
    for j, m in enumerate(modalities):
        prototypes = g.standard_normal((n_classes, m.tokens, m.features))  # (n_classes, L, D)
        clean = ~corrupt[:, j, None, None]                                  # (N, 1, 1)
        sign = g.choice([-1.0, 1.0], (n, 1, 1)) if m.flip else 1.0          # (N, 1, 1)
        x = sign * m.signal * clean * prototypes[y] + g.standard_normal((n, m.tokens, m.features))
        xs.append(torch.from_numpy(x.astype(np.float32)))                 # (N, L, D)
    y = torch.from_numpy(y)
    return Data([m.name for m in modalities], [x[:n_train] for x in xs], y[:n_train],
                [x[n_train:] for x in xs], y[n_train:], n_classes, torch.from_numpy(corrupt[n_train:]))


def save_npz(data, path, vectors=()):
    """Write data in the .npz format load_npz reads; modalities named in `vectors` are saved
    as (N, L*D) vectors (one token each)."""
    arrays = {"train_y": data.train_y.numpy(), "test_y": data.test_y.numpy()}
    for m, tr, te in zip(data.names, data.train_x, data.test_x):
        if m in vectors:
            tr, te = tr.flatten(1), te.flatten(1)
        arrays[f"train_{m}"], arrays[f"test_{m}"] = tr.numpy(), te.numpy()
    np.savez(path, **arrays)


# ----------------------------------------------------------------------------------------
# The sets in the box, by name

AVDIGITS = Path(__file__).resolve().parent / "datasets" / "avdigits.npz"
AVDIGITS_NOISY = AVDIGITS.with_name("avdigits-noisy.npz")


def avdigits(seed=0, path=AVDIGITS):
    """AV digits (built by experiments/avdigits.py from FSDD and MNIST): audio (16, 64) and
    visual (16, 49) tokens, 2400 train / 600 test samples, 10 digits. Seed 0: the file's pairing;
    another seed pairs each recording with another image of the same digit (in each split),
    so that seeds vary the pairing as they vary the initialisation."""
    data = load_npz(path)
    if seed:
        g = np.random.default_rng(seed)
        for xs, y in ((data.train_x, data.train_y), (data.test_x, data.test_y)):
            order = torch.arange(len(y))                                  # (N,) which image each sample takes
            for digit in range(data.n_classes):
                where = torch.nonzero(y == digit)[:, 0]
                order[where] = where[torch.from_numpy(g.permutation(len(where)))]
            v = data.names.index("visual")
            xs[v] = xs[v][order]                                          # the images, re-paired
    return data


def avdigits_noisy(seed=0):
    """Noisy AV digits (built by experiments/avdigits_noisy.py): avdigits' samples, split and pairing, the
    images rebuilt from 5 principal components and the audio mixed with Speech Commands background
    noise; side["snr"]: each sample's SNR in dB. Seeds re-pair as avdigits (the SNR stays with its recording)."""
    return avdigits(seed, AVDIGITS_NOISY)


NAMED = {"avdigits": avdigits, "avdigits-noisy": avdigits_noisy, "synthetic": synthetic}


def load(name, seed=0, **synthetic_size):
    """A set in the box by name (drawn from `seed`), or your features from an .npz path."""
    if name in NAMED:
        return synthetic(seed, **synthetic_size) if name == "synthetic" else NAMED[name](seed)
    if Path(name).is_dir():
        return load_folder(name)
    if not Path(name).exists() and Path(name).suffix != ".npz":
        raise DataError(f"--data {name}: neither a set in the box ({', '.join(NAMED)}) nor a file")
    return load_npz(name)


# ----------------------------------------------------------------------------------------
# Corrupted copies: the noise train.py's final evaluation adds


def corrupted(x, level, z):
    """Corruption level λ of one modality x (N, L, D): x -> μ + sqrt(1 - λ)(x - μ) + sqrt(λ) σ z, with
    μ, σ its per-position mean and std over the set and z ~ N(0, 1): mean and variance stay, the
    signal keeps 1 - λ of the variance. λ = 0: clean; λ = 1: replaced by noise. level: a number or
    (N, 1, 1), one per sample. x Stored (a data folder's): a view that corrupts each batch it reads,
    z the seed of its draws."""
    if isinstance(x, Stored):
        x.noise_moments()                                             # once, for every level
        return x.view(noise=(level, z))
    mu, sd = x.mean(0, keepdim=True), x.std(0, correction=0, keepdim=True)   # (1, L, D)
    return mu + (1 - level) ** 0.5 * (x - mu) + level ** 0.5 * sd * z


def noise_draws(xs, seed=0):
    """The noise every model meets: z (N, L_m, D_m) per modality and a quality u ~ U(0, 1) per sample
    and modality (N, M), from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    zs = [2**16 * seed + j if isinstance(x, Stored) else torch.randn(x.shape, generator=g).to(x.device)  # Stored: a seed
          for j, x in enumerate(xs)]
    return zs, torch.rand(len(xs[0]), len(xs), generator=g).to(xs[0].device)


# ----------------------------------------------------------------------------------------
# Real features from .npz


def load_npz(path):
    """Read train_y, test_y and, per modality m, train_<m> and test_<m> from one .npz file.

    Features are float arrays (N, L_m, D_m), or (N, D_m) taken as one token; labels are
    integers 0..C-1. Optional side information (a per-sample value that is no modality, such as
    avdigits-noisy's SNR): side_train_<name> and side_test_<name>, 1-D numeric arrays with one
    value per sample of the split, loaded as float32 into Data.side[<name>]["train"/"test"].
    Optional validation split: val_y and val_<m> for every m (and side_val_<name> for every side).
    Anything else raises DataError saying what was wrong.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a directory; give the path of one .npz file")
    if not path.exists():
        raise DataError(f"no such file: {path}")
    if not path.is_file():
        raise DataError(f"{path} is not a regular file; give the path of one .npz file")
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        raise DataError(f"{path} holds a single array (.npy), not a .npz archive of train_*/test_* arrays")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path} is not a .npz archive (expected the output of numpy.savez)")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise DataError(f"{path} is not a readable .npz archive: {e}") from None
    arrays = {}
    with archive:
        for key in archive.files:
            try:
                arrays[key] = archive[key]
            except ValueError as e:
                if "allow_pickle" in str(e):
                    raise DataError(f"{path}: array {key!r} holds Python objects; "
                                    f"save plain numeric arrays (loaded with allow_pickle=False)") from None
                raise DataError(f"{path}: cannot read array {key!r}: {e}") from None
            except (OSError, EOFError, zipfile.BadZipFile) as e:
                raise DataError(f"{path}: cannot read array {key!r}, the file is damaged: {e}") from None
    for key in ("train_y", "test_y"):
        if key not in arrays:
            raise DataError(f"{path} has no {key!r}: expected integer labels train_y and test_y")
    splits = ("train", "val", "test") if "val_y" in arrays else ("train", "test")
    side = {key: arrays.pop(key) for key in list(arrays) if key.startswith("side_")}
    for key in side:
        if not key.startswith(("side_train_", "side_test_", "side_val_")) or key.endswith(("_train_", "_test_", "_val_")):
            raise DataError(f"{path}: unexpected array {key!r}; side information is side_train_<name> "
                            f"and side_test_<name>")
        split, name = key[len("side_"):].split("_", 1)
        for other in [f"side_{s}_{name}" for s in splits] + [f"{split}_y"]:
            if other not in side and other not in arrays:
                raise DataError(f"{path}: {key!r} has no matching {other!r}")
    for key in arrays:
        if not key.startswith(("train_", "test_", "val_")):
            raise DataError(f"{path}: unexpected array {key!r}; expected train_y, test_y, train_<m>, test_<m>"
                            f" (a validation split: val_y, val_<m>; side information: side_train_<name>, ...)")
    names = [k[len("train_"):] for k in arrays if k.startswith("train_") and k != "train_y"]
    for key in arrays:
        split, m = key.split("_", 1)
        for other in [f"{s}_{m}" for s in splits] + [f"{split}_y"]:
            if other not in arrays:
                raise DataError(f"{path}: {key!r} has no matching {other!r}")
    if len(names) < 2:
        raise DataError(f"{path} has {len(names)} modality ({names}); expected at least 2 "
                        f"(train_<m> and test_<m> for each)")

    ys, n_classes = checked_labels(path, {split: arrays[f"{split}_y"] for split in splits})

    xs = {split: [] for split in splits}
    for m in names:
        shapes = {}
        for split in splits:
            key = f"{split}_{m}"
            x = arrays[key]
            if x.dtype.kind not in "fiu":
                raise DataError(f"{path}: {key} must hold numbers, got dtype {x.dtype}")
            if x.ndim == 2:
                x = x[:, None, :]                                     # (N, D) -> (N, 1, D)
            if x.ndim != 3:
                raise DataError(f"{path}: {key} must be (N, L, D) or (N, D), got shape {x.shape}")
            if len(x) != len(ys[split]):
                raise DataError(f"{path}: {key} has {len(x)} samples but {split}_y has {len(ys[split])}")
            if 0 in x.shape[1:]:
                raise DataError(f"{path}: {key} has no tokens or no features: shape {x.shape}")
            with np.errstate(over="ignore"):                          # too large for float32: inf, refused below
                x = x.astype(np.float32)
            if not np.isfinite(x).all():
                raise DataError(f"{path}: {key} contains NaN or inf (or values too large for float32)")
            shapes[split] = x.shape[1:]
            xs[split].append(torch.from_numpy(x))
        for split in splits[1:]:
            if shapes["train"] != shapes[split]:
                raise DataError(f"{path}: modality {m!r} has (L, D) = {shapes['train']} in train "
                                f"but {shapes[split]} in {split}")
    sides = {}
    for key, v in side.items():
        split, name = key[len("side_"):].split("_", 1)
        if v.ndim != 1 or v.dtype.kind not in "fiu" or len(v) != len(ys[split]):
            raise DataError(f"{path}: side information {key} must be 1-D numbers, one per sample "
                            f"({len(ys[split])} in {split}_y); got shape {v.shape} dtype {v.dtype}")
        sides.setdefault(name, {})[split] = torch.from_numpy(v.astype(np.float32))   # (N_split,)
    return Data(names, xs["train"], torch.from_numpy(ys["train"]), xs["test"], torch.from_numpy(ys["test"]), n_classes,
                side=sides, val_x=xs.get("val"), val_y=torch.from_numpy(ys["val"]) if "val" in ys else None)


def checked_labels(path, labels, label="{}_y"):
    """Each split's labels (split -> 1-D integer array, train first) as int64, and the number of
    classes C: every class 0..C-1 in training, no other label anywhere; else DataError naming the
    split's array (label.format(split))."""
    ys, train = {}, label.format("train")
    for split, y in labels.items():
        if y.ndim != 1 or y.dtype.kind not in "iu":
            raise DataError(f"{path}: {label.format(split)} must be a 1-D array of integer labels, "
                            f"got shape {y.shape} dtype {y.dtype}")
        if len(y) == 0:
            raise DataError(f"{path}: the {split} split is empty")
        ys[split] = y.astype(np.int64)
    n_classes = int(ys["train"].max()) + 1
    present = np.unique(ys["train"])                                  # sorted
    if len(present) < 2:
        raise DataError(f"{path}: {train} holds one class only (label {present[0]}); expected at least 2 "
                        f"classes, labelled 0..C-1")
    if present[0] >= 0 and len(present) < n_classes:                  # some class in 0..C-1 has no sample
        raise DataError(f"{path}: {train} has no sample of {n_classes - len(present)} of the classes "
                        f"0..{n_classes - 1} (C = 1 + the largest label); number the classes 0..C-1 with every class present")
    for split, y in ys.items():
        if y.min() < 0 or y.max() >= n_classes:
            raise DataError(f"{path}: {label.format(split)} has labels outside 0..{n_classes - 1} "
                            f"(the range {train} covers): min {y.min()}, max {y.max()}")
    return ys, n_classes


# ----------------------------------------------------------------------------------------
# Data larger than memory: a folder, read batch by batch
#
#   DIR/meta.json             {"names": [m, ...], "modalities": {m: {"patch": p, "mean": [..], "std": [..]}}}
#   DIR/<split>/y.npy         (N,) integer labels; split: train, test, and val if there is one
#   DIR/<split>/<m>.npy       modality m as stored: tokens (N, L, D) or (N, D), or with "patch" raw
#                             images (N, C, H, W) (a spectrogram: C = 1) or frames (N, F, C, H, W),
#                             uint8 (scaled to [0, 1]) or floats (float16 keeps a spectrogram small)
#   DIR/<split>/side_<n>.npy  (N,) side information n (no modality)


class Stored:
    """One modality of one split of a data folder, as tokens (N, L, D) that are read when indexed:
    x[i] (i: a slice or an index tensor) reads those rows from disk and makes them tokens on
    x.device (tokens()). A view of the file holds no data: `rows` picks its samples, `noise` its
    corruption (corrupted()). Rows are read with positioned reads, not through a memory map,
    whose touched pages would count toward the process's resident memory until the end."""

    rows_at_once = 64                 # the most rows an evaluation reads at once (rows_per_batch)

    def __init__(self, path, spec, rows=None, device="cpu", noise=None):
        header = np.load(path, mmap_mode="r")                         # the header only: no row is read
        self.path, self.spec, self.device, self.noise = str(path), spec, torch.device(device), noise
        self.raw, self.dtype, self.offset = header.shape[1:], header.dtype, header.offset
        self.rows = np.arange(len(header)) if rows is None else rows
        self.shape = (len(self.rows), *tokens(torch.zeros((1, *self.raw), dtype=torch.float32), spec).shape[1:])
        self.moments = None                                           # (mu, sd) per position, for corrupted()

    def __len__(self):
        return len(self.rows)

    def view(self, rows=None, device=None, noise=None):
        """The same file, other rows (indices into this view), device or corruption."""
        new = Stored(self.path, self.spec, self.rows if rows is None else self.rows[np.asarray(rows)],
                     device or self.device, noise)
        new.moments = self.moments if rows is None else None
        return new

    def to(self, device):
        return self.view(device=device, noise=self.noise)

    def __getitem__(self, i):                                          # -> (B, L, D) float32 on self.device
        at = np.arange(len(self))[i] if isinstance(i, slice) else np.asarray(i.cpu() if torch.is_tensor(i) else i)
        rows = self.rows[at]
        row_bytes = self.dtype.itemsize * int(np.prod(self.raw))
        raw = np.empty((len(rows), *self.raw), self.dtype)
        with open(self.path, "rb", buffering=0) as f:
            for k in np.argsort(rows):                                 # in file order
                f.seek(self.offset + int(rows[k]) * row_bytes)
                f.readinto(memoryview(raw[k]).cast("B"))
        x = tokens(torch.from_numpy(raw).to(self.device), self.spec)   # (B, L, D)
        if self.noise is not None:
            level, seed = self.noise
            level = level[torch.as_tensor(at, device=level.device)].to(x.device) if torch.is_tensor(level) else level
            mu, sd = self.noise_moments()
            z = torch.stack([torch.randn(x.shape[1:], generator=torch.Generator(x.device).manual_seed(seed * 2**32 + int(r)),
                                         device=x.device) for r in rows])   # (B, L, D): a sample's, wherever read
            x = mu + (1 - level) ** 0.5 * (x - mu) + level ** 0.5 * sd * z
        return x

    def noise_moments(self):
        """mu, sd (L, D): each position's mean and std over this view, as corrupted() takes them."""
        if self.moments is None:
            clean, s1, s2 = self.view(device=self.device), 0, 0
            for i in range(0, len(self), self.rows_at_once):
                x = clean[i:i + self.rows_at_once].double()
                s1, s2 = s1 + x.sum(0), s2 + x.square().sum(0)
            mu = s1 / len(self)
            self.moments = mu.float(), (s2 / len(self) - mu.square()).clamp(min=0).sqrt().float()
        return self.moments


def rows_per_batch(x, batch_size):
    """An evaluation's batch size for x: batch_size, or fewer for a data folder's modality (its reads)."""
    return min(batch_size, getattr(x, "rows_at_once", batch_size))


def tokens(x, spec):
    """Rows as stored -> tokens (B, L, D) float32, on x's device: uint8 scaled to [0, 1], then per
    channel (spec "mean", "std") normalised; with spec "patch" p, images (B, C, H, W) or frames
    (B, F, C, H, W) cut into p x p patches, frame by frame, row-major, each patch's features in
    (channel, row, column) order as a ViT's patch-embedding convolution reads them (a remainder
    of H or W that fills no patch is dropped, as the convolution drops it)."""
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    if "mean" in spec:
        x = (x - x.new_tensor(spec["mean"]).view(-1, 1, 1)) / x.new_tensor(spec["std"]).view(-1, 1, 1)
    if not spec.get("patch"):
        return x[:, None] if x.dim() == 2 else x                      # (B, D) -> (B, 1, D)
    p, x = spec["patch"], x[:, None] if x.dim() == 4 else x           # (B, F, C, H, W)
    B, F, C, H, W = x.shape
    h, w = H // p, W // p
    x = x[..., :h * p, :w * p].reshape(B, F, C, h, p, w, p).permute(0, 1, 3, 5, 2, 4, 6)   # (B, F, h, w, C, p, p)
    return x.reshape(B, F * h * w, C * p * p)                         # (B, L, D)


def load_folder(path):
    """A data folder (see above) as a Data whose modalities are Stored: labels and side information
    in memory, the modalities on disk. Bad input raises DataError saying what was wrong."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        names, specs = list(meta["names"]), {m: dict(meta["modalities"].get(m, {})) for m in meta["names"]}
    except FileNotFoundError:
        raise DataError(f"{path} is a directory without meta.json; give one .npz file or a data folder "
                        f"(data.save_folder writes one)") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path}/meta.json: expected {{\"names\": [...], \"modalities\": {{name: {{...}}}}}}, "
                        f"got an error reading it: {e!r}") from None
    splits = [s for s in ("train", "val", "test") if (path / s).is_dir()]
    if "train" not in splits or "test" not in splits or len(names) < 2:
        raise DataError(f"{path}: expected the folders train/ and test/ and at least 2 modality names in meta.json, "
                        f"found {', '.join(splits) or 'no split'} and {names}")
    labels = {}
    for split in splits:
        try:
            labels[split] = np.load(path / split / "y.npy")
        except (OSError, ValueError) as e:
            raise DataError(f"{path}/{split}/y.npy: cannot read the labels: {e}") from None
    ys, n_classes = checked_labels(path, labels, label="{}/y.npy")
    xs = {split: [] for split in splits}
    for m in names:
        for split in splits:
            file = path / split / f"{m}.npy"
            try:
                x = Stored(file, specs[m])
            except (OSError, ValueError, RuntimeError) as e:
                raise DataError(f"{file}: cannot read it as modality {m!r} with {specs[m]}: "
                                f"{' '.join(str(e).split())[:200]}") from None
            if x.dtype.kind not in "fiu" or len(x) != len(ys[split]):
                raise DataError(f"{file}: expected numbers, one row per label ({len(ys[split])}); got {len(x)} rows "
                                f"of dtype {x.dtype}")
            if split != "train" and x.raw != xs["train"][-1].raw:
                raise DataError(f"{file}: rows of shape {x.raw}, but {xs['train'][-1].raw} in train")
            xs[split].append(x)
    sides = {}
    for file in sorted(path.glob("train/side_*.npy")):
        name = file.stem[len("side_"):]
        for split in splits:
            try:
                v = np.load(path / split / file.name)
            except (OSError, ValueError) as e:
                raise DataError(f"{path}/{split}/{file.name}: cannot read the side information {name!r}: {e}") from None
            if v.ndim != 1 or v.dtype.kind not in "fiu" or len(v) != len(ys[split]):
                raise DataError(f"{path}/{split}/{file.name}: expected 1-D numbers, one per sample")
            sides.setdefault(name, {})[split] = torch.from_numpy(v.astype(np.float32))
    y = {split: torch.from_numpy(v) for split, v in ys.items()}
    return Data(names, xs["train"], y["train"], xs["test"], y["test"], n_classes, side=sides,
                val_x=xs.get("val"), val_y=y.get("val"))


def save_folder(data, path, specs=None):
    """Write `data` (e.g. load_npz's) as a data folder: its modalities as they are (tokens), or with
    specs {m: {"patch": ...}} raw arrays of the shapes tokens() takes."""
    path = Path(path)
    specs = {m: dict((specs or {}).get(m, {})) for m in data.names}
    for split, xs, y in (("train", data.train_x, data.train_y), ("val", data.val_x, data.val_y),
                         ("test", data.test_x, data.test_y)):
        if y is None:
            continue
        (path / split).mkdir(parents=True, exist_ok=True)
        np.save(path / split / "y.npy", y.numpy())
        for m, x in zip(data.names, xs):
            np.save(path / split / f"{m}.npy", np.asarray(x))
        for name, v in data.side.items():
            np.save(path / split / f"side_{name}.npy", v[split].numpy())
    write_meta(path, data.names, specs)
    return path


def write_meta(path, names, specs):
    """meta.json of a data folder: the modality names, in input order, and each one's spec for tokens()."""
    (Path(path) / "meta.json").write_text(json.dumps({"names": list(names), "modalities": specs}, indent=1))


def write_npy(path, shape, dtype, blocks):
    """A .npy of `shape` and `dtype` written from an iterable of row blocks, one block in memory at a time."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                 "fortran_order": False, "shape": tuple(shape)})
        for block in blocks:
            block = np.ascontiguousarray(block, dtype=dtype)
            assert block.shape[1:] == tuple(shape[1:]), (block.shape, shape)
            f.write(block.tobytes())
            written += len(block)
    assert written == shape[0], (written, shape)
