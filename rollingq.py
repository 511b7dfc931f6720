"""RollingQ: a multimodal Transformer whose fusion attention rolls its query.

Reference: H. Ni, Y. Wei, H. Liu, G. Chen, C. Peng, H. Lin, D. Hu, "RollingQ: Reviving the
Cooperation Dynamics in Multimodal Transformer", ICML 2025, arXiv:2506.11465. The authors'
code is GeWu-Lab/RollingQ_ICML2025; this file is an independent implementation.

The finding: in attention fusion the CLS query drifts toward the keys of one modality, that
modality gets most of the attention and so most of the gradient, learns faster, and its keys
align further with the query. RollingQ breaks this cycle: once per epoch it rotates the CLS
query onto an anchor between the modalities' mean keys.

Read top to bottom:
  1. the math, as pure functions: AIR, the anchor, the rotation R;
  2. the model: one Transformer encoder per modality, a fusion attention layer whose CLS
     query is R q (QueryRotation holds R), a classifier on the CLS output and one linear
     probe per modality; Unimodal, one modality alone;
  3. RollingQ, the controller that gathers statistics during training and rolls the query.

In your own model: keep a QueryRotation in your fusion attention layer (its docstring says
the three things RollingQ needs) and a RollingQ beside the training loop.

Notation (per fusion head; with nh heads, each head has its own of everything):
  M           modalities, m = 1..M; modality m has L_m tokens of D_m features, and T_m
              tokens as it leaves its encoder (L_m + 1 with the encoder's own CLS token)
  B, T, C     batch size, tokens in the fusion layer (T = 1 + sum_m T_m), model width
  nh, hs      fusion heads and the width of one head (hs = C / nh)
  q           the CLS query of one sample in the fusion layer, (hs,)
  k̄_m(x)      the mean key of modality m's T_m tokens for sample x, (hs,)
  q̄, K̄_m      q and k̄_m(x) averaged over a set of samples; K̄ stacks the K̄_m, (M, hs)
  k̂_m         the unit mean key K̄_m / |K̄_m|
  AIR         the attention imbalance rate, mean_x [cos(q, k̄_a(x)) - cos(q, k̄_v(x))]
  t           the anchor the mean query is rolled onto
  R           the rotation applied to the CLS query: the layer uses R q instead of q

Depends on torch only: copy this file into your project.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------
# 1. The math


def modality_cosines(query, key_means):
    """cos(q, k̄_m) for each modality m: query (..., d), key_means (..., M, d) -> (..., M)."""
    return F.cosine_similarity(query.unsqueeze(-2), key_means, dim=-1)


def modality_leads(cosines):
    """Each modality's cosine lead over the mean of the others: (..., M) -> (..., M).

    lead_m = cos_m - mean_{j != m} cos_j. For M = 2, lead_0 = cos_0 - cos_1 is the paper's AIR.
    """
    M = cosines.shape[-1]
    total = cosines.sum(-1, keepdim=True)
    return cosines - (total - cosines) / (M - 1)


def air_from_cosines(cosines):
    """AIR from per-modality cosines already averaged over samples: (..., M) -> (...).

    M = 2: cos_0 - cos_1 (> 0: the first modality is favoured, < 0: the second).
    M > 2: the largest lead (always >= 0); leading_modality() says whose it is.
    """
    if cosines.shape[-1] == 2:
        return cosines[..., 0] - cosines[..., 1]
    return modality_leads(cosines).max(-1).values


def leading_modality(cosines):
    """Index of the favoured modality, the one with the largest lead: (..., M) -> (...)."""
    return modality_leads(cosines).argmax(-1)


def attention_imbalance_rate(query, key_means):
    """Attention Imbalance Rate over a set of samples (paper, Sec. 3).

    query (N, ..., hs): the CLS query of each sample; key_means (N, ..., M, hs): the mean key of
    each modality's tokens for each sample. Returns (...): one AIR per head, say.
    """
    # AIR = mean_x [ cos(q, k̄_a(x)) - cos(q, k̄_v(x)) ]: the mean of per-sample cosines
    return air_from_cosines(modality_cosines(query, key_means).mean(0))


def key_gap(key_means):
    """The key distribution gap: 1 - cos between two modalities' mean keys, averaged over the
    pairs of modalities and the heads. key_means (nh, M, hs) -> float: 0 when the modalities'
    keys point the same way, up to 2 when they point opposite ways."""
    K = F.normalize(key_means, dim=-1)                                    # (nh, M, hs) unit mean keys
    sim = K @ K.transpose(-1, -2)                                         # (nh, M, M)
    pairs = torch.triu_indices(sim.shape[-1], sim.shape[-1], offset=1)
    return float((1 - sim[:, pairs[0], pairs[1]]).mean())


class NoAnchor(ValueError):
    """The mean keys point opposite ways, so the weighted sum of them is zero: no anchor t."""


def rolling_target(query_mean, key_means, sigma=0.0, cosines=None):
    """The anchor t the mean query is rolled onto: query_mean q̄ (hs,), key_means K̄ (M, hs) -> (hs,).

    c (M,): `cosines`, the per-sample cosines averaged over samples, whose difference is the
    paper's AIR (RollingQ.step passes them); without them, c_m = cos(q̄, K̄_m), the cosines of
    the means. M = 2 is the paper's formula as written; M > 2: equiangular_anchor, which for
    M = 2 gives the same anchor (tested). sigma > 0 leans toward the less-attended modality.
    """
    if query_mean.dim() != 1 or key_means.dim() != 2 or key_means.shape[1] != query_mean.shape[0]:
        raise ValueError(f"rolling_target expects query_mean (hs,) and key_means (M, hs); "
                         f"got {tuple(query_mean.shape)} and {tuple(key_means.shape)}")
    if key_means.shape[0] < 2:
        raise ValueError(f"rolling_target needs at least 2 modalities, got {key_means.shape[0]}")
    q_bar = query_mean.double()                               # (hs,)
    K_bar = key_means.double()                                # (M, hs)
    if q_bar.norm() == 0 or (K_bar.norm(dim=1) == 0).any():
        raise ValueError("rolling_target got a zero vector: the query and mean keys must be non-zero")
    k_hat = F.normalize(K_bar, dim=1)                         # (M, hs) unit mean keys
    c = modality_cosines(q_bar, K_bar) if cosines is None else cosines.double()   # (M,)
    if len(c) == 2:
        # paper: alpha = (1 + tanh(-sigma * AIR)) / 2, t = alpha k̂_a + (1 - alpha) k̂_v
        air = c[0] - c[1]
        alpha = (1 + torch.tanh(-sigma * air)) / 2
        t = alpha * k_hat[0] + (1 - alpha) * k_hat[1]         # (hs,)
    else:
        t = equiangular_anchor(k_hat, c, sigma)               # (hs,)
    if t.norm() <= 1e-12:
        raise NoAnchor("rolling_target: the mean keys cancel out (opposite directions), there is no anchor")
    # |t| = |q̄|: the roll turns the query, it does not rescale it
    return (t * (q_bar.norm() / t.norm())).to(query_mean.dtype)


def equiangular_anchor(k_hat, cosines, sigma=0.0):
    """The anchor's direction for any number of modalities: k_hat (M, hs) unit mean keys,
    cosines c (M,) -> (hs,), t = sum_m w_m lambda_m k̂_m (not rescaled).

    w = softmax(-2 sigma c) generalises alpha: for M = 2, w_a = sigmoid(-2 sigma (c_a - c_v))
    = (1 + tanh(-sigma * AIR)) / 2. lambda = G⁺1, with G = K̂ K̂ᵀ the Gram matrix of the unit
    mean keys, makes sum_m lambda_m k̂_m the equiangular vector, equally close to every k̂_m
    (for M = 2, lambda_a = lambda_v: t is the paper's anchor up to its length).
    """
    # w = softmax(-2 sigma c); for M = 2, w_a = alpha
    w = torch.softmax(-2.0 * sigma * cosines.to(k_hat.dtype), dim=0)   # (M,)
    # lambda = G⁺1: k̂_m · (sum_j lambda_j k̂_j) = (G lambda)_m = 1 for every m
    gram = k_hat @ k_hat.T                                    # (M, M)
    lam = torch.linalg.pinv(gram) @ torch.ones_like(w)        # (M,)
    return ((w * lam)[:, None] * k_hat).sum(0)                # (hs,)


def rotation_matrix(src, dst):
    """The proper rotation R (d, d) with R src/|src| = dst/|dst| that is the identity on every
    vector orthogonal to both: the rotation in the plane span{src, dst}.

    Not the authors' SVD of dst srcᵀ: that also maps src onto dst, but fixes the rest of the
    space arbitrarily and costs O(d³); the plane rotation is unique and costs O(d²).
    Computed in float64, returned in src's dtype.
    """
    if src.dim() != 1 or src.shape != dst.shape:
        raise ValueError(f"rotation_matrix expects two vectors of the same length d; "
                         f"got shapes {tuple(src.shape)} and {tuple(dst.shape)}")
    d = src.shape[0]
    if d < 2:
        raise ValueError(f"rotation_matrix needs d >= 2 to rotate, got d = {d}")
    x, y = src.double(), dst.double()
    if x.norm() == 0 or y.norm() == 0:
        raise ValueError("rotation_matrix got a zero vector: it has no direction to rotate")
    u = x / x.norm()                                          # (d,) unit source
    v = y / y.norm()                                          # (d,) unit target
    cos_theta = (u @ v).clamp(-1.0, 1.0)
    p = v - cos_theta * u                                     # (d,) in the plane, orthogonal to u
    sin_theta = p.norm()
    eye = torch.eye(d, dtype=torch.float64, device=src.device)
    if sin_theta <= 1e-12:
        if cos_theta > 0:                                     # parallel: nothing to do
            return eye.to(src.dtype)
        # antipodal: any plane through u will do; take the axis least aligned with u
        i = u.abs().argmin()
        p = eye[i] - u[i] * u
        sin_theta = torch.zeros((), dtype=torch.float64, device=src.device)
        cos_theta = -torch.ones((), dtype=torch.float64, device=src.device)
    p = p - (p @ u) * u                                       # re-orthogonalise against u
    p = p / p.norm()                                          # (d,) unit, orthogonal to u
    # R = I + (cos θ - 1)(u uᵀ + p pᵀ) + sin θ (p uᵀ - u pᵀ), so R u = cos θ u + sin θ p = v
    R = (eye + (cos_theta - 1) * (torch.outer(u, u) + torch.outer(p, p))
         + sin_theta * (torch.outer(p, u) - torch.outer(u, p)))
    return R.to(src.dtype)


# ----------------------------------------------------------------------------------------
# 2. The model


@dataclass
class Config:
    modalities: dict                  # name -> (tokens L_m, features D_m), in input order
    n_classes: int
    d_model: int = 64                 # width C of every encoder and of the fusion layer
    n_layers: int = 2                 # Transformer blocks per modality encoder
    n_heads: int = 4                  # heads in the encoder blocks
    fusion_heads: int = 1             # heads nh in the fusion attention (paper: 1)
    fusion: str = "attention"         # "attention" (CLS token attends) or "concat" (static)
    fusion_head: str = "authors"      # "authors" or "prenorm": see MultimodalTransformer
    dropout: float = 0.0              # dropout in the encoder blocks
    fusion_dropout: float = 0.2       # dropout on the fusion attention weights and output (the authors')

    def __post_init__(self):
        self.modalities = {str(m): (int(L), int(D)) for m, (L, D) in dict(self.modalities).items()}
        if len(self.modalities) < 2:
            raise ValueError(f"a multimodal model needs at least 2 modalities, got {len(self.modalities)}")
        if any(L < 1 or D < 1 for L, D in self.modalities.values()):
            raise ValueError(f"every modality needs at least 1 token and 1 feature: {self.modalities}")
        if self.n_classes < 2:
            raise ValueError(f"n_classes must be at least 2 to classify, got {self.n_classes}")
        for name in ("d_model", "n_layers", "n_heads", "fusion_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.fusion not in ("attention", "concat"):
            raise ValueError(f"fusion must be 'attention' or 'concat', got {self.fusion!r}")
        if self.fusion_head not in ("authors", "prenorm"):
            raise ValueError(f"fusion_head must be 'authors' or 'prenorm', got {self.fusion_head!r}")
        for name in ("n_heads", "fusion_heads"):
            if self.d_model % getattr(self, name) != 0:
                raise ValueError(f"d_model = {self.d_model} must be divisible by {name} = {getattr(self, name)}")
        if self.fusion == "attention" and self.d_model // self.fusion_heads < max(2, len(self.modalities)):
            raise ValueError(f"the fusion heads need width d_model / fusion_heads >= 2 to rotate, and >= the number "
                             f"of modalities ({len(self.modalities)}) for an anchor equally close to every mean key; "
                             f"got {self.d_model} / {self.fusion_heads}")
        for name in ("dropout", "fusion_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")


class Attention(nn.Module):
    """Multi-head self-attention: one fused qkv Linear, SDPA, an output projection."""

    def __init__(self, d_model, n_heads, dropout=0.0):
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout                                # SDPA's dropout_p while training
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def project(self, x):                                     # (B, T, C) -> (B, T, 3C): q, k, v of every token
        return self.qkv(x)

    def split(self, x):
        B, T, C = x.shape
        qkv = self.project(x).view(B, T, 3, self.n_heads, C // self.n_heads)   # (B, T, 3, nh, hs)
        return qkv.permute(2, 0, 3, 1, 4)                     # 3 x (B, nh, T, hs)

    def merge(self, y):
        B, nh, T, hs = y.shape
        return self.proj(y.transpose(1, 2).reshape(B, T, nh * hs))  # (B, T, C)

    def forward(self, x):                                     # x: (B, T, C) -> (B, T, C)
        q, k, v = self.split(x)                               # (B, nh, T, hs)
        p = self.dropout if self.training else 0.0
        return self.merge(F.scaled_dot_product_attention(q, k, v, dropout_p=p))


class Block(nn.Module):
    """Pre-norm Transformer block."""

    def __init__(self, d_model, n_heads, dropout=0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model), nn.Dropout(dropout))

    def forward(self, x):                                     # (B, T, C) -> (B, T, C)
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Encoder(nn.Module):
    """One modality: project its features to d_model, add learned positions, run the blocks,
    end with a LayerNorm. With fusion_head "authors" it starts with a CLS token of its own, as
    the authors' ViT encoders do, and that token is the modality's feature; otherwise the
    mean of its tokens is."""

    def __init__(self, n_tokens, n_features, cfg):
        super().__init__()
        self.cls = nn.Parameter(trunc_normal(1, 1, cfg.d_model)) if cfg.fusion_head == "authors" else None
        self.embed = nn.Linear(n_features, cfg.d_model)
        self.pos = nn.Parameter(trunc_normal(1, n_tokens + (self.cls is not None), cfg.d_model))
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_heads, cfg.dropout) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x):                                     # (B, L, D) -> (B, T_m, C), T_m = L (+1: CLS)
        x = self.embed(x)                                     # (B, L, C)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)   # (B, 1 + L, C)
        x = x + self.pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def pool(self, z):                                        # (B, T_m, C) -> (B, C): the modality's feature
        return z[:, 0] if self.cls is not None else z.mean(1)


def authors_init(module):
    """The authors' weight_init, applied to the whole model: every Linear gets xavier_normal
    weights and a zero bias (they then load ImageNet weights into the encoders; ours train)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def trunc_normal(*shape, std=0.02):
    """A parameter's initial value: normal(0, std) cut at +-2, as timm's trunc_normal_ (the authors')."""
    return nn.init.trunc_normal_(torch.empty(shape), std=std)


class QueryRotation(nn.Module):
    """RollingQ's state inside an attention layer: the rotation R of the CLS query, per head.

    What RollingQ needs of an attention layer, yours included:
      1. it holds one QueryRotation(n_heads, head_size);
      2. it attends with the rotated CLS query, q_cls = rotation(q_cls), (B, nh, 1, hs): only
         the CLS row. A layer that computes every token's query (B, nh, T, hs), as one fused
         qkv projection does, rotates its CLS row alone:
         q = torch.cat([rotation(q[:, :, :1]), q[:, :, 1:]], 2); anything but (B, nh, 1, hs)
         is refused;
      3. RollingQ.observe gets that rotated query (B, nh, hs) and each modality's mean key
         (B, nh, M, hs), from the same forward pass.
    RollingQ.step(model) finds the layer by this type among model.modules(), so any model, or
    a DDP / torch.compile wrapper of one, that holds exactly one QueryRotation will do. It
    checks 3: the layer keeps (a reference to) the last query it rotated in each mode, and a
    step whose observed query is neither, such as the unrotated q, is refused. (Tested eager,
    under DDP and torch.compile's default mode; not under CUDA graphs or torch.export.)
    R (nh, hs, hs) and the number of rolls are buffers: they are in state_dict(), never trained,
    and a reloaded model keeps its rotation. (The authors' code keeps the roll counter outside
    the state dict.) R stays float32 (or float64) when the model is cast to bf16 or fp16.
    """

    def __init__(self, n_heads, head_size):
        super().__init__()
        self.register_buffer("R", torch.eye(head_size).repeat(n_heads, 1, 1))   # (nh, hs, hs)
        self.register_buffer("rolls", torch.zeros((), dtype=torch.long))
        self.last = {}                                        # training mode -> last R q, (B, nh, 1, hs), detached

    def forward(self, q):                                     # q: (B, nh, 1, hs) -> R q, (B, nh, 1, hs)
        nh, hs = self.R.shape[0], self.R.shape[2]
        if q.dim() != 4 or tuple(q.shape[1:]) != (nh, 1, hs):
            raise ValueError(f"QueryRotation rotates the CLS query (B, {nh}, 1, {hs}), got {tuple(q.shape)}; for "
                             f"every token's query (B, nh, T, hs) rotate the CLS row alone: "
                             f"torch.cat([rotation(q[:, :, :1]), q[:, :, 1:]], 2)")
        # as a row vector (R q)ᵀ = qᵀ Rᵀ; in float32, even under autocast
        with torch.autocast(q.device.type, enabled=False):
            out = (q.float() @ self.R.float().transpose(-1, -2)).to(q.dtype)
        self.last[self.training] = out.detach()               # a reference, no copy: what step() checks
        return out

    @torch.no_grad()
    def roll(self, rotations):
        """Compose new rotations {head: R_new (hs, hs)} into those heads: R <- R_new R (in float64)."""
        for h, R_new in rotations.items():
            self.R[h] = (R_new.double() @ self.R[h].double()).to(self.R.dtype)
        self.rolls += 1

    def _apply(self, fn, *args, **kwargs):
        # model.half() / .bfloat16() would round R to 8 bits of mantissa: keep it float32 or
        # better (its values as they were), and apply moves to another device as usual
        R = self.R
        super()._apply(fn, *args, **kwargs)
        if self.R.dtype not in (torch.float32, torch.float64):
            self.R = R.to(self.R.device)
        return self


class FusionAttention(Attention):
    """The CLS token attends over [CLS; tokens of modality 1; ...; tokens of modality M]:
        a = softmax(R q kᵀ / sqrt(hs)),  y = dropout(proj(dropout(a) v))
    with q the CLS query and R its rotation (RollingQ). Only the CLS row is computed, the one
    row the classifier reads (the authors compute every row and keep row 0: the same output).
    """

    def __init__(self, d_model, n_heads, spans, dropout=0.0):
        super().__init__(d_model, n_heads)                    # SDPA's dropout unused: the CLS row is written out
        self.spans = spans                                    # [(start, end)] of each modality's tokens
        # P (M, T): row m averages modality m's tokens, so P k stacks the mean keys k̄_m in one product
        P = torch.zeros(len(spans), spans[-1][1])
        for m, (s, e) in enumerate(spans):
            P[m, s:e] = 1.0 / (e - s)
        self.register_buffer("P", P, persistent=False)
        self.register_buffer("member", (P > 0).float().T, persistent=False)   # (T, M): token t is modality m's
        self.rotation = QueryRotation(n_heads, d_model // n_heads)
        # No key bias: b_k adds q·b_k to every logit alike, which the softmax ignores (so its
        # gradient is zero up to rounding), but it would shift every cosine AIR and the anchor
        # are read from. The authors' key bias starts at zero and stays there up to rounding;
        # here it is zero by construction.
        keep = torch.ones(3 * d_model)
        keep[d_model:2 * d_model] = 0.0
        self.register_buffer("bias_keep", keep, persistent=False)   # (3C,): 0 on the key bias
        with torch.no_grad():
            self.qkv.bias[d_model:2 * d_model] = 0.0          # unused: zero, so state_dict says so
        self.attn_drop = nn.Dropout(dropout)                  # on the attention weights, as the authors
        self.drop = nn.Dropout(dropout)                       # on the output, as the authors

    def project(self, x):                                     # (B, T, C) -> (B, T, 3C), k = x W_kᵀ
        return F.linear(x, self.qkv.weight, self.qkv.bias * self.bias_keep)

    def forward(self, x, stats=False):                        # x: (B, T, C), T = 1 + sum T_m -> (B, C)
        q, k, v = self.split(x)                               # (B, nh, T, hs)
        q = self.rotation(q[:, :, :1])                        # (B, nh, 1, hs): RollingQ's R q
        a = (q @ k.transpose(-2, -1) / math.sqrt(k.shape[-1])).softmax(-1)   # (B, nh, 1, T)
        y = self.drop(self.merge(self.attn_drop(a) @ v))[:, 0]               # (B, C)
        extra = {}
        if stats:                                             # detached: statistics, not part of the loss
            P = self.P.to(k.dtype)                            # (M, T)
            extra["query"] = q.detach()[:, :, 0]              # (B, nh, hs), the query in use: R q
            extra["key_means"] = P @ k.detach()               # (B, nh, M, hs): k̄_m(x) = mean of modality m's keys
            # CLS attention mass on each modality's tokens (the rest is on the CLS token itself)
            extra["attention"] = (a.detach() @ self.member.to(a.dtype))[:, :, 0]   # (B, nh, 1, T) @ (T, M) -> (B, nh, M)
        return y, extra


@dataclass
class Output:
    logits: torch.Tensor                                      # (B, n_classes)
    probe_logits: list                                        # M x (B, n_classes), on detached features
    query: Optional[torch.Tensor] = None                      # (B, nh, hs) CLS query R q, if stats
    key_means: Optional[torch.Tensor] = None                  # (B, nh, M, hs) mean key per modality, if stats
    attention: Optional[torch.Tensor] = None                  # (B, nh, M) CLS attention mass, if stats


class MultimodalTransformer(nn.Module):
    """An encoder per modality, then fusion and a linear classifier; one linear probe per
    modality on its detached feature measures that modality's feature quality without changing
    training.

    fusion "attention": a learned CLS token attends over the tokens of every modality in one
    layer (FusionAttention); fusion "concat": the modalities' features are concatenated.
    fusion_head "authors" (their code exactly): every encoder has a CLS token of its own, and
    fusion attends over the encoders' outputs as they are, with no norm and no residual; the
    classifier reads the fusion output's CLS row; every Linear starts from their weight_init
    (authors_init). fusion_head "prenorm" (this project's first
    head): encoders without CLS tokens (mean-pooled features), a LayerNorm before the fusion,
    a residual around it and a final LayerNorm before the classifier.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        C, M = cfg.d_model, len(cfg.modalities)
        self.encoders = nn.ModuleList(Encoder(L, D, cfg) for L, D in cfg.modalities.values())
        self.probes = nn.ModuleList(nn.Linear(C, cfg.n_classes) for _ in range(M))
        if cfg.fusion == "concat":
            self.head = nn.Linear(M * C, cfg.n_classes)
        else:
            spans, start = [], 1                              # token 0 is the fusion CLS token
            for encoder, (L, _) in zip(self.encoders, cfg.modalities.values()):
                end = start + L + (encoder.cls is not None)
                spans.append((start, end))
                start = end
            self.cls = nn.Parameter(trunc_normal(1, 1, C))
            if cfg.fusion_head == "prenorm":
                self.ln, self.ln_f = nn.LayerNorm(C), nn.LayerNorm(C)
            self.fusion = FusionAttention(C, cfg.fusion_heads, spans, cfg.fusion_dropout)
            self.head = nn.Linear(C, cfg.n_classes)
        if cfg.fusion_head == "authors":
            self.apply(authors_init)

    def tokens(self, xs):
        """Check the inputs against cfg.modalities; (B, D_m) is taken as one token (B, 1, D_m)."""
        if not isinstance(xs, (list, tuple)) or len(xs) != len(self.encoders):
            n = len(xs) if isinstance(xs, (list, tuple)) else type(xs).__name__
            raise ValueError(f"expected a list of {len(self.encoders)} modality tensors "
                             f"({', '.join(self.cfg.modalities)}), got {n}")
        out = []
        for (name, (L, D)), x in zip(self.cfg.modalities.items(), xs):
            shape = tuple(x.shape)
            if x.dim() == 2 and L == 1:
                x = x[:, None, :]                             # (B, D) -> (B, 1, D)
            if x.dim() != 3 or tuple(x.shape[1:]) != (L, D) or x.shape[0] != xs[0].shape[0]:
                one = f" or (B, {D})" if L == 1 else ""
                raise ValueError(f"modality {name!r}: expected a tensor (B, {L}, {D}){one} with the same B "
                                 f"as the others, got {shape}")
            out.append(x)
        return out

    def forward(self, xs, stats=False):
        """xs: one tensor (B, L_m, D_m) per modality, in cfg.modalities order; (B, D_m) where
        L_m = 1. stats=True also returns the CLS query, the mean keys and the attention mass."""
        zs = [enc(x) for enc, x in zip(self.encoders, self.tokens(xs))]   # M x (B, T_m, C)
        features = [enc.pool(z) for enc, z in zip(self.encoders, zs)]     # M x (B, C)
        probe_logits = [probe(f.detach()) for probe, f in zip(self.probes, features)]
        if self.cfg.fusion == "concat":
            return Output(self.head(torch.cat(features, -1)), probe_logits)
        x = torch.cat([self.cls.expand(zs[0].shape[0], -1, -1)] + zs, 1)   # (B, T, C)
        if self.cfg.fusion_head == "authors":                 # classifier(fusion(x)[CLS row])
            y, extra = self.fusion(x, stats)                  # (B, C)
            logits = self.head(y)                             # (B, n_classes)
        else:                                                 # classifier(ln_f(x_cls + fusion(ln(x))))
            y, extra = self.fusion(self.ln(x), stats)         # (B, C)
            logits = self.head(self.ln_f(x[:, 0] + y))        # (B, n_classes)
        return Output(logits, probe_logits, **extra)


class Unimodal(nn.Module):
    """One modality alone: an encoder and a linear head on its feature, the unimodal baseline.
    encoder: a new one, or one of a MultimodalTransformer's (to train it alone: a warm start)."""

    def __init__(self, cfg: Config, modality, encoder=None):
        super().__init__()
        if encoder is None:
            encoder = Encoder(*cfg.modalities[modality], cfg)
            if cfg.fusion_head == "authors":                  # as MultimodalTransformer initialises it
                encoder.apply(authors_init)
        self.encoder, self.head = encoder, nn.Linear(cfg.d_model, cfg.n_classes)
        if cfg.fusion_head == "authors":
            self.head.apply(authors_init)

    def forward(self, xs, stats=False):                       # xs: [(B, L, D)] -> logits (B, n_classes)
        return Output(self.head(self.encoder.pool(self.encoder(xs[0]))), [])


# ----------------------------------------------------------------------------------------
# 3. The controller


class RollingQ:
    """Rolls the CLS query of a model's fusion attention (paper, Algorithm 1).

    During training, pass every step's CLS query and mean keys to observe(); no extra pass over
    the data is needed. At the end of each epoch step() does, per fusion head:
      1. the roll condition: AIR of the last batch (the mean of per-sample cosine differences,
         as the authors take it); nothing if |AIR| <= beta or max_rolls is reached;
      2. the anchor t = rolling_target(q̄, K̄, sigma, cosines), with q̄ the mean query of the last
         batch (the query moves during the epoch; the roll must turn the one in use now), K̄ the
         mean keys over the epoch, and the weights from that batch's AIR as the paper's alpha;
         a head whose mean keys point opposite ways has no anchor and is skipped;
      3. R_new = rotation_matrix(q̄, t), composed as R <- R_new R.
    (The authors take the means from an extra pass over the training set after the epoch; we
    use the forward passes training already makes. The keys move during the epoch, so K̄ lags
    the model a little and the next batch's AIR is near 0, not exactly 0. In MultimodalTransformer
    the CLS query is the same for every sample, so q̄ is simply the query in use.) Under
    torch.distributed the statistics are summed over ranks, so every rank rolls at the same
    epoch with the same rotation. The roll count, which max_rolls bounds, counts the epochs at
    which any head rolled.
    """

    def __init__(self, beta=0.0, sigma=0.0, max_rolls=1):
        """beta: AIR threshold; sigma: anchor lean (0: bisector); max_rolls: r_time, None for no limit.
        The defaults are the authors' (beta 0, sigma 0, one roll)."""
        if not (0 <= beta < math.inf and 0 <= sigma < math.inf) or (max_rolls is not None and max_rolls < 0):
            raise ValueError(f"RollingQ needs finite beta >= 0, finite sigma >= 0 and max_rolls >= 0 "
                             f"(or None); got beta {beta}, sigma {sigma}, max_rolls {max_rolls}")
        self.beta, self.sigma, self.max_rolls = beta, sigma, max_rolls
        self.reset()

    def reset(self):
        self.n, self.key_sum = 0, None                        # samples and sum of k̄_m(x) over the epoch
        self.last = None                                      # (q, k̄) of the last batch

    @torch.no_grad()
    def observe(self, query, key_means):
        """Per training step: query (B, nh, hs), the rotated CLS query R q of each sample, and
        key_means (B, nh, M, hs), each modality's mean key. One running sum, no host-device sync."""
        if query is None or key_means is None:
            raise ValueError("RollingQ.observe needs the CLS query and the mean keys: "
                             "the output of model(xs, stats=True)")
        if query.dim() != 3 or key_means.dim() != 4 or key_means.shape[:2] + key_means.shape[3:] != query.shape:
            raise ValueError(f"RollingQ.observe expects query (B, nh, hs) and key_means (B, nh, M, hs); "
                             f"got {tuple(query.shape)} and {tuple(key_means.shape)}")
        if key_means.shape[2] < 2:
            raise ValueError(f"RollingQ.observe needs the mean keys of at least 2 modalities, got {key_means.shape[2]}")
        k_bar = key_means.detach().float()                    # (B, nh, M, hs) k̄_m(x) per sample
        self.last = (query.detach().float(), k_bar)           # (B, nh, hs), (B, nh, M, hs), no graph kept
        self.n += k_bar.shape[0]
        self.key_sum = k_bar.sum(0) if self.key_sum is None else self.key_sum + k_bar.sum(0)   # (nh, M, hs)

    def may_roll(self, model):
        """Whether max_rolls still allows a roll of model's QueryRotation."""
        return self.max_rolls is None or int(query_rotation(model).rolls) < self.max_rolls

    @torch.no_grad()
    def step(self, model):
        """End of epoch: roll where the condition holds. Returns a record of what it did.

        model: anything that holds exactly one QueryRotation: the attention layer itself, the
        model around it, or a DistributedDataParallel / torch.compile wrapper of either."""
        if self.last is None:
            raise ValueError("RollingQ.step: observe() saw no batch since the last step")
        rotation = query_rotation(model)
        q, k_bar = self.last                                  # last batch: (B, nh, hs), (B, nh, M, hs)
        nh, hs = rotation.R.shape[:2]
        if q.shape[1:] != (nh, hs):
            raise ValueError(f"RollingQ observed queries of {q.shape[1]} head(s) of width {q.shape[2]}, but the "
                             f"QueryRotation it found has {nh} head(s) of width {hs}")
        applied = [a.float()[:, :, 0] for a in rotation.last.values()]   # (B, nh, hs) each
        if not applied:
            raise ValueError("RollingQ.step: the QueryRotation was never applied; the attention layer must attend "
                             "with q_cls = rotation(q_cls)")
        # checked on every rank, raised on every rank (a rank that raised alone would hang the others)
        nonfinite = not (torch.isfinite(q).all() and torch.isfinite(k_bar).all() and torch.isfinite(self.key_sum).all())
        unrotated = not any(a.shape == q.shape and torch.equal(a, q) for a in applied)
        q_sum, cos_sum, n_last, key_sum, n, nonfinite, unrotated = sum_over_ranks(
            q.sum(0), modality_cosines(q, k_bar).sum(0), q.shape[0], self.key_sum, self.n, nonfinite, unrotated)
        if nonfinite:
            raise ValueError("RollingQ.step: the observed query or mean keys hold NaN or inf")
        if unrotated:
            raise ValueError("RollingQ.step: the query last given to observe() is not the one the QueryRotation last "
                             "returned; observe the rotated query R q the layer attends with, not q")
        q_bar = q_sum / n_last                                # (nh, hs) mean query of the last batch
        K_bar = key_sum / n                                   # (nh, M, hs) mean keys over the epoch
        cos = cos_sum / n_last                                # (nh, M) per-sample cosines, averaged
        # the roll condition: AIR = mean over samples of cos(q, k̄_a(x)) - cos(q, k̄_v(x))
        air = air_from_cosines(cos)                           # (nh,)
        heads, rotations, skipped = [], {}, []
        if self.may_roll(rotation):
            heads = [h for h in range(len(air)) if abs(float(air[h])) > self.beta]
        for h in heads:
            try:                                              # the anchor t, then R_new with R_new q̄ = t
                t = rolling_target(q_bar[h], K_bar[h], self.sigma, cos[h])
            except NoAnchor:                                  # opposite mean keys: this head waits
                skipped.append(h)
                continue
            rotations[h] = rotation_matrix(q_bar[h], t)
        if rotations:
            rotation.roll(rotations)
        self.reset()
        return {"air": air.tolist(), "rolled": bool(rotations), "rolls": int(rotation.rolls),
                "heads": list(rotations), "skipped": skipped}


def query_rotation(model):
    """The one QueryRotation that `model` holds, found by type among model.modules() (which
    also looks inside DDP and torch.compile wrappers)."""
    found = [m for m in model.modules() if isinstance(m, QueryRotation)] if isinstance(model, nn.Module) else []
    if len(found) != 1:
        raise ValueError(f"RollingQ.step needs a module that holds exactly one QueryRotation (an attention layer "
                         f"that rotates its CLS query, or a model or wrapper around one); "
                         f"got a {type(model).__name__} with {len(found)}")
    return found[0]


def sum_over_ranks(*values):
    """Each tensor or number summed over the ranks of torch.distributed (as is, without it).
    One all_reduce of one flat buffer; returns tensors of the same shapes, in the same order."""
    parts = [torch.as_tensor(v, dtype=torch.float32).to(values[0].device).reshape(-1) for v in values]
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [p.view_as(torch.as_tensor(v)) for p, v in zip(parts, values)]
    flat = torch.cat(parts)
    torch.distributed.all_reduce(flat)
    return [p.view_as(torch.as_tensor(v)) for p, v in zip(flat.split([p.numel() for p in parts]), values)]
