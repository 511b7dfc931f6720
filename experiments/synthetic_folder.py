"""A synthetic data folder at the authors' Kinetics-Sounds input sizes, written block by block:
for the memory and throughput checks of a run on data larger than memory.

    python -m experiments.synthetic_folder runs/ks-synthetic --train 4000 --test 500
    python train.py --data runs/ks-synthetic --epochs 1 --batch-size 32              # CPU, tiny width
    python train.py --data runs/ks-synthetic --preset paper --rollingq               # a GPU setting

audio: a 128 x 1024 log-mel spectrogram per sample (float16, the authors' normalisation in
meta.json); visual: 3 frames of 3 x 224 x 224 (uint8, ImageNet's mean and std). The device cuts
both into 16 x 16 patches: 512 + 588 tokens, the authors' counts. Each class draws its own
pattern in each modality, under noise (visual's with a random sign, as data.synthetic's)."""

import argparse
from pathlib import Path

import numpy as np

import data as datasets

AUDIO, FRAMES = (1, 128, 1024), (3, 3, 224, 224)
SPECS = {"audio": {"patch": 16, "mean": [-4.503877], "std": [2 * 5.141276]},       # the authors' fbank norm
         "visual": {"patch": 16, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}


def write(path, n_train, n_test, n_classes=8, seed=0, block=64):
    """Write the folder; returns its size in bytes."""
    g = np.random.default_rng(seed)
    patterns = {"audio": g.standard_normal((n_classes, *AUDIO), dtype=np.float32),
                "visual": g.standard_normal((n_classes, *FRAMES), dtype=np.float32)}
    for split, n in (("train", n_train), ("test", n_test)):
        y = g.integers(0, n_classes, n)
        (Path(path) / split).mkdir(parents=True, exist_ok=True)
        np.save(Path(path) / split / "y.npy", y)

        def audio():
            for i in range(0, n, block):
                yb = y[i:i + block]
                yield -4.5 + 5 * (patterns["audio"][yb] + g.standard_normal((len(yb), *AUDIO), dtype=np.float32))

        def visual():
            for i in range(0, n, block):
                yb = y[i:i + block]
                sign = g.choice([-1.0, 1.0], (len(yb), 1, 1, 1, 1)).astype(np.float32)
                x = 128 + 30 * (0.7 * sign * patterns["visual"][yb] + g.standard_normal((len(yb), *FRAMES), dtype=np.float32))
                yield np.clip(x, 0, 255)

        datasets.write_npy(Path(path) / split / "audio.npy", (n, *AUDIO), np.float16, audio())
        datasets.write_npy(Path(path) / split / "visual.npy", (n, *FRAMES), np.uint8, visual())
    datasets.write_meta(path, ["audio", "visual"], SPECS)
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.synthetic_folder", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the folder to write")
    p.add_argument("--train", type=int, default=1024, help="training samples")
    p.add_argument("--test", type=int, default=256, help="test samples")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    size = write(args.out, args.train, args.test, seed=args.seed)
    print(f"wrote {args.out}: {args.train} train / {args.test} test, {size / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
