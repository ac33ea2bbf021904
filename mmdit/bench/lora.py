"""LoRA against full fine-tuning: one training step's time and peak memory, side by side on this machine.

The same paper-family MM-DiT and fixed tensors (256x256 latents by default, 154 text tokens, fp32), once with every
weight trained (AdamW over all of them) and once with peft adapters of the given rank on the default targets
(attention projections and MLPs of both streams), the base frozen. Steps run in turn (full, lora, full, ...) so the
machine's drift hits both; peak memory is measured in a fresh process per side.
"""

from __future__ import annotations

import statistics

import torch

from mmdit.bench.measure import alternate, measure_in_subprocess, paired_ratio, peak_step_memory, track_freed_memory
from mmdit.bench.model import TEXT_TOKENS, bare_train_step


def make_step(depth: int, batch: int, side: int, rank: int | None):
    """(step, trained parameter count): rank None trains every weight."""
    torch.manual_seed(0)
    step = bare_train_step(depth, batch, side, TEXT_TOKENS, lora_rank=rank)
    return step, step.trained


def memory_alone(depth, batch, side, rank):
    """Peak resident memory of training in a fresh process, above what it held before the model: weights,
    gradients, optimizer state and activations (LoRA's saving is in the gradients and optimizer state, which a
    step-only measure would leave out), and the step's own peak."""
    from mmdit.bench.measure import _rss_kib

    track_freed_memory()
    before = _rss_kib()[0]
    step, _ = make_step(depth, batch, side, rank)
    step_peak = peak_step_memory(step, torch.device("cpu"))   # runs the step (twice), so AdamW's state exists
    return (_rss_kib()[1] - before) * 1024, step_peak


def run(args):
    side = args.resolution // 8
    print(f"LoRA benchmark: MM-DiT depth {args.depth} (hidden {64 * args.depth}), batch {args.batch}, "
          f"{args.resolution}x{args.resolution} ({(side // 2) ** 2} image + {TEXT_TOKENS} text tokens), fp32, CPU "
          f"{torch.backends.cpu.get_cpu_capability()} with {torch.get_num_threads()} threads; full fine-tuning "
          f"against LoRA rank {args.rank} (peft) on the default targets, {args.rounds} rounds in turn")
    full, full_count = make_step(args.depth, args.batch, side, None)
    lora, lora_count = make_step(args.depth, args.batch, side, args.rank)
    rounds = alternate({"full": full, "lora": lora}, torch.device("cpu"), args.rounds)
    del full, lora
    memory = {name: measure_in_subprocess(memory_alone, args.depth, args.batch, side, rank)
              for name, rank in (("full", None), ("lora", args.rank))}
    mib = lambda b: "n/a" if b is None else f"{b / 2**20:.0f} MiB"
    for name, count in (("full", full_count), ("lora", lora_count)):
        total, step_peak = memory[name] or (None, None)
        print(f"  {name:5s} {statistics.median(rounds[name]):7.3f} s/step   trained {count / 1e6:8.2f} M parameters   "
              f"peak memory {mib(total)} (weights, gradients, AdamW state, activations); the step alone "
              f"{mib(step_peak)} above the resident state")
    totals = [memory[n][0] if memory[n] else None for n in ("lora", "full")]
    ratio = totals[0] / totals[1] if all(totals) else float("nan")
    print(f"  LoRA step {paired_ratio(rounds['full'], rounds['lora']):.2f}x the speed of full fine-tuning; "
          f"peak memory {ratio:.2f}x; trained parameters {lora_count / full_count:.2%} "
          f"(checkpoint of adapters + AdamW state about {3 * 4 * lora_count / 2**20:.0f} MiB against "
          f"{3 * 4 * full_count / 2**20:.0f} MiB)")


def add_arguments(parser):
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=256, help="image side (latent = side / 8)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.set_defaults(run=run)
