"""Shared pieces of the tests of data.py, train.py and the experiments."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)                                        # import data, train, rollingq, experiments

import data as datasets  # noqa: E402
import train  # noqa: E402

TINY = ["--epochs", "2", "--width", "16", "--layers", "1", "--batch-size", "32"]


def small_npz(path, **change):
    """A valid two-modality .npz (audio as tokens, visual as vectors), with `change` applied:
    a value replaces that array, None removes it."""
    g = np.random.default_rng(0)
    arrays = {"train_y": g.integers(0, 3, 40), "test_y": g.integers(0, 3, 20),
              "train_audio": g.standard_normal((40, 4, 5)).astype(np.float32),
              "test_audio": g.standard_normal((20, 4, 5)).astype(np.float32),
              "train_visual": g.standard_normal((40, 6)), "test_visual": g.standard_normal((20, 6))}
    for key, value in change.items():
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory):
    """A small built-in-style set on disk, the visual modality given as (N, D) vectors."""
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    d = datasets.synthetic(seed=0, n_train=256, n_test=128, n_classes=4, modalities=(
        datasets.Modality("audio", 4, 6, 1.0, 0.2), datasets.Modality("visual", 3, 5, 0.5, 0.2)))
    datasets.save_npz(d, path, vectors=("visual",))
    return str(path)


def cli(*args, module=None):
    """Run train.py (or `python -m module`) as a user would; returns the CompletedProcess."""
    command = ["-m", module] if module else [os.path.join(ROOT, "train.py")]
    return subprocess.run([sys.executable, *command, *args], capture_output=True, text=True, timeout=300, cwd=ROOT)


def run_in_process(argv, data):
    """train.run with these flags, quietly; returns the metrics."""
    args = train.parse_args(argv)
    return train.run(args, data, torch.device("cpu"), log=lambda line: None)[1]


def refused(r, message):
    """A refusal: one line on stderr that says `message`, and exit status 2."""
    return r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and message in r.stderr
