"""Specification of rollingq.py: the rotation, the anchor, AIR, the model and the controller."""

import io
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import data as datasets
import train
from rollingq import (Config, MultimodalTransformer, Output, RollingQ, air_from_cosines, attention_imbalance_rate,
                      modality_cosines, modality_leads, rolling_target, rotation_matrix)

settings.register_profile("default", deadline=None, max_examples=40)
settings.load_profile("default")

dims = st.integers(2, 1024)
seeds = st.integers(0, 2**31 - 1)
dtypes = st.sampled_from([torch.float32, torch.float64])


def vectors(seed, d, n=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(d, generator=g, dtype=torch.float64).to(dtype) for _ in range(n)]


def tol(dtype):
    return 1e-5 if dtype == torch.float32 else 1e-10


# ----------------------------------------------------------------------------------------
# rotation_matrix


@given(d=dims, seed=seeds, dtype=dtypes)
def test_rotation_is_orthogonal_with_det_plus_one(d, seed, dtype):
    src, dst = vectors(seed, d, dtype=dtype)
    R = rotation_matrix(src, dst)
    assert R.dtype == dtype and R.shape == (d, d)
    eye = torch.eye(d, dtype=torch.float64)
    assert torch.allclose(R.double() @ R.double().T, eye, atol=tol(dtype))
    sign, logdet = torch.linalg.slogdet(R.double())
    assert sign == 1 and abs(float(logdet)) < 1e-4


@given(d=dims, seed=seeds, dtype=dtypes)
def test_rotation_maps_src_direction_onto_dst_direction(d, seed, dtype):
    src, dst = vectors(seed, d, dtype=dtype)
    R = rotation_matrix(src, dst)
    mapped = R.double() @ (src.double() / src.double().norm())
    assert torch.allclose(mapped, dst.double() / dst.double().norm(), atol=tol(dtype))


@given(d=dims, seed=seeds, dtype=dtypes)
def test_rotation_preserves_norms(d, seed, dtype):
    src, dst, x = vectors(seed, d, n=3, dtype=dtype)
    R = rotation_matrix(src, dst)
    assert math.isclose(float((R.double() @ x.double()).norm()), float(x.double().norm()), rel_tol=tol(dtype))


@given(d=st.integers(3, 1024), seed=seeds, dtype=dtypes)
def test_rotation_is_identity_off_the_plane_of_src_and_dst(d, seed, dtype):
    src, dst, z = vectors(seed, d, n=3)
    basis, _ = torch.linalg.qr(torch.stack([src, dst], 1))       # (d, 2) orthonormal basis of the plane
    z = z - basis @ (basis.T @ z)                                # z orthogonal to src and dst
    R = rotation_matrix(src.to(dtype), dst.to(dtype))
    assert torch.allclose(R.double() @ z, z, atol=tol(dtype) * z.norm())


@given(d=dims, seed=seeds, dtype=dtypes)
def test_rotation_back_is_the_transpose(d, seed, dtype):
    src, dst = vectors(seed, d, dtype=dtype)
    assert torch.allclose(rotation_matrix(dst, src), rotation_matrix(src, dst).T, atol=tol(dtype))


@given(d=dims, seed=seeds, scale=st.floats(1e-3, 1e3), dtype=dtypes)
def test_parallel_vectors_give_the_identity(d, seed, scale, dtype):
    (src,) = vectors(seed, d, n=1, dtype=dtype)
    assert torch.allclose(rotation_matrix(src, scale * src), torch.eye(d, dtype=dtype), atol=tol(dtype))


@given(d=dims, seed=seeds, scale=st.floats(1e-3, 1e3), dtype=dtypes)
def test_antipodal_vectors_give_a_valid_half_turn(d, seed, scale, dtype):
    (src,) = vectors(seed, d, n=1, dtype=dtype)
    R = rotation_matrix(src, -scale * src).double()
    u = src.double() / src.double().norm()
    assert torch.allclose(R @ u, -u, atol=tol(dtype))
    assert torch.allclose(R @ R.T, torch.eye(d, dtype=torch.float64), atol=tol(dtype))
    assert torch.linalg.slogdet(R).sign == 1


def test_ten_thousand_composed_rolls_stay_orthogonal():
    cfg = Config({"a": (2, 3), "v": (2, 3)}, 2, d_model=16, n_heads=1)
    fusion = MultimodalTransformer(cfg).fusion
    g = torch.Generator().manual_seed(0)
    for _ in range(10_000):
        src, dst = torch.randn(2, 16, generator=g)
        fusion.roll({0: rotation_matrix(src, dst)})
    R = fusion.R[0].double()
    assert fusion.R.dtype == torch.float32 and int(fusion.rolls) == 10_000
    assert (R @ R.T - torch.eye(16, dtype=torch.float64)).abs().max() < 1e-5


@pytest.mark.parametrize("src, dst, message", [
    (torch.zeros(4), torch.ones(4), "zero vector"),
    (torch.ones(4), torch.zeros(4), "zero vector"),
    (torch.ones(1), torch.ones(1), "d >= 2"),
    (torch.ones(3), torch.ones(4), "same length"),
    (torch.ones(2, 2), torch.ones(2, 2), "same length"),
])
def test_rotation_rejects_bad_arguments(src, dst, message):
    with pytest.raises(ValueError, match=message):
        rotation_matrix(src, dst)


# ----------------------------------------------------------------------------------------
# AIR and the anchor


def mean_stats(seed, d, M=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, generator=g, dtype=torch.float64), torch.randn(M, d, generator=g, dtype=torch.float64)


@given(d=st.integers(2, 256), seed=seeds)
def test_sigma_zero_roll_leaves_the_mean_query_equally_close_to_both_modalities(d, seed):
    q, K = mean_stats(seed, d)
    q_rolled = rotation_matrix(q, rolling_target(q, K, sigma=0.0)) @ q
    c = modality_cosines(q_rolled, K)
    assert abs(float(c[0] - c[1])) < 1e-9                      # AIR of the mean query is 0
    assert math.isclose(float(q_rolled.norm()), float(q.norm()), rel_tol=1e-9)


@given(d=st.integers(2, 256), seed=seeds, sigma=st.floats(0, 20))
def test_a_roll_never_widens_the_favoured_modality_lead(d, seed, sigma):
    q, K = mean_stats(seed, d)
    before = float(air_from_cosines(modality_cosines(q, K)))
    q_rolled = rotation_matrix(q, rolling_target(q, K, sigma)) @ q
    after = float(air_from_cosines(modality_cosines(q_rolled, K)))
    assert after * before <= 1e-12 or abs(after) <= abs(before) + 1e-12


@given(d=st.integers(2, 256), seed=seeds, sigma=st.floats(0, 20))
def test_rolling_target_is_the_papers_tanh_anchor_for_two_modalities(d, seed, sigma):
    q, K = mean_stats(seed, d)
    k_a, k_v = K[0] / K[0].norm(), K[1] / K[1].norm()
    air = float(modality_cosines(q, K)[0] - modality_cosines(q, K)[1])
    alpha = (1 + math.tanh(-sigma * air)) / 2
    t = alpha * k_a + (1 - alpha) * k_v
    expected = t / t.norm() * q.norm()
    assert torch.allclose(rolling_target(q, K, sigma), expected, atol=1e-9)



@given(d=st.integers(2, 64), seed=seeds, sigma=st.floats(0, 20))
def test_given_per_sample_cosines_the_anchor_weight_is_alpha_of_the_papers_air(d, seed, sigma):
    g = torch.Generator().manual_seed(seed)
    q, K = torch.randn(30, d, generator=g, dtype=torch.float64), torch.randn(30, 2, d, generator=g, dtype=torch.float64)
    air = float(attention_imbalance_rate(q, K))                  # mean of per-sample differences
    alpha = (1 + math.tanh(-sigma * air)) / 2
    K_bar = K.mean(0)
    t = alpha * K_bar[0] / K_bar[0].norm() + (1 - alpha) * K_bar[1] / K_bar[1].norm()
    got = rolling_target(q.mean(0), K_bar, sigma, cosines=modality_cosines(q, K).mean(0))
    assert torch.allclose(got, t / t.norm() * q.mean(0).norm(), atol=1e-9)


@given(M=st.integers(2, 6), d=st.integers(8, 128), seed=seeds)
def test_sigma_zero_anchor_is_equally_close_to_every_mean_key(M, d, seed):
    q, K = mean_stats(seed, d, M)
    t = rolling_target(q, K, sigma=0.0)
    c = modality_cosines(t, K)                                  # (M,)
    assert float((c - c[0]).abs().max()) < 1e-9 and float(c.min()) > 0
    assert math.isclose(float(t.norm()), float(q.norm()), rel_tol=1e-9)


@given(M=st.integers(3, 6), d=st.integers(8, 128), seed=seeds)
def test_a_sigma_zero_roll_leaves_no_lead_for_any_number_of_modalities(M, d, seed):
    q, K = mean_stats(seed, d, M)
    q_rolled = rotation_matrix(q, rolling_target(q, K)) @ q
    assert float(air_from_cosines(modality_cosines(q_rolled, K))) < 1e-9


@given(M=st.integers(2, 6), d=st.integers(2, 64), seed=seeds)
def test_modality_leads_sum_to_zero_and_reduce_to_air_for_two(M, d, seed):
    q, K = mean_stats(seed, d, M)
    c = modality_cosines(q, K)                                  # (M,)
    leads = modality_leads(c)
    assert abs(float(leads.sum())) < 1e-9
    if M == 2:
        assert math.isclose(float(leads[0]), float(air_from_cosines(c)), abs_tol=1e-12)
    else:
        assert float(air_from_cosines(c)) >= 0


def test_air_is_the_mean_over_samples_of_the_cosine_difference():
    g = torch.Generator().manual_seed(0)
    q, K = torch.randn(50, 8, generator=g), torch.randn(50, 2, 8, generator=g)   # (N, d), (N, M, d)
    per_sample = [torch.cosine_similarity(q[i], K[i, 0], 0) - torch.cosine_similarity(q[i], K[i, 1], 0)
                  for i in range(50)]
    assert math.isclose(float(attention_imbalance_rate(q, K)), float(sum(per_sample) / 50), abs_tol=1e-6)


def test_rolling_target_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"\(M, hs\)"):
        rolling_target(torch.ones(3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="at least 2 modalities"):
        rolling_target(torch.ones(3), torch.ones(1, 3))
    with pytest.raises(ValueError, match="zero vector"):
        rolling_target(torch.zeros(3), torch.ones(2, 3))


# ----------------------------------------------------------------------------------------
# The model and the controller

MODALITIES = {"audio": (5, 7), "visual": (3, 4), "text": (1, 6)}


def tiny_model(heads=1, seed=0, modalities=MODALITIES):
    torch.manual_seed(seed)
    return MultimodalTransformer(Config(modalities, 4, d_model=16, n_layers=1, fusion_heads=heads))


def batch(seed, n=12, modalities=MODALITIES):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, L, D, generator=g) for L, D in modalities.values()]


@given(heads=st.sampled_from([1, 2, 4]), seed=seeds)
def test_the_rotation_touches_only_the_cls_query(heads, seed):
    model = tiny_model(heads).eval()
    x = torch.randn(6, 10, 16, generator=torch.Generator().manual_seed(seed))   # (B, T, C)
    plain, _ = model.fusion(x)
    g = torch.Generator().manual_seed(seed + 1)
    hs = 16 // heads
    model.fusion.roll({h: rotation_matrix(*torch.randn(2, hs, generator=g)) for h in range(heads)})
    rolled, _ = model.fusion(x)
    assert torch.equal(rolled[:, 1:], plain[:, 1:])             # every other token: bit for bit
    assert not torch.allclose(rolled[:, 0], plain[:, 0])        # the CLS output did change


def test_model_reports_attention_query_and_key_means_on_request():
    model = tiny_model(heads=2).eval()
    out = model(batch(0), stats=True)
    assert out.logits.shape == (12, 4) and len(out.probe_logits) == 3
    assert out.query.shape == (12, 2, 8) and out.key_means.shape == (12, 2, 3, 8)
    assert out.attention.shape == (12, 2, 3)
    assert bool((out.attention.sum(-1) < 1).all())              # the rest is on the CLS token itself
    plain = model(batch(0))
    assert plain.query is None and plain.attention is None
    assert torch.equal(plain.logits, out.logits)                # statistics change nothing


@given(heads=st.sampled_from([1, 2, 4]), seed=seeds)
def test_reported_attention_mass_is_sdpas_cls_row(heads, seed):
    model = tiny_model(heads).eval()
    fusion = model.fusion
    x = torch.randn(3, 10, 16, generator=torch.Generator().manual_seed(seed))   # (B, T, C), T = 1 + 5 + 3 + 1
    _, extra = fusion(x, stats=True)
    q, k, v = fusion.split(x)                                   # (B, nh, T, hs)
    q_cls = q[:, :, :1] @ fusion.R.transpose(-1, -2)
    att = torch.softmax(q_cls @ k.transpose(-2, -1) / math.sqrt(k.shape[-1]), -1)   # (B, nh, 1, T)
    y = F.scaled_dot_product_attention(torch.cat([q_cls, q[:, :, 1:]], 2), k, v)[:, :, :1]
    assert torch.allclose(att @ v, y, atol=1e-5)                # the same row SDPA computes
    spans = [(1, 6), (6, 9), (9, 10)]
    expected = torch.stack([att[:, :, 0, a:b].sum(-1) for a, b in spans], -1)
    assert torch.allclose(extra["attention"], expected, atol=1e-6)


def test_a_sigma_zero_roll_balances_the_observed_mean_query():
    model = tiny_model(heads=2, modalities={"audio": (5, 7), "visual": (3, 4)}).eval()
    xs = batch(1, modalities={"audio": (5, 7), "visual": (3, 4)})
    controller = RollingQ(beta=0.0, sigma=0.0, max_rolls=1)
    controller.observe(model(xs, stats=True))
    record = controller.step(model)
    assert record["rolled"] and record["rolls"] == 1 and record["heads"] == [0, 1]
    out = model(xs, stats=True)
    c = modality_cosines(out.query.mean(0), out.key_means.mean(0))   # (nh, M)
    assert torch.allclose(c[:, 0], c[:, 1], atol=1e-5)


def test_roll_condition_respects_beta_and_max_rolls():
    model = tiny_model().eval()
    xs = batch(2)
    controller = RollingQ(beta=10.0)                            # |AIR| <= 2 < beta: never rolls
    controller.observe(model(xs, stats=True))
    assert controller.step(model)["rolled"] is False
    controller = RollingQ(beta=0.0, max_rolls=2)
    records = []
    for _ in range(4):
        controller.observe(model(xs, stats=True))
        records.append(controller.step(model))
    assert [r["rolled"] for r in records] == [True, True, False, False]
    assert int(model.fusion.rolls) == 2


def test_a_head_without_anchor_waits_instead_of_failing():
    fusion_model = tiny_model(modalities={"audio": (2, 3), "visual": (2, 3)})
    q = torch.randn(4, 1, 16)                                   # (B, nh, hs)
    k = torch.randn(16)
    keys = torch.stack([k, -k])[None, None].expand(4, 1, 2, 16)  # (B, nh, M, hs): opposite mean keys
    controller = RollingQ(max_rolls=None)
    controller.observe(Output(torch.zeros(4, 4), [], query=q, key_means=keys))
    record = controller.step(fusion_model)
    assert record["rolled"] is False and record["skipped"] == [0] and int(fusion_model.fusion.rolls) == 0


def test_heads_roll_independently():
    model = tiny_model(heads=2).eval()
    xs = batch(3)
    with torch.no_grad():
        out = model(xs, stats=True)
    air = attention_imbalance_rate(out.query, out.key_means)     # (nh,)
    assert air[0].abs() != air[1].abs()
    beta = float(air.abs().mean())                               # between the two heads' |AIR|
    controller = RollingQ(beta=beta)
    controller.observe(out)
    record = controller.step(model)
    rolled = [h for h in range(2) if abs(float(air[h])) > beta]
    assert record["heads"] == rolled and len(rolled) == 1
    still = 1 - rolled[0]
    assert torch.equal(model.fusion.R[still], torch.eye(8))
    assert not torch.equal(model.fusion.R[rolled[0]], torch.eye(8))


def test_state_dict_round_trip_of_a_rolled_model_is_exact():
    model = tiny_model(heads=2).eval()
    xs = batch(4)
    controller = RollingQ()
    controller.observe(model(xs, stats=True))
    controller.step(model)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    reloaded = tiny_model(heads=2, seed=1).eval()               # other initial weights
    reloaded.load_state_dict(torch.load(buffer, weights_only=True))
    assert int(reloaded.fusion.rolls) == 1
    assert torch.equal(reloaded(xs).logits, model(xs).logits)


def test_controller_and_model_reject_bad_arguments():
    with pytest.raises(ValueError, match=">= 0"):
        RollingQ(beta=-1)
    with pytest.raises(ValueError, match="observe"):
        RollingQ().step(tiny_model())
    with pytest.raises(ValueError, match="stats=True"):
        RollingQ().observe(tiny_model()(batch(0)))
    with pytest.raises(ValueError, match="at least 2 modalities"):
        Config({"audio": (2, 3)}, 2)
    with pytest.raises(ValueError, match="divisible"):
        Config(MODALITIES, 2, d_model=10, n_heads=4)
    with pytest.raises(ValueError, match="3 modality tensors"):
        tiny_model()(batch(0)[:2])


def test_concat_fusion_has_no_attention_layer():
    model = MultimodalTransformer(Config(MODALITIES, 4, d_model=16, n_layers=1, fusion="concat"))
    assert not hasattr(model, "fusion")
    assert model(batch(0)).logits.shape == (12, 4)


def test_model_takes_vectors_as_one_token_and_names_a_badly_shaped_modality():
    model = tiny_model().eval()                                 # text is (1, 6): one token
    xs = batch(0)
    assert torch.equal(model(xs).logits, model([xs[0], xs[1], xs[2][:, 0]]).logits)   # (B, 6) == (B, 1, 6)
    with pytest.raises(ValueError, match=r"modality 'visual': expected a tensor \(B, 3, 4\) .*got \(12, 4\)"):
        model([xs[0], xs[1][:, 0], xs[2]])
    with pytest.raises(ValueError, match=r"modality 'audio': expected a tensor \(B, 5, 7\) .*got \(12, 5, 6\)"):
        model([xs[0][..., :6], xs[1], xs[2]])
    with pytest.raises(ValueError, match="same B"):
        model([xs[0], xs[1][:5], xs[2]])


def test_fusion_dropout_acts_in_training_only():
    torch.manual_seed(0)
    model = MultimodalTransformer(Config(MODALITIES, 4, d_model=16, n_layers=1, fusion_dropout=0.5))
    xs = batch(0)
    assert not torch.equal(model(xs).logits, model(xs).logits)
    model.eval()
    assert torch.equal(model(xs).logits, model(xs).logits)
    with pytest.raises(ValueError, match="fusion_dropout must be in"):
        Config(MODALITIES, 4, fusion_dropout=1.0)


def test_step_reaches_the_fusion_layer_through_ddp_and_compile_wrappers(tmp_path):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = tiny_model()
        for wrapped in (torch.nn.parallel.DistributedDataParallel(model), torch.compile(model)):
            controller = RollingQ(max_rolls=None)
            controller.observe(model(batch(0), stats=True))
            assert controller.step(wrapped)["rolled"]
        assert int(model.fusion.rolls) == 2
        controller.observe(model(batch(0), stats=True))
        with pytest.raises(ValueError, match="needs a MultimodalTransformer with attention fusion"):
            controller.step(torch.nn.Linear(2, 2))
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------
# data.py: the built-in set and the .npz loader

HERE = os.path.dirname(os.path.abspath(__file__))


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


def test_synthetic_data_is_reproducible_from_its_seed():
    a, b, c = datasets.synthetic(seed=3, n_train=50, n_test=10), datasets.synthetic(seed=3, n_train=50, n_test=10), \
        datasets.synthetic(seed=4, n_train=50, n_test=10)
    assert all(torch.equal(x, y) for x, y in zip(a.train_x + [a.train_y], b.train_x + [b.train_y]))
    assert not torch.equal(a.train_x[0], c.train_x[0])
    assert a.modalities == {"audio": (8, 16), "visual": (16, 16)} and a.n_classes == 8


def test_load_npz_reads_tokens_and_vectors(tmp_path):
    d = datasets.load_npz(small_npz(tmp_path / "ok.npz"))
    assert d.names == ["audio", "visual"] and d.n_classes == 3
    assert d.modalities == {"audio": (4, 5), "visual": (1, 6)}
    assert d.train_x[1].dtype == torch.float32 and d.train_y.dtype == torch.int64


BAD_NPZ = {
    "object arrays": ({"train_audio": np.array([None] * 40, dtype=object)}, "Python objects"),
    "one modality": ({"train_visual": None, "test_visual": None}, "expected at least 2"),
    "missing labels": ({"test_y": None}, "no 'test_y'"),
    "N differs from labels": ({"train_audio": np.zeros((39, 4, 5))}, "39 samples but train_y has 40"),
    "L differs between splits": ({"test_audio": np.zeros((20, 3, 5))}, r"\(4, 5\) in train but \(3, 5\) in test"),
    "D differs between splits": ({"test_visual": np.zeros((20, 7))}, r"\(1, 6\) in train but \(1, 7\) in test"),
    "NaN": ({"train_visual": np.full((40, 6), np.nan)}, "NaN or inf"),
    "inf": ({"test_audio": np.full((20, 4, 5), np.inf)}, "NaN or inf"),
    "negative label": ({"train_y": np.r_[-1, np.zeros(39, int)]}, "outside 0..0"),
    "test label unseen in train": ({"test_y": np.full(20, 3)}, r"test_y has labels outside 0..2"),
    "float labels": ({"train_y": np.zeros(40)}, "integer labels"),
    "empty split": ({"test_y": np.zeros(0, int), "test_audio": np.zeros((0, 4, 5)),
                     "test_visual": np.zeros((0, 6))}, "test split is empty"),
    "train without test": ({"test_visual": None}, "no matching 'test_visual'"),
    "unknown array": ({"val_audio": np.zeros(3)}, "unexpected array 'val_audio'"),
    "4-D features": ({"train_audio": np.zeros((40, 1, 4, 5)), "test_audio": np.zeros((20, 1, 4, 5))},
                     r"must be \(N, L, D\) or \(N, D\)"),
}


@pytest.mark.parametrize("case", list(BAD_NPZ))
def test_load_npz_refuses_bad_input_with_a_clear_message(tmp_path, case):
    change, message = BAD_NPZ[case]
    with pytest.raises(datasets.DataError, match=message):
        datasets.load_npz(small_npz(tmp_path / "bad.npz", **change))


def test_load_npz_refuses_a_missing_file_and_a_file_that_is_no_npz(tmp_path):
    with pytest.raises(datasets.DataError, match="no such file"):
        datasets.load_npz(tmp_path / "absent.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(datasets.DataError, match="not a .npz archive"):
        datasets.load_npz(tmp_path / "text.npz")
    with pytest.raises(datasets.DataError, match=r"README.md is not a .npz archive \(expected the output of numpy.savez\)$"):
        datasets.load_npz(os.path.join(HERE, "README.md"))     # no word of pickles: just what it is not
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(datasets.DataError, match="single array"):
        datasets.load_npz(tmp_path / "single.npy")


# ----------------------------------------------------------------------------------------
# train.py: end to end

TINY = ["--epochs", "2", "--width", "16", "--layers", "1", "--batch-size", "32"]


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    """A small built-in-style set on disk, the visual modality given as (N, D) vectors."""
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    d = datasets.synthetic(seed=0, n_train=256, n_test=128, n_classes=4, modalities=(
        datasets.Modality("audio", 4, 6, 1.0, 0.2), datasets.Modality("visual", 3, 5, 0.5, 0.2)))
    datasets.save_npz(d, path, vectors=("visual",))
    return str(path)


def cli(*args):
    return subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *args],
                          capture_output=True, text=True, timeout=300)


def test_train_writes_metrics_and_a_checkpoint_that_reloads_to_the_same_accuracy(tmp_path, tiny_npz):
    out = tmp_path / "run"
    r = cli("--data", tiny_npz, "--rollingq", *TINY, "--out", str(out), "--save", str(out / "model.pt"))
    assert r.returncode == 0, r.stderr
    assert sum(line.startswith("epoch ") for line in r.stdout.splitlines()) == 2
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["rollingq"] is True and m["config"]["data"] == tiny_npz
    assert [e["epoch"] for e in m["epochs"]] == [1, 2]
    assert set(m["epochs"][0]) >= {"epoch", "train_loss", "test_acc", "air", "key_gap", "rolled"}
    assert m["epochs"][0]["rolled"] is True
    final = m["final"]
    assert set(final["acc"]) == {"clean", "noise:audio", "noise:visual"}
    assert set(final["attention"]["noise:audio"]) == {"audio", "visual"}
    assert abs(sum(final["attention"]["clean"].values()) - 1) < 1e-6
    assert set(final["probe_acc"]) == {"audio", "visual"} and final["train_seconds"] > 0
    assert all(0 <= a <= 1 for a in final["acc"].values()) and isinstance(final["air"], float)

    opening = r.stdout.splitlines()[0]                          # says what the run is about to do
    assert opening.startswith(f"data {tiny_npz}: audio 4x6, visual 1x15") and "AIR > 0: audio favoured" in opening
    assert f"saved the model to {out / 'model.pt'}" in r.stdout

    again = tmp_path / "eval"
    r = cli("--data", tiny_npz, "--load", str(out / "model.pt"), "--eval-only", "--out", str(again))
    assert r.returncode == 0, r.stderr
    reloaded = json.loads((again / "metrics.json").read_text())
    assert reloaded["final"]["acc"] == final["acc"] and reloaded["final"]["air"] == final["air"]
    config = reloaded["config"]                                 # what was loaded, not CLI defaults
    assert config["load"] == str(out / "model.pt") and config["rolls_done"] == 1 and "rollingq" not in config
    assert config["model"] == m["config"]["model"]


def run_in_process(argv, data):
    args = train.parse_args(argv)
    return train.run(args, data, torch.device("cpu"), log=lambda line: None)[1]


def test_same_seed_gives_identical_metrics(tiny_npz):
    d = datasets.load_npz(tiny_npz)
    a, b = (run_in_process(["--rollingq", *TINY, "--seed", "3"], d) for _ in range(2))
    for m in (a, b):
        m["final"].pop("train_seconds")
    assert a == b
    c = run_in_process(["--rollingq", *TINY, "--seed", "4"], d)
    assert c["epochs"] != a["epochs"]


@pytest.mark.parametrize("case", list(BAD_NPZ))
def test_train_refuses_each_bad_npz_in_one_line_with_status_2(tmp_path, capsys, case):
    change, message = BAD_NPZ[case]
    with pytest.raises(SystemExit) as exit:
        train.cli(["--data", str(small_npz(tmp_path / "bad.npz", **change))])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert re.search(message, err)


def test_rollingq_moves_air_toward_zero_relative_to_vanilla(tiny_npz):
    d = datasets.load_npz(tiny_npz)
    for seed in ("0", "1"):
        vanilla = run_in_process([*TINY, "--epochs", "3", "--seed", seed], d)["final"]["air"]
        rolled = run_in_process(["--rollingq", *TINY, "--epochs", "3", "--seed", seed], d)["final"]["air"]
        assert abs(rolled) < abs(vanilla)


def test_cli_bad_input_gets_one_line_and_exit_status_2(tmp_path, tiny_npz):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    cases = [
        (["--data", str(tmp_path / "missing.npz")], "no such file"),
        (["--data", small_npz(tmp_path / "obj.npz", train_audio=np.array([None] * 40, dtype=object))],
         "Python objects"),
        (["--eval-only"], "--eval-only needs --load"),
        (["--epochs", "0"], "--epochs must be positive"),
        (["--data", tiny_npz, "--load", str(tmp_path / "notes.txt")], "not a checkpoint"),
        (["--rollingq", "--fusion", "concat"], "need --fusion attention"),
        (["--rollingq", "--sigma", "inf"], "--sigma must be >= 0 and finite"),
        (["--lr", "nan"], "--lr must be positive and finite"),
        (["--rollingq", "--heads", "64"], "--width / --heads must be at least 2"),
        (["--max-rolls", "none"], "add --rollingq"),
        (["--anatomy", "--plot", "figure.txt"], "give a .png, .pdf or .svg file name"),
        (["--data", str(tmp_path)], "is a directory"),
        (["--out", str(tmp_path / "notes.txt" / "run")], "--out: cannot create the folder"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "no CUDA GPU"))
    for args, message in cases:
        r = cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr


def test_study_resumes_from_its_run_files_and_reports_premise_and_tables(tiny_npz, tmp_path, capsys):
    d = datasets.load_npz(tiny_npz)
    args = train.parse_args(["--study", "--seeds", "2", *TINY, "--epochs", "1", "--out", str(tmp_path)])
    train.REGIMES["authors + warm start"]["pretrain_epochs"] = 1      # tiny warm start
    try:
        results, report = train.study(args, d, torch.device("cpu"))
        n_runs = len(list((tmp_path / "runs").glob("*.json")))
        again, report_again = train.study(args, d, torch.device("cpu"))
    finally:
        train.REGIMES["authors + warm start"]["pretrain_epochs"] = 5
    out = capsys.readouterr().out
    rows = 3 * 5 * 2 + 2 * 2 * 2                        # regimes x rows x seeds, + unimodal runs
    assert n_runs == rows and out.count("(kept from an earlier run)") == rows
    assert report_again == report
    for regime, table in report["tables"].items():
        lines = table["markdown"].splitlines()
        assert len(lines) == 2 + 5 and lines[2].startswith("| concat |") and lines[3].startswith("| attention (vanilla)")
        assert table["favoured"] in ("audio", "visual") and " ± " in lines[-1]
        premise = report["premise"][regime]
        assert set(premise["a_unimodal_acc"]) == {"audio", "visual"} and isinstance(premise["d_holds"], bool)
    text = (tmp_path / "study.md").read_text()
    assert text.count("### Regime:") == 3 and "Premise: (a) unimodal acc" in text


def test_bench_reports_a_time_ratio(tiny_npz, capsys):
    args = train.parse_args(["--bench", "--bench-steps", "2", *TINY])
    result = train.bench(args, datasets.load_npz(tiny_npz), torch.device("cpu"), rounds=1)
    assert result["time_ratio"] > 0 and set(result["samples_per_s"]) == {"vanilla", "RollingQ"}
    assert "time ratio RollingQ / vanilla" in capsys.readouterr().out


def torchrun(tiny_npz, out, *args):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(HERE, "train.py"), "--data", tiny_npz, "--rollingq", *TINY, *args,
                             "--device", "cpu", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_torchrun_ranks_roll_identically(tmp_path, tiny_npz):
    r = torchrun(tiny_npz, tmp_path / "ddp", "--epochs", "3", "--max-rolls", "none")
    stdout, stderr = r.communicate(timeout=300)
    assert r.returncode == 0, stderr[-2000:]
    m = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert m["distributed"] == {"world_size": 2, "ranks_agree": True}
    assert [e["rolled"] for e in m["epochs"]] == [True, True, False]           # no roll after the last epoch
    assert sum(line.startswith("epoch ") for line in stdout.splitlines()) == 3   # rank 0 alone prints


def test_torchrun_exits_cleanly_every_time_on_a_loaded_machine(tmp_path, tiny_npz):
    # a shutdown race failed 1 run in 6 with SIGABRT after rank 0 wrote its files; 12 runs, three
    # at a time (a loaded machine), miss a 1-in-6 failure with probability (5/6)^12 = 0.11
    failures = []
    for wave in range(4):
        runs = [torchrun(tiny_npz, tmp_path / f"ddp{wave}{i}", "--epochs", "1") for i in range(3)]
        for r in runs:
            _, stderr = r.communicate(timeout=300)
            if r.returncode != 0:
                failures.append(stderr[-500:])
    assert not failures, failures[0]


def test_readme_snippet_runs_as_written():
    text = open(os.path.join(HERE, "README.md")).read()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "from rollingq import" in b)
    exec(compile(snippet, "README.md", "exec"), {})


def test_plot_without_matplotlib_is_refused_before_any_work(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)       # import matplotlib now fails
    with pytest.raises(train.UsageError, match="--plot needs matplotlib"):
        train.parse_args(["--study", "--plot", "study.png"])


def test_cosine_schedule_warms_up_for_two_and_a_half_epochs_then_decays_to_zero():
    def lrs(schedule):
        args = train.parse_args(["--schedule", schedule, "--lr", "0.1"])
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        sched = train.make_schedule(optimizer, args, steps_per_epoch=10, epochs=10)
        seen = []
        for _ in range(100):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            sched.step()
        return seen
    cosine = lrs("cosine")
    assert math.isclose(cosine[0], 0.1 / 25) and math.isclose(max(cosine), 0.1) and cosine.index(max(cosine)) == 24
    assert all(a < b for a, b in zip(cosine[:24], cosine[1:25])) and all(a >= b for a, b in zip(cosine[24:], cosine[25:]))
    assert cosine[-1] < 1e-3 * 0.1
    assert lrs("constant") == [0.1] * 100


def test_unimodal_run_measures_one_modality_alone(tmp_path, tiny_npz):
    r = cli("--data", tiny_npz, "--unimodal", "visual", *TINY, "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["config"]["unimodal"] == "visual" and set(m["final"]["acc"]) == {"clean", "noise:visual"}
    assert "attention" not in m["final"] and "probe_acc" not in m["final"]
    r = cli("--data", tiny_npz, "--unimodal", "depth")
    assert r.returncode == 2 and r.stderr == "error: --unimodal depth: the data has modalities audio, visual\n"


def test_warm_start_trains_each_encoder_alone_first(tiny_npz):
    m = run_in_process(["--pretrain-epochs", "2", *TINY, "--epochs", "1"], datasets.load_npz(tiny_npz))
    assert set(m["pretrain_train_acc"]) == {"audio", "visual"}
    assert m["pretrain_train_acc"]["audio"] > 0.5                # 4 classes: chance is 0.25


def test_three_modalities_name_the_leader_of_air():
    M = datasets.Modality
    d = datasets.synthetic(seed=0, n_train=128, n_test=64, n_classes=3, modalities=(
        M("audio", 2, 3, 1.0, 0.2), M("video", 3, 2, 0.5, 0.2), M("text", 1, 4, 0.5, 0.2)))
    m = run_in_process([*TINY, "--epochs", "1"], d)
    assert m["final"]["air_leader"] in d.names and m["epochs"][0]["air_leader"] == m["final"]["air_leader"]
    assert m["final"]["air"] >= 0


def test_anatomy_traces_air_and_splits_its_change_into_query_and_key_parts(tiny_npz, capsys):
    args = train.parse_args(["--anatomy", "--max-rolls", "none", *TINY, "--epochs", "3"])
    trace, summary = train.anatomy(args, datasets.load_npz(tiny_npz), torch.device("cpu"), every=2)
    assert [s["roll"] for s in summary] == [1, 2] and "roll 1 after epoch 1" in capsys.readouterr().out
    firsts = [t for i, t in enumerate(trace) if i == 0 or t["rolls"] != trace[i - 1]["rolls"]]
    assert all(t["query_part"] == 0 and t["key_part"] == 0 for t in firsts)   # measured from the roll
    assert all(abs(sum(t["attention"].values()) - 1) < 1e-5 for t in trace)
    assert [t["epoch"] for t in trace] == sorted(t["epoch"] for t in trace) and trace[-1]["epoch"] == 3
