"""Prompt to image: our SD3Pipeline against diffusers' StableDiffusion3Pipeline on the same model directory.

Both generate the same images (same prompt, seeds, steps, CFG, T5 length) in one process, alternating; reported:
seconds per image for each and their ratio (diffusers / ours, > 1 means we are faster), the largest pixel
difference, and the peak memory of one generation above the loaded pipeline (each side in a fresh process).
Without --model a tiny random pipeline is built offline; with it, any local diffusers SD3 pipeline directory.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from mmdit.bench.measure import alternate, measure_in_subprocess, paired_ratio, peak_step_memory, track_freed_memory

PROMPT = "a photo of a red circle left of a blue square"


def make_sides(model: str, steps: int, size: int, batch: int, t5_tokens: int, device: torch.device, dtype):
    """{name: () -> uint8 images (batch, size, size, 3)} for ours and diffusers, with identical settings."""
    import transformers
    from diffusers import StableDiffusion3Pipeline
    from diffusers.utils import logging as diffusers_logging

    from mmdit.pipeline import SD3Pipeline, Settings

    diffusers_logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    ours = SD3Pipeline.load(model, dtype=dtype, device=device, t5_tokens=t5_tokens)
    ref = StableDiffusion3Pipeline.from_pretrained(model, dtype=dtype).to(device)
    ref.set_progress_bar_config(disable=True)
    seeds = list(range(batch))
    settings = Settings(steps=steps, cfg=7.0, width=size, height=size)

    def run_ours():
        return ours.generate([PROMPT] * batch, seeds, settings)

    def run_diffusers():
        out = ref([PROMPT] * batch, num_inference_steps=steps, guidance_scale=7.0, width=size, height=size,
                  max_sequence_length=t5_tokens, generator=[torch.Generator().manual_seed(s) for s in seeds],
                  output_type="np").images
        return (out * 255).round().astype(np.uint8)

    return {"ours": run_ours, "diffusers": run_diffusers}


def memory_alone(model, steps, size, batch, t5_tokens, device, dtype, name):
    track_freed_memory()
    sides = make_sides(model, steps, size, batch, t5_tokens, device, dtype)
    return peak_step_memory(sides[name], device)


def run(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from mmdit.testing import save_tiny_pipeline

            model = str(save_tiny_pipeline(Path(tmp) / "tiny"))
            what = "a tiny random SD3 pipeline (mmdit.testing: 2-block MM-DiT, 2-layer encoders, 4-level VAE)"
        else:
            what = model
        print(f"sampling benchmark on {device}, {dtype}: mmdit SD3Pipeline vs diffusers StableDiffusion3Pipeline "
              f"on {what}; {args.steps} Euler steps, CFG 7, {args.size}x{args.size}, batch {args.batch}, "
              f"T5 {args.t5_tokens} tokens; {args.rounds} alternating rounds")
        sides = make_sides(model, args.steps, args.size, args.batch, args.t5_tokens, device, dtype)
        diff = np.abs(sides["ours"]().astype(int) - sides["diffusers"]().astype(int))
        times = alternate(sides, device, args.rounds)
        del sides
        memory = {}
        for name in ("ours", "diffusers"):
            margs = (model, args.steps, args.size, args.batch, args.t5_tokens, device, dtype, name)
            memory[name] = measure_in_subprocess(memory_alone, *margs) if device.type == "cpu" else \
                memory_alone(*margs)
    per_image = {n: statistics.median(t) / args.batch for n, t in times.items()}
    print(f"  images: max |ours - diffusers| = {diff.max()} / 255, mean {diff.mean():.4f}")
    print(f"  seconds per image: ours {per_image['ours']:.3f}, diffusers {per_image['diffusers']:.3f}, "
          f"speedup {paired_ratio(times['diffusers'], times['ours']):.3f}x")
    mib = lambda b: "n/a" if b is None else f"{b / 2**20:.1f} MiB"
    print(f"  peak memory of one generation: ours {mib(memory['ours'])}, diffusers {mib(memory['diffusers'])}")


def add_arguments(parser):
    parser.add_argument("--model", help="a local diffusers SD3 pipeline directory (default: a tiny random one)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--t5-tokens", type=int, default=77)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    parser.set_defaults(run=run)
