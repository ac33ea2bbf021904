"""Preparing the toy world: its images and components (`build_world`, what `data/make_toy.py world` runs), and the
shards a toy recipe trains on (`prepare`, what train.py runs when the recipe names this module in data.prepare and
its shards are missing).

The world is a function of its seed: OUT/images/{train,val}/NNNNN.tar in img2dataset's layout (so precompute reads
them as it reads real data) and OUT/pipeline, the toy components as a diffusers SD3 pipeline directory (VAE trained
on the training images). Finished parts are kept when rerun.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from mmdit.toy import world


def add_world_arguments(parser: argparse.ArgumentParser):
    """The world's flags: `data/make_toy.py world` and a toy recipe's data.prepare_args take the same."""
    parser.add_argument("--out", required=True, help="the world's folder")
    parser.add_argument("--train-samples", type=int, default=12000, help="training images")
    parser.add_argument("--val-samples", type=int, default=256, help="validation images")
    parser.add_argument("--vae-steps", type=int, default=1000, help="VAE training steps")
    parser.add_argument("--vae-images", type=int, default=2000, help="training images the VAE sees")
    parser.add_argument("--vae-precision", choices=("bf16", "fp32"), default="bf16",
                        help="autocast dtype of the VAE's training (weights stay fp32)")
    parser.add_argument("--seed", type=int, default=0, help="everything in the world is a function of it")


def check_world_arguments(args: argparse.Namespace):
    for name in ("train_samples", "val_samples", "vae_steps", "vae_images"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def build_world(args: argparse.Namespace) -> Path:
    """The world's images and components in args.out (see add_world_arguments); returns its pipeline folder."""
    import numpy as np
    import torch
    from tqdm import tqdm

    from mmdit.toy.components import save_toy_pipeline

    check_world_arguments(args)
    out = Path(args.out)
    started = time.perf_counter()
    for split, n, seed in (("train", args.train_samples, args.seed), ("val", args.val_samples, args.seed + 10_000)):
        with tqdm(total=n, desc=f"toy images ({split})", disable=None) as bar:
            world.write_dataset(out / "images" / split, n, seed=seed, per_shard=1000, progress=bar.update)
    pipeline = out / "pipeline"
    if not (pipeline / "model_index.json").is_file():
        images = []
        for image, _ in world.read_dataset(sorted((out / "images" / "train").glob("*.tar"))):
            images.append(image)
            if len(images) >= args.vae_images:
                break
        with tqdm(total=args.vae_steps, desc="toy VAE", disable=None) as bar:
            def progress(step, loss):
                bar.update(1)
                if step % 50 == 0:
                    bar.set_postfix(loss=f"{loss:.4f}")

            tmp = out / ".pipeline.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            dtype = torch.bfloat16 if args.vae_precision == "bf16" else None
            save_toy_pipeline(tmp, np.stack(images), world.caption_corpus(seed=args.seed), args.vae_steps,
                              seed=args.seed, compute_dtype=dtype, progress=progress)
            os.replace(tmp, pipeline)
    print(f"toy world in {out} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return pipeline


def prepare(shards: str, val_shards: str, prepare_args: list[str], device):
    """The shards of a toy recipe: the world (prepare_args: the flags of `data/make_toy.py world`), then its train
    and val images precomputed through the real precompute, on device, into shards and val_shards where they are
    missing."""
    from mmdit import precompute
    from mmdit.cli import Parser

    parser = Parser(prog="data.prepare_args (mmdit.toy.prepare)")
    add_world_arguments(parser)
    args = parser.parse_args(list(prepare_args))
    check_world_arguments(args)
    pipeline = build_world(args)
    options = precompute.Options(model=str(pipeline), resolution=world.SIDE, batch_size=64)
    for split, out in (("train", shards), ("val", val_shards)):
        if out and not (Path(out) / "manifest.json").is_file():
            tars = sorted(str(p) for p in (Path(args.out) / "images" / split).glob("*.tar"))
            print(f"toy world: precomputing {len(tars)} {split} shards into {out}", file=sys.stderr)
            precompute.run(tars, out, options, device)
