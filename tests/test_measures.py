"""Specification of the study's measures (docs/premise.md, section 3) and its uniform-attention control."""

import types

import pytest
import torch
import torch.nn as nn

import data as datasets
import train
from conftest import TINY
from experiments import measures, study
from experiments.control import uniform_attention_model
from rollingq import Config, MultimodalTransformer


def points(n, d, seed, shift=0.0, scale=None):
    """n rows (n, d) of a Gaussian, float64: mean `shift`, covariance scale scaleᵀ (default I)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return (x if scale is None else x @ scale) + shift


def test_the_frechet_distance_is_zero_for_one_gaussian_and_the_squared_mean_distance_for_equal_covariances():
    scale = torch.tril(torch.ones(6, 6, dtype=torch.float64)) / 2     # a covariance far from I
    a, shift = points(400, 6, 0, scale=scale), torch.arange(6, dtype=torch.float64) / 3
    assert measures.frechet_distance(a, a) == pytest.approx(0, abs=1e-9)
    assert measures.frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-9)
    # b = 2a: C_b = 4 C_a commutes with C_a, so d^2 = |mu_a|^2 + tr(C_a + 4 C_a - 2 * 2 C_a) = |mu_a|^2 + tr C_a
    mu, cov = measures.gaussian(a)
    assert measures.frechet_distance(a, 2 * a) == pytest.approx(float(mu @ mu + measures.trace(cov)), rel=1e-9)


def test_the_fisher_ratio_is_free_of_the_keys_scale():
    a, b = points(300, 5, 0), points(200, 5, 1, shift=0.7)
    ratio = measures.fisher_ratio(a, b)
    mu_a, cov_a = measures.gaussian(a)
    mu_b, cov_b = measures.gaussian(b)
    assert ratio == pytest.approx(float((mu_a - mu_b).square().sum() / (measures.trace(cov_a) + measures.trace(cov_b))))
    assert measures.fisher_ratio(10 * a, 10 * b) == pytest.approx(float(ratio), rel=1e-12)


def test_the_permutation_share_is_small_for_separated_modalities_and_large_for_identical_ones():
    heads = 2
    a = torch.stack([points(150, 4, h) for h in range(heads)])        # (nh, n, d)
    far = torch.stack([points(100, 4, 10 + h, shift=1.0) for h in range(heads)])
    for distance in (measures.frechet_distance, measures.fisher_ratio):
        separated = measures.permutation_null(distance, [a, far])
        same = measures.permutation_null(distance, [a, a.clone()])
        assert separated["p"] < 0.05 and separated["value"] > 0
        assert same["p"] > 0.5
        assert measures.permutation_null(distance, [a, far]) == separated   # seeded


def test_the_histogram_overlap_is_one_for_identical_and_zero_for_disjoint_values():
    a = torch.linspace(-1, 1, 101)
    assert measures.histogram_overlap(a, a.clone()) == pytest.approx(1.0)
    assert measures.histogram_overlap(torch.linspace(-1, -0.3, 50), torch.linspace(0.3, 1, 70)) == 0.0
    centers = torch.arange(50) / 25 - 1 + 1 / 50                     # one value in each of the 50 bins
    assert measures.histogram_overlap(centers[:25], centers) == pytest.approx(0.5)   # 25 bins of 1/50 in common


def test_the_slope_is_the_least_squares_line_and_the_last_epochs_mean_reads_the_last_five():
    snr = torch.linspace(-10, 10, 41, dtype=torch.float64)
    assert 10 * measures.least_squares_slope(0.5 + 0.01 * snr, snr) == pytest.approx(0.1)
    records = [{"epoch": e, "test": {"frechet": float(e), "cos": {"audio": -float(e)}}} for e in range(1, 8)]
    assert measures.last_epochs_mean(records) == {"test": {"frechet": 5.0, "cos": {"audio": -5.0}}}


def test_an_encoder_whose_parameters_do_not_change_has_update_share_zero():
    model = types.SimpleNamespace(encoders=nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 3)]))
    shares = measures.UpdateShares()
    for step in range(1, 4):
        with torch.no_grad():
            model.encoders[1].weight += 0.1 * step                    # the visual encoder moves, audio stays
        shares(model, 1, step, None)
    for step in range(1, 3):
        with torch.no_grad():                                         # epoch 2: audio moves 3 times as far
            model.encoders[0].bias += 0.3
            model.encoders[1].bias += 0.1
        shares(model, 2, step, None)
    per_epoch = shares.per_epoch(["audio", "visual"])
    assert per_epoch["audio"] == [0.0, pytest.approx(0.75)] and per_epoch["visual"] == [1.0, pytest.approx(0.25)]


def tiny_config(**change):
    return Config({"audio": (4, 6), "visual": (3, 5)}, 4, d_model=16, n_layers=1, **change)


def test_the_uniform_control_attends_one_over_T_to_every_token_and_starts_as_vanilla():
    torch.manual_seed(0)
    vanilla, after_vanilla = MultimodalTransformer(tiny_config()), torch.rand(3)
    torch.manual_seed(0)
    model = uniform_attention_model(tiny_config())
    assert all(torch.equal(p, vanilla.state_dict()[k]) for k, p in model.state_dict().items())
    assert torch.equal(torch.rand(3), after_vanilla)                  # the global RNG where vanilla's build leaves it
    fusion = model.fusion.eval()
    x = torch.randn(5, 1 + 5 + 4, 16)                                 # (B, T, C): [CLS; audio CLS + 4; visual CLS + 3]
    y, extra = fusion(x, stats=True)
    assert torch.allclose(y, fusion.proj(fusion.v(x).mean(1)), atol=1e-6)
    assert torch.allclose(extra["attention"], torch.tensor([5 / 10, 4 / 10]).expand(5, 1, 2))
    model.train()
    xs = [torch.randn(8, 4, 6), torch.randn(8, 3, 5)]
    model(xs).logits.sum().backward()
    assert fusion.q.weight.grad is None and fusion.k.weight.grad is None and fusion.v.weight.grad is not None


def test_the_fusion_keys_are_the_key_projection_of_each_modalitys_tokens_and_the_query_is_R_q():
    torch.manual_seed(0)
    model = MultimodalTransformer(tiny_config(fusion_head="prenorm"))  # prenorm: the fusion reads ln(tokens)
    xs = [torch.randn(3, 4, 6), torch.randn(3, 3, 5)]
    spans = model.fusion.spans                                        # every token of every sample picked
    rows, picks = measures.pick_tokens(3, spans, 512, torch.Generator().manual_seed(0))
    assert rows.tolist() == [0, 1, 2] and [len(t) for _, t in picks] == [3 * (e - s) for s, e in spans]
    out = model.eval()(xs, stats=True)
    for j, (query, keys) in enumerate(measures.fusion_keys(model, xs, picks)):
        at, _ = picks[j]
        means = torch.stack([keys[at == i].mean(0) for i in range(3)])   # (B, nh, hs) each sample's mean key
        assert torch.allclose(means, out.key_means[:, :, j].double(), atol=1e-5)
        assert torch.allclose(query, out.query[at].double())


def test_the_epoch_measures_run_at_each_epochs_last_step_on_train_and_test_and_change_no_result(tiny_npz):
    d = datasets.load_npz(tiny_npz)
    args = train.parse_args([*TINY])
    gap, updates = measures.EpochMeasures(d, torch.device("cpu"), args.batch_size, tokens=64, draws=20), \
        measures.UpdateShares()
    model, metrics = train.run(args, d, torch.device("cpu"), log=lambda line: None,
                               on_step=measures.all_of(gap, updates))
    assert [r["epoch"] for r in gap.epochs] == [1, 2] and set(gap.epochs[-1]) == {"epoch", "train", "test"}
    xs, picks = gap.picked["test"]
    assert all(len(token) == 64 for _, token in picks)
    # the last record is the trained model's (no roll after the last epoch)
    assert gap.epochs[-1]["test"] == measures.key_distribution_gap(measures.fusion_keys(model, xs, picks), d.names, 20)
    assert len(updates.per_epoch(d.names)["audio"]) == 2
    _, without = train.run(args, d, torch.device("cpu"), log=lambda line: None)
    assert [e["test_acc"] for e in without["epochs"]] == [e["test_acc"] for e in metrics["epochs"]]
    assert without["final"]["acc"] == metrics["final"]["acc"]


def test_the_study_runs_the_control_in_its_regimes_and_records_the_new_measures(tiny_npz):
    assert study.CONTROL in study.rows_of("default") and study.CONTROL not in study.rows_of("paper")
    d = datasets.load_npz(tiny_npz)
    args = study.parse_args(["--data", tiny_npz, *TINY, "--epochs", "1"])
    flags = set(vars(train.parse_args([])))
    metrics, _ = study.study_run(args, {**study.ROWS[study.CONTROL], "seed": 0}, d, torch.device("cpu"), None, flags)
    tokens = [e - s for s, e in MultimodalTransformer(train.build_config(args, d)).fusion.spans]
    final = metrics["final"]                                          # every token weighted 1/T: the token share
    assert final["attention"]["clean"] == pytest.approx({m: t / sum(tokens) for m, t in zip(d.names, tokens)})
    assert metrics["config"]["uniform_attention"] is True
    assert set(metrics["epochs"][0]["gap"]) == {"train", "test"} and set(final["gap_last5"]) == {"train", "test"}
    assert set(final["update_share"]) == set(final["gradient_share"]) == set(d.names)
