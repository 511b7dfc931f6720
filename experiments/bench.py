"""Training throughput with and without RollingQ, measured side by side in one process.

    python -m experiments.bench                    # the default model and built-in data
    python -m experiments.bench --preset paper     # width 768, 4 x 12-head layers, 512 + 588 tokens: for a GPU

The same batches, timed blocks of --steps training steps (default: one epoch) of each model in
alternating order; each RollingQ block ends with a roll, the cost of rolling after every epoch.
The time ratio is the median over rounds of the two blocks' ratio, which shrugs off a noisy round.
"""

import math
import statistics
import time
from pathlib import Path

import torch

import train
from experiments import parse
from rollingq import MultimodalTransformer, RollingQ


def bench(args, data, device, rounds=21):
    setups = {}
    for name in ("vanilla", "RollingQ"):
        torch.manual_seed(args.seed)
        model = MultimodalTransformer(train.build_config(args, data)).to(device)
        controller = RollingQ(model, args.beta, args.sigma, max_rolls=None) if name == "RollingQ" else None
        setups[name] = (model, train.make_optimizer(model, args), controller)
    xs, y = [x.to(device) for x in data.train_x], data.train_y.to(device)
    autocast = train.bf16_autocast(device)
    g = torch.Generator().manual_seed(args.seed)
    seconds, first = {name: [] for name in setups}, True
    for r in range(rounds + 1):                                       # round 0 warms up and is not counted
        batches = [torch.randint(len(y), (args.batch_size,), generator=g).to(device) for _ in range(args.steps)]
        for name in (("vanilla", "RollingQ") if r % 2 else ("RollingQ", "vanilla")):
            model, optimizer, controller = setups[name]
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for idx in batches:
                train.train_step(model, [x[idx] for x in xs], y[idx], optimizer, autocast)
                if first:                                             # say at once what to expect
                    first, step = False, time.perf_counter() - t0
                    print(f"first step {step:.2f} s (warm-up included); at most about "
                          f"{step * 2 * args.steps * (rounds + 1) / 60:.0f} min in all at that pace", flush=True)
            if controller is not None:
                controller.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r > 0:
                seconds[name].append(time.perf_counter() - t0)
        print(f"round {r}/{rounds}" + (" (warm-up)" if r == 0 else ""), flush=True)
    samples = rounds * args.steps * args.batch_size
    rate = {name: samples / sum(s) for name, s in seconds.items()}
    ratios = [rq / v for rq, v in zip(seconds["RollingQ"], seconds["vanilla"])]
    ratio = statistics.median(ratios)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {name}  preset {args.preset}  {args.fusion_head} head  batch {args.batch_size}  "
          f"{rounds} rounds x {args.steps} steps each")
    print(f"vanilla   {rate['vanilla']:9.1f} samples/s")
    print(f"RollingQ  {rate['RollingQ']:9.1f} samples/s")
    print(f"time ratio RollingQ / vanilla = {ratio:.3f} (median over rounds; min {min(ratios):.3f}, max {max(ratios):.3f})")
    return {"device": name, "preset": args.preset, "fusion_head": args.fusion_head, "samples_per_s": rate,
            "time_ratio": ratio, "seconds": seconds, "rolls": int(setups["RollingQ"][0].fusion.rotation.rolls)}


def parse_args(argv=None):
    p = train.build_parser(__doc__.split("\n")[0], out="write DIR/bench.json", prog="python -m experiments.bench")
    g = p.add_argument_group("bench")
    g.add_argument("--steps", type=int, help="training steps per timed block (default: one epoch's)")
    g.add_argument("--rounds", type=int, default=21, help="timed rounds after one warm-up round")
    args = parse(p, argv, fixed=("rollingq", "fusion", "max_rolls", "unimodal", "load", "eval_only", "save", "epochs",
                                 "pretrain_epochs", "schedule"))
    if (args.steps is not None and args.steps < 1) or args.rounds < 1:
        raise train.UsageError(f"--steps and --rounds must be at least 1, got {args.steps} and {args.rounds}")
    return args


def main(argv=None):
    args = parse_args(argv)
    data = train.load_data(args)
    args.steps = args.steps or math.ceil(len(data.train_y) / args.batch_size)
    result = bench(args, data, train.get_device(args.device), args.rounds)
    if args.out:
        train.write_json(Path(args.out) / "bench.json", result)


if __name__ == "__main__":
    train.cli(main=main)
