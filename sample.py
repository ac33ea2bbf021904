"""Text to image with an SD3 / SD3.5 model: python3 sample.py --prompt "..." --model PATH --out image.png

The i-th image written (prompt by prompt, num-images each) is drawn from seed + i, so any image can be made again
alone; with batch size 1 the first image equals StableDiffusion3Pipeline's for the same seed and settings.
Output: --out FILE.png for one image; for several, FILE-0000.png, FILE-0001.png, ... beside it, or, when --out
is not a .png, DIR/00000.png, DIR/00001.png, ... Each PNG carries its prompt and settings in its metadata.
"""

import argparse
import os
import sys
from pathlib import Path

from mmdit.flow import SAMPLERS

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument("--model", default=None, help="diffusers SD3 pipeline directory, Stability single file or hub id "
                   "(default: the bundled toy-world model)")
    p.add_argument("--no-t5", action="store_true", help="leave T5 out (its weights are never read): zeros instead")
    p.add_argument("--negative-prompt", default="", help="default: the empty string, encoded")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale; <= 1 turns it off "
                   "(default: 7.0 as diffusers, 2.0 for the bundled toy model)")
    p.add_argument("--shift", type=float, default=None, help="default: the model's scheduler shift (3.0)")
    p.add_argument("--sampler", choices=SAMPLERS, default="euler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=None, help="default: the model's own size (1024 for SD3)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--max-sequence-length", type=int, default=None,
                   help="T5 tokens (default 77, or the tokenizer's model_max_length when shorter; diffusers: 256)")
    p.add_argument("--slg-layers", type=int, nargs="*", default=[], help="skip-layer guidance blocks, e.g. 7 8 9")
    p.add_argument("--slg-scale", type=float, default=2.8)
    p.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--t5-tokenizer", default=None, help="for Stability single files: T5 tokenizer path or hub id")
    p.add_argument("--vae-tiling", action="store_true", help="decode in tiles: large images in little memory")
    p.add_argument("--clip-g", help="replace CLIP-G: a safetensors file in transformers' or open_clip's layout")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pickle (.bin) weights in a diffusers directory (loaded weights-only)")
    p.add_argument("--out", required=True, help="a .png file, or a directory for several images")
    return p.parse_args(argv)


def fail(message: str):
    print(f"sample.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            prompts += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
        except OSError as e:
            fail(f"cannot read --prompts-file {args.prompts_file}: {e.strerror}")
        except UnicodeDecodeError:
            fail(f"--prompts-file {args.prompts_file} is not UTF-8 text")
    if not prompts:
        fail("no prompt: give --prompt TEXT or --prompts-file FILE")
    return prompts


def output_paths(out: str, count: int) -> list[Path]:
    out = Path(out)
    if out.suffix.lower() == ".png":
        return [out] if count == 1 else [out.with_name(f"{out.stem}-{i:04d}.png") for i in range(count)]
    return [out / f"{i:05d}.png" for i in range(count)]


def check_writable(path: Path):
    """Fail before any work if the images could not be written; create nothing."""
    if path.is_dir():
        fail(f"cannot write --out {path}: it is a directory (give a .png file, or a folder without .png)")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        fail(f"cannot write --out {path}: {folder} is not a writable directory")


def main(argv=None):
    args = parse_args(argv)
    prompts = read_prompts(args)
    for name in ("steps", "batch_size", "num_images", "max_sequence_length"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.shift is not None and args.shift <= 0:
        fail(f"--shift must be > 0, got {args.shift}")
    if not 0 <= args.seed < 2**63 - 2**32:
        fail(f"--seed must lie in [0, 2^63 - 2^32), got {args.seed}")
    sizes = [v for v in (args.width, args.height) if v is not None]
    if any(v % 16 or v <= 0 for v in sizes):
        fail(f"--width and --height must be positive multiples of 16 (the VAE's 8 x the patch size 2), "
             f"got {args.width}x{args.height}")
    from mmdit.pipeline import BUNDLED_MODEL, default_cfg

    args.cfg = default_cfg(args.model) if args.cfg is None else args.cfg
    args.model = str(BUNDLED_MODEL) if args.model is None else args.model
    jobs = [(p, args.seed + i) for i, p in enumerate(p for p in prompts for _ in range(args.num_images))]
    paths = output_paths(args.out, len(jobs))
    check_writable(paths[0])

    import diffusers
    import torch
    import transformers
    from tqdm import tqdm

    # Our progress bar is over sampling steps; the libraries' per-file loading bars would bury errors.
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()

    from mmdit.checkpoint import CheckpointError
    from mmdit.pipeline import SD3Pipeline, Settings, save_png, settings_record

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        fail(f"unknown --device {args.device!r}; accepted: cpu, cuda, cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda asked for, but no CUDA device is available")
    dtype = getattr(torch, DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")])
    try:
        pipe = SD3Pipeline.load(args.model, no_t5=args.no_t5, dtype=dtype, device=device,
                                t5_tokens=args.max_sequence_length, t5_tokenizer=args.t5_tokenizer,
                                allow_pickle=args.allow_pickle, clip_g=args.clip_g)
        args.width, args.height = args.width or pipe.default_side, args.height or pipe.default_side
        settings = Settings(steps=args.steps, cfg=args.cfg, shift=pipe.shift if args.shift is None else args.shift,
                            sampler=args.sampler,
                            width=args.width, height=args.height, negative_prompt=args.negative_prompt,
                            slg_layers=tuple(args.slg_layers), slg_scale=args.slg_scale)
        pipe.check_size(args.width, args.height)
        bad_layers = [i for i in args.slg_layers if not 0 <= i < pipe.transformer.config.depth]
        if bad_layers:
            raise ValueError(f"--slg-layers {bad_layers} lie outside blocks 0..{pipe.transformer.config.depth - 1}")
        pipe.vae.memory_saving(slicing=True, tiling=args.vae_tiling)
    except (CheckpointError, ValueError, OSError) as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)

    record = {**settings_record(settings), "model": str(args.model), "t5": not args.no_t5,
              "max_sequence_length": pipe.text.layout.t5_tokens, "dtype": str(dtype).replace("torch.", "")}
    for start in range(0, len(jobs), args.batch_size):
        batch = jobs[start:start + args.batch_size]
        bar = lambda steps: tqdm(steps, desc=f"images {start + 1}-{start + len(batch)} of {len(jobs)}", leave=False)
        try:
            images = pipe.generate([p for p, _ in batch], [s for _, s in batch], settings, progress=bar)
        except (ValueError, RuntimeError) as e:  # e.g. out of memory: the images already written stay whole
            fail(f"generation failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        for (prompt, seed), image, path in zip(batch, images, paths[start:start + len(batch)]):
            save_png(image, path, {"prompt": prompt, "seed": seed, **record})
            print(path)


if __name__ == "__main__":
    main()
