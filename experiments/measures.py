"""The paper's measures of dynamic fusion, added to a run's metrics by the study.

    acc_by_level         test accuracy with one modality corrupted at each level (0 clean, 1 replaced)
    attention_quality_r  per modality, Pearson r over test samples between its attention share
                         and its quality u (each sample's modality corrupted at level 1 - u)
    attention_by_noise   where the data says which test samples were drawn as pure noise in a
                         modality (the synthetic set): its attention share there and elsewhere

The corruption is data.corrupted with data.noise_draws: every model meets the same draw, the
one train.final_evaluation replaces a modality with (level 1). The paper grades its noise and
correlates attention with quality too; we could not find its exact protocol, so ours is our own.
"""

import torch

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
