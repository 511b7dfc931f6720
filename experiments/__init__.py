"""Experiments around the reference: each module runs with `python -m experiments.NAME`.

    study        the reproduction study: concat, vanilla attention and RollingQ, over seeds and regimes
    token_share  what makes the fusion attention leave the token share: one change at a time
    anatomy      one RollingQ run traced step by step around each roll
    premise      the premise gates on vanilla, concat and unimodal runs, over candidate sets (docs/premise.md)
    bench        training samples/s with and without RollingQ, side by side
    avdigits     builds datasets/avdigits.npz from the raw sources (FSDD, MNIST)

measures holds the paper's measures of dynamic fusion and the study's own, which the study adds
to every run; control the study's control, attention fusion with fixed uniform weights.

They import train (and through it rollingq and data), never the other way round, and write
what they make (JSON, markdown, figures) under --out.
"""

import argparse
import hashlib
import json
import os
import subprocess
from pathlib import Path

import torch

import train
from rollingq import check_settings


def parse(parser, argv=None, fixed=()):
    """Parse train.py's flags and the experiment's own. `fixed`: train.py flags the experiment
    sets itself, left out of --help and refused if given; --checkpoint and --resume always (an
    experiment of many runs resumes its own way: the study from its run files)."""
    own = {a.dest: a for a in parser._actions if a.dest in (*fixed, "checkpoint", "resume")}
    for action in own.values():
        action.help = argparse.SUPPRESS
    args = train.parse_args(argv, parser)
    for dest, action in own.items():
        if getattr(args, dest) != action.default:
            raise train.UsageError(f"{action.option_strings[0]}: {parser.prog} sets it itself")
    train.checked(check_settings, args.beta, args.sigma, args.max_rolls)   # refused now, not at its first roll
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise train.UsageError("the experiments run in one process; start them with python, not torchrun")
    return args


def save_figure(make, path):
    """Draw a figure with make(plt) and save it to path, if matplotlib is installed (an optional extra)."""
    try:
        import matplotlib
    except ImportError:
        print(f"no figure {path}: matplotlib is not installed (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = make(plt)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def run_file(folder, key):
    """Where a run made with `key` (a JSON-able dict) is kept: folder/<its sha1>.json; None without a folder."""
    return Path(folder) / (hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16] + ".json") \
        if folder else None


CODE = ("rollingq.py", "train.py", "data.py", "experiments")          # what a run executes


def environment(data_path=None):
    """What a run's numbers depend on beyond its arguments: the last commit of the code it runs
    (CODE; "+changes" when that code differs from it), the data file's sha256, the torch version
    and the thread count. Numbers are deterministic per machine and thread count, not across them."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "log", "-1", "--format=%H", "--", *CODE], cwd=root, capture_output=True,
                                text=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *CODE], cwd=root,
                                 capture_output=True, text=True).stdout.strip()
    except OSError:                                                   # no git: the numbers still run
        commit, changed = "", ""
    return {"commit": (commit or "unknown") + ("+changes" if changed else ""), "data_sha256": data_digest(data_path),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def data_digest(path):
    """sha256 of a data file; of a data folder (larger than memory, maybe): its files' names and
    sizes and each file's first MiB, in name order. None for no file."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_dir():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path)} {f.stat().st_size}\n".encode())
        with open(f, "rb") as stream:
            h.update(stream.read(1 << 20))
    return h.hexdigest()
