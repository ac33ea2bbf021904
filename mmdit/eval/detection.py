"""What a detector reports for one object, and what GenEval's judge reads: a box, a confidence, and a colour and
mask where the detector has them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Detection:
    box: tuple[float, float, float, float]   # x1, y1, x2, y2 in pixels
    score: float
    color: str | None = None                 # filled by a colour classifier when a clause asks for one
    mask: np.ndarray | None = field(default=None, repr=False, compare=False)   # (H, W) bool, where segmented
