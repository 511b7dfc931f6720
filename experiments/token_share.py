"""What makes the fusion attention leave the token share in the paper regime? One change at a time.

    python -m experiments.token_share --data avdigits --seeds 3 --out runs/token-share

Vanilla attention fusion in the study's paper regime (each encoder trained alone first, then
the authors' recipe: SGD lr 1e-3, warm-up and cosine, 30 epochs), and the same with one of the
issue's candidates changed, everything else held:
  steps   100 epochs instead of 30 (3.3x the optimiser steps)
  lr      lr 1e-2 instead of 1e-3
  width   width 256 instead of 64 (the CLS query's norm grows as sqrt(width) at a fixed init std)
  cls     the fusion CLS token drawn at std 1 instead of 0.02 (the init's scale)
  fresh   no warm start: the encoders learn with the fusion from scratch
  adamw   AdamW (weight decay 0.01) instead of SGD, the same lr 1e-3 and schedule
Per variant, over seeds (each its own data draw): the favoured modality's attention share (clean
and with it replaced by noise), AIR, the attention-quality r, the clean accuracy and the other
modality's probe. With --out each run is kept in DIR/runs/, so a stopped sweep resumes.
"""

import argparse
import json
import statistics
from pathlib import Path

import torch

import train
from experiments import parse, study
from experiments.measures import paper_measures

VARIANTS = {"paper regime": {}, "steps": {"epochs": 100}, "lr": {"lr": 1e-2}, "width": {"width": 256},
            "cls": {"cls_std": 1.0}, "fresh": {"pretrain_epochs": 0}, "adamw": {"optimizer": "adamw"}}


def variant_run(args, name, seed, data, device, cache):
    """Vanilla attention in the paper regime with VARIANTS[name], from `seed`; kept in `cache`."""
    path = cache / f"{name.replace(' ', '-')}-{seed}.json" if cache else None
    if path and path.exists():
        return json.loads(path.read_text())
    overrides = {**study.PAPER, **study.ROWS["attention (vanilla)"], "seed": seed, **VARIANTS[name]}
    run_args = argparse.Namespace(**{**vars(args), "load": None, "eval_only": False, "unimodal": None,
                                     **overrides})
    warm = study.warm_start(run_args, device) if run_args.pretrain_epochs else None

    def start(model, *batches):                                      # the warm start, then the CLS token's init
        record = warm(model, *batches) if warm else None
        if "cls_std" in overrides:
            with torch.no_grad():
                model.cls.normal_(0, overrides["cls_std"])
        return record
    _, metrics = train.run(run_args, data, device, log=lambda line: None, measures=paper_measures,
                           warm_start=start if warm or "cls_std" in overrides else None)
    if path:
        train.write_json(path, metrics, quiet=True)
    return metrics


def summary(runs, first, other):
    """One markdown row of means ± std over seeds; `first`: the modality the paper regime favours."""
    cells = {f"attn {first} clean": [m["final"]["attention"]["clean"][first] for m in runs],
             f"attn {first} replaced": [m["final"]["attention"][f"noise:{first}"][first] for m in runs],
             "AIR": [m["final"]["air"] for m in runs],
             f"r {first}": [m["final"]["attention_quality_r"][first] for m in runs],
             "acc clean": [m["final"]["acc"]["clean"] for m in runs],
             f"acc {first} replaced": [m["final"]["acc"][f"noise:{first}"] for m in runs],
             f"probe {other}": [m["final"]["probe_acc"][other] for m in runs]}
    return {k: study.mean_std(v) for k, v in cells.items()}


def main(argv=None):
    p = train.build_parser(__doc__.split("\n")[0], prog="python -m experiments.token_share",
                           out="write DIR/token_share.md and one file per run in DIR/runs/ (a sweep resumes from them)")
    p.add_argument_group("sweep").add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 for every variant")
    args = parse(p, argv, fixed=("rollingq", "fusion", "max_rolls", "seed", "unimodal", "load", "eval_only", "save",
                                 "roll_stats", "epochs", "lr", "width", "optimizer", "schedule", "dropout"))
    if args.seeds < 1:
        raise train.UsageError(f"--seeds must be at least 1, got {args.seeds}")
    device, cache = train.get_device(args.device), Path(args.out) / "runs" if args.out else None
    rows = {}
    for seed in range(args.seeds):
        data = train.load_data(args, seed)
        for name in VARIANTS:
            m = variant_run(args, name, seed, data, device, cache)
            rows.setdefault(name, []).append(m)
            print(f"{name} | seed {seed}: acc {m['final']['acc']['clean']:.3f}, attention "
                  f"{' '.join(f'{a:.3f}' for a in m['final']['attention']['clean'].values())}, air {m['final']['air']:+.3f}",
                  flush=True)
    names = data.names                                               # favoured: by the paper regime's AIR
    first = names[0] if statistics.mean(m["final"]["air"] for m in rows["paper regime"]) > 0 else names[1]
    table = {name: summary(runs, first, names[1 - names.index(first)]) for name, runs in rows.items()}
    columns = list(next(iter(table.values())))
    text = "\n".join([f"Vanilla attention, paper regime, one change at a time; {args.data}, {args.seeds} seeds "
                      "(mean ± std):", "", "| variant | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
                     + [f"| {name} | " + " | ".join(row.values()) + " |" for name, row in table.items()])
    print("\n" + text)
    if args.out:
        (Path(args.out) / "token_share.md").write_text(text + "\n")
        train.write_json(Path(args.out) / "token_share.json", {"table": table, "runs": rows})


if __name__ == "__main__":
    train.cli(main=main)
