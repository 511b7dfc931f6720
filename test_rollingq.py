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
                      equiangular_anchor, key_gap, modality_cosines, modality_leads, rolling_target,
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


@given(nh=st.integers(1, 4), M=st.integers(2, 5), d=st.integers(2, 32), seed=seeds)
def test_key_gap_is_one_minus_cos_averaged_over_every_head_and_every_pair_of_modalities(nh, M, d, seed):
    K = torch.randn(nh, M, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    gaps = [1 - F.cosine_similarity(K[h, i], K[h, j], dim=0) for h in range(nh) for i in range(M) for j in range(i + 1, M)]
    assert key_gap(K) == pytest.approx(float(torch.stack(gaps).mean()), abs=1e-9)


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


def train_forward(model, xs):
    """A training step's forward (training mode, gradients on): the rotation gathers from it."""
    model.train()
    with torch.enable_grad():
        return model(xs, stats=True)


def test_a_sigma_zero_roll_balances_the_gathered_mean_query_and_so_does_the_next_roll():
    modalities = {"audio": (5, 7), "visual": (3, 4)}
    model = tiny_model(heads=2, modalities=modalities)
    controller = RollingQ(model, beta=0.0, sigma=0.0, max_rolls=None)
    for rolls, xs in enumerate((batch(1, modalities=modalities), batch(2, modalities=modalities)), 1):
        train_forward(model, xs)
        record = controller.step()
        assert record["rolled"] and record["rolls"] == rolls and record["heads"] == [0, 1]
        out = model.eval()(xs, stats=True)
        c = modality_cosines(out.query.mean(0), out.key_means.mean(0))   # (nh, M)
        assert torch.allclose(c[:, 0], c[:, 1], atol=1e-5)      # the mean query is equally close to both mean keys


def test_inside_collecting_an_eval_pass_gives_the_mean_keys_and_the_last_training_batch_the_air():
    model = tiny_model()
    controller = RollingQ(model)
    train_forward(model, batch(0, n=5))
    trained = dict(model.fusion.rotation.sums)
    model.eval()
    with controller.collecting(), torch.no_grad():              # the authors' pass after the epoch
        keys = sum(model(batch(seed, n=7), stats=True).key_means.sum(0) for seed in (1, 2))
    sums = model.fusion.rotation.sums
    assert int(sums["n"]) == 14 and torch.allclose(sums["keys"], keys)   # the pass's 14 samples, not the step's 5
    assert all(torch.equal(sums[k], trained[k]) for k in ("last_n", "last_query", "last_cos"))   # AIR: the step's
    with torch.no_grad():
        model(batch(3))                                         # after it, evaluation gathers nothing again
    assert int(model.fusion.rotation.sums["n"]) == 14 and controller.step()["rolled"]


def test_roll_condition_respects_beta_and_max_rolls():
    model = tiny_model()
    xs = batch(2)
    controller = RollingQ(model, beta=10.0)                     # |AIR| <= 2 < beta: never rolls
    train_forward(model, xs)
    assert controller.step()["rolled"] is False
    controller = RollingQ(model, beta=0.0, max_rolls=2)
    records = []
    for _ in range(4):
        train_forward(model, xs)
        records.append(controller.step())
    assert [r["rolled"] for r in records] == [True, True, False, False]
    assert int(model.fusion.rotation.rolls) == 2


def through(rotation, q, key_means):
    """q (B, nh, hs) and key_means (B, nh, M, hs) handed to a rotation in a training step; returns R q."""
    with torch.enable_grad():
        return rotation.train()(q[:, :, None], key_means)[:, :, 0]


def rotation_and_controller(hs=16, **settings):
    rotation = QueryRotation(1, hs)
    return rotation, RollingQ(rotation, **settings)


def test_the_roll_condition_reads_the_last_batch_not_the_epoch():
    e = torch.eye(16)
    q = e[0].expand(4, 1, 16)                                   # (B, nh, hs)
    leaning = torch.stack([e[0], e[1]])[None, None].expand(4, 1, 2, 16)   # AIR = cos(q, e0) - cos(q, e1) = 1
    level = torch.stack([e[0] + e[1], e[0] + e[1]])[None, None].expand(4, 1, 2, 16)   # AIR = 0
    for batches, rolls in (((leaning, level), False), ((level, leaning), True)):
        rotation, controller = rotation_and_controller(beta=0.5)
        for keys in batches:
            through(rotation, q, keys)
        assert controller.step()["rolled"] is rolls


def test_no_roll_when_the_absolute_air_equals_beta():
    e = torch.eye(16)
    keys = torch.stack([e[0], e[1]])[None, None].expand(4, 1, 2, 16)
    for q, beta in ((e[0] + e[1], 0.0), (e[0], 1.0)):           # AIR exactly 0, and exactly 1
        rotation, controller = rotation_and_controller(beta=beta)
        through(rotation, q.expand(4, 1, 16), keys)
        record = controller.step()
        assert record["air"] == [beta] and record["rolled"] is False   # the paper: roll only if |AIR| > beta


def test_the_anchor_uses_the_epochs_mean_keys_and_the_last_batchs_query():
    rotation, controller = rotation_and_controller()
    g = torch.Generator().manual_seed(0)
    keys = [torch.randn(1, 1, 2, 16, generator=g).expand(4, 1, 2, 16) for _ in range(3)]   # one per step
    for k in keys:
        q = torch.randn(4, 1, 16, generator=g)
        through(rotation, q, k)
    controller.step()
    K_epoch = torch.stack(keys).mean(0)[0, 0]                   # (M, hs): the epoch's mean keys
    c = modality_cosines(rotation.R[0] @ q.mean(0)[0], K_epoch)
    assert torch.allclose(c[0], c[1], atol=1e-5)                # the last batch's query, balanced on them
    c_last = modality_cosines(rotation.R[0] @ q.mean(0)[0], keys[-1][0, 0])
    assert not torch.allclose(c_last[0], c_last[1], atol=1e-3)  # not on the last batch's keys


def test_the_sums_start_afresh_after_every_step_rolled_or_not():
    rotation, controller = rotation_and_controller(beta=0.5, max_rolls=None)
    e = torch.eye(16)
    q = e[0].expand(4, 1, 16)
    leaning = torch.stack([e[0], e[1]])[None, None].expand(4, 1, 2, 16)   # AIR = 1
    through(rotation, q, leaning)
    assert controller.step()["rolled"] and rotation.sums is None
    through(rotation, q, leaning)
    before = rotation.sums["n"].item()
    controller.step()
    assert before == 4 and rotation.sums is None
    with pytest.raises(ValueError, match="gathered nothing since its last step"):
        controller.step()


def test_a_layer_that_scales_q_before_the_rotation_rolls_as_one_that_does_not():
    g = torch.Generator().manual_seed(3)
    q, keys = torch.randn(4, 1, 16, generator=g), torch.randn(4, 1, 2, 16, generator=g)
    rotations = []
    for scale in (1.0, 16 ** -0.5):                             # q, and timm's q * scale
        rotation, controller = rotation_and_controller()
        through(rotation, q * scale, keys)
        assert controller.step()["rolled"]
        rotations.append(rotation.R)
    assert torch.allclose(*rotations, atol=1e-6)                # AIR, the anchor and R ignore the scale


def test_a_head_without_anchor_waits_instead_of_failing():
    rotation, controller = rotation_and_controller(max_rolls=None)
    k = torch.randn(16)
    keys = torch.stack([k, -k])[None, None].expand(4, 1, 2, 16)  # (B, nh, M, hs): opposite mean keys
    through(rotation, torch.randn(4, 1, 16), keys)
    record = controller.step()
    assert record["rolled"] is False and record["skipped"] == [0] and int(rotation.rolls) == 0


def test_any_other_error_in_a_roll_is_raised_not_taken_for_a_missing_anchor(monkeypatch):
    import rollingq

    def broken(src, dst):
        raise ValueError("a shape bug")
    monkeypatch.setattr(rollingq, "rotation_matrix", broken)
    model = tiny_model()
    controller = RollingQ(model)
    train_forward(model, batch(0))
    with pytest.raises(ValueError, match="a shape bug"):
        controller.step()


def test_heads_roll_independently():
    model = tiny_model(heads=2)
    xs = batch(3)
    out = model.eval()(xs, stats=True)
    air = attention_imbalance_rate(modality_cosines(out.query, out.key_means).mean(0))   # (nh,)
    assert air[0].abs() != air[1].abs()
    beta = float(air.abs().mean())                               # between the two heads' |AIR|
    controller = RollingQ(model, beta=beta)
    train_forward(model, xs)
    record = controller.step()
    rolled = [h for h in range(2) if abs(float(air[h])) > beta]
    assert record["heads"] == rolled and len(rolled) == 1
    R = model.fusion.rotation.R
    assert torch.equal(R[1 - rolled[0]], torch.eye(8)) and not torch.equal(R[rolled[0]], torch.eye(8))


def rolled_model(heads=2, head="authors", seed=4):
    model = tiny_model(heads=heads, head=head)
    controller = RollingQ(model)
    train_forward(model, batch(seed))
    assert controller.step()["rolled"]
    return model.eval()


@pytest.mark.parametrize("head", HEADS)
def test_state_dict_round_trip_of_a_rolled_model_is_exact(head):
    model, xs = rolled_model(head=head), batch(4)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    reloaded = tiny_model(heads=2, seed=1, head=head).eval()    # other initial weights
    reloaded.load_state_dict(torch.load(buffer, weights_only=True))
    assert int(reloaded.fusion.rotation.rolls) == 1
    assert torch.equal(reloaded(xs).logits, model(xs).logits)
    assert set(model.state_dict()) >= {"fusion.rotation.R", "fusion.rotation.rolls"}
    assert not any("sums" in k for k in model.state_dict())     # what is gathered is not state


def test_controller_and_model_reject_bad_arguments():
    with pytest.raises(ValueError, match="finite beta >= 0"):
        RollingQ(tiny_model(), beta=-1)
    for max_rolls in (1.5, -1, True, "2"):
        with pytest.raises(ValueError, match=f"max_rolls a whole number >= 0 \\(or None\\); .* max_rolls {max_rolls!r}"):
            RollingQ(tiny_model(), max_rolls=max_rolls)
    with pytest.raises(ValueError, match="gathered nothing since its last step"):
        RollingQ(tiny_model()).step()
    with pytest.raises(ValueError, match="n_classes must be at least 2"):
        Config(MODALITIES, 1)
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


def test_under_bf16_autocast_the_rotation_stays_float32_and_a_roll_still_balances():
    model = tiny_model(heads=2, modalities={"audio": (5, 7), "visual": (3, 4)})
    xs = batch(5, n=32, modalities={"audio": (5, 7), "visual": (3, 4)})
    controller = RollingQ(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = train_forward(model, xs)
        F.cross_entropy(out.logits, torch.zeros(32, dtype=torch.long)).backward()
        assert out.logits.dtype == torch.bfloat16 and out.query.dtype == torch.bfloat16
        assert model.cls.grad.dtype == torch.float32 and torch.isfinite(model.cls.grad).all()
        assert controller.step()["rolled"]
        after = model.eval()(xs, stats=True)
    assert model.fusion.rotation.R.dtype == torch.float32
    c = modality_cosines(after.query.float().mean(0), after.key_means.float().mean(0))   # (nh, M)
    assert torch.allclose(c[:, 0], c[:, 1], atol=0.05)         # balanced to bf16 precision


def test_the_rotation_multiplies_in_float32_under_bf16_autocast():
    rotation = QueryRotation(2, 8)
    g = torch.Generator().manual_seed(0)
    rotation.roll({h: rotation_matrix(*torch.randn(2, 8, generator=g)) for h in range(2)})   # R is not I
    q, keys = torch.randn(32, 2, 1, 8, generator=g), torch.randn(32, 2, 2, 8, generator=g)
    exact = q.double() @ rotation.R.double().transpose(-1, -2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got32, got16 = rotation(q, keys), rotation(q.bfloat16(), keys.bfloat16())
    assert got32.dtype == torch.float32 and (got32.double() - exact).abs().max() < 1e-5   # not bf16's 1e-2
    assert torch.equal(got16, (q.bfloat16().float() @ rotation.R.transpose(-1, -2)).bfloat16())


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
    fusion = tiny_model().fusion.train()                        # every token's value the same vector u
    fusion.attn_drop.p, fusion.drop = 0.5, nn.Identity()
    with torch.no_grad():
        fusion.v.weight.zero_()
        fusion.v.bias.normal_()
        fusion.proj.weight.copy_(torch.eye(16))
        fusion.proj.bias.zero_()
    y, _ = fusion(torch.randn(64, 10, 16))                      # (B, C): (sum of the kept weights) u
    assert not torch.allclose(y, y[:1].expand_as(y))            # the weights were dropped...
    assert torch.allclose(F.cosine_similarity(y, fusion.v.bias[None], dim=-1).abs(), torch.ones(64), atol=1e-5)   # ...not v
    with pytest.raises(ValueError, match="fusion_dropout must be in"):
        Config(MODALITIES, 4, fusion_dropout=1.0)


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
    g = torch.Generator().manual_seed(0)
    R_new = [rotation_matrix(*torch.randn(2, 6, generator=g)) for _ in range(3)]
    for R in R_new:
        expected = (R.double() @ rotation.R[0].double()).float()   # the product in float64, rounded once
        assert not torch.equal(expected, R @ rotation.R[0])     # (a float32 product rounds differently)
        rotation.roll({0: R})
        assert torch.equal(rotation.R[0], expected)




def test_the_rotation_takes_the_cls_query_and_the_mean_keys_and_names_the_shapes_it_needs():
    rotation = QueryRotation(2, 8)
    keys = torch.randn(4, 2, 2, 8)
    for shape in ((4, 2, 5, 8), (4, 8), (2, 2, 8), (4, 3, 1, 8), (4, 2, 1, 6)):   # every row, (B, hs), B == nh, ...
        with pytest.raises(ValueError, match=r"rotates the CLS query \(B, 2, 1, 8\), got"):
            rotation(torch.randn(shape), keys)
    for shape in ((4, 2, 8), (4, 1, 2, 8), (3, 2, 2, 8), (4, 2, 2, 6), (4, 3, 2, 8)):   # no M, B == nh, ...
        with pytest.raises(ValueError, match=r"mean key \(B, 2, M, 8\) beside the query .* got"):
            rotation(torch.randn(4, 2, 1, 8), torch.randn(shape))
    with pytest.raises(ValueError, match=r"M >= 2 modalities' mean keys: a query over one modality .* out of scope"):
        rotation(torch.randn(4, 2, 1, 8), torch.randn(4, 2, 1, 8))
    with pytest.raises(TypeError, match="key_means must be a tensor, got list"):
        rotation(torch.randn(4, 2, 1, 8), [k for k in keys.unbind(2)])
    with pytest.raises(TypeError, match="q must be a tensor, got tuple"):
        rotation((1.0,), keys)
    assert rotation(torch.randn(4, 2, 1, 8), keys).shape == (4, 2, 1, 8)


def test_the_gathered_sums_keep_no_autograd_history():
    model = tiny_model()
    RollingQ(model)
    out = train_forward(model, batch(0))
    assert out.logits.grad_fn is not None
    sums = model.fusion.rotation.sums
    assert sums and all(t.grad_fn is None and not t.requires_grad and t.dtype == torch.float32 for t in sums.values())


def test_a_model_that_no_rollingq_rolls_gathers_nothing_in_any_mode():
    model = tiny_model()
    train_forward(model, batch(0))
    with torch.no_grad():
        model.eval()(batch(1))
    assert model.fusion.rotation.sums is None


def test_evaluation_gathers_nothing_in_eval_mode_no_grad_or_inference_mode():
    model = tiny_model()
    RollingQ(model)
    train_forward(model, batch(0))
    rotation = model.fusion.rotation
    gathered = {k: v.clone() for k, v in rotation.sums.items()}
    model.eval()
    model(batch(1))                                             # eval mode, with gradients
    with torch.no_grad():
        model(batch(2))
    with torch.inference_mode():
        model(batch(3))
    model.train()
    with torch.no_grad():                                       # a validation that forgot model.eval()
        model(batch(4))
    assert all(torch.equal(rotation.sums[k], v) for k, v in gathered.items())


def test_validation_of_any_size_between_the_last_training_step_and_step_changes_no_roll():
    records = []
    for validate in (False, True):
        model, xs = tiny_model(), batch(0)
        controller = RollingQ(model)
        train_forward(model, xs)
        if validate:
            with torch.no_grad():
                model.eval()(batch(1, n=70_000))                # more rows than any fingerprint kept
        records.append((controller.step(), model.fusion.rotation.R.clone()))
    assert records[0][0] == records[1][0] and torch.equal(records[0][1], records[1][1])


def test_step_refuses_nan_statistics_and_an_r_that_is_no_rotation():
    rotation, controller = rotation_and_controller()
    through(rotation, torch.randn(4, 1, 16) * float("nan"), torch.randn(4, 1, 2, 16))
    with pytest.raises(ValueError, match="hold NaN or inf"):
        controller.step()
    through(rotation, torch.randn(4, 1, 16), torch.randn(4, 1, 2, 16))
    with torch.no_grad():
        rotation.R.mul_(1.01)
    with pytest.raises(ValueError, match=r"RollingQ.step: QueryRotation.R is not a rotation \(\|R Rᵀ - I\| = 0.02 > 1e-4\)"):
        controller.step()


def test_loading_an_r_that_is_no_rotation_is_refused_and_a_load_drops_what_was_gathered():
    model = rolled_model()
    state = model.state_dict()
    fresh = tiny_model(heads=2)
    RollingQ(fresh)
    train_forward(fresh, batch(0))
    fresh.load_state_dict(state)
    assert fresh.fusion.rotation.sums is None                   # gathered under another R: stale
    state["fusion.rotation.R"] = (state["fusion.rotation.R"] + torch.eye(8)) / 2   # an average of two rotations
    with pytest.raises(ValueError, match="load_state_dict: QueryRotation.R is not a rotation"):
        fresh.load_state_dict(state)


def test_an_ema_that_copies_buffers_keeps_a_rotation_and_one_that_averages_them_is_refused():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    model = tiny_model(heads=2)
    controller = RollingQ(model, max_rolls=None)
    readme = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=False)   # README's recipe
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for seed in range(3):
        train_forward(model, batch(seed))
        assert controller.step()["rolled"]
        readme.update_parameters(model)
        averaged.update_parameters(model)
    assert torch.equal(readme.module.fusion.rotation.R, model.fusion.rotation.R)
    assert int(readme.module.fusion.rotation.rolls) == 3
    tiny_model(heads=2).load_state_dict(readme.module.state_dict())
    with pytest.raises(ValueError, match="QueryRotation.R is not a rotation"):
        tiny_model(heads=2).load_state_dict(averaged.module.state_dict())


class TinyFusion(nn.Module):
    """A user's fusion layer, written without FusionAttention: one head, a learned CLS query
    (input-independent, as in the authors' head) or one from each sample's CLS token, keys of
    each modality's tokens (spans), optionally normalised to a common length (a k-norm)."""

    def __init__(self, width=16, spans=((0, 3), (3, 5)), own_query=False, k_norm=False):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, width))
        self.to_q, self.to_k, self.to_v = nn.Linear(width, width), nn.Linear(width, width, bias=False), \
            nn.Linear(width, width)
        self.rotation = QueryRotation(1, width)                 # what RollingQ finds and rolls
        self.spans, self.own_query, self.k_norm = spans, own_query, k_norm

    def forward(self, tokens):                                  # (B, T, C) -> (B, C), attention (B, T)
        cls = tokens[:, :1] if self.own_query else self.cls.expand(len(tokens), -1, -1)   # (B, 1, C)
        k = self.to_k(tokens)[:, None]                          # (B, 1, T, C)
        if self.k_norm:
            k = 3.0 * F.normalize(k, dim=-1)
        key_means = torch.stack([k[:, :, s:e].mean(2) for s, e in self.spans], 2)   # (B, 1, M, C)
        q = self.rotation(self.to_q(cls)[:, None], key_means)   # (B, 1, 1, C): R q
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(k.shape[-1]), -1)   # (B, 1, 1, T)
        return (a @ self.to_v(tokens)[:, None])[:, 0, 0], a[:, 0, 0]


def fit(model, steps, g, n=8, T=5, micro=1, forwards=1, lr=0.1):
    """Training steps of a TinyFusion on random tokens (a random target), micro-batches accumulated."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        for _ in range(micro):
            for _ in range(forwards):
                y, _ = model(torch.randn(n, T, 16, generator=g))
            y.square().mean().backward()
        optimizer.step()


def expected_roll(rotation, seen):
    """The roll the paper's rule gives from what training steps saw, [(R q (B, nh, hs), k̄ (B, nh, M, hs))]:
    the last batch's mean query and AIR, the epoch's mean keys; head 0, sigma 0."""
    q, k_last = seen[-1]
    K_bar = torch.cat([k for _, k in seen]).mean(0)[0].double()  # (M, hs) every training forward's keys
    air = attention_imbalance_rate(modality_cosines(q, k_last).mean(0))[0]
    target = rolling_target(q.mean(0)[0].double(), K_bar, air)
    return rotation_matrix(q.mean(0)[0].double(), target) @ rotation.R[0].double()


@pytest.mark.parametrize("own_query, micro, forwards", [(False, 1, 1), (True, 1, 1), (True, 1, 2), (True, 4, 1)])
def test_a_users_layer_rolls_with_two_forwards_a_step_accumulation_or_an_input_dependent_query(own_query, micro, forwards):
    torch.manual_seed(0)
    fusion, g = TinyFusion(own_query=own_query), torch.Generator().manual_seed(1)
    controller = RollingQ(fusion, max_rolls=None)
    seen = []                                                   # what each training forward's rotation saw
    fusion.rotation.register_forward_hook(
        lambda m, inputs, rq: seen.append((rq[:, :, 0].detach(), inputs[1].detach())) if torch.is_grad_enabled() else None)
    for epoch in range(3):
        seen.clear()
        fit(fusion, 2, g, micro=micro, forwards=forwards)
        with torch.no_grad():
            fusion.eval()(torch.randn(100, 5, 16, generator=g))  # a validation between steps and the roll
        fusion.train()
        assert len(seen) == 2 * micro * forwards                # every training forward, no validation
        expected = expected_roll(fusion.rotation, seen)
        assert controller.step()["rolls"] == epoch + 1
        assert torch.allclose(fusion.rotation.R[0].double(), expected, atol=1e-5)


def test_the_rolled_users_query_is_balanced_on_the_epochs_mean_keys():
    torch.manual_seed(0)
    fusion, g = TinyFusion(), torch.Generator().manual_seed(0)
    controller = RollingQ(fusion)
    tokens = [torch.randn(8, 5, 16, generator=g) for _ in range(3)]
    for x in tokens:
        fusion(x)
    assert controller.step()["rolled"]
    with torch.no_grad():
        k = fusion.to_k(torch.cat(tokens))                      # (24, T, C)
        K_bar = torch.stack([k[:, s:e].mean(1) for s, e in fusion.spans], 1).mean(0)   # (M, C)
        c = modality_cosines(fusion.rotation.R[0] @ fusion.to_q(fusion.cls)[0, 0], K_bar)
    assert torch.allclose(c[0], c[1], atol=1e-5)


class TwoFusions(nn.Module):
    def __init__(self):
        super().__init__()
        self.fusion_a, self.fusion_b = TinyFusion(), TinyFusion(spans=((0, 2), (2, 5)))

    def forward(self, tokens):
        return self.fusion_a(tokens)[0] + self.fusion_b(tokens)[0], None


def test_a_model_with_two_fusion_layers_rolls_each_with_its_own_controller():
    torch.manual_seed(0)
    model, g = TwoFusions(), torch.Generator().manual_seed(2)
    controllers = [RollingQ(model.fusion_a), RollingQ(model.fusion_b)]   # one per layer, as the contract says
    fit(model, 3, g)
    assert all(c.step()["rolled"] for c in controllers)
    assert int(model.fusion_a.rotation.rolls) == int(model.fusion_b.rotation.rolls) == 1
    assert not torch.allclose(model.fusion_a.rotation.R, model.fusion_b.rotation.R)   # each its own anchor
    with pytest.raises(ValueError, match="one RollingQ per layer, each given its layer"):
        RollingQ(model)


def test_the_controller_names_what_it_needs_when_a_model_has_no_or_two_rotations():
    for model, n in ((nn.Linear(2, 2), 0), (nn.Sequential(TinyFusion(), TinyFusion()), 2), ("a string", 0)):
        with pytest.raises(ValueError, match=f"holds exactly one QueryRotation .* with {n}$"):
            RollingQ(model)


def test_a_disfavoured_modality_gets_more_attention_on_the_same_batch_right_after_a_sigma_zero_roll():
    """A step of the paper's mechanism that follows from a roll with certainty.
    Claim 1 (any keys): with a query the same for every sample (a learned CLS token), let v be
    the modality whose mean key K̄_v is further (in cosine) from q. After a sigma = 0 roll,
    R q points along k̂_a + k̂_v, so cos(R q, K̄_v) = |k̂_a + k̂_v| / 2 >= q̂ · (k̂_a + k̂_v) / 2
    (Cauchy-Schwarz) = (cos_a + cos_v) / 2 > cos_v: v's mean key is strictly closer to the query.
    Claim 2 (one token per modality, keys of one length r: a k-norm; one sample): the logits
    are |q| r cos_m / sqrt(hs), equal after the roll, so v's share of the attention that goes to
    the modalities, sigmoid(l_v - l_a), rises from below 1/2 to exactly 1/2."""
    @given(seed=seeds, B=st.integers(1, 16))
    @settings(max_examples=30)
    def claims(seed, B):
        torch.manual_seed(seed)
        for spans, k_norm, n in ((((0, 3), (3, 5)), False, B), (((0, 1), (1, 2)), True, 1)):
            fusion = TinyFusion(spans=spans, k_norm=k_norm)
            controller = RollingQ(fusion)
            tokens = torch.randn(n, spans[-1][1], 16, generator=torch.Generator().manual_seed(seed))
            with torch.no_grad():
                k = fusion.to_k(tokens)
                K_bar = torch.stack([k[:, s:e].mean(1) for s, e in spans], 1).mean(0).double()   # (M, C)
                q = fusion.to_q(fusion.cls)[0, 0].double()
            before = modality_cosines(q, K_bar)                 # (M,)
            v = int(before.argmin())
            _, a_before = fusion.train()(tokens)                # the training step RollingQ gathers from
            if abs(float(before[0] - before[1])) < 1e-3 or not controller.step()["rolled"]:
                continue                                        # nothing to roll: no claim
            with torch.no_grad():
                _, a_after = fusion.eval()(tokens)
            after = modality_cosines(fusion.rotation.R[0].double() @ q, K_bar)
            assert after[v] > before[v]                         # claim 1
            if k_norm:                                          # claim 2: [a, v] tokens, no CLS token among them
                share_before = a_before[0, v] / a_before[0].sum()
                share_after = a_after[0, v] / a_after[0].sum()
                assert share_before < 0.5 and share_after > share_before and abs(float(share_after) - 0.5) < 1e-4
    claims()


def test_ddp_compile_and_data_parallel_wrappers_are_found_and_run(tmp_path):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        aot_eager = lambda m: torch.compile(m, backend="aot_eager")   # noqa: E731 (inductor: the test below)
        for wrap in (torch.nn.parallel.DistributedDataParallel, aot_eager, nn.DataParallel):
            model = tiny_model()
            wrapped = wrap(model)
            controller = RollingQ(wrapped, max_rolls=None)
            train_forward(wrapped, batch(0))                    # nn.DataParallel on the CPU: the module itself
            assert controller.step()["rolled"]
            with torch.no_grad():
                assert torch.allclose(wrapped.eval()(batch(1)).logits, model(batch(1)).logits, atol=1e-5)
    finally:
        dist.destroy_process_group()


def test_compiled_with_inductor_under_bf16_autocast_it_gathers_rolls_and_uses_the_new_rotation():
    model = tiny_model()
    model.fusion = torch.compile(model.fusion)                  # inductor, the default backend: the layer alone
    controller = RollingQ(model, max_rolls=None)
    for epoch in range(3):                                      # gathers and rolls after a roll too
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = train_forward(model, batch(epoch))
        assert out.query.dtype == torch.bfloat16 and controller.step()["rolls"] == epoch + 1
    R = model.fusion.rotation.R
    assert R.dtype == torch.float32 and torch.allclose(R[0] @ R[0].T, torch.eye(16), atol=1e-5)
    model.fusion.attn_drop.p = model.fusion.drop.p = 0.0        # a training forward, deterministic
    compiled = train_forward(model, batch(5))
    model.eval()
    with torch.no_grad():
        compiled_eval = model(batch(5))
        model.fusion = model.fusion._orig_mod                   # eager, the same weights and R
        assert torch.allclose(compiled_eval.logits, model(batch(5)).logits, atol=1e-5)
    eager = train_forward(model, batch(5))
    assert torch.allclose(compiled.logits, eager.logits, atol=1e-2)   # bf16 forward vs float32
    q = model.fusion.q(model.cls)[0, 0].detach()                # (hs,) the CLS query, one head
    used, rolled = compiled.query.float()[0, 0], model.fusion.rotation.R[0] @ q
    assert (used - rolled).norm() < 0.02 * q.norm() < 0.1 * (used - q).norm()   # R q with the rolled R, not q


def test_inference_export_vmap_meta_init_deepcopy_and_pickle_work_on_a_rolled_model(tmp_path):
    import copy
    import pickle
    model, xs = rolled_model(), batch(6)
    expected = model(xs).logits
    with torch.inference_mode():
        assert torch.equal(model(xs).logits, expected)
    B = torch.export.Dim("B", min=2, max=1024)
    logits_of = Logits(model)                                   # export wants tensors out, not our Output
    exported = torch.export.export(logits_of, (xs,), dynamic_shapes=([{0: B}] * 3,)).module()
    for n in (3, 12, 40):
        x = batch(7, n=n)
        assert torch.allclose(exported(x), model(x).logits, atol=1e-5)
    params = dict(model.state_dict())                           # parameters and buffers, R among them
    chunks = [torch.stack(c) for c in zip(*(batch(s, n=4) for s in range(3)))]   # 3 chunks of 4 per modality
    logits = torch.func.vmap(lambda *x: torch.func.functional_call(model, params, (list(x),)).logits)(*chunks)
    assert torch.allclose(logits[1], model([c[1] for c in chunks]).logits, atol=1e-5)
    with torch.device("meta"):
        meta = tiny_model(heads=2)
    meta.to_empty(device="cpu").load_state_dict(model.state_dict())
    assert torch.equal(meta.eval()(xs).logits, expected)
    ours, theirs = model(xs, stats=True), meta(xs, stats=True)  # the statistics too, not only the logits
    assert torch.equal(ours.key_means, theirs.key_means) and torch.equal(ours.attention, theirs.attention)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(twin(xs).logits, expected) and int(twin.fusion.rotation.rolls) == 1
    assert model.fusion.rotation.sums is None                   # none of it gathered anything


class Logits(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, xs):
        return self.model(xs).logits


def _train_on_rank(rank, store, world, tokens, results, silent=-1):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        fusion = TinyFusion()
        controller = RollingQ(fusion)
        share = slice(rank * len(tokens) // world, (rank + 1) * len(tokens) // world)   # this rank's half
        if rank != silent:                                      # the silent rank trains on nothing
            fusion(tokens[share])
        try:
            record = controller.step()
            torch.save({"R": fusion.rotation.R, "air": record["air"]}, f"{results}.{rank}")
        except ValueError as e:
            torch.save({"error": str(e)}, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_roll_as_one_process_on_the_same_global_batch(tmp_path):
    import torch.multiprocessing as mp
    tokens = torch.randn(8, 5, 16, generator=torch.Generator().manual_seed(0))
    mp.spawn(_train_on_rank, args=(str(tmp_path / "store"), 2, tokens, str(tmp_path / "r")), nprocs=2)
    torch.manual_seed(0)
    fusion = TinyFusion()
    controller = RollingQ(fusion)
    fusion(tokens)
    record = controller.step()
    for rank in range(2):
        got = torch.load(tmp_path / f"r.{rank}", weights_only=True)
        assert torch.allclose(got["R"], fusion.rotation.R, atol=1e-6) and got["air"] == pytest.approx(record["air"], abs=1e-6)
    tokens[-1] = float("nan")                                   # bad tokens on rank 1 only: both ranks raise, none hangs
    mp.spawn(_train_on_rank, args=(str(tmp_path / "store2"), 2, tokens, str(tmp_path / "bad")), nprocs=2)
    for rank in range(2):
        assert "hold NaN or inf" in torch.load(tmp_path / f"bad.{rank}", weights_only=True)["error"]
    mp.spawn(_train_on_rank, args=(str(tmp_path / "store3"), 2, tokens, str(tmp_path / "none"), 1), nprocs=2)
    for rank in range(2):                                       # a rank that trained on nothing: both raise, none hangs
        assert "gathered nothing" in torch.load(tmp_path / f"none.{rank}", weights_only=True)["error"]


def test_ten_thousand_composed_rolls_stay_orthogonal():
    rotation = QueryRotation(1, 16)
    g = torch.Generator().manual_seed(0)
    for _ in range(10_000):
        src, dst = torch.randn(2, 16, generator=g)
        rotation.roll({0: rotation_matrix(src, dst)})
    R = rotation.R[0].double()
    assert rotation.R.dtype == torch.float32 and int(rotation.rolls) == 10_000
    assert (R @ R.T - torch.eye(16, dtype=torch.float64)).abs().max() < 1e-5


# ----------------------------------------------------------------------------------------
# The traps of real training code: what a copier's loop does to R and the statistics


def test_an_r_changed_outside_a_roll_is_refused_at_the_next_forward_unless_it_is_a_rotation():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    model = tiny_model(heads=2)
    controller = RollingQ(model, max_rolls=None)
    copies = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=False)   # copy the buffers
    averages = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for seed in range(2):
        train_forward(model, batch(seed))
        assert controller.step()["rolled"]
        copies.update_parameters(model)
        averages.update_parameters(model)
    with torch.no_grad():
        assert torch.equal(copies.eval()(batch(5)).logits, model.eval()(batch(5)).logits)
        with pytest.raises(ValueError, match=r"QueryRotation.forward: QueryRotation.R is not a rotation"):
            averages.eval()(batch(5))
        model.fusion.rotation.R.copy_(copies.module.fusion.rotation.R)   # in place, the same values: DDP's broadcast
        model(batch(5))
        other = rolled_model().fusion.rotation.R                # another rotation written in: a correct use
        model.fusion.rotation.R.copy_(other)
        model(batch(5))
        model.fusion.rotation.R[1, 0, 0] += 1e-3                # a tiny slip is a slip
        with pytest.raises(ValueError, match=r"QueryRotation.forward: QueryRotation.R is not a rotation"):
            model(batch(5))


def test_reset_parameters_gives_r_identity_and_no_roll_and_an_r_never_set_after_to_empty_is_refused():
    state = rolled_model().state_dict()
    with torch.device("meta"):
        meta = tiny_model(heads=2)
    meta.to_empty(device="cpu")
    with pytest.raises(ValueError, match=r"never set after to_empty\(\) \(raw memory\): load a state dict or call "
                                         r"reset_parameters\(\)"):
        meta(batch(0))
    encoders_only = {k: v for k, v in state.items() if k.startswith("encoders.")}
    meta.load_state_dict(encoders_only, strict=False)           # R not among them: still raw memory
    with pytest.raises(ValueError, match="never set after to_empty"):
        meta(batch(0))
    for module in meta.modules():                               # the usual recipe after to_empty()
        if hasattr(module, "reset_parameters") and module is not meta:
            module.reset_parameters()
    rotation = meta.fusion.rotation
    assert torch.equal(rotation.R, torch.eye(8).repeat(2, 1, 1)) and int(rotation.rolls) == 0
    meta(batch(0))
    meta.load_state_dict(state)                                 # a full load sets it too
    assert int(rotation.rolls) == 1 and torch.equal(rotation.R, state["fusion.rotation.R"])


def test_the_meta_init_model_gathers_and_rolls_as_the_model_it_was_loaded_from():
    model = rolled_model()
    with torch.device("meta"):
        meta = tiny_model(heads=2)
    meta.to_empty(device="cpu").load_state_dict(model.state_dict())
    records = []
    for m in (model, meta):
        controller = RollingQ(m, max_rolls=None)
        m.fusion.attn_drop.p = m.fusion.drop.p = 0.0
        train_forward(m, batch(3))
        records.append((controller.step(), m.fusion.rotation.R.clone()))
    assert records[0][0] == records[1][0] and torch.equal(records[0][1], records[1][1])


def test_a_forward_inside_paused_is_left_out_of_the_statistics():
    records = []
    for auxiliary in (False, True):
        model = tiny_model()
        controller = RollingQ(model)
        train_forward(model, batch(0))
        if auxiliary:
            with controller.paused():                           # a second view in the same step
                train_forward(model, batch(1, n=30))
            assert model.fusion.rotation.gathering              # and gathering goes on after it
        records.append((controller.step(), model.fusion.rotation.R.clone()))
    assert records[0][0] == records[1][0] and torch.equal(records[0][1], records[1][1])


def test_a_reflection_or_a_negative_roll_count_is_refused_at_load():
    model = rolled_model()
    for key, value, message in (
            ("fusion.rotation.R", torch.diag(torch.tensor([-1.0] + [1.0] * 7)).repeat(2, 1, 1), r"R is a reflection \(det -1\)"),
            ("fusion.rotation.rolls", torch.tensor(-5), "rolls must be >= 0, got -5")):
        state = model.state_dict()
        state[key] = value
        with pytest.raises(ValueError, match=f"load_state_dict: QueryRotation.{message}"):
            tiny_model(heads=2).load_state_dict(state)


def test_the_default_controller_rolls_once_as_the_authors_r_time():
    model, xs = tiny_model(), batch(2)
    controller = RollingQ(model)
    rolled = []
    for _ in range(3):
        train_forward(model, xs)
        rolled.append(controller.step()["rolled"])
    assert rolled == [True, False, False]


def test_a_step_at_sigma_above_zero_leans_the_anchor_away_from_the_favoured_modality():
    e = torch.eye(16)
    keys = torch.stack([e[0] + 0.5 * e[2], e[1] + 0.5 * e[2]])[None, None].expand(4, 1, 2, 16)   # (B, nh, M, hs)
    q = (e[0] + 0.2 * e[1]).expand(4, 1, 16)                    # closer to modality 0: AIR > 0
    rotation, controller = rotation_and_controller(sigma=3.0)
    through(rotation, q, keys)
    assert controller.step()["air"][0] > 0.3
    c = modality_cosines(rotation.R[0] @ q[0, 0], keys[0, 0])
    assert c[1] > c[0] + 0.1                                    # leaning to the disfavoured modality 1


def test_a_nearly_parallel_pair_is_still_rotated_exactly():
    u = torch.zeros(8, dtype=torch.float64)
    u[0] = 1.0
    for angle in (1e-9, 1e-6, 1e-4):
        v = u.clone()
        v[3] = angle                                            # an angle of about `angle`, far below 1e-3
        R = rotation_matrix(u, v)
        assert torch.allclose(R @ u, F.normalize(v, dim=0), atol=1e-13, rtol=0)


def test_the_gathered_sums_move_with_the_module():
    rotation, _ = rotation_and_controller()
    through(rotation, torch.randn(4, 1, 16), torch.randn(4, 1, 2, 16))
    rotation.to("meta")
    assert all(v.is_meta for v in rotation.sums.values())


def test_a_loaded_r_is_a_rotation_to_within_1e_4():
    state = QueryRotation(1, 8).state_dict()
    for slip, accepted in ((5e-5, True), (2e-4, False)):
        state["R"] = torch.eye(8)[None] * (1 + slip)            # |R Rᵀ - I| about 2 slip
        if accepted:
            QueryRotation(1, 8).load_state_dict(state)
        else:
            with pytest.raises(ValueError, match="not a rotation"):
                QueryRotation(1, 8).load_state_dict(state)


@given(M=st.integers(3, 6), sigma=st.floats(0.1, 5), seed=seeds)
def test_the_general_anchor_weights_the_unit_mean_keys_by_softmax_of_minus_2_sigma_cos(M, sigma, seed):
    k_hat = torch.linalg.qr(torch.randn(16, M, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0].T
    cos = torch.rand(M, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64) * 2 - 1
    t = equiangular_anchor(k_hat, modality_leads(cos), sigma)   # orthonormal k̂: t · k̂_m is the weight of m
    assert torch.allclose(k_hat @ t, torch.softmax(-2 * sigma * cos, 0), atol=1e-10)


def test_air_for_more_than_two_modalities_is_the_largest_lead_not_the_largest_magnitude():
    cos = torch.tensor([0.5, 0.5, -0.4])                        # leads 0.45, 0.45, -0.9
    assert float(attention_imbalance_rate(cos)) == pytest.approx(0.45)


def _step_on_rank_zero_only(rank, store, results):
    import datetime
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=3))
    try:
        torch.manual_seed(0)
        fusion = TinyFusion()
        controller = RollingQ(fusion)
        fusion(torch.randn(4, 5, 16))
        if rank == 0:                                           # rank 1 never calls step()
            try:
                controller.step()
            except RuntimeError as e:
                torch.save({"error": str(e)}, results)
    finally:
        dist.destroy_process_group()


def test_a_step_on_one_rank_only_fails_with_a_message_that_names_rollingq(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_step_on_rank_zero_only, args=(str(tmp_path / "store"), str(tmp_path / "r")), nprocs=2)
    error = torch.load(tmp_path / "r", weights_only=True)["error"]
    assert error.startswith("RollingQ.step: the all-reduce of the statistics failed; every rank must call step()")
