"""ViT weights in timm's layout into the encoders: the paper's start from ImageNet-21k ViT-B/16.

The file is what torch.save(timm_model.state_dict()) writes, e.g. for
vit_base_patch16_224.augreg_in21k or vit_base_patch16_224_miil.in21k (Ridnik et al. 2021, the
paper's citation). Each encoder takes the first n_layers blocks and the rest around them:

    patch_embed.proj (C, 3, p, p)   -> embed (C, c p p): the patch embedding as the token projection,
                                       as data.tokens() cuts the patches; a 1-channel modality (a
                                       spectrogram) takes the RGB kernels summed, as AST and the authors
    cls_token                       -> cls (an encoder with a CLS token: fusion_head authors)
    pos_embed (1, 1 + g g, C)       -> pos: the CLS row as it is, the g x g grid resampled to the
                                       modality's h x w patch grid (bicubic, antialiased, as timm's
                                       resample_abs_pos_embed), the same for each of its frames (ours:
                                       no position in time)
    blocks.i (i < n_layers)         -> blocks.i: norm1 -> ln1, attn.qkv, attn.proj, norm2 -> ln2,
                                       mlp.fc1 -> mlp.0, mlp.fc2 -> mlp.2
    norm                            -> norm

The deeper blocks and the classifier (head.*) are left out; any other key (register tokens, layer
scale, q/k norms: no plain ViT), or a missing one, is one error naming them. The encoders must be as
wide as the file and have its heads (ViT-B/16: --preset paper, 768 wide, 12 heads; the file does
not say its heads). timm's LayerNorms take eps 1e-6, ours 1e-5 (rollingq.py): a difference of
about 1e-5 in the output. Google's original .npz is not read: load it into timm and save that.
"""

import re

import torch
import torch.nn.functional as F

import train

BLOCK = {"norm1": "ln1", "attn.qkv": "attn.qkv", "attn.proj": "attn.proj", "norm2": "ln2", "mlp.fc1": "mlp.0",
         "mlp.fc2": "mlp.2"}


class InitError(train.UsageError):
    """A weights file that does not fit: one line saying what and why (exit status 2 from the command line)."""


def read(path):
    """The state dict in a file torch.save wrote (or a checkpoint holding one as "model")."""
    state = train.read_saved(path, "--init")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not (isinstance(state, dict) and state and all(torch.is_tensor(v) for v in state.values())):
        raise InitError(f"--init {path}: not a state dict torch.save wrote (names -> tensors)")
    return state


def grids(data):
    """Each modality's (frames, channels, h, w) patch grid, from a data folder's raw shapes and specs."""
    out = []
    for m, x in zip(data.names, data.train_x):
        p = getattr(x, "spec", {}).get("patch")
        if not p:
            raise InitError(f"--init: modality {m!r} comes as tokens, not as images or spectrograms with a "
                            f"patch size; a ViT's weights need a data folder whose meta.json gives one")
        *frames, c, H, W = x.raw
        out.append(((frames or [1])[0], c, H // p, W // p, p))
    return out


def encoder_state(vit, encoder, grid, n_layers, name=""):
    """The state dict for one Encoder from a timm ViT's `vit` (see the module docstring)."""
    frames, c, h, w, p = grid
    kernels = vit["patch_embed.proj.weight"]                          # (C, 3, p, p)
    if kernels.shape[-1] != p:
        raise InitError(f"--init: the file's patches are {kernels.shape[-1]} x {kernels.shape[-1]}, "
                        f"modality {name!r}'s {p} x {p}")
    if c == 1:
        kernels = kernels.sum(1, keepdim=True)                        # (C, 1, p, p): RGB summed
    state = {"embed.weight": kernels.flatten(1), "embed.bias": vit["patch_embed.proj.bias"],
             "norm.weight": vit["norm.weight"], "norm.bias": vit["norm.bias"]}
    pos = vit["pos_embed"]                                            # (1, 1 + g g, C)
    g = int(round((pos.shape[1] - 1) ** 0.5))
    grid_pos = pos[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)   # (1, C, g, g)
    grid_pos = F.interpolate(grid_pos.float(), size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(1, h * w, -1).repeat(1, frames, 1)   # (1, F h w, C)
    if encoder.cls is not None:
        state["cls"] = vit["cls_token"]
        grid_pos = torch.cat([pos[:, :1], grid_pos], 1)               # (1, 1 + F h w, C)
    state["pos"] = grid_pos
    for i in range(n_layers):
        for theirs, ours in BLOCK.items():
            for kind in ("weight", "bias"):
                state[f"blocks.{i}.{ours}.{kind}"] = vit[f"blocks.{i}.{theirs}.{kind}"]
    return state


def checked_keys(vit, n_layers):
    """Refuse a file that is no plain ViT in timm's layout, or has fewer blocks than n_layers."""
    needed = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    needed |= {f"blocks.{i}.{theirs}.{kind}" for i in range(n_layers) for theirs in BLOCK for kind in ("weight", "bias")}
    unused = re.compile(r"head\.(weight|bias)|blocks\.\d+\.(" + "|".join(map(re.escape, BLOCK)) + r")\.(weight|bias)")
    missing = sorted(needed - vit.keys())
    unknown = sorted(k for k in vit.keys() - needed if not unused.fullmatch(k))
    if missing or unknown:
        raise InitError(f"--init: not a plain ViT in timm's layout with {n_layers} blocks or more: "
                        + "; ".join(f"{what} {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
                                    for what, keys in (("missing", missing), ("unknown", unknown)) if keys))


def load_vit(model, path, data):
    """Each of model's encoders from the ViT in `path`, for `data`'s modalities (a data folder)."""
    vit = read(path)
    checked_keys(vit, model.cfg.n_layers)
    for encoder, grid, m in zip(model.encoders, grids(data), data.names):
        state = encoder_state(vit, encoder, grid, model.cfg.n_layers, m)
        try:
            encoder.load_state_dict({k: v.to(encoder.pos.dtype) for k, v in state.items()})
        except RuntimeError as e:
            raise InitError(f"--init {path}: modality {m!r}'s encoder (width {model.cfg.d_model}) does not take its "
                            f"weights: {' '.join(str(e).split())[:200]}") from None
    return {"init": str(path), "blocks": model.cfg.n_layers}
