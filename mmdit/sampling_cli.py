"""The sampling command line, shared by sample.py and `python3 -m mmdit.eval.geneval generate`.

One set of flags (the model, how to load it, how to sample), one check of their values, done before any model
loads or any file is written, and the Settings they produce once the model is known. Importing this module loads
no torch, so --help answers at once; torch comes with `device_and_dtype` and `load_pipeline`.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from mmdit.cli import UsageError, one_line
from mmdit.config import MAX_GUIDANCE, SAMPLERS, SAMPLING_DEFAULTS_FILE, Settings
from mmdit.toy import BUNDLED_MODEL

SD3_CFG = 7.0            # StableDiffusion3Pipeline's default guidance scale
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
SEED_LIMIT = 2**63 - 2**32   # torch's generators take seeds below 2^64; image i uses seed + i, so leave room
MAX_BATCH, MAX_T5_TOKENS = 1024, 512   # 512: the longest T5 sequence diffusers' SD3 pipeline accepts
DEVICE_PATTERN = r"cpu|cuda(:\d+)?|mps|xpu(:\d+)?"


def add_arguments(parser: argparse.ArgumentParser, *, seed: int, batch_size: int):
    """The shared flags. seed and batch_size are the defaults of the calling command (GenEval's convention is
    seed 42 and batches of 4; sample.py starts at seed 0, one image at a time)."""
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=None, help="a diffusers SD3 pipeline directory, a Stability single file or "
                       "a hub id (default: the bundled toy-world model)")
    model.add_argument("--no-t5", action="store_true", help="leave T5 out (its weights are never read): zeros "
                       "instead, as training's dropout")
    model.add_argument("--t5-tokenizer", default=None, help="for Stability single files: the T5 tokenizer, a path "
                       "or hub id (default: google/t5-v1_1-xxl)")
    model.add_argument("--max-sequence-length", type=int, default=None, help=f"T5 tokens, 1 to {MAX_T5_TOKENS} "
                       "(default: 77, or the tokenizer's model_max_length when shorter; diffusers uses 256)")
    model.add_argument("--clip-g", default=None, help="replace CLIP-G: a safetensors file in transformers' or "
                       "open_clip's layout")
    model.add_argument("--allow-pickle", action="store_true", help="accept pickle (.bin) weights in a diffusers "
                       "directory or a LoRA (loaded weights-only)")
    model.add_argument("--lora", nargs="+", action="extend", default=[], metavar="FILE[:SCALE]",
                       help="LoRAs added to the transformer at load, each with its scale (default 1.0): diffusers' "
                       "layout (load_lora_weights), kohya's / ComfyUI's, or ours (train.py's export)")
    model.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda when present, else "
                       "cpu)")
    model.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on cuda, fp32 elsewhere")
    model.add_argument("--vae-tiling", action="store_true", help="decode in tiles: large images in little memory")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--steps", type=int, default=28, help="sampling steps")
    sampling.add_argument("--cfg", type=float, default=None, help=f"classifier-free guidance scale, 0 to 100; <= 1 "
                          f"turns it off (default: the model folder's own, from its {SAMPLING_DEFAULTS_FILE}, as the "
                          f"toy models carry; else {SD3_CFG} as diffusers)")
    sampling.add_argument("--shift", type=float, default=None, help="the schedule's shift, in (0, 100] (default: the "
                          "model's scheduler shift, 3.0 for SD3)")
    sampling.add_argument("--sampler", default="euler", help=f"one of {', '.join(SAMPLERS)}")
    sampling.add_argument("--negative-prompt", default="", help="what guidance pushes away from (default: the empty "
                          "string, encoded)")
    sampling.add_argument("--slg-layers", type=int, nargs="*", default=None, help="skip-layer guidance blocks, e.g. "
                          f"7 8 9 for SD3.5 Medium; the flag alone turns it off (default: the model folder's own, from "
                          f"its {SAMPLING_DEFAULTS_FILE}, as the toy models carry; else off)")
    sampling.add_argument("--slg-scale", type=float, default=None, help=f"skip-layer guidance scale (default: the "
                          f"model folder's own, else {Settings.slg_scale})")
    sampling.add_argument("--width", type=int, default=None, help="default: the model's own size (1024 for SD3)")
    sampling.add_argument("--height", type=int, default=None, help="default: the model's own size")
    sampling.add_argument("--seed", type=int, default=seed, help="the first image's seed; image i uses seed + i")
    sampling.add_argument("--batch-size", type=int, default=batch_size, help=f"images per forward pass, 1 to "
                          f"{MAX_BATCH}")


def check_arguments(args: argparse.Namespace, images: int):
    """Every shared value checked before any work: ranges, finiteness, files that must exist. images: how many
    this run makes (their seeds must fit). Fills in the bundled model and the model folder's recommended guidance
    and skip-layer guidance where no flag gives them (args.slg_recommended: the blocks came from its file). Raises
    UsageError naming the flag."""
    if images < 1:
        raise UsageError(f"nothing to make: {images} images")
    recommended = sampling_defaults(args.model)
    args.slg_recommended = args.slg_layers is None
    for name in ("cfg", "slg_layers", "slg_scale"):
        if getattr(args, name) is None:
            setattr(args, name, recommended[name])
    if args.model is None:
        args.model = str(BUNDLED_MODEL)
    if not 1 <= args.batch_size <= MAX_BATCH:
        raise UsageError(f"--batch-size must be in [1, {MAX_BATCH}], got {args.batch_size}")
    if args.max_sequence_length is not None and not 1 <= args.max_sequence_length <= MAX_T5_TOKENS:
        raise UsageError(f"--max-sequence-length must be in [1, {MAX_T5_TOKENS}], got {args.max_sequence_length}")
    if not 0 <= args.seed or args.seed + images > SEED_LIMIT:
        raise UsageError(f"--seed must be >= 0 and seed + images ({images}) at most 2^63 - 2^32, got {args.seed}")
    if args.device is not None and not re.fullmatch(DEVICE_PATTERN, args.device):
        raise UsageError(f"unknown --device {args.device!r}; accepted: cpu, cuda, cuda:N, mps, xpu, xpu:N")
    if args.clip_g is not None and not Path(args.clip_g).is_file():
        raise UsageError(f"--clip-g {args.clip_g} is not a file")
    args.loras = [lora_and_scale(item, args.allow_pickle) for item in args.lora]
    settings_from(args, shift=None, side=16)   # the sampling values themselves (size placeholder when unset)


def lora_and_scale(item: str, allow_pickle: bool) -> tuple[str, float]:
    """FILE[:SCALE] -> (file, scale), checked: the file exists, is safetensors (or pickle with --allow-pickle),
    and the scale is a finite number."""
    import math

    path, scale = item, 1.0
    head, sep, tail = item.rpartition(":")
    if sep and not Path(item).exists():
        try:
            scale = float(tail)
        except ValueError:
            raise UsageError(f"--lora {item}: the scale after ':' must be a number, got {tail!r}") from None
        path = head
    if not math.isfinite(scale):
        raise UsageError(f"--lora {item}: the scale must be finite, got {scale}")
    if not Path(path).is_file():
        raise UsageError(f"--lora {path} is not a file")
    if Path(path).suffix != ".safetensors" and not allow_pickle:
        raise UsageError(f"--lora {path} is not a .safetensors file; pickle files are read only with --allow-pickle")
    return path, scale


def settings_from(args: argparse.Namespace, shift: float | None, side: int) -> Settings:
    """The Settings the flags ask for; shift and side are the model's, used where a flag is unset."""
    try:
        return Settings(steps=args.steps, cfg=args.cfg, shift=shift if args.shift is None else args.shift,
                        sampler=args.sampler, width=side if args.width is None else args.width,
                        height=side if args.height is None else args.height,
                        negative_prompt=args.negative_prompt, slg_layers=tuple(args.slg_layers),
                        slg_scale=args.slg_scale)
    except ValueError as e:   # Settings names its field; the user typed a flag
        field, _, rest = str(e).partition(" ")
        raise UsageError(f"--{field.replace('_', '-')} {rest}") from None


def sampling_defaults(model, cfg_otherwise: float = SD3_CFG, depth: int | None = None) -> dict:
    """The sampling values a pipeline folder recommends in its mmdit_sampling.json, for the flags left unset: cfg
    (else cfg_otherwise, SD3's), slg_layers (else none) and slg_scale (else Settings'). The toy pipelines carry
    one: guidance that suits SD3 darkens their colours, and skip-layer guidance sharpens their shapes. model None:
    the bundled model. depth: the blocks of the MM-DiT that will sample (a run's, which may be shallower than the
    folder's own); recommended blocks beyond them are left out."""
    import json

    values = {"cfg": cfg_otherwise, "slg_layers": [], "slg_scale": Settings.slg_scale}
    defaults = Path(BUNDLED_MODEL if model is None else model) / SAMPLING_DEFAULTS_FILE
    if not defaults.is_file():
        return values
    try:
        recorded = json.loads(defaults.read_text())
    except OSError as e:
        raise UsageError(f"{defaults} cannot be read: {e.strerror}") from None
    except ValueError:
        recorded = None
    if not isinstance(recorded, dict):
        raise UsageError(f"{defaults} is not a JSON object like {{\"cfg\": 2.0, \"slg_layers\": [2, 3]}}")
    unknown = sorted(set(recorded) - set(values))
    if unknown:
        raise UsageError(f"{defaults}: unknown key {unknown[0]!r}; accepted: {', '.join(values)}")
    values.update(recorded)

    def number_in(x, high):
        return not isinstance(x, bool) and isinstance(x, (int, float)) and 0 <= x <= high   # NaN fails too

    for name in ("cfg", "slg_scale"):
        if not number_in(values[name], MAX_GUIDANCE):
            raise UsageError(f"{defaults}: {name} must be a number in [0, {MAX_GUIDANCE}], got {values[name]!r}")
        values[name] = float(values[name])
    layers = values["slg_layers"]
    if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                               for i in layers):
        raise UsageError(f"{defaults}: slg_layers must be a list of block indices (integers >= 0), got {layers!r}")
    if depth is not None:
        values["slg_layers"] = [i for i in layers if i < depth]
    return values


def device_and_dtype(args: argparse.Namespace):
    """(torch.device, torch.dtype) the flags ask for: cuda when present, bf16 there, fp32 elsewhere."""
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device} asked for, but no CUDA device is available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps asked for, but MPS is not available")
    if device.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise UsageError(f"--device {args.device} asked for, but no XPU is available")
    dtype = getattr(torch, DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")])
    return device, dtype


def load_pipeline(args: argparse.Namespace, device, dtype):
    """(pipeline, settings) for checked flags: the model loaded quietly onto device, its defaults filled in, and
    the values that depend on the model (its size multiple, its blocks) checked. Raises UsageError."""
    from mmdit.cli import quiet_libraries
    from mmdit.pipeline import SD3Pipeline

    quiet_libraries()
    try:
        pipe = SD3Pipeline.load(args.model, no_t5=args.no_t5, dtype=dtype, device=device,
                                t5_tokens=args.max_sequence_length, t5_tokenizer=args.t5_tokenizer,
                                allow_pickle=args.allow_pickle, clip_g=args.clip_g)
    except (ValueError, OSError) as e:   # CheckpointError is a ValueError
        raise UsageError(one_line(e)) from None
    if getattr(args, "loras", None):
        from mmdit.lora import apply_loras

        try:
            apply_loras(pipe.transformer, args.loras, allow_pickle=args.allow_pickle)
        except ValueError as e:
            raise UsageError(f"--lora: {one_line(e)}") from None
    settings = settings_from(args, pipe.shift, pipe.default_side)
    try:
        pipe.check_size(settings.width, settings.height)
    except ValueError as e:
        raise UsageError(f"--width / --height: {one_line(e)}") from None
    depth = pipe.transformer.config.depth
    outside = [i for i in settings.slg_layers if i >= depth]
    if outside:
        source = (f"the skip-layer guidance blocks {outside} that {args.model}/{SAMPLING_DEFAULTS_FILE} recommends"
                  if getattr(args, "slg_recommended", False) else f"--slg-layers {outside}")
        raise UsageError(f"{source} lie outside blocks 0..{depth - 1} (--slg-layers chooses others; alone, none)")
    pipe.vae.memory_saving(slicing=True, tiling=args.vae_tiling)
    return pipe, settings


def run_record(args: argparse.Namespace, pipe, settings: Settings, dtype) -> dict:
    """What each image's metadata records beside its prompt and seed."""
    return {**settings.record(), "model": str(args.model), "t5": not args.no_t5,
            "max_sequence_length": pipe.text.layout.t5_tokens, "dtype": str(dtype).replace("torch.", ""),
            **({"loras": [[path, scale, lora_digest(path)] for path, scale in args.loras]}
               if getattr(args, "loras", None) else {})}


def lora_digest(path) -> str:
    """A LoRA's sha256, recorded beside its path: a file replaced under the same name draws other images."""
    from mmdit.loading import weights_digest

    return weights_digest(path)
