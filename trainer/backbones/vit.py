"""LVFace's face ViT: a plain pre-norm transformer on 9x9 patches of the 112x112 face.

There is no class token: the 144 output tokens are concatenated and an MLP (FC -> BN -> FC -> BN) maps
them to the embedding, so the position of each facial part stays in the feature. Sizes follow
insightface's arcface_torch ViT configurations, which LVFace trains:

| name  | width | depth | heads | drop path | patch mask | grad checkpointing | GMACs |
|-------|-------|-------|-------|-----------|------------|--------------------|-------|
| vit_t | 256   | 12    | 8     | 0.1       | 0.1        | no                 | ~1.5  |
| vit_s | 512   | 12    | 8     | 0.1       | 0.1        | no                 | ~5.7  |
| vit_b | 512   | 24    | 8     | 0.1       | 0.1        | yes                | ~11.4 |
| vit_l | 768   | 24    | 8     | 0.05      | 0.05       | yes                | ~25.3 |

Patch masking (training only) drops a random `mask_ratio` of the tokens after the position embedding;
the encoder sees only the rest and a learnt mask token stands in for the dropped ones before the head.

Module names are insightface's (`patch_embed.proj`, `blocks.N.mlp.fc1/fc2`, `mask_token`, `feature`), so
arcface_torch's released ViT weights load with `load_state_dict(strict=True)` and ours save in their
format; tests/model_io/test_convert.py runs their vit.py on the same weights and gets the same embedding.
Renaming the modules (rather than mapping keys at every load and save) keeps one key set everywhere:
training checkpoints, model.pt, the converter (trainer/model_io/convert.py) and insightface all agree. Weights
saved before the rename (`patch_embed.weight`, `mlp.0/2`) still load: `upgrade_state_dict` maps them, and
FaceViT applies it itself in `load_state_dict`. insightface always has a mask token; a model built with
mask_ratio 0 has none (an unused parameter stalls DDP), so loading drops theirs (it only fills masked
tokens in training) and `to_insightface` writes a zero one.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import register_backbone
from ._blocks import run_blocks


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a sample's whole residual branch with probability p (rescaled)."""
    if p == 0.0 or not training:
        return x
    keep = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device, dtype=x.dtype).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Linear -> ReLU6 -> Linear (insightface's face ViT uses ReLU6; its module names fc1 / fc2)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6(inplace=True)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patches (kernel = stride = patch) projected to tokens `[B, N, dim]`."""

    def __init__(self, patch_size: int, embed_dim: int, in_channels: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Block(nn.Module):
    """Pre-norm transformer block; the MLP uses ReLU6 as insightface's face ViT does."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = Mlp(dim, hidden)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class FaceViT(nn.Module):
    def __init__(self, embed_dim: int, depth: int, heads: int = 8, embedding_size: int = 512,
                 dropout: float = 0.0, input_size: int = 112, patch_size: int = 9, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.1, mask_ratio: float = 0.1, grad_checkpointing: bool = False):
        super().__init__()
        self.input_size, self.patch_size = input_size, patch_size
        self.grid = input_size // patch_size  # 112 // 9 = 12: the last 4 rows/columns are not seen
        self.num_patches = self.grid * self.grid
        if not 0.0 <= mask_ratio < 1.0 or (mask_ratio > 0 and int(self.num_patches * (1 - mask_ratio)) in
                                           (0, self.num_patches)):
            raise ValueError(f"mask_ratio {mask_ratio} must be 0 or mask between 1 and {self.num_patches - 1} "
                             f"of the {self.num_patches} patches")
        self.embed_dim, self.mask_ratio, self.grad_checkpointing = embed_dim, mask_ratio, grad_checkpointing
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim))
        # Only a masking model has a mask token: an unused parameter would stall DDP's gradient reduction.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if mask_ratio > 0 else None
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth grows linearly
        self.blocks = nn.ModuleList(Block(embed_dim, heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.feature = nn.Sequential(
            nn.Linear(embed_dim * self.num_patches, embed_dim, bias=False),
            nn.BatchNorm1d(embed_dim, eps=2e-5),
            nn.Linear(embed_dim, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size, eps=2e-5),
        )
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.register_load_state_dict_pre_hook(self._upgrade_on_load)

    def upgrade_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A state dict saved before the rename, or insightface's, in this model's key set."""
        upgraded = upgrade_state_dict(state_dict)
        if self.mask_token is None:
            upgraded.pop("mask_token", None)
        return upgraded

    def _upgrade_on_load(self, module, state_dict, prefix, *args) -> None:
        # In place: load_state_dict hands the hook its own copy, read after this for every submodule.
        mine = {k[len(prefix):]: state_dict.pop(k) for k in list(state_dict) if k.startswith(prefix)}
        state_dict.update({prefix + k: v for k, v in self.upgrade_state_dict(mine).items()})

    def _mask(self, x: torch.Tensor):
        """Keep a random subset of tokens per sample; return them and the permutation that undoes it."""
        b, n, d = x.shape
        keep = int(n * (1 - self.mask_ratio))
        order = torch.rand(b, n, device=x.device).argsort(dim=1)
        restore = order.argsort(dim=1)
        kept = torch.gather(x, 1, order[:, :keep, None].expand(-1, -1, d))
        return kept, restore

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"FaceViT was built for {self.input_size}x{self.input_size} input, "
                             f"got {tuple(x.shape[-2:])}")
        x = self.patch_embed(x) + self.pos_embed
        masking = self.training and self.mask_ratio > 0
        if masking:
            x, restore = self._mask(x)
        x = run_blocks(self.blocks, x, self.grad_checkpointing and self.training)
        x = self.norm(x)
        if masking:
            fill = self.mask_token.to(x.dtype).expand(x.shape[0], self.num_patches - x.shape[1], -1)
            x = torch.gather(torch.cat([x, fill], dim=1), 1, restore[:, :, None].expand(-1, -1, x.shape[2]))
        return self.feature(self.dropout(x.reshape(x.shape[0], -1)))


# Names before the modules took insightface's: the MLP was a Sequential, the patch embedding a bare conv.
_OLD_KEYS = [(re.compile(r"^(blocks\.\d+\.mlp\.)0\."), r"\1fc1."),
             (re.compile(r"^(blocks\.\d+\.mlp\.)2\."), r"\1fc2."),
             (re.compile(r"^patch_embed\.(weight|bias)$"), r"patch_embed.proj.\1")]


def upgrade_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A FaceViT state dict saved before the rename, in today's (= insightface's) names; others unchanged."""
    out = {}
    for key, value in state_dict.items():
        for pattern, new in _OLD_KEYS:
            key = pattern.sub(new, key)
        out[key] = value
    return out


def to_insightface(state_dict: Mapping[str, torch.Tensor], embed_dim: int) -> dict[str, torch.Tensor]:
    """Our FaceViT state dict as insightface's VisionTransformer's: same names, plus the mask token it
    always has (zeros when ours was built without masking)."""
    out = upgrade_state_dict(state_dict)
    if "mask_token" not in out:
        like = out["pos_embed"]
        out["mask_token"] = torch.zeros(1, 1, embed_dim, dtype=like.dtype)
    return out


@register_backbone("vit_t")
def vit_t(**kwargs) -> FaceViT:
    return FaceViT(**{"embed_dim": 256, "depth": 12, "drop_path_rate": 0.1, "mask_ratio": 0.1, **kwargs})


@register_backbone("vit_s")
def vit_s(**kwargs) -> FaceViT:
    return FaceViT(**{"embed_dim": 512, "depth": 12, "drop_path_rate": 0.1, "mask_ratio": 0.1, **kwargs})


@register_backbone("vit_b")
def vit_b(**kwargs) -> FaceViT:
    return FaceViT(**{"embed_dim": 512, "depth": 24, "drop_path_rate": 0.1, "mask_ratio": 0.1,
                      "grad_checkpointing": True, **kwargs})


@register_backbone("vit_l")
def vit_l(**kwargs) -> FaceViT:
    return FaceViT(**{"embed_dim": 768, "depth": 24, "drop_path_rate": 0.05, "mask_ratio": 0.05,
                      "grad_checkpointing": True, **kwargs})
