"""Precomputed-embedding shards: the schema (defined here once), the writer and the manifest (reading them from
anywhere: mmdit.sources; the training loader: mmdit.loader).

A shard is a plain tar in webdataset's layout: the members of one sample share a key (the name up to the first
dot) and lie next to each other. Per sample (schema version 1, documented in data/README.md):

    KEY.json                      record: key, captions, original size, crop box, bucket, identities, dtype
    KEY.latent.npy                VAE latent (16, h, w), SD3-normalised
    KEY.vN.clip_l.npy             CLIP-L penultimate states (77, 768)      for each caption variant N = 0, 1, ...
    KEY.vN.clip_l_pooled.npy      CLIP-L pooled (768)
    KEY.vN.clip_g.npy             CLIP-G penultimate states (77, 1280)
    KEY.vN.clip_g_pooled.npy      CLIP-G pooled (1280)
    KEY.vN.t5.npy                 T5 states (L, 4096)                      (absent when precomputed without T5)
    KEY.vN.t5.q8.npy, .t5.scale.npy   instead, with --compact: int8 T5 states and float16 scales (L, 4096 / 64)

Tensors are little-endian .npy arrays in float16, or bfloat16 stored as its uint16 bit pattern (numpy has no
bfloat16; the record's "dtype" says which). Nothing is pickled. Each encoder is its own member so training can
drop it on its own. Tar headers carry no time or owner, so the same input gives byte-identical shards.
"""

from __future__ import annotations

import ast
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmdit.config import SHARD_DTYPES

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
TEXT_FIELDS = ("clip_l", "clip_l_pooled", "clip_g", "clip_g_pooled", "t5")
DTYPES = SHARD_DTYPES


# ---------------------------------------------------------------------------------------------------------------
# Encoding of one sample


def to_array(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    """A tensor as the stored array: float16, or bfloat16 as uint16 bits."""
    if dtype == "float16":
        return tensor.detach().to(torch.float16).cpu().numpy()
    if dtype == "bfloat16":
        return tensor.detach().to(torch.bfloat16).cpu().view(torch.int16).numpy().view(np.uint16)
    raise ValueError(f"unknown shard dtype {dtype!r}; accepted: {', '.join(DTYPES)}")


def from_array(array: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(array))
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


_NPY_MAGIC = b"\x93NUMPY"
_npy_headers: dict[bytes, tuple] = {}   # header bytes -> (dtype, shape, fortran order): shards repeat a few


def read_npy(data: bytes) -> np.ndarray:
    """A .npy member as a writable array, as np.load(allow_pickle=False) reads it, without its per-call cost:
    a shard's members share a handful of headers, so each is parsed once (for small arrays np.load's header
    parsing costs more than the copy, and the loader shares the step's CPU)."""
    if data[:6] != _NPY_MAGIC or data[6] not in (1, 2, 3):
        raise ValueError("not a .npy array (bad magic or version)")
    size_bytes = 2 if data[6] == 1 else 4
    start = 8 + size_bytes + int.from_bytes(data[8:8 + size_bytes], "little")
    header = data[8 + size_bytes:start]
    parsed = _npy_headers.get(header)
    if parsed is None:
        try:
            fields = ast.literal_eval(header.decode("latin1"))
        except (SyntaxError, ValueError) as e:
            raise ValueError(f"an unreadable .npy header ({e})") from None
        if not isinstance(fields, dict) or set(fields) != {"descr", "fortran_order", "shape"}:
            raise ValueError("a .npy header without descr, fortran_order and shape")
        dtype = np.dtype(fields["descr"])
        if dtype.hasobject:
            raise ValueError("a .npy array of Python objects (pickled); refused")
        parsed = (dtype, tuple(int(n) for n in fields["shape"]), bool(fields["fortran_order"]))
        if len(_npy_headers) < 4096:
            _npy_headers[header] = parsed
    dtype, shape, fortran = parsed
    count = int(np.prod(shape))
    if len(data) - start != count * dtype.itemsize:
        raise ValueError(f"a .npy array of {len(data) - start} bytes where its header says {count * dtype.itemsize}")
    return np.frombuffer(data, dtype, count, start).reshape(shape, order="F" if fortran else "C").copy()


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")),
                              allow_pickle=False)
    return buf.getvalue()


def quantize_int8(x: torch.Tensor, group: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(L, D) -> int8 values (L, D) and float16 scales (L, D / group): absmax per token and group of channels, so
    T5's few large channels do not flatten the rest."""
    L, D = x.shape
    group = group if D % group == 0 else D
    g = x.detach().float().cpu().view(L, D // group, group)
    scale = (g.abs().amax(-1) / 127).clamp(min=1e-12).to(torch.float16)
    q = torch.round(g / scale.float()[..., None]).clamp(-127, 127).to(torch.int8)
    return q.view(L, D).numpy(), scale.numpy()


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> torch.Tensor:
    q, scale = torch.from_numpy(q), torch.from_numpy(scale)
    L, D = q.shape
    return (q.float().view(L, scale.shape[1], -1) * scale.float()[..., None]).view(L, D)


def encode_sample(key: str, record: dict, latent: torch.Tensor, variants: list[dict[str, torch.Tensor]],
                  dtype: str = "float16", compact: bool = False) -> list[tuple[str, bytes]]:
    """The tar members of one sample, in a fixed order. variants: per caption, {text field: tensor}.

    compact stores T5's states as int8 with float16 scales per token and 64 channels (t5.q8.npy + t5.scale.npy):
    about half the bytes of a sample at 77 tokens, at an error documented in data/README.md.
    """
    if "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} may not contain '.' or '/'")
    record = {**record, "key": key, "dtype": dtype, "schema": SCHEMA_VERSION, "variants": len(variants)}
    members = [(f"{key}.json", json.dumps(record, sort_keys=True).encode())]
    members.append((f"{key}.latent.npy", _npy_bytes(to_array(latent, dtype))))
    for n, variant in enumerate(variants):
        for name in TEXT_FIELDS:
            if name not in variant:
                continue
            if name == "t5" and compact:
                q, scale = quantize_int8(variant[name])
                members += [(f"{key}.v{n}.t5.q8.npy", _npy_bytes(q)), (f"{key}.v{n}.t5.scale.npy", _npy_bytes(scale))]
            else:
                members.append((f"{key}.v{n}.{name}.npy", _npy_bytes(to_array(variant[name], dtype))))
    return members


def decode_sample(members: dict[str, bytes]) -> dict:
    """{extension: bytes} of one sample -> {"record", "latent", "variants": [{field: tensor}]}."""
    record = json.loads(members["json"])
    dtype = record["dtype"]

    def load(ext):
        return from_array(read_npy(members[ext]), dtype)

    if not isinstance(record, dict):
        raise ValueError("the record is not a JSON object")
    with_t5 = any(k.endswith((".t5.npy", ".t5.q8.npy")) for k in members)
    variants = []
    for n in range(record["variants"]):
        wanted = [f"v{n}.{name}.npy" for name in TEXT_FIELDS if name != "t5"]
        if with_t5:
            wanted.append(f"v{n}.t5.npy" if f"v{n}.t5.npy" in members else f"v{n}.t5.q8.npy")
        missing = [w for w in wanted if w not in members]
        if missing:
            raise ValueError(f"member {missing[0]} is missing")
        variant = {name: load(f"v{n}.{name}.npy") for name in TEXT_FIELDS if f"v{n}.{name}.npy" in members}
        if f"v{n}.t5.q8.npy" in members:
            q, scale = (read_npy(members[f"v{n}.t5.{part}.npy"]) for part in ("q8", "scale"))
            variant["t5"] = dequantize_int8(q, scale).to(getattr(torch, dtype))
        variants.append(variant)
    return {"record": record, "latent": load("latent.npy"), "variants": variants}


# ---------------------------------------------------------------------------------------------------------------
# Writing


class ShardWriter:
    """Writes one shard under a temporary name; `close()` renames it into place, so a shard that exists is whole."""

    def __init__(self, path, dtype: str = "float16", compact: bool = False):
        if dtype not in DTYPES:
            raise ValueError(f"unknown shard dtype {dtype!r}; accepted: {', '.join(DTYPES)}")
        self.path, self.dtype, self.compact, self.count = Path(path), dtype, compact, 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)

    def write(self, key: str, record: dict, latent: torch.Tensor, variants: list[dict[str, torch.Tensor]]):
        for name, data in encode_sample(key, record, latent, variants, self.dtype, self.compact):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o444  # no time or owner: reproducible bytes
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self):
        self.tar.close()
        os.replace(self.tmp, self.path)

    def abort(self):
        self.tar.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        self.close() if kind is None else self.abort()


def write_manifest(folder, shards: dict[str, int], identities: dict, skipped: dict[str, int], extra: dict = None):
    """manifest.json: shard names and sample counts, schema version, encoder / VAE identities, skipped inputs."""
    manifest = {"schema": SCHEMA_VERSION, "shards": dict(sorted(shards.items())),
                "samples": sum(shards.values()), "identities": identities, "skipped": skipped, **(extra or {})}
    path = Path(folder) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")  # processes may finish together
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return manifest


def read_manifest(folder) -> dict:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read shard manifest {path}: {e}") from None
    if manifest.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"{path} has schema {manifest.get('schema')}, this code reads {SCHEMA_VERSION}")
    return manifest
