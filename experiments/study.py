"""The reproduction study: does RollingQ do what the paper says, on this data, with this head?

    python -m experiments.study --out runs/study                       # built-in data, authors' head
    python -m experiments.study --fusion-head prenorm --out runs/study-prenorm
    python -m experiments.study --data runs/digits.npz --out runs/study-digits   # docs/reproduction.md makes the file

For each training regime, over --seeds seeds: static concat, vanilla attention and RollingQ
(1 roll, 3 rolls, every epoch), plus the unimodal runs that measure the data's premise.
Every other setting comes from the command line (train.py's flags). Prints the premise and
one markdown table per regime; with --out writes study.md, study.json, study.png (with
matplotlib) and one file per run in runs/, so an interrupted study resumes where it stopped.
"""

import argparse
import hashlib
import json
import statistics
import time
from pathlib import Path

import torch

import train
from experiments import parse, save_figure

# Each regime and row is a set of argument overrides. The authors' regime: SGD (momentum 0.9),
# warm-up + cosine, dropout 0.2 in the fusion attention; lr 0.01, not their 1e-3, because our
# encoders start from scratch, not from ImageNet weights (with 1e-3 the visual encoder of the
# built-in set does not learn at all). The warm start stands in for those weights.
AUTHORS = {"optimizer": "sgd", "lr": 0.01, "schedule": "cosine", "dropout": 0.2}
REGIMES = {"default": {"pretrain_epochs": 0},
           "authors": {**AUTHORS, "pretrain_epochs": 0},
           "authors + warm start": {**AUTHORS, "pretrain_epochs": 5}}
ROWS = {"concat": {"fusion": "concat", "rollingq": False},
        "attention (vanilla)": {"fusion": "attention", "rollingq": False},
        "RollingQ, 1 roll": {"fusion": "attention", "rollingq": True, "max_rolls": 1},
        "RollingQ, 3 rolls": {"fusion": "attention", "rollingq": True, "max_rolls": 3},
        "RollingQ, every epoch": {"fusion": "attention", "rollingq": True, "max_rolls": None}}


def study_run(args, overrides, data, device, cache, flags):
    """One run of the study (`flags`: the names of train.py's own flags); with --out its metrics
    are kept in DIR/runs/<hash>.json, so an interrupted study resumes where it stopped and
    identical runs are made once."""
    run_args = argparse.Namespace(**{**{k: v for k, v in vars(args).items() if k in flags},
                                     "load": None, "eval_only": False, "unimodal": None, **overrides})
    key = {k: v for k, v in vars(run_args).items() if k not in ("device", "out", "save")}
    path = cache / (hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16] + ".json") \
        if cache else None
    if path and path.exists():
        return json.loads(path.read_text()), True
    model, metrics = train.run(run_args, data, device, log=lambda line: None)
    if run_args.unimodal:
        j = data.names.index(run_args.unimodal)
        metrics["correct"] = correct_per_sample(model, [data.test_x[j].to(device)], data.test_y.to(device))
    if path:
        train.write_json(path, metrics, quiet=True)
    return metrics, False


@torch.no_grad()
def correct_per_sample(model, xs, y, batch_size=512):
    """'0'/'1' per test sample: whether the model gets it right."""
    model.eval()
    right = torch.cat([model([x[i:i + batch_size] for x in xs]).logits.argmax(-1) == y[i:i + batch_size]
                       for i in range(0, len(y), batch_size)])
    return "".join("1" if r else "0" for r in right.tolist())


def study(args, data, device):
    """Every row in every regime of --regimes over --seeds seeds, and the unimodal runs that
    measure the data's premise; prints the premise and one table per regime, and returns them."""
    cache = Path(args.out) / "runs" if args.out else None
    regimes = args.regimes
    plan = [(regime, row, seed, {**REGIMES[regime], **ROWS[row]})
            for regime in regimes for row in ROWS for seed in range(args.seeds)]
    premise_regimes = [r for r in REGIMES if r in map(unimodal_regime, regimes)]
    plan += [(regime, f"unimodal {m}", seed, {**REGIMES[regime], "unimodal": m})
             for regime in premise_regimes for m in data.names for seed in range(args.seeds)]
    results, flags = {}, set(vars(train.parse_args([])))
    t_start, made = time.perf_counter(), 0
    for i, (regime, row, seed, overrides) in enumerate(plan, 1):
        metrics, cached = study_run(args, {**overrides, "seed": seed}, data, device, cache, flags)
        results.setdefault(regime, {}).setdefault(row, []).append(metrics)
        made += not cached
        left = (time.perf_counter() - t_start) / max(made, 1) * (len(plan) - i) if made else 0
        acc = "  ".join(f"{c} {a:.3f}" for c, a in metrics["final"]["acc"].items())
        print(f"[{i}/{len(plan)}] {regime} | {row} | seed {seed}: {acc}"
              + (" (kept from an earlier run)" if cached else f"  ~{left / 60:.0f} min left"), flush=True)
    report = {"premise": {}, "tables": {}}
    for regime in regimes:
        rows = results[regime]
        favoured = favoured_modality(rows["attention (vanilla)"], data.names)
        report["premise"][regime] = premise(results[unimodal_regime(regime)], rows, data.names)
        report["tables"][regime] = study_table(rows, data.names, favoured)
    text = study_markdown(args, report)
    print("\n" + text)
    if args.out:
        out = Path(args.out)
        train.write_json(out / "study.json", {"report": report, "runs": results})
        (out / "study.md").write_text(text + "\n")
        print(f"wrote {out / 'study.md'}")
        save_figure(lambda plt: plot_study(plt, {r: results[r] for r in regimes}, data.names), out / "study.png")
    return results, report


def unimodal_regime(regime):
    """The regime whose unimodal runs measure `regime`'s premise: the same one without the warm
    start (a warm-started encoder alone is not the modality's unimodal baseline)."""
    bare = {**REGIMES[regime], "pretrain_epochs": 0}
    return next(r for r, overrides in REGIMES.items() if overrides == bare)


def mean_std(values, digits=3):
    if not values or any(v is None for v in values):
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def favoured_modality(vanilla_runs, names):
    """The modality vanilla attention's AIR favours (the sign for M = 2, the leader for M > 2)."""
    if len(names) == 2:
        return names[0] if statistics.mean(m["final"]["air"] for m in vanilla_runs) > 0 else names[1]
    leaders = [m["final"]["air_leader"] for m in vanilla_runs]
    return max(set(leaders), key=leaders.count)


def epochs_to(fraction, epochs):
    """The first epoch whose test accuracy reaches `fraction` of the final one."""
    final = epochs[-1]["test_acc"]
    return next(e["epoch"] for e in epochs if e["test_acc"] >= fraction * final)


def premise(unimodal_rows, rows, names):
    """The properties the paper assumes, measured: (a) comparable information, (b) one modality
    learned faster, (c) the cycle costs the slower one, (d) quality varies per sample."""
    uni = {m: unimodal_rows[f"unimodal {m}"] for m in names}
    acc = {m: [r["final"]["acc"]["clean"] for r in runs] for m, runs in uni.items()}
    speed = {m: [epochs_to(0.9, r["epochs"]) for r in runs] for m, runs in uni.items()}
    fast = min(names, key=lambda m: statistics.mean(speed[m]))
    slow = max(names, key=lambda m: statistics.mean(speed[m]))
    means = {m: statistics.mean(a) for m, a in acc.items()}
    gap = max(means.values()) - min(means.values())
    probe = {fusion: [r["final"]["probe_acc"][slow] for r in rows[fusion]] for fusion in ("attention (vanilla)", "concat")}
    probe_gap = statistics.mean(probe["concat"]) - statistics.mean(probe["attention (vanilla)"])
    stuck = [r["final"]["attention"][f"noise:{fast}"][fast] for r in rows["attention (vanilla)"]]
    only = {}                                                         # test samples only modality m gets right
    for m in names:
        fractions = []
        for seed, run_m in enumerate(uni[m]):
            others = [uni[o][seed]["correct"] for o in names if o != m]
            right = [c == "1" and all(o[i] == "0" for o in others) for i, c in enumerate(run_m["correct"])]
            fractions.append(sum(right) / len(right))
        only[m] = fractions
    return {
        "a_unimodal_acc": {m: mean_std(a) for m, a in acc.items()}, "a_gap": round(gap, 4), "a_holds": gap <= 0.05,
        "b_epochs_to_90pct": {m: mean_std(s, 1) for m, s in speed.items()}, "b_faster": fast, "b_slower": slow,
        "b_holds": statistics.mean(speed[fast]) < statistics.mean(speed[slow]),
        "c_slower_probe": {f: mean_std(p) for f, p in probe.items()}, "c_probe_gap": round(probe_gap, 3),
        "c_attention_on_faster_as_noise": mean_std(stuck),
        "c_holds": probe_gap >= 0.05 and statistics.mean(stuck) >= 0.5,
        "d_only_this_modality_right": {m: mean_std(f) for m, f in only.items()},
        "d_holds": all(statistics.mean(f) >= 0.05 for f in only.values()),
    }


def study_table(rows, names, favoured):
    """One markdown table: a row per fusion, mean ± std over seeds."""
    noise = f"noise:{favoured}"
    header = (["fusion", "acc clean", f"acc {noise}", "\\|AIR\\|", "key gap", f"attn {favoured} (clean)",
               f"attn {favoured} ({noise})", "shift"] + [f"probe {m}" for m in names])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def share(final, condition):                                      # None for concat: mean_std then prints "-"
        return final["attention"][condition][favoured] if "attention" in final else None

    columns = [lambda f: f["acc"]["clean"], lambda f: f["acc"][noise],
               lambda f: abs(f["air"]) if "air" in f else None, lambda f: f.get("key_gap"),
               lambda f: share(f, "clean"), lambda f: share(f, noise),
               lambda f: None if "attention" not in f else share(f, "clean") - share(f, noise)]
    columns += [lambda f, m=m: f["probe_acc"][m] for m in names]
    for name in ROWS:
        cells = [name] + [mean_std([column(m["final"]) for m in rows[name]]) for column in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return {"favoured": favoured, "markdown": "\n".join(lines)}


def study_markdown(args, report):
    source = args.data or "built-in synthetic data"
    out = [f"## Study: {source}, {args.fusion_head} head, {plural(args.seeds, 'seed')}, {plural(args.epochs, 'epoch')} "
           f"(mean ± std over seeds)"]
    rolls = args.epochs - 1                                           # a roll needs an epoch after it
    same = [row for row, o in ROWS.items() if o["rollingq"] and (o["max_rolls"] is None or o["max_rolls"] >= rolls)]
    if len(same) > 1:
        names = ", ".join(f'"{row}"' for row in same[:-1]) + f' and "{same[-1]}"'
        possible = {0: "no roll is", 1: "at most 1 roll is"}.get(rolls, f"at most {rolls} rolls are")
        out += ["", f"With {plural(args.epochs, 'epoch')} {possible} possible (a roll needs an epoch after it): "
                f"the rows {names} are identical runs."]
    for regime, table in report["tables"].items():
        p = report["premise"][regime]
        out += ["", f"### Regime: {regime} {json.dumps(REGIMES[regime])}", "",
                f"Premise: (a) unimodal acc {per_modality(p['a_unimodal_acc'])}, gap {p['a_gap']}: {yes(p['a_holds'])}; "
                f"(b) epochs to 90 % of final {per_modality(p['b_epochs_to_90pct'])}, faster {p['b_faster']}: "
                f"{yes(p['b_holds'])}; "
                f"(c) {p['b_slower']} probe vanilla {p['c_slower_probe']['attention (vanilla)']} vs concat "
                f"{p['c_slower_probe']['concat']} (gap {p['c_probe_gap']}), attention on {p['b_faster']} when it is "
                f"noise {p['c_attention_on_faster_as_noise']}: {yes(p['c_holds'])}; (d) test samples only one "
                f"modality gets right {per_modality(p['d_only_this_modality_right'])}: {yes(p['d_holds'])}.",
                "", f"Favoured by vanilla attention (AIR): {table['favoured']}.", "", table["markdown"]]
    return "\n".join(out)


def plural(n, noun):
    return f"{n} {noun}" + ("" if n == 1 else "s")


def per_modality(values):
    return ", ".join(f"{m} {v}" for m, v in values.items())


def yes(holds):
    return "holds" if holds else "does NOT hold"


def plot_study(plt, results, names):
    """Attention share of the favoured modality per epoch, per regime (mean over seeds)."""
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.8), sharey=True, squeeze=False)
    for ax, (regime, rows) in zip(axes[0], results.items()):
        favoured = favoured_modality(rows["attention (vanilla)"], names)
        for k, row in enumerate(r for r in ROWS if r != "concat"):
            epochs = [e["epoch"] for e in rows[row][0]["epochs"]]
            share = [statistics.mean(m["epochs"][i]["attention"][favoured] for m in rows[row])
                     for i in range(len(epochs))]
            ax.plot(epochs, share, color=f"C{k}", label=row)
        ax.axhline(1 / len(names), color="grey", lw=0.8)
        ax.set(xlabel="epoch", title=regime, ylim=(0, 1))
    axes[0][0].set_ylabel("test attention share of the favoured modality")
    axes[0][0].legend(fontsize=8)
    return fig


def regimes_arg(text):
    names = [r.strip() for r in text.split(",")]
    unknown = [r for r in names if r not in REGIMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown regime {unknown[0] if unknown else text!r}; "
                                         f"choose from {', '.join(REGIMES)}")
    return names


def parse_args(argv=None):
    p = train.build_parser(__doc__.split("\n")[0] + " The regimes' settings replace the command line's; "
                           "the default regime takes the command line's.",
                           out="write DIR/study.md, study.json, study.png (with matplotlib) and one file per run in "
                               "DIR/runs/ (a study started again resumes from them; delete them after changing the "
                               "code or the data)", prog="python -m experiments.study")
    g = p.add_argument_group("study")
    g.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 for every row")
    g.add_argument("--regimes", type=regimes_arg, default="default,authors", metavar="A,B",
                   help=f"comma-separated, from: {', '.join(REGIMES)}")
    args = parse(p, argv, fixed=("rollingq", "fusion", "max_rolls", "seed", "unimodal", "load", "eval_only", "save",
                                 "pretrain_epochs"))
    if args.seeds < 1:
        raise train.UsageError(f"--seeds must be at least 1, got {args.seeds}")
    return args


def main(argv=None):
    args = parse_args(argv)
    study(args, train.load_data(args), train.get_device(args.device))


if __name__ == "__main__":
    train.cli(main=main)
