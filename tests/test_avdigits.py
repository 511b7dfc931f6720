"""Specification of experiments/avdigits.py and the shipped datasets/avdigits.npz."""

import gzip
import wave
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, cli, refused

import data as datasets
from experiments import avdigits

SHIPPED = Path(ROOT) / "datasets" / "avdigits.npz"
raw_sources = pytest.mark.skipif(not (avdigits.SOURCE / "fsdd").is_dir(),
                                 reason=f"the raw sources are not at {avdigits.SOURCE} (they are not in the repository)")


def write_wav(path, samples, rate=8000, channels=1, width=2):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(np.asarray(samples, dtype=f"<i{width}").tobytes())
    return path


@raw_sources
def test_rebuilding_from_the_raw_sources_gives_the_shipped_file_byte_for_byte(tmp_path, capsys):
    avdigits.main(["--out", str(tmp_path / "avdigits.npz")])
    assert (tmp_path / "avdigits.npz").read_bytes() == SHIPPED.read_bytes()
    out = capsys.readouterr().out
    assert "train 2400, test 600" in out and "sha256" in out


def test_the_shipped_set_has_2400_train_and_600_test_samples_of_ten_balanced_digits():
    d = datasets.load_npz(SHIPPED)
    assert d.names == ["audio", "visual"] and d.modalities == {"audio": (16, 64), "visual": (16, 49)}
    assert d.n_classes == 10 and len(d.train_y) == 2400 and len(d.test_y) == 600
    assert d.train_y.bincount().tolist() == [240] * 10 and d.test_y.bincount().tolist() == [60] * 10
    assert all(x.isfinite().all() for x in d.train_x + d.test_x)
    assert all(0 <= x.min() and x.max() <= 1 for x in (d.train_x[1], d.test_x[1]))   # pixels / 255
    assert abs(float(d.train_x[0].mean())) < 0.01                      # audio standardised on the training split


def test_no_image_is_used_twice_and_none_is_in_both_splits():
    with np.load(SHIPPED) as f:
        train, test = (f[f"{s}_visual"].reshape(len(f[f"{s}_y"]), -1) for s in ("train", "test"))
    assert len(np.unique(train, axis=0)) == 2400 and len(np.unique(test, axis=0)) == 600
    assert len(np.unique(np.concatenate([train, test]), axis=0)) == 3000


@raw_sources
def test_holding_out_theo_makes_his_500_recordings_the_test_split():
    arrays = avdigits.build(avdigits.SOURCE, ["theo"])
    assert len(arrays["test_y"]) == 500 and len(arrays["train_y"]) == 2500
    assert np.bincount(arrays["test_y"]).tolist() == [50] * 10
    theo = np.stack([avdigits.log_mel(avdigits.read_wav(avdigits.SOURCE / "fsdd" / f"{d}_theo_{i}.wav"))
                     for d in range(10) for i in range(50)])           # (500, 32, 32), (digit, speaker, index) order
    got = arrays["test_audio"].astype(np.float64).reshape(500, 32, 32).transpose(0, 2, 1)   # (500, bands, frames)

    def z(x):                                                          # per band: blind to the training statistics
        return (x - x.mean(axis=(0, 2), keepdims=True)) / x.std(axis=(0, 2), keepdims=True)
    assert np.abs(z(got) - z(theo)).max() < 0.01                       # sample k is theo's k-th recording


def test_the_log_mel_spectrogram_has_32_bands_by_32_frames_and_silence_at_the_floor():
    short = avdigits.log_mel(np.zeros(100))
    assert short.shape == (32, 32) and np.allclose(short, np.log(1e-6))
    tone = avdigits.log_mel(0.5 * np.sin(2 * np.pi * 1000 * np.arange(8000) / 8000))   # cropped to 32 frames
    assert tone.shape == (32, 32) and (tone.argmax(axis=0) == tone[:, 0].argmax()).all()


def test_patches_are_row_major_and_each_patch_is_row_major():
    x = np.arange(28 * 28).reshape(1, 28, 28)
    p = avdigits.patches(x, 7, 7)                                      # (1, 16, 49)
    assert p.shape == (1, 16, 49) and p[0, 1, 0] == 7 and p[0, 4, 0] == 7 * 28 and p[0, 0, 7] == 28


def test_a_truncated_or_wrongly_formatted_wav_is_refused_naming_the_file(tmp_path):
    good = write_wav(tmp_path / "good.wav", np.arange(400))
    assert np.allclose(avdigits.read_wav(good) * 32768, np.arange(400))
    cut = tmp_path / "0_george_0.wav"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(datasets.DataError, match=f"{cut}.*truncated"):
        avdigits.read_wav(cut)
    for bad in (write_wav(tmp_path / "fast.wav", np.arange(400), rate=16000),
                write_wav(tmp_path / "stereo.wav", np.arange(400), channels=2)):
        with pytest.raises(datasets.DataError, match=f"{bad}.*expected 8 kHz mono 16-bit"):
            avdigits.read_wav(bad)
    (tmp_path / "junk.wav").write_bytes(b"not a wav")
    with pytest.raises(datasets.DataError, match="junk.wav is not a readable WAV"):
        avdigits.read_wav(tmp_path / "junk.wav")


def test_an_idx_file_with_a_wrong_magic_number_or_size_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9])))
    assert avdigits.read_idx(path).tolist() == [7, 8, 9]
    path.write_bytes(gzip.compress(bytes([0, 0, 13, 1, 0, 0, 0, 3, 7, 8, 9])))   # 0x0D: floats, not bytes
    with pytest.raises(datasets.DataError, match=f"{path}: wrong magic number"):
        avdigits.read_idx(path)
    path.write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 4, 7, 8, 9])))
    with pytest.raises(datasets.DataError, match=f"{path}: its header says 4 bytes of data, it holds 3"):
        avdigits.read_idx(path)
    path.write_bytes(b"plain bytes, not gzip")
    with pytest.raises(datasets.DataError, match=f"{path} is not a readable gzipped IDX"):
        avdigits.read_idx(path)


def test_a_csv_row_with_the_wrong_number_of_values_is_refused_naming_the_file_and_row(tmp_path):
    path = tmp_path / "mnist_5k.csv.gz"
    path.write_bytes(gzip.compress(("0," * 784 + "3\n" + "0," * 700 + "3\n").encode()))
    with pytest.raises(datasets.DataError, match=f"{path}, row 2: 701 values; expected 784 pixels then the label"):
        avdigits.read_mnist_csv(path)


def test_too_few_images_of_a_digit_for_the_pairing_is_refused():
    images, labels = np.zeros((3, 28, 28), np.uint8), np.array([0, 0, 1])
    with pytest.raises(datasets.DataError, match="hold 1 of digit 1; the pairing needs 2"):
        avdigits.pair_images([(1, "theo", 0), (1, "theo", 1)], images, labels, "test")


def test_a_missing_source_folder_is_refused_in_one_line(tmp_path):
    r = cli("--source", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.npz"), module="experiments.avdigits")
    assert refused(r, f"no such folder: {tmp_path / 'nowhere'}") and not (tmp_path / "x.npz").exists()


def test_a_truncated_recording_in_the_sources_is_refused_in_one_line_naming_it(tmp_path):
    (tmp_path / "fsdd").mkdir()
    wav = write_wav(tmp_path / "fsdd" / "0_george_0.wav", np.arange(400))
    wav.write_bytes(wav.read_bytes()[:-10])
    r = cli("--source", str(tmp_path), "--out", str(tmp_path / "x.npz"), module="experiments.avdigits")
    assert refused(r, f"{wav} is truncated")


def test_an_unknown_test_speaker_is_refused_in_one_line():
    r = cli("--test-speakers", "theo,bob", "--out", "/nonexistent/x.npz", module="experiments.avdigits")
    assert refused(r, "unknown speaker 'bob'; the speakers are george, jackson, lucas, nicolas, theo, yweweler")
