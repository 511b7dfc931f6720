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

The corruption is data.corrupted with data.noise_draws: every model meets the same draw, the
one train.final_evaluation replaces a modality with (level 1). The paper grades its noise and
correlates attention with quality too; we could not find its exact protocol, so ours is our own.
"""

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
    attention share and its SNR (> 0: attention follows audio's quality)."""
    snr = data.side["snr"]["test"].to(y.device)                       # (N,) dB
    low = snr <= snr.quantile(1 / 3)                                  # (N,) bool
    out = {"acc_low_snr": train.evaluate(model, [x[low] for x in xs], y[low], data.names)["acc"]}
    if hasattr(model, "fusion"):
        _, shares = train.evaluate(model, xs, y, data.names, per_sample=True)   # (N, M)
        out["attention_snr_r"] = pearson(shares[:, data.names.index("audio")].double(), snr.double())
    return out


@torch.no_grad()
def encoder_features(encoder, x, batch_size=512):
    """A frozen encoder's features of x (N, L, D): its CLS token (N, C) and the mean of its other
    output tokens (N, C), the ones the fusion attends over besides the CLS."""
    encoder.eval()
    batch_size = min(batch_size, getattr(x, "rows_at_once", batch_size))   # a data folder's modality: its reads
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
