"""Specification of rollingq.py: the rotation, the anchor, AIR, the model and the controller.

train.py, data.py and the experiments have theirs in tests/.
"""

import io
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from rollingq import (Config, MultimodalTransformer, NoAnchor, QueryRotation, RollingQ, attention_imbalance_rate,
                      equiangular_anchor, key_gap, modality_cosines, modality_leads, query_rotation, rolling_target,
                      rotation_matrix, checked_inputs)

settings.register_profile("default", deadline=None, max_examples=40, derandomize=True)   # the same examples every run: no flaky CI
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


def target(q, K, sigma=0.0):
    """The anchor for mean vectors q (d,), K (M, d), leaning by their own AIR (or leads, M > 2)."""
    c = modality_cosines(q, K)
    return rolling_target(q, K, attention_imbalance_rate(c) if len(K) == 2 else modality_leads(c), sigma)


@given(d=st.integers(2, 256), seed=seeds)
def test_sigma_zero_roll_leaves_the_mean_query_equally_close_to_both_modalities(d, seed):
    q, K = mean_stats(seed, d)
    q_rolled = rotation_matrix(q, target(q, K)) @ q
    c = modality_cosines(q_rolled, K)
    assert abs(float(c[0] - c[1])) < 1e-9                      # AIR of the mean query is 0
    assert math.isclose(float(q_rolled.norm()), float(q.norm()), rel_tol=1e-9)


@given(d=st.integers(2, 256), seed=seeds, sigma=st.floats(0, 20))
def test_after_a_roll_the_favoured_modality_no_longer_leads(d, seed, sigma):
    q, K = mean_stats(seed, d)
    before = float(attention_imbalance_rate(modality_cosines(q, K)))
    q_rolled = rotation_matrix(q, target(q, K, sigma)) @ q
    after = float(attention_imbalance_rate(modality_cosines(q_rolled, K)))
    # the anchor weights the favoured modality by alpha <= 1/2: balanced (sigma 0) or the other side
    assert after * before <= 1e-12


@given(d=st.integers(2, 256), seed=seeds, sigma=st.floats(0, 20))
def test_rolling_target_is_the_papers_tanh_anchor_for_two_modalities(d, seed, sigma):
    q, K = mean_stats(seed, d)
    k_a, k_v = K[0] / K[0].norm(), K[1] / K[1].norm()
    air = float(modality_cosines(q, K)[0] - modality_cosines(q, K)[1])
    alpha = (1 + math.tanh(-sigma * air)) / 2
    t = alpha * k_a + (1 - alpha) * k_v
    expected = t / t.norm() * q.norm()
    assert torch.allclose(rolling_target(q, K, air, sigma), expected, atol=1e-9)


@given(d=st.integers(2, 64), seed=seeds, sigma=st.floats(0, 20))
def test_the_anchor_leans_by_the_air_it_is_given_not_by_the_cosines_of_the_means(d, seed, sigma):
    g = torch.Generator().manual_seed(seed)
    q, K = torch.randn(30, d, generator=g, dtype=torch.float64), torch.randn(30, 2, d, generator=g, dtype=torch.float64)
    air = attention_imbalance_rate(modality_cosines(q, K).mean(0))   # the paper's: mean of per-sample differences
    alpha = (1 + math.tanh(-sigma * float(air))) / 2
    K_bar = K.mean(0)
    t = alpha * K_bar[0] / K_bar[0].norm() + (1 - alpha) * K_bar[1] / K_bar[1].norm()
    got = rolling_target(q.mean(0), K_bar, air, sigma)
    assert torch.allclose(got, t / t.norm() * q.mean(0).norm(), atol=1e-9)


@given(d=st.integers(2, 128), seed=seeds, sigma=st.floats(0, 20))
def test_the_papers_two_modality_anchor_is_the_general_anchor_for_m_2(d, seed, sigma):
    q, K = mean_stats(seed, d)
    k_hat, c = F.normalize(K, dim=1), modality_cosines(q, K)
    general = equiangular_anchor(k_hat, modality_leads(c), sigma)
    assert torch.allclose(target(q, K, sigma), general / general.norm() * q.norm(), atol=1e-9)


@given(M=st.integers(2, 6), d=st.integers(8, 128), seed=seeds)
def test_sigma_zero_anchor_is_equally_close_to_every_mean_key(M, d, seed):
    q, K = mean_stats(seed, d, M)
    t = target(q, K)
    c = modality_cosines(t, K)                                  # (M,)
    assert float((c - c[0]).abs().max()) < 1e-9 and float(c.min()) > 0
    assert math.isclose(float(t.norm()), float(q.norm()), rel_tol=1e-9)


@given(M=st.integers(3, 6), d=st.integers(8, 128), seed=seeds)
def test_a_sigma_zero_roll_leaves_no_lead_for_any_number_of_modalities(M, d, seed):
    q, K = mean_stats(seed, d, M)
    q_rolled = rotation_matrix(q, target(q, K)) @ q
    assert float(attention_imbalance_rate(modality_cosines(q_rolled, K))) < 1e-9


@given(M=st.integers(2, 6), d=st.integers(2, 64), seed=seeds)
def test_modality_leads_sum_to_zero_and_reduce_to_air_for_two(M, d, seed):
    q, K = mean_stats(seed, d, M)
    c = modality_cosines(q, K)                                  # (M,)
    leads = modality_leads(c)
    assert abs(float(leads.sum())) < 1e-9
    if M == 2:
        assert math.isclose(float(leads[0]), float(attention_imbalance_rate(c)), abs_tol=1e-12)
    else:
        assert float(attention_imbalance_rate(c)) >= 0


@given(d=st.integers(2, 64), seed=seeds, scale=st.floats(1e-3, 1e3))
def test_key_gap_is_zero_for_one_direction_two_for_opposite_ones_and_blind_to_scale(d, seed, scale):
    k, other = torch.randn(2, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert abs(key_gap(torch.stack([k, scale * k])[None])) < 1e-9
    assert abs(key_gap(torch.stack([k, -scale * k])[None]) - 2) < 1e-9
    gap = key_gap(torch.stack([k, other])[None])
    assert abs(gap - (1 - float(F.cosine_similarity(k, other, 0)))) < 1e-9
    assert abs(key_gap(torch.stack([scale * k, other])[None]) - gap) < 1e-9


def test_air_is_the_mean_over_samples_of_the_cosine_difference():
    g = torch.Generator().manual_seed(0)
    q, K = torch.randn(50, 8, generator=g), torch.randn(50, 2, 8, generator=g)   # (N, d), (N, M, d)
    per_sample = [torch.cosine_similarity(q[i], K[i, 0], 0) - torch.cosine_similarity(q[i], K[i, 1], 0)
                  for i in range(50)]
    air = attention_imbalance_rate(modality_cosines(q, K).mean(0))
    assert math.isclose(float(air), float(sum(per_sample) / 50), abs_tol=1e-6)


def test_rolling_target_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"\(M, hs\)"):
        rolling_target(torch.ones(3), torch.ones(2, 4), 0.0)
    with pytest.raises(ValueError, match="at least 2 modalities"):
        rolling_target(torch.ones(3), torch.ones(1, 3), 0.0)
    with pytest.raises(ValueError, match="zero vector"):
        rolling_target(torch.zeros(3), torch.ones(2, 3), 0.0)
    with pytest.raises(ValueError, match=r"a number for 2 modalities, each modality's lead .* got shape \(2,\)"):
        rolling_target(torch.ones(3), torch.ones(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match=r"shape \(3,\)\) for 3; got shape \(\)"):
        rolling_target(torch.ones(3), torch.eye(3), 0.5)           # 3 modalities need their leads, not one AIR
    with pytest.raises(TypeError):
        rolling_target(torch.ones(3), torch.ones(2, 3))            # no default: the AIR is always said
    with pytest.raises(NoAnchor, match="cancel out"):
        rolling_target(torch.ones(3), torch.tensor([[1.0, 2.0, 3.0], [-1.0, -2.0, -3.0]]), 0.0)


# ----------------------------------------------------------------------------------------
# The model and the controller

MODALITIES = {"audio": (5, 7), "visual": (3, 4), "text": (1, 6)}
HEADS = ("authors", "prenorm")


def tiny_model(heads=1, seed=0, modalities=MODALITIES, head="authors", **kw):
    torch.manual_seed(seed)
    return MultimodalTransformer(Config(modalities, 4, d_model=16, n_layers=1, fusion_heads=heads, fusion_head=head, **kw))


def batch(seed, n=12, modalities=MODALITIES):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, L, D, generator=g) for L, D in modalities.values()]


def random_roll(model, seed):
    """Roll every fusion head by a random rotation."""
    g = torch.Generator().manual_seed(seed)
    nh, hs, _ = model.fusion.rotation.R.shape
    model.fusion.rotation.roll({h: rotation_matrix(*torch.randn(2, hs, generator=g)) for h in range(nh)})


def fusion_input(model, xs):
    """What the fusion layer attends over: [CLS; the encoders' tokens], (B, T, C)."""
    zs = [enc(x) for enc, x in zip(model.encoders, checked_inputs(model.cfg, xs))]
    return torch.cat([model.cls.expand(len(zs[0]), -1, -1)] + zs, 1)


def cls_attention(fusion, x):
    """The paper's fusion for the CLS row, written out: softmax(R q kᵀ / sqrt(hs)) v, projected."""
    q, k, v = (fusion.heads(f(x)) for f in (fusion.q, fusion.k, fusion.v))   # (B, nh, T, hs)
    q_cls = q[:, :, :1] @ fusion.rotation.R.transpose(-1, -2)   # (B, nh, 1, hs): R q
    a = torch.softmax(q_cls @ k.transpose(-2, -1) / math.sqrt(k.shape[-1]), -1)   # (B, nh, 1, T)
    return fusion.proj((a @ v).transpose(1, 2).flatten(2))[:, 0], a   # (B, C), (B, nh, 1, T)


@given(heads=st.sampled_from([1, 2, 4]), seed=seeds)
def test_the_authors_head_classifies_the_rotated_cls_attention_with_no_norm_or_residual(heads, seed):
    model = tiny_model(heads, seed=seed % 100).eval()
    random_roll(model, seed)
    xs = batch(seed)
    x = fusion_input(model, xs)
    y, _ = cls_attention(model.fusion, x)
    assert torch.allclose(model(xs).logits, model.head(y), atol=1e-5)   # classifier(proj(softmax(R q kᵀ/√hs) v))
    assert not hasattr(model, "ln") and not hasattr(model, "ln_f")
    assert all(enc.cls is not None for enc in model.encoders)   # every encoder has its CLS token...
    assert torch.equal(model(xs).probe_logits[0], model.probes[0](model.encoders[0](xs[0])[:, 0]))  # ...the probes read


@given(heads=st.sampled_from([1, 2, 4]), seed=seeds)
def test_the_prenorm_head_adds_a_residual_between_two_layer_norms(heads, seed):
    model = tiny_model(heads, seed=seed % 100, head="prenorm").eval()
    random_roll(model, seed)
    xs = batch(seed)
    x = fusion_input(model, xs)
    y, _ = cls_attention(model.fusion, model.ln(x))
    assert torch.allclose(model(xs).logits, model.head(model.ln_f(x[:, 0] + y)), atol=1e-5)
    z = model.encoders[1](xs[1])
    assert z.shape[1] == 3 and torch.equal(model(xs).probe_logits[1], model.probes[1](z.mean(1)))   # mean-pooled


@given(heads=st.sampled_from([1, 2, 4]), seed=seeds, head=st.sampled_from(HEADS))
def test_the_rotation_changes_only_the_cls_query(heads, seed, head):
    model = tiny_model(heads, head=head).eval()
    xs = batch(seed)
    before = model(xs, stats=True)
    random_roll(model, seed)
    after = model(xs, stats=True)
    assert torch.equal(after.key_means, before.key_means)      # keys (and so values) untouched
    R = model.fusion.rotation.R                                 # (nh, hs, hs)
    assert torch.allclose(after.query, (R @ before.query.unsqueeze(-1)).squeeze(-1), atol=1e-5)   # q -> R q
    assert not torch.allclose(after.logits, before.logits)


@given(heads=st.sampled_from([1, 2, 4]), seed=seeds, head=st.sampled_from(HEADS))
def test_reported_attention_mass_is_the_cls_row_sdpa_computes(heads, seed, head):
    model = tiny_model(heads, head=head).eval()
    random_roll(model, seed)
    fusion = model.fusion
    x = torch.randn(3, fusion.spans[-1][1], 16, generator=torch.Generator().manual_seed(seed))   # (B, T, C)
    y, extra = fusion(x, stats=True)
    q, k, v = (fusion.heads(f(x)) for f in (fusion.q, fusion.k, fusion.v))   # (B, nh, T, hs)
    q = torch.cat([q[:, :, :1] @ fusion.rotation.R.transpose(-1, -2), q[:, :, 1:]], 2)
    every_row = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)   # (B, T, C)
    assert torch.allclose(y, fusion.proj(every_row)[:, 0], atol=1e-5)
    _, a = cls_attention(fusion, x)
    expected = torch.stack([a[:, :, 0, s:e].sum(-1) for s, e in fusion.spans], -1)
    assert torch.allclose(extra["attention"], expected, atol=1e-6)
    keys = torch.stack([k[:, :, s:e].mean(2) for s, e in fusion.spans], 2)
    assert torch.allclose(extra["key_means"], keys, atol=1e-6)


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


def test_a_sigma_zero_roll_balances_the_observed_mean_query():
    model = tiny_model(heads=2, modalities={"audio": (5, 7), "visual": (3, 4)}).eval()
    xs = batch(1, modalities={"audio": (5, 7), "visual": (3, 4)})
    controller = RollingQ(beta=0.0, sigma=0.0, max_rolls=1)
    out = model(xs, stats=True)
    controller.observe(out.query, out.key_means)
    record = controller.step(model)
    assert record["rolled"] and record["rolls"] == 1 and record["heads"] == [0, 1]
    out = model(xs, stats=True)
    c = modality_cosines(out.query.mean(0), out.key_means.mean(0))   # (nh, M)
    assert torch.allclose(c[:, 0], c[:, 1], atol=1e-5)          # the key gap as the query sees it: closed


def observe(controller, model, xs):
    out = model(xs, stats=True)
    controller.observe(out.query, out.key_means)
    return out


def test_roll_condition_respects_beta_and_max_rolls():
    model = tiny_model().eval()
    xs = batch(2)
    controller = RollingQ(beta=10.0)                            # |AIR| <= 2 < beta: never rolls
    observe(controller, model, xs)
    assert controller.step(model)["rolled"] is False
    controller = RollingQ(beta=0.0, max_rolls=2)
    records = []
    for _ in range(4):
        observe(controller, model, xs)
        records.append(controller.step(model))
    assert [r["rolled"] for r in records] == [True, True, False, False]
    assert int(model.fusion.rotation.rolls) == 2


def rotated(model, q):
    """q (B, nh, hs) through the model's QueryRotation, as its attention layer applies it: R q."""
    return query_rotation(model)(q[:, :, None])[:, :, 0]


def test_the_roll_condition_reads_the_last_batch_not_the_epoch():
    e = torch.eye(16)
    q = e[0].expand(4, 1, 16)                                   # (B, nh, hs)
    leaning = torch.stack([e[0], e[1]])[None, None].expand(4, 1, 2, 16)   # AIR = cos(q, e0) - cos(q, e1) = 1
    level = torch.stack([e[0] + e[1], e[0] + e[1]])[None, None].expand(4, 1, 2, 16)   # AIR = 0
    for batches, rolls in (((leaning, level), False), ((level, leaning), True)):
        model, controller = tiny_model(modalities={"audio": (2, 3), "visual": (2, 3)}), RollingQ(beta=0.5)
        for keys in batches:
            controller.observe(rotated(model, q), keys)
        assert controller.step(model)["rolled"] is rolls


def test_no_roll_when_the_absolute_air_equals_beta():
    e = torch.eye(16)
    keys = torch.stack([e[0], e[1]])[None, None].expand(4, 1, 2, 16)
    for q, beta in ((e[0] + e[1], 0.0), (e[0], 1.0)):           # AIR exactly 0, and exactly 1
        model = tiny_model(modalities={"audio": (2, 3), "visual": (2, 3)})
        controller = RollingQ(beta=beta)
        controller.observe(rotated(model, q.expand(4, 1, 16)), keys)
        record = controller.step(model)
        assert record["air"] == [beta] and record["rolled"] is False   # the paper: roll only if |AIR| > beta


def test_the_anchor_uses_the_epochs_mean_keys_and_the_last_batchs_query():
    model = tiny_model(modalities={"audio": (2, 3), "visual": (2, 3)})
    g = torch.Generator().manual_seed(0)
    keys = [torch.randn(1, 1, 2, 16, generator=g).expand(4, 1, 2, 16) for _ in range(3)]   # one per step
    controller = RollingQ()
    for k in keys:
        q = rotated(model, torch.randn(4, 1, 16, generator=g))
        controller.observe(q, k)
    controller.step(model)
    K_epoch = torch.stack(keys).mean(0)[0, 0]                   # (M, hs): the epoch's mean keys
    c = modality_cosines(model.fusion.rotation.R[0] @ q.mean(0)[0], K_epoch)
    assert torch.allclose(c[0], c[1], atol=1e-5)                # the last batch's query, balanced on them
    c_last = modality_cosines(model.fusion.rotation.R[0] @ q.mean(0)[0], keys[-1][0, 0])
    assert not torch.allclose(c_last[0], c_last[1], atol=1e-3)  # not on the last batch's keys


def test_a_head_without_anchor_waits_instead_of_failing():
    model = tiny_model(modalities={"audio": (2, 3), "visual": (2, 3)})
    q = torch.randn(4, 1, 16)                                   # (B, nh, hs)
    k = torch.randn(16)
    keys = torch.stack([k, -k])[None, None].expand(4, 1, 2, 16)  # (B, nh, M, hs): opposite mean keys
    controller = RollingQ(max_rolls=None)
    controller.observe(rotated(model, q), keys)
    record = controller.step(model)
    assert record["rolled"] is False and record["skipped"] == [0] and int(model.fusion.rotation.rolls) == 0


def test_any_other_error_in_a_roll_is_raised_not_taken_for_a_missing_anchor(monkeypatch):
    import rollingq

    def broken(src, dst):
        raise ValueError("a shape bug")
    monkeypatch.setattr(rollingq, "rotation_matrix", broken)
    model = tiny_model()
    controller = RollingQ()
    observe(controller, model, batch(0))
    with pytest.raises(ValueError, match="a shape bug"):
        controller.step(model)


def test_heads_roll_independently():
    model = tiny_model(heads=2).eval()
    xs = batch(3)
    with torch.no_grad():
        out = model(xs, stats=True)
    air = attention_imbalance_rate(modality_cosines(out.query, out.key_means).mean(0))   # (nh,)
    assert air[0].abs() != air[1].abs()
    beta = float(air.abs().mean())                               # between the two heads' |AIR|
    controller = RollingQ(beta=beta)
    controller.observe(out.query, out.key_means)
    record = controller.step(model)
    rolled = [h for h in range(2) if abs(float(air[h])) > beta]
    assert record["heads"] == rolled and len(rolled) == 1
    R = model.fusion.rotation.R
    assert torch.equal(R[1 - rolled[0]], torch.eye(8)) and not torch.equal(R[rolled[0]], torch.eye(8))


@pytest.mark.parametrize("head", HEADS)
def test_state_dict_round_trip_of_a_rolled_model_is_exact(head):
    model = tiny_model(heads=2, head=head).eval()
    xs = batch(4)
    controller = RollingQ()
    observe(controller, model, xs)
    controller.step(model)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    reloaded = tiny_model(heads=2, seed=1, head=head).eval()    # other initial weights
    reloaded.load_state_dict(torch.load(buffer, weights_only=True))
    assert int(reloaded.fusion.rotation.rolls) == 1
    assert torch.equal(reloaded(xs).logits, model(xs).logits)


def test_controller_and_model_reject_bad_arguments():
    with pytest.raises(ValueError, match="finite beta >= 0"):
        RollingQ(beta=-1)
    with pytest.raises(ValueError, match="observe"):
        RollingQ().step(tiny_model())
    with pytest.raises(ValueError, match="n_classes must be at least 2"):
        Config(MODALITIES, 1)
    with pytest.raises(ValueError, match="stats=True"):
        out = tiny_model()(batch(0))
        RollingQ().observe(out.query, out.key_means)
    with pytest.raises(ValueError, match=r"query \(B, nh, hs\) and key_means \(B, nh, M, hs\) of M >= 2 modalities; got \(4, 8\)"):
        RollingQ().observe(torch.zeros(4, 8), torch.zeros(4, 1, 2, 8))
    controller = RollingQ()
    controller.observe(torch.ones(4, 1, 8), torch.ones(4, 1, 2, 8))
    with pytest.raises(ValueError, match=r"queries of 1 head\(s\) of width 8, .* 1 head\(s\) of width 16"):
        controller.step(tiny_model())
    with pytest.raises(ValueError, match="at least 2 modalities"):
        Config({"audio": (2, 3)}, 2)
    with pytest.raises(ValueError, match="divisible"):
        Config(MODALITIES, 2, d_model=10, n_heads=4)
    with pytest.raises(ValueError, match="fusion_head must be 'authors' or 'prenorm'"):
        Config(MODALITIES, 2, fusion_head="postnorm")
    with pytest.raises(ValueError, match=r">= the number of modalities \(3\)"):
        Config(MODALITIES, 2, d_model=16, fusion_heads=8)          # heads of width 2 for 3 modalities
    with pytest.raises(ValueError, match="3 modality tensors"):
        tiny_model()(batch(0)[:2])


@pytest.mark.parametrize("head", HEADS)
def test_concat_fusion_has_no_attention_layer_and_reads_each_modality_feature(head):
    model = tiny_model(head=head, fusion="concat").eval()
    assert not hasattr(model, "fusion")
    xs = batch(0)
    features = [enc.pool(enc(x)) for enc, x in zip(model.encoders, checked_inputs(model.cfg, xs))]
    assert torch.equal(model(xs).logits, model.head(torch.cat(features, -1)))


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


def test_the_authors_head_has_their_init_separate_projections_of_variance_1_over_c_and_no_key_bias():
    model = tiny_model(modalities={"audio": (5, 7), "visual": (3, 4)})
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in linears if m.bias is not None)
    torch.manual_seed(0)
    wide = MultimodalTransformer(Config({"audio": (2, 3), "visual": (2, 3)}, 4, d_model=128, n_layers=1))
    fusion = wide.fusion
    for projection in (fusion.q, fusion.k, fusion.v):           # the authors' Linear(C, C), xavier_normal: 1/C
        W = projection.weight.detach()
        assert W.shape == (128, 128) and abs(float(W.var()) * 128 - 1) < 0.1
    assert fusion.k.bias is None and fusion.q.bias is not None and fusion.v.bias is not None


def test_fusion_dropout_acts_on_the_attention_weights_and_the_output_in_training_only():
    xs = batch(0)
    for weights, output in ((0.5, 0.0), (0.0, 0.5)):            # each dropout alone
        model = tiny_model(fusion_dropout=0.5)
        model.fusion.attn_drop.p, model.fusion.drop.p = weights, output
        assert not torch.equal(model(xs).logits, model(xs).logits)
        model.eval()
        assert torch.equal(model(xs).logits, model(xs).logits)
    model.fusion.attn_drop.p = model.fusion.drop.p = 0.0
    model.train()
    assert torch.equal(model(xs).logits, model(xs).logits)
    with pytest.raises(ValueError, match="fusion_dropout must be in"):
        Config(MODALITIES, 4, fusion_dropout=1.0)


def test_under_bf16_autocast_the_rotation_stays_float32_and_a_roll_still_balances():
    model = tiny_model(heads=2, modalities={"audio": (5, 7), "visual": (3, 4)})
    xs = batch(5, n=32, modalities={"audio": (5, 7), "visual": (3, 4)})
    controller = RollingQ()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = observe(controller, model, xs)
        F.cross_entropy(out.logits, torch.zeros(32, dtype=torch.long)).backward()
        assert out.logits.dtype == torch.bfloat16 and out.query.dtype == torch.bfloat16
        assert model.cls.grad.dtype == torch.float32 and torch.isfinite(model.cls.grad).all()
        assert controller.step(model)["rolled"]
        after = model(xs, stats=True)
    assert model.fusion.rotation.R.dtype == torch.float32
    c = modality_cosines(after.query.float().mean(0), after.key_means.float().mean(0))   # (nh, M)
    assert torch.allclose(c[:, 0], c[:, 1], atol=0.05)         # balanced to bf16 precision


def test_the_rotation_multiplies_in_float32_under_bf16_autocast():
    rotation = QueryRotation(2, 8)
    g = torch.Generator().manual_seed(0)
    rotation.roll({h: rotation_matrix(*torch.randn(2, 8, generator=g)) for h in range(2)})   # R is not I
    q = torch.randn(32, 2, 1, 8, generator=g)
    exact = q.double() @ rotation.R.double().transpose(-1, -2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got32, got16 = rotation(q), rotation(q.bfloat16())
    assert got32.dtype == torch.float32 and (got32.double() - exact).abs().max() < 1e-5   # not bf16's 1e-2
    assert torch.equal(got16, (q.bfloat16().float() @ rotation.R.transpose(-1, -2)).bfloat16())


def test_casting_the_model_to_bf16_or_fp16_keeps_r_float32_and_25_rolls_orthogonal():
    for cast in (nn.Module.bfloat16, nn.Module.half):
        model = tiny_model(modalities={"audio": (2, 3), "visual": (2, 3)})
        random_roll(model, 0)
        R_before = model.fusion.rotation.R.clone()
        cast(model)
        assert model.fusion.rotation.R.dtype == torch.float32 and torch.equal(model.fusion.rotation.R, R_before)
        assert model.cls.dtype != torch.float32                 # the rest of the model was cast
        for seed in range(1, 25):
            random_roll(model, seed)
        R = model.fusion.rotation.R[0].double()
        assert (R @ R.T - torch.eye(16, dtype=torch.float64)).abs().max() < 1e-5
    model.double()
    assert model.fusion.rotation.R.dtype == torch.float64       # better than float32 is kept


def test_rolls_compose_as_r_new_times_r():
    rotation = QueryRotation(1, 6)
    e = torch.eye(6)
    R1, R2 = rotation_matrix(e[0], e[1]), rotation_matrix(e[1] + e[2], e[3])   # two different planes
    assert not torch.allclose(R2 @ R1, R1 @ R2)
    rotation.roll({0: R1})
    rotation.roll({0: R2})
    assert torch.allclose(rotation.R[0], R2 @ R1, atol=1e-6) and int(rotation.rolls) == 2


def test_the_rotation_takes_the_cls_query_only_and_names_the_shape_it_needs():
    rotation = QueryRotation(2, 8)
    for shape in ((4, 2, 5, 8), (4, 8), (2, 2, 8), (4, 3, 1, 8), (4, 2, 1, 6)):   # every row, (B, hs), B == nh, ...
        with pytest.raises(ValueError, match=r"rotates the CLS query \(B, 2, 1, 8\), got"):
            rotation(torch.randn(shape))
    assert rotation(torch.randn(4, 2, 1, 8)).shape == (4, 2, 1, 8)


def test_observe_keeps_no_autograd_history():
    model = tiny_model()
    out = model(batch(0), stats=False)
    q = out.logits[:, None, :1].expand(-1, 1, 16) * torch.ones(16)   # (B, nh, hs), float32 with a graph
    controller = RollingQ()
    controller.observe(q, torch.stack([q, q * 2], 2))
    assert q.grad_fn is not None
    assert all(t.grad_fn is None and not t.requires_grad for t in (*controller.last_batch, controller.key_sum))


def test_step_refuses_the_unrotated_query_a_rotation_never_applied_and_nan():
    model = tiny_model(modalities={"audio": (2, 3), "visual": (2, 3)})
    xs = batch(0, modalities={"audio": (2, 3), "visual": (2, 3)})
    controller = RollingQ(max_rolls=None)
    for _ in range(2):                                          # rows returned before the roll, R = I: then q = R q
        observe(controller, model, xs)
    controller.step(model)                                      # R is no longer the identity: those rows are stale
    fusion = model.fusion
    q = fusion.heads(fusion.q(fusion_input(model, xs)[:, :1]))[:, :, 0]   # (B, nh, hs): q, not R q
    out = model(xs, stats=True)
    controller.observe(q.detach(), out.key_means)
    with pytest.raises(ValueError, match="not one the QueryRotation returned since its last roll; observe the rotated"):
        controller.step(model)
    fresh = tiny_model(modalities={"audio": (2, 3), "visual": (2, 3)})
    controller.observe(out.query, out.key_means)
    with pytest.raises(ValueError, match="QueryRotation was never applied"):
        controller.step(fresh)
    controller.observe(out.query * float("nan"), out.key_means)
    with pytest.raises(ValueError, match="hold NaN or inf"):
        controller.step(model)
    with pytest.raises(ValueError, match=r"of M >= 2 modalities; got \(12, 1, 16\) and \(12, 1, 1, 16\)"):
        controller.observe(out.query, out.key_means[:, :, :1])


def test_an_evaluation_between_the_last_observe_and_step_is_allowed():
    model = tiny_model()
    controller = RollingQ()
    observe(controller, model, batch(0))                        # training mode
    model.eval()
    with torch.no_grad():
        model(batch(1), stats=True)                             # an evaluation pass, another batch
    model.train()
    assert controller.step(model)["rolled"]


class UserFusion(nn.Module):
    """A user's own fusion layer, written without FusionAttention: it meets RollingQ's contract
    by holding a QueryRotation (here named `spin`) and attending with the rotated CLS query."""

    def __init__(self, width, n_tokens):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.spin = QueryRotation(1, width)
        self.n_tokens = n_tokens                                # tokens of the first modality

    def forward(self, cls, tokens):                             # (B, 1, C), (B, T, C)
        q = self.spin(self.to_q(cls)[:, None])                  # (B, 1, 1, C): R q
        k, v = self.to_k(tokens)[:, None], self.to_v(tokens)[:, None]   # (B, 1, T, C)
        y = F.scaled_dot_product_attention(q, k, v)[:, 0, 0]    # (B, C)
        key_means = torch.stack([k[:, :, :self.n_tokens].mean(2), k[:, :, self.n_tokens:].mean(2)], 2)
        return y, q[:, :, 0].detach(), key_means.detach()       # (B, C), (B, 1, C), (B, 1, 2, C)


class UserModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.mixer = UserFusion(8, n_tokens=3)
        self.out = nn.Linear(8, 2)

    def forward(self, tokens):
        y, q, k = self.mixer(self.cls.expand(len(tokens), -1, -1), tokens)
        return self.out(y), q, k


def test_the_controller_rolls_a_users_own_layer_found_by_type():
    torch.manual_seed(0)
    model = UserModel()
    tokens, y = torch.randn(16, 5, 8), torch.randint(0, 2, (16,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    controller, keys = RollingQ(), []
    for _ in range(3):                                          # an epoch of three steps
        logits, q, k = model(tokens)
        optimizer.zero_grad()
        F.cross_entropy(logits, y).backward()
        optimizer.step()
        controller.observe(q, k)
        keys.append(k)
    assert controller.step(model)["rolled"] and int(model.mixer.spin.rolls) == 1
    K_bar = torch.cat(keys).mean(0)                             # (nh, M, C): the epoch's mean keys
    q_rolled = model.mixer.spin.R[0] @ (q.mean(0)[0])           # the last batch's mean query, rolled
    c = modality_cosines(q_rolled, K_bar[0])
    assert torch.allclose(c[0], c[1], atol=1e-5)                # the user's query was balanced
    _, q, k = model(tokens)                                     # a forward after the roll
    controller.observe(q, k)
    assert controller.step(model.mixer)["rolls"] == 1           # the layer itself will do too (max_rolls 1)


class MyFusion(nn.Module):
    """README's layer: its CLS query depends on the input (here every sample brings its own CLS
    token), so queries of different forwards differ, as they do in most users' models."""

    def __init__(self, width=16, n_audio=3):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(width, width, bias=False), nn.Linear(width, width)
        self.rotation = QueryRotation(n_heads=1, head_size=width)
        self.n_audio = n_audio

    def forward(self, cls, tokens):                             # (B, 1, C), (B, T, C)
        q = self.rotation(self.q(cls)[:, None])                 # (B, 1, 1, C): R q
        k, v = self.k(tokens)[:, None], self.v(tokens)[:, None]   # (B, 1, T, C)
        key_means = torch.stack([k[:, :, :self.n_audio].mean(2), k[:, :, self.n_audio:].mean(2)], 2)
        return F.scaled_dot_product_attention(q, k, v)[:, 0, 0], q[:, :, 0].detach(), key_means.detach()


def inputs(g, n=8):
    return torch.randn(n, 1, 16, generator=g), torch.randn(n, 5, 16, generator=g)   # (B, 1, C), (B, T, C)


def test_two_forwards_per_step_with_the_first_observed_roll_and_the_unrotated_query_is_still_refused():
    torch.manual_seed(0)
    fusion, controller, g = MyFusion(), RollingQ(max_rolls=None), torch.Generator().manual_seed(0)
    for epoch in range(3):
        for _ in range(2):
            _, q, k = fusion(*inputs(g))                        # the view RollingQ observes
            fusion(*inputs(g))                                  # a second forward (another view, a teacher)
            controller.observe(q, k)
        assert controller.step(fusion)["rolls"] == epoch + 1
    cls, tokens = inputs(g)
    _, _, k = fusion(cls, tokens)
    controller.observe(fusion.q(cls).detach(), k)               # q, not R q
    with pytest.raises(ValueError, match="observe the rotated query R q"):
        controller.step(fusion)


def test_observing_only_the_first_micro_batch_of_each_accumulated_step_rolls():
    torch.manual_seed(0)
    fusion, controller, g = MyFusion(), RollingQ(max_rolls=None), torch.Generator().manual_seed(1)
    for epoch in range(3):
        for _ in range(2):                                      # optimiser steps
            for micro in range(4):                              # micro-batches accumulated into one step
                _, q, k = fusion(*inputs(g, n=4))
                if micro == 0:
                    controller.observe(q, k)
        assert controller.step(fusion)["rolls"] == epoch + 1


class TwoFusions(nn.Module):
    def __init__(self):
        super().__init__()
        self.fusion_a, self.fusion_b = MyFusion(), MyFusion(n_audio=2)

    def forward(self, cls, tokens):
        return self.fusion_a(cls, tokens), self.fusion_b(cls, tokens)


def test_a_model_with_two_fusion_layers_rolls_each_with_its_own_controller():
    torch.manual_seed(0)
    model, g = TwoFusions(), torch.Generator().manual_seed(2)
    controllers = {"fusion_a": RollingQ(), "fusion_b": RollingQ()}    # one per layer, as the contract says
    for _ in range(3):
        outputs = dict(zip(controllers, model(*inputs(g))))
        for name, controller in controllers.items():
            controller.observe(*outputs[name][1:])
    records = {name: c.step(getattr(model, name)) for name, c in controllers.items()}
    assert all(r["rolled"] for r in records.values())
    assert int(model.fusion_a.rotation.rolls) == int(model.fusion_b.rotation.rolls) == 1
    assert not torch.allclose(model.fusion_a.rotation.R, model.fusion_b.rotation.R)   # each its own anchor
    controller = RollingQ()
    controller.observe(*model(*inputs(g))[0][1:])
    with pytest.raises(ValueError, match="one RollingQ per layer, each stepping its layer"):
        controller.step(model)


def test_the_controller_names_what_it_needs_when_a_model_has_no_or_two_rotations():
    controller = RollingQ()
    controller.observe(torch.randn(4, 1, 8), torch.randn(4, 1, 2, 8))
    for model, n in ((nn.Linear(2, 2), 0), (nn.Sequential(UserFusion(8, 3), UserFusion(8, 3)), 2), ("a string", 0)):
        with pytest.raises(ValueError, match=f"holds exactly one QueryRotation .* with {n}$"):
            controller.step(model)


def test_step_reaches_the_rotation_through_ddp_and_compile_wrappers(tmp_path):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = tiny_model()
        for wrapped in (torch.nn.parallel.DistributedDataParallel(model), torch.compile(model)):
            controller = RollingQ(max_rolls=None)
            observe(controller, model, batch(0))
            assert controller.step(wrapped)["rolled"]
        assert int(model.fusion.rotation.rolls) == 2
    finally:
        dist.destroy_process_group()


def test_a_compiled_forward_uses_the_new_rotation_after_a_roll():
    model = tiny_model().eval()
    compiled = torch.compile(model, backend="aot_eager")
    xs = batch(0)
    controller = RollingQ(max_rolls=None)
    out = compiled(xs, stats=True)
    controller.observe(out.query, out.key_means)
    assert controller.step(compiled)["rolled"]
    after = compiled(xs, stats=True)
    assert torch.allclose(after.logits, model(xs).logits, atol=1e-6)
    assert not torch.allclose(after.query, out.query, atol=1e-3)   # the rolled query, not a stale one


def _observe_on_rank(rank, store, world, q, k, results, silent=-1):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        rotation, controller = QueryRotation(1, 16), RollingQ()
        share = slice(rank * len(q) // world, (rank + 1) * len(q) // world)   # this rank's half of the batch
        rotated = rotation(q[share][:, :, None])[:, :, 0]
        if rank != silent:                                      # the silent rank observes nothing
            controller.observe(rotated, k[share])
        try:
            record = controller.step(rotation)
            torch.save({"R": rotation.R, "air": record["air"]}, f"{results}.{rank}")
        except ValueError as e:
            torch.save({"error": str(e)}, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_roll_as_one_process_on_the_same_global_batch(tmp_path):
    import torch.multiprocessing as mp
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, 1, 16, generator=g), torch.randn(8, 1, 2, 16, generator=g)
    mp.spawn(_observe_on_rank, args=(str(tmp_path / "store"), 2, q, k, str(tmp_path / "r")), nprocs=2)
    rotation, controller = QueryRotation(1, 16), RollingQ()
    controller.observe(rotation(q[:, :, None])[:, :, 0], k)
    record = controller.step(rotation)
    for rank in range(2):
        got = torch.load(tmp_path / f"r.{rank}", weights_only=True)
        assert torch.allclose(got["R"], rotation.R, atol=1e-6) and got["air"] == pytest.approx(record["air"], abs=1e-6)
    k[-1] = float("nan")                                        # bad keys on rank 1 only: both ranks raise, none hangs
    mp.spawn(_observe_on_rank, args=(str(tmp_path / "store2"), 2, q, k, str(tmp_path / "bad")), nprocs=2)
    for rank in range(2):
        assert "hold NaN or inf" in torch.load(tmp_path / f"bad.{rank}", weights_only=True)["error"]
    mp.spawn(_observe_on_rank, args=(str(tmp_path / "store3"), 2, q, k, str(tmp_path / "none"), 1), nprocs=2)
    for rank in range(2):                                       # a rank that saw no batch: both raise, none hangs
        assert "saw no batch" in torch.load(tmp_path / f"none.{rank}", weights_only=True)["error"]


def test_ten_thousand_composed_rolls_stay_orthogonal():
    rotation = QueryRotation(1, 16)
    g = torch.Generator().manual_seed(0)
    for _ in range(10_000):
        src, dst = torch.randn(2, 16, generator=g)
        rotation.roll({0: rotation_matrix(src, dst)})
    R = rotation.R[0].double()
    assert rotation.R.dtype == torch.float32 and int(rotation.rolls) == 10_000
    assert (R @ R.T - torch.eye(16, dtype=torch.float64)).abs().max() < 1e-5
