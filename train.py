"""Train a multimodal Transformer with or without RollingQ and measure the fusion cycle.

    python train.py --rollingq                 # RollingQ on the built-in synthetic data
    python train.py                            # vanilla attention fusion, same data
    python train.py --unimodal visual          # one modality alone: its unimodal accuracy
    python train.py --study --out runs/study   # the reproduction study: README's tables
    python train.py --anatomy --plot anatomy.png   # AIR step by step around each roll
    python train.py --data feats.npz --rollingq --out runs/mine --save runs/mine/model.pt
    torchrun --nproc_per_node=2 train.py --rollingq     # DistributedDataParallel

The training loop is train(); run() is one run (build, train, evaluate), and the modes
below it (study, anatomy, bench) call them. Each epoch prints one line; --out DIR writes
DIR/metrics.json (see README).
"""

import argparse
import gc
import hashlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data as datasets
from rollingq import (Config, Encoder, MultimodalTransformer, Output, RollingQ, air_from_cosines,
                      leading_modality, modality_cosines)

# --preset: defaults for the CLI and, for the built-in data, the synthetic set's shape
PRESETS = {
    "small": {"args": {}, "data": {}},
    "paper": {"args": {"width": 768, "layers": 4, "encoder_heads": 12, "heads": 1, "batch_size": 32},
              "data": {"n_train": 1024, "n_test": 256,
                       "modalities": (datasets.Modality("audio", 256, 128, 1.0, 0.3),
                                      datasets.Modality("visual", 196, 128, 0.7, 0.3, flip=True))}},
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one to show."""

    def _get_help_string(self, action):
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


class UsageError(Exception):
    """A bad argument or file: reported in one line, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):                         # one line, like every other refusal
        raise UsageError(f"{message} (see --help)")


def max_rolls_arg(text):
    if text == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'none', got {text!r}") from None


def parse_args(argv=None):
    p = ArgumentParser(
        description="Train a multimodal Transformer with attention fusion, with or without RollingQ "
                    "(Ni et al., ICML 2025), and report accuracy, AIR and attention shares.",
        formatter_class=HelpFormatter)
    g = p.add_argument_group("method")
    g.add_argument("--rollingq", action="store_true", help="roll the CLS query (off: vanilla attention fusion)")
    g.add_argument("--fusion", choices=["attention", "concat"], default="attention",
                   help="attention: CLS token attends over all tokens; concat: the static baseline")
    g.add_argument("--beta", type=float, default=0.0, help="roll only when |AIR| > beta")
    g.add_argument("--sigma", type=float, default=0.0, help="anchor lean toward the weaker modality (0: bisector)")
    g.add_argument("--max-rolls", type=max_rolls_arg, default=1, metavar="N|none",
                   help="roll at most N times, at the end of an epoch, never the last (the authors' 1: right "
                        "after the first epoch); none: after every epoch but the last")
    g.add_argument("--dropout", type=float, default=0.0,
                   help="dropout on the fusion attention weights and output (the authors use 0.2)")
    g = p.add_argument_group("model and training")
    g.add_argument("--data", metavar="PATH.npz", help="real features (see README); default: built-in synthetic data")
    g.add_argument("--epochs", type=int, default=25, help="passes over the training set")
    g.add_argument("--batch-size", type=int, default=64, help="global batch size (split across ranks)")
    g.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw", help="sgd uses momentum 0.9")
    g.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    g.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                   help="cosine: linear warm-up over 2.5 epochs, then cosine decay to zero, per step (the authors')")
    g.add_argument("--pretrain-epochs", type=int, default=0, metavar="N",
                   help="warm start: first train each encoder alone on its own modality for N epochs")
    g.add_argument("--unimodal", metavar="NAME",
                   help="train one modality's encoder with a linear head on that modality alone")
    g.add_argument("--width", type=int, default=64, help="model width d_model")
    g.add_argument("--layers", type=int, default=2, help="Transformer blocks per modality encoder")
    g.add_argument("--encoder-heads", type=int, default=4, help="attention heads in the encoder blocks")
    g.add_argument("--heads", type=int, default=1, help="fusion attention heads (the paper uses 1)")
    g.add_argument("--seed", type=int, default=0, help="seed for initialisation and batch order")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    g = p.add_argument_group("files")
    g.add_argument("--out", metavar="DIR", help="write DIR/metrics.json (--study: study.md, study.json and runs/; "
                                                "--anatomy: anatomy.json; --bench: bench.json)")
    g.add_argument("--save", metavar="PATH", help="save the trained model (config + state_dict)")
    g.add_argument("--load", metavar="PATH",
                   help="start from a saved model (its own architecture replaces --width, --layers, ...)")
    g.add_argument("--eval-only", action="store_true", help="with --load: evaluate only, no training")
    g = p.add_argument_group("modes")
    g.add_argument("--study", action="store_true",
                   help="the reproduction study over --seeds seeds: concat, vanilla and RollingQ (1, 3, every "
                        "epoch) in three training regimes, and the data's premise; prints markdown tables")
    g.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 for --study")
    g.add_argument("--anatomy", action="store_true",
                   help="one RollingQ run traced every few training steps: AIR, its query and key parts, "
                        "attention shares")
    g.add_argument("--plot", metavar="PNG", help="with --study or --anatomy: draw its figure (needs matplotlib)")
    g.add_argument("--bench", action="store_true",
                   help="print training samples/s without and with RollingQ, side by side, and their ratio")
    g.add_argument("--bench-steps", type=int, default=20, help="steps per timed block in --bench")
    g.add_argument("--preset", choices=sorted(PRESETS), default="small",
                   help="paper: width 768, 4 encoder layers of 12 heads, 1 fusion head, hundreds of tokens "
                        "per modality (a throughput setting; explicit flags still win)")
    preset = p.parse_known_args(argv)[0].preset
    p.set_defaults(**PRESETS[preset]["args"])
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    """Every refusal that needs no data: one line each."""
    positive = ("epochs", "batch_size", "lr", "width", "layers", "encoder_heads", "heads", "seeds", "bench_steps")
    for name in positive:
        if not 0 < getattr(args, name) < math.inf:       # also refuses nan
            raise UsageError(f"--{name.replace('_', '-')} must be positive and finite, got {getattr(args, name)}")
    for name in ("beta", "sigma"):
        if not 0 <= getattr(args, name) < math.inf:
            raise UsageError(f"--{name} must be >= 0 and finite, got {getattr(args, name)}")
    if args.max_rolls is not None and args.max_rolls < 0:
        raise UsageError(f"--max-rolls must be >= 0 or 'none', got {args.max_rolls}")
    if not 0 <= args.dropout < 1:
        raise UsageError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.pretrain_epochs < 0:
        raise UsageError(f"--pretrain-epochs must be >= 0, got {args.pretrain_epochs}")
    modes = [m for m in ("study", "anatomy", "bench") if getattr(args, m)] + (["unimodal"] if args.unimodal else [])
    if len(modes) > 1:
        raise UsageError(f"choose one of --study, --anatomy, --bench, --unimodal; got {', '.join(modes)}")
    if args.eval_only and not args.load:
        raise UsageError("--eval-only needs --load PATH (a model saved with --save)")
    if args.load and (modes or args.pretrain_epochs):
        raise UsageError("--load continues a saved model; it takes no --study, --anatomy, --bench, --unimodal "
                         "or --pretrain-epochs")
    if args.unimodal and (args.rollingq or args.save or args.pretrain_epochs):
        raise UsageError("--unimodal trains one encoder alone; it takes no --rollingq, --save or --pretrain-epochs")
    if (args.rollingq or args.anatomy or args.bench) and args.fusion == "concat":
        raise UsageError("--rollingq, --anatomy and --bench roll the fusion attention's query; "
                         "they need --fusion attention")
    if args.plot and not (args.study or args.anatomy):
        raise UsageError("--plot draws the figure of --study or --anatomy; add one of them")
    if args.plot:
        if Path(args.plot).suffix.lower() not in (".png", ".pdf", ".svg"):
            raise UsageError(f"--plot {args.plot}: give a .png, .pdf or .svg file name")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib (pip install matplotlib)") from None
    plain = not (args.study or args.anatomy or args.bench)
    if plain and not args.rollingq and (args.beta, args.sigma, args.max_rolls) != (0.0, 0.0, 1):
        raise UsageError("--beta, --sigma and --max-rolls set RollingQ's rolls; add --rollingq")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if modes and modes != ["unimodal"] and world > 1:
        raise UsageError("--study, --anatomy and --bench run in one process; start them with python, not torchrun")
    if args.batch_size < world:
        raise UsageError(f"--batch-size {args.batch_size} is smaller than the {world} processes it is split across")
    for name in ("heads", "encoder_heads"):
        if args.width % getattr(args, name):
            raise UsageError(f"--width {args.width} must be divisible by --{name.replace('_', '-')} {getattr(args, name)}")
    if args.width // args.heads < 2:
        raise UsageError(f"--width / --heads must be at least 2 (each fusion head rotates a plane), "
                         f"got {args.width} / {args.heads}")
    if args.save and Path(args.save).is_dir():
        raise UsageError(f"--save {args.save}: is a directory; give a file path such as {args.save}/model.pt")
    for flag, folder in (("--out", args.out), ("--save", args.save and str(Path(args.save).parent))):
        if folder:                                     # fail now, not after the training
            try:
                Path(folder).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UsageError(f"{flag}: cannot create the folder {folder}: {e.strerror}") from None


def get_device(name):
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


# ----------------------------------------------------------------------------------------
# Models, optimiser, schedule


def build_config(args, data):
    return Config(data.modalities, data.n_classes, d_model=args.width, n_layers=args.layers,
                  n_heads=args.encoder_heads, fusion_heads=args.heads, fusion=args.fusion,
                  fusion_dropout=args.dropout)


class Unimodal(nn.Module):
    """One modality's encoder with a linear head on its mean-pooled output: --unimodal, and the
    temporary model of --pretrain-epochs. Returns an Output like the multimodal model."""

    def __init__(self, encoder, d_model, n_classes):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, xs, stats=False):                   # xs: [(B, L, D)]
        return Output(self.head(self.encoder(xs[0]).mean(1)), [])


def make_optimizer(model, args):
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)


def make_schedule(optimizer, args, steps_per_epoch, epochs):
    """constant, or the authors' cosine: linear warm-up over 2.5 epochs, then cosine to zero."""
    total, warmup = epochs * steps_per_epoch, 2.5 * steps_per_epoch

    def factor(step):                                 # step = steps taken so far
        if args.schedule == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1.0, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def bf16_autocast(device):
    """bf16 autocast on CUDA, nothing on the CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# ----------------------------------------------------------------------------------------
# The training loop


def train_step(model, xs, y, optimizer, autocast, stats=False):
    """One optimisation step on a batch; returns the forward output and the loss."""
    with autocast:
        out = model(xs, stats=stats)
        # classifier loss + one probe loss per modality (probes see detached features)
        loss = F.cross_entropy(out.logits.float(), y)
        loss = loss + sum(F.cross_entropy(p.float(), y) for p in out.probe_logits)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return out, loss.detach()


def train(model, xs, y, args, epochs, device, controller=None, on_epoch=None, on_step=None, log=print):
    """`epochs` passes over (xs, y) in shuffled batches, split across ranks under torchrun.
    RollingQ observes every step and may roll at the end of every epoch but the last (a roll
    steers the training that follows it). Returns the seconds spent training."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    starts = range(0, len(y) - world + 1, args.batch_size)           # no rank gets an empty share
    optimizer = make_optimizer(model, args)
    schedule = make_schedule(optimizer, args, len(starts), epochs)
    autocast = bf16_autocast(device)
    g = torch.Generator().manual_seed(args.seed)                      # same order on every rank
    seconds = 0.0
    for epoch in range(1, epochs + 1):
        t0 = noted = time.perf_counter()
        order = torch.randperm(len(y), generator=g).to(device)
        total_loss = torch.zeros((), device=device)
        for step, start in enumerate(starts, 1):
            idx = order[start:start + args.batch_size].tensor_split(world)[rank]   # this rank's share
            out, loss = train_step(net, [x[idx] for x in xs], y[idx], optimizer, autocast,
                                   stats=controller is not None or on_step is not None)
            schedule.step()
            total_loss += loss
            if controller is not None:
                controller.observe(out)
            if on_step is not None:
                on_step(model, epoch, step, out)
            if rank == 0 and time.perf_counter() - noted > 10:       # progress within a long epoch
                log(f"  epoch {epoch}: step {step}/{len(starts)}")
                noted = time.perf_counter()
        if world > 1:
            dist.all_reduce(total_loss)                               # the mean over ranks
            total_loss /= world
        record = controller.step(model) if controller is not None and epoch < epochs else {"rolled": False}
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        if on_epoch is not None:
            on_epoch(epoch, float(total_loss) / len(starts), record, time.perf_counter() - t0)
    return seconds


# ----------------------------------------------------------------------------------------
# Evaluation


def noise_like(x, generator):
    """Gaussian noise with the per-position mean and std of x over samples: (N, L, D)."""
    mean, std = x.mean(0, keepdim=True), x.std(0, correction=0, keepdim=True)   # (1, L, D)
    z = torch.randn(x.shape, generator=generator, device="cpu").to(x.device)
    return mean + std * z


@torch.no_grad()
def evaluate(model, xs, y, names, batch_size=512):
    """Accuracy, probe accuracy per modality and, for attention fusion, the CLS attention
    share per modality, AIR (with its leader for M > 2) and the key gap, over the whole set."""
    model.eval()
    attention_fusion = hasattr(model, "fusion")
    correct, probe_correct, shares, cos, keys = 0, 0, 0, 0, 0
    for i in range(0, len(y), batch_size):
        out = model([x[i:i + batch_size] for x in xs], stats=attention_fusion)
        yb = y[i:i + batch_size]
        correct += (out.logits.argmax(-1) == yb).sum()
        if out.probe_logits:
            probe_correct += torch.stack([(p.argmax(-1) == yb).sum() for p in out.probe_logits])   # (M,)
        if attention_fusion:
            mass = out.attention.float()                                  # (B, nh, M)
            shares += (mass / mass.sum(-1, keepdim=True)).mean(1).sum(0)  # (M,) share among modalities
            q, K = out.query.float(), out.key_means.float()               # (B, nh, hs), (B, nh, M, hs)
            cos += modality_cosines(q, K).sum(0)                          # (nh, M)
            keys = keys + K.sum(0)                                        # (nh, M, hs)
    model.train()
    n = len(y)
    result = {"acc": float(correct) / n}
    if len(names) > 1:
        result["probe_acc"] = {m: float(c) / n for m, c in zip(names, probe_correct)}
    if attention_fusion:
        result["attention"] = {m: float(s) / n for m, s in zip(names, shares)}
        air = air_from_cosines(cos / n)                                   # (nh,)
        result["air_heads"] = air.tolist()
        result["air"] = float(air.mean())                                 # one head in the paper
        if len(names) > 2:                                                # whose lead AIR is
            result["air_leader"] = names[int(leading_modality((cos / n).mean(0)))]
        result["key_gap"] = key_gap(keys / n)
    return result


def key_gap(key_means):
    """Key gap: 1 - cos between the mean keys of two modalities, averaged over pairs and heads.

    key_means (nh, M, hs). 0 when the modalities' keys point the same way; up to 2.
    """
    K = F.normalize(key_means, dim=-1)                                    # (nh, M, hs)
    sim = K @ K.transpose(-1, -2)                                         # (nh, M, M)
    M = sim.shape[-1]
    pairs = torch.triu_indices(M, M, offset=1)
    return float((1 - sim[:, pairs[0], pairs[1]]).mean())


def final_evaluation(model, xs, y, names):
    """Clean test set, then each modality in turn replaced by Gaussian noise (drawn from a
    fixed seed, so every model meets the same noisy inputs)."""
    g = torch.Generator().manual_seed(0)
    conditions = {"clean": xs}
    for j, m in enumerate(names):
        conditions[f"noise:{m}"] = [noise_like(x, g) if i == j else x for i, x in enumerate(xs)]
    results = {c: evaluate(model, cxs, y, names) for c, cxs in conditions.items()}
    final = {"acc": {c: r["acc"] for c, r in results.items()}}
    for key in ("probe_acc", "air", "air_heads", "air_leader", "key_gap"):
        if key in results["clean"]:
            final[key] = results["clean"][key]
    if "attention" in results["clean"]:
        final["attention"] = {c: r["attention"] for c, r in results.items()}
    return final


# ----------------------------------------------------------------------------------------
# One run


def setup_distributed(device):
    """Under torchrun: join the process group (one GPU per process, or gloo on the CPU).
    Returns (rank, world_size, this process's device)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def unimodal_data(data, name):
    """The one modality `name` of data, for --unimodal."""
    if name not in data.names:
        raise UsageError(f"--unimodal {name}: the data has modalities {', '.join(data.names)}")
    j = data.names.index(name)
    return datasets.Data([name], [data.train_x[j]], data.train_y, [data.test_x[j]], data.test_y, data.n_classes)


def pretrain(model, xs, y, args, device, log):
    """Warm start (--pretrain-epochs): each encoder first trained alone on its own modality
    with a temporary linear head; our stand-in for the paper's ImageNet-initialised encoders."""
    accuracy = {}
    for j, name in enumerate(model.cfg.modalities):
        solo = Unimodal(model.encoders[j], model.cfg.d_model, model.cfg.n_classes).to(device)
        train(solo, [xs[j]], y, args, args.pretrain_epochs, device, log=log)
        accuracy[name] = evaluate(solo, [xs[j]], y, [name])["acc"]
        log(f"pretrained {name}: train accuracy {accuracy[name]:.4f} after {args.pretrain_epochs} epochs")
    return accuracy


def describe(args, data, model, device, world):
    """The opening line: what this run is about to do."""
    shapes = ", ".join(f"{m} {L}x{D}" for m, (L, D) in data.modalities.items())
    source = args.data or "built-in synthetic"
    line = (f"data {source}: {shapes} (tokens x features), {len(data.train_y)} train / {len(data.test_y)} test, "
            f"{data.n_classes} classes")
    if args.load:
        rolls = f", rolls done: {int(model.fusion.rolls)}" if hasattr(model, "fusion") else ""
        line += f" | loaded {args.load} ({model.cfg.fusion} fusion{rolls})"
    if args.unimodal:
        line += f" | unimodal {args.unimodal}"
    elif not args.eval_only:
        rolls = "none" if args.max_rolls is None else args.max_rolls
        method = (" fusion" if model.cfg.fusion == "concat" else " fusion, vanilla" if not args.rollingq
                  else f" fusion, RollingQ (beta {args.beta:g}, sigma {args.sigma:g}, max-rolls {rolls})")
        line += f" | {model.cfg.fusion}{method}"
    if hasattr(model, "fusion"):
        line += (f" | AIR > 0: {data.names[0]} favoured, < 0: {data.names[1]}" if len(data.names) == 2
                 else " | AIR: the favoured modality's lead (named)")
    if not args.eval_only:
        line += (f" | {args.optimizer} lr {args.lr:g} {args.schedule}, {args.epochs} epochs, batch {args.batch_size}"
                 + (f", warm start {args.pretrain_epochs} epochs" if args.pretrain_epochs else ""))
    params = sum(p.numel() for p in model.parameters())
    return line + f" | {device}" + (f" x {world} processes" if world > 1 else "") + f" | {params / 1e6:.2f} M parameters"


def run(args, data, device, log=print, on_step=None):
    """Build (or load), train unless --eval-only, and evaluate one model; returns (model, metrics)."""
    rank, world, device = setup_distributed(device)
    torch.manual_seed(args.seed)
    if args.unimodal:                                 # the multimodal model's encoder, alone
        cfg = build_config(args, data)
        data = unimodal_data(data, args.unimodal)
        L, D = cfg.modalities[args.unimodal]
        model = Unimodal(Encoder(L, D, cfg), cfg.d_model, cfg.n_classes)
    else:
        model = load_checkpoint(args.load, data) if args.load else build_model(args, data)
    if args.rollingq and not hasattr(model, "fusion"):
        raise UsageError(f"--rollingq: the model in {args.load} uses concat fusion, not attention")
    model.to(device)
    if rank == 0:
        log(describe(args, data, model, device, world))
    metrics = {"config": run_config(args, model), "epochs": [], "final": None}
    # in-memory data: moved to the device once, batches are index slices there
    test_xs, test_y = [x.to(device) for x in data.test_x], data.test_y.to(device)
    if args.eval_only:
        metrics["final"] = final_evaluation(model, test_xs, test_y, data.names)
        return model, metrics
    xs, y = [x.to(device) for x in data.train_x], data.train_y.to(device)
    if args.pretrain_epochs:
        metrics["pretrain_train_acc"] = pretrain(model, xs, y, args, device, log if rank == 0 else lambda s: None)
    controller = RollingQ(args.beta, args.sigma, args.max_rolls) if args.rollingq else None

    def on_epoch(epoch, loss, record, seconds):       # evaluate on the test set, print one line
        t0 = time.perf_counter()
        ev = evaluate(model, test_xs, test_y, data.names)
        row = {"epoch": epoch, "train_loss": loss, "test_acc": ev["acc"], "air": ev.get("air"),
               "key_gap": ev.get("key_gap"), "rolled": record["rolled"], "attention": ev.get("attention")}
        if "air_leader" in ev:
            row["air_leader"] = ev["air_leader"]
        metrics["epochs"].append(row)
        if rank == 0:
            rolls = int(model.fusion.rolls) if controller is not None else None
            log(epoch_line(epoch, args.epochs, loss, ev, rolls, record, seconds + time.perf_counter() - t0))

    train_seconds = train(model, xs, y, args, args.epochs, device, controller, on_epoch, on_step, log)
    metrics["final"] = final_evaluation(model, test_xs, test_y, data.names)
    metrics["final"]["train_seconds"] = train_seconds
    if world > 1:
        metrics["distributed"] = {"world_size": world, "ranks_agree": ranks_agree(model, metrics)}
    return model, metrics


def epoch_line(epoch, epochs, loss, ev, rolls, record, seconds):
    """The progress line: loss, test accuracy, AIR (its leader for M > 2), attention shares, rolls."""
    line = f"epoch {epoch:3d}/{epochs}  loss {loss:.4f}  test_acc {ev['acc']:.4f}"
    if "air" in ev:
        line += f"  air {ev['air']:+.3f}" + (f" ({ev['air_leader']})" if "air_leader" in ev else "")
        line += "  attn " + " ".join(f"{a:.2f}" for a in ev["attention"].values())
    if rolls is not None:
        heads = record.get("heads", [])
        which = f" heads {heads}" if len(record.get("air", [])) > 1 else ""
        line += f"  rolls {rolls}" + (f"  rolled{which} at batch AIR " + " ".join(f"{record['air'][h]:+.3f}" for h in heads)
                                      if record["rolled"] else "")
    return line + f"  {seconds:.1f}s"


def build_model(args, data):
    return MultimodalTransformer(build_config(args, data))


# flags that choose a mode or its output, not what one run computes
MODE_ARGS = ("study", "seeds", "anatomy", "plot", "bench", "bench_steps", "out", "save")


def run_config(args, model):
    """What metrics.json records of a run: its arguments and the architecture in use. A loaded
    model records where it came from and its rolls instead of defaults it never used."""
    arch = asdict(model.cfg) if hasattr(model, "cfg") else None       # None: --unimodal
    rolls_done = int(model.fusion.rolls) if hasattr(model, "fusion") else 0
    if args.eval_only:
        return {"load": args.load, "eval_only": True, "data": args.data, "device": args.device,
                "rolls_done": rolls_done, "model": arch}
    config = {k: v for k, v in vars(args).items() if k not in MODE_ARGS}
    config["model"] = arch
    if args.load:                                     # the checkpoint's architecture, not the CLI's
        for k in ("width", "layers", "encoder_heads", "heads", "fusion", "dropout", "preset"):
            config.pop(k)
        config["loaded"] = {"path": args.load, "rolls_done": rolls_done}
    return config


def ranks_agree(model, metrics):
    """True when every rank ends with the same rotation and the same metrics."""
    mine = (model.fusion.R.cpu().tolist() if hasattr(model, "fusion") else None,
            json.dumps({"epochs": metrics["epochs"], "acc": metrics["final"]["acc"]}, sort_keys=True))
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return all(e == every[0] for e in every)


# ----------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path, model):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": asdict(model.cfg), "model": model.state_dict()}, path)


def load_checkpoint(path, data):
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        cfg = Config(**checkpoint["config"])
        model = MultimodalTransformer(cfg)
        model.load_state_dict(checkpoint["model"])
    except FileNotFoundError:
        raise UsageError(f"--load {path}: no such file") from None
    except Exception as e:
        raise UsageError(f"--load {path}: not a checkpoint written by --save ({type(e).__name__})") from None
    if list(cfg.modalities.items()) != list(data.modalities.items()) or cfg.n_classes != data.n_classes:
        raise UsageError(f"--load {path}: the model expects modalities {cfg.modalities} and "
                         f"{cfg.n_classes} classes, the data has {data.modalities} and {data.n_classes}")
    return model


# ----------------------------------------------------------------------------------------
# The study: which setting of RollingQ helps, in which training regime, on which data


# Each regime and row is a set of argument overrides; everything else comes from the command
# line. The authors' regime: SGD (momentum 0.9), warm-up + cosine, dropout 0.2 in the fusion
# attention; lr 0.01, not their 1e-3, because our encoders start from scratch, not from
# ImageNet weights. The warm start stands in for those weights.
AUTHORS = {"optimizer": "sgd", "lr": 0.01, "schedule": "cosine", "dropout": 0.2}
REGIMES = {"default": {"pretrain_epochs": 0},
           "authors": {**AUTHORS, "pretrain_epochs": 0},
           "authors + warm start": {**AUTHORS, "pretrain_epochs": 5}}
ROWS = {"concat": {"fusion": "concat", "rollingq": False},
        "attention (vanilla)": {"fusion": "attention", "rollingq": False},
        "RollingQ, 1 roll": {"fusion": "attention", "rollingq": True, "max_rolls": 1},
        "RollingQ, 3 rolls": {"fusion": "attention", "rollingq": True, "max_rolls": 3},
        "RollingQ, every epoch": {"fusion": "attention", "rollingq": True, "max_rolls": None}}


@torch.no_grad()
def correct_per_sample(model, xs, y, batch_size=512):
    """'0'/'1' per test sample: whether the model gets it right."""
    model.eval()
    right = torch.cat([model([x[i:i + batch_size] for x in xs]).logits.argmax(-1) == y[i:i + batch_size]
                       for i in range(0, len(y), batch_size)])
    return "".join("1" if r else "0" for r in right.tolist())


def study_run(args, overrides, data, device, cache):
    """One run of the study; with --out its metrics are kept in DIR/runs/<hash>.json, so an
    interrupted study resumes where it stopped and identical runs are made once."""
    run_args = argparse.Namespace(**{**vars(args), "study": False, "load": None, "eval_only": False,
                                     "unimodal": None, **overrides})
    key = {k: v for k, v in vars(run_args).items() if k not in MODE_ARGS + ("device",)}
    path = cache / (hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16] + ".json") \
        if cache else None
    if path and path.exists():
        return json.loads(path.read_text()), True
    model, metrics = run(run_args, data, device, log=lambda line: None)
    if run_args.unimodal:
        j = data.names.index(run_args.unimodal)
        metrics["correct"] = correct_per_sample(model, [data.test_x[j].to(device)], data.test_y.to(device))
    if path:
        write_json(path, metrics, quiet=True)
    return metrics, False


def study(args, data, device):
    """Concat, vanilla attention and RollingQ (1 roll, 3 rolls, every epoch) in each regime
    over --seeds seeds, and the unimodal runs that measure the data's premise; prints the
    premise and one table per regime, and returns them."""
    cache = Path(args.out) / "runs" if args.out else None
    plan = [(regime, row, seed, {**REGIMES[regime], **ROWS[row]})
            for regime in REGIMES for row in ROWS for seed in range(args.seeds)]
    plan += [(regime, f"unimodal {m}", seed, {**REGIMES[regime], "unimodal": m})
             for regime in REGIMES if unimodal_regime(regime) == regime
             for m in data.names for seed in range(args.seeds)]
    results = {regime: {} for regime in REGIMES}
    t_start, made = time.perf_counter(), 0
    for i, (regime, row, seed, overrides) in enumerate(plan, 1):
        metrics, cached = study_run(args, {**overrides, "seed": seed}, data, device, cache)
        results[regime].setdefault(row, []).append(metrics)
        made += not cached
        left = (time.perf_counter() - t_start) / max(made, 1) * (len(plan) - i) if made else 0
        acc = "  ".join(f"{c} {a:.3f}" for c, a in metrics["final"]["acc"].items())
        print(f"[{i}/{len(plan)}] {regime} | {row} | seed {seed}: {acc}"
              + (" (kept from an earlier run)" if cached else f"  ~{left / 60:.0f} min left"), flush=True)
    report = {"premise": {}, "tables": {}}
    for regime, rows in results.items():
        favoured = favoured_modality(rows["attention (vanilla)"], data.names)
        report["premise"][regime] = premise(results[unimodal_regime(regime)], rows, data.names)
        report["tables"][regime] = study_table(rows, data.names, favoured)
    text = study_markdown(args, data, report)
    print("\n" + text)
    if args.out:
        write_json(Path(args.out) / "study.json", {"report": report, "runs": results})
        (Path(args.out) / "study.md").write_text(text + "\n")
        print(f"wrote {Path(args.out) / 'study.md'}")
    if args.plot:
        plot_study(results, data.names, args.plot)
    return results, report


def unimodal_regime(regime):
    """The regime whose unimodal runs measure `regime`'s premise: the same one without the warm
    start (a warm-started encoder alone is not the modality's unimodal baseline)."""
    bare = {**REGIMES[regime], "pretrain_epochs": 0}
    return next(r for r, overrides in REGIMES.items() if overrides == bare)


def mean_std(values, digits=3):
    if not values or any(v is None for v in values):
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def favoured_modality(vanilla_runs, names):
    """The modality vanilla attention's AIR favours (the sign for M = 2, the leader for M > 2)."""
    if len(names) == 2:
        return names[0] if statistics.mean(m["final"]["air"] for m in vanilla_runs) > 0 else names[1]
    leaders = [m["final"]["air_leader"] for m in vanilla_runs]
    return max(set(leaders), key=leaders.count)


def epochs_to(fraction, epochs):
    """The first epoch whose test accuracy reaches `fraction` of the final one."""
    final = epochs[-1]["test_acc"]
    return next(e["epoch"] for e in epochs if e["test_acc"] >= fraction * final)


def premise(unimodal_rows, rows, names):
    """The properties the paper assumes, measured: (a) comparable information, (b) one modality
    learned faster, (c) the cycle costs the slower one, (d) quality varies per sample."""
    uni = {m: unimodal_rows[f"unimodal {m}"] for m in names}
    acc = {m: [r["final"]["acc"]["clean"] for r in runs] for m, runs in uni.items()}
    speed = {m: [epochs_to(0.9, r["epochs"]) for r in runs] for m, runs in uni.items()}
    fast = min(names, key=lambda m: statistics.mean(speed[m]))
    slow = max(names, key=lambda m: statistics.mean(speed[m]))
    means = {m: statistics.mean(a) for m, a in acc.items()}
    gap = max(means.values()) - min(means.values())
    probe = {fusion: [r["final"]["probe_acc"][slow] for r in rows[fusion]] for fusion in ("attention (vanilla)", "concat")}
    probe_gap = statistics.mean(probe["concat"]) - statistics.mean(probe["attention (vanilla)"])
    stuck = [r["final"]["attention"][f"noise:{fast}"][fast] for r in rows["attention (vanilla)"]]
    only = {}                                         # test samples only modality m gets right
    for m in names:
        fractions = []
        for seed, run_m in enumerate(uni[m]):
            others = [uni[o][seed]["correct"] for o in names if o != m]
            right = [c == "1" and all(o[i] == "0" for o in others) for i, c in enumerate(run_m["correct"])]
            fractions.append(sum(right) / len(right))
        only[m] = fractions
    return {
        "a_unimodal_acc": {m: mean_std(a) for m, a in acc.items()}, "a_gap": round(gap, 3), "a_holds": gap <= 0.05,
        "b_epochs_to_90pct": {m: mean_std(s, 1) for m, s in speed.items()}, "b_faster": fast, "b_slower": slow,
        "b_holds": statistics.mean(speed[fast]) < statistics.mean(speed[slow]),
        "c_slower_probe": {f: mean_std(p) for f, p in probe.items()}, "c_probe_gap": round(probe_gap, 3),
        "c_attention_on_faster_as_noise": mean_std(stuck),
        "c_holds": probe_gap >= 0.05 and statistics.mean(stuck) >= 0.5,
        "d_only_this_modality_right": {m: mean_std(f) for m, f in only.items()},
        "d_holds": all(statistics.mean(f) >= 0.05 for f in only.values()),
    }


def study_table(rows, names, favoured):
    """One markdown table: a row per fusion, mean ± std over seeds."""
    attention_rows = {r: ms for r, ms in rows.items() if not r.startswith("unimodal")}
    noise = f"noise:{favoured}"
    header = (["fusion", "acc clean", f"acc {noise}", "\\|AIR\\|", "key gap", f"attn {favoured} (clean)",
               f"attn {favoured} ({noise})", "shift"] + [f"probe {m}" for m in names])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    def share(final, condition):                      # None for concat: mean_std then prints "-"
        return final["attention"][condition][favoured] if "attention" in final else None

    columns = [lambda f: f["acc"]["clean"], lambda f: f["acc"][noise],
               lambda f: abs(f["air"]) if "air" in f else None, lambda f: f.get("key_gap"),
               lambda f: share(f, "clean"), lambda f: share(f, noise),
               lambda f: None if "attention" not in f else share(f, "clean") - share(f, noise)]
    columns += [lambda f, m=m: f["probe_acc"][m] for m in names]
    for name, ms in attention_rows.items():
        cells = [name] + [mean_std([column(m["final"]) for m in ms]) for column in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return {"favoured": favoured, "markdown": "\n".join(lines)}


def study_markdown(args, data, report):
    source = args.data or "built-in synthetic data"
    out = [f"## Study: {source}, {args.seeds} seeds, {args.epochs} epochs (mean ± std over seeds)"]
    for regime, table in report["tables"].items():
        p = report["premise"][regime]
        out += ["", f"### Regime: {regime} {json.dumps(REGIMES[regime])}", "",
                f"Premise: (a) unimodal acc {per_modality(p['a_unimodal_acc'])}, gap {p['a_gap']}: {yes(p['a_holds'])}; "
                f"(b) epochs to 90 % of final {per_modality(p['b_epochs_to_90pct'])}, faster {p['b_faster']}: "
                f"{yes(p['b_holds'])}; "
                f"(c) {p['b_slower']} probe vanilla {p['c_slower_probe']['attention (vanilla)']} vs concat "
                f"{p['c_slower_probe']['concat']} (gap {p['c_probe_gap']}), attention on {p['b_faster']} when it is "
                f"noise {p['c_attention_on_faster_as_noise']}: {yes(p['c_holds'])}; (d) test samples only one "
                f"modality gets right {per_modality(p['d_only_this_modality_right'])}: {yes(p['d_holds'])}.",
                "", f"Favoured by vanilla attention (AIR): {table['favoured']}.", "", table["markdown"]]
    return "\n".join(out)


def per_modality(values):
    return ", ".join(f"{m} {v}" for m, v in values.items())


def yes(holds):
    return "holds" if holds else "does NOT hold"


def plot_study(results, names, path):
    """Attention share of the favoured modality per epoch, per regime (mean over seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.8), sharey=True, squeeze=False)
    for ax, (regime, rows) in zip(axes[0], results.items()):
        favoured = favoured_modality(rows["attention (vanilla)"], names)
        for k, (row, ms) in enumerate(r for r in rows.items() if r[0] in ROWS and r[0] != "concat"):
            epochs = [e["epoch"] for e in ms[0]["epochs"]]
            share = [statistics.mean(m["epochs"][i]["attention"][favoured] for m in ms) for i in range(len(epochs))]
            ax.plot(epochs, share, color=f"C{k}", label=row)
        ax.axhline(1 / len(names), color="grey", lw=0.8)
        ax.set(xlabel="epoch", title=regime, ylim=(0, 1))
    axes[0][0].set_ylabel("test attention share of the favoured modality")
    axes[0][0].legend(fontsize=8)
    save_figure(fig, path)


def save_figure(fig, path):
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------------------
# Anatomy of a roll: what pulls the query back


def anatomy(args, data, device, every=5):
    """One RollingQ run (the roll settings of the command line), traced every training step of
    each epoch's first 10 and every `every` steps after, from the training batches (no extra pass): the batch's AIR, its change
    since the last roll split into a query part (the query moved, keys held at the roll) and a
    key part (the keys moved), and the CLS attention share of each modality."""
    steps_per_epoch = math.ceil(len(data.train_y) / args.batch_size)
    trace, ref = [], {}

    def air_of(q, K):                                 # AIR of mean vectors, mean over heads
        return float(air_from_cosines(modality_cosines(q, K)).mean())

    def on_step(model, epoch, step, out):
        rolls = int(model.fusion.rolls)
        # every step of an epoch's first 10 (how fast a roll is undone), then every `every` steps, and
        # the last step of each epoch (the batch a roll uses)
        if step > 10 and step % every and step != steps_per_epoch and ref.get("rolls") == rolls:
            return
        q, K = out.query.float(), out.key_means.float()                   # (B, nh, hs), (B, nh, M, hs)
        q_bar, K_bar = q.mean(0), K.mean(0)                               # (nh, hs), (nh, M, hs)
        if ref.get("rolls") != rolls:
            ref.update(rolls=rolls, q=q_bar, K=K_bar)
        mass = out.attention.float()                                      # (B, nh, M)
        share = (mass / mass.sum(-1, keepdim=True)).mean((0, 1))          # (M,)
        trace.append({"epoch": epoch - 1 + step / steps_per_epoch, "rolls": rolls,
                      "air": float(air_from_cosines(modality_cosines(q, K).mean(0)).mean()),
                      "query_part": air_of(q_bar, ref["K"]) - air_of(ref["q"], ref["K"]),
                      "key_part": air_of(q_bar, K_bar) - air_of(q_bar, ref["K"]),
                      "attention": dict(zip(data.names, share.tolist()))})

    run_args = argparse.Namespace(**{**vars(args), "rollingq": True})
    _, metrics = run(run_args, data, device, on_step=on_step)
    summary = roll_summary(trace, steps_per_epoch)
    for s in summary:
        print(f"roll {s['roll']} after epoch {s['after_epoch']}: batch AIR {s['air_before']:+.3f} -> "
              f"{s['air_after']:+.3f}; one epoch later {s['air_one_epoch_later']:+.3f} (query part "
              f"{s['query_part']:+.3f}, key part {s['key_part']:+.3f}); |AIR| back to half its value "
              f"before the roll after {s['steps_to_half']} optimiser steps")
    if args.out:
        write_json(Path(args.out) / "anatomy.json", {"summary": summary, "trace": trace, "metrics": metrics})
    if args.plot:
        plot_anatomy(trace, data.names, args.plot)
    return trace, summary


def roll_summary(trace, steps_per_epoch):
    """Per roll: AIR before and right after, one epoch later (with its query and key parts),
    and how many optimiser steps until |AIR| is back to half its value before the roll."""
    summary = []
    for i, t in enumerate(trace):
        if i == 0 or t["rolls"] == trace[i - 1]["rolls"]:
            continue
        before = trace[i - 1]["air"]
        later = [u for u in trace[i:] if u["rolls"] == t["rolls"]]
        one = min(later, key=lambda u: abs(u["epoch"] - (t["epoch"] + 1)))
        back = next((u["epoch"] - t["epoch"] for u in later if abs(u["air"]) >= abs(before) / 2), None)
        # t is the first batch after the roll, seen before any update: epochs since t x steps = updates
        summary.append({"roll": t["rolls"], "after_epoch": math.floor(t["epoch"]), "air_before": before,
                        "air_after": t["air"], "air_one_epoch_later": one["air"], "query_part": one["query_part"],
                        "key_part": one["key_part"],
                        "steps_to_half": None if back is None else round(back * steps_per_epoch)})
    return summary


def plot_anatomy(trace, names, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    x = [t["epoch"] for t in trace]
    ax1.plot(x, [t["air"] for t in trace], color="k", lw=1, label="AIR of the batch")
    ax1.plot(x, [t["query_part"] for t in trace], color="C0", lw=1, ls="--", label="change since the roll: query part")
    ax1.plot(x, [t["key_part"] for t in trace], color="C3", lw=1, ls="--", label="change since the roll: key part")
    for i in range(1, len(trace)):
        if trace[i]["rolls"] != trace[i - 1]["rolls"]:
            for ax in (ax1, ax2):
                ax.axvline(math.floor(trace[i]["epoch"]), color="grey", lw=0.6)   # at the end of that epoch
    ax1.axhline(0, color="grey", lw=0.8)
    ax1.set(ylabel="AIR", title="Anatomy of a roll (grey lines: rolls)")
    ax1.legend(fontsize=8)
    for k, m in enumerate(names):
        ax2.plot(x, [t["attention"][m] for t in trace], color=f"C{k}", label=m)
    ax2.set(xlabel="epoch", ylabel="CLS attention share", ylim=(0, 1))
    ax2.legend(fontsize=8)
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------
# Benchmark


def bench(args, data, device, rounds=21):
    """Training samples/s without and with RollingQ, measured side by side in one process:
    the same batches, timed blocks of --bench-steps steps in alternating order; each RollingQ
    block ends with a roll (the once-per-epoch cost, here paid every block). The ratio is the
    median over rounds of the two blocks' time ratio, which shrugs off a noisy round."""
    setups = {}
    for name in ("vanilla", "RollingQ"):
        torch.manual_seed(args.seed)
        model = build_model(args, data).to(device)
        controller = RollingQ(args.beta, args.sigma, max_rolls=None) if name == "RollingQ" else None
        setups[name] = (model, make_optimizer(model, args), controller)
    xs, y = [x.to(device) for x in data.train_x], data.train_y.to(device)
    autocast = bf16_autocast(device)
    g = torch.Generator().manual_seed(args.seed)
    seconds = {name: [] for name in setups}
    for r in range(rounds + 1):                        # round 0 warms up and is not counted
        batches = [torch.randint(len(y), (args.batch_size,), generator=g).to(device) for _ in range(args.bench_steps)]
        for name in (("vanilla", "RollingQ") if r % 2 else ("RollingQ", "vanilla")):
            model, optimizer, controller = setups[name]
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for idx in batches:
                out, _ = train_step(model, [x[idx] for x in xs], y[idx], optimizer, autocast,
                                    stats=controller is not None)
                if controller is not None:
                    controller.observe(out)
            if controller is not None:
                controller.step(model)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r > 0:
                seconds[name].append(time.perf_counter() - t0)
        print(f"round {r}/{rounds}" + (" (warm-up)" if r == 0 else ""), flush=True)
    samples = rounds * args.bench_steps * args.batch_size
    rate = {name: samples / sum(s) for name, s in seconds.items()}
    ratio = statistics.median(r / v for r, v in zip(seconds["RollingQ"], seconds["vanilla"]))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {name}  preset {args.preset}  batch {args.batch_size}  {rounds} rounds x {args.bench_steps} steps each")
    print(f"vanilla   {rate['vanilla']:9.1f} samples/s")
    print(f"RollingQ  {rate['RollingQ']:9.1f} samples/s")
    print(f"time ratio RollingQ / vanilla = {ratio:.3f} (median over rounds)")
    return {"device": name, "samples_per_s": rate, "time_ratio": ratio}


# ----------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    device = get_device(args.device)
    data = datasets.load_npz(args.data) if args.data else datasets.synthetic(**PRESETS[args.preset]["data"])
    if args.unimodal:
        unimodal_data(data, args.unimodal)               # refuse an unknown name before any work
    if args.bench:
        result = bench(args, data, device)
        if args.out:
            write_json(Path(args.out) / "bench.json", result)
        return
    if args.study:
        study(args, data, device)
        return
    if args.anatomy:
        anatomy(args, data, device)
        return
    try:
        model, metrics = run(args, data, device)
        if int(os.environ.get("RANK", "0")) == 0:
            final = metrics["final"]
            print("final  " + "  ".join(f"acc[{c}] {a:.4f}" for c, a in final["acc"].items())
                  + (f"  air {final['air']:+.3f}" if "air" in final else ""))
            if args.out:
                write_json(Path(args.out) / "metrics.json", metrics)
            if args.save:
                save_checkpoint(args.save, model)
                print(f"saved the model to {args.save} (reload: --load {args.save})")
    finally:
        if dist.is_initialized():
            # free DDP's reducer while the group lives, wait for every rank, then end the group:
            # gloo work left for interpreter shutdown aborts the process (SIGABRT)
            gc.collect()
            dist.barrier()
            dist.destroy_process_group()


def write_json(path, obj, quiet=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))
    if not quiet:
        print(f"wrote {path}")


def cli(argv=None):
    """main() with every refusal as one line on stderr and exit status 2, never a traceback."""
    try:
        main(argv)
    except BrokenPipeError:                              # the reader went away (| head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except (UsageError, datasets.DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
