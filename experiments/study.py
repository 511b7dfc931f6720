"""The reproduction study: does RollingQ do what the paper says, on this data, with this head?

    python -m experiments.study --out runs/study-noisy                     # AV digits noisy: default, sgd regimes, 10 seeds
    python -m experiments.study --data avdigits --regimes paper,default --seeds 5 --out runs/study-avdigits
    python -m experiments.study --data synthetic --regimes paper --out runs/study-synthetic
    python -m experiments.study --data yours.npz --regimes default --seeds 3 --out runs/mine
    python -m experiments.study --regimes "audio head start" --out runs/study-closest   # docs/premise.md's closest setting

For each training regime, over --seeds seeds: static concat, vanilla attention and RollingQ
(1 roll, 3 rolls, every epoch; the authors' RollingQ, with their roll statistics, and the
paper's sigma > 0; in the study's regimes the control with uniform attention weights,
experiments/control.py; rows_of says which in which regime), plus the unimodal runs that measure
the data's premise. A set in the box is drawn from each seed (synthetic: a new draw; avdigits and
avdigits-noisy: a new pairing of images with recordings); a --data file is the same for every
seed. Every row of a seed shares its data, initialisation and batch order with that seed's
vanilla row, so effects are read as paired differences from vanilla, with their 95 % intervals
and minimum detectable effects. Prints the premise and, per regime, tables of accuracies (clean,
and the favoured modality corrupted at measures.NOISE_LEVELS; clean accuracy is the primary
outcome), the measures of dynamic fusion (measures.study_measures) and the key distribution gap
(measures.EpochMeasures, the mean of the last 5 epochs), all exploratory, the paired differences
and per-seed values; with --out writes study.md, study.json, study.png (with matplotlib) and one
file per run in runs/, so an interrupted study resumes where it stopped.
"""

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

import data as datasets
import train
from experiments import environment, parse, run_file, save_figure
from experiments.control import uniform_attention_model
from experiments.measures import (NOISE_LEVELS, EpochMeasures, GradientShares, UpdateShares, all_of, last_epochs_mean,
                                  study_measures)
from rollingq import MultimodalTransformer, Unimodal

# Each regime and row is a set of argument overrides.
# The paper regime, the closest stand-in for the paper's setting we can build: each encoder first
# trained alone (PRETRAIN for 20 epochs: 15 brought the synthetic set's visual encoder only to 2.7
# points below its unimodal accuracy) stands in for the ImageNet-21k weights; then the authors'
# exact recipe: SGD (momentum 0.9, wd 1e-4), lr 1e-3, warm-up 2.5 epochs + cosine, 30 epochs,
# batch 64, fusion dropout 0.2.
PAPER = {"optimizer": "sgd", "lr": 1e-3, "schedule": "cosine", "dropout": 0.2, "epochs": 30, "batch_size": 64,
         "pretrain_epochs": 20}
# The authors' recipe at lr 0.01 for encoders from scratch (with 1e-3 the built-in set's visual
# encoder does not learn at all).
AUTHORS = {"optimizer": "sgd", "lr": 0.01, "schedule": "cosine", "dropout": 0.2}
# The authors' recipe at lr 0.1: on avdigits-noisy the lr at which vanilla attention leaves the
# token share (seed 0, audio's share of the attention per epoch: lr 0.01 0.48-0.52, 0.03
# 0.45-0.52, 0.1 0.69 after epoch 1 and 0.38 after epoch 3; docs/reproduction.md)
SGD = {**AUTHORS, "lr": 0.1}
REGIMES = {"paper": PAPER,
           "default": {"pretrain_epochs": 0},
           "authors": {**AUTHORS, "pretrain_epochs": 0},
           "sgd": {**SGD, "pretrain_epochs": 0},
           "authors + warm start": {**AUTHORS, "pretrain_epochs": 20},
           # the premise search's closest setting (docs/premise.md, candidate 8): the default regime
           # after the audio encoder alone for 10 epochs (the warm start for that encoder only)
           "audio head start": {"pretrain_epochs": 10, "head_start": "audio"}}
# The regime whose unimodal runs measure a regime's premise: its own, or for a warm-started one
# the same without the warm start; for the paper regime, the default one (AdamW lr 1e-3
# constant: the pretraining recipe, run to its end).
PREMISE = {"paper": "default", "authors + warm start": "authors", "audio head start": "default"}
# roll_stats is named in every row, so a change of train.py's default reruns nothing
ATTENTION = {"fusion": "attention", "roll_stats": "train"}
ROWS = {"concat": {"fusion": "concat", "rollingq": False, "roll_stats": "train"},
        "attention (vanilla)": {**ATTENTION, "rollingq": False},
        "RollingQ, 1 roll": {**ATTENTION, "rollingq": True, "max_rolls": 1},
        "RollingQ, 3 rolls": {**ATTENTION, "rollingq": True, "max_rolls": 3},
        "RollingQ, every epoch": {**ATTENTION, "rollingq": True, "max_rolls": None},
        # the control that separates attention from fusion: the same head, every token weighted 1/T
        "attention, uniform weights (control)": {**ATTENTION, "rollingq": False, "uniform_attention": True}}
CONTROL = "attention, uniform weights (control)"
# the regimes the study on the premise set runs (docs/premise.md, section 3): its --regimes default;
# and the one on the closest setting, which the premise search found in place of a premise set
STUDY_REGIMES = ("default", "sgd")
CLOSEST = "audio head start"
PASS_ROWS = {"RollingQ, 1 roll, pass stats": {**ROWS["RollingQ, 1 roll"], "roll_stats": "pass"},
             "RollingQ, 3 rolls, pass stats": {**ROWS["RollingQ, 3 rolls"], "roll_stats": "pass"}}
# RollingQ as the authors ship it (their post-epoch statistics, sigma 0, one roll) and as the paper
# writes it (its rho, our sigma, > 0: the anchor leans toward the disfavoured modality)
AUTHORS_ROWS = {"RollingQ, 1 roll, pass stats": PASS_ROWS["RollingQ, 1 roll, pass stats"],
                "RollingQ, sigma 1, pass stats": {**PASS_ROWS["RollingQ, 1 roll, pass stats"], "sigma": 1.0},
                "RollingQ, sigma 3, pass stats": {**PASS_ROWS["RollingQ, 1 roll, pass stats"], "sigma": 3.0}}


def rows_of(regime):
    """The rows a regime runs: the paper regime measures the authors' roll statistics at 1 and 3
    rolls; the others the authors' RollingQ and the paper's sigma > 0 (the SGD regimes leave out
    our 1-roll row, which differs from theirs only by where its statistics come from, and so does
    the closest setting's, docs/premise.md). The uniform-attention control runs in the study's
    regimes (STUDY_REGIMES, CLOSEST), not in those whose rows were declared before it
    (docs/reproduction.md)."""
    if regime == "paper":
        rows = {**ROWS, **PASS_ROWS}
    else:
        rows = {**ROWS, **AUTHORS_ROWS}
        if regime in ("authors", "sgd", CLOSEST):
            del rows["RollingQ, 1 roll"]
        rows = {row: rows[row] for row in ("concat", "attention (vanilla)",
                                           *[r for r in rows if r.startswith("RollingQ")], CONTROL)}
    if regime not in (*STUDY_REGIMES, CLOSEST):
        del rows[CONTROL]
    return rows


# The warm start (pretrain_epochs > 0): each encoder alone first, with a recipe of its own that
# trains it (the regime's optimizer, lr and schedule then set the multimodal phase).
PRETRAIN = {"optimizer": "adamw", "lr": 1e-3, "schedule": "constant"}


def warm_start(args, device, modalities=None):
    """train.run's warm_start hook: train each encoder (or those of `modalities`: a head start for
    some) alone with a linear head, with PRETRAIN, for args.pretrain_epochs; its record holds the
    recipe and those encoders' accuracies."""
    recipe = argparse.Namespace(**{**vars(args), **PRETRAIN})

    def hook(model, xs, y, test_xs, test_y):
        result = {"recipe": {**PRETRAIN, "epochs": args.pretrain_epochs, "batch_size": args.batch_size},
                  "train_acc": {}, "test_acc": {}}
        for j, name in enumerate(model.cfg.modalities):
            if modalities is not None and name not in modalities:
                continue
            solo = Unimodal(model.cfg, name, model.encoders[j]).to(device)
            train.train(solo, [xs[j]], y, recipe, args.pretrain_epochs, device, log=lambda line: None)
            result["train_acc"][name] = train.evaluate(solo, [xs[j]], y, [name])["acc"]
            result["test_acc"][name] = train.evaluate(solo, [test_xs[j]], test_y, [name])["acc"]
        return result
    return hook


def study_run(args, overrides, data, device, cache, flags, start=None):
    """One run of the study (`flags`: the names of train.py's own flags); with --out its metrics
    are kept in DIR/runs/<hash of its arguments>.json, so an interrupted study resumes where it
    stopped and identical runs are made once. start(run_args, device): the warm_start hook for
    train.run (default: warm_start, if the run asks for pretraining epochs). Besides the final
    measures, each epoch's key distribution gap (metrics["epochs"][i]["gap"], attention fusion)
    and its last-5-epoch mean (metrics["final"]["gap_last5"]); the encoders' gradient-norm and
    update-norm shares per epoch; overrides {"uniform_attention": True}: the control's model."""
    run_args = argparse.Namespace(**{**{k: v for k, v in vars(args).items() if k in flags},
                                     "load": None, "eval_only": False, "unimodal": None, "pretrain_epochs": 0,
                                     "checkpoint": None, "resume": None, **overrides})
    env = environment(data_file(args.data))
    # the cache key: the flags that make the run (those added since at their defaults left out) and the environment
    key = {**{k: v for k, v in vars(run_args).items() if k not in ("device", "out", "save", "checkpoint", "resume")
              and not (k == "val_fraction" and v == 0)}, "environment": env}
    path = run_file(cache, key)
    if path and path.exists():
        return json.loads(path.read_text()), True
    head = [run_args.head_start] if getattr(run_args, "head_start", None) else None   # a head start: that encoder only
    hook = start(run_args, device) if start else warm_start(run_args, device, head) if run_args.pretrain_epochs else None
    shares, updates = (None, None) if run_args.unimodal else (GradientShares(), UpdateShares())
    gap = EpochMeasures(data, device, run_args.batch_size) if not run_args.unimodal and run_args.fusion == "attention" \
        else None
    hooks = [h for h in (shares, updates, gap) if h is not None]
    build = uniform_attention_model if getattr(run_args, "uniform_attention", False) else MultimodalTransformer
    model, metrics = train.run(run_args, data, device, log=lambda line: None, measures=study_measures,
                               warm_start=hook, on_step=all_of(*hooks) if hooks else None, build=build)
    if shares is not None:
        metrics["final"]["gradient_share"] = shares.per_epoch(data.names)
        metrics["final"]["update_share"] = updates.per_epoch(data.names)
    if gap is not None:
        for record, measured in zip(metrics["epochs"], gap.epochs):
            record["gap"] = {split: measured[split] for split in ("train", "test")}
        metrics["final"]["gap_last5"] = last_epochs_mean(gap.epochs)
    if run_args.unimodal:
        j = data.names.index(run_args.unimodal)
        metrics["correct"] = correct_per_sample(model, [data.test_x[j].to(device)], data.test_y.to(device))
    metrics["environment"] = env
    if path:
        train.write_json(path, metrics, quiet=True)
    return metrics, False


def data_file(name):
    """The file a --data value reads (None for the synthetic set, which is drawn, not read)."""
    return {"avdigits": datasets.AVDIGITS, "avdigits-noisy": datasets.AVDIGITS_NOISY}.get(name, None) \
        if name in datasets.NAMED else name


@torch.no_grad()
def correct_per_sample(model, xs, y, batch_size=512):
    """'0'/'1' per test sample: whether the model gets it right."""
    model.eval()
    batch_size = datasets.rows_per_batch(xs[0], batch_size)
    right = torch.cat([model([x[i:i + batch_size] for x in xs]).logits.argmax(-1) == y[i:i + batch_size]
                       for i in range(0, len(y), batch_size)])
    return "".join("1" if r else "0" for r in right.tolist())


def study(args, device):
    """Every row in every regime of --regimes over --seeds seeds, and the unimodal runs that
    measure the data's premise; prints the premise and the tables per regime, and returns them."""
    cache = Path(args.out) / "runs" if args.out else None
    regimes, first = args.regimes, train.load_data(args, 0)
    current = {0: first}
    plan = [(regime, row, seed, {**REGIMES[regime], **overrides})
            for regime in regimes for row, overrides in rows_of(regime).items() for seed in range(args.seeds)]
    premise_regimes = [r for r in REGIMES if r in map(unimodal_regime, regimes)]
    names = first.names
    plan += [(regime, f"unimodal {m}", seed, {**REGIMES[regime], "unimodal": m})
             for regime in premise_regimes for m in names for seed in range(args.seeds)]
    plan.sort(key=lambda run: run[2])                                 # seed by seed: a stopped study has whole seeds
    results, flags = {}, set(vars(train.parse_args([])))
    t_start, made = time.perf_counter(), 0
    for i, (regime, row, seed, overrides) in enumerate(plan, 1):
        if seed not in current:                                       # a set in the box: drawn from each seed
            current = {seed: train.load_data(args, seed) if args.data in datasets.NAMED else first}
        metrics, cached = study_run(args, {**overrides, "seed": seed}, current[seed], device, cache, flags)
        results.setdefault(regime, {}).setdefault(row, []).append(metrics)
        made += not cached
        left = (time.perf_counter() - t_start) / max(made, 1) * (len(plan) - i) if made else 0
        acc = "  ".join(f"{c} {a:.3f}" for c, a in metrics["final"]["acc"].items())
        print(f"[{i}/{len(plan)}] {regime} | {row} | seed {seed}: {acc}"
              + (" (kept from an earlier run)" if cached else f"  ~{left / 60:.0f} min left"), flush=True)
    report = {"premise": {}, "tables": {}}
    for regime in regimes:
        rows = results[regime]
        favoured = favoured_modality(rows["attention (vanilla)"], names)
        report["premise"][regime] = premise(results[unimodal_regime(regime)], rows, names)
        report["tables"][regime] = study_tables(rows, names, favoured)
    text = study_markdown(args, report)
    print("\n" + text)
    if args.out:
        out = Path(args.out)
        train.write_json(out / "study.json", {"report": report, "runs": results})
        (out / "study.md").write_text(text + "\n")
        print(f"wrote {out / 'study.md'}")
        save_figure(lambda plt: plot_study(plt, {r: results[r] for r in regimes}, names), out / "study.png")
    return results, report


def unimodal_regime(regime):
    return PREMISE.get(regime, regime)


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
        "warm_start_test_acc": {m: mean_std([r["pretrain"]["test_acc"][m] for r in rows["attention (vanilla)"]])
                                for m in rows["attention (vanilla)"][0]["pretrain"]["test_acc"]}   # those warm-started
        if "pretrain" in rows["attention (vanilla)"][0] else None,
    }


def study_tables(rows, names, favoured):
    """Markdown tables, a row per fusion: accuracies and the paper's measures of dynamic fusion
    (mean ± std over seeds), each again as paired differences from vanilla, and the headline
    accuracies seed by seed; `paired` holds the differences as numbers, for the JSON."""
    others = [m for m in names if m != favoured]
    levels = [f"{level:g}" for level in NOISE_LEVELS]

    def attn(f, key, m=favoured):                                     # None where there is none: mean_std prints "-"
        return f[key][m] if key in f else None

    def by_noise(f, kind):
        return f["attention_by_noise"][favoured][kind] if "attention_by_noise" in f else None

    vanilla = [m["final"] for m in rows["attention (vanilla)"]]
    kinds = list(vanilla[0]["converged_probe"][names[0]]) if "converged_probe" in vanilla[0] else []

    def converged(f, m, kind):
        return f["converged_probe"][m][kind]["acc"] if "converged_probe" in f else None

    def share(f, kind, m=favoured):                                   # an encoder's share, its mean over epochs
        return statistics.mean(f[kind][m]) if kind in f else None

    def gap(f, split, key, m=None):                                   # the mean of the last 5 epochs
        return None if "gap_last5" not in f else f["gap_last5"][split][key][m] if m else f["gap_last5"][split][key]

    accuracy = ([("acc clean", lambda f: f["acc"]["clean"])]
                + [("acc low-SNR third", lambda f: f.get("acc_low_snr"))]
                + [(f"{favoured} at {lv}", lambda f, lv=lv: f["acc_by_level"][favoured][lv]) for lv in levels]
                + [(f"{m} at 1", lambda f, m=m: f["acc_by_level"][m]["1"]) for m in others]
                + [(f"probe {m}", lambda f, m=m: f["probe_acc"][m]) for m in names]
                + [(f"converged probe {m} ({kind})", lambda f, m=m, kind=kind: converged(f, m, kind))
                   for m in names for kind in kinds])
    dynamics = ([("r audio attn vs SNR", lambda f: f.get("attention_snr_r")),
                 ("audio attn per 10 dB", lambda f: f.get("attention_snr_slope")),
                 ("audio attn std", lambda f: f.get("attention_spread"))]
                + [(f"r {m}", lambda f, m=m: attn(f, "attention_quality_r", m)) for m in names]
                + [(f"attn {favoured}: informative", lambda f: by_noise(f, "informative")),
                   (f"attn {favoured}: drawn as noise", lambda f: by_noise(f, "noise")),
                   (f"attn {favoured}: clean", lambda f: attn(f["attention"], "clean") if "attention" in f else None),
                   (f"attn {favoured}: replaced", lambda f: attn(f["attention"], f"noise:{favoured}")
                    if "attention" in f else None),
                   ("\\|AIR\\|", lambda f: abs(f["air"]) if "air" in f else None),
                   ("key gap", lambda f: f.get("key_gap"))]
                + [(f"grad share {favoured}", lambda f: share(f, "gradient_share")),
                   (f"update share {favoured}", lambda f: share(f, "update_share"))])
    # the key distribution gap, each measure the mean of the last 5 epochs (exploratory)
    gaps = [(f"{name} ({split})", lambda f, split=split, key=key, m=m: gap(f, split, key, m))
            for split in ("test", "train")
            for name, key, m in [("Fréchet", "frechet", None), ("Fréchet p", "frechet_p", None),
                                 ("Fisher", "fisher", None), ("Fisher p", "fisher_p", None)]
            + [(f"cos(Rq, k) {m}", "cos", m) for m in names] + [("cos overlap", "cos_overlap", None)]]
    # a column no vanilla run has (no per-sample SNR in the data, say) is left out
    accuracy, dynamics, gaps = ([(name, get) for name, get in columns if any(get(f) is not None for f in vanilla)]
                                for columns in (accuracy, dynamics, gaps))

    def table(columns, cell, skip=()):                               # cell(values, vanilla's values of the same seeds)
        lines = ["| fusion | " + " | ".join(name for name, _ in columns) + " |", "|---|" + "---|" * len(columns)]
        for row, runs in rows.items():
            if not row.startswith("unimodal") and row not in skip:
                lines.append(f"| {row} | " + " | ".join(cell([get(m["final"]) for m in runs], [get(f) for f in vanilla])
                                                        for _, get in columns) + " |")
        return "\n".join(lines)

    def as_text(values, base):
        d = paired(values, base)
        return "-" if d is None else f"{d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] {d['same_sign']}/{d['n']}"

    def mde(values, base):
        d = paired(values, base)
        return "-" if d is None else f"{d['mde']:.3f}"

    per_seed = [("acc clean", lambda f: f["acc"]["clean"]), (f"{favoured} at 1", lambda f: f["acc"][f"noise:{favoured}"])]
    numbers = {row: {name: paired([get(m["final"]) for m in runs], [get(f) for f in vanilla])
                     for name, get in accuracy + dynamics + gaps}
               for row, runs in rows.items() if not row.startswith("unimodal") and row != "attention (vanilla)"}
    return {"favoured": favoured, "accuracy": table(accuracy, lambda v, b: mean_std(v)),
            "accuracy_paired": table(accuracy, as_text, skip=("attention (vanilla)",)),
            "dynamics": table(dynamics, lambda v, b: mean_std(v)),
            "dynamics_paired": table(dynamics, as_text, skip=("attention (vanilla)", "concat")),
            "gap": table(gaps, lambda v, b: mean_std(v)),
            "gap_paired": table(gaps, as_text, skip=("attention (vanilla)", "concat")),
            "mde": table(accuracy + dynamics + gaps, mde, skip=("attention (vanilla)",)),
            "per_seed": table(per_seed, lambda v, b: " ".join(f"{x:.3f}" for x in v)), "paired": numbers}


# Student's t quantiles by degrees of freedom 1..30 (beyond: the normal's): 0.975 for a two-sided
# 95 % interval, 0.80 for 80 % power
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
T80 = (1.376, 1.061, 0.978, 0.941, 0.920, 0.906, 0.896, 0.889, 0.883, 0.879, 0.876, 0.873, 0.870, 0.868, 0.866,
       0.865, 0.863, 0.862, 0.861, 0.860, 0.859, 0.858, 0.858, 0.857, 0.856, 0.856, 0.855, 0.855, 0.854, 0.854)


def paired(values, base):
    """The per-seed differences values - base (each seed's row minus its vanilla run): their mean,
    sd, the t-based 95 % confidence interval of the mean, how many seeds share the mean's sign
    (a zero difference shares none), and the minimum detectable effect: the true mean difference
    a two-sided paired t-test at 0.05 finds with 80 % power, (t_0.975 + t_0.80) sd / sqrt(n).
    None where a value is missing."""
    if not values or any(v is None for v in values + base):
        return None
    d = [v - b for v, b in zip(values, base)]
    n, mean = len(d), statistics.mean(d)
    sd = statistics.stdev(d) if n > 1 else 0.0
    t975, t80 = (T975[n - 2], T80[n - 2]) if 2 <= n <= 31 else (1.960, 0.842)
    half = t975 * sd / n ** 0.5 if n > 1 else math.inf
    return {"mean": mean, "sd": sd, "ci": [mean - half, mean + half], "same_sign": sum(x * mean > 0 for x in d),
            "n": n, "mde": (t975 + t80) * sd / n ** 0.5 if n > 1 else math.inf, "differences": d}


def study_markdown(args, report):
    source = f"{args.data}, drawn from each seed" if args.data in datasets.NAMED else args.data
    out = [f"## Study: {source}, {args.fusion_head} head, {plural(args.seeds, 'seed')} (mean ± std over seeds)"]
    for regime, tables in report["tables"].items():
        p = report["premise"][regime]
        settings = {**REGIMES[regime]}
        epochs = settings.get("epochs", args.epochs)
        out += ["", f"### Regime: {regime} {json.dumps(settings)}, {plural(epochs, 'epoch')}", "",
                f"Premise: (a) unimodal acc {per_modality(p['a_unimodal_acc'])}, gap {p['a_gap']}: {yes(p['a_holds'])}; "
                f"(b) epochs to 90 % of final {per_modality(p['b_epochs_to_90pct'])}, faster {p['b_faster']}: "
                f"{yes(p['b_holds'])}; "
                f"(c) {p['b_slower']} probe vanilla {p['c_slower_probe']['attention (vanilla)']} vs concat "
                f"{p['c_slower_probe']['concat']} (gap {p['c_probe_gap']}), attention on {p['b_faster']} when it is "
                f"noise {p['c_attention_on_faster_as_noise']}: {yes(p['c_holds'])}; (d) test samples only one "
                f"modality gets right {per_modality(p['d_only_this_modality_right'])}: {yes(p['d_holds'])}."
                + (f" Warm start: each encoder's test accuracy alone after pretraining "
                   f"{per_modality(p['warm_start_test_acc'])}." if p["warm_start_test_acc"] else ""),
                "", f"Favoured by vanilla attention (AIR): {tables['favoured']}. Level λ: the modality keeps 1 − λ of "
                "its variance as signal, the rest is Gaussian noise of its per-position mean and std (1: replaced). "
                "r: Pearson correlation over test samples between a modality's attention share and its quality u, "
                "each sample's modality corrupted at level 1 − u.", ""]
        note = identical_rows(epochs)
        out += ([note, ""] if note else []) + [
            "Accuracy (mean ± std over seeds; clean accuracy is the primary outcome, every other figure "
            "is exploratory):", "", tables["accuracy"], "",
            "Accuracy, paired: each seed's run minus that seed's vanilla run, mean [95 % confidence interval, "
            "t-based] and the seeds sharing the mean's sign:", "", tables["accuracy_paired"], "",
            "Dynamic fusion (exploratory; mean ± std over seeds):", "", tables["dynamics"], "",
            "Dynamic fusion, paired with vanilla (exploratory):", "", tables["dynamics_paired"], "",
            "Key distribution gap (exploratory), each the mean of the last 5 epochs: the Fréchet distance and the "
            "Fisher ratio between the modalities' fusion keys (512 tokens each), p the share of 200 label shuffles "
            "at least as large; cos(R q, k) per modality and the overlap of its histograms (mean ± std over seeds):",
            "", tables["gap"], "",
            "Key distribution gap, paired with vanilla (exploratory):", "", tables["gap_paired"], "",
            "Minimum detectable effect of each paired difference (two-sided paired t-test at 0.05, 80 % power, "
            "from its sd over these seeds):", "", tables["mde"], "",
            "Per seed (0, 1, ...):", "", tables["per_seed"]]
    return "\n".join(out)


def identical_rows(epochs):
    """The sentence that says which RollingQ rows cannot differ with so few epochs, or None."""
    rolls = epochs - 1                                                # a roll needs an epoch after it
    same = [row for row, o in ROWS.items() if o["rollingq"] and (o["max_rolls"] is None or o["max_rolls"] >= rolls)]
    if len(same) < 2:
        return None
    names = ", ".join(f'"{row}"' for row in same[:-1]) + f' and "{same[-1]}"'
    possible = {0: "no roll is", 1: "at most 1 roll is"}.get(rolls, f"at most {rolls} rolls are")
    return f"With {plural(epochs, 'epoch')} {possible} possible (a roll needs an epoch after it): the rows {names} " \
           f"are identical runs."


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
        for k, row in enumerate(r for r in rows_of(regime) if r != "concat"):
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
    g.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1 for every row (a set in the box: each draws its own)")
    g.add_argument("--regimes", type=regimes_arg, default=",".join(STUDY_REGIMES), metavar="A,B",
                   help=f"comma-separated, from: {', '.join(REGIMES)}")
    args = parse(p, argv, fixed=("rollingq", "fusion", "max_rolls", "seed", "unimodal", "load", "eval_only", "save",
                                 "roll_stats"))
    if args.seeds < 1:
        raise train.UsageError(f"--seeds must be at least 1, got {args.seeds}")
    return args


def main(argv=None):
    args = parse_args(argv)
    study(args, train.get_device(args.device))


if __name__ == "__main__":
    train.cli(main=main)
