"""Detectors and the colour classifier that feed GenEval's judge, and the official evaluator as a subprocess.

A detector is a callable image (PIL, RGB) -> {class name: [Detection, ...]} with boxes in pixels, scores, and
(where it segments) instance masks; thresholds and ordering are the judge's business (geneval.keep_detections).

- Mask2FormerDetector: COCO instance segmentation through transformers (default facebook/mask2former-swin-small-
  coco-instance: the Swin-S Mask2Former family GenEval uses through mmdet), post-processed as mmdet does: scores
  over every (query, class) pair, the top 100 kept, score = class probability x mean mask probability inside the
  mask, the box taken from the mask.
- ClipColors: GenEval's zero-shot colour classifier: the box crop with everything outside the instance mask set to
  grey #999, classified by an open_clip model (default ViT-L-14, openai weights) over ten colours with three
  prompt templates averaged.
- run_official: djghosh13/geneval's evaluation/evaluate_images.py in the user's own environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from mmdit.eval.detection import Detection

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COLOR_TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")
BACKGROUND = (0x99, 0x99, 0x99)
MASK2FORMER_ID = "facebook/mask2former-swin-small-coco-instance"
TOP_K = 100   # mmdet's Mask2Former test_cfg max_per_image

# COCO names as some label maps spell them -> GenEval's object_names.txt
_ALIASES = {"motorbike": "motorcycle", "aeroplane": "airplane", "sofa": "couch", "tvmonitor": "tv",
            "diningtable": "dining table", "pottedplant": "potted plant", "hair dryer": "hair drier"}


def geneval_name(label: str) -> str:
    name = label.lower().replace("_", " ").replace("-", " ").strip()
    return _ALIASES.get(name, name)


class Mask2FormerDetector:
    """COCO instances from a Mask2Former checkpoint in transformers' layout (a local folder, or a hub id online)."""

    def __init__(self, model: str = MASK2FORMER_ID, device="cpu", dtype: torch.dtype = torch.float32):
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        self.processor = AutoImageProcessor.from_pretrained(model)
        self.model = Mask2FormerForUniversalSegmentation.from_pretrained(model, dtype=dtype).eval().to(device)
        self.names = {int(i): geneval_name(n) for i, n in self.model.config.id2label.items()}

    @torch.no_grad()
    def __call__(self, image) -> dict:
        width, height = image.size
        inputs = self.processor(images=image, return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.model.device, self.model.dtype)
        out = self.model(pixel_values=pixels)
        probs = out.class_queries_logits[0].float().softmax(-1)[:, :-1]       # (queries, classes); last = no object
        queries, classes = probs.shape
        scores, flat = probs.flatten().topk(min(TOP_K, probs.numel()))
        query, label = flat // classes, flat % classes
        logits = out.masks_queries_logits[0, query].float()[None]
        # Mask logits cover the padded input; keep the part that holds the resized image, then go to image size.
        logits = torch.nn.functional.interpolate(logits, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
        valid = inputs.get("pixel_mask")
        if valid is not None:
            rows, cols = int(valid[0].any(1).sum()), int(valid[0].any(0).sum())
            logits = logits[..., :rows, :cols]
        probs_mask = torch.nn.functional.interpolate(logits, size=(height, width), mode="bilinear",
                                                     align_corners=False)[0].sigmoid()
        masks = probs_mask > 0.5
        mask_scores = (probs_mask * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
        found: dict[str, list] = {}
        for s, ms, lab, m in zip(scores.tolist(), mask_scores.tolist(), label.tolist(), masks.cpu().numpy()):
            ys, xs = np.nonzero(m)
            if len(xs) == 0:
                continue
            box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
            found.setdefault(self.names[lab], []).append(Detection(box, s * ms, mask=m))
        return found


class ClipColors:
    """Zero-shot colour of each object: crop to the box, grey #999 outside the mask, nearest of ten colour
    prompts (three templates averaged) for an open_clip model."""

    def __init__(self, model, preprocess, tokenizer, device="cpu"):
        self.model, self.preprocess, self.tokenizer = model.eval().to(device), preprocess, tokenizer
        self.device = device
        self._classifiers: dict[str, torch.Tensor] = {}

    @classmethod
    def from_open_clip(cls, name: str = "ViT-L-14", pretrained: str = "openai", device="cpu") -> "ClipColors":
        import open_clip

        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
        return cls(model, preprocess, open_clip.get_tokenizer(name), device)

    @torch.no_grad()
    def _classifier(self, cls: str) -> torch.Tensor:
        if cls not in self._classifiers:
            weights = []
            for color in COLORS:
                tokens = self.tokenizer([t.format(c=color, cls=cls) for t in COLOR_TEMPLATES]).to(self.device)
                emb = torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1).mean(0)
                weights.append(emb / emb.norm())
            self._classifiers[cls] = torch.stack(weights, 1)                   # (dim, colours)
        return self._classifiers[cls]

    def crop(self, image, detection):
        from PIL import Image

        if detection.mask is not None:
            grey = Image.new("RGB", image.size, BACKGROUND)
            image = Image.composite(image, grey, Image.fromarray(detection.mask.astype(np.uint8) * 255))
        return image.crop(tuple(int(round(v)) for v in detection.box))

    @torch.no_grad()
    def __call__(self, image, cls: str, objects: list) -> list[str]:
        if not objects:
            return []
        batch = torch.stack([self.preprocess(self.crop(image, o)) for o in objects]).to(self.device)
        features = torch.nn.functional.normalize(self.model.encode_image(batch).float(), dim=-1)
        return [COLORS[i] for i in (features @ self._classifier(cls)).argmax(1).tolist()]


def run_official(outdir, results, checkout, python: str = sys.executable, model_path=None) -> Path:
    """Score with djghosh13/geneval's own evaluator (in the environment of `python`, which has mmdet); the
    results are written to a temporary name and renamed once the evaluator succeeded and they read back."""
    checkout, results = Path(checkout), Path(results)
    script = checkout / "evaluation" / "evaluate_images.py"
    if not script.is_file():
        raise ValueError(f"{checkout} is not a GenEval checkout: evaluation/evaluate_images.py is missing")
    tmp = results.with_name(f".{results.name}.tmp")
    command = [python, str(script), str(outdir), "--outfile", str(tmp),
               "--model-path", str(model_path or checkout / "models")]
    done = subprocess.run(command, cwd=checkout, env=os.environ.copy())
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"the official evaluator failed (exit {done.returncode}): {' '.join(command)}")
    lines = [json.loads(line) for line in tmp.read_text().splitlines() if line.strip()]
    missing = [k for k in ("filename", "tag", "correct", "metadata") if lines and k not in lines[0]]
    if not lines or missing:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"the official evaluator wrote no usable results (missing {missing or 'every line'})")
    os.replace(tmp, results)
    return results
