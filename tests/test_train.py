"""Specification of train.py: what a run prints and writes, its checkpoints, its refusals, torchrun."""

import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, cli, refused, run_in_process, small_npz

import data as datasets
import train
from rollingq import Config, MultimodalTransformer, RollingQ


def test_train_writes_metrics_and_a_checkpoint_that_reloads_to_the_same_accuracy(tmp_path, tiny_npz):
    out = tmp_path / "run"
    r = cli("--data", tiny_npz, "--rollingq", *TINY, "--out", str(out), "--save", str(out / "model.pt"))
    assert r.returncode == 0, r.stderr
    assert sum(line.startswith("epoch ") for line in r.stdout.splitlines()) == 2
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["rollingq"] is True and m["config"]["data"] == tiny_npz
    assert m["config"]["fusion_head"] == "authors" and m["config"]["model"]["fusion_head"] == "authors"
    assert [e["epoch"] for e in m["epochs"]] == [1, 2]
    assert set(m["epochs"][0]) >= {"epoch", "train_loss", "test_acc", "air", "key_gap", "rolled"}
    assert m["epochs"][0]["rolled"] is True
    final = m["final"]
    assert set(final["acc"]) == {"clean", "noise:audio", "noise:visual"}
    assert set(final["attention"]["noise:audio"]) == {"audio", "visual"}
    assert abs(sum(final["attention"]["clean"].values()) - 1) < 1e-6
    assert set(final["probe_acc"]) == {"audio", "visual"} and final["train_seconds"] > 0
    assert all(0 <= a <= 1 for a in final["acc"].values()) and isinstance(final["air"], float)

    opening = r.stdout.splitlines()[0]                          # says what the run is about to do
    assert opening.startswith(f"data {tiny_npz}: audio 4x6, visual 1x15") and "AIR > 0: audio favoured" in opening
    assert "attention fusion, authors head, fusion dropout 0.2, RollingQ (beta 0, sigma 0, max-rolls 1, roll-stats train)" in opening
    assert f"saved the model to {out / 'model.pt'}" in r.stdout

    again = tmp_path / "eval"
    r = cli("--data", tiny_npz, "--load", str(out / "model.pt"), "--eval-only", "--out", str(again))
    assert r.returncode == 0, r.stderr
    reloaded = json.loads((again / "metrics.json").read_text())
    assert reloaded["final"]["acc"] == final["acc"] and reloaded["final"]["air"] == final["air"]
    config = reloaded["config"]                                 # what was loaded, not CLI defaults
    assert config["load"] == str(out / "model.pt") and config["rolls_done"] == 1 and "rollingq" not in config
    assert config["model"] == m["config"]["model"]
    opening = r.stdout.splitlines()[0]                          # the model as it is: rolled, not vanilla
    assert f"| loaded {out / 'model.pt'} | attention fusion, authors head, fusion dropout 0.2, loaded with its " \
        "rotation (rolled 1 time), no further rolls |" in opening and "vanilla" not in opening


def test_same_seed_gives_identical_metrics(tiny_npz):
    d = datasets.load_npz(tiny_npz)
    a, b = (run_in_process(["--rollingq", *TINY, "--seed", "3"], d) for _ in range(2))
    for m in (a, b):
        m["final"].pop("train_seconds")
    assert a == b
    c = run_in_process(["--rollingq", *TINY, "--seed", "4"], d)
    assert c["epochs"] != a["epochs"]


def test_a_bf16_training_step_keeps_the_rotation_in_float32():
    """The CUDA path's dtype logic (bf16 autocast, float32 rotation), run on the CPU."""
    d = datasets.synthetic(seed=0, n_train=64, n_test=8)
    args = train.parse_args(["--width", "16", "--layers", "1"])
    model = MultimodalTransformer(train.build_config(args, d))
    optimizer, controller = train.make_optimizer(model, args), RollingQ(model, max_rolls=None)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    for _ in range(2):                                           # a step, a roll, a step after the roll, a roll
        out, loss = train.train_step(model, d.train_x, d.train_y, optimizer, autocast)
        assert out.logits.dtype == torch.bfloat16 and loss.dtype == torch.float32 and math.isfinite(float(loss))
        assert controller.step()["rolled"]
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    R = model.fusion.rotation.R[0].double()
    assert model.fusion.rotation.R.dtype == torch.float32 and torch.allclose(R @ R.T, torch.eye(16).double(), atol=1e-5)


def test_cli_bad_input_gets_one_line_exit_status_2_and_leaves_no_out_folder(tmp_path, tiny_npz, capsys):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    d = datasets.load_npz(tiny_npz)
    model = MultimodalTransformer(Config(d.modalities, d.n_classes, d_model=16))
    train.save_checkpoint(tmp_path / "tiny.pt", model, tiny_npz, 0)
    synthetic = datasets.synthetic(seed=3)
    train.save_checkpoint(tmp_path / "seed3.pt", MultimodalTransformer(Config(synthetic.modalities, 8, d_model=16)),
                          "synthetic", 3)
    torch.save({"config": vars(model.cfg), "model": model.state_dict()}, tmp_path / "old.pt")
    torch.save({"config": {**vars(model.cfg), "d_model": 32}, "model": model.state_dict(), "data": tiny_npz},
               tmp_path / "misfit.pt")
    not_a_checkpoint = "not a checkpoint written by train.py --save (expected a torch.save file holding 'config', " \
                       "'model' and 'data')"
    cases = [
        (["--data", str(tmp_path / "missing.npz")], "no such file"),
        (["--data", str(small_npz(tmp_path / "bad.npz", train_visual=np.full((40, 6), np.nan)))], "NaN or inf"),
        (["--data", tiny_npz, "--unimodal", "depth"], "no modality 'depth' in the data; it has audio, visual"),
        (["--eval-only"], "--eval-only needs --load"),
        (["--epochs", "0"], "--epochs must be positive"),
        (["--lr", "nan"], "--lr must be positive and finite"),
        (["--data", tiny_npz, "--load", str(tmp_path / "notes.txt")], f"notes.txt: {not_a_checkpoint}"),
        (["--data", tiny_npz, "--load", tiny_npz], f"tiny.npz: {not_a_checkpoint}"),
        (["--data", "avdigit"], "--data avdigit: neither a set in the box (avdigits, avdigits-noisy, synthetic) nor a file"),
        (["--load", str(tmp_path / "tiny.pt")], f"tiny.pt: the model was trained on {tiny_npz}, whose modalities "
                                                "{'audio': (4, 6), 'visual': (1, 15)} and 4 classes this data (avdigits-noisy: "
                                                f"{{'audio': (16, 64), 'visual': (16, 49)}}, 10 classes) does not have: "
                                                f"pass --data {tiny_npz}"),
        (["--data", "synthetic", "--load", str(tmp_path / "tiny.pt")], f"pass --data {tiny_npz}"),
        (["--data", "synthetic", "--load", str(tmp_path / "seed3.pt"), "--eval-only"],
         "seed3.pt: the model was trained on synthetic drawn from seed 3; this run draws seed 0: pass --seed 3"),
        (["--data", tiny_npz, "--load", str(tmp_path / "old.pt")], "written by an older train.py, before checkpoints"),
        (["--data", tiny_npz, "--load", str(tmp_path / "misfit.pt")],
         "misfit.pt: its config and state dict do not fit this rollingq.py (Error(s) in loading state_dict"),
        (["--data", tiny_npz, "--load", str(tmp_path / "tiny.pt"), "--width", "16", "--fusion-head", "prenorm"],
         "--load brings its own architecture; drop --width, --fusion-head"),
        (["--seed", "-1"], "--seed must be in 0..2**63-1"),
        (["--rollingq", "--fusion", "concat"], "needs --fusion attention"),
        (["--data", tiny_npz, "--rollingq", "--sigma", "inf"], "finite sigma >= 0"),
        (["--data", tiny_npz, "--rollingq", "--heads", "64"],
         "width d_model / fusion_heads >= 2 to rotate, and >= the number of modalities (2) for an anchor equally "
         "close to every mean key; got 64 / 64 (d_model is --width, fusion_heads is --heads)"),
        (["--data", tiny_npz, "--width", "10"], "d_model = 10 must be divisible by n_heads = 4"),
        (["--data", tiny_npz, "--dropout", "1"], "fusion_dropout must be in [0, 1), got 1.0 (fusion_dropout is --dropout)"),
        (["--max-rolls", "none"], "add --rollingq"),
        (["--fusion-head", "post"], "invalid choice: 'post'"),
        (["--data", str(tmp_path)], "is a directory"),
        (["--out", str(tmp_path / "notes.txt" / "run")], "--out: cannot create the folder"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "no CUDA GPU"))
    for args, message in cases:
        with pytest.raises(SystemExit) as exit:
            train.cli([*args, *([] if "--out" in args else ["--out", str(tmp_path / "out")])])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, (args, err)
        assert not (tmp_path / "out").exists(), args           # nothing written, no empty folder
    assert refused(cli("--data", str(tmp_path / "missing.npz")), "no such file")   # as a process: status 2, one line


def test_the_new_refusals_are_one_line_from_the_process_with_no_warning(tmp_path, tiny_npz):
    """As a user meets them: stderr holds the one line, and no warning from numpy or torch beside it."""
    one_class = small_npz(tmp_path / "one-class.npz", train_y=np.zeros(40, int), test_y=np.zeros(20, int))
    assert refused(cli("--data", str(one_class)), "train_y holds one class only (label 0); expected at least 2 classes")
    huge = small_npz(tmp_path / "huge.npz", train_visual=np.full((40, 6), 1e300))
    assert refused(cli("--data", str(huge)), "NaN or inf (or values too large for float32)")
    assert refused(cli("--data", tiny_npz, "--load", tiny_npz, "--heads", "2"),
                   "--load brings its own architecture; drop --heads")
    assert train.parse_args(["--load", "model.pt", "--heads", "1"]).heads == 1     # given at its default: it passes
    with pytest.raises(train.UsageError, match="drop --preset$"):                  # not the sizes the preset sets
        train.parse_args(["--load", "model.pt", "--preset", "paper"])
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with open(tmp_path / "pickled.pt", "wb") as f:               # a pickle, not torch.save's zip: torch warns on it
        pickle.dump({"config": {}}, f, protocol=4)
    for path in (tmp_path / "notes.txt", tiny_npz):
        assert refused(cli("--data", tiny_npz, "--load", str(path)), "not a checkpoint written by train.py --save")
    r = cli("--data", tiny_npz, "--load", str(tmp_path / "pickled.pt"), process=True)   # a process of its own, once
    assert refused(r, "not a checkpoint written by train.py --save")


def test_help_shows_each_default_zero_included():
    r = cli("--help")
    text = " ".join(r.stdout.split())                           # argparse wraps lines
    assert r.returncode == 0 and "--fusion-head {authors,prenorm}" in text
    for flag, default in (("--beta", "0.0"), ("--seed", "0"), ("--max-rolls", "1"),
                          ("--dropout", "0.2"), ("--epochs", "25"), ("--fusion-head", "authors")):
        assert re.search(rf"{flag} \S+ .*?\(default: {re.escape(default)}[,)]", text), flag
    assert "--dropout DROPOUT dropout on the fusion attention weights and output (default: 0.2, the authors' value)" in text
    assert "--unimodal NAME the unimodal baseline" in text and "--preset {paper,small} small: the sizes" in text


def test_cleanup_ends_the_process_group_after_a_run_and_after_a_refusal(tmp_path, tiny_npz):
    """The torchrun shutdown: main() frees DDP's reducer and destroys the group it ran in."""
    import torch.distributed as dist
    for n, argv in enumerate((["--data", tiny_npz, *TINY, "--epochs", "1"],
                              ["--data", tiny_npz, "--load", str(tmp_path / "absent.pt")])):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / f'store{n}'}", rank=0, world_size=1)
        try:
            train.main(argv)
        except train.UsageError:
            pass
        assert not dist.is_initialized()


def test_torchrun_ranks_roll_identically_and_exit_cleanly(tmp_path, tiny_npz):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "train.py"), "--data", tiny_npz, "--rollingq", *TINY, "--epochs", "3",
                        "--max-rolls", "none", "--device", "cpu", "--out", str(tmp_path / "ddp")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert m["distributed"] == {"world_size": 2, "ranks_agree": True}
    assert [e["rolled"] for e in m["epochs"]] == [True, True, False]           # no roll after the last epoch
    assert sum(line.startswith("epoch ") for line in r.stdout.splitlines()) == 3   # rank 0 alone prints


def readme_blocks(language, doc="README.md"):
    return re.findall(rf"```{language}\n(.*?)```", open(os.path.join(ROOT, doc)).read(), re.S)


def test_readme_and_docs_have_no_placeholder_left_and_their_links_exist():
    for doc in ("README.md", "docs/reproduction.md", "docs/integration.md", "docs/premise.md", "docs/paper-experiment.md"):
        text = open(os.path.join(ROOT, doc)).read()
        assert not re.findall(r"\b[A-Z]+_[A-Z_]{3,}\b", text), doc
        for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            assert os.path.exists(os.path.join(ROOT, os.path.dirname(doc), link)), (doc, link)


def test_readme_python_blocks_run_beside_a_copy_of_rollingq_alone(tmp_path):
    blocks = [b for b in readme_blocks("python") if "rollingq" in b]
    assert blocks
    shutil.copy(os.path.join(ROOT, "rollingq.py"), tmp_path)    # what a user copies, and nothing else
    for i, code in enumerate(blocks):
        (tmp_path / f"block{i}.py").write_text(code)
        r = subprocess.run([sys.executable, f"block{i}.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (code, r.stderr[-2000:])


def test_cosine_schedule_warms_up_for_two_and_a_half_epochs_then_decays_to_zero():
    def lrs(schedule):
        args = train.parse_args(["--schedule", schedule, "--lr", "0.1"])
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        sched = train.make_schedule(optimizer, args, steps_per_epoch=10, epochs=10)
        seen = []
        for _ in range(100):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            sched.step()
        return seen
    cosine = lrs("cosine")
    assert math.isclose(cosine[0], 0.1 / 25) and math.isclose(max(cosine), 0.1) and cosine.index(max(cosine)) == 24
    assert all(a < b for a, b in zip(cosine[:24], cosine[1:25])) and all(a >= b for a, b in zip(cosine[24:], cosine[25:]))
    assert cosine[-1] < 1e-3 * 0.1
    assert lrs("constant") == [0.1] * 100


def test_unimodal_run_measures_one_modality_alone(tmp_path, tiny_npz):
    r = cli("--data", tiny_npz, "--unimodal", "visual", *TINY, "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["config"]["unimodal"] == "visual" and set(m["final"]["acc"]) == {"clean", "noise:visual"}
    assert "attention" not in m["final"] and "probe_acc" not in m["final"]


def test_three_modalities_name_the_leader_of_air():
    M = datasets.Modality
    d = datasets.synthetic(seed=0, n_train=128, n_test=64, n_classes=3, modalities=(
        M("audio", 2, 3, 1.0, 0.2), M("video", 3, 2, 0.5, 0.2), M("text", 1, 4, 0.5, 0.2)))
    m = run_in_process([*TINY, "--epochs", "1"], d)
    assert m["final"]["air_leader"] in d.names and m["final"]["air"] >= 0
    assert all(e["air_leader"] in d.names for e in m["epochs"])


def test_roll_stats_pass_takes_the_mean_keys_from_an_eval_pass_over_the_training_set(tiny_npz):
    d = datasets.load_npz(tiny_npz)
    torch.manual_seed(0)
    model = MultimodalTransformer(Config(d.modalities, d.n_classes, d_model=16, n_layers=1))
    model.eval()
    with torch.no_grad():
        whole = model(d.train_x, stats=True).key_means.mean(0)  # the whole set at once, eval mode
    model.train()
    controller = RollingQ(model)
    train.stats_pass(model, d.train_x, controller, 32, train.bf16_autocast(torch.device("cpu")))
    sums = model.fusion.rotation.sums
    assert model.training and int(sums["n"]) == len(d.train_y)
    assert torch.allclose(sums["keys"] / sums["n"], whole, atol=1e-5)
    assert controller.step()["rolled"]
    m = run_in_process([*TINY, "--rollingq", "--roll-stats", "pass", "--max-rolls", "none", "--epochs", "3"], d)
    assert [e["rolled"] for e in m["epochs"]] == [True, True, False] and m["config"]["roll_stats"] == "pass"
    assert refused(cli("--roll-stats", "pass"), "add --rollingq") and refused(cli("--roll-stats", "x"), "invalid choice")


def readme_recipe(name):
    """The python block of README or docs/integration.md that defines class `name`, run; returns its namespace."""
    code = next(b for b in readme_blocks("python") + readme_blocks("python", "docs/integration.md")
                if f"class {name}(" in b)
    namespace = {}
    exec(compile(code, f"README.md:{name}", "exec"), namespace)
    return namespace


def test_readme_multihead_attention_recipe_equals_nn_multiheadattention_before_a_roll():
    torch.manual_seed(0)
    RollingMHA, RollingQ = (readme_recipe("RollingMHA")[k] for k in ("RollingMHA", "RollingQ"))
    layer = RollingMHA(32, 4, spans=[(1, 7), (7, 11)], dropout=0.1).eval()
    x = torch.randn(8, 11, 32)                                  # the CLS token at 0, then the modalities
    assert torch.allclose(layer(x), layer.mha(x[:, :1], x, x, need_weights=False)[0], atol=1e-6)
    controller = RollingQ(layer)
    layer.train()(x).square().mean().backward()
    assert controller.step()["rolled"] and not torch.allclose(layer.eval()(x), layer.mha(x[:, :1], x, x)[0])
    assert layer.mha.in_proj_bias.grad[32:64].abs().max() < 1e-8   # the key bias: a gradient of rounding only


def test_readme_recipes_count_spans_from_the_cls_token_at_0():
    recipes = readme_recipe("RollingMHA")["RollingMHA"], readme_recipe("RollingAttention")["RollingAttention"]
    for recipe in recipes:
        with pytest.raises(AssertionError, match="the CLS token at 0"):
            recipe(32, 4, spans=[(0, 6), (6, 10)])
    mha, block = (recipe(32, 4, spans=[(1, 7), (7, 11)]) for recipe in recipes)
    with torch.no_grad():                                       # the same projections in both
        block.qkv.weight.copy_(mha.mha.in_proj_weight)
        block.qkv.bias.copy_(mha.mha.in_proj_bias)
        block.proj.load_state_dict(mha.mha.out_proj.state_dict())
        x = torch.randn(8, 11, 32)
        assert torch.allclose(mha.eval()(x)[:, 0], block.eval()(x)[:, 0], atol=1e-5)   # the same CLS row


def test_readme_timm_style_recipe_rolls_the_cls_row_only_and_handles_the_key_bias():
    torch.manual_seed(0)
    RollingAttention = readme_recipe("RollingAttention")["RollingAttention"]
    x = torch.randn(8, 11, 32)
    for qk_norm in (False, True):
        block = RollingAttention(32, 4, spans=[(1, 7), (7, 11)], qk_norm=qk_norm)
        assert bool((block.qkv.bias[32:64] == 0).all()) is not qk_norm   # zeroed without a k-norm only
        controller = RollingQ(block)
        block(x).square().mean().backward()
        before = block.eval()(x)
        assert controller.step()["rolled"]
        after = block(x)
        assert torch.allclose(after[:, 1:], before[:, 1:], atol=1e-6) and not torch.allclose(after[:, 0], before[:, 0])
        pretrained = {k: v.clone() for k, v in block.state_dict().items()}
        pretrained["qkv.bias"][32:64] = torch.randn(32)          # weights with a key bias, as a ViT's
        block.load_state_dict(pretrained)
        loaded = block(x)
        block.zero_key_bias()                                   # as README says, after the load
        assert bool((block.qkv.bias[32:64] == 0).all()) is not qk_norm
        with torch.no_grad():
            block.qkv.bias[32:64] = 0                           # zeroed by hand: the k-norm's case too
        assert torch.allclose(block(x), loaded, atol=1e-5) is not qk_norm   # the softmax ignores it without a k-norm
        block.train()


def interrupted(*args, after_steps):
    """train.py run as a process that dies (KeyboardInterrupt) in training step after_steps + 1."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import train\n"
            "step, calls = train.train_step, []\n"
            "def dying(*a, **k):\n"
            f"    calls.append(1)\n"
            f"    if len(calls) > {after_steps}: raise KeyboardInterrupt\n"
            "    return step(*a, **k)\n"
            "train.train_step = dying\n"
            "train.cli(sys.argv[2:])\n")
    return subprocess.run([sys.executable, "-c", code, ROOT, *args], capture_output=True, text=True, timeout=300)


def test_a_run_interrupted_and_resumed_equals_one_never_stopped_bit_for_bit(tmp_path, tiny_npz):
    """Dropout, shuffling, the cosine schedule, AdamW's moments and rolls after every epoch all carry over."""
    flags = ["--data", tiny_npz, "--rollingq", *TINY, "--epochs", "4", "--max-rolls", "none", "--schedule", "cosine",
             "--val-fraction", "0.25"]
    assert cli(*flags, "--out", str(tmp_path / "whole"), "--save", str(tmp_path / "whole.pt")).returncode == 0
    checkpoint = tmp_path / "ckpt" / "run.pt"
    r = interrupted(*flags, "--checkpoint", str(checkpoint), after_steps=14)    # 6 steps an epoch: dies in epoch 3
    assert r.returncode != 0 and "KeyboardInterrupt" in r.stderr
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 2 and not checkpoint.with_suffix(".pt.part").exists()
    r = cli(*flags, "--resume", str(checkpoint), "--out", str(tmp_path / "resumed"), "--save", str(tmp_path / "resumed.pt"))
    assert r.returncode == 0, r.stderr
    assert [line.split()[1] for line in r.stdout.splitlines() if line.startswith("epoch ")] == ["3/4", "4/4"]
    whole, resumed = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("whole", "resumed"))
    for m in (whole, resumed):
        m["final"].pop("train_seconds")
        del m["config"]["resume"], m["config"]["checkpoint"]
    assert resumed == whole
    a, b = (torch.load(tmp_path / name, weights_only=True)["model"] for name in ("whole.pt", "resumed.pt"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 4            # a resumed run writes on where it read

    assert refused(cli(*flags, "--lr", "0.01", "--resume", str(checkpoint)),
                   f"--resume {checkpoint}: written by a run with other settings (lr); give its flags")
    assert refused(cli(*flags, "--resume", tiny_npz), f"--resume {tiny_npz}: not a checkpoint written by train.py --checkpoint")
    assert refused(cli(*flags, "--resume", str(tmp_path / "absent.pt")), "absent.pt: no such file")


def test_validation_split_names_the_test_accuracy_at_its_best_epoch(tmp_path, tiny_npz):
    r = cli("--data", tiny_npz, *TINY, "--epochs", "4", "--lr", "0.03", "--val-fraction", "0.25", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "256 train" not in r.stdout and ": audio 4x6, visual 1x15 (tokens x features), 192 train / 64 val / 128 test" in r.stdout
    m = json.loads((tmp_path / "metrics.json").read_text())
    val = [e["val_acc"] for e in m["epochs"]]
    best = m["epochs"][val.index(max(val))]                      # the first of the best: epoch 3 of 4 here
    assert best["epoch"] < 4 and best["test_acc"] != m["final"]["acc"]["clean"]
    assert m["final"]["best_val_epoch"] == {"epoch": best["epoch"], "val_acc": best["val_acc"], "test_acc": best["test_acc"]}
    assert f"best val epoch {best['epoch']}: test_acc {best['test_acc']:.4f}" in r.stdout.splitlines()[-2]
    assert refused(cli("--val-fraction", "1"), "--val-fraction must be in [0, 1), got 1.0")


def test_carved_validation_is_stratified_seeded_and_disjoint_from_training(tiny_npz):
    d = datasets.load_npz(tiny_npz)
    d.side["snr"] = {"train": torch.arange(256.0), "test": torch.zeros(128)}
    v = datasets.carve_validation(d, 0.25, seed=1)
    for c in range(d.n_classes):                                 # a quarter of each class, rounded
        assert int((v.val_y == c).sum()) == round(0.25 * int((d.train_y == c).sum()))
    taken = torch.cat([v.side["snr"]["train"], v.side["snr"]["val"]]).long()   # which training sample went where
    assert sorted(taken.tolist()) == list(range(256)) and torch.equal(v.side["snr"]["train"].sort().values, v.side["snr"]["train"])
    for xs, y, snr in ((v.train_x, v.train_y, v.side["snr"]["train"]), (v.val_x, v.val_y, v.side["snr"]["val"])):
        i = snr.long()
        assert torch.equal(y, d.train_y[i]) and all(torch.equal(x, dx[i]) for x, dx in zip(xs, d.train_x))
    assert torch.equal(datasets.carve_validation(d, 0.25, seed=1).val_y, v.val_y)
    assert not torch.equal(datasets.carve_validation(d, 0.25, seed=2).side["snr"]["val"], v.side["snr"]["val"])
    with pytest.raises(datasets.DataError, match="brings its own validation split"):
        datasets.carve_validation(v, 0.25)


def test_an_npz_may_bring_its_own_validation_split(tmp_path):
    g = np.random.default_rng(1)
    arrays = {"val_y": g.integers(0, 3, 10), "val_audio": g.standard_normal((10, 4, 5)), "val_visual": g.standard_normal((10, 6))}
    d = datasets.load_npz(small_npz(tmp_path / "val.npz", **arrays))
    assert d.sizes == "40 train / 10 val / 20 test" and torch.equal(d.val_y, torch.from_numpy(arrays["val_y"]))
    assert torch.equal(d.val_x[1], torch.from_numpy(arrays["val_visual"]).float()[:, None])
    assert datasets.load_npz(small_npz(tmp_path / "none.npz")).val_y is None
    without = lambda key: {k: v for k, v in arrays.items() if k != key}
    assert refused(cli("--data", str(small_npz(tmp_path / "half.npz", **without("val_visual")))),
                   "'train_visual' has no matching 'val_visual'")
    assert refused(cli("--data", str(small_npz(tmp_path / "nolabels.npz", **without("val_y")))),
                   "'val_audio' has no matching 'val_y'")
    assert refused(cli("--data", str(small_npz(tmp_path / "both.npz", **arrays)), "--val-fraction", "0.2"),
                   "the data brings its own validation split (val_y); carve none from training")


def test_a_data_folder_trains_as_its_npz_does(tmp_path, tiny_npz):
    """The same batches, read from disk: the same training, bit for bit; the evaluation reads 64 samples at a time
    (not 512: its sums round a little otherwise), and the noise of the final evaluation is drawn otherwise."""
    folder = datasets.save_folder(datasets.load_npz(tiny_npz), tmp_path / "folder")
    flags = ["--rollingq", *TINY, "--val-fraction", "0.25"]
    for data, out in ((tiny_npz, "npz"), (str(folder), "folder")):
        assert cli("--data", data, *flags, "--out", str(tmp_path / out)).returncode == 0
    a, b = (json.loads((tmp_path / out / "metrics.json").read_text()) for out in ("npz", "folder"))
    exact = ("epoch", "train_loss", "test_acc", "val_acc", "rolled")
    assert [{k: e[k] for k in exact} for e in a["epochs"]] == [{k: e[k] for k in exact} for e in b["epochs"]]
    assert all(math.isclose(x[k], y[k], abs_tol=1e-6) for x, y in zip(a["epochs"], b["epochs"]) for k in ("air", "key_gap"))
    assert a["final"]["acc"]["clean"] == b["final"]["acc"]["clean"]
    assert a["final"]["best_val_epoch"] == b["final"]["best_val_epoch"] and set(b["final"]["acc"]) == set(a["final"]["acc"])
