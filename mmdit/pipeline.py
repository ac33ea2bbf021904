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

import dataclasses
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mmdit import flow
from mmdit.checkpoint import (SAI_PREFIX, CheckpointError, atomic_save_file, default_mode, load_mmdit,
                              read_safetensors)
from mmdit.config import TextLayout
from mmdit.model import MMDiT
from mmdit.text import (TextEncoders, clip_from_state, clip_tokenizer_from_open_clip, load_diffusers_text_encoders,
                        open_clip_text_to_transformers, t5_from_state)
from mmdit.vae import VAE, load_diffusers_vae, to_ldm, vae_from_ldm_state

BUNDLED_MODEL = Path(__file__).resolve().parent / "toy_pipeline"   # the toy world's model (data/make_toy.py)
SD3_CFG = 7.0           # StableDiffusion3Pipeline's default guidance scale
# Guidance darkens the toy model's colours and tints its backgrounds: on the seen toy prompts (toy GenEval, 4 images
# per prompt) CFG 1 / 2 / 3 / 7 scored 0.08 / 0.16 / 0.17 / 0.10 (the previous bundle: 0.085 / 0.12 / 0.116 / 0.052).
BUNDLED_MODEL_CFG = 2.0
ACCEPTED_MODELS = ("a diffusers SD3 pipeline directory (model_index.json with transformer/, vae/, text_encoder*/, "
                   "tokenizer*/) or a Stability single file (*.safetensors with model.diffusion_model.* and "
                   "first_stage_model.* keys; text encoders inside it as text_encoders.*, or beside it as "
                   "clip_l/clip_g/t5xxl*.safetensors, also in a text_encoders/ folder)")
T5_TOKENIZER_HUB_ID = "google/t5-v1_1-xxl"
TEXT_ENCODER_PREFIX = "text_encoders.{}.transformer."
VAE_PREFIX = "first_stage_model."


@dataclass
class Settings:
    """Everything besides the prompt and seed that decides an image (written into each PNG)."""

    steps: int = 28
    cfg: float = 7.0
    shift: float | None = None          # None: the model's scheduler shift (3.0 for every released SD3 / SD3.5)
    sampler: str = "euler"
    width: int = 1024                   # sample.py and the GenEval generator default to the model's default_side
    height: int = 1024
    negative_prompt: str = ""
    slg_layers: tuple[int, ...] = ()    # skip-layer guidance (SD3.5 Medium: 7, 8, 9); empty = off
    slg_scale: float = 2.8
    slg_start: float = 0.01
    slg_end: float = 0.2


class SD3Pipeline:
    def __init__(self, transformer: MMDiT, vae: VAE, text: TextEncoders, shift: float = 3.0):
        self.transformer, self.vae, self.text, self.shift = transformer.eval(), vae, text, shift

    # ---- loading -------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path, *, no_t5: bool = False, dtype: torch.dtype = torch.float32, device="cpu",
             t5_tokens: int | None = None, t5_tokenizer: str | None = None, allow_pickle: bool = False,
             clip_g: str | None = None) -> "SD3Pipeline":
        """A diffusers pipeline directory or a Stability single file (see ACCEPTED_MODELS), or a hub id of a
        diffusers SD3 repository when the hub can be reached. clip_g: a safetensors file that replaces CLIP-G, in
        transformers' layout (Stability's clip_g.safetensors) or open_clip's (a ViT-bigG-14 checkpoint)."""
        path = resolve_model(path, no_t5)
        if path.is_dir() and (path / "model_index.json").is_file():
            transformer = load_mmdit(path, dtype=dtype, allow_pickle=allow_pickle)
            vae = load_diffusers_vae(path, dtype, allow_pickle)
            text = load_diffusers_text_encoders(path, no_t5=no_t5, dtype=dtype, t5_tokens=t5_tokens,
                                                context_dim=transformer.config.context_dim, allow_pickle=allow_pickle)
            shift = scheduler_shift(path)
        elif path.is_file() and path.suffix == ".safetensors":
            transformer = load_mmdit(path, dtype=dtype)
            vae_state = read_safetensors(path, VAE_PREFIX)[0]
            if not vae_state:
                raise CheckpointError(f"{path} holds no VAE (first_stage_model.*); accepted: {ACCEPTED_MODELS}")
            vae = vae_from_ldm_state(vae_state, dtype)
            text = _single_file_text_encoders(path, no_t5, dtype, t5_tokens, t5_tokenizer,
                                              transformer.config.context_dim)
            shift = 3.0
        elif not path.exists():
            raise CheckpointError(f"model {path} does not exist; accepted: {ACCEPTED_MODELS}")
        else:
            raise CheckpointError(f"model {path} is not a recognised layout; accepted: {ACCEPTED_MODELS}")
        if clip_g is not None:
            state = read_safetensors(Path(clip_g), "")[0]
            if "token_embedding.weight" in state:
                state = open_clip_text_to_transformers(state)
            text.clip_g = clip_from_state(state, "clip_g", text.clip_g.tokenizer, dtype)
            text.layout = dataclasses.replace(text.layout, clip_g_dim=text.clip_g.width)
        if text.layout.pooled_dim != transformer.config.pooled_dim:
            raise CheckpointError(f"{path}: text encoders give pooled width {text.layout.pooled_dim}, the MM-DiT "
                                  f"expects {transformer.config.pooled_dim}")
        pipe = cls(transformer, vae, text, shift)
        return pipe.to(device)

    def to(self, device) -> "SD3Pipeline":
        self.transformer.to(device)
        self.vae.autoencoder.to(device)
        for enc in (self.text.clip_l, self.text.clip_g, self.text.t5):
            if enc is not None:
                enc.model.to(device)
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


def default_cfg(model) -> float:
    """The guidance scale when none is given: the bundled toy model's own for it (model None or its folder), SD3's
    for any other model."""
    bundled = model is None or Path(model).expanduser().resolve() == BUNDLED_MODEL
    return BUNDLED_MODEL_CFG if bundled else SD3_CFG


def load_conditioning(path, *, no_t5: bool = False, dtype: torch.dtype = torch.float32,
                      t5_tokens: int | None = None,
                      t5_tokenizer: str | None = None) -> tuple[TextEncoders, VAE]:
    """The text encoders and VAE of a model, without its MM-DiT: what precomputing training data needs."""
    path = resolve_model(path, no_t5)
    if path.is_dir() and (path / "model_index.json").is_file():
        return (load_diffusers_text_encoders(path, no_t5=no_t5, dtype=dtype, t5_tokens=t5_tokens),
                load_diffusers_vae(path, dtype))
    if path.is_file() and path.suffix == ".safetensors":
        vae_state = read_safetensors(path, VAE_PREFIX)[0]
        if not vae_state:
            raise CheckpointError(f"{path} holds no VAE (first_stage_model.*); accepted: {ACCEPTED_MODELS}")
        return (_single_file_text_encoders(path, no_t5, dtype, t5_tokens, t5_tokenizer),
                vae_from_ldm_state(vae_state, dtype))
    raise CheckpointError(f"model {path} does not exist or is not a recognised layout; accepted: {ACCEPTED_MODELS}")


def scheduler_shift(path) -> float:
    """The sampling shift a diffusers pipeline directory's scheduler declares; 3.0 (every released SD3 / SD3.5)
    when it declares none."""
    scheduler = Path(path) / "scheduler" / "scheduler_config.json"
    return float(json.loads(scheduler.read_text()).get("shift", 3.0)) if scheduler.is_file() else 3.0


def weights_digest(path) -> str:
    """sha256 of the MM-DiT's weights (a pipeline's transformer/*.safetensors, or the single file): what a score
    or an image was made with. Reads every byte: about a minute for SD3.5 Large's 16 GB."""
    import hashlib

    path = Path(path)
    files = sorted((path / "transformer").glob("*.safetensors")) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for f in files:
        with open(f, "rb") as stream:
            while chunk := stream.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def resolve_model(path, no_t5: bool = False) -> Path:
    """A local path as it is; an 'org/name' that is no local path as the hub's diffusers SD3 repository, fetched
    (or found in the cache) by huggingface_hub, without T5's files when no_t5."""
    local = Path(path)
    if local.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):
        return local
    from huggingface_hub import snapshot_download

    parts = ["scheduler", "transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"]
    parts += [] if no_t5 else ["text_encoder_3", "tokenizer_3"]
    try:
        return Path(snapshot_download(str(path), allow_patterns=["model_index.json", *(f"{p}/*" for p in parts)],
                                      ignore_patterns=["*.bin", "*.pt", "*.ckpt"]))
    except Exception as e:  # offline, unknown repository, gated model: the hub client raises many kinds
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"model {path} is no local path and could not be fetched from the hub ({reason}); "
                              f"accepted: {ACCEPTED_MODELS}") from None


def save_png(image: np.ndarray, path: Path, info: dict):
    """A uint8 (H, W, 3) image as PNG with its prompt and settings (info, as JSON in "parameters") in the metadata;
    written under a temporary name and renamed, so an interrupted run leaves no partial image."""
    import os
    import tempfile

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    meta.add_text("prompt", str(info.get("prompt", "")))
    meta.add_text("parameters", json.dumps(info))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        Image.fromarray(image).save(tmp, format="PNG", pnginfo=meta)
        os.chmod(tmp, default_mode())  # mkstemp makes owner-only files; an image is an ordinary file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def settings_record(settings: Settings) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()}


# ---------------------------------------------------------------------------------------------------------------
# Stability single files


def _beside(path: Path, role: str) -> Path | None:
    """Stability ships text encoders as text_encoders/clip_l.safetensors etc. next to the model file."""
    stem = {"clip_l": "clip_l", "clip_g": "clip_g", "t5xxl": "t5xxl"}[role]
    for folder in (path.parent / "text_encoders", path.parent):
        found = sorted(folder.glob(f"{stem}*.safetensors"))
        if found:
            return found[0]
    return None


def _encoder_state(path: Path, role: str) -> dict:
    state = read_safetensors(path, TEXT_ENCODER_PREFIX.format(role))[0]
    if state:
        return state
    beside = _beside(path, role)
    if beside is None:
        return {}
    return read_safetensors(beside, "")[0]


def _single_file_text_encoders(path: Path, no_t5: bool, dtype, t5_tokens: int | None, t5_tokenizer: str | None,
                               context_dim: int | None = None) -> TextEncoders:
    clip_tokenizer = clip_tokenizer_from_open_clip()
    encoders = {}
    for role in ("clip_l", "clip_g"):
        state = _encoder_state(path, role)
        if not state:
            raise CheckpointError(f"{path}: no {role} weights inside (text_encoders.{role}.*) or beside it "
                                  f"({role}*.safetensors); accepted: {ACCEPTED_MODELS}")
        encoders[role] = clip_from_state(state, role, clip_tokenizer, dtype)
    t5 = None
    if not no_t5:
        state = _encoder_state(path, "t5xxl")
        if not state:
            raise CheckpointError(f"{path}: no T5 weights inside (text_encoders.t5xxl.*) or beside it "
                                  f"(t5xxl*.safetensors); run with --no-t5 to use zeros for it")
        from transformers import AutoTokenizer

        t5 = t5_from_state(state, AutoTokenizer.from_pretrained(t5_tokenizer or T5_TOKENIZER_HUB_ID), dtype)
    width = t5.width if t5 else context_dim or TextLayout().context_dim
    layout = TextLayout(clip_l_dim=encoders["clip_l"].width, clip_g_dim=encoders["clip_g"].width,
                        context_dim=width, t5_tokens=t5_tokens or 77)
    return TextEncoders(layout, encoders["clip_l"], encoders["clip_g"], t5)


def export_single_file(pipeline_dir, out_path):
    """A diffusers SD3 pipeline directory as one Stability-layout all-in-one file (MM-DiT, VAE, text encoders)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    pipeline_dir = Path(pipeline_dir)
    tensors = {SAI_PREFIX + k: v for k, v in load_mmdit(pipeline_dir).state_dict().items()}
    vae = AutoencoderKL.from_pretrained(pipeline_dir / "vae")
    tensors.update({VAE_PREFIX + k: v for k, v in to_ldm(vae.state_dict(), len(vae.config.block_out_channels)).items()})
    for role, sub in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2")):
        state = CLIPTextModelWithProjection.from_pretrained(pipeline_dir / sub).state_dict()
        if role == "clip_l":  # Stability's CLIP-L file has no projection: SD3 uses the unprojected pooled output
            state.pop("text_projection.weight")
        tensors.update({TEXT_ENCODER_PREFIX.format(role) + k: v for k, v in state.items()})
    if (pipeline_dir / "text_encoder_3").is_dir():
        state = T5EncoderModel.from_pretrained(pipeline_dir / "text_encoder_3").state_dict()
        state.pop("encoder.embed_tokens.weight")  # tied to shared.weight
        tensors.update({TEXT_ENCODER_PREFIX.format("t5xxl") + k: v for k, v in state.items()})
    atomic_save_file(Path(out_path), tensors, {})
