"""Precompute VAE latents and text embeddings into training shards (format: data/README.md).

    python3 data/precompute.py --input 'raw/{00000..00099}.tar' --model PIPELINE --out shards/ --resolution 256
    python3 data/precompute.py --images photos/ --captions captions.jsonl --model PIPELINE --out shards/ --buckets
    accelerate launch data/precompute.py ...      # each process takes every world_size-th input shard

Inputs: webdataset tars as img2dataset writes them (KEY.jpg|png|webp with KEY.txt and/or KEY.json), local or in a
bucket or behind HTTP ('https://host/raw/{00000..00099}.tar', 'pipe:aws s3 cp s3://bucket/raw/00000.tar -'), or a folder
of images with a captions JSONL ({"file": ..., "caption": ..., other fields}). Each input shard (or block of
--samples-per-shard images) becomes the output shard of the same index. Resumable: an output shard and its
.stats.json exist only when complete (written under a temporary name, then renamed), so a rerun skips them and
rewrites anything partial. A caption that is not valid UTF-8 is read as latin-1 and counted
(captions_read_as_latin1 in the manifest). Bad input never stops the run: an undecodable image or a missing caption is skipped,
counted and logged with its key; an empty caption is encoded as "" and counted. The last process to finish writes
manifest.json once every output shard is there.
"""

import os
import re
from pathlib import Path

from mmdit.cli import Parser, UsageError, fail, one_line
from mmdit.config import SHARD_DTYPES

PROG = "precompute.py"


def parse_args(argv=None):
    p = Parser(prog=PROG, description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help="img2dataset webdataset tars: paths, URLs or pipe: commands, brace patterns allowed (mmdit.sources)")
    src.add_argument("--images", help="a folder of images (with --captions)")
    p.add_argument("--captions", help="JSONL for --images: one {\"file\": ..., \"caption\": ...} per line")
    p.add_argument("--model", required=True, help="SD3 pipeline directory or Stability single file")
    p.add_argument("--out", required=True, help="output folder for shards and manifest.json")
    p.add_argument("--resolution", type=int, default=256, help="square target side, or the bucket area's side")
    p.add_argument("--buckets", action="store_true", help="aspect-ratio buckets of about resolution^2 pixels")
    p.add_argument("--caption", help="first caption: 'txt' or 'json:FIELD' (default: txt for tars, "
                   "json:caption for --images)")
    p.add_argument("--second-caption", help="a second caption variant, e.g. json:caption_synthetic")
    p.add_argument("--no-t5", action="store_true", help="store no T5 states")
    p.add_argument("--t5-tokens", type=int, default=None,
                   help="T5 sequence length (default 77, or the tokenizer's model_max_length when shorter)")
    p.add_argument("--t5-tokenizer", help="for Stability single files: T5 tokenizer path or hub id")
    p.add_argument("--dtype", choices=SHARD_DTYPES, default="float16", help="stored tensor type")
    p.add_argument("--compact", action="store_true", help="T5 states as int8 + per-64-channel scales (~half size)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--samples-per-shard", type=int, default=1000, help="for --images")
    p.add_argument("--device", default=None, help="default: cuda (this process's LOCAL_RANK) when present, else cpu")
    return p.parse_args(argv)


def check(args) -> list:
    """Every flag checked before any model loads or file is written; returns the inputs (tar paths or blocks)."""
    if args.images and not args.captions:
        raise UsageError("--images needs --captions (a JSONL file)")
    for spec in filter(None, [args.caption, args.second_caption]):
        if spec != "txt" and not spec.startswith("json:"):
            raise UsageError(f"caption source {spec!r}: expected 'txt' or 'json:FIELD'")
    if args.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        raise UsageError(f"unknown --device {args.device!r}; accepted: cpu, cuda, cuda:N")
    for name in ("resolution", "batch_size", "samples_per_shard", "t5_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.input:
        from mmdit.sources import Source, check_scheme, expand, is_remote, unreachable

        inputs = []
        for pattern in args.input:
            if Path(pattern).is_dir():   # a folder of img2dataset tars (it writes no manifest): all of them, sorted
                inputs += sorted(str(p) for p in Path(pattern).glob("*.tar"))
                continue
            try:
                check_scheme(pattern)
                urls = expand(pattern)
            except ValueError as e:
                raise UsageError(str(e)) from None
            problem = unreachable(Source(pattern, tuple(urls)))
            if problem:
                raise UsageError(f"--input {pattern} cannot be read: {problem}")
            inputs += urls
        if not inputs:
            raise UsageError(f"--input {' '.join(args.input)} names no tar")
        missing = [p for p in inputs if not is_remote(p) and not Path(p).is_file()]
        if missing:
            raise UsageError(f"input shard {missing[0]} does not exist ({len(missing)} missing)")
        return inputs
    if not Path(args.images).is_dir() or not Path(args.captions).is_file():
        raise UsageError(f"--images must be a folder and --captions a file, got {args.images} and {args.captions}")
    from mmdit.precompute import folder_blocks

    try:
        return folder_blocks(args.images, args.captions, args.samples_per_shard)
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read --captions {args.captions} or its images: {e}") from None


def main(argv=None):
    args = parse_args(argv)
    args.caption = args.caption or ("json:caption" if args.images else "txt")
    try:
        inputs = check(args)
    except UsageError as e:
        fail(PROG, str(e))
    import logging

    import torch
    from tqdm import tqdm

    from mmdit import precompute

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(args.device or (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
                                          if torch.cuda.is_available() else "cpu"))
    options = precompute.Options(model=args.model, resolution=args.resolution, buckets=args.buckets,
                                 caption=args.caption, second_caption=args.second_caption, no_t5=args.no_t5,
                                 t5_tokens=args.t5_tokens, t5_tokenizer=args.t5_tokenizer, dtype=args.dtype,
                                 compact=args.compact, batch_size=args.batch_size,
                                 compute_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        precompute.run(inputs, args.out, options, device, rank, world,
                       progress=lambda shards: tqdm(shards, desc=f"rank {rank}: shards", disable=None))
    except (ValueError, OSError) as e:   # UsageError, a model that cannot be loaded, a disk that fills
        fail(PROG, one_line(e))


if __name__ == "__main__":
    main()
