"""The study's control that separates attention from fusion: the same head with fixed uniform
attention weights (docs/premise.md, section 3). Ours, not the paper's.

Where this row matches vanilla attention, what attention fusion gains or loses comes from the
head (the value path, the projection, the classifier on the CLS row), not from where it attends.
"""

import torch

from rollingq import FusionAttention, MultimodalTransformer


class UniformFusion(FusionAttention):
    """FusionAttention with every token of [CLS; modality 1; ...; modality M] weighted 1/T:
        a = 1/T,  y = dropout(proj(dropout(a) v))
    No query or key reaches the output: q, k and the rotation are kept (the same parameters as
    vanilla's head, so the same initialisation) but get no gradient and stay as initialised. With
    stats=True: the attention mass on each modality, its share of the tokens T_m / T, and the query
    and mean keys of those untrained projections (what AIR and the key measures read on this row)."""

    def forward(self, x, stats=False):                                   # x: (B, T, C) -> (B, C)
        B, T, _ = x.shape
        v = self.heads(self.v(x))                                        # (B, nh, T, hs)
        a = v.new_full((B, self.n_heads, 1, T), 1 / T)                   # (B, nh, 1, T): uniform weights
        y = self.drop(self.proj((self.attn_drop(a) @ v).flatten(1)))     # (B, nh, 1, hs) -> (B, C)
        if not stats:
            return y, {}
        with torch.no_grad():                                            # statistics, not the loss
            k = self.heads(self.k(x))                                    # (B, nh, T, hs)
            P = self.averaging(T, k.device)                              # (M, T), as FusionAttention
            key_means = P.to(k.dtype) @ k                                # (B, nh, M, hs)
            q = self.rotation(self.heads(self.q(x[:, :1])), key_means)   # (B, nh, 1, hs)
        attention = (a @ (P > 0).to(a.dtype).T)[:, :, 0]                 # (B, nh, M)
        return y, {"query": q[:, :, 0], "key_means": key_means, "attention": attention}


def uniform_attention_model(cfg):
    """MultimodalTransformer(cfg) with UniformFusion as its fusion layer, initialised as the
    vanilla model built from the same seed (and leaving the global RNG where that build does)."""
    model = MultimodalTransformer(cfg)
    fusion = model.fusion
    with torch.random.fork_rng(devices=[]):                              # building it draws nothing
        model.fusion = UniformFusion(cfg.d_model, cfg.fusion_heads, fusion.spans, cfg.fusion_dropout)
    model.fusion.load_state_dict(fusion.state_dict())
    return model
