"""Finding and loading a whole SD3 model: its MM-DiT, VAE, text encoders and sampling shift, from any layout.

A model is a diffusers SD3 pipeline directory, a Stability single file (with its text encoders inside it or beside
it, as Stability ships SD3.5), or a hub id of a diffusers SD3 repository when the hub can be reached. This module
finds the parts (`resolve_model`, the single-file discovery), loads them through the real loaders of
mmdit.checkpoint, mmdit.vae and mmdit.text, hashes what an image or a score was made with (`weights_digest`), and
writes the single-file layout back (`export_single_file`). It builds nothing and samples nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import torch

from mmdit.checkpoint import SAI_PREFIX, CheckpointError, atomic_save_file, load_mmdit, read_safetensors
from mmdit.model import MMDiT
from mmdit.text import (TextEncoders, clip_from_state, clip_tokenizer_from_open_clip, encoders_with_layout,
                        load_diffusers_text_encoders, open_clip_text_to_transformers, t5_from_state,
                        tokenizer_max_length)
from mmdit.vae import CONFIG_IN_METADATA, VAE, load_diffusers_vae, to_ldm, vae_from_ldm_state

ACCEPTED_MODELS = ("a diffusers SD3 pipeline directory (model_index.json with transformer/, vae/, text_encoder*/, "
                   "tokenizer*/) or a Stability single file (*.safetensors with model.diffusion_model.* and "
                   "first_stage_model.* keys; text encoders inside it as text_encoders.*, or beside it as "
                   "clip_l/clip_g/t5xxl*.safetensors, also in a text_encoders/ folder)")
T5_TOKENIZER_HUB_ID = "google/t5-v1_1-xxl"
TEXT_ENCODER_PREFIX = "text_encoders.{}.transformer."
VAE_PREFIX = "first_stage_model."
SD3_SHIFT = 3.0   # every released SD3 / SD3.5 samples with shift 3


@dataclasses.dataclass
class Model:
    """The loaded parts of a whole model."""

    transformer: MMDiT
    vae: VAE
    text: TextEncoders
    shift: float


def load_model(path, *, no_t5: bool = False, dtype: torch.dtype = torch.float32, t5_tokens: int | None = None,
               t5_tokenizer: str | None = None, allow_pickle: bool = False, clip_g: str | None = None) -> Model:
    """Every part of a model (see ACCEPTED_MODELS), on the CPU in dtype. clip_g: a safetensors file that replaces
    CLIP-G, in transformers' layout (Stability's clip_g.safetensors) or open_clip's (a ViT-bigG-14 checkpoint)."""
    path = resolve_model(path, no_t5)
    if is_pipeline_dir(path):
        transformer = load_mmdit(path, dtype=dtype, allow_pickle=allow_pickle)
        vae = load_diffusers_vae(path, dtype, allow_pickle)
        text = load_diffusers_text_encoders(path, no_t5=no_t5, dtype=dtype, t5_tokens=t5_tokens,
                                            context_dim=transformer.config.context_dim, allow_pickle=allow_pickle)
        shift = scheduler_shift(path)
    elif is_single_file(path):
        transformer = load_mmdit(path, dtype=dtype)
        vae = _single_file_vae(path, dtype)
        text = _single_file_text_encoders(path, no_t5, dtype, t5_tokens, t5_tokenizer, transformer.config.context_dim)
        shift = float(_single_file_metadata(path).get("scheduler_shift", SD3_SHIFT))
    else:
        raise _not_a_model(path)
    if clip_g is not None:
        state = read_safetensors(Path(clip_g), "")[0]
        if "token_embedding.weight" in state:
            state = open_clip_text_to_transformers(state)
        text.clip_g = clip_from_state(state, "clip_g", text.clip_g.tokenizer, dtype)
        text.layout = dataclasses.replace(text.layout, clip_g_dim=text.clip_g.width)
    if text.layout.pooled_dim != transformer.config.pooled_dim:
        raise CheckpointError(f"{path}: text encoders give pooled width {text.layout.pooled_dim}, the MM-DiT "
                              f"expects {transformer.config.pooled_dim}")
    return Model(transformer, vae, text, shift)


def load_conditioning(path, *, no_t5: bool = False, dtype: torch.dtype = torch.float32,
                      t5_tokens: int | None = None, t5_tokenizer: str | None = None) -> tuple[TextEncoders, VAE]:
    """The text encoders and VAE of a model, without its MM-DiT: what precomputing training data needs."""
    path = resolve_model(path, no_t5)
    if is_pipeline_dir(path):
        return (load_diffusers_text_encoders(path, no_t5=no_t5, dtype=dtype, t5_tokens=t5_tokens),
                load_diffusers_vae(path, dtype))
    if is_single_file(path):
        return (_single_file_text_encoders(path, no_t5, dtype, t5_tokens, t5_tokenizer),
                _single_file_vae(path, dtype))
    raise _not_a_model(path)


def is_pipeline_dir(path: Path) -> bool:
    return path.is_dir() and (path / "model_index.json").is_file()


def is_single_file(path: Path) -> bool:
    return path.is_file() and path.suffix == ".safetensors"


def _not_a_model(path: Path) -> CheckpointError:
    if not path.exists():
        return CheckpointError(f"model {path} does not exist; accepted: {ACCEPTED_MODELS}")
    return CheckpointError(f"model {path} is not a recognised layout; accepted: {ACCEPTED_MODELS}")


def scheduler_shift(path) -> float:
    """The sampling shift a diffusers pipeline directory's scheduler declares; SD3's 3.0 when it declares none."""
    scheduler = Path(path) / "scheduler" / "scheduler_config.json"
    return float(json.loads(scheduler.read_text()).get("shift", SD3_SHIFT)) if scheduler.is_file() else SD3_SHIFT


def component_digests(path, no_t5: bool = False) -> dict[str, str]:
    """{component: weights_digest} for every component with weights that a pipeline directory's model_index.json
    names but the MM-DiT (weights_digest's own) and, when no_t5, T5 (not used); {} for a single file (its
    weights_digest covers it): with the MM-DiT's digest, what an image was made with (the same MM-DiT beside another
    VAE or other encoders draws other images)."""
    path = Path(path)
    index = path / "model_index.json"
    if not index.is_file():
        return {}
    skip = {"transformer", "text_encoder_3"} if no_t5 else {"transformer"}
    names = [k for k, v in json.loads(index.read_text()).items() if isinstance(v, list) and k not in skip]
    return {name: weights_digest(path, name) for name in sorted(names)
            if any(f.suffix in (".safetensors", ".bin") for f in (path / name).glob("*"))}


def weights_digest(path, component: str = "transformer") -> str:
    """sha256 of a pipeline directory's component weights (its COMPONENT/*.safetensors, or *.bin where it has no
    safetensors: the MM-DiT by default), or of a single file: what a score or an image was made with. Reads every
    byte, so it takes as long as reading the files once."""
    path = Path(path)
    folder = path / component
    if path.is_dir() and not folder.is_dir():   # the component's own folder given (a diffusers transformer/)
        folder = path
    files = (sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))) if path.is_dir() else [path]
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


# ---------------------------------------------------------------------------------------------------------------
# Stability single files


def _single_file_metadata(path: Path) -> dict:
    """What export_single_file records beyond the tensors (a released file has none): {"vae": {...},
    "scheduler_shift": ..., "t5_tokens": ...}."""
    meta = read_safetensors(path, "\0")[1]   # a prefix no key has: the metadata alone
    try:
        return json.loads(meta.get("mmdit", "{}"))
    except ValueError:
        return {}


def _single_file_vae(path: Path, dtype) -> VAE:
    state = read_safetensors(path, VAE_PREFIX)[0]
    if not state:
        raise CheckpointError(f"{path} holds no VAE (first_stage_model.*); accepted: {ACCEPTED_MODELS}")
    return vae_from_ldm_state(state, dtype, _single_file_metadata(path).get("vae"))


def _beside(path: Path, role: str) -> Path | None:
    """Stability ships text encoders as text_encoders/clip_l.safetensors etc. next to the model file."""
    for folder in (path.parent / "text_encoders", path.parent):
        found = sorted(folder.glob(f"{role}*.safetensors"))
        if found:
            return found[0]
    return None


def _encoder_state(path: Path, role: str) -> dict:
    """An encoder's tensors from inside the single file, else from the file beside it, else {}."""
    state = read_safetensors(path, TEXT_ENCODER_PREFIX.format(role))[0]
    if state:
        return state
    beside = _beside(path, role)
    return read_safetensors(beside, "")[0] if beside is not None else {}


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
    # CLIP reads at most its position table (77 for the released towers); T5 as the file records, else 77
    clip_tokens = min(77, encoders["clip_l"].model.config.max_position_embeddings)
    recorded = _single_file_metadata(path).get("t5_tokens", 77)
    return encoders_with_layout(encoders["clip_l"], encoders["clip_g"], t5, t5_tokens=t5_tokens or recorded,
                                clip_tokens=clip_tokens, context_dim=context_dim)


def export_single_file(pipeline_dir, out_path):
    """A diffusers SD3 pipeline directory as one Stability-layout all-in-one file (MM-DiT, VAE, text encoders)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    pipeline_dir = Path(pipeline_dir)
    mmdit = load_mmdit(pipeline_dir)
    tensors = {SAI_PREFIX + k: v for k, v in mmdit.state_dict().items()}
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
    vae_config = {k: vae.config[k] for k in CONFIG_IN_METADATA}
    extra = {"vae": vae_config, "scheduler_shift": scheduler_shift(pipeline_dir)}
    if (pipeline_dir / "tokenizer_3").is_dir():
        extra["t5_tokens"] = tokenizer_max_length(pipeline_dir / "tokenizer_3")
    # mmdit_config as save_mmdit(..., "sai") writes it: the head count, which the weights show only with QK norm
    atomic_save_file(Path(out_path), tensors, {"mmdit": json.dumps(extra),
                                               "mmdit_config": json.dumps(mmdit.config.to_dict())})
