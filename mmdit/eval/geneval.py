"""GenEval's rules, written for our pipeline: prompt metadata, the per-image judge, the run summary.

The rules follow the official evaluator (djghosh13/geneval, evaluation/evaluate_images.py and
summary_scores.py): detections above 0.3 confidence (0.9 for `counting` prompts), at most 16 per class, most
confident first; `include` clauses must all hold (at least `count` detections of the class; then the top `count`
objects checked for colour and for position against every object of the target clause); `exclude` clauses fail at
`count` or more detections; position compares box centres after a dead zone of 0.1 x the summed box sizes, a
relation holding where the remaining offset, normalised by the raw offset, passes +-0.5. The overall score is the
unweighted mean of the per-task image accuracies. Detectors (and the colour classifier) plug in: the judge reads
detections, it runs no model.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

THRESHOLD, COUNTING_THRESHOLD, MAX_OBJECTS, POSITION_THRESHOLD = 0.3, 0.9, 16, 0.1
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


@dataclass
class Detection:
    box: tuple[float, float, float, float]   # x1, y1, x2, y2 in pixels
    score: float
    color: str | None = None                 # filled by a colour classifier when a clause asks for one


def read_metadata(path) -> list[dict]:
    """GenEval's evaluation_metadata.jsonl: one object per line with `tag`, `prompt`, `include` (and `exclude`).
    A bad line is named by its number."""
    entries = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            raise ValueError(f"{path} line {n} is not valid JSON") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
            raise ValueError(f"{path} line {n} has no \"prompt\" string")
        if not isinstance(entry.get("include", []), list) or "tag" not in entry:
            raise ValueError(f"{path} line {n} needs a \"tag\" and an \"include\" list")
        entries.append(entry)
    return entries


def keep_detections(detections: dict[str, list[Detection]], tag: str, threshold: float = THRESHOLD,
                    counting_threshold: float = COUNTING_THRESHOLD, max_objects: int = MAX_OBJECTS):
    """Per class: above the threshold (stricter for counting prompts), most confident first, at most max_objects."""
    limit = counting_threshold if tag == "counting" else threshold
    kept = {}
    for cls, found in detections.items():
        found = sorted((d for d in found if d.score > limit), key=lambda d: -d.score)[:max_objects]
        if found:
            kept[cls] = found
    return kept


def relative_position(a: Detection, b: Detection, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """Relations of a to b ("left of", "right of", "above", "below"), with a dead zone scaled by the box sizes."""
    (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = a.box, b.box
    offset = ((ax1 + ax2) / 2 - (bx1 + bx2) / 2, (ay1 + ay2) / 2 - (by1 + by2) / 2)
    dims = ((ax2 - ax1) + (bx2 - bx1), (ay2 - ay1) + (by2 - by1))
    revised = [math.copysign(max(abs(o) - threshold * abs(d), 0.0), o) for o, d in zip(offset, dims)]
    if all(abs(r) < 1e-3 for r in revised):
        return set()
    norm = math.hypot(*offset)
    dx, dy = revised[0] / norm, revised[1] / norm
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def judge(metadata: dict, detections: dict[str, list[Detection]],
          classify_colors: Callable[[str, list[Detection]], list[str]] | None = None) -> tuple[bool, list[str]]:
    """(correct, reasons) for one image's kept detections. classify_colors(class, objects) -> one colour each;
    by default each detection's own `color`."""
    classify_colors = classify_colors or (lambda cls, objects: [o.color for o in objects])
    correct, reasons, matched_groups = True, [], []
    for req in metadata.get("include", []):
        cls, count = req["class"], req["count"]
        found = detections.get(cls, [])[:count]
        matched = len(found) >= count
        if not matched:
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors = classify_colors(cls, found)
                if colors.count(req["color"]) < count:
                    matched = False
                    reasons.append(f"expected {req['color']} {cls}>={count}, found {colors.count(req['color'])} "
                                   f"{req['color']}")
            if "position" in req and matched:
                relation, target = req["position"]
                targets = matched_groups[target]
                if targets is None:
                    matched = False
                    reasons.append(f"no target for {cls} to be {relation}")
                elif any(relation not in relative_position(o, t) for o in found for t in targets):
                    matched = False
                    reasons.append(f"expected {cls} {relation} target")
        correct = correct and matched
        matched_groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        if len(detections.get(req["class"], [])) >= req["count"]:
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {len(detections[req['class']])}")
    return correct, reasons


def read_layout(outdir) -> list[tuple[Path, dict]]:
    """(image, metadata) pairs as the official evaluator collects them: all-digit folders, `metadata.jsonl` one
    JSON object, images named by \\d+.png under samples/."""
    tasks = []
    for folder in sorted(Path(outdir).iterdir()):
        if not folder.is_dir() or not folder.name.isdigit():
            continue
        metadata = json.loads((folder / "metadata.jsonl").read_text())
        for image in sorted((folder / "samples").iterdir()):
            if image.is_file() and re.match(r"\d+\.png", image.name):
                tasks.append((image, metadata))
    return tasks


def summarize(results: list[dict]) -> dict:
    """Per-task accuracy over images, images and prompts correct, and the overall score: the unweighted mean of
    the task accuracies (GenEval's summary_scores.py)."""
    by_task: dict[str, list[bool]] = {}
    by_prompt: dict[str, list[bool]] = {}
    for r in results:
        by_task.setdefault(r["tag"], []).append(bool(r["correct"]))
        key = r["metadata"] if isinstance(r["metadata"], str) else json.dumps(r["metadata"], sort_keys=True)
        by_prompt.setdefault(key, []).append(bool(r["correct"]))
    tasks = {tag: sum(v) / len(v) for tag, v in by_task.items()}
    return {
        "images": len(results), "prompts": len(by_prompt),
        "correct_images": sum(r["correct"] for r in results) / len(results) if results else 0.0,
        "correct_prompts": sum(any(v) for v in by_prompt.values()) / len(by_prompt) if by_prompt else 0.0,
        "tasks": tasks, "overall": sum(tasks.values()) / len(tasks) if tasks else 0.0,
    }


# ---------------------------------------------------------------------------------------------------------------
# Generating in GenEval's layout, and the command line


def image_seed(seed: int, prompt_index: int, sample_index: int, samples_per_prompt: int) -> int:
    """Image j of prompt i starts from seed + i * samples_per_prompt + j: any image can be made again alone."""
    return seed + prompt_index * samples_per_prompt + sample_index


def generate(metadata_path, outdir, pipe, settings, *, samples_per_prompt: int = 4, seed: int = 42,
             batch_size: int = 4, record: dict | None = None, rank: int = 0, world_size: int = 1,
             overwrite: bool = False) -> int:
    """Write DIR/NNNNN/metadata.jsonl and DIR/NNNNN/samples/NNNN.png for every prompt (this rank's: every
    world_size-th), skipping images already there; DIR/config.json records every setting and refuses a rerun with
    other settings unless overwrite. Returns the number of images made."""
    from mmdit.pipeline import save_png, settings_record

    entries = read_metadata(metadata_path)
    outdir = Path(outdir)
    config = {**settings_record(settings), **(record or {}), "samples_per_prompt": samples_per_prompt,
              "seed": seed, "seed_rule": "seed + prompt_index * samples_per_prompt + sample_index",
              "metadata": str(metadata_path)}
    config_file = outdir / "config.json"
    if config_file.is_file() and not overwrite:
        earlier = json.loads(config_file.read_text())
        if earlier != config:
            key = next(k for k in sorted(set(earlier) | set(config)) if earlier.get(k) != config.get(k))
            raise ValueError(f"{outdir} holds another run ({key}: {earlier.get(key)!r} there, "
                             f"{config.get(key)!r} now); pass --overwrite or use another --outdir")
    outdir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    jobs = []
    for i, entry in enumerate(entries):
        if i % world_size != rank:
            continue
        folder = outdir / f"{i:05d}"
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        (folder / "metadata.jsonl").write_text(json.dumps(entry) + "\n")
        for j in range(samples_per_prompt):
            if not (folder / "samples" / f"{j:04d}.png").is_file():
                jobs.append((entry["prompt"], image_seed(seed, i, j, samples_per_prompt),
                             folder / "samples" / f"{j:04d}.png"))
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start:start + batch_size]
        images = pipe.generate([p for p, _, _ in batch], [s for _, s, _ in batch], settings)
        for (prompt, s, path), image in zip(batch, images):
            save_png(image, path, {"prompt": prompt, "seed": s, **config})
    return len(jobs)


def print_summary(summary: dict):
    print(f"images {summary['images']}, prompts {summary['prompts']}: {summary['correct_images']:.2%} of images "
          f"and {summary['correct_prompts']:.2%} of prompts correct")
    for tag in [t for t in TASKS if t in summary["tasks"]] + [t for t in summary["tasks"] if t not in TASKS]:
        print(f"  {tag:<14s} {summary['tasks'][tag]:.4f}")
    print(f"  {'overall':<14s} {summary['overall']:.4f}   (unweighted mean of the task accuracies)")


def main(argv=None):
    import argparse
    import os
    import sys

    p = argparse.ArgumentParser(prog="python -m mmdit.eval.geneval", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="images in GenEval's folder layout")
    g.add_argument("--metadata", required=True)
    g.add_argument("--outdir", required=True)
    g.add_argument("--model", required=True)
    g.add_argument("--samples-per-prompt", type=int, default=4)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--no-t5", action="store_true")
    g.add_argument("--steps", type=int, default=28)
    g.add_argument("--cfg", type=float, default=7.0)
    g.add_argument("--shift", type=float, default=None)
    g.add_argument("--sampler", default="euler")
    g.add_argument("--width", type=int, default=512)
    g.add_argument("--height", type=int, default=512)
    g.add_argument("--max-sequence-length", type=int, default=77)
    g.add_argument("--t5-tokenizer", default=None)
    g.add_argument("--overwrite", action="store_true")
    s = sub.add_parser("summary", help="per-task and overall scores of a results.jsonl")
    s.add_argument("results")
    s.add_argument("--json", help="also write the summary here")
    args = p.parse_args(argv)

    try:
        if args.command == "summary":
            results = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line.strip()]
            summary = summarize(results)
            print_summary(summary)
            if args.json:
                Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
            return
        import torch

        from mmdit.pipeline import SD3Pipeline, Settings

        read_metadata(args.metadata)   # a bad line stops here, before any model loads
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        pipe = SD3Pipeline.load(args.model, no_t5=args.no_t5, dtype=dtype, device=device,
                                t5_tokens=args.max_sequence_length, t5_tokenizer=args.t5_tokenizer)
        settings = Settings(steps=args.steps, cfg=args.cfg, shift=pipe.shift if args.shift is None else args.shift,
                            sampler=args.sampler, width=args.width, height=args.height)
        record = {"model": str(args.model), "t5": not args.no_t5, "max_sequence_length": args.max_sequence_length,
                  "dtype": str(dtype).replace("torch.", "")}
        made = generate(args.metadata, args.outdir, pipe, settings, samples_per_prompt=args.samples_per_prompt,
                        seed=args.seed, batch_size=args.batch_size, record=record,
                        rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)),
                        overwrite=args.overwrite)
        print(f"{made} images written to {args.outdir}")
    except (ValueError, OSError) as e:
        print(f"geneval: error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
