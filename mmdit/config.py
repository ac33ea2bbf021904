"""Typed configuration: the single source of defaults for every part of mmdit.

Model sizes are named presets with the SD3 width rule written once (`paper_depth`): hidden = 64 * depth,
depth heads of 64. Only `mmdit.checkpoint` infers a config from tensor shapes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class MMDiTConfig:
    """Architecture of one MM-DiT. Every field is a shape or a switch that changes the weights."""

    depth: int = 24                      # number of joint blocks
    num_heads: int = 24                  # attention heads; hidden = num_heads * head_dim
    head_dim: int = 64
    patch_size: int = 2
    in_channels: int = 16                # latent channels of SD3's VAE
    context_dim: int = 4096              # width of the text tokens (T5-XXL's; CLIP states are zero-padded to it)
    pooled_dim: int = 2048               # CLIP-L pooled (768) + CLIP-G pooled (1280)
    pos_embed_max_size: int = 192        # side of the stored position table; caps the latent at 2 * this
    qk_norm: bool = False                # per-head RMSNorm on q and k (SD3.5)
    x_self_attn_layers: tuple[int, ...] = ()   # MMDiT-X: blocks with an extra image-only self-attention
    mlp_ratio: float = 4.0
    frequency_dim: int = 256             # width of the sinusoidal timestep embedding

    def __post_init__(self):
        object.__setattr__(self, "x_self_attn_layers", tuple(sorted(int(i) for i in self.x_self_attn_layers)))
        problems = []
        if self.depth < 1:
            problems.append(f"depth must be >= 1, got {self.depth}")
        if self.patch_size < 1:
            problems.append(f"patch_size must be >= 1, got {self.patch_size}")
        bad = [i for i in self.x_self_attn_layers if not 0 <= i < self.depth]
        if bad:
            problems.append(f"x_self_attn_layers {bad} lie outside blocks 0..{self.depth - 1}")
        if self.frequency_dim % 2:
            problems.append(f"frequency_dim must be even, got {self.frequency_dim}")
        if problems:
            raise ValueError("invalid MMDiTConfig: " + "; ".join(problems))

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def out_channels(self) -> int:
        return self.in_channels

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["x_self_attn_layers"] = list(self.x_self_attn_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MMDiTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MMDiTConfig keys {unknown}; accepted: {sorted(known)}")
        return cls(**d)


def paper_depth(depth: int, **overrides) -> MMDiTConfig:
    """The SD3 paper's family: hidden 64 * depth, depth heads of 64 (MMDiT-ps2-d{depth})."""
    return MMDiTConfig(**{"depth": depth, "num_heads": depth, "head_dim": 64, **overrides})


def _tiny(**overrides) -> MMDiTConfig:
    """A few-thousand-parameter model for tests: every code path, no size."""
    base = dict(depth=2, num_heads=2, head_dim=8, context_dim=32, pooled_dim=24, pos_embed_max_size=16)
    return MMDiTConfig(**{**base, **overrides})


MODEL_PRESETS: dict[str, MMDiTConfig] = {
    "sd3-medium": paper_depth(24, pos_embed_max_size=192),
    "sd3.5-medium": paper_depth(24, pos_embed_max_size=384, qk_norm=True, x_self_attn_layers=tuple(range(13))),
    "sd3.5-large": paper_depth(38, pos_embed_max_size=192, qk_norm=True),
    "tiny": _tiny(),
    "tiny-sd3.5": _tiny(qk_norm=True, x_self_attn_layers=(0,)),
}
# The paper's scaling family d = 2..38 (d=24 is SD3 Medium's shape, d=38 the 8B).
MODEL_PRESETS.update({f"d{d}": paper_depth(d) for d in range(2, 40, 2)})


def model_preset(name: str) -> MMDiTConfig:
    try:
        return MODEL_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; accepted: {', '.join(MODEL_PRESETS)}") from None


@dataclass(frozen=True)
class TextLayout:
    """How the three encoders' outputs form the MM-DiT's conditioning (see mmdit.text.assemble).

    context = [CLIP-L tokens | CLIP-G tokens | zeros up to context_dim] (clip_tokens rows), then T5's t5_tokens
    rows; pooled = [CLIP-L pooled | CLIP-G pooled]. The widths are SD3's; tiny test models use their own.
    """

    clip_l_dim: int = 768
    clip_g_dim: int = 1280
    context_dim: int = 4096              # T5-XXL's width
    clip_tokens: int = 77
    t5_tokens: int = 77                  # Stability's reference pads T5 to 77; diffusers' default is 256

    def __post_init__(self):
        if self.clip_l_dim + self.clip_g_dim > self.context_dim:
            raise ValueError(f"CLIP widths {self.clip_l_dim} + {self.clip_g_dim} exceed the context width "
                             f"{self.context_dim}")
        if self.t5_tokens < 1:
            raise ValueError(f"the T5 sequence length must be >= 1, got {self.t5_tokens}")

    @property
    def pooled_dim(self) -> int:
        return self.clip_l_dim + self.clip_g_dim


@dataclass(frozen=True)
class FlowConfig:
    """Rectified-flow training and sampling settings (see mmdit.flow)."""

    timestep_sampling: str = "lognorm"   # uniform | lognorm | mode | cosmap
    lognorm_mean: float = 0.0
    lognorm_std: float = 1.0
    mode_scale: float = 1.29
    train_shift: float = 1.0             # resolution shift applied to training sigmas; 1.0 = none
    loss_weighting: str = "none"         # none | sigma_sqrt | cosmap
    sample_shift: float = 3.0            # the public SD3 / SD3.5 models use 3.0
    sample_steps: int = 28
    guidance_scale: float = 7.0


__all__ = ["MMDiTConfig", "TextLayout", "FlowConfig", "MODEL_PRESETS", "model_preset", "paper_depth"]
