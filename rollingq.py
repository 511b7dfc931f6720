"""RollingQ: a multimodal Transformer whose fusion attention rolls its query.

Reference: H. Ni, Y. Wei, H. Liu, G. Chen, C. Peng, H. Lin, D. Hu, "RollingQ: Reviving the
Cooperation Dynamics in Multimodal Transformer", ICML 2025, arXiv:2506.11465. The authors'
code is GeWu-Lab/RollingQ_ICML2025; this file is an independent implementation.

The finding: in attention fusion the CLS query drifts toward the keys of one modality, which
then gets most of the attention and the gradient, learns faster, and pulls the query further.
RollingQ breaks the cycle: once per epoch it rotates the CLS query onto an anchor between the
modalities' mean keys.

Read top to bottom: 1. the method as the paper writes it (AIR, the anchor, the rotation R,
QueryRotation, RollingQ); 2. our extensions (M > 2 modalities, several heads); 3. the checks
and plumbing; 4. the model. In your own model: a QueryRotation in your fusion layer (its
docstring is the contract) and a RollingQ beside the loop. Depends on torch only: copy this file.

Notation (per fusion head; each of nh heads has its own of everything):
  M, m        modalities; modality m has T_m tokens as it leaves its encoder
  B, T, C     batch, tokens in the fusion layer (1 + sum_m T_m), width; hs = C / nh
  q           the CLS query of a sample in the fusion layer, (hs,)
  k̄_m(x)      the mean key of modality m's tokens for sample x, (hs,)
  q̄, K̄_m      their means over samples; k̂_m = K̄_m / |K̄_m| the unit mean key
  AIR         attention imbalance rate, mean_x [cos(q, k̄_a(x)) - cos(q, k̄_v(x))]
  t, R        the anchor the mean query is rolled onto; the rotation: the layer uses R q
"""

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------
# 1. The method, as the paper writes it (two modalities a, v; one head)


def attention_imbalance_rate(cos):
    """The paper's AIR (Sec. 3) from cos (..., M): cos(q, k̄_m(x)) averaged over samples x,
    e.g. modality_cosines(query, key_means).mean(0). Returns (...): one AIR per head, say.
    M = 2: > 0 the first modality is favoured, < 0 the second. (M > 2, ours: the largest lead.)"""
    # AIR = mean_x [cos(q, k̄_a(x)) - cos(q, k̄_v(x))] = cos_a - cos_v, the means taken first
    if cos.shape[-1] == 2:
        return cos[..., 0] - cos[..., 1]
    return modality_leads(cos).max(-1).values


def modality_cosines(query, key_means):
    """cos(q, k̄_m) for each modality m: query (..., hs), key_means (..., M, hs) -> (..., M)."""
    return F.cosine_similarity(query.unsqueeze(-2), key_means, dim=-1)


class NoAnchor(ValueError):
    """The mean keys point opposite ways, so the weighted sum of them is zero: no anchor t."""


def rolling_target(query_mean, key_means, air, sigma=0.0):
    """The anchor t the mean query is rolled onto: q̄ (hs,), K̄ (M, hs) -> t (hs,), |t| = |q̄|.

    air: the AIR the anchor leans by (attention_imbalance_rate's value); sigma = 0: no lean.
    (M > 2, ours: each modality's lead (M,), modality_leads, and equiangular_anchor.)"""
    check_target(query_mean, key_means, air)
    q_bar, k_hat = query_mean.double(), F.normalize(key_means.double(), dim=1)   # (hs,), (M, hs)
    air = torch.as_tensor(air, dtype=torch.float64, device=q_bar.device)
    if len(k_hat) == 2:
        # alpha = (1 + tanh(-sigma * AIR)) / 2;  t = alpha k̂_a + (1 - alpha) k̂_v
        alpha = (1 + torch.tanh(-sigma * air)) / 2
        t = alpha * k_hat[0] + (1 - alpha) * k_hat[1]                    # (hs,)
    else:
        t = equiangular_anchor(k_hat, air, sigma)                        # (hs,) ours
    if t.norm() <= 1e-12:
        raise NoAnchor("rolling_target: the mean keys cancel out (opposite directions), there is no anchor")
    # rescaled to |q̄|: the roll turns the query, it does not stretch it
    return (t * (q_bar.norm() / t.norm())).to(query_mean.dtype)


def rotation_matrix(src, dst):
    """The rotation R (d, d), orthogonal with det +1, with R src/|src| = dst/|dst| and the identity
    on every vector orthogonal to both: the rotation in the plane span{src, dst}. In float64,
    returned in src's dtype. (The authors use an SVD of dst srcᵀ: it maps src onto dst too,
    but fixes the rest of the space arbitrarily, at O(d³); this one is unique and O(d²).)"""
    check_rotation(src, dst)
    u, v = F.normalize(src.double(), dim=0), F.normalize(dst.double(), dim=0)   # (d,) unit vectors
    eye = torch.eye(len(u), dtype=torch.float64, device=src.device)
    cos_theta = (u @ v).clamp(-1.0, 1.0)
    p = v - cos_theta * u                                                # (d,) in the plane, orthogonal to u
    sin_theta = p.norm()
    if sin_theta <= 1e-12:
        if cos_theta > 0:                                                # parallel: nothing to do
            return eye.to(src.dtype)
        i = u.abs().argmin()                                             # antipodal: any plane through u will do
        p, sin_theta, cos_theta = eye[i] - u[i] * u, 0 * sin_theta, -torch.ones_like(cos_theta)
    p = F.normalize(p - (p @ u) * u, dim=0)                              # (d,) unit, orthogonal to u
    # R = I + (cos θ - 1)(u uᵀ + p pᵀ) + sin θ (p uᵀ - u pᵀ), so R u = cos θ u + sin θ p = v
    R = (eye + (cos_theta - 1) * (torch.outer(u, u) + torch.outer(p, p))
         + sin_theta * (torch.outer(p, u) - torch.outer(u, p)))
    return R.to(src.dtype)


class QueryRotation(nn.Module):
    """RollingQ inside an attention layer: R (nh, hs, hs), the rotation of the CLS query, and the
    statistics a roll needs, gathered where R q is made, so no one can hand in the wrong query.
    The contract: your layer holds a QueryRotation(n_heads, head_size) and attends with
    q_cls = rotation(q_cls, key_means): q_cls (B, nh, 1, hs) the CLS row's query (rotate
    q[:, :, :1] of every token's query, concatenate the rest back), key_means (B, nh, M, hs) each
    modality's mean key k̄_m(x) over its own tokens (with nh = M no shape check tells a swap).
    Once a RollingQ rolls it, each training step (training mode, gradients on; not inside
    RollingQ.paused()) adds its R q and mean keys to running sums, plain tensors dropped by a load;
    evaluation only rotates. R and the roll count are buffers, never trained (the authors keep the
    count outside state_dict(): a reloaded model of theirs skips its roll); R stays float32 under
    model.half(). An R changed outside roll() (an EMA that averaged it) or never set after
    to_empty() is refused at the next eager forward; README has the rest of the contract."""

    def __init__(self, n_heads, head_size):
        super().__init__()
        self.register_buffer("R", torch.eye(head_size).repeat(n_heads, 1, 1))   # (nh, hs, hs)
        self.register_buffer("rolls", torch.zeros((), dtype=torch.long))
        self.gathering, self.gathering_in_eval = False, False   # set by RollingQ, its collecting()
        self.sums = None                         # batch_sums added up since the last step
        trust(self)                              # R as the method last set it: forward compares

    @torch.no_grad()
    def reset_parameters(self):
        """R = I and no roll, as built (after to_empty(), say)."""
        self.R.copy_(torch.eye(self.R.shape[-1]).expand_as(self.R))
        self.rolls.zero_()
        self.sums = None
        trust(self)

    def forward(self, q, key_means):                                     # (B, nh, 1, hs), (B, nh, M, hs) -> R q
        check_forward(self, q, key_means)
        # (R q)ᵀ = qᵀ Rᵀ, in float32 even under autocast
        with torch.autocast(q.device.type, enabled=False):
            rq = q.float() @ self.R.float().transpose(-1, -2)            # (B, nh, 1, hs)
        if self.gathering and (self.gathering_in_eval or (self.training and torch.is_grad_enabled())):
            self.sums = added(self.sums, batch_sums(rq[:, :, 0], key_means))
        return rq.to(q.dtype)

    @torch.no_grad()
    def roll(self, rotations):
        """Compose new rotations {head: R_new (hs, hs)} into those heads: R <- R_new R (float64)."""
        for h, R_new in rotations.items():
            self.R[h] = (R_new.double() @ self.R[h].double()).to(self.R.dtype)
        self.rolls += 1
        trust(self)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        super()._load_from_state_dict(state_dict, prefix, *args)
        if prefix + "R" in state_dict:                                   # a loaded R: checked, the sums stale
            loaded(self)

    def _apply(self, fn, *args, **kwargs):           # model.half() would round R: kept float32; the sums move
        R = self.R
        super()._apply(fn, *args, **kwargs)
        if self.R.dtype not in (torch.float32, torch.float64):
            self.R = R.to(self.R.device)
        if self.sums is not None:
            self.sums = {k: v.to(self.R.device) for k, v in self.sums.items()}
        return self


def batch_sums(query, key_means):
    """What one batch adds to a roll's statistics: query (B, nh, hs) R q, key_means (B, nh, M, hs).
    Sums over the batch, float32, detached: its samples, of k̄_m(x) (nh, M, hs) for the epoch's
    mean keys, and, should it be the last batch, of R q (nh, hs) and cos(R q, k̄_m(x)) (nh, M)."""
    q, k_bar = query.detach().float(), key_means.detach().float()        # (B, nh, hs), (B, nh, M, hs)
    n = torch.full((), q.shape[0], dtype=torch.float32, device=q.device)
    return {"n": n, "keys": k_bar.sum(0), "last_n": n, "last_query": q.sum(0),
            "last_cos": modality_cosines(q, k_bar).sum(0)}


def added(sums, batch):
    """The running sums with one more batch: the keys accumulate, the last batch is replaced."""
    if sums is None:
        return batch
    return {**batch, "n": sums["n"] + batch["n"], "keys": sums["keys"] + batch["keys"]}


class RollingQ:
    """Rolls the CLS query of a model's fusion attention (paper, Algorithm 1).

    RollingQ(model) finds the one QueryRotation in model (a layer, a model, a DDP or compile
    wrapper), which from then on gathers in training steps; step() after each epoch but the
    last, on every rank (it all-reduces). No extra pass over the data (the authors': collecting()):
    the means come from the training steps. Defaults are the authors': beta 0, sigma 0, one roll."""

    def __init__(self, model, beta=0.0, sigma=0.0, max_rolls=1):
        """beta: AIR threshold; sigma: the anchor's lean; max_rolls: r_time (None: no limit)."""
        check_settings(beta, sigma, max_rolls)
        self.beta, self.sigma, self.max_rolls = beta, sigma, max_rolls
        self.rotation = query_rotation(model)
        self.rotation.gathering = True

    @torch.no_grad()
    def step(self):
        """End of an epoch: roll each head whose AIR passes the roll condition; returns a record."""
        rotation = self.rotation
        sums = summed_over_ranks(rotation.sums, rotation.R.device)     # what every rank gathered
        check_step(sums, rotation)
        q_bar = sums["last_query"] / sums["last_n"]  # (nh, hs) the last batch's mean query: the one in use now
        K_bar = sums["keys"] / sums["n"]             # (nh, M, hs) the epoch's mean keys
        # AIR of the last batch, as the authors take it: mean_x [cos(q, k̄_a(x)) - cos(q, k̄_v(x))]
        cos = sums["last_cos"] / sums["last_n"]      # (nh, M)
        air = attention_imbalance_rate(cos)          # (nh,)
        lean = air if cos.shape[-1] == 2 else modality_leads(cos)   # M > 2: ours
        rotations, skipped, allowed = {}, [], self.may_roll()
        for h in range(len(air)):                    # each head on its own (several heads: ours)
            # the roll condition: |AIR| > beta and fewer than r_time rolls so far
            if abs(float(air[h])) <= self.beta or not allowed:
                continue
            try:
                t = rolling_target(q_bar[h], K_bar[h], lean[h], self.sigma)   # the anchor
            except NoAnchor:                         # opposite mean keys: this head waits
                skipped.append(h)
                continue
            rotations[h] = rotation_matrix(q_bar[h], t)                  # R_new q̄ = t
        if rotations:
            rotation.roll(rotations)                 # R <- R_new R
        rotation.sums = None                         # the next epoch gathers afresh
        return {"air": air.tolist(), "rolled": bool(rotations), "rolls": int(rotation.rolls),
                "heads": list(rotations), "skipped": skipped}

    def may_roll(self):
        """Whether max_rolls still allows a roll."""
        return self.max_rolls is None or int(self.rotation.rolls) < self.max_rolls

    @contextlib.contextmanager
    def paused(self):
        """Training forwards inside are not gathered: with controller.paused(): model(aux_view)"""
        self.rotation.gathering = False
        try:
            yield
        finally:
            self.rotation.gathering = True

    @contextlib.contextmanager
    def collecting(self):
        """The authors' statistics: forwards inside gather in any mode; their mean keys replace the
        epoch's, AIR and the query stay the last training batch's (else the pass's last). After an epoch:
            with controller.collecting(), torch.no_grad(): for xs in train_batches: model.eval()(xs)"""
        trained, self.rotation.sums, self.rotation.gathering_in_eval = self.rotation.sums, None, True
        try:
            yield
        finally:
            self.rotation.gathering_in_eval = False
            if trained is not None and self.rotation.sums is not None:
                self.rotation.sums.update({k: trained[k] for k in ("last_n", "last_query", "last_cos")})


# ----------------------------------------------------------------------------------------
# 2. Ours, not the paper's: M > 2 modalities (the paper's two-modality formulas are the case
# M = 2, tested), several fusion heads (each head has its own R and rolls on its own AIR), and
# the key gap as one number


def modality_leads(cos):
    """Each modality's lead over the mean of the others, (..., M) -> (..., M); they sum to 0.
    For M = 2 the leads are (AIR, -AIR)."""
    M = cos.shape[-1]
    return cos - (cos.sum(-1, keepdim=True) - cos) / (M - 1)


def equiangular_anchor(k_hat, leads, sigma=0.0):
    """The anchor's direction for M modalities (not rescaled): k_hat (M, hs), leads (M,) -> (hs,).
    t = sum_m w_m lambda_m k̂_m; for M = 2 it is the paper's anchor up to its length (tested)."""
    M = len(k_hat)
    # w = softmax(-2 sigma c), c_m = cos(q, K̄_m); c = (M-1)/M lead + a constant the softmax drops.
    # For M = 2, w_a = sigmoid(-2 sigma AIR) = alpha.
    w = torch.softmax(-2.0 * sigma * (M - 1) / M * leads.to(k_hat.dtype), dim=0)   # (M,)
    # lambda = G⁺1 with G = K̂ K̂ᵀ: k̂_m · sum_j lambda_j k̂_j = 1 for every m, equally close to all
    lam = torch.linalg.pinv(k_hat @ k_hat.T) @ torch.ones_like(w)        # (M,)
    return ((w * lam)[:, None] * k_hat).sum(0)                           # (hs,)


def key_gap(key_means):
    """1 - cos between two modalities' mean keys, averaged over pairs and heads: key_means (nh, M, hs)
    -> float, 0 (same direction) to 2 (opposite). Ours, and only a proxy of the paper's key
    distribution gap: blind to the keys' spread around their means (docs/premise.md)."""
    K = F.normalize(key_means, dim=-1)                                    # (nh, M, hs) unit mean keys
    sim = K @ K.transpose(-1, -2)                                         # (nh, M, M)
    pairs = torch.triu_indices(sim.shape[-1], sim.shape[-1], offset=1)
    return float((1 - sim[:, pairs[0], pairs[1]]).mean())


# ----------------------------------------------------------------------------------------
# 3. The checks, and the plumbing the method calls


def query_rotation(model):
    """The one QueryRotation that `model` holds, found by type (inside DDP and compile wrappers too)."""
    found = [m for m in model.modules() if isinstance(m, QueryRotation)] if isinstance(model, nn.Module) else []
    if len(found) != 1:
        raise ValueError(f"RollingQ needs a module that holds exactly one QueryRotation (with several fusion "
                         f"layers, one RollingQ per layer, each given its layer); got a {type(model).__name__} "
                         f"with {len(found)}")
    return found[0]


def summed_over_ranks(sums, device):
    """The sums of every torch.distributed rank added up; None on every rank if some rank gathered
    nothing, so that all refuse together (one raising alone would hang the others)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return sums
    empty = torch.tensor([float(sums is None)], device=device)
    all_reduced(empty)
    if empty.item():
        return None
    flat = torch.cat([v.reshape(-1) for v in sums.values()])
    all_reduced(flat)
    return {k: part.view_as(v) for (k, v), part in zip(sums.items(), flat.split([v.numel() for v in sums.values()]))}


def all_reduced(x):
    """all_reduce, its failure named: a rank that never calls step() leaves the others waiting."""
    try:
        torch.distributed.all_reduce(x)
    except RuntimeError as e:
        raise RuntimeError(f"RollingQ.step: the all-reduce of the statistics failed; every rank must call step() "
                           f"at the same point (not rank 0 alone): {e}") from e


def loaded(rotation):
    """After load_state_dict: a loaded R must be a rotation, and what was gathered is stale."""
    check_orthogonal(rotation.R, "load_state_dict")
    if int(rotation.rolls) < 0:
        raise ValueError(f"load_state_dict: QueryRotation.rolls must be >= 0, got {int(rotation.rolls)}")
    rotation.sums = None
    trust(rotation)


def trust(rotation):
    """Remember R as the method set it: (id, version, values); None on the meta device (no values)."""
    R = rotation.R
    rotation.trusted = None if R.is_meta else (id(R), R._version, R.detach().clone())


def check_forward(rotation, q, key_means):
    """The shapes, and R: written outside roll() (an EMA, DDP's broadcast, a move), it must equal the
    trusted R or be a rotation. An integer compare if nothing wrote to it; compiled graphs skip it."""
    check_cls_query(q, key_means, rotation.R)
    R, trusted = rotation.R, rotation.trusted
    if torch.compiler.is_compiling() or R.is_meta or R.is_inference():
        return
    if trusted is not None and trusted[0] == id(R) and trusted[1] == R._version:
        return
    if trusted is None:
        raise ValueError("QueryRotation: R and the roll count were never set after to_empty() (raw memory): load a "
                         "state dict or call reset_parameters() first")
    if not torch.equal(R, trusted[2].to(R)):
        check_orthogonal(R, "QueryRotation.forward")
    trust(rotation)


def check_orthogonal(R, where):
    R64 = R.double()
    error = float((R64 @ R64.transpose(-1, -2) - torch.eye(R.shape[-1], dtype=R64.dtype, device=R.device)).abs().max())
    if not error <= 1e-4:
        raise ValueError(f"{where}: QueryRotation.R is not a rotation (|R Rᵀ - I| = {error:.2g} > 1e-4); an average "
                         f"of rotations is none: an EMA must copy R and the roll count, not average them")
    if not bool((torch.linalg.det(R64) > 0).all()):
        raise ValueError(f"{where}: QueryRotation.R is a reflection (det -1), not a rotation (det +1)")


def check_step(sums, rotation):
    if sums is None:
        raise ValueError("RollingQ.step: the QueryRotation gathered nothing since its last step (on some rank); it "
                         "gathers in training mode with gradients on, or inside RollingQ.collecting() (and "
                         "nn.DataParallel's replicas lose it: use DistributedDataParallel)")
    if not all(bool(torch.isfinite(v).all()) for v in sums.values()):
        raise ValueError("RollingQ.step: the gathered query or mean keys hold NaN or inf")
    check_orthogonal(rotation.R, "RollingQ.step")


def check_target(query_mean, key_means, air):
    q, K, air = query_mean, key_means, torch.as_tensor(air)
    if q.dim() != 1 or K.dim() != 2 or K.shape[1] != q.shape[0]:
        raise ValueError(f"rolling_target expects query_mean (hs,) and key_means (M, hs); got {tuple(q.shape)} and "
                         f"{tuple(K.shape)}")
    if len(K) < 2:
        raise ValueError(f"rolling_target needs at least 2 modalities, got {len(K)}")
    if air.numel() != (1 if len(K) == 2 else len(K)):
        raise ValueError(f"rolling_target leans by the AIR: a number for 2 modalities, each modality's lead "
                         f"(modality_leads, shape ({len(K)},)) for {len(K)}; got shape {tuple(air.shape)}")
    if q.norm() == 0 or (K.norm(dim=1) == 0).any():
        raise ValueError("rolling_target got a zero vector: the query and mean keys must be non-zero")


def check_rotation(src, dst):
    if src.dim() != 1 or src.shape != dst.shape or len(src) < 2:
        raise ValueError(f"rotation_matrix expects two vectors of the same length d >= 2; got shapes {tuple(src.shape)} "
                         f"and {tuple(dst.shape)}")
    if src.norm() == 0 or dst.norm() == 0:
        raise ValueError("rotation_matrix got a zero vector: it has no direction to rotate")


def check_cls_query(q, key_means, R):
    nh, hs = R.shape[0], R.shape[2]
    for name, x in (("q", q), ("key_means", key_means)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"QueryRotation: {name} must be a tensor, got {type(x).__name__}")
    if q.dim() != 4 or tuple(q.shape[1:]) != (nh, 1, hs):
        raise ValueError(f"QueryRotation rotates the CLS query (B, {nh}, 1, {hs}), got {tuple(q.shape)}; for "
                         f"every token's query (B, nh, T, hs) rotate the CLS row alone: "
                         f"torch.cat([rotation(q[:, :, :1], key_means), q[:, :, 1:]], 2)")
    if key_means.dim() != 4 or key_means.shape[:2] != q.shape[:2] or key_means.shape[3] != hs:
        raise ValueError(f"QueryRotation needs each modality's mean key (B, {nh}, M, {hs}) beside the query "
                         f"{tuple(q.shape)}; got {tuple(key_means.shape)}")
    if key_means.shape[2] < 2:
        raise ValueError("QueryRotation needs M >= 2 modalities' mean keys: a query over one modality (pure cross "
                         "attention) has no AIR, out of scope for RollingQ")


def check_settings(beta, sigma, max_rolls):
    whole = max_rolls is None or (isinstance(max_rolls, int) and not isinstance(max_rolls, bool) and max_rolls >= 0)
    if not (0 <= beta < math.inf and 0 <= sigma < math.inf) or not whole:
        raise ValueError(f"RollingQ needs finite beta >= 0, finite sigma >= 0 and max_rolls a whole number >= 0 "
                         f"(or None); got beta {beta}, sigma {sigma}, max_rolls {max_rolls!r}")


# ----------------------------------------------------------------------------------------
# 4. The model


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
        check_config(self)


def check_config(cfg):
    M = len(cfg.modalities)
    if M < 2:
        raise ValueError(f"a multimodal model needs at least 2 modalities, got {M}")
    if any(L < 1 or D < 1 for L, D in cfg.modalities.values()):
        raise ValueError(f"every modality needs at least 1 token and 1 feature: {cfg.modalities}")
    if cfg.n_classes < 2:
        raise ValueError(f"n_classes must be at least 2 to classify, got {cfg.n_classes}")
    for name in ("d_model", "n_layers", "n_heads", "fusion_heads"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    for name, allowed in (("fusion", ("attention", "concat")), ("fusion_head", ("authors", "prenorm"))):
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{name} must be {' or '.join(map(repr, allowed))}, got {getattr(cfg, name)!r}")
    for name in ("n_heads", "fusion_heads"):
        if cfg.d_model % getattr(cfg, name) != 0:
            raise ValueError(f"d_model = {cfg.d_model} must be divisible by {name} = {getattr(cfg, name)}")
    if cfg.fusion == "attention" and cfg.d_model // cfg.fusion_heads < max(2, M):
        raise ValueError(f"the fusion heads need width d_model / fusion_heads >= 2 to rotate, and >= the number of "
                         f"modalities ({M}) for an anchor equally close to every mean key; "
                         f"got {cfg.d_model} / {cfg.fusion_heads}")
    for name in ("dropout", "fusion_dropout"):
        if not 0 <= getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be in [0, 1), got {getattr(cfg, name)}")


class Attention(nn.Module):
    """Multi-head self-attention of the encoders: one fused qkv Linear, SDPA, a projection."""

    def __init__(self, d_model, n_heads, dropout=0.0):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x):                                                # (B, T, C) -> (B, T, C)
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)   # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Pre-norm Transformer block."""

    def __init__(self, d_model, n_heads, dropout=0.0):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model), nn.Dropout(dropout))

    def forward(self, x):                                                # (B, T, C) -> (B, T, C)
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Encoder(nn.Module):
    """One modality: its features projected to d_model, learned positions, the blocks, a final
    LayerNorm. With fusion_head "authors" a CLS token of its own leads, as in the authors' ViT
    encoders, and is the modality's feature; otherwise the mean of its tokens is."""

    def __init__(self, n_tokens, n_features, cfg):
        super().__init__()
        self.cls = nn.Parameter(trunc_normal(1, 1, cfg.d_model)) if cfg.fusion_head == "authors" else None
        self.embed = nn.Linear(n_features, cfg.d_model)
        self.pos = nn.Parameter(trunc_normal(1, n_tokens + (self.cls is not None), cfg.d_model))
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_heads, cfg.dropout) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x):                                                # (B, L, D) -> (B, T_m, C), T_m = L (+1: CLS)
        x = self.embed(x)                                                # (B, L, C)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)       # (B, 1 + L, C)
        x = x + self.pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def pool(self, z):                                                   # (B, T_m, C) -> (B, C): the modality's feature
        return z[:, 0] if self.cls is not None else z.mean(1)


def authors_init(module):
    """The authors' weight_init: every Linear gets xavier_normal weights and a zero bias (they then
    load ImageNet weights into the encoders; ours train)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def trunc_normal(*shape, std=0.02):
    """A parameter's initial value as timm's trunc_normal_ (the authors'): normal(0, std) cut at
    ±2 in absolute value, which at std 0.02 is ±100 std: in effect a plain normal."""
    return nn.init.trunc_normal_(torch.empty(shape), std=std)


class FusionAttention(nn.Module):
    """The CLS token attends over [CLS; tokens of modality 1; ...; tokens of modality M]:
        a = softmax(R q kᵀ / sqrt(hs)),  y = dropout(proj(dropout(a) v))
    with q the CLS query and R its rotation. The authors' layer: separate q, k, v projections
    Linear(C, C) (xavier_normal, variance 1/C, under authors_init); the key has no bias (theirs
    starts at zero and gets only rounding-level gradient: it adds the same logit to every
    token). Only the CLS row is computed, the one the classifier reads (the authors compute
    every row and keep row 0: the same output)."""

    def __init__(self, d_model, n_heads, spans, dropout=0.0):
        super().__init__()
        self.n_heads, self.spans = n_heads, spans                       # spans: [(start, end)] per modality
        self.q, self.k, self.v = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model, bias=False), \
            nn.Linear(d_model, d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.rotation = QueryRotation(n_heads, d_model // n_heads)
        self.attn_drop, self.drop = nn.Dropout(dropout), nn.Dropout(dropout)   # as the authors: weights, output

    def averaging(self, T, device):                                      # (M, T): row m averages modality m's tokens
        P = torch.zeros(len(self.spans), T, device=device)
        for m, (s, e) in enumerate(self.spans):
            P[m, s:e] = 1.0 / (e - s)
        return P

    def heads(self, x):                                                  # (B, T, C) -> (B, nh, T, hs)
        B, T, C = x.shape
        return x.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)

    def forward(self, x, stats=False):                                   # x: (B, T, C) -> (B, C)
        k, v = self.heads(self.k(x)), self.heads(self.v(x))              # (B, nh, T, hs)
        P = self.averaging(k.shape[2], k.device)                         # (M, T), derived: nothing to lose in meta init
        key_means = P.to(k.dtype) @ k                                    # (B, nh, M, hs): k̄_m(x)
        q = self.rotation(self.heads(self.q(x[:, :1])), key_means)       # (B, nh, 1, hs): R q, the CLS row
        a = (q @ k.transpose(-2, -1) / math.sqrt(k.shape[-1])).softmax(-1)   # (B, nh, 1, T)
        y = self.drop(self.proj((self.attn_drop(a) @ v).flatten(1)))     # (B, nh, 1, hs) -> (B, C)
        extra = {}
        if stats:                                                        # detached: statistics, not the loss
            extra["query"] = q.detach()[:, :, 0]                         # (B, nh, hs): the query in use, R q
            extra["key_means"] = key_means.detach()                      # (B, nh, M, hs): k̄_m(x)
            # the CLS row's attention on each modality's tokens (the rest is on the CLS token)
            extra["attention"] = (a.detach() @ (P > 0).to(a.dtype).T)[:, :, 0]   # (B, nh, M): on modality m's tokens
        return y, extra


@dataclass
class Output:
    logits: torch.Tensor                                                 # (B, n_classes)
    probe_logits: list                                                   # M x (B, n_classes), on detached features
    query: Optional[torch.Tensor] = None                                 # (B, nh, hs) CLS query R q, if stats
    key_means: Optional[torch.Tensor] = None                             # (B, nh, M, hs) mean key per modality
    attention: Optional[torch.Tensor] = None                             # (B, nh, M) CLS attention mass


class MultimodalTransformer(nn.Module):
    """An encoder per modality, fusion ("attention": a learned CLS token attends over every
    modality's tokens; "concat": the features joined), a linear classifier; a linear probe per
    modality on its detached feature measures the feature's quality and changes nothing.
    fusion_head "authors" (their code): a CLS token per encoder, fusion over the encoders'
    outputs as they are, no norm, no residual, every Linear from authors_init. "prenorm":
    mean-pooled encoders, a LayerNorm before the fusion, a residual and a final LayerNorm."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        C, M = cfg.d_model, len(cfg.modalities)
        self.encoders = nn.ModuleList(Encoder(L, D, cfg) for L, D in cfg.modalities.values())
        self.probes = nn.ModuleList(nn.Linear(C, cfg.n_classes) for _ in range(M))
        if cfg.fusion == "concat":
            self.head = nn.Linear(M * C, cfg.n_classes)
        else:
            spans, start = [], 1                                         # token 0 is the fusion CLS token
            for encoder, (L, _) in zip(self.encoders, cfg.modalities.values()):
                spans.append((start, start + L + (encoder.cls is not None)))
                start = spans[-1][1]
            self.cls = nn.Parameter(trunc_normal(1, 1, C))
            if cfg.fusion_head == "prenorm":
                self.ln, self.ln_f = nn.LayerNorm(C), nn.LayerNorm(C)
            self.fusion = FusionAttention(C, cfg.fusion_heads, spans, cfg.fusion_dropout)
            self.head = nn.Linear(C, cfg.n_classes)
        if cfg.fusion_head == "authors":
            self.apply(authors_init)

    def forward(self, xs, stats=False):
        """xs: one tensor (B, L_m, D_m) per modality, in cfg.modalities order ((B, D_m) where
        L_m = 1). stats=True also returns the CLS query R q, the mean keys and the attention mass, for
        measures (RollingQ needs none of them: the rotation gathers its own)."""
        zs = [enc(x) for enc, x in zip(self.encoders, checked_inputs(self.cfg, xs))]   # M x (B, T_m, C)
        features = [enc.pool(z) for enc, z in zip(self.encoders, zs)]    # M x (B, C)
        probe_logits = [probe(f.detach()) for probe, f in zip(self.probes, features)]
        if self.cfg.fusion == "concat":
            return Output(self.head(torch.cat(features, -1)), probe_logits)
        x = torch.cat([self.cls.expand(zs[0].shape[0], -1, -1)] + zs, 1)    # (B, T, C)
        if self.cfg.fusion_head == "authors":                            # classifier(fusion(x)[CLS row])
            y, extra = self.fusion(x, stats)                             # (B, C)
            logits = self.head(y)                                        # (B, n_classes)
        else:                                                            # classifier(ln_f(x_cls + fusion(ln(x))))
            y, extra = self.fusion(self.ln(x), stats)
            logits = self.head(self.ln_f(x[:, 0] + y))
        return Output(logits, probe_logits, **extra)


def checked_inputs(cfg, xs):
    """xs checked against cfg.modalities; (B, D_m) is taken as one token (B, 1, D_m)."""
    if not isinstance(xs, (list, tuple)) or len(xs) != len(cfg.modalities):
        got = len(xs) if isinstance(xs, (list, tuple)) else type(xs).__name__
        raise ValueError(f"expected a list of {len(cfg.modalities)} modality tensors ({', '.join(cfg.modalities)}), got {got}")
    out = []
    for (name, (L, D)), x in zip(cfg.modalities.items(), xs):
        shape = tuple(x.shape)
        if x.dim() == 2 and L == 1:
            x = x[:, None, :]                                            # (B, D) -> (B, 1, D)
        if x.dim() != 3 or tuple(x.shape[1:]) != (L, D) or x.shape[0] != xs[0].shape[0]:
            one = f" or (B, {D})" if L == 1 else ""
            raise ValueError(f"modality {name!r}: expected a tensor (B, {L}, {D}){one} with the same B as the "
                             f"others, got {shape}")
        out.append(x)
    return out


class Unimodal(nn.Module):
    """One modality alone: an encoder and a linear head on its feature, the unimodal baseline.
    encoder: a new one, or one of a MultimodalTransformer's (to train it alone: a warm start)."""

    def __init__(self, cfg: Config, modality, encoder=None):
        super().__init__()
        self.encoder = Encoder(*cfg.modalities[modality], cfg) if encoder is None else encoder
        self.head = nn.Linear(cfg.d_model, cfg.n_classes)
        if cfg.fusion_head == "authors":                                 # as MultimodalTransformer; a given encoder keeps its weights
            (self if encoder is None else self.head).apply(authors_init)

    def forward(self, xs, stats=False):                                  # xs: [(B, L, D)] -> logits (B, n_classes)
        return Output(self.head(self.encoder.pool(self.encoder(xs[0]))), [])
