"""The trainer's throughput against the bare model step and against a diffusers-based loop (and several processes).

On synthetic shards with SD3's shapes (256x256 latents, CLIP + T5 at 77 tokens), for a paper-family depth:
(1) train.py's own loop (data loading, sigma / noise / dropout draws, assembly, step, EMA, logging), its steady
state read from its log; (2) the bare step of the same model on fixed tensors (forward, backward, AdamW); (3) the
same data loop calling diffusers' SD3Transformer2DModel. The trainer's overhead is (1) against (2); the speedup is
(3) against (1). All in fp32 on this machine; the repeated rounds alternate (2) and (3). With --processes N,
train.py also runs as N DDP processes (gloo on CPU) on the same cores, the threads split evenly between them, at
the same global batch, against one process with every thread.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import torch

from mmdit.bench.data import write_synthetic
from mmdit.bench.measure import alternate
from mmdit.bench.model import bare_train_step
from mmdit.cli import fail

ROOT = Path(__file__).resolve().parents[2]


def trainer_rate(shards: Path, out: Path, depth: int, batch: int, steps: int, compile: bool = False,
                 processes: int = 1) -> float:
    """Samples/s of train.py (run as the command it is) over its last `steps // 2` steps (startup and first steps
    excluded), on the tiny recipe's settings with the model and global batch asked for. Several processes are DDP
    under `accelerate launch`, each with batch / processes and an equal share of the threads; the rate is theirs
    together."""
    import os
    import subprocess
    import sys

    threads = max(1, torch.get_num_threads() // processes)
    launcher = [sys.executable]
    if processes > 1:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                    str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command = [*launcher, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
               f"data.shards={shards}", f"train.out_dir={out}", f"model.preset=d{depth}",
               "model.overrides={pos_embed_max_size: 64}", f"data.batch_size={batch // processes}",
               "data.num_workers=0", f"train.steps={steps}", f"train.log_every={steps // 2}", "train.precision=fp32",
               f"train.checkpoint_every={10 * steps}", f"train.val_every={10 * steps}", "optim.warmup_steps=1",
               "data.caption_variant_probs=[1]", f"train.compile={str(compile).lower()}", 'train.deepspeed=""']
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        fail("python -m mmdit.bench train", f"train.py ({processes} process{'es' if processes > 1 else ''}) "
             f"failed: {(done.stderr.strip().splitlines() or ['no output'])[-1]}")
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in records if "samples_per_s" in r][-1]["samples_per_s"] * processes


def loops(shards: Path, depth: int, batch: int, compile: bool = False):
    """The bare step of our model, and a data loop stepping diffusers' model: {name: () -> None}."""
    from diffusers import SD3Transformer2DModel

    from mmdit import flow
    from mmdit.config import TextLayout
    from mmdit.loader import ShardDataset
    from mmdit.text import assemble, sample_keep

    ref = SD3Transformer2DModel(num_layers=depth, attention_head_dim=64, num_attention_heads=depth,
                                caption_projection_dim=64 * depth, pos_embed_max_size=64)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-4, fused=True)
    if compile:
        ref.compile()
    layout = TextLayout()
    data = iter(())
    g = torch.Generator().manual_seed(0)

    def diffusers_loop():
        nonlocal data
        b = next(data, None)
        if b is None:
            data = iter(ShardDataset(str(shards), batch, shuffle_buffer=16))
            b = next(data)
        x0 = b["latent"].float()
        s = flow.sample_sigmas(batch, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        keep = sample_keep(batch, {"clip_l": 0.463, "clip_g": 0.463, "t5": 0.463}, g)
        ctx, pool = assemble(layout, batch, clip_l=(b["clip_l"], b["clip_l_pooled"]),
                             clip_g=(b["clip_g"], b["clip_g_pooled"]), t5=b["t5"], keep=keep)
        opt_ref.zero_grad(set_to_none=True)
        pred = ref(hidden_states=flow.interpolate(x0, noise, s), timestep=s * 1000, encoder_hidden_states=ctx,
                   pooled_projections=pool, return_dict=False)[0]
        flow.flow_loss(pred, x0, noise, s).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt_ref.step()

    return {"bare step (ours)": bare_train_step(depth, batch, compile=compile), "diffusers loop": diffusers_loop}


def run(args):
    if args.processes < 1 or args.batch % args.processes:
        fail("python -m mmdit.bench train", f"--processes {args.processes}: must be 1 or more and divide --batch "
                                           f"{args.batch}")
    threads = torch.get_num_threads()
    several_line = f" and {args.processes} with {max(1, threads // args.processes)} each" if args.processes > 1 else ""
    print(f"training benchmark: MM-DiT depth {args.depth}, batch {args.batch}, 256x256 latents, 154 text tokens, "
          f"fp32, one process with {threads} threads{several_line}, {'compiled' if args.compile else 'eager'}, CPU "
          f"{torch.backends.cpu.get_cpu_capability()}; train.py vs its bare model step vs a diffusers-based loop on "
          f"the same shards")
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        shards.mkdir()
        # a shard of 2 * batch samples for each process (shards are dealt out to ranks whole), and at least two
        write_synthetic(shards, samples=2 * args.batch * max(2, args.processes), per_shard=2 * args.batch,
                        variants=1, compact=False)
        from mmdit.shards import write_manifest

        write_manifest(shards, {p.name: 2 * args.batch for p in sorted(shards.glob("*.tar"))}, {}, {})
        trainer = trainer_rate(shards, Path(tmp) / "run", args.depth, args.batch, args.steps, args.compile)
        several = (trainer_rate(shards, Path(tmp) / "ddp", args.depth, args.batch, args.steps, args.compile,
                                args.processes) if args.processes > 1 else None)
        times = alternate(loops(shards, args.depth, args.batch, args.compile), torch.device("cpu"), args.rounds)
    rates = {name: args.batch / statistics.median(t) for name, t in times.items()}
    tokens = (256 + 154) * args.batch
    print(f"  train.py        {trainer:7.2f} samples/s  {trainer * tokens / args.batch:8.0f} tokens/s")
    for name, rate in rates.items():
        print(f"  {name:15s} {rate:7.2f} samples/s  {rate * tokens / args.batch:8.0f} tokens/s")
    print(f"  trainer overhead over the bare step: {(rates['bare step (ours)'] / trainer - 1) * 100:+.1f}%; "
          f"train.py vs the diffusers loop: {trainer / rates['diffusers loop']:.3f}x")
    if several is not None:
        print(f"  train.py, {args.processes} DDP processes x {max(1, threads // args.processes)} "
              f"threads, batch {args.batch // args.processes} each: {several:7.2f} samples/s, "
              f"{several / trainer:.3f}x one process")


def add_arguments(parser):
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="train.py steps; the last half are timed")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="torch.compile every model (train.compile=true)")
    parser.add_argument("--processes", type=int, default=1,
                        help="also run train.py as this many DDP processes on the same cores (same global batch)")
    parser.set_defaults(run=run)
