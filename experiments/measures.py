"""The paper's measures of dynamic fusion, added to a run's metrics by the study.

    acc_by_level         test accuracy with one modality corrupted at each level (0 clean, 1 replaced)
    attention_quality_r  per modality, Pearson r over test samples between its attention share
                         and its quality u (each sample's modality corrupted at level 1 - u)
    attention_by_noise   where the data says which test samples were drawn as pure noise in a
                         modality (the synthetic set): its attention share there and elsewhere
and, for the study (study_measures; declared in docs/reproduction.md before its runs):
    acc_low_snr          where the data has per-sample SNR (avdigits-noisy): accuracy on the test
    attention_snr_r      third with the lowest SNR; Pearson r between audio's attention share and the SNR
    converged_probe      linear probes fitted to convergence on each frozen encoder's features
    GradientShares       (an on_step hook) each encoder's share of the gradient norm, per epoch
and, for the study on the premise set (declared in docs/premise.md, section 3, before its runs;
exploratory beside the primary outcome, clean accuracy):
    attention_snr_slope  audio's attention share per 10 dB of SNR (least squares), and
    attention_spread     its std over test samples (snr_measures, beside r)
    EpochMeasures        (an on_step hook) after every epoch, on a fixed sample of 512 tokens per
                         modality of train and test: the Fréchet distance and the Fisher ratio
                         between the modalities' fusion keys, each with a permutation null, and
                         cos(R q, k) per modality (its means, the overlap of its histograms);
                         last_epochs_mean reads the last 5 epochs, as the tables do
    UpdateShares         (an on_step hook) each encoder's share of the update norm, per epoch

The corruption is data.corrupted with data.noise_draws: every model meets the same draw, the
one train.final_evaluation replaces a modality with (level 1). The paper grades its noise and
correlates attention with quality too; we could not find its exact protocol, so ours is our own.
"""

import itertools
import statistics

import torch
import torch.nn.functional as F

import data as datasets
import train

NOISE_LEVELS = (0.25, 0.5, 1.0)                                       # corruption levels besides 0 (clean)


def pearson(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / (a.norm() * b.norm())) if a.norm() > 0 and b.norm() > 0 else None


def paper_measures(model, xs, y, data, final):
    """The measures above for one trained model on the test set xs (M x (N, L_m, D_m)), y (N,);
    `final` is train.final_evaluation's result, whose clean and level-1 accuracies it reuses."""
    names, attention = data.names, "attention" in final
    zs, u = datasets.noise_draws(xs)                                  # z per modality, u (N, M)

    def swap(j, x_j):                                                 # xs with modality j replaced by x_j
        return [x_j if i == j else x for i, x in enumerate(xs)]
    out = {"acc_by_level": {}, **({"attention_quality_r": {}} if attention else {})}
    for j, m in enumerate(names):
        out["acc_by_level"][m] = {"0": final["acc"]["clean"]}
        for level in NOISE_LEVELS:
            acc = final["acc"][f"noise:{m}"] if level == 1 else \
                train.evaluate(model, swap(j, datasets.corrupted(xs[j], level, zs[j])), y, names)["acc"]
            out["acc_by_level"][m][f"{level:g}"] = acc
        if attention:
            level = (1 - u[:, j]).view(-1, 1, 1)                      # (N, 1, 1): one level per sample
            _, shares = train.evaluate(model, swap(j, datasets.corrupted(xs[j], level, zs[j])), y, names, per_sample=True)
            out["attention_quality_r"][m] = pearson(shares[:, j], u[:, j])
    if attention and data.test_noise is not None:
        _, shares = train.evaluate(model, xs, y, names, per_sample=True)   # (N, M), clean
        noise = data.test_noise.to(shares.device)                     # (N, M) bool
        out["attention_by_noise"] = {m: {kind: float(shares[picked, j].mean()) if picked.any() else None
                                         for kind, picked in (("noise", noise[:, j]), ("informative", ~noise[:, j]))}
                                     for j, m in enumerate(names)}
    return out


# ----------------------------------------------------------------------------------------
# The measures of the noisy study (declared in docs/reproduction.md before its runs)


def study_measures(model, xs, y, data, final):
    """paper_measures, and where the data has them: the measures that need per-sample SNR, and
    converged linear probes on each encoder's frozen features."""
    out = paper_measures(model, xs, y, data, final)
    if "snr" in data.side:
        out.update(snr_measures(model, xs, y, data))
    if hasattr(model, "encoders"):
        out["converged_probe"] = encoder_probes(model, data, y.device)
    return out


def snr_measures(model, xs, y, data):
    """On the test set as drawn (the training distribution): accuracy on the third of samples
    with the lowest audio SNR, and, for attention fusion, Pearson r between each sample's audio
    attention share and its SNR (> 0: attention follows audio's quality); beside r, the slope of
    that share against the SNR (least squares, share per 10 dB) and its spread (std over samples)."""
    snr = data.side["snr"]["test"].to(y.device)                       # (N,) dB
    low = snr <= snr.quantile(1 / 3)                                  # (N,) bool
    out = {"acc_low_snr": train.evaluate(model, [x[low] for x in xs], y[low], data.names)["acc"]}
    if hasattr(model, "fusion"):
        _, shares = train.evaluate(model, xs, y, data.names, per_sample=True)   # (N, M)
        audio = shares[:, data.names.index("audio")].double()        # (N,)
        out["attention_snr_r"] = pearson(audio, snr.double())
        out["attention_snr_slope"] = 10 * least_squares_slope(audio, snr.double())
        out["attention_spread"] = float(audio.std())
    return out


@torch.no_grad()
def encoder_features(encoder, x, batch_size=512):
    """A frozen encoder's features of x (N, L, D): its CLS token (N, C) and the mean of its other
    output tokens (N, C), the ones the fusion attends over besides the CLS."""
    encoder.eval()
    batch_size = datasets.rows_per_batch(x, batch_size)
    z = torch.cat([encoder(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]).double()   # (N, T_m, C)
    encoder.train()
    return {"cls": z[:, 0], "tokens": z[:, 1:].mean(1)} if encoder.cls is not None else {"tokens": z.mean(1)}


def fit_probe(f_train, y_train, f_test, y_test, n_classes, l2=1e-3):
    """A multinomial logistic regression with an L2 penalty, fitted to convergence (L-BFGS, float64,
    features standardised with the training statistics); returns its test accuracy and the
    gradient norm it stopped at (a converged probe: < 1e-4)."""
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-8

    def inputs(f):                                                    # (N, C) -> (N, C + 1): standardised, a bias column
        return torch.cat([(f - mu) / sd, f.new_ones(len(f), 1)], 1)
    a1, b1 = inputs(f_train), inputs(f_test)
    W = torch.zeros(a1.shape[1], n_classes, dtype=torch.float64, device=a1.device, requires_grad=True)

    def loss_fn():
        return F.cross_entropy(a1 @ W, y_train) + l2 * W[:-1].square().sum()

    optimizer = torch.optim.LBFGS([W], lr=1, max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss
    optimizer.step(closure)
    grad = torch.autograd.grad(loss_fn(), W)[0].norm()
    with torch.no_grad():
        acc = float(((b1 @ W).argmax(-1) == y_test).double().mean())
    return {"acc": acc, "grad_norm": float(grad)}


def encoder_probes(model, data, device):
    """Per encoder and feature kind: the converged probe's test accuracy (and its final gradient norm)."""
    y_train, y_test = data.train_y.to(device), data.test_y.to(device)
    out = {}
    for m, encoder, tr, te in zip(data.names, model.encoders, data.train_x, data.test_x):
        f_train, f_test = encoder_features(encoder, tr.to(device)), encoder_features(encoder, te.to(device))
        out[m] = {kind: fit_probe(f_train[kind], y_train, f_test[kind], y_test, data.n_classes) for kind in f_train}
    return out


class GradientShares:
    """train.run's on_step hook: each encoder's share of the encoders' gradient norm,
    ||g_m|| / sum_j ||g_j||, averaged over each epoch's steps (the paper's mechanism: the
    favoured modality's encoder gets the larger gradient)."""

    def __init__(self):
        self.sums, self.steps = {}, {}

    def __call__(self, model, epoch, step, out):
        norms = torch.stack([torch.linalg.vector_norm(torch.stack(
            [p.grad.detach().float().norm() for p in enc.parameters() if p.grad is not None]))
            for enc in model.encoders])                               # (M,)
        self.sums[epoch] = self.sums.get(epoch, 0) + norms / norms.sum()
        self.steps[epoch] = self.steps.get(epoch, 0) + 1

    def per_epoch(self, names):
        """{modality: [share in epoch 1, 2, ...]}"""
        shares = [(self.sums[e] / self.steps[e]).tolist() for e in sorted(self.sums)]
        return {m: [s[j] for s in shares] for j, m in enumerate(names)}


# ----------------------------------------------------------------------------------------
# The study's measures (docs/premise.md, section 3; declared before the study ran): the key
# distribution gap as distributions, the gap as the query sees it, every epoch on train and
# test; each encoder's update-norm share. All exploratory: clean accuracy is the primary outcome.


def gaussian(x):
    """The mean (..., d) and covariance (..., d, d) of the rows of x (..., n, d), in float64."""
    x = x.double()
    mu = x.mean(-2)                                                   # (..., d)
    xc = x - mu.unsqueeze(-2)                                         # (..., n, d)
    return mu, xc.transpose(-1, -2) @ xc / (x.shape[-2] - 1)


def trace(c):
    return c.diagonal(dim1=-2, dim2=-1).sum(-1)


def total_variance(x):
    """tr C of the rows of x (..., n, d), without C: the summed variance of the coordinates. (...)"""
    x = x.double()
    return (x - x.mean(-2, keepdim=True)).square().sum((-2, -1)) / (x.shape[-2] - 1)


def sqrtm_psd(c):
    """The square root of symmetric positive semi-definite matrices c (..., d, d), by eigendecomposition."""
    w, V = torch.linalg.eigh(c)                                       # c = V diag(w) Vᵀ
    return V * w.clamp(min=0).sqrt().unsqueeze(-2) @ V.transpose(-1, -2)


def frechet_distance(a, b):
    """The (squared) Fréchet distance between Gaussians fitted to the rows of a (..., n_a, d) and
    b (..., n_b, d), as FID: 0 for the same Gaussian, |mu_a - mu_b|^2 for the same covariance.
    Returns (...), float64: one value per head, say."""
    (mu_a, c_a), (mu_b, c_b) = gaussian(a), gaussian(b)
    s = sqrtm_psd(c_a)                                                # (..., d, d) C_a^1/2
    m = s @ c_b @ s                                                   # (..., d, d) C_a^1/2 C_b C_a^1/2
    cross = torch.linalg.eigvalsh((m + m.transpose(-1, -2)) / 2).clamp(min=0).sqrt().sum(-1)
    # d^2 = |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2)
    return (mu_a - mu_b).square().sum(-1) + trace(c_a) + trace(c_b) - 2 * cross


def fisher_ratio(a, b):
    """|mu_a - mu_b|^2 / (tr C_a + tr C_b) of the rows of a (..., n_a, d) and b (..., n_b, d): the
    distance between the means against the spread around them, free of the keys' scale. (...)"""
    mu_a, mu_b = a.double().mean(-2), b.double().mean(-2)            # (..., d)
    return (mu_a - mu_b).square().sum(-1) / (total_variance(a) + total_variance(b))


def permutation_null(distance, groups, draws=200, seed=0, chunk=25):
    """The statistic: distance(a, b) between groups [(..., n_m, d)] (... : heads, say), averaged
    over its entries and over the pairs of groups (one pair for two modalities). Returns its value
    and the share of `draws` shuffles of the group labels over the pooled rows (seeded) whose value
    is at least as large: {"value", "p"}, p small where the groups differ more than random splits
    of the same rows do. The shuffles are taken `chunk` at a time, as a batch."""
    sizes = [x.shape[-2] for x in groups]
    pooled = torch.cat(groups, -2)                                    # (..., n, d), n = sum n_m

    def statistic(groups):                                            # M x (..., k, n_m, d) -> (k,)
        k = groups[0].shape[-3]
        return torch.stack([distance(a, b).reshape(-1, k).mean(0) for a, b in itertools.combinations(groups, 2)]).mean(0)
    value = float(statistic([x.unsqueeze(-3) for x in groups]))
    g, null = torch.Generator().manual_seed(seed), []
    for start in range(0, draws, chunk):
        order = torch.stack([torch.randperm(sum(sizes), generator=g) for _ in range(min(chunk, draws - start))])   # (k, n)
        shuffled = pooled.index_select(-2, order.flatten()).unflatten(-2, order.shape)   # (..., k, n, d)
        null.append(statistic(shuffled.split(sizes, -2)))             # M x (..., k, n_m, d) -> (k,)
    return {"value": value, "p": float((torch.cat(null) >= value).double().mean())}


def histogram_overlap(a, b, bins=50):
    """The overlap of the histograms of a and b (values in [-1, 1], `bins` bins, each normalised to
    sum 1): sum over bins of min(p_a, p_b), 1 for the same histogram, 0 for disjoint ones."""
    p_a, p_b = (torch.histc(x.double(), bins, -1, 1) for x in (a, b))   # (bins,)
    return float(torch.minimum(p_a / p_a.sum(), p_b / p_b.sum()).sum())


def least_squares_slope(y, x):
    """The slope of the least-squares line y = a + b x: cov(x, y) / var(x)."""
    x, y = x - x.mean(), y - y.mean()
    return float(x @ y / (x @ x))


def pick_tokens(n, spans, tokens, g):
    """A fixed sample of `tokens` tokens per modality (all, where there are fewer) from n samples,
    drawn with the generator g: the samples they come from (rows, sorted), and per modality each
    token's position in rows and in the fusion's sequence (spans: [(start, end)] per modality)."""
    picks = []
    for s, e in spans:
        flat = torch.randperm(n * (e - s), generator=g)[:tokens]      # (tokens,) of sample x token
        picks.append((flat // (e - s), s + flat % (e - s)))
    rows = torch.unique(torch.cat([sample for sample, _ in picks]))   # (R,) sorted
    return rows, [(torch.searchsorted(rows, sample), token) for sample, token in picks]


@torch.no_grad()
def fusion_keys(model, xs, picks, batch_size=512):
    """The fusion layer's key of each picked token (its key projection applied to what it attends
    over: the encoders' output tokens, as its input holds them) and the query R q of the token's
    sample. xs: M x (R, L_m, D_m), the picked samples (pick_tokens' rows); picks: per modality
    (row positions, token positions). Returns per modality (query (n, nh, hs), keys (n, nh, hs)),
    float64. The model is left in the mode it was in."""
    fusion, inputs, training = model.fusion, [], model.training
    hook = fusion.register_forward_hook(lambda module, args, output: inputs.append(args[0]))
    model.eval()
    try:
        query = torch.cat([model([x[i:i + batch_size] for x in xs], stats=True).query
                           for i in range(0, len(xs[0]), batch_size)])   # (R, nh, hs)
    finally:
        hook.remove()
        model.train(training)
    k = fusion.heads(fusion.k(torch.cat(inputs)))                     # (R, T, C) -> (R, nh, T, hs)
    return [(query[at].double(), k[at, :, token].double()) for at, token in picks]   # M x 2 x (n, nh, hs)


def key_distribution_gap(pairs, names, draws=200, seed=0, bins=50):
    """The key distribution gap from fusion_keys' pairs (query, keys) per modality: the Fréchet
    distance and the Fisher ratio between the modalities' keys, each with its permutation null
    (p: the share of label shuffles at least as large); and the gap as the query sees it,
    cos(R q, k) over each modality's tokens: its mean per modality and the overlap of the
    modalities' histograms. Per head, averaged over heads (and over pairs of modalities, M > 2)."""
    groups = [keys.transpose(0, 1) for _, keys in pairs]              # M x (nh, n_m, hs)
    frechet = permutation_null(frechet_distance, groups, draws, seed)
    fisher = permutation_null(fisher_ratio, groups, draws, seed)
    cos = [F.cosine_similarity(query, keys, dim=-1) for query, keys in pairs]   # M x (n_m, nh)
    overlap = statistics.mean(histogram_overlap(a[:, h], b[:, h], bins)
                              for a, b in itertools.combinations(cos, 2) for h in range(a.shape[1]))
    return {"frechet": frechet["value"], "frechet_p": frechet["p"], "fisher": fisher["value"], "fisher_p": fisher["p"],
            "cos": {m: float(c.mean()) for m, c in zip(names, cos)}, "cos_overlap": overlap}


class EpochMeasures:
    """train.run's on_step hook: at each epoch's last step (after its optimizer step, before a roll
    at the epoch's end) key_distribution_gap on a fixed sample of `tokens` tokens per modality of
    the training set and of the test set (the same tokens every epoch, drawn at the first).
    `epochs`: one record per epoch, {"epoch", "train", "test"}. One process (the study's)."""

    def __init__(self, data, device, batch_size, tokens=512, draws=200, seed=0):
        self.splits = {"train": data.train_x, "test": data.test_x}
        self.names, self.device, self.tokens, self.draws, self.seed = data.names, device, tokens, draws, seed
        self.steps = len(range(0, len(data.train_y), batch_size))    # train.train's steps per epoch
        self.picked, self.epochs = None, []

    def __call__(self, model, epoch, step, out):
        if step < self.steps:
            return
        if self.picked is None:                                       # drawn once, in this order
            g = torch.Generator().manual_seed(self.seed)
            self.picked = {}
            for split, xs in self.splits.items():
                rows, picks = pick_tokens(len(xs[0]), model.fusion.spans, self.tokens, g)
                self.picked[split] = ([x[rows].to(self.device) for x in xs], picks)
        self.epochs.append({"epoch": epoch, **{
            split: key_distribution_gap(fusion_keys(model, xs, picks), self.names, self.draws, self.seed)
            for split, (xs, picks) in self.picked.items()}})


def last_epochs_mean(records, k=5):
    """The mean of the last k records (nested dicts of numbers; an "epoch" key is left out) or of
    all of them where there are fewer: what the tables read of a measure taken every epoch."""
    def mean(values):
        if isinstance(values[0], dict):
            return {key: mean([v[key] for v in values]) for key in values[0] if key != "epoch"}
        return None if any(v is None for v in values) else statistics.mean(values)
    return mean(records[-k:])


class UpdateShares(GradientShares):
    """train.run's on_step hook: each encoder's share of the encoders' update norm,
    ||theta_m(t) - theta_m(t-1)|| / sum_j ||theta_j(t) - theta_j(t-1)||, averaged over each
    epoch's steps (per_epoch as GradientShares). Under AdamW the gradient share does not say how
    fast an encoder learns (Adam normalises each step); the update does. The parameters are kept
    from step to step; the first step has none before it and is left out."""

    def __init__(self):
        super().__init__()
        self.before = None

    def __call__(self, model, epoch, step, out):
        now = [torch.cat([p.detach().flatten().double() for p in enc.parameters()]) for enc in model.encoders]
        if self.before is not None:
            norms = torch.stack([(a - b).norm() for a, b in zip(now, self.before)])   # (M,)
            self.sums[epoch] = self.sums.get(epoch, 0) + norms / norms.sum()
            self.steps[epoch] = self.steps.get(epoch, 0) + 1
        self.before = now


def all_of(*hooks):
    """Several on_step hooks as the one train.run takes, called in order."""
    def on_step(model, epoch, step, out):
        for hook in hooks:
            hook(model, epoch, step, out)
    return on_step
