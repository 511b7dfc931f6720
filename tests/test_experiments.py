"""Specification of experiments/: the study, the anatomy of a roll and the benchmark."""

import functools
import json
import math
import os
import re
import statistics
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, cli, refused

import data as datasets
import experiments
import train
from experiments import anatomy, bench, measures, study


def quick_probes(monkeypatch):
    """The converged probes (tested on their own below) as a constant: what a study's bookkeeping is tested with."""
    monkeypatch.setattr(measures, "fit_probe", lambda *args, **kwargs: {"acc": 0.5, "grad_norm": 0.0})


def test_study_resumes_from_its_run_files_and_reports_premise_and_tables(tiny_npz, tmp_path, capsys, monkeypatch):
    quick_probes(monkeypatch)
    monkeypatch.setitem(study.REGIMES, "paper", {**study.PAPER, "epochs": 2, "pretrain_epochs": 1, "batch_size": 32})
    args = study.parse_args(["--data", tiny_npz, "--seeds", "2", *TINY, "--epochs", "1", "--out", str(tmp_path),
                             "--regimes", "paper,authors"])
    results, report = study.study(args, torch.device("cpu"))
    n_runs = len(list((tmp_path / "runs").glob("*.json")))
    again, report_again = study.study(args, torch.device("cpu"))
    out = capsys.readouterr().out
    rows = 7 * 2 + 7 * 2 + 2 * 2 * 2                            # paper, authors: rows x seeds; unimodal: default, authors
    assert n_runs == rows and out.count("(kept from an earlier run)") == rows
    assert report_again == report
    for regime, tables in report["tables"].items():
        lines = tables["accuracy"].splitlines()
        assert len(lines) == 2 + 7 and lines[2].startswith("| concat |")
        assert lines[3].startswith("| attention (vanilla)") and " ± " in lines[-1]
        assert tables["favoured"] in ("audio", "visual") and f"{tables['favoured']} at 0.25" in lines[0]
        assert "| r audio | r visual |" in tables["dynamics"] and len(tables["per_seed"].splitlines()[2].split()) > 5
        paired = tables["accuracy_paired"].splitlines()             # every row but vanilla, minus vanilla's seeds
        assert len(paired) == len(lines) - 1 and "| attention (vanilla)" not in tables["accuracy_paired"]
        assert re.search(r"\| [+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\] [0-2]/2 \|", paired[2])
        assert "grad share" in tables["dynamics"] and "converged probe visual (cls)" in lines[0]
        concat = tables["paired"]["concat"]["acc clean"]
        vanilla, mine = (results[regime][row] for row in ("attention (vanilla)", "concat"))
        assert concat["differences"] == [c["final"]["acc"]["clean"] - v["final"]["acc"]["clean"]
                                         for c, v in zip(mine, vanilla)] and concat["n"] == 2
        premise = report["premise"][regime]
        assert set(premise["a_unimodal_acc"]) == {"audio", "visual"} and isinstance(premise["d_holds"], bool)
    assert set(report["premise"]["paper"]["warm_start_test_acc"]) == {"audio", "visual"}
    assert report["premise"]["authors"]["warm_start_test_acc"] is None
    text = (tmp_path / "study.md").read_text()
    assert text.count("### Regime:") == 2 and "authors head" in text and "Premise: (a) unimodal acc" in text
    assert text.index("### Regime: paper") < text.index("### Regime: authors")
    passes = [r["config"] for r in results["paper"]["RollingQ, 3 rolls, pass stats"]]
    assert all(c["roll_stats"] == "pass" and c["optimizer"] == "sgd" and c["lr"] == 1e-3 for c in passes)
    configs = [r["config"] for r in results["authors"]["RollingQ, every epoch"]]
    assert [c["seed"] for c in configs] == [0, 1] and all(c["optimizer"] == "sgd" and c["max_rolls"] is None for c in configs)


def test_paired_differences_give_a_t_interval_and_the_minimum_detectable_effect():
    d = study.paired([1.0, 2.0, 4.0, 3.0, 5.0], [0.0] * 5)     # mean 3, sd sqrt(2.5), n 5: t_0.975(4) = 2.776
    se = 2.5 ** 0.5 / 5 ** 0.5
    assert d["mean"] == 3.0 and d["ci"] == pytest.approx([3 - 2.776 * se, 3 + 2.776 * se])
    assert d["mde"] == pytest.approx((2.776 + 0.941) * se) and d["same_sign"] == 5


def student_t_cdf(t, df):
    """P(T <= t) for Student's t with df degrees of freedom, t >= 0: 1/2 plus Simpson's rule over its density."""
    x = np.linspace(0, t, 4001)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    density = np.exp(log_c - (df + 1) / 2 * np.log1p(x ** 2 / df))
    return 0.5 + (x[1] - x[0]) / 3 * (density[0] + 4 * density[1:-1:2].sum() + 2 * density[2:-1:2].sum() + density[-1])


def normal_cdf(t):
    return 0.5 * (1 + math.erf(t / 2 ** 0.5))


def rounds_quantile(q, p, cdf):
    """Whether q is the p-quantile of the distribution with this cdf, rounded to three decimals."""
    return cdf(q - 5e-4) < p < cdf(q + 5e-4)


def test_the_t_tables_hold_students_quantiles_rounded_to_three_decimals():
    assert study.T975[10 - 2] == 2.262 and study.T975[5 - 2] == 2.776 and study.T975[0] == 12.706   # n: df n - 1
    assert study.T80[10 - 2] == 0.883 and study.T80[5 - 2] == 0.941 and study.T80[0] == 1.376
    for df in range(1, 31):
        cdf = functools.partial(student_t_cdf, df=df)
        assert rounds_quantile(study.T975[df - 1], 0.975, cdf) and rounds_quantile(study.T80[df - 1], 0.80, cdf)


@pytest.mark.parametrize("n", [2, 5, 10, 31, 32, 100])
def test_paired_uses_the_t_quantiles_of_n_minus_1_degrees_of_freedom_and_the_normals_beyond_30(n):
    cdf = functools.partial(student_t_cdf, df=n - 1) if n <= 31 else normal_cdf
    d = study.paired([float(i % 3) for i in range(n)], [0.0] * n)
    se = d["sd"] / n ** 0.5
    t975 = (d["ci"][1] - d["mean"]) / se                        # the quantiles paired used, read off its outputs
    t80 = d["mde"] / se - t975
    assert rounds_quantile(t975, 0.975, cdf) and rounds_quantile(t80, 0.80, cdf)


def test_paired_counts_the_seeds_sharing_the_means_sign_and_a_zero_difference_shares_none():
    assert study.paired([1.0, 0.0, 2.0, -1.0], [0.0] * 4)["same_sign"] == 2    # mean +0.5: 1 and 2
    assert study.paired([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])["same_sign"] == 0   # mean 0: no seed shares it


def test_a_set_in_the_box_is_drawn_from_each_seed():
    args = study.parse_args([])
    assert args.regimes == ["default", "sgd"] and args.seeds == 10 and args.data == "avdigits-noisy"
    a, b = train.load_data(args, 0), train.load_data(args, 1)                       # the images re-paired
    assert not torch.equal(a.train_x[1], b.train_x[1]) and torch.equal(a.train_x[1], train.load_data(args).train_x[1])
    args = study.parse_args(["--data", "synthetic"])
    a, b = train.load_data(args, 0), train.load_data(args, 1)                       # a new draw
    assert not torch.equal(a.train_x[0], b.train_x[0]) and torch.equal(a.train_x[0], train.load_data(args).train_x[0])


def test_the_study_header_counts_in_words_and_says_once_which_rows_cannot_differ():
    def markdown(seeds):
        return study.study_markdown(study.parse_args(["--seeds", str(seeds)]), {"tables": {}})
    assert markdown(1).startswith("## Study: avdigits-noisy, drawn from each seed, authors head, 1 seed")
    assert "3 seeds" in markdown(3)
    assert study.identical_rows(2) == ("With 2 epochs at most 1 roll is possible (a roll needs an epoch after it): "
                                       'the rows "RollingQ, 1 roll", "RollingQ, 3 rolls" and "RollingQ, every epoch" '
                                       "are identical runs.")
    assert study.identical_rows(3) == ("With 3 epochs at most 2 rolls are possible (a roll needs an epoch after it): "
                                       'the rows "RollingQ, 3 rolls" and "RollingQ, every epoch" are identical runs.')
    assert study.identical_rows(5) is None
    r = cli("--help", module="experiments.study")
    assert r.returncode == 0 and "(default: default,sgd)" in " ".join(r.stdout.split())


def test_a_warm_start_regime_takes_its_premise_from_the_same_regime_without_it():
    assert study.unimodal_regime("authors + warm start") == "authors"
    assert study.unimodal_regime("paper") == "default"          # the pretraining recipe, run to its end
    assert study.unimodal_regime("default") == "default"


def test_experiments_refuse_the_flags_they_set_themselves_and_bad_roll_settings_at_once():
    r = cli("--rollingq", module="experiments.study")
    assert refused(r, "--rollingq: python -m experiments.study sets it itself")
    assert refused(cli("--resume", "run.pt", module="experiments.study"), "--resume: python -m experiments.study sets it")
    r = cli("--regimes", "default,nosuch", module="experiments.study")
    assert refused(r, "unknown regime 'nosuch'")
    assert refused(cli("--beta", "-1", module="experiments.bench"), "finite beta >= 0")
    r = cli("--help", module="experiments.bench")
    assert r.returncode == 0 and "--rounds" in r.stdout and "--rollingq" not in r.stdout


def test_anatomy_traces_air_and_splits_its_change_into_query_and_key_parts(tiny_npz, capsys):
    args = anatomy.parse_args(["--data", tiny_npz, "--max-rolls", "none", *TINY, "--epochs", "3"])
    trace, summary = anatomy.anatomy(args, datasets.load_npz(tiny_npz), torch.device("cpu"), every=2)
    assert [s["roll"] for s in summary] == [1, 2] and "roll 1 after epoch 1" in capsys.readouterr().out
    firsts = [t for i, t in enumerate(trace) if i == 0 or t["rolls"] != trace[i - 1]["rolls"]]
    assert all(t["query_part"] == 0 and t["key_part"] == 0 for t in firsts)   # measured from the roll
    assert all(abs(sum(t["attention"].values()) - 1) < 1e-5 for t in trace)
    assert [t["epoch"] for t in trace] == sorted(t["epoch"] for t in trace) and trace[-1]["epoch"] == 3


def test_a_roll_that_overshoots_is_not_counted_as_undone():
    airs = [0.2, -0.18, -0.1, 0.05, 0.12, 0.3]                  # the roll lands at -0.18: past 0, not back
    trace = [{"epoch": 1 + i / 10, "rolls": int(i > 0), "air": a, "air_of_means": a, "query_part": 0, "key_part": 0}
             for i, a in enumerate(airs)]
    (s,) = anatomy.roll_summary(trace, steps_per_epoch=10)
    assert s["air_before"] == 0.2 and s["air_after"] == -0.18 and s["steps_back"] == 3   # +0.12 >= 0.2 / 2
    trace[-2]["air"] = trace[-1]["air"] = -0.3                  # never back on its side
    assert anatomy.roll_summary(trace, steps_per_epoch=10)[0]["steps_back"] is None


def test_bench_times_the_same_steps_of_both_and_rolls_after_every_rollingq_block(tiny_npz, capsys):
    args = bench.parse_args(["--data", tiny_npz, "--width", "16", "--layers", "1", "--batch-size", "32", "--steps", "2"])
    result = bench.bench(args, datasets.load_npz(tiny_npz), torch.device("cpu"), rounds=3)
    seconds = result["seconds"]
    assert len(seconds["vanilla"]) == len(seconds["RollingQ"]) == 3 and result["rolls"] == 4   # + the warm-up's
    assert result["time_ratio"] == statistics.median(r / v for r, v in zip(seconds["RollingQ"], seconds["vanilla"]))
    assert result["samples_per_s"]["vanilla"] == pytest.approx(3 * 2 * 32 / sum(seconds["vanilla"]))
    assert "time ratio RollingQ / vanilla" in capsys.readouterr().out


def test_figures_are_an_optional_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)        # import matplotlib now fails
    experiments.save_figure(lambda plt: None, tmp_path / "figure.png")
    assert "no figure" in capsys.readouterr().out and not (tmp_path / "figure.png").exists()


def test_the_warm_start_trains_each_encoder_alone_with_its_own_recipe(tiny_npz):
    # a multimodal phase that cannot learn (lr 1e-9) leaves the pretraining untouched
    args = study.parse_args(["--data", tiny_npz, *TINY, "--epochs", "1", "--optimizer", "sgd", "--lr", "1e-9"])
    args.pretrain_epochs = 2
    _, m = train.run(args, datasets.load_npz(tiny_npz), torch.device("cpu"), log=lambda line: None,
                     warm_start=study.warm_start(args, torch.device("cpu")))
    assert m["pretrain"]["recipe"] == {**study.PRETRAIN, "epochs": 2, "batch_size": 32}
    assert set(m["pretrain"]["train_acc"]) == set(m["pretrain"]["test_acc"]) == {"audio", "visual"}
    assert m["pretrain"]["train_acc"]["audio"] > 0.5 and m["pretrain"]["test_acc"]["audio"] > 0.5   # chance: 0.25


def test_the_closest_setting_gives_the_audio_encoder_alone_a_head_start_and_runs_the_declared_rows(tiny_npz):
    assert study.unimodal_regime(study.CLOSEST) == "default"   # gate (e): each modality alone, no head start
    assert list(study.rows_of(study.CLOSEST)) == [
        "concat", "attention (vanilla)", "RollingQ, 3 rolls", "RollingQ, every epoch", "RollingQ, 1 roll, pass stats",
        "RollingQ, sigma 1, pass stats", "RollingQ, sigma 3, pass stats", study.CONTROL]     # docs/premise.md, 3
    args = study.parse_args(["--data", tiny_npz, *TINY, "--epochs", "1"])
    overrides = {**study.REGIMES[study.CLOSEST], "pretrain_epochs": 1, **study.ROWS["concat"]}
    m, _ = study.study_run(args, overrides, datasets.load_npz(tiny_npz), torch.device("cpu"), None,
                           set(vars(train.parse_args([]))))
    assert set(m["pretrain"]["test_acc"]) == {"audio"} and m["pretrain"]["recipe"]["epochs"] == 1


def test_the_papers_measures_grade_the_noise_correlate_attention_with_quality_and_split_by_noise(tiny_npz):
    d = datasets.load_npz(tiny_npz)
    d.test_noise = torch.rand(len(d.test_y), 2, generator=torch.Generator().manual_seed(0)) < 0.3   # as synthetic()
    args = train.parse_args([*TINY, "--epochs", "1"])
    model, metrics = train.run(args, d, torch.device("cpu"), log=lambda line: None, measures=measures.paper_measures)
    m = metrics["final"]
    assert set(m["acc_by_level"]) == {"audio", "visual"} and list(m["acc_by_level"]["audio"]) == ["0", "0.25", "0.5", "1"]
    assert m["acc_by_level"]["audio"]["1"] == m["acc"]["noise:audio"] and m["acc_by_level"]["visual"]["0"] == m["acc"]["clean"]
    assert all(-1 <= r <= 1 for r in m["attention_quality_r"].values())
    assert set(m["attention_by_noise"]["visual"]) == {"noise", "informative"}
    xs, y = d.test_x, d.test_y                                  # level 1 is train.py's own noise:audio pass
    zs, _ = datasets.noise_draws(xs)
    again = train.evaluate(model, [datasets.corrupted(xs[0], 1.0, zs[0]), xs[1]], y, d.names)["acc"]
    assert again == m["acc"]["noise:audio"]
    concat = train.run(train.parse_args([*TINY, "--epochs", "1", "--fusion", "concat"]), d, torch.device("cpu"),
                       log=lambda line: None, measures=measures.paper_measures)[1]["final"]
    assert "acc_by_level" in concat and "attention_quality_r" not in concat


def test_token_share_changes_one_thing_at_a_time_and_resumes(tiny_npz, tmp_path, monkeypatch, capsys):
    from experiments import token_share
    monkeypatch.setattr(study, "PAPER", {**study.PAPER, "epochs": 1, "pretrain_epochs": 1, "batch_size": 32})
    monkeypatch.setattr(token_share, "VARIANTS", {"paper regime": {}, "cls": {"cls_std": 1.0}, "fresh": {"pretrain_epochs": 0}})
    argv = ["--data", tiny_npz, "--seeds", "1", "--layers", "1", "--out", str(tmp_path)]
    token_share.main(argv)
    runs = [train.json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")]
    by = {("cls" if "cls_std" in r["config"] else "fresh" if not r["config"]["pretrain_epochs"] else "paper"): r
          for r in runs}
    assert len(runs) == 3 and set(by) == {"paper", "cls", "fresh"} and by["cls"]["config"]["cls_std"] == 1.0
    assert "pretrain" in by["paper"] and "pretrain" in by["cls"] and "pretrain" not in by["fresh"]
    assert all(r["config"]["optimizer"] == "sgd" and r["config"]["lr"] == 1e-3 and not r["config"]["rollingq"]
               for r in runs)
    table = (tmp_path / "token_share.md").read_text().splitlines()
    assert table[2].startswith("| variant | attn ") and len(table) == 4 + 3
    written = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*.json")}
    capsys.readouterr()
    token_share.main(argv)                                      # resumed: every run kept, none made again
    assert capsys.readouterr().out.count("| seed 0:") == 3
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*.json")} == written


def test_calibrate_reports_each_modality_alone_concat_and_the_samples_only_one_gets_right(tiny_npz, monkeypatch):
    from experiments import calibrate
    parse_args = train.parse_args
    monkeypatch.setattr(train, "parse_args", lambda argv=None, parser=None: parse_args([*argv, *TINY, "--epochs", "3"], parser))
    result = calibrate.calibrate(tiny_npz, seed=0)
    assert {"audio", "visual", "concat"} <= set(result) and all(0 <= result[k] <= 1 for k in ("audio", "visual", "concat"))
    assert len(result["audio by epoch 1, 3"]) == 2
    both = result["audio"] - result["audio only"]               # right by audio: by audio only, or by both
    assert result["visual"] - result["visual only"] == pytest.approx(both, abs=1e-9) and 0 < both < 1
    assert result["audio only"] + result["visual only"] + both + result["neither"] == pytest.approx(1, abs=1e-9)


def probe_data(n, shift, labels=None, seed=0):
    """n samples of 6 features, class k's mean shifted by `shift` along feature k; labels uniform over 3 classes
    unless given."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g) if labels is None else labels
    return torch.randn(n, 6, generator=g, dtype=torch.float64) + shift * torch.eye(6, dtype=torch.float64)[y], y


def test_the_converged_probe_converges_and_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (300,), generator=g)
    f = torch.randn(300, 8, generator=g, dtype=torch.float64) + 4 * torch.eye(8, dtype=torch.float64)[y]
    probe = measures.fit_probe(f[:200], y[:200], f[200:], y[200:], 3)
    assert probe["grad_norm"] < 1e-4 and probe["acc"] > 0.95


def test_the_converged_probe_is_fitted_on_the_training_set_alone_so_each_test_sample_is_judged_by_itself():
    f, y = probe_data(200, 2.0)
    a, y_a, b, y_b = f[100:150], y[100:150], f[150:] * 100, y[150:]   # b: far outliers

    def right(f_test, y_test):                                  # test samples the probe gets right
        return round(measures.fit_probe(f[:100], y[:100], f_test, y_test, 3)["acc"] * len(y_test))
    assert right(torch.cat([a, b]), torch.cat([y_a, y_b])) == right(a, y_a) + right(b, y_b)


def test_the_converged_probe_is_unchanged_when_a_feature_is_rescaled_or_shifted():
    f, y = probe_data(200, 2.0)
    scale = torch.tensor([1e-3, 1e3, 1.0, 10.0, 1e-2, 100.0], dtype=torch.float64)
    plain = measures.fit_probe(f[:100], y[:100], f[100:], y[100:], 3)
    moved = measures.fit_probe(f[:100] * scale + 50, y[:100], f[100:] * scale + 50, y[100:], 3)
    assert moved["acc"] == plain["acc"] and moved["grad_norm"] < 1e-4


def test_the_converged_probes_penalty_leaves_the_bias_free_so_a_silenced_probe_predicts_the_majority_class():
    labels = torch.tensor([0] * 14 + [1] * 4 + [2] * 2)[torch.randperm(20, generator=torch.Generator().manual_seed(1))]
    f, y = probe_data(200, 3.0, labels=labels.repeat(10))      # class 0: 70 % of each split, and well separated
    probe = measures.fit_probe(f[:100], y[:100], f[100:], y[100:], 3, l2=1e3)   # a penalty silencing the features
    assert probe["acc"] == float((y[100:] == 0).double().mean()) == 0.7


def test_the_snr_r_correlates_the_snr_with_audios_attention_share(tiny_npz):
    d = datasets.load_npz(tiny_npz)
    torch.manual_seed(0)
    model = train.MultimodalTransformer(train.build_config(train.parse_args(TINY), d))   # shares vary per sample
    _, shares = train.evaluate(model, d.test_x, d.test_y, d.names, per_sample=True)    # (N, M)
    audio = shares[:, d.names.index("audio")]
    for sign in (1, -1):                                        # the SNR rising, then falling, with audio's share
        d.side["snr"] = {"test": sign * 20 * (audio - audio.mean())}
        r = measures.snr_measures(model, d.test_x, d.test_y, d)["attention_snr_r"]
        assert r == pytest.approx(sign, abs=1e-6)


def test_gradient_shares_are_each_encoders_gradient_norm_over_the_sum_averaged_over_an_epochs_steps():
    model = torch.nn.Module()
    model.encoders = torch.nn.ModuleList([torch.nn.Linear(2, 1), torch.nn.Linear(1, 1, bias=False)])   # audio, visual
    audio, visual = model.encoders
    shares = measures.GradientShares()
    for epoch, (audio_w, audio_b, visual_w) in ((1, ([[3.0, 0.0]], [4.0], [[15.0]])),    # norms 5 and 15: 1/4, 3/4
                                                (1, ([[0.0, 1.0]], [0.0], [[1.0]])),     # 1 and 1: 1/2, 1/2
                                                (2, ([[6.0, 8.0]], None, [[30.0]]))):    # no bias gradient: 10, 30
        audio.weight.grad, visual.weight.grad = torch.tensor(audio_w), torch.tensor(visual_w)
        audio.bias.grad = None if audio_b is None else torch.tensor(audio_b)
        shares(model, epoch, 0, None)
    assert shares.per_epoch(["audio", "visual"]) == {"audio": [0.375, 0.25], "visual": [0.625, 0.75]}


def test_snr_measures_read_the_lowest_third_and_gradient_shares_sum_to_one(tiny_npz):
    d = datasets.load_npz(tiny_npz)
    d.side["snr"] = {"train": torch.linspace(-10, 10, len(d.train_y)), "test": torch.linspace(-10, 10, len(d.test_y))}
    shares = measures.GradientShares()
    args = train.parse_args([*TINY])
    model, metrics = train.run(args, d, torch.device("cpu"), log=lambda line: None, measures=measures.study_measures,
                               on_step=shares)
    low = d.side["snr"]["test"] <= d.side["snr"]["test"].quantile(1 / 3)
    final = metrics["final"]
    assert final["acc_low_snr"] == train.evaluate(model, [x[low] for x in d.test_x], d.test_y[low], d.names)["acc"]
    assert -1 <= final["attention_snr_r"] <= 1 and set(final["converged_probe"]) == {"audio", "visual"}
    per_epoch = shares.per_epoch(d.names)
    assert len(per_epoch["audio"]) == 2 and all(abs(a + v - 1) < 1e-5 for a, v in zip(per_epoch["audio"], per_epoch["visual"]))


def test_the_study_runs_on_a_data_folder_three_seeds_paired(tiny_npz, tmp_path, monkeypatch):
    rows = study.rows_of("default")
    quick_probes(monkeypatch)
    monkeypatch.setattr(study, "rows_of", lambda regime: {r: rows[r] for r in ("concat", "attention (vanilla)")})
    folder = datasets.save_folder(datasets.load_npz(tiny_npz), tmp_path / "folder")
    args = study.parse_args(["--data", str(folder), "--seeds", "3", *TINY, "--epochs", "1", "--regimes", "default"])
    results, report = study.study(args, torch.device("cpu"))
    paired = report["tables"]["default"]["paired"]["concat"]["acc clean"]
    assert len(paired["differences"]) == 3 and len(results["default"]["concat"]) == 3
    assert all(r["config"]["data"] == str(folder) for r in results["default"]["attention (vanilla)"])


def test_the_paper_experiments_cpu_commands_run_as_written(tmp_path):
    text = open(os.path.join(ROOT, "docs", "paper-experiment.md")).read()
    block = re.findall(r"```bash\n(.*?)```", text, re.S)[-1]
    r = subprocess.run(["bash", "-ec", block.replace("python ", f"{sys.executable} ")], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "runs" / "ks-tiny-run" / "metrics.json").read_text())
    assert m["config"]["preset"] == "paper" and m["config"]["optimizer"] == "sgd" and "best_val_epoch" in m["final"]
    assert m["config"]["model"]["modalities"] == {"audio": [512, 256], "visual": [588, 768]}   # the authors' tokens
    assert torch.load(tmp_path / "runs" / "ks-tiny-run" / "ckpt.pt", weights_only=True)["epoch"] == 2


def test_trajectory_prints_a_rows_seed_means_epoch_by_epoch_from_study_json(tmp_path):
    def record(epoch, seed):
        gap = {"frechet": 10.0 * epoch + seed, "fisher": 0.1, "cos": {"audio": 0.3, "visual": 0.1 * seed},
               "cos_overlap": 0.5}
        return {"epoch": epoch, "test_acc": 0.5 + 0.01 * epoch, "air": -0.2 * seed, "key_gap": 1.0,
                "attention": {"audio": 0.6, "visual": 0.4}, "gap": {"train": gap, "test": gap}}
    runs = {"default": {"attention (vanilla)": [{"epochs": [record(e, s) for e in range(1, 13)]} for s in (0, 1)],
                        "concat": [{"epochs": [{"epoch": e, "test_acc": 0.7} for e in range(1, 13)]}] * 2}}
    path = tmp_path / "study.json"
    path.write_text(json.dumps({"runs": runs, "report": {"tables": {"default": {"favoured": "audio"}}}}))
    r = cli(str(path), module="experiments.trajectory")
    lines = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    assert r.returncode == 0 and [line.split(" | ")[0] for line in lines[1:]] == \
        ["| " + e for e in ("1", "2", "3", "4", "5", "10", "12")]
    assert lines[6] == "| 10 | 0.600 | 0.600 | -0.100 | 1.000 | 100.500 | 0.100 | 0.250 | 0.500 |"   # seed means
    concat = cli(str(path), "--row", "concat", module="experiments.trajectory").stdout.splitlines()
    assert "| 1 | 0.700 | - | - | - | - | - | - | - |" in concat                # no attention, no keys: "-"
    assert refused(cli(str(path), "--row", "nosuch", module="experiments.trajectory"), "no row 'nosuch'")
    assert refused(cli(str(tmp_path / "none.json"), module="experiments.trajectory"), "No such file")
    assert refused(cli(os.path.join(ROOT, "README.md"), module="experiments.trajectory"), "not a study.json")
    from experiments.trajectory import epoch_values                  # any modalities: the favoured minus the others
    gap = {"frechet": 1.0, "fisher": 0.1, "cos": {"speech": 0.5, "image": 0.2, "text": 0.0}, "cos_overlap": 0.5}
    assert epoch_values({"test_acc": 0.5, "gap": {"test": gap}}, "speech")["cos gap"] == pytest.approx(0.4)
