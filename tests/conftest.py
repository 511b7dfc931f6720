"""Shared pieces of the tests of data.py, train.py and the experiments."""

import contextlib
import io
import os
import runpy
import subprocess
import sys
import traceback
import warnings

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


def cli(*args, module=None, process=False):
    """Run train.py (or `python -m module`) as a user would; returns a CompletedProcess. By default
    in this process (no start-up of Python and torch per call): the same entry point run as
    __main__ with these argv; its stdout, stderr and exit status captured; the warnings the
    interpreter's own filters let through written to stderr; a traceback printed as the
    interpreter would. process=True starts a real process, for what only one shows."""
    command = ["-m", module] if module else [os.path.join(ROOT, "train.py")]
    if process:
        return subprocess.run([sys.executable, *command, *args], capture_output=True, text=True, timeout=300, cwd=ROOT)
    out, err, code, argv, cwd = io.StringIO(), io.StringIO(), 0, sys.argv, os.getcwd()
    sys.argv = [command[-1], *args]
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings(record=True) as shown:
            interpreters_warning_filters()
            try:
                if module:                                      # run afresh, as a process would (the test's import kept)
                    imported = sys.modules.pop(module, None)
                    try:
                        runpy.run_module(module, run_name="__main__", alter_sys=True)
                    finally:
                        if imported is not None:
                            sys.modules[module] = imported
                else:
                    runpy.run_path(command[0], run_name="__main__")
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) or e.code is None else 1
                if not isinstance(e.code, (int, type(None))):
                    print(e.code, file=sys.stderr)
            except Exception:
                traceback.print_exc()
                code = 1
            for w in shown:                                     # on stderr, as the interpreter shows them (here: last)
                err.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line))
    finally:
        sys.argv = argv
        os.chdir(cwd)
    return subprocess.CompletedProcess([sys.executable, *command, *args], code or 0, out.getvalue(), err.getvalue())


def interpreters_warning_filters():
    """Python's own filters, as a fresh process has them (pytest's are replaced while a cli() runs)."""
    warnings.resetwarnings()
    warnings.simplefilter("default")
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")


def run_in_process(argv, data):
    """train.run with these flags, quietly; returns the metrics."""
    args = train.parse_args(argv)
    return train.run(args, data, torch.device("cpu"), log=lambda line: None)[1]


def refused(r, message):
    """A refusal: one line on stderr that says `message`, and exit status 2."""
    return r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and message in r.stderr
