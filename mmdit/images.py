"""Images in and out: aspect-ratio buckets, resize and centre crop, pixels in [-1, 1]; PNGs with their settings.

A bucket is a (width, height) whose sides are multiples of 16 (SD3's VAE factor 8 times the patch size 2). An
image goes to the bucket nearest its aspect ratio (in log ratio), is resized so it covers the bucket, and is
cropped at the centre; the crop box (in the original image's pixels) is recorded with the sample.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from mmdit.checkpoint import default_mode

SIDE_MULTIPLE = 16


def make_buckets(resolution: int, max_ratio: float = 2.0, step: int | None = None) -> list[tuple[int, int]]:
    """Buckets of about resolution^2 pixels, from 1:max_ratio to max_ratio:1, widths every `step` pixels
    (default a quarter of the resolution, in multiples of 16: 64 at 256)."""
    if resolution % SIDE_MULTIPLE:
        raise ValueError(f"resolution must be a multiple of {SIDE_MULTIPLE}, got {resolution}")
    step = step or max(SIDE_MULTIPLE, resolution // 4 // SIDE_MULTIPLE * SIDE_MULTIPLE)
    buckets = {(resolution, resolution)}
    w = resolution
    while True:
        w += step
        h = round(resolution * resolution / w / SIDE_MULTIPLE) * SIDE_MULTIPLE
        if h < SIDE_MULTIPLE or w / h > max_ratio:
            break
        buckets |= {(w, h), (h, w)}
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), b))


def resize_center_crop(image, width: int, height: int):
    """PIL image -> (pixels (3, height, width) in [-1, 1], crop box (left, top, right, bottom) in the original).

    The image is scaled so it covers width x height (bicubic), then the centre is cut out.
    """
    from PIL import Image

    image = image.convert("RGB")
    W, H = image.size
    scale = max(width / W, height / H)
    # The crop box in original pixels, centred; resizing only that box avoids a second interpolation.
    cw, ch = width / scale, height / scale
    left, top = (W - cw) / 2, (H - ch) / 2
    box = (left, top, left + cw, top + ch)
    resized = image.resize((width, height), Image.BICUBIC, box=box)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    return pixels, [round(v, 2) for v in box]


def save_png(image: np.ndarray, path: Path, info: dict):
    """A uint8 (H, W, 3) image as PNG with its prompt and settings (info, as JSON in "parameters") in the metadata;
    written under a temporary name and renamed, so an interrupted run leaves no partial image."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    meta.add_text("prompt", str(info.get("prompt", "")))
    meta.add_text("parameters", json.dumps(info, allow_nan=False))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        Image.fromarray(image).save(tmp, format="PNG", pnginfo=meta)
        os.chmod(tmp, default_mode())  # mkstemp makes owner-only files; an image is an ordinary file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
