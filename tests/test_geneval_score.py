"""Scoring a GenEval folder: the results file, ranks, the Mask2Former post-processing, the masked-crop colour
classifier, and the official evaluator as a subprocess."""

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mmdit.eval.geneval import Detection, read_layout, score, summarize

PROMPTS = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
           {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}],
            "prompt": "a photo of a red car"}]


def make_folder(root, images_per_prompt=2):
    for i, meta in enumerate(PROMPTS):
        (root / f"{i:05d}" / "samples").mkdir(parents=True)
        (root / f"{i:05d}" / "metadata.jsonl").write_text(json.dumps(meta) + "\n")
        for j in range(images_per_prompt):
            shade = 100 * i + 10 * j   # the fake detector below reads the prompt and image index from the pixels
            Image.new("RGB", (32, 32), (shade, 0, 0)).save(root / f"{i:05d}" / "samples" / f"{j:04d}.png")
    return root


def fake_detector(image):
    """Image 0 of each prompt gets what it asks for; the others get a dog."""
    shade = image.getpixel((0, 0))[0]
    prompt, index = shade // 100, shade % 100 // 10
    if index > 0:
        return {"dog": [Detection((0, 0, 10, 10), 0.9)]}
    cls = PROMPTS[prompt]["include"][0]["class"]
    return {cls: [Detection((0, 0, 10, 10), 0.9, color="red"), Detection((5, 5, 9, 9), 0.2, color="blue")]}


def test_score_writes_genevals_results_format(tmp_path):
    folder = make_folder(tmp_path / "run")
    written = score(folder, fake_detector, tmp_path / "results.jsonl")
    lines = [json.loads(line) for line in written.read_text().splitlines()]
    assert [r["correct"] for r in lines] == [True, False, True, False]
    assert set(lines[0]) == {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"}
    assert json.loads(lines[2]["metadata"]) == PROMPTS[1] and lines[2]["prompt"] == "a photo of a red car"
    assert json.loads(lines[0]["details"]) == {"cat": [[0, 0, 10, 10, 0.9]]}    # below 0.3 dropped
    assert lines[1]["reason"] == "expected cat>=1, found 0"
    assert summarize(lines)["overall"] == 0.5
    # A colour classifier, when given, decides the colours instead of the detections' own.
    blue = score(folder, fake_detector, tmp_path / "blue.jsonl", colors=lambda image, cls, objs: ["blue"] * len(objs))
    assert [json.loads(line)["correct"] for line in blue.read_text().splitlines()] == [True, False, False, False]


def test_score_under_two_processes_equals_one(tmp_path):
    folder = make_folder(tmp_path / "run", images_per_prompt=3)
    one = score(folder, fake_detector, tmp_path / "one.jsonl").read_text()
    assert score(folder, fake_detector, tmp_path / "two.jsonl", rank=1, world_size=2) is None   # rank 0 not done
    joined = score(folder, fake_detector, tmp_path / "two.jsonl", rank=0, world_size=2)
    assert joined.read_text() == one


class FakeMask2Former(torch.nn.Module):
    """Three queries over four classes: query 1 is a confident 'cat' whose mask is the rectangle `rect` (fractions
    of the image) of the resized image, which fills the top-left `valid` part of the padded input."""

    def __init__(self, rect, valid):
        super().__init__()
        self.rect, self.valid, self.anchor = rect, valid, torch.nn.Parameter(torch.zeros(1))

    def forward(self, pixel_values):
        h, w = self.valid
        logits = torch.full((1, 3, 5), -4.0)
        logits[0, 1, 1] = 6.0                       # class 1 ("cat")
        masks = torch.full((1, 3) + pixel_values.shape[-2:], -10.0)
        x1, y1, x2, y2 = self.rect
        masks[0, 1, round(y1 * h):round(y2 * h), round(x1 * w):round(x2 * w)] = 10.0
        masks[0, 0, :4, :4] = 10.0
        masks[0, 2, :, w:] = 10.0                   # only in the padding: must come out empty and be dropped
        return SimpleNamespace(class_queries_logits=logits, masks_queries_logits=masks)


def test_mask2former_post_processing_maps_masks_back_to_the_image():
    from mmdit.eval.detectors import Mask2FormerDetector

    def processor(images, return_tensors):   # a 70x50 image resized to 98x70, padded to 128x96
        pixel_mask = torch.zeros(1, 96, 128, dtype=torch.long)
        pixel_mask[:, :70, :98] = 1
        return {"pixel_values": torch.zeros(1, 3, 96, 128), "pixel_mask": pixel_mask}

    detector = Mask2FormerDetector.__new__(Mask2FormerDetector)
    detector.processor = processor
    detector.model = FakeMask2Former((10 / 70, 20 / 50, 30 / 70, 40 / 50), (70, 98))
    detector.model.device, detector.model.dtype = torch.device("cpu"), torch.float32
    detector.names = {0: "person", 1: "cat", 2: "dog", 3: "car"}
    found = detector(Image.new("RGB", (70, 50)))
    cat = max(found["cat"], key=lambda d: d.score)
    assert cat.box == pytest.approx((10, 20, 30, 40), abs=1)
    assert cat.mask.shape == (50, 70) and cat.mask[30, 20] and not cat.mask[5, 60]
    p = torch.tensor([-4.0, 6.0, -4.0, -4.0, -4.0]).softmax(0)[1].item()
    assert cat.score == pytest.approx(p * torch.tensor(10.0).sigmoid().item(), rel=1e-3)
    # 12 (query, class) pairs; the padding-only query's 4 have empty masks once cropped
    assert sum(len(v) for v in found.values()) == 8


def test_mask2former_loads_a_transformers_checkpoint(tmp_path):
    from transformers import (Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor,
                              SwinConfig)

    from mmdit.eval.detectors import Mask2FormerDetector

    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                          window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    names = ["person", "motorbike", "dining-table", "cat"]
    config = Mask2FormerConfig(backbone_config=backbone, num_labels=4, hidden_dim=32, num_queries=10,
                               encoder_layers=1, decoder_layers=2, num_attention_heads=2, dim_feedforward=64,
                               mask_feature_size=32, feature_size=32, encoder_feedforward_dim=64,
                               id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    torch.manual_seed(0)
    Mask2FormerForUniversalSegmentation(config).save_pretrained(tmp_path / "m2f")
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}, size_divisor=32).save_pretrained(
        tmp_path / "m2f")
    detector = Mask2FormerDetector(str(tmp_path / "m2f"))
    assert set(detector.names.values()) == {"person", "motorcycle", "dining table", "cat"}
    found = detector(Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)))
    dets = [d for v in found.values() for d in v]
    assert dets and len(dets) <= 40
    for d in dets:
        x1, y1, x2, y2 = d.box
        assert 0 <= x1 < x2 <= 70 and 0 <= y1 < y2 <= 50 and 0 <= d.score <= 1 and d.mask.shape == (50, 70)
        ys, xs = np.nonzero(d.mask)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == d.box


PALETTE = {"red": (220, 20, 20), "green": (20, 180, 40), "blue": (20, 40, 220)}


class FakeClip(torch.nn.Module):
    """Text -> one-hot of the colour word; image -> one-hot of the palette colour nearest the mean non-grey pixel,
    so the classifier is right exactly when the crop and the mask are."""

    names = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]

    def encode_text(self, tokens):
        return torch.nn.functional.one_hot(tokens, 10).float() + 0.01

    def encode_image(self, batch):
        out = []
        for img in batch:
            pixels = img.reshape(3, -1).T
            keep = pixels[(pixels - 0x99).abs().sum(1) > 6]
            mean = keep.mean(0) if len(keep) else torch.tensor([153.0] * 3)
            best = min(PALETTE, key=lambda c: ((mean - torch.tensor(PALETTE[c], dtype=torch.float)) ** 2).sum())
            out.append(torch.nn.functional.one_hot(torch.tensor(self.names.index(best)), 10).float())
        return torch.stack(out)


def test_clip_colours_use_the_masked_box_crop():
    from mmdit.eval.detectors import COLOR_TEMPLATES, COLORS, ClipColors

    seen = []

    def tokenizer(texts):
        seen.extend(texts)
        return torch.tensor([next(i for i, c in enumerate(COLORS) if f"a {c}" in t or f" {c}-" in t) for t in texts])

    def preprocess(image):
        return torch.tensor(np.asarray(image.resize((16, 16), Image.NEAREST)), dtype=torch.float).permute(2, 0, 1)

    colors = ClipColors(FakeClip(), preprocess, tokenizer)
    # A red disc-like square inside a box that is mostly green: the mask must grey the green out.
    image = np.zeros((40, 40, 3), np.uint8)
    image[:] = PALETTE["green"]
    image[10:20, 10:20] = PALETTE["red"]
    image[25:35, 25:35] = PALETTE["blue"]
    mask = np.zeros((40, 40), bool)
    mask[10:20, 10:20] = True
    red = Detection((5, 5, 30, 30), 0.9, mask=mask)
    crop = np.asarray(colors.crop(Image.fromarray(image), red))
    assert crop.shape == (25, 25, 3) and (crop[0, 0] == 0x99).all() and (crop[10, 10] == PALETTE["red"]).all()
    unmasked = Detection((5, 5, 30, 30), 0.9)
    blue = Detection((25, 25, 35, 35), 0.9, mask=np.ones((40, 40), bool))
    assert colors(Image.fromarray(image), "car", [red, unmasked, blue]) == ["red", "green", "blue"]
    assert len(seen) == len(COLORS) * len(COLOR_TEMPLATES) and "a photo of a red-colored car" in seen


def test_official_evaluator_as_a_subprocess(tmp_path):
    from mmdit.eval.detectors import run_official

    folder = make_folder(tmp_path / "run")
    checkout = tmp_path / "geneval"
    (checkout / "evaluation").mkdir(parents=True)
    # A stand-in for evaluate_images.py with its command line: judges every image correct.
    (checkout / "evaluation" / "evaluate_images.py").write_text(
        "import argparse, json, pathlib\n"
        "p = argparse.ArgumentParser(); p.add_argument('imagedir'); p.add_argument('--outfile')\n"
        "p.add_argument('--model-path'); p.add_argument('--options', nargs='*')\n"
        "a = p.parse_args()\n"
        "assert a.model_path.endswith('models'), a.model_path\n"
        "rows = [dict(filename=str(f), tag='single_object', prompt='x', correct=True, reason='',\n"
        "             metadata=(f.parent.parent / 'metadata.jsonl').read_text().strip(), details='{}')\n"
        "        for f in sorted(pathlib.Path(a.imagedir).glob('*/samples/*.png'))]\n"
        "pathlib.Path(a.outfile).write_text(''.join(json.dumps(r) + '\\n' for r in rows))\n")
    out = run_official(folder, tmp_path / "results.jsonl", checkout, sys.executable)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == len(read_layout(folder)) and summarize(lines)["overall"] == 1.0
    # A failing evaluator leaves no results behind.
    (checkout / "evaluation" / "evaluate_images.py").write_text("raise SystemExit(3)\n")
    with pytest.raises(ValueError, match="official evaluator failed \\(exit 3\\)"):
        run_official(folder, tmp_path / "failed.jsonl", checkout, sys.executable)
    assert not list(tmp_path.glob("*failed*"))
    with pytest.raises(ValueError, match="not a GenEval checkout"):
        run_official(folder, tmp_path / "x.jsonl", tmp_path, sys.executable)


def test_score_command_refuses_an_empty_folder(tmp_path, capsys):
    from mmdit.eval.cli import main

    with pytest.raises(SystemExit) as e:
        main(["score", str(tmp_path), "--detector", "toy"])
    assert e.value.code == 2 and "holds no images in GenEval's layout" in capsys.readouterr().err
