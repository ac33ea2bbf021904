"""Precomputing training shards: images and captions in, VAE latents and per-encoder text states out (format:
data/README.md). data/precompute.py is its command line; the toy world calls `run` directly.

Inputs are webdataset tars as img2dataset writes them (KEY.jpg|png|webp with KEY.txt and/or KEY.json), or blocks of
(key, members) from a folder of images with a captions JSONL. Each input shard (or block) becomes the output shard of
the same index. Resumable: an output shard and its .stats.json exist only when complete (written under a
temporary name, then renamed), so a rerun skips them and rewrites anything partial. Bad input never stops the run:
an undecodable image or a missing caption is skipped, counted and logged with its key; an empty caption is encoded
as "" and counted. The last process to finish writes manifest.json once every output shard is there.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mmdit import shards
from mmdit.cli import UsageError
from mmdit.images import make_buckets, nearest_bucket, resize_center_crop

log = logging.getLogger("precompute")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class Options:
    """What data/precompute.py's flags set (its --help describes each)."""

    model: str
    resolution: int = 256
    buckets: bool = False
    caption: str = "txt"                 # 'txt' or 'json:FIELD'
    second_caption: str | None = None
    no_t5: bool = False
    t5_tokens: int | None = None
    t5_tokenizer: str | None = None
    dtype: str = "float16"
    compact: bool = False
    batch_size: int = 16
    compute_dtype: torch.dtype = torch.float32   # the encoders' and VAE's (the caller's choice: bf16 on a GPU)


# ---- inputs: (key, image bytes or None, {"txt": str, "json": dict}) per sample ---------------------------------

def read_webdataset_tar(url, stats):
    """Samples of an img2dataset tar (a path, URL or pipe: command: mmdit.sources, with its retries); a tar that
    cannot be read or breaks off for good yields what it held and is counted (truncated_inputs)."""
    from mmdit.sources import ReadStats, read_groups

    read = ReadStats()
    for key, members in read_groups(url, read):
        yield key, {ext.lower(): data for ext, data in members.items()}
    if read.failed_shards:
        stats["truncated_inputs"] = stats.get("truncated_inputs", 0) + 1
    if read.retries:
        stats["input_retries"] = stats.get("input_retries", 0) + read.retries


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


def decode_text(data: bytes, stats) -> str:
    """Caption bytes as text: UTF-8, else latin-1 (which decodes any bytes), counted as captions_read_as_latin1,
    never replaced by U+FFFD."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        stats["captions_read_as_latin1"] = stats.get("captions_read_as_latin1", 0) + 1
        return data.decode("latin-1")


def caption_of(members, spec, stats):
    """The caption named by spec ('txt' or 'json:FIELD'), or None when absent."""
    if spec == "txt":
        return decode_text(members["txt"], stats).strip() if "txt" in members else None
    field = spec.split(":", 1)[1]
    try:
        record = json.loads(decode_text(members["json"], stats)) if "json" in members else None
    except ValueError:
        return None
    value = record.get(field) if isinstance(record, dict) else None
    return None if value is None else str(value).strip()


# ---- one output shard ------------------------------------------------------------------------------------------

def prepare(key, members, options, buckets, stats):
    """(key, pixels, record, captions) or None when the sample must be skipped."""
    from PIL import Image

    data = members.get("img") or next((members[e] for e in IMAGE_EXTS if e in members), None)
    captions = [caption_of(members, spec, stats) for spec in (options.caption, options.second_caption) if spec]
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


def process(samples, out_path, options: Options, text, vae, device, buckets, identities, stats):
    """Write one output shard from its input samples, then its .stats.json (counts, skips, the settings)."""
    with shards.ShardWriter(out_path, options.dtype, options.compact) as writer:
        chunk = []

        def flush():
            if chunk:
                latents, variants = encode_chunk(chunk, text, vae, device, options.no_t5)
                for (key, _, record, _), z, var in zip(chunk, latents, variants):
                    writer.write(key, {**record, "identities": identities}, z, var)
                chunk.clear()

        for key, members in samples:
            item = prepare(key, members, options, buckets, stats)
            if item is not None:
                chunk.append(item)
            if len(chunk) == options.batch_size:
                flush()
        flush()
    stats_path = out_path.with_name(out_path.name.replace(".tar", ".stats.json"))
    tmp = stats_path.with_name("." + stats_path.name + ".tmp")
    tmp.write_text(json.dumps({"samples": writer.count, "skipped": stats, "identities": identities},
                              sort_keys=True))
    os.replace(tmp, stats_path)
    return writer.count, stats


def identities_of(options, text, vae):
    def digest(module):
        cfg = json.dumps(module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config),
                         sort_keys=True, default=str)
        return hashlib.sha256(cfg.encode()).hexdigest()[:16]

    return {"model": str(options.model), "vae": digest(vae.autoencoder), "clip_l": digest(text.clip_l.model),
            "clip_g": digest(text.clip_g.model), "t5": None if options.no_t5 else digest(text.t5.model),
            "t5_tokens": None if options.no_t5 else text.layout.t5_tokens, "dtype": options.dtype,
            "resolution": options.resolution, "buckets": options.buckets, "compact": options.compact}


def check_settings(out: Path, identities: dict):
    """A rerun into a folder holding shards made with other settings would mix them: refuse, naming one."""
    for stats_file in sorted(out.glob("*.stats.json")):
        earlier = json.loads(stats_file.read_text()).get("identities", {})
        if earlier != identities:
            key = next(k for k in sorted(set(earlier) | set(identities)) if earlier.get(k) != identities.get(k))
            raise UsageError(f"{out} holds shards made with other settings ({key}: {earlier.get(key)!r} then, "
                             f"{identities.get(key)!r} now); use another --out or remove them")


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
    return shards.write_manifest(out, counts, identities, skipped)


def run(inputs: list, out, options: Options, device, rank: int = 0, world_size: int = 1, progress=None) -> dict | None:
    """Precompute this rank's share (every world_size-th) of inputs (tar paths, or blocks of (key, members)) into
    out; returns the manifest when this process finished the last shard, else None. progress wraps the shard
    indices (e.g. tqdm)."""
    from mmdit.loading import load_conditioning

    text, vae = load_conditioning(options.model, no_t5=options.no_t5, dtype=options.compute_dtype,
                                  t5_tokens=options.t5_tokens,
                                  t5_tokenizer=options.t5_tokenizer)
    text.to(device)
    vae.to(device)
    buckets = make_buckets(options.resolution) if options.buckets else [(options.resolution, options.resolution)]
    identities = identities_of(options, text, vae)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_settings(out, identities)
    mine = list(range(rank, len(inputs), world_size))
    for i in progress(mine) if progress else mine:
        target = out / f"{i:05d}.tar"
        if target.exists() and target.with_name(f"{i:05d}.stats.json").exists():
            continue  # complete: written by an earlier run
        stats = {}  # filled by the reader (truncated input) and by process (skipped samples)
        samples = read_webdataset_tar(inputs[i], stats) if isinstance(inputs[i], (str, Path)) else iter(inputs[i])
        count, skipped = process(samples, target, options, text, vae, device, buckets, identities, stats)
        log.info("shard %05d: %d samples, skipped %s", i, count, skipped or "none")
    manifest = finalize(out, len(inputs), identities)
    if manifest and manifest["samples"] == 0:
        raise UsageError(f"no input sample had an image and its captions (skipped: {manifest['skipped']}); check "
                         f"--caption / --second-caption")
    if manifest:
        log.info("manifest: %d samples in %d shards, skipped %s", manifest["samples"], len(manifest["shards"]),
                 manifest["skipped"] or "none")
    return manifest
