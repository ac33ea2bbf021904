"""The toy world's detector: plain image analysis, no learned weights, in the Detection format GenEval's judge reads.

Pixels far from the grey background are foreground; each connected foreground region is one object. Its colour is
the palette colour most of its pixels are nearest to; its shape is the one whose template, drawn to fill the same
box, overlaps its outline best. The score says how clear the reading
is: 1.0 for a region of square proportions, pure colour and a shape reading well clear of the others, less
as it gets ambiguous, so GenEval's thresholds (0.3, and 0.9 for counting) keep their meaning.
"""

from __future__ import annotations

import numpy as np

from mmdit.eval.detection import Detection
from mmdit.toy.world import BACKGROUND, PALETTE

_NAMES = list(PALETTE)
_RGB = np.array([PALETTE[c] for c in _NAMES], dtype=np.float32)
# A reading is fully clear when its template overlaps this much better than the next one: small enough that clean
# drawn shapes read clear (tests/test_toy.py reads back every training image), so a lower score means ambiguity.
_CLEAR_LEAD = 0.03


class ToyDetector:
    def __init__(self, foreground_distance: float = 45.0, min_area: float = 0.0025):
        """min_area: the smallest object, as a fraction of the image (a quarter of the smallest drawn shape)."""
        self.foreground_distance, self.min_area = foreground_distance, min_area

    def __call__(self, image) -> dict[str, list[Detection]]:
        from scipy import ndimage

        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
        image_area = pixels.shape[0] * pixels.shape[1]
        foreground = np.linalg.norm(pixels - np.array(BACKGROUND, np.float32), axis=-1) > self.foreground_distance
        labels, count = ndimage.label(foreground)
        found: dict[str, list[Detection]] = {}
        background = np.array(BACKGROUND, np.float32)
        for index, region in enumerate(ndimage.find_objects(labels), 1):
            mask = labels[region] == index
            area = int(mask.sum())
            if area < self.min_area * image_area:
                continue
            nearest = np.linalg.norm(pixels[region][mask][:, None] - _RGB[None], axis=-1).argmin(1)
            color = _NAMES[int(np.bincount(nearest, minlength=len(_NAMES)).argmax())]
            # The outline at half coverage: an edge pixel belongs to the shape when it is at least half-way from
            # the background to the shape's colour (a fixed distance would make bright shapes fatter).
            half = 0.5 * np.linalg.norm(_RGB[_NAMES.index(color)] - background)
            ys, xs = region
            ys = slice(max(ys.start - 1, 0), ys.stop + 1)
            xs = slice(max(xs.start - 1, 0), xs.stop + 1)
            own = (labels[ys, xs] == index) | (labels[ys, xs] == 0)
            outline = own & (np.linalg.norm(pixels[ys, xs] - background, axis=-1) > half)
            rows, cols = np.nonzero(outline)
            if len(rows) == 0:
                continue
            y0, y1 = ys.start + rows.min(), ys.start + rows.max() + 1
            x0, x1 = xs.start + cols.min(), xs.start + cols.max() + 1
            full = np.zeros(labels.shape, bool)
            full[ys, xs] = outline
            shape, clarity = classify_shape(full[y0:y1, x0:x1])
            core = ndimage.binary_erosion(full)   # edge pixels are blends with the background
            core = core if core.any() else full
            inside = np.linalg.norm(pixels[core][:, None] - _RGB[None], axis=-1).argmin(1)
            purity = float(np.mean(inside == _NAMES.index(color)))
            aspect = (x1 - x0) / (y1 - y0)
            score = clarity * (1.0 if 0.75 <= aspect <= 1.33 else 0.5) * (1.0 if purity >= 0.7 else 0.6)
            box = (float(x0), float(y0), float(x1), float(y1))
            found.setdefault(shape, []).append(Detection(box, float(score), color=color, mask=full))
        return found


def shape_templates(h: int, w: int) -> dict[str, np.ndarray]:
    """Each shape drawn to fill an h x w box, sampled at pixel centres."""
    y, x = (np.mgrid[0:h, 0:w] + 0.5) / np.array([h, w])[:, None, None]
    return {"square": np.ones((h, w), bool),
            "circle": (2 * x - 1) ** 2 + (2 * y - 1) ** 2 <= 1,
            "triangle": y >= np.abs(2 * x - 1)}


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """(shape, clarity in [0.5, 1]) of one region's mask cropped to its box: the shape whose template, drawn to
    fill the same box, overlaps it best (intersection over union). Clarity grows with the lead over the next."""
    overlaps = {}
    for shape, template in shape_templates(*mask.shape).items():
        overlaps[shape] = (mask & template).sum() / max((mask | template).sum(), 1)
    (shape, best), (_, second) = sorted(overlaps.items(), key=lambda kv: -kv[1])[:2]
    return shape, float(min(1.0, 0.5 + (best - second) / (2 * _CLEAR_LEAD)))
