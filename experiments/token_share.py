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
modalities' probes. With --out each run is kept in DIR/runs/, so a stopped sweep resumes.
"""

from pathlib import Path

import torch

import train
from experiments import parse, study

VARIANTS = {"paper regime": {}, "steps": {"epochs": 100}, "lr": {"lr": 1e-2}, "width": {"width": 256},
            "cls": {"cls_std": 1.0}, "fresh": {"pretrain_epochs": 0}, "adamw": {"optimizer": "adamw"}}


def variant_run(args, name, seed, data, device, cache, flags):
    """Vanilla attention in the paper regime with VARIANTS[name], from `seed` (study.study_run: kept
    in `cache` under a hash of every argument)."""
    overrides = {**study.PAPER, **study.ROWS["attention (vanilla)"], "seed": seed, **VARIANTS[name]}
    return study.study_run(args, overrides, data, device, cache, flags, start=start)[0]


def start(run_args, device):
    """The warm start (if any), then the fusion CLS token drawn at run_args.cls_std (if set)."""
    warm = study.warm_start(run_args, device) if run_args.pretrain_epochs else None
    cls_std = getattr(run_args, "cls_std", None)
    if warm is None and cls_std is None:
        return None

    def hook(model, *batches):
        record = warm(model, *batches) if warm else None
        if cls_std is not None:
            with torch.no_grad():
                model.cls.normal_(0, cls_std)
        return record
    return hook


def summary(runs, first, others):
    """One markdown row of means ± std over seeds; `first`: the modality the paper regime favours."""
    cells = {f"attn {first} clean": [m["final"]["attention"]["clean"][first] for m in runs],
             f"attn {first} replaced": [m["final"]["attention"][f"noise:{first}"][first] for m in runs],
             "AIR": [m["final"]["air"] for m in runs],
             f"r {first}": [m["final"]["attention_quality_r"][first] for m in runs],
             "acc clean": [m["final"]["acc"]["clean"] for m in runs],
             f"acc {first} replaced": [m["final"]["acc"][f"noise:{first}"] for m in runs],
             **{f"probe {m}": [r["final"]["probe_acc"][m] for r in runs] for m in others}}
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
    flags = set(vars(train.parse_args([])))
    rows = {}
    for seed in range(args.seeds):
        data = train.load_data(args, seed)
        for name in VARIANTS:
            m = variant_run(args, name, seed, data, device, cache, flags)
            rows.setdefault(name, []).append(m)
            print(f"{name} | seed {seed}: acc {m['final']['acc']['clean']:.3f}, attention "
                  f"{' '.join(f'{a:.3f}' for a in m['final']['attention']['clean'].values())}, air {m['final']['air']:+.3f}",
                  flush=True)
    first = study.favoured_modality(rows["paper regime"], data.names)
    table = {name: summary(runs, first, [m for m in data.names if m != first]) for name, runs in rows.items()}
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
