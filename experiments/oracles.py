"""The stored oracles the tests compare with, written by the libraries they stand for, so that
the tests need neither (timm 1.0.31 and torchaudio 2.11.1 wrote the stored files):

    pip install timm torchaudio && python -m experiments.oracles

tests/vit_oracle.pt: a tiny ViT in timm's layout with random weights, inputs, and timm's own
output on them (tests/test_vit.py checks experiments/vit.py). The ViT: 8 wide, 2 heads, 2
blocks, 8 x 8 patches, made for 16 x 16 images (a 2 x 2 grid); the inputs are larger (a 3 x 4
and a 3 x 5 grid), so timm resamples its position embedding (dynamic_img_size), as
experiments/vit.py must. The output: timm's forward_features with its first block only (our
encoders take the first n_layers blocks). The spectrogram goes to timm as three equal channels,
which is what summing the RGB kernels computes.

tests/fbank_oracle.pt: torchaudio's Kaldi fbank of a short waveform at two sample rates
(tests/test_prepare.py checks experiments/prepare.py's).
"""

import sys
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent.parent / "tests"


def import_timm():
    """timm, beside a torchvision whose compiled ops do not load with this torch: timm's ViT uses
    none of them, so declaring the two that torchvision looks up at import is enough."""
    try:
        import timm
    except RuntimeError:                                              # operator torchvision::nms does not exist
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
        import timm
    return timm


def vit_oracle(path=TESTS / "vit_oracle.pt"):
    timm = import_timm()
    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=16, patch_size=8,
                            embed_dim=8, depth=2, num_heads=2, dynamic_img_size=True).eval()
    with torch.no_grad():
        for name, p in vit.named_parameters():                      # every weight away from its init
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    state = {k: v.clone() for k, v in vit.state_dict().items()}
    image, spectrogram = torch.randn(1, 3, 24, 32), torch.randn(1, 1, 24, 40)
    vit.blocks = vit.blocks[:1]
    with torch.no_grad():
        out = {"image": vit.forward_features(image), "spectrogram": vit.forward_features(spectrogram.expand(-1, 3, -1, -1))}
    torch.save({"state": state, "image": image, "spectrogram": spectrogram, "out": out, "heads": 2,
                "timm": timm.__version__}, path)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB), timm {timm.__version__}")


def fbank_oracle(path=TESTS / "fbank_oracle.pt"):
    """torchaudio's Kaldi fbank (AST's settings) of a short waveform. torchaudio.compliance.kaldi is
    plain Python; it is run from its file, beside a stand-in torchaudio module where the compiled
    library does not load with this torch (fbank uses none of it)."""
    import importlib.util
    import types
    spec = importlib.util.find_spec("torchaudio")
    sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))
    kaldi_spec = importlib.util.spec_from_file_location("kaldi", Path(spec.origin).parent / "compliance" / "kaldi.py")
    kaldi = importlib.util.module_from_spec(kaldi_spec)
    kaldi_spec.loader.exec_module(kaldi)
    g = torch.Generator().manual_seed(0)
    wave = (torch.randn(1, 4000, generator=g, dtype=torch.float64) * 0.1 + 0.05)   # 0.25 s at 16 kHz, off centre
    out = {}
    for rate in (16000, 22050):
        w = (wave - wave.mean()).float()                              # AST's: the mean removed first
        out[rate] = kaldi.fbank(w, htk_compat=True, sample_frequency=rate, use_energy=False, window_type="hanning",
                                num_mel_bins=128, dither=0.0, frame_shift=10)
    torch.save({"wave": wave[0], "fbank": out}, path)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB)")


def main():
    vit_oracle()
    fbank_oracle()


if __name__ == "__main__":
    main()
