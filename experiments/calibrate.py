"""How hard is a two-modality set for each modality alone, and how much does fusing them add?

    python -m experiments.calibrate --data avdigits-noisy --seeds 0,1 [--out cal.json]

Per seed, with train.py's defaults (AdamW lr 1e-3, 25 epochs, width 64): each modality's unimodal
baseline (--unimodal m) and concat fusion (--fusion concat), trained with train.run. Reported as JSON:
the final clean test accuracy of each; from the two unimodal models' test predictions the share of
test samples only the first modality gets right and only the second does; and how fast each modality
is learned (the unimodal runs' test accuracy after epochs 1 and 3). Data properties, measured
before any RollingQ run.
"""

import json

import torch

import train


def predictions(model, xs, batch_size=512):
    """The model's predicted class per test sample: (N,)."""
    model.eval()
    with torch.no_grad():
        return torch.cat([model([x[i:i + batch_size] for x in xs]).logits.argmax(-1)
                          for i in range(0, len(xs[0]), batch_size)])


def calibrate(data_name, seed, log=lambda line: None):
    """The figures of one seed (see the module docstring)."""
    base = ["--data", data_name, "--seed", str(seed), "--device", "cpu"]
    args = train.parse_args(base)
    data = train.load_data(args)
    first, second = data.names[:2]
    result, right = {"seed": seed}, {}
    for m in (first, second):
        args = train.parse_args(base + ["--unimodal", m])
        model, metrics = train.run(args, data, torch.device("cpu"), log=log)
        right[m] = predictions(model, data.select(m).test_x) == data.test_y   # (N,) bool
        result[m] = metrics["final"]["acc"]["clean"]
        result[f"{m} by epoch 1, 3"] = [metrics["epochs"][e - 1]["test_acc"] for e in (1, 3)]
    result["concat"] = train.run(train.parse_args(base + ["--fusion", "concat"]), data, torch.device("cpu"),
                                 log=log)[1]["final"]["acc"]["clean"]
    result[f"{first} only"] = float((right[first] & ~right[second]).double().mean())
    result[f"{second} only"] = float((right[second] & ~right[first]).double().mean())
    result["neither"] = float((~right[first] & ~right[second]).double().mean())
    return result


def main(argv=None):
    p = train.ArgumentParser(prog="python -m experiments.calibrate", description="Unimodal, concat and "
                             "one-modality-only accuracies of a set, per seed, as JSON.")
    p.add_argument("--data", default="avdigits-noisy", help="a set in the box or an .npz (default: %(default)s)")
    p.add_argument("--seeds", type=lambda text: [int(s) for s in text.split(",")], default=[0, 1],
                   help="comma-separated seeds (default: 0,1)")
    p.add_argument("--out", help="also write the JSON to this file")
    args = p.parse_args(argv)
    results = [calibrate(args.data, seed, log=print) for seed in args.seeds]
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    train.cli(main=main)
