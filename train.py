"""Train a multimodal Transformer with or without RollingQ; report accuracy, AIR and attention.

    python train.py --rollingq                 # RollingQ on the default data
    python train.py                            # vanilla attention fusion, same data and seed
    python train.py --data feats.npz --rollingq --out runs/mine --save runs/mine/model.pt
    torchrun --nproc_per_node=2 train.py --rollingq     # DistributedDataParallel

Read top to bottom: the loop, the evaluation, one run, the command line. experiments/ call
run() and train_step() (the study adds the paper's measures); README says what a run prints
and writes.
"""

import argparse
import gc
import json
import math
import os
import re
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data as datasets
from rollingq import (Config, MultimodalTransformer, RollingQ, Unimodal, attention_imbalance_rate, key_gap,
                      modality_cosines, modality_leads)

# ----------------------------------------------------------------------------------------
# The training loop


def train_step(model, xs, y, optimizer, autocast, stats=False):
    """One optimisation step on a batch; returns the forward output and the loss."""
    with autocast:
        out = model(xs, stats=stats)
        # the classifier's loss + one loss per probe; the probes see detached features, so their
        # losses train the probes and nothing else (RollingQ does not need them)
        loss = F.cross_entropy(out.logits.float(), y) + sum(F.cross_entropy(p.float(), y) for p in out.probe_logits)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return out, loss.detach()


def train(model, xs, y, args, epochs, device, controller=None, on_epoch=None, on_step=None, log=print, resume=None, keep=None):
    """`epochs` passes over (xs, y) in shuffled batches, split across ranks under torchrun; RollingQ
    (its rotation gathers in every training step) may roll after every epoch but the last; keep(state)
    after each epoch gets what `resume` takes to go on as if never stopped. Returns the training seconds."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    starts = range(0, len(y) - world + 1, args.batch_size)           # no rank gets an empty share
    optimizer = make_optimizer(model, args)
    schedule = make_schedule(optimizer, args, len(starts), epochs)
    autocast = bf16_autocast(device)
    g = torch.Generator().manual_seed(args.seed)                      # the same order on every rank
    first, seconds = 1, 0.0
    if resume is not None:                                            # where it stopped, every random state included
        first, seconds, rng = resume["epoch"] + 1, resume["seconds"], resume["rng"]
        optimizer.load_state_dict(resume["optimizer"]), schedule.load_state_dict(resume["schedule"])
        g.set_state(rng["shuffle"]), torch.set_rng_state(rng["torch"]), torch.cuda.set_rng_state_all(rng["cuda"])
    for epoch in range(first, epochs + 1):
        t0 = noted = time.perf_counter()
        order = torch.randperm(len(y), generator=g).to(device)
        total_loss = torch.zeros((), device=device)
        for step, start in enumerate(starts, 1):
            idx = order[start:start + args.batch_size].tensor_split(world)[rank]   # this rank's share
            out, loss = train_step(net, [x[idx] for x in xs], y[idx], optimizer, autocast, stats=on_step is not None)
            schedule.step()
            total_loss += loss
            if on_step is not None:
                on_step(model, epoch, step, out)
            if rank == 0 and time.perf_counter() - noted > 10:       # progress within a long epoch
                log(f"  epoch {epoch}: step {step}/{len(starts)}, {(time.perf_counter() - t0) / step:.1f} s a step")
                noted = time.perf_counter()
        if world > 1:
            dist.all_reduce(total_loss)
            total_loss /= world                                       # the mean over ranks
        if controller is not None and epoch < epochs and args.roll_stats == "pass" and controller.may_roll():
            stats_pass(model, xs, controller, args.batch_size, autocast)
        record = controller.step() if controller is not None and epoch < epochs else {"rolled": False}
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        if on_epoch is not None:
            on_epoch(epoch, float(total_loss) / len(starts), record, time.perf_counter() - t0)
        if keep is not None:                                          # the shuffle's, dropout's (torch's, CUDA's)
            keep({"epoch": epoch, "seconds": seconds, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                  "rng": {"shuffle": g.get_state(), "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()}})
    return seconds


def stats_pass(model, xs, controller, batch_size, autocast):
    """--roll-stats pass, the authors' statistics: after the epoch, a no-grad eval-mode pass over
    the training set gives K̄; AIR and q̄ stay the last training batch's, as the authors take them
    (collecting()). The order of the pass changes nothing but rounding. Under torchrun every
    rank passes over the whole set: the means are the same."""
    model.eval()
    with controller.collecting(), torch.no_grad():
        for i in range(0, len(xs[0]), batch_size):
            with autocast:
                model([x[i:i + batch_size] for x in xs])
    model.train()


def make_optimizer(model, args):
    if args.optimizer == "sgd":                                       # the authors'
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)


def make_schedule(optimizer, args, steps_per_epoch, epochs):
    """constant, or the authors' cosine: linear warm-up over 2.5 epochs, then cosine to zero."""
    total, warmup = epochs * steps_per_epoch, 2.5 * steps_per_epoch

    def factor(step):                                                 # step = steps taken so far
        if args.schedule == "constant":
            return 1.0
        return (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) /
                                                                               (total - warmup)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def bf16_autocast(device):
    """bf16 autocast on CUDA, nothing on the CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# ----------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model, xs, y, names, batch_size=512, per_sample=False):
    """Accuracy, each probe's accuracy and, for attention fusion, each modality's CLS attention
    share, AIR (with its leader for M > 2) and the key gap, over the whole set. per_sample: also
    return each sample's attention share per modality, (N, M) (None for concat)."""
    model.eval()
    attention = hasattr(model, "fusion")
    batch_size = datasets.rows_per_batch(xs[0], batch_size)
    correct, probe_correct, shares, cos, keys = 0, 0, [], 0, 0
    for i in range(0, len(y), batch_size):
        out = model([x[i:i + batch_size] for x in xs], stats=attention)
        yb = y[i:i + batch_size]
        correct += (out.logits.argmax(-1) == yb).sum()
        if out.probe_logits:
            probe_correct += torch.stack([(p.argmax(-1) == yb).sum() for p in out.probe_logits])   # (M,)
        if attention:
            mass = out.attention.float()                              # (B, nh, M)
            shares.append((mass / mass.sum(-1, keepdim=True)).mean(1))   # (B, M) share among the modalities
            q, K = out.query.float(), out.key_means.float()           # (B, nh, hs), (B, nh, M, hs)
            cos += modality_cosines(q, K).sum(0)                      # (nh, M)
            keys = keys + K.sum(0)                                    # (nh, M, hs)
    model.train()
    n = len(y)
    result = {"acc": float(correct) / n}
    if len(names) > 1:
        result["probe_acc"] = {m: float(c) / n for m, c in zip(names, probe_correct)}
    shares = torch.cat(shares) if attention else None                 # (N, M)
    if attention:
        result["attention"] = {m: float(s) for m, s in zip(names, shares.mean(0))}
        air = attention_imbalance_rate(cos / n)                       # (nh,) the paper's AIR, per head
        result.update(air_heads=air.tolist(), air=float(air.mean()), key_gap=key_gap(keys / n))
        if len(names) > 2:                                            # whose lead AIR is
            result["air_leader"] = names[int(modality_leads((cos / n).mean(0)).argmax())]
    return (result, shares) if per_sample else result


def final_evaluation(model, xs, y, names):
    """The test set clean, and with each modality in turn replaced by noise of its own mean and
    std (noise:m, data.corrupted at level 1): how much the model leans on each."""
    zs, _ = datasets.noise_draws(xs)                                  # the same draw for every model
    clean = evaluate(model, xs, y, names)
    final = {**clean, "acc": {"clean": clean["acc"]}}
    if "attention" in clean:
        final["attention"] = {"clean": clean["attention"]}
    for j, m in enumerate(names):
        ev = evaluate(model, [datasets.corrupted(x, 1.0, zs[j]) if i == j else x for i, x in enumerate(xs)], y, names)
        final["acc"][f"noise:{m}"] = ev["acc"]
        if "attention" in ev:
            final["attention"][f"noise:{m}"] = ev["attention"]
    return final


# ----------------------------------------------------------------------------------------
# One run


def run(args, data, device, log=print, on_step=None, warm_start=None, measures=None, build=MultimodalTransformer):
    """Build (or load), train unless --eval-only, and evaluate one model; returns (model, metrics).
    The study's hooks: warm_start(model, xs, y, test_xs, test_y) before training, its record kept
    as metrics["pretrain"]; measures(model, test_xs, test_y, data, final), more for metrics["final"]; build(cfg)."""
    device, rank, world = setup_distributed(device)
    torch.manual_seed(args.seed)
    data = datasets.carve_validation(data, args.val_fraction, args.seed) if args.val_fraction else data
    if args.unimodal:                                                 # the multimodal model's encoder, alone
        cfg = build_config(args, data)
        data = data.select(args.unimodal)
        model, trained_on = Unimodal(cfg, args.unimodal), None
    else:
        model, trained_on = load_checkpoint(args.load, data, args.data, args.seed) if args.load else \
            (build(build_config(args, data)), None)
    if args.rollingq and not hasattr(model, "fusion"):
        raise UsageError(f"--rollingq: the model in {args.load} uses concat fusion, not attention")
    controller = checked(RollingQ, model, args.beta, args.sigma, args.max_rolls) if args.rollingq else None
    model.to(device)
    resumed = load_resumable(args.resume, args, model) if args.resume else None   # its epoch lines go on from it
    if rank == 0:
        log(describe(args, data, model, device, world, trained_on))
    metrics = {"config": run_config(args, model), "epochs": [], "final": None, **(resumed["metrics"] if resumed else {})}
    # in-memory data: moved to the device once, batches are index slices there (a folder: read batch by batch)
    test_xs, test_y = [x.to(device) for x in data.test_x], data.test_y.to(device)
    val_xs, val_y = ([x.to(device) for x in data.val_x], data.val_y.to(device)) if data.val_y is not None else (None, None)

    def finish(extra):
        final = final_evaluation(model, test_xs, test_y, data.names)
        metrics["final"] = {**final, **(measures(model, test_xs, test_y, data, final) if measures else {}), **extra}
        if val_y is not None and metrics["epochs"]:                   # the first epoch of the best validation accuracy
            best = max(metrics["epochs"], key=lambda e: e["val_acc"])
            metrics["final"]["best_val_epoch"] = {k: best[k] for k in ("epoch", "val_acc", "test_acc")}
        if world > 1:
            metrics["distributed"] = {"world_size": world, "ranks_agree": ranks_agree(model, metrics, world)}
        return model, metrics

    if args.eval_only:
        return finish({})
    xs, y = [x.to(device) for x in data.train_x], data.train_y.to(device)
    if warm_start is not None and resumed is None:                    # a resumed run: its start is in its state
        metrics["pretrain"] = warm_start(model, xs, y, test_xs, test_y)

    def on_epoch(epoch, loss, record, seconds):                       # evaluate on the test set, print one line
        t0 = time.perf_counter()
        ev = evaluate(model, test_xs, test_y, data.names)
        if val_y is not None:
            ev["val_acc"] = evaluate(model, val_xs, val_y, data.names)["acc"]
        metrics["epochs"].append({"epoch": epoch, "train_loss": loss, "test_acc": ev["acc"], "rolled": record["rolled"],
                                  **{k: ev.get(k) for k in ("air", "key_gap", "attention")},
                                  **{k: ev[k] for k in ("air_leader", "val_acc") if k in ev}})
        if rank == 0:
            rolls = int(model.fusion.rotation.rolls) if controller is not None else None
            log(epoch_line(epoch, args.epochs, loss, ev, rolls, record, seconds + time.perf_counter() - t0))

    def keep(state, path=args.checkpoint or args.resume):   # all a resume takes (R and the rolls: the state dict)
        if rank == 0:                 # written whole, then renamed: an interruption leaves the last one intact
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            torch.save({**state, "model": model.state_dict(), "config": run_config(args, model), "metrics":
                        {k: metrics[k] for k in ("epochs", "pretrain") if k in metrics}}, f"{path}.part")
            os.replace(f"{path}.part", path)

    train_seconds = train(model, xs, y, args, args.epochs, device, controller, on_epoch, on_step, log, resumed,
                          keep if args.checkpoint or args.resume else None)   # a resumed run writes on where it read
    return finish({"train_seconds": train_seconds})


def setup_distributed(device):
    """Under torchrun: the process group (nccl with a GPU per process, or gloo on the CPU) and this
    process's device; returns (device, rank, world size), (device, 0, 1) without torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return device, 0, 1
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        if device.index >= torch.cuda.device_count():
            raise UsageError(f"torchrun started more processes than the {torch.cuda.device_count()} GPU(s) here")
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank(), dist.get_world_size()


def ranks_agree(model, metrics, world):
    """Whether every rank ended with the same rotation, epochs and accuracies."""
    mine = (model.fusion.rotation.R.tolist() if hasattr(model, "fusion") else None,
            json.dumps({"epochs": metrics["epochs"], "acc": metrics["final"]["acc"]}, sort_keys=True))
    every = [None] * world
    dist.all_gather_object(every, mine)
    return all(e == every[0] for e in every)


def build_config(args, data):
    return checked(Config, data.modalities, data.n_classes, d_model=args.width, n_layers=args.layers,
                   n_heads=args.encoder_heads, fusion_heads=args.heads, fusion=args.fusion,
                   fusion_head=args.fusion_head, fusion_dropout=args.dropout)


def checked(make, *args, **kwargs):
    """make(...), with its ValueError (Config's, RollingQ's) as a one-line refusal naming the flags."""
    try:
        return make(*args, **kwargs)
    except ValueError as e:
        flags = {"d_model": "--width", "n_layers": "--layers", "n_heads": "--encoder-heads", "fusion_heads": "--heads",
                 "fusion_dropout": "--dropout"}
        names = [f"{name} is {flag}" for name, flag in flags.items() if re.search(rf"\b{name}\b", str(e))]
        raise UsageError(f"{e}" + (f" ({', '.join(names)})" if names else "")) from None


def describe(args, data, model, device, world, trained_on=None):
    """The opening line: what this run is about to do (`trained_on`: load_checkpoint's word on the model's data)."""
    shapes = ", ".join(f"{m} {L}x{D}" for m, (L, D) in data.modalities.items())
    parts = [f"data {args.data}: {shapes} (tokens x features), {data.sizes}, {data.n_classes} classes"]
    rolled = int(model.fusion.rotation.rolls) if hasattr(model, "fusion") else 0   # > 0: a loaded model's rolls
    if args.load:
        notes = [trained_on, args.rollingq and f"rolls done: {rolled}"]
        parts.append(f"loaded {args.load}" + "".join(f" ({n})" for n in notes if n))
    if args.unimodal:
        parts.append(f"unimodal {args.unimodal}, {args.fusion_head} encoder")
    elif not hasattr(model, "fusion"):
        parts.append(f"concat fusion, {model.cfg.fusion_head} encoders")
    else:
        if args.rollingq:
            rolls = "none" if args.max_rolls is None else args.max_rolls
            method = (f"RollingQ (beta {args.beta:g}, sigma {args.sigma:g}, max-rolls {rolls}, roll-stats {args.roll_stats}"
                      + ("; no roll: a roll needs an epoch after it" if args.epochs < 2 else "") + ")")
        elif rolled:                                                  # a loaded model keeps its rotation
            method = f"loaded with its rotation (rolled {rolled} time{'s' * (rolled != 1)}), no further rolls"
        else:
            method = "vanilla"
        parts += [f"attention fusion, {model.cfg.fusion_head} head, fusion dropout {model.cfg.fusion_dropout:g}, {method}",
                  f"AIR > 0: {data.names[0]} favoured, < 0: {data.names[1]}" if len(data.names) == 2
                  else "AIR: the favoured modality's lead (named)"]
    if not args.eval_only:
        parts.append(f"{args.optimizer} lr {args.lr:g} {args.schedule}, {args.epochs} epochs, batch {args.batch_size}")
    threads = f" ({torch.get_num_threads()} threads: results depend on it)" if device.type == "cpu" else ""
    return " | ".join(parts + [f"{device}{threads}" + (f" x {world} processes" if world > 1 else ""),
                               f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters"])


def epoch_line(epoch, epochs, loss, ev, rolls, record, seconds):
    """The progress line: loss, test accuracy, AIR (its leader for M > 2), attention shares, rolls."""
    line = f"epoch {epoch:3d}/{epochs}  loss {loss:.4f}" + (f"  val_acc {ev['val_acc']:.4f}" if "val_acc" in ev else "")
    line += f"  test_acc {ev['acc']:.4f}"
    if "air" in ev:
        line += f"  air {ev['air']:+.3f}" + (f" ({ev['air_leader']})" if "air_leader" in ev else "")
        line += "  attn " + " ".join(f"{a:.2f}" for a in ev["attention"].values())
    if rolls is not None:
        which = f" heads {record.get('heads')}" if len(record.get("air", [])) > 1 else ""
        line += f"  rolls {rolls}" + (f"  rolled{which} at batch AIR " + " ".join(
            f"{record['air'][h]:+.3f}" for h in record["heads"]) if record["rolled"] else "")
    return line + f"  {seconds:.1f}s"


def run_config(args, model):
    """metrics.json's config: the arguments and the architecture in use (a loaded model's, and where from)."""
    arch = asdict(model.cfg) if hasattr(model, "cfg") else None       # None: --unimodal
    rolls_done = int(model.fusion.rotation.rolls) if hasattr(model, "fusion") else 0
    if args.eval_only:
        return {"load": args.load, "eval_only": True, "data": args.data, "device": args.device,
                "rolls_done": rolls_done, "model": arch}
    skip = ("out", "save") + (ARCHITECTURE if args.load else ())      # a checkpoint brings its own architecture
    config = {k: v for k, v in vars(args).items() if k not in skip}
    return {**config, "model": arch, **({"loaded": {"path": args.load, "rolls_done": rolls_done}} if args.load else {})}


def save_checkpoint(path, model, data, seed):
    """The config, the state dict (with the rotation) and the data it was trained on: --data, and
    for a set in the box the seed it was drawn from."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": asdict(model.cfg), "model": model.state_dict(), "data": str(data),
                "data_seed": seed if data in datasets.NAMED else None}, path)


def load_checkpoint(path, data, data_name, seed):
    """A model saved by save_checkpoint, for `data` (--data data_name, drawn from `seed`), and a
    note for the opening line when it was trained on other data of the same shapes."""
    checkpoint = read_saved(path, "--load")
    if isinstance(checkpoint, dict) and {"config", "model"} <= checkpoint.keys() and "data" not in checkpoint:
        raise UsageError(f"--load {path}: written by an older train.py, before checkpoints recorded their data; "
                         f"train and --save it again")
    if not (isinstance(checkpoint, dict) and {"config", "model", "data"} <= checkpoint.keys()):
        raise UsageError(f"--load {path}: not a checkpoint written by train.py --save "
                         f"(expected a torch.save file holding 'config', 'model' and 'data')")
    drawn = checkpoint.get("data_seed")
    if checkpoint["data"] == str(data_name) and drawn is not None and drawn != seed:
        raise UsageError(f"--load {path}: the model was trained on {data_name} drawn from seed {drawn}; this run "
                         f"draws seed {seed}: pass --seed {drawn}")
    try:
        model = MultimodalTransformer(cfg := Config(**checkpoint["config"]))
        model.load_state_dict(checkpoint["model"])
    except (TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise UsageError(f"--load {path}: its config and state dict do not fit this rollingq.py "
                         f"({' '.join(str(e).split())[:150]})") from None
    if list(cfg.modalities.items()) != list(data.modalities.items()) or cfg.n_classes != data.n_classes:
        raise UsageError(f"--load {path}: the model was trained on {checkpoint['data']}, whose modalities "
                         f"{cfg.modalities} and {cfg.n_classes} classes this data ({data_name}: {data.modalities}, "
                         f"{data.n_classes} classes) does not have: pass --data {checkpoint['data']}")
    return model, None if checkpoint["data"] == str(data_name) else f"trained on {checkpoint['data']}"


def read_saved(path, flag):
    """torch.load of a file train.py wrote; None where it is no file torch.save wrote (the caller refuses it)."""
    try:
        with warnings.catch_warnings():                               # e.g. on a pickle's protocol: refused then
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"{flag} {path}: no such file") from None
    except OSError as e:
        raise UsageError(f"{flag} {path}: {e.strerror}") from None
    except Exception:                                                 # KeyError, RuntimeError, UnpicklingError, ...
        return None


def load_resumable(path, args, model):
    """A --checkpoint file, for a run of the same flags but --resume, --checkpoint, --device: loads
    the model (RollingQ's sums are empty between epochs), returns the rest for train()."""
    state = read_saved(path, "--resume")
    if not (isinstance(state, dict) and {"epoch", "model", "config", "metrics", "rng"} <= state.keys()):
        raise UsageError(f"--resume {path}: not a checkpoint written by train.py --checkpoint")
    now, then = run_config(args, model), state["config"]
    differ = sorted(k for k in {*now, *then} - {"resume", "checkpoint", "device"} if now.get(k) != then.get(k))
    if differ:
        raise UsageError(f"--resume {path}: written by a run with other settings ({', '.join(differ)}); give its flags")
    model.load_state_dict(state["model"])
    return state


def write_json(path, obj, quiet=False):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2))
    if not quiet:
        print(f"wrote {path}")


# ----------------------------------------------------------------------------------------
# The command line

# the flags that set the architecture: a checkpoint (--load) brings its own
ARCHITECTURE = ("width", "layers", "encoder_heads", "heads", "fusion", "fusion_head", "dropout", "preset")

# --preset paper: the paper's model size (and for the built-in data, data.PAPER_SIZE: its token counts)
PRESETS = {"small": {}, "paper": {"width": 768, "layers": 4, "encoder_heads": 12, "heads": 1}}


class UsageError(Exception):
    """A bad argument or file: reported in one line, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):                                         # one line, like every other refusal
        raise UsageError(f"{message} (see --help)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):                               # a default only where there is one
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


def max_rolls_arg(text):
    if text != "none" and not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number or 'none', got {text!r}")
    return None if text == "none" else int(text)


def build_parser(description=None, out="write DIR/metrics.json", prog=None):
    """train.py's flags; the experiments add their own to them."""
    p = ArgumentParser(prog=prog, description=description or "Train a multimodal Transformer with attention fusion, with or "
                       "without RollingQ (Ni et al., ICML 2025), and report accuracy, AIR and attention shares.",
                       formatter_class=HelpFormatter)
    g = p.add_argument_group("method")
    g.add_argument("--rollingq", action="store_true", help="roll the CLS query (off: vanilla attention fusion)")
    g.add_argument("--fusion", choices=["attention", "concat"], default="attention", help="concat: the static baseline")
    g.add_argument("--fusion-head", choices=["authors", "prenorm"], default="authors",
                   help="authors: their model (a CLS token per encoder; no norm, no residual around the fusion; their "
                        "init: xavier_normal weights, zero biases); "
                        "prenorm: mean-pooled encoders, LayerNorm and residual around the fusion")
    g.add_argument("--beta", type=float, default=0.0, help="roll only when |AIR| > beta")
    g.add_argument("--sigma", type=float, default=0.0, help="anchor lean toward the weaker modality (0: bisector)")
    g.add_argument("--max-rolls", type=max_rolls_arg, default=1, metavar="N|none",
                   help="roll at most N times, each after an epoch but the last (the authors' 1: after the first); "
                        "none: after every epoch but the last")
    g.add_argument("--roll-stats", choices=["train", "pass"], default="train",
                   help="where the roll's mean keys and query come from: train: the epoch's own training steps (no "
                        "extra pass); pass: a no-grad eval-mode pass over the training set after the epoch, as the "
                        "authors (AIR then from its last batch, theirs from the last training batch)")
    g.add_argument("--dropout", type=float, default=0.2, help="dropout on the fusion attention weights and output "
                   "(default: %(default)s, the authors' value)")
    g = p.add_argument_group("model and training")
    g.add_argument("--data", metavar="NAME|PATH.npz", default="avdigits-noisy", help="a set in the box "
                   "(avdigits-noisy: spoken digits in real background noise with handwritten digits from 5 principal "
                   "components, neither enough alone; avdigits: the same, clean; synthetic: drawn from a seed) or your "
                   "features (see README)")
    g.add_argument("--epochs", type=int, default=25, help="passes over the training set")
    g.add_argument("--batch-size", type=int, default=64, help="global batch size (split across ranks)")
    g.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw", help="sgd: momentum 0.9 (the authors')")
    g.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    g.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                   help="cosine (the authors'): linear warm-up over 2.5 epochs, then cosine decay to zero, per step")
    g.add_argument("--unimodal", metavar="NAME", help="the unimodal baseline: train the encoder of modality NAME (one "
                   "of the data's modality names; the sets in the box: audio, visual) with a linear head, on it alone")
    g.add_argument("--width", type=int, default=64, help="model width d_model")
    g.add_argument("--layers", type=int, default=2, help="Transformer blocks per modality encoder")
    g.add_argument("--encoder-heads", type=int, default=4, help="attention heads in the encoder blocks")
    g.add_argument("--heads", type=int, default=1, help="fusion attention heads (the paper uses 1)")
    g.add_argument("--preset", choices=sorted(PRESETS), default="small", help="small: the sizes shown above for "
                   "--width, --layers, --encoder-heads and --heads; paper: width 768, 4 encoder layers of 12 heads, "
                   "with --data synthetic 512 + 588 tokens (the authors' Kinetics-Sounds counts): a GPU setting (explicit flags win)")
    g.add_argument("--seed", type=int, default=0, help="seed for initialisation, batch order and a set in the box's "
                   "draw (avdigits, avdigits-noisy: which image goes with which recording)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    g = p.add_argument_group("files")
    g.add_argument("--out", metavar="DIR", help=out)
    g.add_argument("--save", metavar="PATH", help="save the trained model (config + state_dict)")
    g.add_argument("--load", metavar="PATH", help="start from a saved model; it brings its own architecture (no "
                   "--width, --heads, ...)")
    g.add_argument("--eval-only", action="store_true", help="with --load: evaluate only, no training")
    g.add_argument("--checkpoint", metavar="PATH", help="after each epoch, write to PATH all a --resume needs")
    g.add_argument("--resume", metavar="PATH", help="go on from a --checkpoint file as if never stopped (same flags)")
    g.add_argument("--val-fraction", type=float, default=0.0, metavar="F", help="carve a validation split: F of each "
                   "class of training, drawn from --seed (0: only the data's own)")
    return p


def parse_args(argv=None, parser=None):
    p = parser or build_parser()
    p.set_defaults(**PRESETS[p.parse_known_args(argv)[0].preset])
    args = p.parse_args(argv)
    check_args(args, p)
    return args


def check_args(a, parser):
    """The refusals that belong to the command line; Config and RollingQ check their own values."""
    for name in ("epochs", "batch_size", "lr"):
        if not 0 < getattr(a, name) < math.inf:                      # also refuses nan
            raise UsageError(f"--{name.replace('_', '-')} must be positive and finite, got {getattr(a, name)}")
    if not 0 <= a.seed < 2**63:
        raise UsageError(f"--seed must be in 0..2**63-1, got {a.seed}")
    if not 0 <= a.val_fraction < 1:
        raise UsageError(f"--val-fraction must be in [0, 1), got {a.val_fraction}")
    if a.eval_only and not a.load:
        raise UsageError("--eval-only needs --load PATH (a model saved with --save)")
    if a.load and a.unimodal:
        raise UsageError("--load continues a saved model; it takes no --unimodal")
    given = [f"--{name.replace('_', '-')}" for name in ARCHITECTURE if getattr(a, name) != parser.get_default(name)]
    if a.load and given:                                              # a flag given at its default value passes
        raise UsageError(f"--load brings its own architecture; drop {', '.join(given)}")
    if a.unimodal and (a.rollingq or a.save):
        raise UsageError("--unimodal trains one encoder alone; it takes no --rollingq or --save")
    if a.rollingq and a.fusion == "concat":
        raise UsageError("--rollingq rolls the fusion attention's query; it needs --fusion attention")
    if a.batch_size < int(os.environ.get("WORLD_SIZE", "1")):
        raise UsageError(f"--batch-size {a.batch_size} is smaller than the number of processes it is split across")
    if a.save and Path(a.save).is_dir():
        raise UsageError(f"--save {a.save}: is a directory; give a file path such as {a.save}/model.pt")
    for flag, folder in (("--out", a.out), ("--save", a.save and Path(a.save).parent)):
        existing = Path(folder or ".").absolute()                     # checked now, created when written
        while not existing.exists():
            existing = existing.parent
        if folder and not (existing.is_dir() and os.access(existing, os.W_OK)):
            raise UsageError(f"{flag}: cannot create the folder {folder}: {existing} is not a writable folder")


def get_device(name):
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise UsageError(f"--device {name!r}: expected cpu, cuda or cuda:N")
    if name != "cpu" and int(name[5:] or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count() or 'no'} CUDA GPU(s)"
                         + ("; use --device cpu" if not torch.cuda.is_available() else ""))
    return torch.device(name)


def load_data(args, seed=None):
    """The data of --data: a set in the box drawn from `seed` (default --seed), or a file; an unknown
    --unimodal name is refused here."""
    if args.preset == "paper" and args.device == "cpu" and args.data == "synthetic":
        print("--preset paper is a GPU setting: on a CPU one training step takes minutes (at 256 + 196 tokens, "
              "41 % of the preset's, the first took 48 s on a 2-core VM)", flush=True)
    data = datasets.load(args.data, args.seed if seed is None else seed,
                         **(datasets.PAPER_SIZE if args.preset == "paper" else {}))
    if args.unimodal:
        data.select(args.unimodal)
    return data


def main(argv=None):
    args, defaults = parse_args(argv), build_parser().parse_args([])
    if not args.rollingq and any(getattr(args, k) != getattr(defaults, k) for k in ("beta", "sigma", "max_rolls", "roll_stats")):
        raise UsageError("--beta, --sigma, --max-rolls and --roll-stats set RollingQ's rolls; add --rollingq")
    device, data = get_device(args.device), load_data(args)
    try:
        model, metrics = run(args, data, device)
        if int(os.environ.get("RANK", "0")) == 0:
            final = metrics["final"]
            print("final  " + "  ".join(f"acc[{c}] {a:.4f}" for c, a in final["acc"].items())
                  + (f"  air {final['air']:+.3f}" if "air" in final else "")
                  + ("  best val epoch {epoch}: test_acc {test_acc:.4f}".format(**final["best_val_epoch"])
                     if "best_val_epoch" in final else ""))
            if args.out:
                write_json(Path(args.out) / "metrics.json", metrics)
            if args.save:
                save_checkpoint(args.save, model, args.data, args.seed)
                print(f"saved the model to {args.save} (reload: --load {args.save})")
    finally:
        if dist.is_initialized():
            # free DDP's reducer while the group lives, wait for every rank, then end the group:
            # gloo work left for interpreter shutdown aborts the process (SIGABRT)
            gc.collect()
            dist.barrier()
            dist.destroy_process_group()


def cli(argv=None, main=main):
    """main() with every refusal as one line on stderr and exit status 2, never a traceback."""
    try:
        main(argv)
    except BrokenPipeError:                                           # the reader went away (| head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except (UsageError, datasets.DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
