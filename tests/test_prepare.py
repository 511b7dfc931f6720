"""Specification of experiments/prepare.py: CREMA-D and Kinetics-Sounds layouts to a data folder, on tiny files
the tests write (WAV by the wave module, frames as PPM)."""

import json
import os
import wave

import numpy as np
import torch
from conftest import ROOT, TINY, cli, refused

import data as datasets
from experiments import prepare


def write_wav(path, x, rate):
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())


def write_ppm(path, image):                                     # image (H, W, 3) uint8
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"P6\n# a frame\n%d %d\n255\n" % (image.shape[1], image.shape[0]) + image.tobytes())


def a_set(root, name, clips, rate=16000):
    """A tiny set in the published layout: per clip a WAV of 0.4 s and 2 + k frames, frame i all of value 10 i."""
    audio, frames = {"cremad": ("AudioWAV", "Image-01-FPS"), "kinetics-sounds": ("audio", "frames")}[name]
    g = np.random.default_rng(0)
    root.mkdir(parents=True)
    for split, rows in clips.items():
        (root / f"{split}.csv").write_text("".join(f"{clip},{label}\n" for clip, label in rows))
        for k, (clip, _) in enumerate(rows):
            write_wav(root / audio / f"{clip}.wav", 0.3 * g.standard_normal(int(0.4 * rate)), rate)
            for i in range(2 + k % 4):
                write_ppm(root / frames / clip / f"{i + 1:05d}.ppm", np.full((18, 30, 3), 10 * i, np.uint8))
    return root


def test_the_kaldi_fbank_is_torchaudios():
    oracle = torch.load(os.path.join(ROOT, "tests", "fbank_oracle.pt"), weights_only=True)   # python -m experiments.oracles
    for rate, theirs in oracle["fbank"].items():
        ours = prepare.kaldi_fbank(oracle["wave"].numpy(), rate)
        assert ours.shape == tuple(theirs.shape) and np.allclose(ours, theirs.numpy(), atol=2e-3), rate


def test_the_cremad_spectrogram_is_log_stft_of_the_audio_tiled_to_three_seconds_at_22050_hz():
    t = np.arange(22050) / 22050
    x = 0.5 * np.sin(2 * np.pi * 1000 * t)                       # 1 s at 1 kHz: tiled 3 times
    s = prepare.cremad_spectrogram(x, 22050)
    assert s.shape == (257, 188)
    tiled = np.pad(np.tile(x, 3), 256)                           # centred frames, zero padded (librosa's)
    for t in (0, 100):
        frame = tiled[t * 353:t * 353 + 512] * np.hanning(513)[:-1]   # the periodic Hann window
        assert np.allclose(s[:, t], np.log(np.abs(np.fft.rfft(frame)) + 1e-7), atol=1e-6)
    assert np.argmax(s[:, 100]) == round(1000 * 512 / 22050)
    y = prepare.resample(np.sin(2 * np.pi * 440 * np.arange(16000) / 16000), 16000, 22050)   # the same tone at 22 050 Hz
    assert len(y) == 22050 and np.allclose(y, np.sin(2 * np.pi * 440 * np.arange(22050) / 22050), atol=1e-6)


def test_cremad_becomes_a_folder_with_the_authors_shapes_and_a_seeded_stratified_validation_split(tmp_path):
    labels = prepare.CREMAD_CLASSES
    clips = {"train": [(f"10{i:02d}_X_{labels[i % 6]}", labels[i % 6]) for i in range(24)],
             "test": [(f"20{i:02d}_X_{labels[i % 6]}", labels[i % 6]) for i in range(6)]}
    root = a_set(tmp_path / "CREMA-D", "cremad", clips)
    r = cli("cremad", str(root), "--out", str(tmp_path / "out"), "--val-fraction", "0.25", module="experiments.prepare")
    assert r.returncode == 0, r.stderr
    d = datasets.load(str(tmp_path / "out"))
    assert d.sizes == "18 train / 6 val / 6 test" and sorted(d.val_y.tolist()) == list(range(6))   # one of each class
    assert d.modalities == {"audio": (176, 256), "visual": (588, 768)}   # the authors' 176 + 588 tokens
    assert (tmp_path / "out" / "classes.txt").read_text().split() == labels
    test_names = [c for c, _ in clips["test"]]
    assert d.test_y.tolist() == [labels.index(c.split("_")[-1]) for c in test_names]
    audio = np.load(tmp_path / "out" / "test" / "audio.npy")     # (N, 1, 257, 188) float16, the spectrogram as stored
    x, rate = prepare.read_wav(root / "AudioWAV" / f"{test_names[1]}.wav")
    assert audio.dtype == np.float16 and np.array_equal(audio[1, 0], prepare.cremad_spectrogram(x, rate).astype(np.float16))
    visual = np.load(tmp_path / "out" / "test" / "visual.npy")   # (N, 3, 3, 224, 224) uint8: 3 frames evenly spaced
    assert visual.shape == (6, 3, 3, 224, 224) and visual.dtype == np.uint8
    assert [int(visual[3, f, 0, 0, 0]) for f in range(3)] == [0, 20, 40]         # clip 3: 5 frames, 0 2 4 picked
    assert [int(visual[0, f, 0, 0, 0]) for f in range(3)] == [0, 0, 10]          # clip 0: 2 frames, 0 0 1
    again = cli("cremad", str(root), "--out", str(tmp_path / "again"), "--val-fraction", "0.25", module="experiments.prepare")
    other = cli("cremad", str(root), "--out", str(tmp_path / "other"), "--val-fraction", "0.25", "--seed", "1",
                module="experiments.prepare")
    assert again.returncode == other.returncode == 0
    assert np.array_equal(np.load(tmp_path / "again" / "val" / "visual.npy"), np.load(tmp_path / "out" / "val" / "visual.npy"))
    assert not np.array_equal(np.load(tmp_path / "other" / "val" / "audio.npy"), np.load(tmp_path / "out" / "val" / "audio.npy"))
    r = cli("--data", str(tmp_path / "out"), "--rollingq", *TINY, "--epochs", "1", "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["final"]["best_val_epoch"]["epoch"] == 1


def test_kinetics_sounds_takes_its_classes_from_the_split_files_and_the_authors_fbank(tmp_path):
    clips = {"train": [(f"c{i}", ["playing drums", "dog barking"][i % 2]) for i in range(4)],
             "test": [("t0", "dog barking"), ("t1", "playing drums")]}
    root = a_set(tmp_path / "KS", "kinetics-sounds", clips)
    assert prepare.prepare("kinetics-sounds", root, tmp_path / "out", val_fraction=0, log=lambda line: None) == \
        {"train": 4, "test": 2}
    d = datasets.load(str(tmp_path / "out"))
    assert d.modalities == {"audio": (512, 256), "visual": (588, 768)} and d.test_y.tolist() == [0, 1]   # sorted names
    audio = np.load(tmp_path / "out" / "test" / "audio.npy")[0, 0]   # (128, 1024): 38 frames of 0.4 s, zeros after
    x, rate = prepare.read_wav(root / "audio" / "t0.wav")
    assert audio.shape == (128, 1024) and np.allclose(audio[:, :38], prepare.kaldi_fbank(x, rate).T, atol=1e-2)
    assert not audio[:, 38:].any()
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["modalities"]["audio"] == {"patch": 16, "mean": [-4.503877], "std": [2 * 5.141276]}


def test_a_missing_frame_folder_or_an_unknown_label_is_one_line(tmp_path):
    clips = {"train": [(f"10{i:02d}", "ANG") for i in range(2)], "test": [("2000", "HAP")]}
    root = a_set(tmp_path / "CREMA-D", "cremad", clips)
    (root / "test.csv").write_text("2000,HAPPY\n")
    assert refused(cli("cremad", str(root), "--out", str(tmp_path / "out"), module="experiments.prepare"),
                   "test.csv: labels HAPPY are none of NEU, HAP, SAD, FEA, DIS, ANG")
    (root / "test.csv").write_text("2001,HAP\n")
    write_wav(root / "AudioWAV" / "2001.wav", np.zeros(800), 16000)
    assert refused(cli("cremad", str(root), "--out", str(tmp_path / "out"), module="experiments.prepare"),
                   "Image-01-FPS/2001: no frames (extract them: ffmpeg -i CLIP -vf fps=1")
