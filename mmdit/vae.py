"""SD3's 16-channel VAE (diffusers' AutoencoderKL) with the latent normalisation inside encode and decode.

The MM-DiT sees z = (z_vae - shift_factor) * scaling_factor (1.5305 and 0.0609 for SD3, read from the model's
config); `encode` returns that and `decode` takes it, so no caller handles the factors. Weights load from a diffusers
directory or from the `first_stage_model.*` (LDM-named) part of a Stability single file, through one key table.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

SD3_SCALING_FACTOR, SD3_SHIFT_FACTOR = 1.5305, 0.0609


class VAE:
    """Pixels in [-1, 1] (B, 3, H, W) <-> normalised latents (B, C, H/f, W/f)."""

    def __init__(self, autoencoder):
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        config = autoencoder.config
        self.scaling_factor = config.scaling_factor
        self.shift_factor = config.shift_factor if config.shift_factor is not None else 0.0
        self.downsample = 2 ** (len(config.block_out_channels) - 1)
        self.latent_channels = config.latent_channels

    @property
    def dtype(self) -> torch.dtype:
        return next(self.autoencoder.parameters()).dtype

    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None):
        """Posterior mean (or a sample drawn with generator) of the images, normalised for the MM-DiT."""
        posterior = self.autoencoder.encode(images.to(self.dtype)).latent_dist
        z = posterior.sample(generator) if sample else posterior.mean
        return (z - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> pixels in [-1, 1] (not clamped)."""
        z = latents.to(self.dtype) / self.scaling_factor + self.shift_factor
        return self.autoencoder.decode(z, return_dict=False)[0]

    def to(self, device) -> "VAE":
        self.autoencoder.to(device)
        return self

    def memory_saving(self, slicing: bool = True, tiling: bool = False):
        """Decode one image at a time (slicing) and/or in overlapping tiles (tiling) when memory is short."""
        (self.autoencoder.enable_slicing if slicing else self.autoencoder.disable_slicing)()
        (self.autoencoder.enable_tiling if tiling else self.autoencoder.disable_tiling)()


# ---------------------------------------------------------------------------------------------------------------
# Stability (LDM) names <-> diffusers names


def ldm_key(key: str, num_levels: int) -> str:
    """The LDM name of a diffusers AutoencoderKL key (the decoder's level index runs the other way)."""
    rules = [
        (r"^(en|de)coder\.conv_norm_out\.", r"\1coder.norm_out."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"encoder.down.\1.downsample.conv."),
        (r"^(en|de)coder\.mid_block\.resnets\.(\d+)\.", lambda m: f"{m[1]}coder.mid.block_{int(m[2]) + 1}."),
        (r"^(en|de)coder\.mid_block\.attentions\.0\.group_norm\.", r"\1coder.mid.attn_1.norm."),
        (r"^(en|de)coder\.mid_block\.attentions\.0\.to_(q|k|v)\.", r"\1coder.mid.attn_1.\2."),
        (r"^(en|de)coder\.mid_block\.attentions\.0\.to_out\.0\.", r"\1coder.mid.attn_1.proj_out."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
         lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.block.{m[2]}."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.",
         lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.conv."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
    ]
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def _is_attention_matrix(diffusers_key: str) -> bool:
    # diffusers keeps the mid-block attention as Linear (C, C); LDM as 1x1 Conv2d (C, C, 1, 1).
    return re.search(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", diffusers_key) is not None


def to_ldm(state: dict[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    return {ldm_key(k, num_levels): v[..., None, None] if _is_attention_matrix(k) else v for k, v in state.items()}


# What a single file's tensors do not show, carried in its metadata by mmdit.loading.export_single_file (released
# files have none of it, and get SD3's values).
CONFIG_IN_METADATA = ("norm_num_groups", "scaling_factor", "shift_factor", "sample_size")


def autoencoder_config_from_ldm(state: dict[str, torch.Tensor], metadata: dict | None = None) -> dict:
    """AutoencoderKL arguments implied by LDM-named tensors, and by metadata (CONFIG_IN_METADATA) where it has
    them: group-norm groups leave no trace in the weights (32, as in every SD VAE), nor do the latent factors
    (SD3's) or the size the model was made for (1024)."""
    levels = 1 + max(int(m[1]) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
    channels = [state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)]
    per_level = 1 + max(int(m[1]) for k in state if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)))
    return dict(
        in_channels=state["encoder.conv_in.weight"].shape[1], out_channels=state["decoder.conv_out.weight"].shape[0],
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(channels), layers_per_block=per_level,
        latent_channels=state["decoder.conv_in.weight"].shape[1],
        use_quant_conv="quant_conv.weight" in state, use_post_quant_conv="post_quant_conv.weight" in state,
        mid_block_add_attention="encoder.mid.attn_1.q.weight" in state,
        **{"norm_num_groups": 32, "scaling_factor": SD3_SCALING_FACTOR, "shift_factor": SD3_SHIFT_FACTOR,
           "sample_size": 1024,   # every Stability SD3 / SD3.5 file is made for 1024^2 (diffusers' config says so)
           **{k: v for k, v in (metadata or {}).items() if k in CONFIG_IN_METADATA}})


def vae_from_ldm_state(state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                       metadata: dict | None = None) -> VAE:
    """The VAE of a Stability single file (its first_stage_model.* tensors, prefix stripped), strictly; metadata:
    the config values the tensors do not show (see autoencoder_config_from_ldm)."""
    from diffusers import AutoencoderKL

    config = autoencoder_config_from_ldm(state, metadata)
    with torch.device("meta"):
        autoencoder = AutoencoderKL(**config)
    table = {ldm_key(k, len(config["block_out_channels"])): k for k in autoencoder.state_dict()}
    missing, extra = sorted(set(table) - set(state)), sorted(set(state) - set(table))
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise ValueError(f"VAE weights do not match an SD3 AutoencoderKL: {what} "
                         f"({len(missing)} missing, {len(extra)} unexpected)")
    converted = {table[k]: v.squeeze(-1).squeeze(-1) if _is_attention_matrix(table[k]) else v
                 for k, v in state.items()}
    autoencoder.load_state_dict({k: v.to(dtype) for k, v in converted.items()}, strict=True, assign=True)
    return VAE(autoencoder)


def load_diffusers_vae(path, dtype: torch.dtype = torch.float32, allow_pickle: bool = False) -> VAE:
    """A diffusers AutoencoderKL directory, or a pipeline directory holding one in vae/ (safetensors only unless
    allow_pickle)."""
    from diffusers import AutoencoderKL

    path = Path(path)
    if (path / "vae").is_dir():
        path = path / "vae"
    return VAE(AutoencoderKL.from_pretrained(path, dtype=dtype, use_safetensors=not allow_pickle or None))
