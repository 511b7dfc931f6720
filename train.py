"""Train a multimodal Transformer with or without RollingQ and measure the fusion cycle.

    python train.py --rollingq                 # RollingQ on the built-in synthetic data
    python train.py                            # vanilla attention fusion, same data
    python train.py --compare --seeds 5        # vanilla, concat and RollingQ: README's table
    python train.py --data feats.npz --rollingq --out runs/mine --save runs/mine/model.pt
    torchrun --nproc_per_node=2 train.py --rollingq     # DistributedDataParallel

Each epoch prints one line; --out DIR writes DIR/metrics.json (see README).
"""

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import data as datasets
from rollingq import Config, MultimodalTransformer, RollingQ, air_from_cosines, modality_cosines


# --preset: defaults for the CLI and, for the built-in data, the synthetic set's shape
PRESETS = {
    "small": {"args": {}, "data": {}},
    "paper": {"args": {"width": 768, "layers": 4, "encoder_heads": 12, "heads": 1, "batch_size": 32},
              "data": {"n_train": 1024, "n_test": 256,
                       "modalities": (datasets.Modality("audio", 256, 128, 1.0, 0.3),
                                      datasets.Modality("visual", 196, 128, 0.35, 0.3))}},
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
    g.add_argument("--max-rolls", type=int, default=None,
                   help="roll at most this many times in a run (default: no limit: every epoch but the last, while |AIR| > beta; "
                        "the authors use 1, see README)")
    g = p.add_argument_group("model and training")
    g.add_argument("--data", metavar="PATH.npz", help="real features (see README); default: built-in synthetic data")
    g.add_argument("--epochs", type=int, default=25, help="passes over the training set")
    g.add_argument("--batch-size", type=int, default=64, help="global batch size (split across ranks)")
    g.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw", help="sgd uses momentum 0.9")
    g.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    g.add_argument("--width", type=int, default=64, help="model width d_model")
    g.add_argument("--layers", type=int, default=2, help="Transformer blocks per modality encoder")
    g.add_argument("--encoder-heads", type=int, default=4, help="attention heads in the encoder blocks")
    g.add_argument("--heads", type=int, default=1, help="fusion attention heads (the paper uses 1)")
    g.add_argument("--seed", type=int, default=0, help="seed for initialisation and batch order")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    g = p.add_argument_group("files")
    g.add_argument("--out", metavar="DIR", help="write DIR/metrics.json")
    g.add_argument("--save", metavar="PATH", help="save the trained model (config + state_dict)")
    g.add_argument("--load", metavar="PATH",
                   help="start from a saved model (its own architecture replaces --width, --layers, ...)")
    g.add_argument("--eval-only", action="store_true", help="with --load: evaluate only, no training")
    g = p.add_argument_group("modes")
    g.add_argument("--compare", action="store_true",
                   help="run vanilla attention, concat and RollingQ over --seeds seeds; print a markdown table")
    g.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 for --compare")
    g.add_argument("--plot", metavar="PNG", help="with --compare: draw AIR per epoch and attention shares "
                                                 "(needs matplotlib)")
    g.add_argument("--bench", action="store_true",
                   help="print training samples/s without and with RollingQ, side by side, and their ratio")
    g.add_argument("--bench-steps", type=int, default=20, help="steps per timed block in --bench")
    g.add_argument("--preset", choices=sorted(PRESETS), default="small",
                   help="paper: width 768, 4 encoder layers of 12 heads, 1 fusion head, hundreds of tokens "
                        "per modality (a throughput setting; explicit flags still win)")
    preset = p.parse_known_args(argv)[0].preset
    p.set_defaults(**PRESETS[preset]["args"])
    args = p.parse_args(argv)
    positive = ("epochs", "batch_size", "lr", "width", "layers", "encoder_heads", "heads", "seeds", "bench_steps")
    for name in positive:
        if not getattr(args, name) > 0:                # also refuses nan
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not (args.beta >= 0 and args.sigma >= 0 and (args.max_rolls is None or args.max_rolls >= 0)):
        raise UsageError("--beta, --sigma and --max-rolls must be >= 0")
    if args.eval_only and not args.load:
        raise UsageError("--eval-only needs --load PATH (a model saved with --save)")
    if args.rollingq and args.fusion == "concat":
        raise UsageError("--rollingq rolls the fusion attention's query; it needs --fusion attention")
    if args.bench and args.fusion == "concat":
        raise UsageError("--bench times RollingQ against vanilla attention; it needs --fusion attention")
    if (args.compare or args.bench) and (args.load or args.eval_only):
        raise UsageError("--compare and --bench train fresh models; they take no --load or --eval-only")
    if args.compare and args.bench:
        raise UsageError("choose one of --compare and --bench")
    if args.plot and not args.compare:
        raise UsageError("--plot draws the --compare results; add --compare")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if (args.compare or args.bench) and world > 1:
        raise UsageError("--compare and --bench run in one process; start them with python, not torchrun")
    if args.batch_size < world:
        raise UsageError(f"--batch-size {args.batch_size} is smaller than the {world} processes it is split across")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out}: exists and is not a directory")
    if args.save and Path(args.save).is_dir():
        raise UsageError(f"--save {args.save}: is a directory; give a file path such as {args.save}/model.pt")
    for name in ("heads", "encoder_heads"):
        if args.width % getattr(args, name):
            raise UsageError(f"--width {args.width} must be divisible by --{name.replace('_', '-')} {getattr(args, name)}")
    return args


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
# Evaluation


def noise_like(x, generator):
    """Gaussian noise with the per-position mean and std of x over samples: (N, L, D)."""
    mean, std = x.mean(0, keepdim=True), x.std(0, correction=0, keepdim=True)   # (1, L, D)
    z = torch.randn(x.shape, generator=generator, device="cpu").to(x.device)
    return mean + std * z


@torch.no_grad()
def evaluate(model, xs, y, batch_size=512):
    """Accuracy, probe accuracy per modality and, for attention fusion, the CLS attention
    share per modality, AIR and the key gap, over the whole set."""
    model.eval()
    attention_fusion = model.cfg.fusion == "attention"
    correct, probe_correct, shares, cos, keys = 0, 0, 0, 0, 0
    for i in range(0, len(y), batch_size):
        out = model([x[i:i + batch_size] for x in xs], stats=attention_fusion, attention=attention_fusion)
        yb = y[i:i + batch_size]
        correct += (out.logits.argmax(-1) == yb).sum()
        probe_correct += torch.stack([(p.argmax(-1) == yb).sum() for p in out.probe_logits])   # (M,)
        if attention_fusion:
            mass = out.attention.float()                                  # (B, nh, M)
            shares += (mass / mass.sum(-1, keepdim=True)).mean(1).sum(0)  # (M,) share among modalities
            q, K = out.query.float(), out.key_means.float()               # (B, nh, hs), (B, nh, M, hs)
            cos += modality_cosines(q, K).sum(0)                          # (nh, M)
            keys = keys + K.sum(0)                                        # (nh, M, hs)
    model.train()
    n, names = len(y), list(model.cfg.modalities)
    result = {"acc": float(correct) / n,
              "probe_acc": {m: float(c) / n for m, c in zip(names, probe_correct)}}
    if attention_fusion:
        result["attention"] = {m: float(s) / n for m, s in zip(names, shares)}
        air = air_from_cosines(cos / n)                                   # (nh,)
        result["air_heads"] = air.tolist()
        result["air"] = float(air.mean())                                 # one head in the paper
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
    results = {c: evaluate(model, cxs, y) for c, cxs in conditions.items()}
    final = {"acc": {c: r["acc"] for c, r in results.items()},
             "probe_acc": results["clean"]["probe_acc"]}
    if model.cfg.fusion == "attention":
        final["attention"] = {c: r["attention"] for c, r in results.items()}
        for key in ("air", "air_heads", "key_gap"):
            final[key] = results["clean"][key]
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


def build_model(args, data):
    return MultimodalTransformer(Config(data.modalities, data.n_classes, d_model=args.width, n_layers=args.layers,
                                        n_heads=args.encoder_heads, fusion_heads=args.heads, fusion=args.fusion))


def make_optimizer(model, args):
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)


def bf16_autocast(device):
    """bf16 autocast on CUDA, nothing on the CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_step(model, xs, y, optimizer, controller, autocast):
    """One optimisation step on a batch; RollingQ only reads what the forward pass made."""
    with autocast:
        out = model(xs, stats=controller is not None)
        # classifier loss + one probe loss per modality (probes see detached features)
        loss = F.cross_entropy(out.logits.float(), y)
        loss = loss + sum(F.cross_entropy(p.float(), y) for p in out.probe_logits)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if controller is not None:
        controller.observe(out)
    return loss.detach()


def run(args, data, device, log=print):
    """Train (unless --eval-only) and evaluate one model; returns (model, metrics)."""
    rank, world, device = setup_distributed(device)
    torch.manual_seed(args.seed)
    model = load_checkpoint(args.load, data) if args.load else build_model(args, data)
    if args.rollingq and model.cfg.fusion != "attention":
        raise UsageError(f"--rollingq: the model in {args.load} uses {model.cfg.fusion} fusion, not attention")
    model.to(device)
    config = {k: v for k, v in vars(args).items() if k not in ("compare", "seeds", "plot", "bench", "bench_steps")}
    config["model"] = asdict(model.cfg)                   # the architecture in use (a loaded one, with --load)
    metrics = {"config": config, "epochs": [], "final": None}
    # in-memory data: moved to the device once, batches are index slices there
    test_xs, test_y = [x.to(device) for x in data.test_x], data.test_y.to(device)
    if args.eval_only:
        metrics["final"] = final_evaluation(model, test_xs, test_y, data.names)
        return model, metrics

    ddp_model = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    controller = RollingQ(args.beta, args.sigma, args.max_rolls) if args.rollingq else None
    optimizer = make_optimizer(model, args)
    autocast = bf16_autocast(device)
    xs, y = [x.to(device) for x in data.train_x], data.train_y.to(device)
    g = torch.Generator().manual_seed(args.seed)          # same order on every rank
    train_seconds = 0.0
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        order = torch.randperm(len(y), generator=g).to(device)
        total_loss, steps = torch.zeros((), device=device), 0
        for start in range(0, len(y) - world + 1, args.batch_size):   # no rank gets an empty share
            idx = order[start:start + args.batch_size].tensor_split(world)[rank]   # this rank's share
            total_loss += train_step(ddp_model, [x[idx] for x in xs], y[idx], optimizer, controller, autocast)
            steps += 1
        if world > 1:
            dist.all_reduce(total_loss)                   # the mean over ranks
            total_loss /= world
        # a roll steers the training that follows it; after the last epoch none follows
        rolling = controller is not None and epoch < args.epochs
        record = controller.step(model) if rolling else {"rolled": False}
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_seconds += time.perf_counter() - t0
        ev = evaluate(model, test_xs, test_y)
        row = {"epoch": epoch, "train_loss": float(total_loss) / steps, "test_acc": ev["acc"],
               "air": ev.get("air"), "key_gap": ev.get("key_gap"), "rolled": record["rolled"],
               "attention": ev.get("attention")}
        metrics["epochs"].append(row)
        if rank == 0:
            air = "   -  " if row["air"] is None else f"{row['air']:+.3f}"
            rolls = int(model.fusion.rolls) if model.cfg.fusion == "attention" else 0
            log(f"epoch {epoch:3d}/{args.epochs}  loss {row['train_loss']:.4f}  test_acc {ev['acc']:.4f}  "
                f"air {air}  rolls {rolls}  {time.perf_counter() - t0:.1f}s")
    metrics["final"] = final_evaluation(model, test_xs, test_y, data.names)
    metrics["final"]["train_seconds"] = train_seconds
    if world > 1:
        metrics["distributed"] = {"world_size": world, "ranks_agree": ranks_agree(model, metrics)}
    return model, metrics


def ranks_agree(model, metrics):
    """True when every rank ends with the same rotation and the same metrics."""
    mine = (model.fusion.R.cpu().tolist() if model.cfg.fusion == "attention" else None,
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
# Comparison over seeds


def compare(args, data, device):
    """Vanilla attention, concat and RollingQ over seeds: a markdown table of mean ± std."""
    rolls = "no limit" if args.max_rolls is None else args.max_rolls
    variants = {"attention (vanilla)": {"fusion": "attention", "rollingq": False},
                "concat": {"fusion": "concat", "rollingq": False},
                "RollingQ, 1 roll": {"fusion": "attention", "rollingq": True, "max_rolls": 1},
                f"RollingQ, max-rolls {rolls}": {"fusion": "attention", "rollingq": True}}
    runs = {name: [] for name in variants}
    for seed in range(args.seeds):
        for name, overrides in variants.items():
            run_args = argparse.Namespace(**{**vars(args), **overrides, "seed": seed, "load": None})
            print(f"# {name}, seed {seed}", flush=True)
            _, metrics = run(run_args, data, device, log=lambda s: None)
            runs[name].append(metrics)
            f = metrics["final"]
            print(f"  acc {f['acc']}  air {f.get('air')}", flush=True)
    table = markdown_table(runs, data.names)
    print()
    print(table)
    return runs, table


def mean_std(values):
    if any(v is None for v in values):
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def markdown_table(runs, names):
    conditions = ["clean"] + [f"noise:{m}" for m in names]
    header = (["fusion"] + [f"acc {c}" for c in conditions] + ["\\|AIR\\|"]
              + [f"attn {names[0]} ({c})" for c in conditions])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, ms in runs.items():
        finals = [m["final"] for m in ms]
        cells = [name] + [mean_std([f["acc"][c] for f in finals]) for c in conditions]
        cells.append(mean_std([abs(f["air"]) if "air" in f else None for f in finals]))
        cells += [mean_std([f["attention"][c][names[0]] if "attention" in f else None for f in finals])
                  for c in conditions]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs, names, path):
    """AIR per epoch and attention share by test condition, for each attention-fusion variant.
    Needs matplotlib; without it, says so and draws nothing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot: matplotlib is not installed, no figure written to {path}", file=sys.stderr)
        return
    variants = [name for name, ms in runs.items() if "air" in ms[0]["final"]]
    conditions = ["clean"] + [f"noise:{m}" for m in names]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / len(variants)
    for k, name in enumerate(variants):
        for i, m in enumerate(runs[name]):
            ax1.plot([e["epoch"] for e in m["epochs"]], [e["air"] for e in m["epochs"]], color=f"C{k}",
                     alpha=0.6, label=name if i == 0 else None)
        share = [statistics.mean(m["final"]["attention"][c][names[0]] for m in runs[name]) for c in conditions]
        ax2.bar([i + (k - (len(variants) - 1) / 2) * width for i in range(len(conditions))], share, width,
                color=f"C{k}", label=name)
    ax1.axhline(0, color="grey", lw=0.8)
    ax1.set(xlabel="epoch", ylabel="AIR on the test set", title=f"AIR per epoch ({len(runs[variants[0]])} seeds)")
    ax1.legend()
    ax2.set_xticks(range(len(conditions)), conditions)
    ax2.set(ylabel=f"CLS attention share on {names[0]}", ylim=(0, 1), title="Attention share by test condition")
    ax2.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


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
                train_step(model, [x[idx] for x in xs], y[idx], optimizer, controller, autocast)
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
    if args.bench:
        result = bench(args, data, device)
        if args.out:
            write_json(Path(args.out) / "bench.json", result)
        return
    if args.compare:
        runs, table = compare(args, data, device)
        if args.out:
            write_json(Path(args.out) / "compare.json", {"runs": runs, "table": table})
        if args.plot:
            plot(runs, data.names, args.plot)
        return
    model, metrics = run(args, data, device)
    if int(os.environ.get("RANK", "0")) == 0:
        final = metrics["final"]
        print("final  " + "  ".join(f"acc[{c}] {a:.4f}" for c, a in final["acc"].items())
              + (f"  air {final['air']:+.3f}" if "air" in final else ""))
        if args.out:
            write_json(Path(args.out) / "metrics.json", metrics)
        if args.save:
            save_checkpoint(args.save, model)
    if dist.is_initialized():
        dist.destroy_process_group()


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))
    print(f"wrote {path}")


def cli(argv=None):
    """main() with every refusal as one line on stderr and exit status 2, never a traceback."""
    try:
        main(argv)
    except (UsageError, datasets.DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
