"""Prompt to image: text encoders -> MM-DiT flow sampling -> VAE decode, as diffusers' StableDiffusion3Pipeline.

For the same weights, seed and settings the image equals diffusers' (fp32 to within rounding): the starting noise
of image i is torch.randn((1, C, H/f, W/f)) from a CPU generator seeded with seeds[i], in the model's dtype,
which is what diffusers draws when given generator=[torch.Generator().manual_seed(s) for s in seeds]; the schedule,
the Euler step, CFG over an [uncond, cond] batch and skip-layer guidance are the same; the negative prompt is the
encoded empty string. Differences by design: the sampler state stays fp32 between steps (diffusers rounds it to the
model dtype), and T5 is padded to 77 tokens by default (Stability's reference; diffusers uses 256), or to its
tokenizer's model_max_length when that is shorter (a small model such as the toy world's).
"""

from __future__ import annotations

import numpy as np
import torch

from mmdit import flow
from mmdit.config import Settings
from mmdit.loading import load_model
from mmdit.model import MMDiT
from mmdit.text import TextEncoders
from mmdit.vae import VAE

__all__ = ["SD3Pipeline", "Settings"]


class SD3Pipeline:
    def __init__(self, transformer: MMDiT, vae: VAE, text: TextEncoders, shift: float = 3.0):
        self.transformer, self.vae, self.text, self.shift = transformer.eval(), vae, text, shift

    # ---- loading -------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path, *, no_t5: bool = False, dtype: torch.dtype = torch.float32, device="cpu",
             t5_tokens: int | None = None, t5_tokenizer: str | None = None, allow_pickle: bool = False,
             clip_g: str | None = None) -> "SD3Pipeline":
        """Any model mmdit.loading.load_model reads, in dtype, on device."""
        model = load_model(path, no_t5=no_t5, dtype=dtype, t5_tokens=t5_tokens, t5_tokenizer=t5_tokenizer,
                           allow_pickle=allow_pickle, clip_g=clip_g)
        return cls(model.transformer, model.vae, model.text, model.shift).to(device)

    def to(self, device) -> "SD3Pipeline":
        self.transformer.to(device)
        self.vae.to(device)
        self.text.to(device)
        return self

    # ---- generation ----------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.transformer.pos_embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.context_embedder.weight.dtype

    @property
    def default_side(self) -> int:
        """The image side the model was made for: its VAE's sample_size (1024 for the released SD3 / SD3.5, 64
        for the toy world), which is what diffusers' pipeline defaults to through its transformer's config."""
        return int(self.vae.autoencoder.config.sample_size)

    def check_size(self, width: int, height: int):
        cfg = self.transformer.config
        multiple = self.vae.downsample * cfg.patch_size
        if width % multiple or height % multiple or width <= 0 or height <= 0:
            raise ValueError(f"width and height must be positive multiples of {multiple} for this model, "
                             f"got {width}x{height}")
        largest = cfg.pos_embed_max_size * multiple
        if width > largest or height > largest:
            raise ValueError(f"{width}x{height} exceeds this model's position table: sides up to {largest} px")

    def check_skip_layers(self, layers):
        """Skip-layer guidance on a block the MM-DiT lacks would skip nothing and silently double the
        conditional pass: refused."""
        depth = self.transformer.config.depth
        outside = [i for i in layers if not 0 <= i < depth]
        if outside:
            raise ValueError(f"skip-layer guidance blocks {outside} lie outside the MM-DiT's blocks 0..{depth - 1}")

    def initial_noise(self, seeds: list[int], width: int, height: int) -> torch.Tensor:
        """diffusers' draw for a list of CPU generators: one (1, C, h, w) randn per seed, in the model dtype."""
        f = self.vae.downsample
        shape = (1, self.vae.latent_channels, height // f, width // f)
        return torch.cat([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s)), dtype=self.dtype)
                          for s in seeds]).to(self.device)

    def _velocity(self, x, sigma, context, pooled, skip_layers=()):
        return self.transformer(x.to(self.dtype), sigma, context, pooled, skip_layers=skip_layers)

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], settings: Settings = Settings(),
                 progress=None) -> np.ndarray:
        """uint8 images (B, H, W, 3) for the prompts, image i drawn from seeds[i]."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        self.check_size(settings.width, settings.height)
        self.check_skip_layers(settings.slg_layers)
        B, dtype, device = len(prompts), self.dtype, self.device
        context, pooled = self.text.conditioning(prompts, dtype=dtype, device=device)
        cond = {"context": context, "pooled": pooled}
        uncond = None
        if settings.cfg > 1:
            u_context, u_pooled = self.text.conditioning([settings.negative_prompt] * B, dtype=dtype, device=device)
            uncond = {"context": u_context, "pooled": u_pooled}
        slg = None
        if settings.slg_layers:
            slg = flow.SkipLayerGuidance(tuple(settings.slg_layers), settings.slg_scale, settings.slg_start,
                                         settings.slg_end)
        velocity = flow.guided_velocity(self._velocity, cond, uncond, settings.cfg, settings.steps, slg)
        shift = self.shift if settings.shift is None else settings.shift
        schedule = flow.sigmas(settings.steps, shift)
        latents = flow.sample(velocity, self.initial_noise(seeds, settings.width, settings.height), schedule,
                              settings.sampler, progress=progress)
        images = self.vae.decode(latents.to(self.vae.dtype)).float()
        return ((images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
