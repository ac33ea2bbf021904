"""Preparing the toy world: its images and components (`build_world`, what `data/make_toy.py world` runs), and the
shards a toy recipe trains on (`prepare`, what train.py runs when the recipe names this module in data.prepare and
its shards are missing).

The world: OUT/images/{train,val}/NNNNN.tar in img2dataset's layout (so precompute reads them as it reads real data),
a function of the seed, and OUT/pipeline, the toy components as a diffusers SD3 pipeline directory: trained on the
training images (VAE, text towers; a function of the seed too), or, with --components, a copy of given ones (the
bundled model's, whose MM-DiT comes along and is replaced by whatever a recipe trains). Finished parts are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from mmdit.config import PRECISIONS
from mmdit.toy import world


COMPONENT_TRAINING = {"vae_steps": 1000, "vae_images": 2000, "decoder_steps": 3500,   # the defaults of these flags
                      "tower_steps": 1500, "align_steps": 1500}


def add_world_arguments(parser: argparse.ArgumentParser):
    """The world's flags: `data/make_toy.py world` and a toy recipe's data.prepare_args take the same."""
    parser.add_argument("--out", required=True, help="the world's folder")
    parser.add_argument("--train-samples", type=int, default=12000, help="training images")
    parser.add_argument("--val-samples", type=int, default=256, help="validation images")
    parser.add_argument("--components", default=None, help="a toy pipeline whose VAE, towers and tokenizers to use "
                        "instead of training them ('bundled': the bundled model's, as toy recipes do; default: train "
                        "them, once)")
    parser.add_argument("--vae-steps", type=int, default=COMPONENT_TRAINING["vae_steps"],
                        help="VAE training steps")
    parser.add_argument("--vae-images", type=int, default=COMPONENT_TRAINING["vae_images"],
                        help="training images the VAE sees (the towers see "
                        "all)")
    parser.add_argument("--decoder-steps", type=int, default=COMPONENT_TRAINING["decoder_steps"],
                        help="steps of the VAE decoder's second phase, on every training image (0: none)")
    parser.add_argument("--tower-steps", type=int, default=COMPONENT_TRAINING["tower_steps"],
                        help="text tower training steps (0: random towers)")
    parser.add_argument("--align-steps", type=int, default=COMPONENT_TRAINING["align_steps"],
                        help="steps of the alignment encoder (REPA's targets) against the trained towers (0: none)")
    parser.add_argument("--vae-precision", choices=PRECISIONS, default="auto",
                        help="autocast dtype of the VAE's training (auto: bf16 where it is faster here)")
    parser.add_argument("--seed", type=int, default=0, help="everything in the world is a function of it")


def check_world_arguments(args: argparse.Namespace):
    for name in ("train_samples", "val_samples", "vae_steps", "vae_images"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("decoder_steps", "tower_steps", "align_steps"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    given = [f"--{k.replace('_', '-')}" for k, default in COMPONENT_TRAINING.items() if getattr(args, k) != default]
    if args.components is not None and given:
        raise ValueError(f"{', '.join(given)} train components, which --components {args.components} replaces; "
                         f"give one or the other")
    if args.components is not None and not (components_dir(args.components) / "model_index.json").is_file():
        raise ValueError(f"--components {args.components} is not a toy pipeline directory (no model_index.json); "
                         f"accepted: a folder that data/make_toy.py world wrote, or 'bundled'")


def components_dir(name: str) -> Path:
    from mmdit.toy import BUNDLED_MODEL

    return BUNDLED_MODEL if name == "bundled" else Path(name)


def check_world_folders(out: Path, shard_folders=()):
    """ValueError unless this version of the world made the image folders of the world in out (those with images)
    and shard_folders (world.check_stamps)."""
    images = [out / "images" / split for split in ("train", "val") if any((out / "images" / split).glob("*.tar"))]
    world.check_stamps(images + list(shard_folders), f"{out} (its images and components) and the shards made from it")


def build_world(args: argparse.Namespace) -> Path:
    """The world's images in args.out and its components in args.out/pipeline (see add_world_arguments): trained,
    or copied from --components. Returns the pipeline folder."""
    import numpy as np
    import torch
    from tqdm import tqdm

    from mmdit.precision import choose_precision
    from mmdit.toy.components import save_toy_pipeline

    check_world_arguments(args)
    out = Path(args.out)
    check_world_folders(out)   # both splits, before either grows
    started = time.perf_counter()
    for split, n, seed in (("train", args.train_samples, args.seed), ("val", args.val_samples, args.seed + 10_000)):
        with tqdm(total=n, desc=f"toy images ({split})", disable=None) as bar:
            world.write_dataset(out / "images" / split, n, seed=seed, per_shard=1000, progress=bar.update)
    pipeline = out / "pipeline"
    if (pipeline / "model_index.json").is_file():
        return pipeline
    tmp = out / ".pipeline.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if args.components is not None:
        shutil.copytree(components_dir(args.components), tmp)
    else:
        images, metadata = [], []
        for image, record in world.read_dataset(sorted((out / "images" / "train").glob("*.tar"))):
            images.append(image)
            metadata.append(record["metadata"])
        precision = choose_precision(args.vae_precision, "cpu")
        bars = {"vae": tqdm(total=args.vae_steps, desc=f"toy VAE ({precision})", disable=None),
                "decoder": tqdm(total=args.decoder_steps, desc=f"toy VAE decoder ({precision})", disable=None),
                "towers": tqdm(total=args.tower_steps, desc="toy text towers", disable=None),
                "align": tqdm(total=args.align_steps, desc="toy alignment encoder", disable=None)}

        def progress(stage, step, losses):
            bars[stage].update(1)
            if step % 50 == 0:
                bars[stage].set_postfix({k: f"{v:.4f}" for k, v in losses.items()})

        save_toy_pipeline(tmp, np.stack(images), metadata, world.caption_corpus(seed=args.seed), args.vae_steps,
                          args.tower_steps, vae_images=args.vae_images, seed=args.seed,
                          compute_dtype=torch.bfloat16 if precision == "bf16" else None, progress=progress,
                          decoder_steps=args.decoder_steps, align_steps=args.align_steps)
        for bar in bars.values():
            bar.close()
    os.replace(tmp, pipeline)
    print(f"toy world in {out} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return pipeline


def add_decoder_arguments(parser: argparse.ArgumentParser):
    """`data/make_toy.py decoder`: the VAE decoder's second phase on an existing toy pipeline."""
    parser.add_argument("pipeline", help="a toy pipeline directory (its VAE's weights file is rewritten; the rest "
                        "stays)")
    parser.add_argument("--images", required=True, help="the world's training tars (OUT/images/train of `world`)")
    parser.add_argument("--steps", type=int, default=COMPONENT_TRAINING["decoder_steps"], help="decoder steps")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="autocast dtype (auto: bf16 where it is faster here)")
    parser.add_argument("--seed", type=int, default=1, help="the phase's draws (the world build uses its seed + 1)")


STORED_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}   # safetensors' names of what a VAE is kept in


def check_decoder_arguments(args: argparse.Namespace) -> tuple[Path, str, list]:
    """Everything `data/make_toy.py decoder` needs, checked before any work: (the VAE's weights file, the dtype it
    is stored in, the training images). ValueError naming what is wrong and what is accepted."""
    from safetensors import SafetensorError, safe_open

    weights = Path(args.pipeline) / "vae" / "diffusion_pytorch_model.safetensors"
    config = weights.with_name("config.json")
    if not config.is_file() or not weights.is_file():
        raise ValueError(f"{args.pipeline} has no vae/ with config.json and diffusion_pytorch_model.safetensors; "
                         f"accepted: a toy pipeline directory (data/make_toy.py world or bundle wrote it)")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    try:
        with safe_open(str(weights), "pt") as f:
            stored = {f.get_slice(k).get_dtype() for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights} is unreadable ({str(e).splitlines()[0]})") from None
    if len(stored) != 1 or not stored <= set(STORED_DTYPES):
        raise ValueError(f"{weights} holds {', '.join(sorted(stored))} tensors; accepted: one of "
                         f"{', '.join(STORED_DTYPES.values())} throughout")
    tars = sorted(Path(args.images).glob("*.tar"))
    images = [image for image, _ in world.read_dataset(tars)] if tars else []
    side = json.loads(config.read_text()).get("sample_size")
    if not images:
        raise ValueError(f"--images {args.images}: no pictures in .tar files; accepted: OUT/images/train of "
                         f"data/make_toy.py world (KEY.png + KEY.json)")
    if any(image.shape != (side, side, 3) for image in images):
        raise ValueError(f"--images {args.images}: pictures must be {side}x{side} RGB, the VAE's sample_size")
    return weights, STORED_DTYPES[stored.pop()], images


def mend_pipeline_decoder(args: argparse.Namespace, weights: Path, stored: str, images: list):
    """Train the decoder of args.pipeline's VAE alone (mmdit.toy.components.mend_decoder) and write its weights
    back, in the dtype they were stored in, by one atomic rename (the config does not change). The encoder, and so
    every latent and every shard and MM-DiT made from them, stays the same."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL
    from tqdm import tqdm

    from mmdit.checkpoint import atomic_save_file
    from mmdit.precision import choose_precision
    from mmdit.toy.components import mend_decoder

    started = time.perf_counter()
    precision = choose_precision(args.precision, "cpu")
    vae = AutoencoderKL.from_pretrained(weights.parent, torch_dtype=torch.float32)
    with tqdm(total=args.steps, desc=f"toy VAE decoder ({precision})", disable=None) as bar:
        mend_decoder(vae, np.stack(images), args.steps, seed=args.seed,
                     compute_dtype=torch.bfloat16 if precision == "bf16" else None,
                     progress=lambda step, loss: bar.update(1))
    dtype = getattr(torch, stored)
    atomic_save_file(weights, {k: v.to(dtype) for k, v in vae.state_dict().items()}, {"format": "pt"})
    print(f"mended the decoder of {weights.parent} on {len(images)} images, {args.steps} steps ({precision}, "
          f"{time.perf_counter() - started:.0f} s)", file=sys.stderr)


def add_align_arguments(parser: argparse.ArgumentParser):
    """`data/make_toy.py align`: the alignment encoder of an existing toy pipeline, against its own towers."""
    parser.add_argument("pipeline", help="a toy pipeline directory: its VAE encodes the pictures, its towers are "
                        "the targets; PIPELINE/align_encoder is written (the rest stays)")
    parser.add_argument("--images", required=True, help="the world's training tars (OUT/images/train of `world`)")
    parser.add_argument("--steps", type=int, default=COMPONENT_TRAINING["align_steps"], help="training steps")
    parser.add_argument("--seed", type=int, default=2, help="the encoder's draws (the world build uses its seed + 2)")


def check_align_arguments(args: argparse.Namespace) -> tuple[list, list]:
    """(pictures, their scenes' metadata) for `data/make_toy.py align`, checked before any work; ValueError naming
    what is wrong and what is accepted."""
    if not (Path(args.pipeline) / "model_index.json").is_file():
        raise ValueError(f"{args.pipeline} is not a toy pipeline directory (no model_index.json); accepted: a "
                         f"folder that data/make_toy.py world or bundle wrote")
    if args.steps < 1 or args.seed < 0:
        raise ValueError(f"--steps must be >= 1 and --seed >= 0, got {args.steps} and {args.seed}")
    tars = sorted(Path(args.images).glob("*.tar"))
    pairs = list(world.read_dataset(tars)) if tars else []
    if not pairs:
        raise ValueError(f"--images {args.images}: no pictures in .tar files; accepted: OUT/images/train of "
                         f"data/make_toy.py world (KEY.png + KEY.json)")
    return [image for image, _ in pairs], [record["metadata"] for _, record in pairs]


def train_pipeline_align_encoder(args: argparse.Namespace, images: list, metadata: list):
    """Train args.pipeline's alignment encoder (mmdit.toy.components.save_align_encoder) and write it in a folder
    beside the pipeline (never inside, where a copy of the pipeline would take it along), then swap it in: the old
    one is renamed aside, the new one into place, the old one removed."""
    import numpy as np
    import torch
    from diffusers import StableDiffusion3Pipeline
    from tqdm import tqdm

    from mmdit.toy.components import ALIGN_ENCODER, save_align_encoder

    started = time.perf_counter()
    pipeline = StableDiffusion3Pipeline.from_pretrained(args.pipeline, transformer=None, torch_dtype=torch.float32)
    folder = Path(args.pipeline).resolve()
    tmp, old = (folder.with_name(f".{folder.name}.{ALIGN_ENCODER}.{kind}") for kind in ("tmp", "old"))
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    with tqdm(total=args.steps, desc="toy alignment encoder", disable=None) as bar:
        save_align_encoder(tmp, pipeline.components, np.stack(images), metadata, args.steps, seed=args.seed,
                           progress=lambda step, losses: bar.update(1))
    target = folder / ALIGN_ENCODER
    if target.exists():
        os.replace(target, old)
    os.replace(tmp / ALIGN_ENCODER, target)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"trained {target} on {len(images)} images, {args.steps} steps ({time.perf_counter() - started:.0f} s)",
          file=sys.stderr)


def world_arguments(prepare_args: list[str]) -> argparse.Namespace:
    from mmdit.cli import Parser

    parser = Parser(prog="data.prepare_args (mmdit.toy.prepare)")
    add_world_arguments(parser)
    args = parser.parse_args(list(prepare_args))
    check_world_arguments(args)
    return args


def check(shards: str, val_shards: str, prepare_args: list[str]):
    """ValueError when the world's images, or shard folders that this recipe's world was precomputed into (their
    manifest names its pipeline), were made by another version of the world: train.py asks on every launch and
    rank, before any compute. Reads only; other shards (real data, URLs, patterns) are not this world's to judge."""
    from mmdit.sources import names_folder

    out = Path(world_arguments(prepare_args).out)
    made_here = []
    for spec in (shards, val_shards):
        manifest = Path(spec) / "manifest.json" if spec and names_folder(spec) else None
        if manifest and manifest.is_file():
            made_from = json.loads(manifest.read_text()).get("identities", {}).get("model")
            if made_from and Path(made_from) == out / "pipeline":
                made_here.append(Path(spec))
    check_world_folders(out, made_here)


def prepare(shards: str, val_shards: str, prepare_args: list[str], device):
    """The shards of a toy recipe: the world (prepare_args: the flags of `data/make_toy.py world`), then its train
    and val images precomputed through the real precompute, on device, into the local shard folders of shards and
    val_shards that have no manifest yet. A folder is stamped with the world's version before precompute writes
    into it, and one that precompute left unfinished is continued only when its stamp says this world began it."""
    from mmdit import precompute
    from mmdit.sources import names_folder

    args = world_arguments(prepare_args)
    todo = [(split, Path(spec)) for split, spec in (("train", shards), ("val", val_shards))
            if spec and names_folder(spec) and not (Path(spec) / "manifest.json").is_file()]
    started = [out for _, out in todo if out.is_dir() and any(out.iterdir())]
    world.check_stamps(started, f"{', '.join(map(str, started))} (unfinished shards)")
    if not todo:
        return
    pipeline = build_world(args)
    options = precompute.Options(model=str(pipeline), resolution=world.SIDE, batch_size=64)
    for split, out in todo:
        tars = sorted(str(p) for p in (Path(args.out) / "images" / split).glob("*.tar"))
        print(f"toy world: precomputing {len(tars)} {split} shards into {out}", file=sys.stderr)
        out.mkdir(parents=True, exist_ok=True)
        world.stamp(out)
        precompute.run(tars, out, options, device)
