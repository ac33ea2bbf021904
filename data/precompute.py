"""Precompute VAE latents and text embeddings into training shards (format: data/README.md).

    python3 data/precompute.py --input 'raw/{00000..00099}.tar' --model PIPELINE --out shards/ --resolution 256
    python3 data/precompute.py --images photos/ --captions captions.jsonl --model PIPELINE --out shards/ --buckets
    accelerate launch data/precompute.py ...      # each process takes every world_size-th input shard

Inputs: webdataset tars as img2dataset writes them (KEY.jpg|png|webp with KEY.txt and/or KEY.json), or a folder
of images with a captions JSONL ({"file": ..., "caption": ..., other fields}). Each input shard (or block of
--samples-per-shard images) becomes the output shard of the same index. Resumable: an output shard and its
.stats.json exist only when complete (written under a temporary name, then renamed), so a rerun skips them and
rewrites anything partial. Bad input never stops the run: an undecodable image or a missing caption is skipped,
counted and logged with its key; an empty caption is encoded as "" and counted. The last process to finish writes
manifest.json once every output shard is there.
"""

import argparse
import hashlib
import io
import json
import logging
import os
import sys
import tarfile
from pathlib import Path

import torch

from mmdit import shards as S
from mmdit.images import make_buckets, nearest_bucket, resize_center_crop

log = logging.getLogger("precompute")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help="img2dataset webdataset tars (brace patterns allowed)")
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
    p.add_argument("--dtype", choices=S.DTYPES, default="float16", help="stored tensor type")
    p.add_argument("--compact", action="store_true", help="T5 states as int8 + per-64-channel scales (~half size)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--samples-per-shard", type=int, default=1000, help="for --images")
    p.add_argument("--device", default=None)
    return p.parse_args(argv)


# ---- inputs: (key, image bytes or None, {"txt": str, "json": dict}) per sample ---------------------------------

def read_webdataset_tar(path, stats):
    """Samples of an img2dataset tar; a truncated tar yields what it holds and is counted."""
    try:
        for key, members in S.tar_groups(path):
            yield key, {ext.lower(): data for ext, data in members.items()}
    except (tarfile.TarError, OSError, EOFError) as e:
        stats["truncated_inputs"] = stats.get("truncated_inputs", 0) + 1
        log.warning("input %s is truncated or unreadable (%s): its remaining samples are skipped", path, e)


def folder_blocks(folder, captions_file, per_shard):
    """A folder of images as blocks of per_shard samples: [(key, members)] lists, in the JSONL's order."""
    entries = []
    for n, line in enumerate(Path(captions_file).read_text().splitlines(), 1):
        if line.strip():
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            if isinstance(entry, dict):
                entries.append(entry)
            else:
                log.warning("captions line %d is not a JSON object: skipped", n)
    blocks = []
    for start in range(0, len(entries), per_shard):
        block = []
        for i, entry in enumerate(entries[start:start + per_shard], start):
            path = Path(folder) / str(entry.get("file", ""))
            data = path.read_bytes() if path.is_file() else None
            block.append((f"{i:09d}", {"img": data, "json": json.dumps(entry).encode()}))
        blocks.append(block)
    return blocks


def caption_of(members, spec):
    """The caption named by spec ('txt' or 'json:FIELD'), or None when absent."""
    if spec == "txt":
        return members["txt"].decode("utf-8", "replace").strip() if "txt" in members else None
    field = spec.split(":", 1)[1]
    try:
        record = json.loads(members["json"]) if "json" in members else None
    except ValueError:
        return None
    value = record.get(field) if isinstance(record, dict) else None
    return None if value is None else str(value).strip()


# ---- one output shard ------------------------------------------------------------------------------------------

def prepare(key, members, args, buckets, stats):
    """(key, pixels, record, captions) or None when the sample must be skipped."""
    from PIL import Image

    data = members.get("img") or next((members[e] for e in IMAGE_EXTS if e in members), None)
    captions = [caption_of(members, spec) for spec in (args.caption, args.second_caption) if spec]
    if data is None:
        return skip(stats, "missing_image", key)
    if any(c is None for c in captions):
        return skip(stats, "missing_caption", key)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            size = im.size
            bucket = nearest_bucket(*size, buckets)
            pixels, box = resize_center_crop(im, *bucket)
    except Exception as e:  # PIL raises many kinds for a bad file
        return skip(stats, "undecodable_image", key, e)
    if "" in captions:
        stats["empty_captions_encoded"] = stats.get("empty_captions_encoded", 0) + captions.count("")
    record = {"captions": captions, "original_size": list(size), "crop_box": box, "bucket": list(bucket)}
    return key, pixels, record, captions


def skip(stats, reason, key, error=None):
    stats[reason] = stats.get(reason, 0) + 1
    log.warning("skipping %s: %s%s", key, reason.replace("_", " "), f" ({error})" if error else "")
    return None


def encode_chunk(chunk, text, vae, device, no_t5):
    """Latents (one VAE batch per bucket) and every caption variant's encoder outputs, in input order."""
    latents = [None] * len(chunk)
    by_shape = {}
    for i, (_, pixels, _, _) in enumerate(chunk):
        by_shape.setdefault(tuple(pixels.shape), []).append(i)
    for idx in by_shape.values():
        z = vae.encode(torch.stack([chunk[i][1] for i in idx]).to(device))
        for i, zi in zip(idx, z):
            latents[i] = zi
    variants = [[] for _ in chunk]
    for v in range(len(chunk[0][3])):
        out = text.encode([c[3][v] for c in chunk])
        for i in range(len(chunk)):
            fields = {"clip_l": out["clip_l"][0][i], "clip_l_pooled": out["clip_l"][1][i],
                      "clip_g": out["clip_g"][0][i], "clip_g_pooled": out["clip_g"][1][i]}
            if not no_t5:
                fields["t5"] = out["t5"][i]
            variants[i].append(fields)
    return latents, variants


def process(samples, out_path, args, text, vae, device, buckets, identities, stats):
    """Write one output shard from its input samples, then its .stats.json (counts, skips, the settings)."""
    with S.ShardWriter(out_path, args.dtype, args.compact) as writer:
        chunk = []

        def flush():
            if chunk:
                latents, variants = encode_chunk(chunk, text, vae, device, args.no_t5)
                for (key, _, record, _), z, var in zip(chunk, latents, variants):
                    writer.write(key, {**record, "identities": identities}, z, var)
                chunk.clear()

        for key, members in samples:
            item = prepare(key, members, args, buckets, stats)
            if item is not None:
                chunk.append(item)
            if len(chunk) == args.batch_size:
                flush()
        flush()
    stats_path = out_path.with_name(out_path.name.replace(".tar", ".stats.json"))
    tmp = stats_path.with_name("." + stats_path.name + ".tmp")
    tmp.write_text(json.dumps({"samples": writer.count, "skipped": stats, "identities": identities},
                              sort_keys=True))
    os.replace(tmp, stats_path)
    return writer.count, stats


def identities_of(args, text, vae):
    def digest(module):
        cfg = json.dumps(module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config),
                         sort_keys=True, default=str)
        return hashlib.sha256(cfg.encode()).hexdigest()[:16]

    return {"model": str(args.model), "vae": digest(vae.autoencoder), "clip_l": digest(text.clip_l.model),
            "clip_g": digest(text.clip_g.model), "t5": None if args.no_t5 else digest(text.t5.model),
            "t5_tokens": None if args.no_t5 else text.layout.t5_tokens, "dtype": args.dtype,
            "resolution": args.resolution, "buckets": args.buckets, "compact": args.compact}


def check_settings(out: Path, identities: dict):
    """A rerun into a folder holding shards made with other settings would mix them: refuse, naming one."""
    for stats_file in sorted(out.glob("*.stats.json")):
        earlier = json.loads(stats_file.read_text()).get("identities", {})
        if earlier != identities:
            key = next(k for k in sorted(set(earlier) | set(identities)) if earlier.get(k) != identities.get(k))
            sys.exit(f"precompute.py: error: {out} holds shards made with other settings ({key}: "
                     f"{earlier.get(key)!r} then, {identities.get(key)!r} now); use another --out or remove them")


def finalize(out, n_shards, identities):
    """manifest.json once all n_shards output shards are complete (by whichever process gets there last)."""
    names = [f"{i:05d}.tar" for i in range(n_shards)]
    if not all((out / n).exists() and (out / n.replace(".tar", ".stats.json")).exists() for n in names):
        return None
    counts, skipped = {}, {}
    for n in names:
        st = json.loads((out / n.replace(".tar", ".stats.json")).read_text())
        counts[n] = st["samples"]
        for k, v in st["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    return S.write_manifest(out, counts, identities, skipped)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.caption = args.caption or ("json:caption" if args.images else "txt")
    if args.images and not args.captions:
        sys.exit("precompute.py: error: --images needs --captions (a JSONL file)")
    for spec in filter(None, [args.caption, args.second_caption]):
        if spec != "txt" and not spec.startswith("json:"):
            sys.exit(f"precompute.py: error: caption source {spec!r}: expected 'txt' or 'json:FIELD'")
    if args.input:
        from braceexpand import braceexpand

        inputs = [p for pattern in args.input for p in braceexpand(pattern)]
        missing = [p for p in inputs if not Path(p).is_file()]
        if missing:
            sys.exit(f"precompute.py: error: input shard {missing[0]} does not exist ({len(missing)} missing)")
    else:
        inputs = folder_blocks(args.images, args.captions, args.samples_per_shard)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(args.device or (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
                                          if torch.cuda.is_available() else "cpu"))

    from tqdm import tqdm

    from mmdit.pipeline import load_conditioning

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    text, vae = load_conditioning(args.model, no_t5=args.no_t5, dtype=dtype, t5_tokens=args.t5_tokens,
                                  t5_tokenizer=args.t5_tokenizer)
    vae.autoencoder.to(device)
    for enc in (text.clip_l, text.clip_g, text.t5):
        if enc is not None:
            enc.model.to(device)
    buckets = make_buckets(args.resolution) if args.buckets else [(args.resolution, args.resolution)]
    identities = identities_of(args, text, vae)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check_settings(out, identities)
    mine = list(range(rank, len(inputs), world))
    for i in tqdm(mine, desc=f"rank {rank}: shards", disable=None):
        target = out / f"{i:05d}.tar"
        if target.exists() and target.with_name(f"{i:05d}.stats.json").exists():
            continue  # complete: written by an earlier run
        stats = {}  # filled by the reader (truncated input) and by process (skipped samples)
        samples = read_webdataset_tar(inputs[i], stats) if args.input else iter(inputs[i])
        count, skipped = process(samples, target, args, text, vae, device, buckets, identities, stats)
        log.info("shard %05d: %d samples, skipped %s", i, count, skipped or "none")
    manifest = finalize(out, len(inputs), identities)
    if manifest and manifest["samples"] == 0:
        sys.exit(f"precompute.py: error: no input sample had an image and its captions (skipped: "
                 f"{manifest['skipped']}); check --caption / --second-caption")
    if manifest:
        log.info("manifest: %d samples in %d shards, skipped %s", manifest["samples"], len(manifest["shards"]),
                 manifest["skipped"] or "none")


if __name__ == "__main__":
    main()
