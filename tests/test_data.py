"""Specification of data.py: the built-in set, the .npz loader and the data folder."""

import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, cli, refused, small_npz

import data as datasets


def test_synthetic_data_is_reproducible_from_its_seed():
    a, b, c = datasets.synthetic(seed=3, n_train=50, n_test=10), datasets.synthetic(seed=3, n_train=50, n_test=10), \
        datasets.synthetic(seed=4, n_train=50, n_test=10)
    assert all(torch.equal(x, y) for x, y in zip(a.train_x + [a.train_y], b.train_x + [b.train_y]))
    assert not torch.equal(a.train_x[0], c.train_x[0])
    assert a.modalities == {"audio": (8, 16), "visual": (16, 16)} and a.n_classes == 8


def test_load_npz_reads_tokens_and_vectors(tmp_path):
    d = datasets.load_npz(small_npz(tmp_path / "ok.npz"))
    assert d.names == ["audio", "visual"] and d.n_classes == 3
    assert d.modalities == {"audio": (4, 5), "visual": (1, 6)}
    assert d.train_x[1].dtype == torch.float32 and d.train_y.dtype == torch.int64


BAD_NPZ = {
    "object arrays": ({"train_audio": np.array([None] * 40, dtype=object)}, "Python objects"),
    "one modality": ({"train_visual": None, "test_visual": None}, "expected at least 2"),
    "missing labels": ({"test_y": None}, "no 'test_y'"),
    "N differs from labels": ({"train_audio": np.zeros((39, 4, 5))}, "39 samples but train_y has 40"),
    "L differs between splits": ({"test_audio": np.zeros((20, 3, 5))}, r"\(4, 5\) in train but \(3, 5\) in test"),
    "D differs between splits": ({"test_visual": np.zeros((20, 7))}, r"\(1, 6\) in train but \(1, 7\) in test"),
    "NaN": ({"train_visual": np.full((40, 6), np.nan)}, "NaN or inf"),
    "inf": ({"test_audio": np.full((20, 4, 5), np.inf)}, "NaN or inf"),
    "too large for float32": ({"train_visual": np.full((40, 6), 1e300)}, r"NaN or inf \(or values too large for float32\)"),
    "one class": ({"train_y": np.zeros(40, int), "test_y": np.zeros(20, int)}, r"train_y holds one class only \(label 0\)"),
    "one class, not 0": ({"train_y": np.ones(40, int)}, r"train_y holds one class only \(label 1\)"),
    "negative label": ({"train_y": np.r_[-1, np.zeros(39, int)]}, "outside 0..0"),
    "test label unseen in train": ({"test_y": np.full(20, 3)}, r"test_y has labels outside 0..2"),
    "float labels": ({"train_y": np.zeros(40)}, "integer labels"),
    "empty split": ({"test_y": np.zeros(0, int), "test_audio": np.zeros((0, 4, 5)),
                     "test_visual": np.zeros((0, 6))}, "test split is empty"),
    "train without test": ({"test_visual": None}, "no matching 'test_visual'"),
    "unknown array": ({"dev_audio": np.zeros(3)}, "unexpected array 'dev_audio'"),
    "4-D features": ({"train_audio": np.zeros((40, 1, 4, 5)), "test_audio": np.zeros((20, 1, 4, 5))},
                     r"must be \(N, L, D\) or \(N, D\)"),
}


@pytest.mark.parametrize("case", list(BAD_NPZ))
def test_load_npz_refuses_bad_input_with_a_clear_message(tmp_path, case):
    change, message = BAD_NPZ[case]
    with pytest.raises(datasets.DataError, match=message):
        datasets.load_npz(small_npz(tmp_path / "bad.npz", **change))


def test_load_npz_refuses_a_missing_file_and_a_file_that_is_no_npz(tmp_path):
    with pytest.raises(datasets.DataError, match="no such file"):
        datasets.load_npz(tmp_path / "absent.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(datasets.DataError, match="not a .npz archive"):
        datasets.load_npz(tmp_path / "text.npz")
    with pytest.raises(datasets.DataError, match=r"README.md is not a .npz archive \(expected the output of numpy.savez\)$"):
        datasets.load_npz(os.path.join(ROOT, "README.md"))     # no word of pickles: just what it is not
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(datasets.DataError, match="single array"):
        datasets.load_npz(tmp_path / "single.npy")


def test_synthetic_data_says_which_test_samples_were_drawn_as_noise_in_each_modality():
    d = datasets.synthetic(seed=1, n_train=200, n_test=4000)
    noise = d.test_noise                                        # (N_test, M) bool
    assert noise.shape == (4000, 2) and noise.dtype == torch.bool and not noise.all(1).any()   # never both
    assert 0.2 < float(noise.float().mean()) < 0.3              # 30 % drawn, fewer after the restore
    # a sample drawn as noise in audio carries no class signal there: its tokens average to ~0
    proto = torch.stack([d.test_x[0][(d.test_y == c) & ~noise[:, 0]].mean(0) for c in range(d.n_classes)])
    score = lambda x, y: (x * proto[y]).mean((1, 2))            # noqa: E731  match with the class's prototype
    assert float(score(d.test_x[0][noise[:, 0]], d.test_y[noise[:, 0]]).mean()) < 0.1
    assert float(score(d.test_x[0][~noise[:, 0]], d.test_y[~noise[:, 0]]).mean()) > 0.5
    assert torch.equal(d.select("visual").test_noise[:, 0], noise[:, 1])


def test_corruption_keeps_each_modalitys_mean_and_std_and_every_model_meets_the_same_draw():
    g = torch.Generator().manual_seed(1)                        # not the noise's seed 0
    x = 3 + 2 * torch.randn(4000, 2, 3, generator=g)           # (N, L, D)
    zs, u = datasets.noise_draws([x, x[:, :1]])
    again = datasets.noise_draws([x, x[:, :1]])
    assert all(torch.equal(a, b) for a, b in zip(zs + [u], again[0] + [again[1]]))   # the same draw every time
    assert u.shape == (4000, 2) and 0 <= float(u.min()) and float(u.max()) <= 1
    assert torch.allclose(datasets.corrupted(x, 0.0, zs[0]), x, atol=1e-5)
    for level in (0.25, 0.5, 1.0):
        noised = datasets.corrupted(x, level, zs[0])
        assert torch.allclose(noised.mean(0), x.mean(0), atol=0.1) and torch.allclose(noised.std(0), x.std(0), atol=0.1)
        signal = float(torch.corrcoef(torch.stack([noised.flatten(), x.flatten()]))[0, 1]) ** 2
        assert signal == pytest.approx(1 - level, abs=0.02)     # the signal keeps 1 - level of the variance
    assert torch.equal(datasets.corrupted(x, 1.0, zs[0]), x.mean(0, keepdim=True) + x.std(0, correction=0, keepdim=True) * zs[0])


def test_avdigits_is_in_the_box_and_a_seed_pairs_each_recording_with_another_image_of_its_digit():
    a, b = datasets.load("avdigits"), datasets.load("avdigits", seed=1)
    assert a.names == ["audio", "visual"] and a.modalities == {"audio": (16, 64), "visual": (16, 49)}
    assert (len(a.train_y), len(a.test_y), a.n_classes) == (2400, 600, 10)
    for split in ("train", "test"):
        (xa, va), (xb, vb), y = getattr(a, f"{split}_x"), getattr(b, f"{split}_x"), getattr(a, f"{split}_y")
        assert torch.equal(xa, xb) and torch.equal(y, getattr(b, f"{split}_y"))   # recordings and labels stay
        assert (va.flatten(1) != vb.flatten(1)).any(1).float().mean() > 0.9       # nearly every image moved
        for digit in range(10):                                 # to another recording of the same digit
            rows = lambda v: sorted(map(tuple, v[y == digit].flatten(1).tolist()))   # noqa: E731
            assert rows(va) == rows(vb)
    assert torch.equal(datasets.load("avdigits", seed=1).test_x[1], b.test_x[1])  # the same seed, the same pairing


def test_tokens_are_the_patches_a_vit_patch_embedding_convolution_reads():
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (2, 3, 3, 35, 48), generator=g, dtype=torch.uint8)   # (B, F, C, H, W), 35: 2 rows + 3
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    W = torch.randn(8, 3, 16, 16, generator=g)                  # a patch embedding's kernels (out, C, p, p)
    x = frames.float() / 255
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    conv = torch.cat([F.conv2d(x[:, f], W, stride=16).flatten(2).transpose(1, 2) for f in range(3)], 1)   # (B, 3*2*3, 8)
    t = datasets.tokens(frames, {"patch": 16, "mean": mean, "std": std})
    assert t.shape == (2, 18, 768) and torch.allclose(t @ W.flatten(1).T, conv, atol=1e-4)
    spectrogram = torch.randn(2, 1, 257, 188, generator=g).half()     # CREMA-D's: 16 x 11 patches, the rest dropped
    W1 = W.sum(1, keepdim=True)                                  # (out, 1, p, p)
    conv = F.conv2d(spectrogram.float(), W1, stride=16).flatten(2).transpose(1, 2)
    t = datasets.tokens(spectrogram, {"patch": 16})
    assert t.shape == (2, 176, 256) and torch.allclose(t @ W1.flatten(1).T, conv, atol=1e-3)
    assert datasets.tokens(torch.ones(2, 6), {}).shape == (2, 1, 6)


def test_a_data_folder_is_read_from_disk_when_indexed_and_its_views_hold_no_data(tmp_path):
    d = datasets.load_npz(small_npz(tmp_path / "small.npz"))
    folder = datasets.save_folder(d, tmp_path / "folder")
    f = datasets.load(str(folder))
    assert f.modalities == d.modalities and f.sizes == d.sizes and torch.equal(f.train_y, d.train_y)
    audio = f.train_x[0]
    i = torch.tensor([7, 2, 30])
    assert torch.equal(audio[i], d.train_x[0][i]) and torch.equal(audio[3:9], d.train_x[0][3:9])
    with open(folder / "train" / "audio.npy", "r+b") as file:   # row 2 changes on disk after the load
        file.seek(audio.offset + 2 * 4 * 5 * 4)
        file.write(np.full(20, 9, np.float32).tobytes())
    assert (audio[i][1] == 9).all() and not (audio[i][0] == 9).any()
    half = audio.view(rows=np.arange(0, 40, 2))                  # samples 0, 2, 4, ...
    assert len(half) == 20 and (half[torch.tensor([1])] == 9).all()
    held = [k for k, v in vars(half).items() if isinstance(v, (np.ndarray, torch.Tensor))]
    assert held == ["rows"] and half.moments is None             # the row numbers, no data


def test_a_stored_modality_corrupts_as_the_in_memory_one_with_each_samples_own_draw(tmp_path):
    d = datasets.synthetic(seed=0, n_train=40, n_test=300, n_classes=4)
    f = datasets.load(str(datasets.save_folder(d, tmp_path / "folder")))
    zs, _ = datasets.noise_draws(f.test_x)
    assert datasets.corrupted(f.test_x[1], 0.0, zs[1])[:].allclose(d.test_x[1], atol=1e-5)
    noisy = datasets.corrupted(f.test_x[1], 1.0, zs[1])
    x, clean = noisy[:], d.test_x[1]
    z = (x - clean.mean(0)) / clean.std(0, correction=0)         # N(0, 1): the set's own mean and std kept
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02
    assert abs(float(torch.corrcoef(torch.stack([x.flatten(), clean.flatten()]))[0, 1])) < 0.02   # no signal left
    assert torch.equal(noisy[torch.tensor([5])], x[5:6])         # the same draw, alone or among others
    level, mu = torch.rand(300, 1, 1), clean.mean(0)             # one level per sample, the same z
    mixed = datasets.corrupted(f.test_x[1], level, zs[1])
    assert torch.allclose(mixed[:], mu + (1 - level) ** 0.5 * (clean - mu) + level ** 0.5 * (x - mu), atol=1e-4)


@pytest.mark.parametrize("case", ["no meta", "no test", "rows", "shape", "labels", "side"])
def test_a_bad_data_folder_is_refused_in_one_line(tmp_path, case):
    folder = datasets.save_folder(datasets.load_npz(small_npz(tmp_path / "small.npz")), tmp_path / "folder")
    message = {"no meta": "is a directory without meta.json", "no test": "expected the folders train/ and test/",
               "rows": "test/visual.npy: expected numbers, one row per label (20); got 19 rows",
               "shape": "test/audio.npy: rows of shape (4, 6), but (4, 5) in train",
               "labels": "train/y.npy holds one class only",
               "side": "test/side_snr.npy: cannot read the side information 'snr'"}[case]
    if case == "no meta":
        (folder / "meta.json").unlink()
    elif case == "no test":
        shutil.rmtree(folder / "test")
    elif case == "rows":
        np.save(folder / "test" / "visual.npy", np.zeros((19, 6)))
    elif case == "shape":
        np.save(folder / "test" / "audio.npy", np.zeros((20, 4, 6)))
    elif case == "labels":
        np.save(folder / "train" / "y.npy", np.zeros(40, int))
    else:                                                        # side information in train/ only
        np.save(folder / "train" / "side_snr.npy", np.zeros(40))
    assert refused(cli("--data", str(folder)), message)
