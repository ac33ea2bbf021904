"""Make the toy world (mmdit/toy.py): its image-caption data, its SD3 components, its GenEval prompts.

    python3 data/make_toy.py world --out runs/toy/world        # images (img2dataset layout) + components
    python3 data/make_toy.py prompts --out data/toy_geneval.jsonl
    python3 data/make_toy.py bundle runs/toy/export/pipeline   # the trained pipeline -> the bundled default model

`world` writes OUT/images/train/NNNNN.tar and OUT/images/val/NNNNN.tar (KEY.png, KEY.txt, KEY.json, as
img2dataset writes them, so data/precompute.py reads them like real data) and OUT/pipeline, a diffusers SD3
pipeline directory: a 16-channel VAE trained on the training images, frozen random CLIP-L / CLIP-G / T5 towers
with the real CLIP tokenizer and a SentencePiece tokenizer trained on the captions, and an untrained MM-DiT.
Everything is a function of --seed; finished parts are kept when rerun.
"""

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

BUNDLED = Path(__file__).resolve().parents[1] / "mmdit" / "toy_pipeline"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("world", help="toy images and the toy pipeline's components")
    w.add_argument("--out", required=True)
    w.add_argument("--train-samples", type=int, default=12000)
    w.add_argument("--val-samples", type=int, default=256)
    w.add_argument("--vae-steps", type=int, default=1000)
    w.add_argument("--vae-images", type=int, default=2000, help="training images the VAE sees")
    w.add_argument("--vae-precision", choices=("bf16", "fp32"), default="bf16",
                   help="autocast dtype of the VAE's training (bf16: 1.3x faster on a CPU; weights stay fp32)")
    w.add_argument("--seed", type=int, default=0)
    q = sub.add_parser("prompts", help="the toy GenEval prompt file (held-out prompts marked)")
    q.add_argument("--out", required=True)
    b = sub.add_parser("bundle", help="copy a trained toy pipeline, in float16, to the bundled default model")
    b.add_argument("pipeline")
    b.add_argument("--to", default=str(BUNDLED))
    return p.parse_args(argv)


def fail(message):
    print(f"make_toy.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def make_world(args):
    import numpy as np
    import torch
    from tqdm import tqdm

    from mmdit import toy
    from mmdit.tiny import save_toy_pipeline

    out = Path(args.out)
    started = time.perf_counter()
    for split, n, seed in (("train", args.train_samples, args.seed), ("val", args.val_samples, args.seed + 10_000)):
        with tqdm(total=n, desc=f"toy images ({split})", disable=None) as bar:
            toy.write_dataset(out / "images" / split, n, seed=seed, per_shard=1000, progress=bar.update)
    pipeline = out / "pipeline"
    if not (pipeline / "model_index.json").is_file():
        train = sorted((out / "images" / "train").glob("*.tar"))
        images = []
        for image, _ in toy.read_dataset(train):
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
            save_toy_pipeline(tmp, np.stack(images), toy.caption_corpus(seed=args.seed), args.vae_steps,
                              seed=args.seed, compute_dtype=dtype, progress=progress)
            os.replace(tmp, pipeline)
    print(f"toy world in {out} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)


def bundle(args):
    """float16 copy of every weight file (the toy's results do not change: tested), other files as they are (the
    CLIP tokenizers are already vocab.json + merges.txt: save_toy_pipeline stores them so)."""
    from safetensors.torch import load_file, save_file

    source, target = Path(args.pipeline), Path(args.to)
    if not (source / "model_index.json").is_file():
        fail(f"{source} is not a diffusers pipeline directory (no model_index.json)")
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    for f in tmp.rglob("*.safetensors"):
        state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(f).items()}
        save_file(state, f, metadata={"format": "pt"})
    for f in tmp.rglob("config.json"):   # diffusers records the dtype it saved in; keep it truthful
        config = json.loads(f.read_text())
        if "torch_dtype" in config:
            config["torch_dtype"] = "float16"
            f.write_text(json.dumps(config, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    print(f"bundled {source} -> {target} ({size / 2**20:.1f} MiB, float16)", file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    if args.command == "world":
        for name in ("train_samples", "val_samples", "vae_steps", "vae_images"):
            if getattr(args, name) < 1:
                fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        make_world(args)
    elif args.command == "prompts":
        from mmdit.toy import evaluation_prompts

        Path(args.out).write_text("".join(json.dumps(p) + "\n" for p in evaluation_prompts()))
        print(f"{len(evaluation_prompts())} prompts -> {args.out}", file=sys.stderr)
    else:
        bundle(args)


if __name__ == "__main__":
    main()
