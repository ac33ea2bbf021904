"""Shard loader throughput and storage against the training step it feeds, on this machine.

Writes synthetic samples with SD3's shapes (a 256x256 image's latent 16x32x32, CLIP-L 77x768 + 768, CLIP-G
77x1280 + 1280, T5 77x4096, in float16), then reports bytes per sample against the raw tensor payload (the format's
overhead), the same for the compact option (int8 T5), the loader's samples/s in one worker (decode, shuffle,
bucket batching, collation), from local files and streamed over HTTP from a server on 127.0.0.1, and the
samples/s one MM-DiT training step consumes here.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from mmdit import loader, shards
from mmdit.bench.model import bare_train_step
from mmdit.testing import ShardServer

SHAPES = {"clip_l": (77, 768), "clip_l_pooled": (768,), "clip_g": (77, 1280), "clip_g_pooled": (1280,),
          "t5": (77, 4096)}


def write_synthetic(folder: Path, samples: int, per_shard: int, variants: int, compact: bool) -> int:
    g = torch.Generator().manual_seed(0)
    for start in range(0, samples, per_shard):
        with shards.ShardWriter(folder / f"{start // per_shard:05d}.tar", compact=compact) as w:
            for i in range(start, min(start + per_shard, samples)):
                text = [{k: torch.randn(shape, generator=g) for k, shape in SHAPES.items()} for _ in range(variants)]
                record = {"captions": [f"caption {i} variant {v}" for v in range(variants)],
                          "original_size": [512, 384], "crop_box": [64.0, 0.0, 448.0, 384.0], "bucket": [256, 256]}
                w.write(f"{i:09d}", record, torch.randn(16, 32, 32, generator=g), text)
    return sum(p.stat().st_size for p in folder.glob("*.tar"))


def loader_rate(spec, batch_size: int) -> float:
    dataset = loader.ShardDataset(spec, batch_size=batch_size, seed=0, shuffle_buffer=256)
    start, n = time.perf_counter(), 0
    for batch in dataset:
        n += batch["latent"].shape[0]
    return n / (time.perf_counter() - start)


def training_rate(depth: int, batch: int) -> float:
    """Samples/s of one MM-DiT training step (forward, backward, fused AdamW) at 256x256 with 154 text tokens."""
    step = bare_train_step(depth, batch)
    step()
    start = time.perf_counter()
    for _ in range(2):
        step()
    return 2 * batch / (time.perf_counter() - start)


def run(args):
    payload = sum(torch.Size(s).numel() for s in SHAPES.values()) * 2 * args.variants + 16 * 32 * 32 * 2
    print(f"data benchmark: {args.samples} synthetic samples (256x256 latent, T5 at 77 tokens, {args.variants} "
          f"caption variant(s), float16), {args.per_shard} per shard; loader in one process (= one worker), "
          f"batch {args.batch}; training step: MM-DiT depth {args.depth}, batch {args.train_batch}, fp32, CPU "
          f"{torch.backends.cpu.get_cpu_capability()} with {torch.get_num_threads()} threads")
    results = {}
    for compact in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            size = write_synthetic(Path(tmp), args.samples, args.per_shard, args.variants, compact)
            pattern = f"{{00000..{(args.samples - 1) // args.per_shard:05d}}}.tar"
            rate = loader_rate(f"{tmp}/{pattern}", args.batch)
            if not compact:   # the same shards streamed from a local HTTP server (curl, through webdataset)
                with ShardServer(tmp) as url:
                    http_rate = loader_rate(f"{url}/{pattern}", args.batch)
        results[compact] = (size / args.samples, rate)
    consume = training_rate(args.depth, args.train_batch)
    raw_bytes, raw_rate = results[False]
    print(f"  raw payload per sample       {payload / 1e6:8.3f} MB")
    print(f"  stored per sample            {raw_bytes / 1e6:8.3f} MB   format overhead "
          f"{(raw_bytes / payload - 1) * 100:.2f}% over the payload")
    print(f"  stored per sample, --compact {results[True][0] / 1e6:8.3f} MB   "
          f"({results[True][0] / raw_bytes:.1%} of the float16 shards)")
    print(f"  loader: {raw_rate:8.1f} samples/s per worker ({results[True][1]:.1f} compact); training step "
          f"consumes {consume:.2f} samples/s: loader / consumption = {raw_rate / consume:.0f}x")
    print(f"  loader over HTTP from 127.0.0.1: {http_rate:8.1f} samples/s per worker "
          f"({http_rate / raw_rate:.2f}x local files; {raw_bytes / 1e6:.3f} MB per sample on the wire): "
          f"{http_rate / consume:.0f}x the step's consumption")


def add_arguments(parser):
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--per-shard", type=int, default=64)
    parser.add_argument("--variants", type=int, default=1, help="caption variants per sample")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--depth", type=int, default=8, help="MM-DiT depth of the consuming training step")
    parser.add_argument("--train-batch", type=int, default=4)
    parser.set_defaults(run=run)
