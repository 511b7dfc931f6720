"""Anatomy of a roll: what pulls the query back after RollingQ rotates it?

    python -m experiments.anatomy --max-rolls 3 --epochs 8 --out runs/anatomy
    python -m experiments.anatomy --max-rolls 3 --epochs 8 --fusion-head prenorm --out runs/anatomy-prenorm

One RollingQ run (the roll settings of the command line), traced from its own training batches
(no extra pass) at every step of each epoch's first 10 and every 5 steps after: the batch's
AIR (the paper's: the mean of per-sample cosine differences), the AIR of the batch-mean query
and keys, whose change since the last roll splits exactly into a query part (the query moved,
the keys held as they were at the roll) and a key part (the keys moved), and each modality's
CLS attention share. Prints a summary per roll; with --out writes anatomy.json and anatomy.png
(with matplotlib).
"""

import math
from pathlib import Path

import train
from experiments import parse, save_figure
from rollingq import attention_imbalance_rate, modality_cosines


def anatomy(args, data, device, every=5):
    """Trace one RollingQ run; returns (trace, summary per roll)."""
    steps_per_epoch = math.ceil(len(data.train_y) / args.batch_size)
    trace, ref = [], {}

    def air_of(q, K):                                                 # AIR of mean vectors, mean over heads
        return float(attention_imbalance_rate(modality_cosines(q, K)).mean())

    def on_step(model, epoch, step, out):
        rolls = int(model.fusion.rotation.rolls)
        # every step of an epoch's first 10 (how fast a roll is undone), then every `every` steps,
        # and the last step of each epoch (the batch a roll uses)
        if step > 10 and step % every and step != steps_per_epoch and ref.get("rolls") == rolls:
            return
        q, K = out.query.float(), out.key_means.float()                   # (B, nh, hs), (B, nh, M, hs)
        q_bar, K_bar = q.mean(0), K.mean(0)                               # (nh, hs), (nh, M, hs)
        if ref.get("rolls") != rolls:
            ref.update(rolls=rolls, q=q_bar, K=K_bar)
        mass = out.attention.float()                                      # (B, nh, M)
        share = (mass / mass.sum(-1, keepdim=True)).mean((0, 1))          # (M,)
        trace.append({"epoch": epoch - 1 + step / steps_per_epoch, "rolls": rolls,
                      "air": float(attention_imbalance_rate(modality_cosines(q, K).mean(0)).mean()),
                      "air_of_means": air_of(q_bar, K_bar),
                      # air_of_means - its value at the roll = query_part + key_part
                      "query_part": air_of(q_bar, ref["K"]) - air_of(ref["q"], ref["K"]),
                      "key_part": air_of(q_bar, K_bar) - air_of(q_bar, ref["K"]),
                      "attention": dict(zip(data.names, share.tolist()))})

    _, metrics = train.run(args, data, device, on_step=on_step)
    summary = roll_summary(trace, steps_per_epoch)
    for s in summary:
        back = ("never" if s["steps_back"] is None else f"after {s['steps_back']} optimiser steps")
        print(f"roll {s['roll']} after epoch {s['after_epoch']}: batch AIR {s['air_before']:+.3f} -> "
              f"{s['air_after']:+.3f}, one epoch later {s['air_one_epoch_later']:+.3f}, back on its side at half "
              f"its value before the roll {back}; AIR of the mean vectors {s['means_change']:+.3f} in that epoch: "
              f"query part {s['query_part']:+.3f}, key part {s['key_part']:+.3f}")
    if args.out:
        train.write_json(Path(args.out) / "anatomy.json", {"summary": summary, "trace": trace, "metrics": metrics})
        save_figure(lambda plt: plot_anatomy(plt, trace, data.names, args.fusion_head), Path(args.out) / "anatomy.png")
    return trace, summary


def roll_summary(trace, steps_per_epoch):
    """Per roll: the batch AIR before and right after, one epoch later, and the optimiser steps
    until it is back on its side of 0 at half its value before the roll or more (a roll that
    overshoots to the other side has not been undone); and how the AIR of the mean vectors
    changed over the epoch after the roll, split into its query and key parts."""
    summary = []
    for i, t in enumerate(trace):
        if i == 0 or t["rolls"] == trace[i - 1]["rolls"]:
            continue
        before = trace[i - 1]["air"]
        later = [u for u in trace[i:] if u["rolls"] == t["rolls"]]
        one = min(later, key=lambda u: abs(u["epoch"] - (t["epoch"] + 1)))
        back = next((u["epoch"] - t["epoch"] for u in later if u["air"] * math.copysign(1, before) >= abs(before) / 2),
                    None)
        # t is the first batch after the roll, seen before any update: epochs since t x steps = updates
        summary.append({"roll": t["rolls"], "after_epoch": math.floor(t["epoch"]), "air_before": before,
                        "air_after": t["air"], "air_one_epoch_later": one["air"],
                        "means_change": one["air_of_means"] - t["air_of_means"], "query_part": one["query_part"],
                        "key_part": one["key_part"],
                        "steps_back": None if back is None else round(back * steps_per_epoch)})
    return summary


def plot_anatomy(plt, trace, names, head):
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    x = [t["epoch"] for t in trace]
    ax1.plot(x, [t["air"] for t in trace], color="k", lw=1, label="AIR of the batch")
    ax1.plot(x, [t["air_of_means"] for t in trace], color="grey", lw=1, label="AIR of the batch-mean query and keys")
    ax1.plot(x, [t["query_part"] for t in trace], color="C0", lw=1, ls="--", label="its change since the roll: query part")
    ax1.plot(x, [t["key_part"] for t in trace], color="C3", lw=1, ls="--", label="its change since the roll: key part")
    for i in range(1, len(trace)):
        if trace[i]["rolls"] != trace[i - 1]["rolls"]:
            for ax in (ax1, ax2):
                ax.axvline(math.floor(trace[i]["epoch"]), color="grey", lw=0.6)   # at the end of that epoch
    ax1.axhline(0, color="grey", lw=0.8)
    ax1.set(ylabel="AIR", title=f"Anatomy of a roll, {head} head (grey lines: rolls)")
    ax1.legend(fontsize=8)
    for k, m in enumerate(names):
        ax2.plot(x, [t["attention"][m] for t in trace], color=f"C{k}", label=m)
    ax2.set(xlabel="epoch", ylabel="CLS attention share", ylim=(0, 1))
    ax2.legend(fontsize=8)
    return fig


def parse_args(argv=None):
    p = train.build_parser(__doc__.split("\n")[0], out="write DIR/anatomy.json and DIR/anatomy.png (with matplotlib)",
                           prog="python -m experiments.anatomy")
    args = parse(p, argv, fixed=("rollingq", "fusion", "unimodal", "load", "eval_only", "save"))
    args.rollingq = True
    return args


def main(argv=None):
    args = parse_args(argv)
    anatomy(args, train.load_data(args), train.get_device(args.device))


if __name__ == "__main__":
    train.cli(main=main)
