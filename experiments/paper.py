"""The paper's experiment in one command: encoders from ViT-B/16 weights (--init), the paper's
sizes (--preset paper: 768 wide, 4 blocks of 12 heads each, one fusion head) and the authors'
training (SGD with momentum 0.9, lr 1e-3, 2.5 warm-up epochs then cosine, batch 64, 30 epochs,
fusion dropout 0.2), on a data folder (experiments/prepare.py). bf16 autocast on CUDA.

    python -m experiments.paper --data runs/cremad --init vit_b16_in21k.pt --rollingq --out runs/cremad-rq
    torchrun --nproc_per_node=4 -m experiments.paper --data runs/ks --init vit_b16_in21k.pt --out runs/ks
    python -m experiments.paper ... --checkpoint runs/ks/ckpt.pt     (then --resume runs/ks/ckpt.pt)

Every train.py flag is taken; given flags win over the recipe. docs/paper-experiment.md: the
data steps, the weights, the time and memory.
"""

import gc
import os
from pathlib import Path

import torch.distributed as dist

import train
from experiments import vit

RECIPE = {"preset": "paper", **train.PRESETS["paper"], "optimizer": "sgd", "lr": 1e-3, "schedule": "cosine",
          "batch_size": 64, "epochs": 30, "dropout": 0.2}


def parse_args(argv=None):
    p = train.build_parser(prog="python -m experiments.paper", description=__doc__.split("\n\n")[0])
    p.add_argument("--init", metavar="PATH", help="ViT weights in timm's layout (torch.save(model.state_dict())): "
                   "each encoder takes the first --layers blocks (experiments/vit.py); none: encoders from scratch")
    p.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND", help="torch.compile the model in "
                   "place before training (for a GPU; BACKEND default inductor); checkpoints keep their keys")
    p.set_defaults(**RECIPE)
    return train.parse_args(argv, p)


def main(argv=None):
    args = parse_args(argv)
    device, data = train.get_device(args.device), train.load_data(args)

    def start(model, *_):                                             # train.run's hook, before the first step
        record = vit.load_vit(model, args.init, data) if args.init else None
        if args.compile:
            model.compile(backend=args.compile)                       # in place: the state dict's keys stay
        return record
    try:
        model, metrics = train.run(args, data, device, warm_start=start if args.init or args.compile else None)
        if int(os.environ.get("RANK", "0")) == 0:
            final = metrics["final"]
            print("final  " + "  ".join(f"acc[{c}] {a:.4f}" for c, a in final["acc"].items())
                  + ("  best val epoch {epoch}: test_acc {test_acc:.4f}".format(**final["best_val_epoch"])
                     if "best_val_epoch" in final else ""))
            if args.out:
                train.write_json(Path(args.out) / "metrics.json", metrics)
            if args.save:
                train.save_checkpoint(args.save, model, args.data, args.seed)
    finally:
        if dist.is_initialized():                                     # as train.main: free DDP, then end the group
            gc.collect()
            dist.barrier()
            dist.destroy_process_group()


if __name__ == "__main__":
    train.cli(main=main)
