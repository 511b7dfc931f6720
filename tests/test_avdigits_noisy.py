"""Specification of experiments/avdigits_noisy.py, the shipped datasets/avdigits-noisy.npz and side information in data.py."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, cli, refused, small_npz

import data as datasets
from experiments import avdigits, avdigits_noisy

SHIPPED = Path(ROOT) / "datasets" / "avdigits-noisy.npz"
raw_sources = pytest.mark.skipif(not (avdigits.SOURCE / "noise").is_dir(),
                                 reason=f"the raw sources are not at {avdigits.SOURCE} (they are not in the repository)")


@raw_sources
def test_rebuilding_from_the_raw_sources_gives_the_shipped_file_byte_for_byte(tmp_path, capsys):
    avdigits_noisy.main(["--out", str(tmp_path / "noisy.npz")])
    assert (tmp_path / "noisy.npz").read_bytes() == SHIPPED.read_bytes()
    out = capsys.readouterr().out
    assert "train 2400, test 600" in out and "of the training images' variance" in out
    assert "SNR: uniform in [-10, 10] dB" in out and "sha256" in out


def test_the_shipped_set_has_avdigits_samples_shapes_and_labels_and_is_in_the_box():
    d, clean = datasets.load("avdigits-noisy"), datasets.load("avdigits")
    assert d.names == ["audio", "visual"] and d.modalities == {"audio": (16, 64), "visual": (16, 49)}
    assert torch.equal(d.train_y, clean.train_y) and torch.equal(d.test_y, clean.test_y)
    assert d.train_y.bincount().tolist() == [240] * 10 and d.test_y.bincount().tolist() == [60] * 10
    assert all(x.isfinite().all() for x in d.train_x + d.test_x)
    assert abs(float(d.train_x[0].mean())) < 0.01                      # audio standardised on the training split
    assert SHIPPED.stat().st_size <= 10e6


def test_the_images_are_avdigits_images_rebuilt_from_5_components_of_the_training_images():
    noisy, clean = datasets.load_npz(SHIPPED), datasets.load_npz(avdigits.OUT)
    pixels = [x[1].double().numpy().reshape(-1, 28, 28) * 255 for x in (clean.train_x, clean.test_x)]
    train, test, kept = avdigits_noisy.pca_images(*pixels, 5)          # in patch order: a permutation PCA does not mind
    assert 0.2 < kept < 0.5
    for got, want in ((noisy.train_x[1], train), (noisy.test_x[1], test)):   # the same pairing
        assert np.abs(got.double().numpy().reshape(-1, 28, 28) - want).max() < 0.01


def test_every_sample_carries_its_snr_as_side_information_over_the_declared_range():
    d = datasets.load("avdigits-noisy", seed=1)
    assert d.names == ["audio", "visual"] and list(d.side) == ["snr"]
    for split, n in (("train", 2400), ("test", 600)):
        snr = d.side["snr"][split]
        assert snr.shape == (n,) and snr.dtype == torch.float32
        assert -10 <= snr.min() < -9.5 and 9.5 < snr.max() <= 10        # one uniform draw for both splits
        assert abs(float(snr.mean())) < 1.5
    assert d.select("visual").side is d.side


def test_a_seed_re_pairs_the_images_and_leaves_the_recordings_and_their_snr():
    a, b = datasets.load("avdigits-noisy"), datasets.load("avdigits-noisy", seed=1)
    assert torch.equal(a.train_x[0], b.train_x[0]) and torch.equal(a.side["snr"]["test"], b.side["snr"]["test"])
    assert (a.test_x[1].flatten(1) != b.test_x[1].flatten(1)).any(1).float().mean() > 0.9


def test_test_mixes_take_noise_only_from_the_last_fifth_of_each_file_and_training_mixes_from_the_rest():
    lengths = [50_000, 30_000, 80_000]
    is_test = np.random.default_rng(1).random(5000) < 0.3
    files, offsets = avdigits_noisy.noise_segments(np.random.default_rng(0), lengths, is_test, n=5280)
    cut = (np.array(lengths) * 0.8).astype(int)[files]                # (N,) the first sample of the test span
    assert (offsets[~is_test] >= 0).all() and (offsets[~is_test] + 5280 <= cut[~is_test]).all()
    assert (offsets[is_test] >= cut[is_test]).all() and (offsets[is_test] + 5280 <= np.array(lengths)[files][is_test]).all()
    assert set(files.tolist()) == {0, 1, 2} and len(np.unique(offsets[is_test])) > 1000   # spread over files and time
    with pytest.raises(datasets.DataError, match="test span is shorter than a clip"):
        avdigits_noisy.noise_segments(np.random.default_rng(0), [20_000], is_test, n=5280)


def test_the_pca_is_fitted_on_the_training_images_alone():
    g = np.random.default_rng(0)
    train, test = g.integers(0, 256, (60, 28, 28)), g.integers(0, 256, (20, 28, 28))
    a = avdigits_noisy.pca_images(train, test, 5)
    b = avdigits_noisy.pca_images(train, np.concatenate([test[:10], 255 - test[10:]]), 5)
    assert np.array_equal(a[0], b[0]) and a[2] == b[2] and np.array_equal(a[1][:10], b[1][:10])
    assert not np.allclose(avdigits_noisy.pca_images(255 - train, test, 5)[1], a[1])
    exact = avdigits_noisy.pca_images(train, test, 784)                # every component: the training images themselves
    assert exact[2] == pytest.approx(1) and np.allclose(exact[0], train / 255)


def test_a_mix_is_at_the_drawn_snr_against_the_recordings_power_and_fills_the_clip():
    g = np.random.default_rng(0)
    signal, noise = g.standard_normal(3000) * 0.1, g.standard_normal(5280) * 0.3
    for snr in (-10, 0, 7.5):
        mixed = avdigits_noisy.mix(signal, noise, snr)
        added = mixed - np.r_[signal, np.zeros(2280)]
        assert np.allclose(added / noise, added[0] / noise[0])         # the noise, scaled, over all 5280 samples
        assert 10 * np.log10(np.mean(signal ** 2) / np.mean(added ** 2)) == pytest.approx(snr)


def test_the_noise_is_resampled_to_8_khz_behind_a_low_pass(tmp_path):
    from test_avdigits import write_wav
    t = np.arange(16000) / 16000
    path = write_wav(tmp_path / "tones.wav", 8000 * (np.sin(2 * np.pi * 1000 * t) + np.sin(2 * np.pi * 6000 * t)), rate=16000)
    x = avdigits_noisy.read_noise(path)[500:-500]                      # away from the filter's edges
    spectrum = np.abs(np.fft.rfft(x)) / len(x) * 2                    # amplitude per Hz bin
    hz = np.fft.rfftfreq(len(x), 1 / 8000)
    assert len(avdigits_noisy.read_noise(path)) == 8000
    assert spectrum[np.argmin(abs(hz - 1000))] == pytest.approx(8000 / 32768, rel=0.05)   # kept
    assert spectrum[np.argmin(abs(hz - 2000))] < 1e-3                 # 6 kHz does not fold down to 2 kHz


def test_side_arrays_are_loaded_as_side_information_not_as_modalities(tmp_path):
    d = datasets.load_npz(small_npz(tmp_path / "side.npz", side_train_snr=np.arange(40.0), side_test_snr=np.arange(20)))
    assert d.names == ["audio", "visual"] and list(d.side) == ["snr"]
    assert torch.equal(d.side["snr"]["train"], torch.arange(40.0)) and d.side["snr"]["test"].dtype == torch.float32
    assert datasets.load_npz(small_npz(tmp_path / "plain.npz")).side == {}


@pytest.mark.parametrize("change, message", [
    ({"side_train_snr": np.zeros(39), "side_test_snr": np.zeros(20)},
     r"side information side_train_snr must be 1-D numbers, one per sample \(40 in train_y\); got shape \(39,\)"),
    ({"side_train_snr": np.zeros((40, 2)), "side_test_snr": np.zeros(20)}, r"got shape \(40, 2\)"),
    ({"side_train_snr": np.zeros(40), "side_test_snr": np.array(["a"] * 20)}, "side_test_snr must be 1-D numbers"),
    ({"side_train_snr": np.zeros(40)}, "'side_train_snr' has no matching 'side_test_snr'"),
    ({"side_snr": np.zeros(40)}, "unexpected array 'side_snr'; side information is side_train_<name> and side_test_<name>"),
])
def test_a_malformed_side_array_is_refused_in_one_line(tmp_path, change, message):
    with pytest.raises(datasets.DataError, match=message) as e:
        datasets.load_npz(small_npz(tmp_path / "bad.npz", **change))
    assert "\n" not in str(e.value)


def test_a_missing_source_folder_and_a_bad_snr_range_are_refused_in_one_line(tmp_path):
    r = cli("--source", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.npz"), module="experiments.avdigits_noisy")
    assert refused(r, f"no such folder: {tmp_path / 'nowhere'}") and not (tmp_path / "x.npz").exists()
    r = cli("--snr=10,-10", "--out", str(tmp_path / "x.npz"), module="experiments.avdigits_noisy")
    assert refused(r, "argument --snr: expected finite LO <= HI in dB, got '10,-10'")
