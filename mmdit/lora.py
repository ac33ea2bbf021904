"""LoRA for the MM-DiT: adapters through peft on our modules, the file layouts other tools read, and LoRAs applied
at load by adding their delta-W.

Our modules are Stability's (a fused qkv per attention). A LoRA on a fused projection, delta-W = B A with B (3h, r)
and A (r, h), is exactly three LoRAs on diffusers' separate to_q / to_k / to_v (add_q_proj / ... for the text
stream): they share A and each takes its third of B's rows. So training keeps one adapter per fused module, and
each layout is exact:

    ours       joint_blocks.{i}.x_block.attn.qkv.lora_A.weight / .lora_B.weight      (peft's names on our modules)
    diffusers  transformer.transformer_blocks.{i}.attn.to_q.lora_A.weight / .lora_B.weight   (load_lora_weights)
    kohya      lora_unet_joint_blocks_{i}_x_block_attn_qkv.lora_down.weight / .lora_up.weight / .alpha   (ComfyUI)

The diffusers file carries B already scaled by alpha / rank (diffusers then loads it at alpha = rank, scale 1);
the kohya file keeps B as trained with its alpha, as kohya's trainer writes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mmdit.checkpoint import CheckpointError, diffusers_key_table
from mmdit.config import LORA_TARGETS, LoraSpec, MMDiTConfig

KOHYA_PREFIX = "lora_unet_"

def add_lora(model: torch.nn.Module, spec: LoraSpec) -> torch.nn.Module:
    """Adapters on model's target modules (in place, through peft); everything else frozen. B starts at zero,
    so the adapted model is the base model until it trains."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=spec.rank, lora_alpha=spec.lora_alpha,
                        lora_dropout=spec.dropout, target_modules=list(spec.targets), bias="none")
    try:
        inject_adapter_in_model(config, model)
    except ValueError as e:   # peft's NoMatchingPeftModuleError: no module of this base has those names
        raise CheckpointError(f"model.lora.targets {list(spec.targets)} match no module of this model "
                              f"({str(e).splitlines()[0]})") from None
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    model.lora_spec = spec
    return model


def load_lora_state(model: torch.nn.Module, state: dict[str, torch.Tensor]):
    """Our layout's tensors copied into an adapted model's adapters, in place (the optimizer keeps holding the
    same parameters); every adapter must be given, and nothing else."""
    params = {name: p for name, p in model.named_parameters() if ".lora_" in name}
    given = ours_to_module_names(state)
    unexpected, missing = sorted(set(given) - set(params)), sorted(set(params) - set(given))
    if unexpected or missing:
        raise CheckpointError(f"LoRA tensor {(unexpected or missing)[0]} "
                              f"{'has no module in this model' if unexpected else 'is missing'}")
    with torch.no_grad():
        for name, p in params.items():
            if tuple(given[name].shape) != tuple(p.shape):
                raise CheckpointError(f"LoRA tensor {name} is {tuple(given[name].shape)}, the model's {tuple(p.shape)}")
            p.copy_(given[name])


def _pairs(state: dict[str, torch.Tensor], down: str, up: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    modules = {k[: -len(down)] for k in state if k.endswith(down)}
    out = {}
    for m in sorted(modules):
        if m + up not in state:
            raise CheckpointError(f"LoRA tensor {m + down} has no {up.lstrip('.')} beside it")
        out[m] = (state[m + down], state[m + up])
    return out


# ---------------------------------------------------------------------------------------------------------------
# The layouts


def _fused_table(config: MMDiTConfig) -> dict[str, tuple[tuple[str, ...], str]]:
    """Our module -> (diffusers modules, kind), for the LoRA targets."""
    table = {}
    for ours, theirs, kind in diffusers_key_table(config):
        module = ours.removesuffix(".weight")
        if ours.endswith(".weight") and module.endswith(LORA_TARGETS):
            table[module] = (tuple(t.removesuffix(".weight") for t in theirs), kind)
    return table


def to_diffusers_lora(state: dict[str, torch.Tensor], config: MMDiTConfig, scale: float) -> dict[str, torch.Tensor]:
    """Our adapters as diffusers' transformer LoRA: a fused qkv's A shared by q, k and v, B split by rows; B times
    scale, so diffusers' default alpha (= rank) gives the same delta-W."""
    table, out = _fused_table(config), {}
    for module, (a, b) in _pairs(state, ".lora_A.weight", ".lora_B.weight").items():
        theirs, kind = table[module]
        parts = b.chunk(3, dim=0) if kind == "qkv" else (b,)
        for name, part in zip(theirs, parts):
            out[f"transformer.{name}.lora_A.weight"] = a.clone()   # shared by q, k, v: one copy each on disk
            out[f"transformer.{name}.lora_B.weight"] = (part * scale).contiguous()
    return out


def to_kohya_lora(state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """Our adapters in kohya's sd3 layout (ComfyUI's LoRA loader maps lora_unet_ + the Stability module name with
    dots as underscores onto model.diffusion_model.*): fused modules as they are, with alpha."""
    out = {}
    for module, (a, b) in _pairs(state, ".lora_A.weight", ".lora_B.weight").items():
        key = KOHYA_PREFIX + module.replace(".", "_")
        out[f"{key}.lora_down.weight"] = a.contiguous()
        out[f"{key}.lora_up.weight"] = b.contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(alpha))
    return out


def read_lora_file(path: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if path.suffix != ".safetensors":
        if not allow_pickle:
            raise CheckpointError(f"{path}: not a .safetensors LoRA; pickle files are read only when allowed "
                                  f"(--allow-pickle), weights-only")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:   # torch.load raises many kinds for a bad file
            raise CheckpointError(f"{path} is not a readable LoRA file ({type(e).__name__})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path} does not hold a mapping of names to tensors")
        return {k: v.float() for k, v in state.items()}
    try:
        return {k: v.float() for k, v in load_file(path).items()}
    except (OSError, SafetensorError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None


TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "te1", "te2", "te3")   # LoRAs of text encoders: not ours to apply


def _linear_shapes(config: MMDiTConfig) -> dict[str, tuple[int, int]]:
    """Every Linear of the MM-DiT (module name -> weight shape), read off a model built without memory."""
    from mmdit.model import MMDiT

    with torch.device("meta"):
        model = MMDiT(config)
    return {name: tuple(m.weight.shape) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _diffusers_scale(path: Path) -> float:
    """alpha / rank from diffusers' own LoRA metadata (save_lora_weights with the adapter's LoraConfig), else 1
    (diffusers then loads at alpha = rank); our diffusers exports carry none: their B is already scaled."""
    meta = _json_metadata(path, "lora_adapter_metadata")
    rank = meta.get("transformer.r", meta.get("r"))
    alpha = meta.get("transformer.lora_alpha", meta.get("lora_alpha"))
    return float(alpha) / float(rank) if rank and alpha else 1.0


def deltas(path: str | Path, config: MMDiTConfig, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """delta-W per our module (weight key) of a LoRA file in any of the three layouts, for any Linear of the model
    (kohya's trainer also adapts adaLN), checked against config: a tensor for a module this model lacks, or of
    another shape, is a CheckpointError naming it. Text-encoder parts are left out (their count is logged)."""
    import logging

    from mmdit.checkpoint import swap_halves

    path = Path(path)
    state = read_lora_file(path, allow_pickle)
    skipped = [k for k in state if k.startswith(TEXT_ENCODER_PREFIXES)]
    state = {k: v for k, v in state.items() if not k.startswith(TEXT_ENCODER_PREFIXES)}
    if skipped:
        logging.getLogger(__name__).warning("%s: %d text-encoder LoRA tensors left out (only the MM-DiT is adapted)",
                                            path, len(skipped))
    shapes = _linear_shapes(config)
    out: dict[str, torch.Tensor] = {}
    unknown = "names no module of this model (another architecture or depth?)"
    if any(k.startswith(KOHYA_PREFIX) for k in state):
        by_name = {KOHYA_PREFIX + m.replace(".", "_"): m for m in shapes}
        for key, (down, up) in _pairs(state, ".lora_down.weight", ".lora_up.weight").items():
            if key not in by_name:
                raise CheckpointError(f"{path}: LoRA key {key} {unknown}")
            alpha = state.get(f"{key}.alpha")
            scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
            out[by_name[key]] = _checked(path, key, scale * up @ down, shapes[by_name[key]])
    elif any(k.startswith("transformer.") for k in state):
        inverse = {}
        for ours, theirs, kind in diffusers_key_table(config):
            if ours.endswith(".weight") and ours.removesuffix(".weight") in shapes:
                for i, name in enumerate(theirs):
                    inverse[name.removesuffix(".weight")] = (ours.removesuffix(".weight"), i, kind)
        scale = _diffusers_scale(path)
        for key, (a, b) in _pairs(state, ".lora_A.weight", ".lora_B.weight").items():
            name = key.removeprefix("transformer.")
            if name not in inverse:
                raise CheckpointError(f"{path}: LoRA key {key} {unknown}")
            module, part, kind = inverse[name]
            delta = scale * b @ a
            rows, cols = shapes[module]
            if kind == "qkv":   # one of q, k, v: its rows of the fused delta
                fused = out.setdefault(module, torch.zeros(rows, cols))
                _checked(path, key, delta, (rows // 3, cols))
                fused[part * rows // 3:(part + 1) * rows // 3] += delta
            else:   # "swap": diffusers stores (scale, shift) where we keep (shift, scale)
                out[module] = _checked(path, key, swap_halves(delta) if kind == "swap" else delta, (rows, cols))
    else:
        metadata = lora_record(path)
        scale = float(metadata.get("alpha", 0) or 0) / float(metadata.get("rank", 1) or 1) or 1.0
        for module, (a, b) in _pairs(state, ".lora_A.weight", ".lora_B.weight").items():
            if module not in shapes:
                raise CheckpointError(f"{path}: LoRA key {module}.lora_A.weight {unknown}")
            out[module] = _checked(path, module, scale * b @ a, shapes[module])
    if not out:
        raise CheckpointError(f"{path}: no LoRA tensors for the MM-DiT (accepted: diffusers' transformer.*.lora_A/B, "
                              f"kohya's lora_unet_*.lora_down/up, or ours *.lora_A/B)")
    return out


def _checked(path, key: str, delta: torch.Tensor, shape) -> torch.Tensor:
    if tuple(delta.shape) != tuple(shape):
        raise CheckpointError(f"{path}: LoRA key {key} gives a {tuple(delta.shape)} delta where this model's "
                              f"weight is {tuple(shape)} (another architecture or width?)")
    return delta


def _json_metadata(path: Path, key: str) -> dict:
    """A JSON object stored under key in a safetensors file's metadata; {} when absent, unreadable or not one."""
    from safetensors import safe_open

    if Path(path).suffix != ".safetensors":
        return {}
    with safe_open(path, "pt") as f:
        raw = (f.metadata() or {}).get(key)
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def lora_record(path: Path) -> dict:
    """What our LoRA files say of themselves (lora_metadata): rank, alpha, targets, base_sha256, recipe."""
    return _json_metadata(path, "mmdit_lora")


def apply_loras(model: torch.nn.Module, loras: list[tuple[str, float]], allow_pickle: bool = False):
    """Add each LoRA's delta-W, times its scale, to the model's weights (in place, at load). Every file is read
    and checked before any weight changes."""
    params = dict(model.named_parameters())
    read = [(deltas(path, model.config, allow_pickle), scale) for path, scale in loras]
    for found, scale in read:
        for module, delta in found.items():
            weight = params[f"{module}.weight"]
            with torch.no_grad():   # summed in fp32: a float16 weight plus a small delta would lose it
                weight.copy_((weight.float() + scale * delta.to(weight.device)).to(weight.dtype))


# ---------------------------------------------------------------------------------------------------------------
# Training: the EMA twin, checkpoints of adapters only, exports


def trained_lora(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' parameters under our layout's names (peft's adapter name dropped), as they are."""
    return module_to_ours_names({name: p.detach() for name, p in model.named_parameters() if ".lora_" in name})


def module_to_ours_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An adapted model's parameter names (peft's adapter 'default') to our layout's."""
    return {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
            for k, v in state.items()}


def ours_to_module_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our layout's names back to an adapted module's parameter names (peft's adapter 'default')."""
    return {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
            for k, v in state.items()}


def lora_twin(model: torch.nn.Module) -> torch.nn.Module:
    """An adapted model's EMA: the same frozen base tensors (shared, never copied: the base of SD3.5 Large is
    16 GB), its own fp32 copies of the adapters, nothing trainable."""
    from mmdit.model import MMDiT

    spec = model.lora_spec
    with torch.device("meta"):
        twin = MMDiT(model.config)
    add_lora(twin, spec)
    twin.load_state_dict(model.state_dict(), assign=True)
    for name, p in twin.named_parameters():
        if ".lora_" in name:
            p.data = p.data.detach().clone().float()
    twin.lora_spec = spec
    return twin.requires_grad_(False).eval()   # eval: LoRA dropout off in validation and sample grids


def lora_metadata(spec: LoraSpec, base_sha256: str, recipe: dict | None = None) -> dict[str, str]:
    """What every LoRA file says of itself (safetensors metadata, strings): rank, alpha, targets, the base's sha256
    and the recipe, under "mmdit_lora"; and the keys kohya's tools read."""
    alpha = spec.lora_alpha
    record = {"rank": spec.rank, "alpha": alpha, "targets": list(spec.targets), "base_sha256": base_sha256,
              "recipe": recipe}
    return {"mmdit_lora": json.dumps(record), "ss_network_dim": str(spec.rank), "ss_network_alpha": str(alpha),
            "ss_base_model_sha256": base_sha256, "format": "pt"}


def save_lora_files(state: dict[str, torch.Tensor], config: MMDiTConfig, spec: LoraSpec, folder: Path,
                    metadata: dict[str, str], prefix: str = "lora"):
    """ours (PREFIX.safetensors), diffusers' (PREFIX_diffusers.safetensors) and kohya's / ComfyUI's
    (PREFIX_kohya.safetensors), each written under a temporary name and renamed."""
    from mmdit.checkpoint import atomic_save_file

    state = {k: v.float().contiguous() for k, v in state.items()}
    alpha = spec.lora_alpha
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_file(folder / f"{prefix}.safetensors", state, metadata)
    baked = {**metadata, "ss_network_alpha": str(spec.rank)}   # its B carries alpha / rank: it loads at alpha = rank
    record = json.loads(metadata.get("mmdit_lora", "{}"))
    baked["mmdit_lora"] = json.dumps({**record, "alpha": spec.rank, "alpha_trained": alpha})
    atomic_save_file(folder / f"{prefix}_diffusers.safetensors", to_diffusers_lora(state, config, spec.scale), baked)
    atomic_save_file(folder / f"{prefix}_kohya.safetensors", to_kohya_lora(state, alpha), metadata)


def merged_model(base: torch.nn.Module, state: dict[str, torch.Tensor], spec: LoraSpec) -> torch.nn.Module:
    """A plain MM-DiT: base's weights plus the adapters' delta-W (base unchanged)."""
    from mmdit.model import MMDiT

    merged = MMDiT(base.config)
    merged.load_state_dict({k.replace(".base_layer", ""): v.detach().float() for k, v in base.state_dict().items()
                            if ".lora_" not in k})
    params = dict(merged.named_parameters())
    with torch.no_grad():
        for module, (a, b) in _pairs(state, ".lora_A.weight", ".lora_B.weight").items():
            params[f"{module}.weight"].add_(spec.scale * b.float() @ a.float())
    return merged


def export_checkpoint(checkpoint: Path, out: Path, base: str | None = None, raw: bool = False) -> Path:
    """A LoRA run's checkpoint (its EMA adapters, or with raw the trained ones) in the three LoRA layouts, and
    merged into its base as a whole model (native, Stability and diffusers formats). base: the model the run
    adapted (default: its recipe's model.init_from); its sha256 must be the one the adapters were trained on."""
    from safetensors.torch import load_file

    from mmdit.checkpoint import load_mmdit, save_mmdit
    from mmdit.loading import weights_digest

    source = checkpoint / ("lora.safetensors" if raw else "ema_lora.safetensors")
    if not source.is_file():
        raise CheckpointError(f"{checkpoint} holds no {source.name}: not a checkpoint of a LoRA run (model.lora)")
    record = lora_record(source)
    if not record.get("rank"):
        raise CheckpointError(f"{source} carries no LoRA metadata (rank, alpha, base): written by another tool?")
    base = base or ((record.get("recipe") or {}).get("model") or {}).get("init_from")
    if not base:
        raise CheckpointError(f"{source} names no base model: give --base")
    digest = weights_digest(base)
    if record.get("base_sha256") and digest != record["base_sha256"]:
        raise CheckpointError(f"--base {base} is not the model these adapters were trained on (sha256 {digest[:12]}, "
                              f"the adapters' {record['base_sha256'][:12]})")
    spec = LoraSpec.from_dict({k: record[k] for k in ("rank", "alpha", "targets") if k in record})
    model = load_mmdit(base, dtype=torch.float32)
    state = load_file(source)
    out.mkdir(parents=True, exist_ok=True)
    metadata = lora_metadata(spec, digest, record.get("recipe"))
    save_lora_files(state, model.config, spec, out, metadata)
    merged = merged_model(model, state, spec)
    save_mmdit(merged, out / "merged.safetensors", "native")
    save_mmdit(merged, out / "merged_sai.safetensors", "sai")
    save_mmdit(merged, out / "merged_transformer", "diffusers")
    return out


def main(argv=None):
    import argparse

    from mmdit.cli import fail, one_line

    parser = argparse.ArgumentParser(prog="python3 -m mmdit.lora", description="LoRA files from a LoRA run's "
                                     "checkpoint: ours, diffusers' (load_lora_weights), kohya's / ComfyUI's, and "
                                     "the merged model in the native, Stability and diffusers formats.")
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="export a checkpoint folder (runs/NAME/checkpoints/step_*)")
    export.add_argument("checkpoint")
    export.add_argument("--out", required=True, help="the folder to write into")
    export.add_argument("--base", help="the adapted model (default: the recipe's model.init_from)")
    export.add_argument("--raw", action="store_true", help="the trained adapters instead of their EMA")
    args = parser.parse_args(argv)
    from safetensors import SafetensorError

    if args.base and not Path(args.base).exists():
        fail("python3 -m mmdit.lora", f"--base {args.base} does not exist")
    try:
        out = export_checkpoint(Path(args.checkpoint), Path(args.out), args.base, args.raw)
    except (ValueError, OSError, SafetensorError) as e:
        fail("python3 -m mmdit.lora", one_line(e))
    print(f"wrote {out}/lora.safetensors, lora_diffusers.safetensors, lora_kohya.safetensors and the merged model")


if __name__ == "__main__":
    main()
