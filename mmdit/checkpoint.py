"""MM-DiT checkpoint formats: Stability single files, diffusers directories and our native file.

Our module names equal Stability's keys, so that layout needs only its prefix. The diffusers layout is one explicit
key table (`diffusers_key_table`) with two named transforms: the fused qkv split into q, k, v, and the half swap of
the (shift, scale) modulations that diffusers stores as (scale, shift). Every conversion is strict: each key is used
exactly once, every shape must match, and the architecture comes from the tensors (sd3-reference.md section 3).
Only safetensors are read unless the caller opts in to pickle files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mmdit.config import MMDiTConfig
from mmdit.model import MMDiT

SAI_PREFIX = "model.diffusion_model."
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
NATIVE_FORMAT = "mmdit"
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}
FORMATS = ("native", "diffusers", "sai")
ACCEPTED = ("a Stability single file (*.safetensors with model.diffusion_model.* keys, all-in-one files included), "
            "a diffusers transformer directory (config.json + diffusion_pytorch_model*.safetensors), "
            "a diffusers pipeline directory (with transformer/), or an mmdit native *.safetensors file")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message is one line that says why and what is accepted."""


# ---------------------------------------------------------------------------------------------------------------
# The diffusers key table


def diffusers_key_table(config: MMDiTConfig) -> list[tuple[str, tuple[str, ...], str]]:
    """(our key, diffusers keys, transform) for every tensor. transform: 'same', 'qkv' (1 -> q, k, v) or 'swap'."""
    table = [
        ("pos_embed", ("pos_embed.pos_embed",), "same"),
        ("context_embedder.weight", ("context_embedder.weight",), "same"),
        ("context_embedder.bias", ("context_embedder.bias",), "same"),
    ]

    def add(ours, theirs, kind="same"):
        for p in ("weight", "bias"):
            names = tuple(f"{t}.{p}" for t in theirs) if isinstance(theirs, tuple) else (f"{theirs}.{p}",)
            table.append((f"{ours}.{p}", names, kind))

    add("x_embedder.proj", "pos_embed.proj")
    add("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1")
    add("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2")
    add("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1")
    add("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2")
    add("final_layer.linear", "proj_out")
    add("final_layer.adaLN_modulation.1", "norm_out.linear", "swap")

    for i in range(config.depth):
        ours, theirs = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        last = i == config.depth - 1
        add(f"{ours}.x_block.attn.qkv", tuple(f"{theirs}.attn.to_{n}" for n in "qkv"), "qkv")
        add(f"{ours}.x_block.attn.proj", f"{theirs}.attn.to_out.0")
        add(f"{ours}.x_block.adaLN_modulation.1", f"{theirs}.norm1.linear")
        add(f"{ours}.x_block.mlp.fc1", f"{theirs}.ff.net.0.proj")
        add(f"{ours}.x_block.mlp.fc2", f"{theirs}.ff.net.2")
        add(f"{ours}.context_block.attn.qkv", tuple(f"{theirs}.attn.add_{n}_proj" for n in "qkv"), "qkv")
        # The last block's text stream has only (shift, scale), stored by diffusers as (scale, shift).
        add(f"{ours}.context_block.adaLN_modulation.1", f"{theirs}.norm1_context.linear", "swap" if last else "same")
        if not last:
            add(f"{ours}.context_block.attn.proj", f"{theirs}.attn.to_add_out")
            add(f"{ours}.context_block.mlp.fc1", f"{theirs}.ff_context.net.0.proj")
            add(f"{ours}.context_block.mlp.fc2", f"{theirs}.ff_context.net.2")
        if config.qk_norm:
            for n in ("q", "k"):
                table.append((f"{ours}.x_block.attn.ln_{n}.weight", (f"{theirs}.attn.norm_{n}.weight",), "same"))
                table.append((f"{ours}.context_block.attn.ln_{n}.weight",
                              (f"{theirs}.attn.norm_added_{n}.weight",), "same"))
        if i in config.x_self_attn_layers:
            add(f"{ours}.x_block.attn2.qkv", tuple(f"{theirs}.attn2.to_{n}" for n in "qkv"), "qkv")
            add(f"{ours}.x_block.attn2.proj", f"{theirs}.attn2.to_out.0")
            if config.qk_norm:
                for n in ("q", "k"):
                    table.append((f"{ours}.x_block.attn2.ln_{n}.weight", (f"{theirs}.attn2.norm_{n}.weight",), "same"))
    return table


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(shift, scale) <-> (scale, shift) along the output rows; its own inverse."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def to_diffusers(state: dict[str, torch.Tensor], config: MMDiTConfig) -> dict[str, torch.Tensor]:
    out = {}
    for ours, theirs, kind in diffusers_key_table(config):
        t = state[ours]
        if kind == "qkv":
            out.update({name: part.clone() for name, part in zip(theirs, t.chunk(3, dim=0))})
        else:
            out[theirs[0]] = swap_halves(t) if kind == "swap" else t
    return out


def from_diffusers(state: dict[str, torch.Tensor], config: MMDiTConfig, source: str) -> dict[str, torch.Tensor]:
    out, used = {}, set()
    for ours, theirs, kind in diffusers_key_table(config):
        missing = [k for k in theirs if k not in state]
        if missing:
            raise CheckpointError(f"{source}: missing tensor {missing[0]} (truncated, or not an SD3 transformer)")
        parts = [state[k] for k in theirs]
        used.update(theirs)
        out[ours] = torch.cat(parts, dim=0) if kind == "qkv" else swap_halves(parts[0]) if kind == "swap" else parts[0]
    extra = sorted(set(state) - used)
    if extra:
        raise CheckpointError(f"{source}: {len(extra)} tensors not in an SD3 transformer, e.g. {extra[0]}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Architecture from tensors

# Where each shape-bearing tensor lives in the two layouts ({i} is a block index).
SHAPE_KEYS = {
    "sai": dict(patch="x_embedder.proj.weight", table="pos_embed", context="context_embedder.weight",
                pooled="y_embedder.mlp.0.weight", freq="t_embedder.mlp.0.weight",
                fc1="joint_blocks.0.x_block.mlp.fc1.weight", block=r"joint_blocks\.(\d+)\.",
                ln_q="joint_blocks.0.x_block.attn.ln_q.weight", attn2=r"joint_blocks\.(\d+)\.x_block\.attn2\."),
    "diffusers": dict(patch="pos_embed.proj.weight", table="pos_embed.pos_embed", context="context_embedder.weight",
                      pooled="time_text_embed.text_embedder.linear_1.weight",
                      freq="time_text_embed.timestep_embedder.linear_1.weight",
                      fc1="transformer_blocks.0.ff.net.0.proj.weight", block=r"transformer_blocks\.(\d+)\.",
                      ln_q="transformer_blocks.0.attn.norm_q.weight", attn2=r"transformer_blocks\.(\d+)\.attn2\."),
}


def infer_config(shapes: dict[str, tuple[int, ...]], layout: str, head_dim: int | None = None) -> MMDiTConfig:
    """The architecture from tensor shapes alone.

    The head count is not visible in the weights of a model without QK norm: then `head_dim` (from a diffusers
    config.json or our metadata) is used, else Stability's rule for all released models, one head per block.
    """
    keys = SHAPE_KEYS[layout]
    hidden, in_channels, patch, _ = shapes[keys["patch"]]
    depth = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(keys["block"], k)))
    if keys["ln_q"] in shapes:
        head_dim = shapes[keys["ln_q"]][0]
    elif head_dim is None:
        if hidden % depth:
            raise CheckpointError(f"cannot tell the head count of a width-{hidden}, depth-{depth} model without QK "
                                  f"norm; give head_dim")
        head_dim = hidden // depth
    table_rows = shapes[keys["table"]][1]
    side = round(table_rows ** 0.5)
    if side * side != table_rows:
        raise CheckpointError(f"position table has {table_rows} rows, not a square number")
    return MMDiTConfig(
        depth=depth, num_heads=hidden // head_dim, head_dim=head_dim, patch_size=patch, in_channels=in_channels,
        context_dim=shapes[keys["context"]][1], pooled_dim=shapes[keys["pooled"]][1], pos_embed_max_size=side,
        qk_norm=keys["ln_q"] in shapes,
        x_self_attn_layers=tuple(sorted({int(m.group(1)) for k in shapes if (m := re.match(keys["attn2"], k))})),
        mlp_ratio=shapes[keys["fc1"]][0] / hidden, frequency_dim=shapes[keys["freq"]][1])


# ---------------------------------------------------------------------------------------------------------------
# Reading


def read_safetensors(path: Path, prefix: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors whose key starts with prefix (prefix stripped; all of them for None) and the file's metadata."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
            if prefix is None:
                prefix = next((p for p in (SAI_PREFIX, "diffusion_model.") if any(k.startswith(p) for k in keys)), "")
            state = {k[len(prefix):]: f.get_tensor(k) for k in keys if k.startswith(prefix)}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return state, meta


def _read_pickle(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if not allow_pickle:
        raise CheckpointError(f"{path} is a pickle file, which can run code when loaded; convert it to safetensors, "
                              f"or pass allow_pickle=True to load it with torch.load(weights_only=True)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad pickle
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} could not be loaded as a weights-only pickle: {reason}") from None
    for key in ("state_dict", "module", "model"):  # common training-checkpoint wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
    prefix = next((p for p in (SAI_PREFIX, "diffusion_model.") if any(k.startswith(p) for k in obj)), "")
    return {k[len(prefix):]: v for k, v in obj.items() if k.startswith(prefix)}


def _read_diffusers_dir(path: Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], dict]:
    def read_json(file: Path) -> dict:
        try:
            value = json.loads(file.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{file} is not readable JSON: {e}") from None
        if not isinstance(value, dict):
            raise CheckpointError(f"{file} does not hold a JSON object")
        return value

    config = read_json(path / "config.json") if (path / "config.json").is_file() else {}
    if (path / DIFFUSERS_INDEX).is_file():
        weight_map = read_json(path / DIFFUSERS_INDEX).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{path / DIFFUSERS_INDEX} has no weight_map")
        files = sorted(set(weight_map.values()))
        state = {}
        for name in files:
            state.update(read_safetensors(path / name, prefix="")[0])
        return state, config
    if (path / DIFFUSERS_WEIGHTS).is_file():
        return read_safetensors(path / DIFFUSERS_WEIGHTS, prefix="")[0], config
    pickles = sorted(path.glob("diffusion_pytorch_model*.bin"))
    if pickles:
        state = {}
        for p in pickles:
            state.update(_read_pickle(p, allow_pickle))
        return state, config
    raise CheckpointError(f"{path} holds no diffusers transformer weights; accepted: {ACCEPTED}")


def read_mmdit_state(path: str | os.PathLike,
                     allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], MMDiTConfig]:
    """Any accepted checkpoint -> (state dict in our key names, inferred config). No model is built."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; accepted: {ACCEPTED}")
    head_dim = None
    if path.is_dir():
        if (path / "transformer").is_dir():  # a diffusers pipeline
            path = path / "transformer"
        state, dconfig = _read_diffusers_dir(path, allow_pickle)
        head_dim = dconfig.get("attention_head_dim")
    elif path.suffix in PICKLE_SUFFIXES:
        state = _read_pickle(path, allow_pickle)
    elif path.suffix == ".safetensors":
        state, meta = read_safetensors(path)
        if "mmdit_config" in meta:
            head_dim = json.loads(meta["mmdit_config"])["head_dim"]
    else:
        raise CheckpointError(f"{path}: unknown checkpoint type {path.suffix!r}; accepted: {ACCEPTED}")
    return to_native_state(state, head_dim, str(path))


def to_native_state(state: dict[str, torch.Tensor], head_dim: int | None = None,
                    source: str = "state dict") -> tuple[dict[str, torch.Tensor], MMDiTConfig]:
    """A state dict in either layout (prefix stripped) -> (our key names, the architecture its shapes imply)."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if SHAPE_KEYS["sai"]["patch"] in shapes:
        layout = "sai"
    elif SHAPE_KEYS["diffusers"]["patch"] in shapes:
        layout = "diffusers"
    else:
        raise CheckpointError(f"{source} holds no MM-DiT weights; accepted: {ACCEPTED}")
    try:
        config = infer_config(shapes, layout, head_dim)
    except CheckpointError:
        raise
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{source}: incomplete MM-DiT weights (truncated?): {e}") from None
    if layout == "diffusers":
        state = from_diffusers(state, config, source)
    return state, config


def build_mmdit(state: dict[str, torch.Tensor], config: MMDiTConfig, dtype: torch.dtype | None = None,
                source: str = "state dict") -> MMDiT:
    """An MM-DiT holding exactly these tensors (our key names): every key present, none extra, shapes equal."""
    if dtype is None:
        dtype = state["context_embedder.weight"].dtype
    with torch.device("meta"):
        model = MMDiT(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing {len(missing)} tensors, e.g. {missing[0]}" if missing else \
            f"{len(unexpected)} unexpected tensors, e.g. {unexpected[0]}"
        raise CheckpointError(f"{source}: {what} (truncated, or not an SD3 / SD3.5 MM-DiT)")
    wrong = [k for k, v in state.items() if v.shape != expected[k].shape]
    if wrong:
        raise CheckpointError(f"{source}: tensor {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, "
                              f"expected {tuple(expected[wrong[0]].shape)}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return model


def load_mmdit(path: str | os.PathLike, dtype: torch.dtype | None = None, allow_pickle: bool = False) -> MMDiT:
    """Build an MM-DiT from any accepted checkpoint, strictly. dtype None keeps the checkpoint's own precision."""
    state, config = read_mmdit_state(path, allow_pickle)
    return build_mmdit(state, config, dtype, str(path))


# ---------------------------------------------------------------------------------------------------------------
# Writing (atomic: a temporary name, then one rename, so an interrupted save never leaves a corrupt file)


def diffusers_config(config: MMDiTConfig) -> dict:
    if config.mlp_ratio != 4.0 or config.frequency_dim != 256:
        raise CheckpointError("the diffusers layout fixes mlp_ratio 4 and frequency_dim 256; this model has "
                              f"{config.mlp_ratio} and {config.frequency_dim}: save it as 'native' or 'sai'")
    try:
        import diffusers
        version = diffusers.__version__
    except ImportError:  # writing the layout does not need the library
        version = "0.31.0"
    return {
        "_class_name": "SD3Transformer2DModel", "_diffusers_version": version,
        "sample_size": 128, "patch_size": config.patch_size, "in_channels": config.in_channels,
        "num_layers": config.depth, "attention_head_dim": config.head_dim, "num_attention_heads": config.num_heads,
        "joint_attention_dim": config.context_dim, "caption_projection_dim": config.hidden_size,
        "pooled_projection_dim": config.pooled_dim, "out_channels": config.out_channels,
        "pos_embed_max_size": config.pos_embed_max_size, "dual_attention_layers": list(config.x_self_attn_layers),
        "qk_norm": "rms_norm" if config.qk_norm else None,
    }


def default_mode(directory: bool = False) -> int:
    """The permissions an ordinary new file (or folder) gets under the process umask; mkstemp's are owner-only."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def atomic_save_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_mmdit(model: MMDiT, path: str | os.PathLike, format: str = "native", state: dict | None = None):
    """Write the model as 'native' (one file, our keys + config), 'sai' (Stability single file) or 'diffusers'
    (a directory that SD3Transformer2DModel.from_pretrained loads). Tensors keep the model's dtype; `state`, when
    given, is written in place of the model's own (a trainer's fp32 master weights, same keys)."""
    if format not in FORMATS:
        raise CheckpointError(f"unknown checkpoint format {format!r}; accepted: {', '.join(FORMATS)}")
    path = Path(path)
    state = model.state_dict() if state is None else state
    meta = {"format": NATIVE_FORMAT, "mmdit_config": json.dumps(model.config.to_dict())}
    if format == "native":
        atomic_save_file(path, state, meta)
    elif format == "sai":
        atomic_save_file(path, {SAI_PREFIX + k: v for k, v in state.items()}, {"mmdit_config": meta["mmdit_config"]})
    else:
        config = diffusers_config(model.config)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in to_diffusers(state, model.config).items()},
                      tmp / DIFFUSERS_WEIGHTS, metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            os.chmod(tmp, default_mode(directory=True))
            old = path.with_name(f".{path.name}.old")
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
