"""Specification of experiments/vit.py: timm's ViT weights in our encoders, checked against timm's own output."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import ROOT, cli, refused

import data as datasets
import train
from experiments import vit
from rollingq import Config, MultimodalTransformer

ORACLE = os.path.join(ROOT, "tests", "vit_oracle.pt")           # written by python -m experiments.oracles


def image_folder(path, oracle, n=4):
    """A data folder whose audio is the oracle's spectrogram, 1 x 24 x 40, and visual its image, 3 x 24 x 32."""
    g = np.random.default_rng(0)
    raw = {m: np.concatenate([oracle[key].numpy(), g.standard_normal((n - 1, *oracle[key].shape[1:]))]).astype(np.float32)
           for m, key in (("audio", "spectrogram"), ("visual", "image"))}
    y = np.arange(n) % 2
    d = datasets.Data(["audio", "visual"], [raw["audio"], raw["visual"]], torch.from_numpy(y),
                      [raw["audio"], raw["visual"]], torch.from_numpy(y), 2)
    return datasets.load_folder(datasets.save_folder(d, path, specs={"audio": {"patch": 8}, "visual": {"patch": 8}}))


@pytest.fixture
def oracle():
    return torch.load(ORACLE, weights_only=True)


def test_an_encoder_from_timms_vit_weights_gives_timms_output(tmp_path, oracle):
    """Patch embedding, the RGB kernels summed for one channel, CLS, the position grid resampled, the first block, the norm."""
    torch.save(oracle["state"], tmp_path / "vit.pt")
    d = image_folder(tmp_path / "folder", oracle)
    assert d.modalities == {"audio": (15, 64), "visual": (12, 192)}   # 3 x 5 and 3 x 4 patches of 8 x 8
    model = MultimodalTransformer(Config(d.modalities, 2, d_model=8, n_layers=1, n_heads=oracle["heads"])).eval()
    assert vit.load_vit(model, tmp_path / "vit.pt", d) == {"init": str(tmp_path / "vit.pt"), "blocks": 1}
    with torch.no_grad():
        for j, m in enumerate(d.names):
            ours = model.encoders[j](d.train_x[j][0:1])              # (1, 1 + L, 8)
            theirs = oracle["out"]["spectrogram" if m == "audio" else "image"]
            assert ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=2e-4), (m, (ours - theirs).abs().max())


def test_a_file_that_is_no_plain_vit_or_does_not_fit_is_one_clear_error(tmp_path, oracle):
    d = image_folder(tmp_path / "folder", oracle)
    model = MultimodalTransformer(Config(d.modalities, 2, d_model=8, n_layers=2, n_heads=2))
    cases = {
        "missing": ({k: v for k, v in oracle["state"].items() if k != "blocks.1.norm1.weight"},
                    "not a plain ViT in timm's layout with 2 blocks or more: missing blocks.1.norm1.weight"),
        "unknown": ({**oracle["state"], "blocks.0.ls1.gamma": torch.ones(8)}, "unknown blocks.0.ls1.gamma"),
        "deeper": (oracle["state"], None),
    }
    for name, (state, message) in cases.items():
        torch.save(state, tmp_path / f"{name}.pt")
        if message is None:
            vit.load_vit(model, tmp_path / f"{name}.pt", d)
            continue
        with pytest.raises(vit.InitError, match=message):
            vit.load_vit(model, tmp_path / f"{name}.pt", d)
    with pytest.raises(vit.InitError, match="with 3 blocks or more: missing blocks.2.attn.proj.bias"):
        vit.load_vit(MultimodalTransformer(Config(d.modalities, 2, d_model=8, n_layers=3, n_heads=2)),
                     tmp_path / "deeper.pt", d)
    with pytest.raises(vit.InitError, match=r"modality 'audio''s encoder \(width 16\) does not take its weights"):
        vit.load_vit(MultimodalTransformer(Config(d.modalities, 2, d_model=16, n_layers=1, n_heads=2)),
                     tmp_path / "deeper.pt", d)
    tokens = datasets.synthetic(n_train=8, n_test=4)
    with pytest.raises(vit.InitError, match="modality 'audio' comes as tokens"):
        vit.load_vit(MultimodalTransformer(Config(tokens.modalities, 8, d_model=8, n_layers=1, n_heads=2)),
                     tmp_path / "deeper.pt", tokens)
    with pytest.raises(train.UsageError, match="absent.pt: no such file"):          # as train.py's --load says it
        vit.load_vit(model, tmp_path / "absent.pt", d)
    with pytest.raises(vit.InitError, match="not a state dict torch.save wrote"):
        vit.load_vit(model, ORACLE.replace("vit_oracle.pt", "test_vit.py"), d)


def test_the_papers_command_starts_its_encoders_from_the_weights_with_the_authors_recipe(tmp_path, oracle, tiny_npz):
    torch.save(oracle["state"], tmp_path / "vit.pt")
    image_folder(tmp_path / "folder", oracle, n=8)
    flags = ["--data", str(tmp_path / "folder"), "--width", "8", "--layers", "1", "--encoder-heads", "2",
             "--epochs", "2", "--batch-size", "4"]
    r = cli(*flags, "--init", str(tmp_path / "vit.pt"), "--out", str(tmp_path / "run"), module="experiments.paper")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["pretrain"] == {"init": str(tmp_path / "vit.pt"), "blocks": 1} and m["config"]["init"] == str(tmp_path / "vit.pt")
    assert {k: m["config"][k] for k in ("optimizer", "lr", "schedule", "dropout", "heads", "preset")} == \
        {"optimizer": "sgd", "lr": 1e-3, "schedule": "cosine", "dropout": 0.2, "heads": 1, "preset": "paper"}
    assert "sgd lr 0.001 cosine, 2 epochs, batch 4" in r.stdout
    assert refused(cli(*flags, "--init", str(tmp_path / "vit.pt"), "--width", "16", module="experiments.paper"),
                   "modality 'audio''s encoder (width 16) does not take its weights")
    tokens = ["--data", tiny_npz, "--width", "8", "--encoder-heads", "2", "--layers", "1"]
    assert refused(cli(*tokens, "--init", str(tmp_path / "vit.pt"), module="experiments.paper"),
                   "modality 'audio' comes as tokens, not as images")
