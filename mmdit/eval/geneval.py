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
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np

from mmdit.eval.detection import Detection

THRESHOLD, COUNTING_THRESHOLD, MAX_OBJECTS, POSITION_THRESHOLD = 0.3, 0.9, 16, 0.1
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


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
# Scoring a folder


def result_line(image: Path, metadata: dict, detections: dict, correct: bool, reasons: list[str]) -> dict:
    """One line of GenEval's results.jsonl (evaluate_images.py: metadata and details are JSON strings)."""
    return {"filename": str(image), "tag": metadata["tag"], "prompt": metadata["prompt"], "correct": bool(correct),
            "reason": "\n".join(reasons), "metadata": json.dumps(metadata),
            "details": json.dumps({cls: [[*d.box, d.score] for d in found] for cls, found in detections.items()})}


def score(outdir, detector, results, colors=None, rank: int = 0, world_size: int = 1) -> Path | None:
    """Judge every image of a GenEval folder: detector(image) -> detections, colors(image, class, objects) ->
    colour names (default: each detection's own `color`). Writes results (JSON lines, sorted by file name) and
    returns its path; under several processes each writes its every world_size-th image to a part, and the last
    one to finish joins the parts (the same file one process writes)."""
    from PIL import Image

    results = Path(results)
    lines = []
    for n, (path, metadata) in enumerate(read_layout(outdir)):
        if n % world_size != rank:
            continue
        with Image.open(path) as im:
            image = im.convert("RGB")
        found = keep_detections(detector(image), metadata["tag"])
        classify = (lambda cls, objs: colors(image, cls, objs)) if colors else None
        correct, reasons = judge(metadata, found, classify)
        lines.append(result_line(path, metadata, found, correct, reasons))
    if world_size == 1:
        _write_lines(results, lines)
        return results
    _write_lines(results.with_name(f"{results.name}.part{rank}of{world_size}"), lines)
    parts = [results.with_name(f"{results.name}.part{r}of{world_size}") for r in range(world_size)]
    if not all(p.is_file() for p in parts):
        return None
    joined = [json.loads(line) for p in parts for line in p.read_text().splitlines() if line.strip()]
    _write_lines(results, sorted(joined, key=lambda r: r["filename"]))
    return results


def _write_lines(path: Path, lines: list[dict]):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# Generating in GenEval's layout (the command line: mmdit.eval.cli)


def image_seed(seed: int, prompt_index: int, sample_index: int, samples_per_prompt: int) -> int:
    """Image j of prompt i starts from seed + i * samples_per_prompt + j: any image can be made again alone."""
    return seed + prompt_index * samples_per_prompt + sample_index


def generate(metadata_path, outdir, pipe, settings, *, samples_per_prompt: int = 4, seed: int = 42,
             batch_size: int = 4, record: dict | None = None, rank: int = 0, world_size: int = 1,
             overwrite: bool = False, grid: bool = False, progress=None) -> int:
    """Write DIR/NNNNN/metadata.jsonl and DIR/NNNNN/samples/NNNN.png for every prompt (this rank's: every
    world_size-th), skipping images already there; DIR/config.json records every setting and refuses a rerun with
    other settings unless overwrite; with grid, DIR/NNNNN/grid.png shows a prompt's samples side by side (the
    evaluator ignores it). Everything is checked before the first write. progress(total) -> a bar with update(n).
    Returns the number of images made."""
    from mmdit.images import save_png

    entries = read_metadata(metadata_path)
    if samples_per_prompt < 1 or batch_size < 1:
        raise ValueError(f"samples_per_prompt and batch_size must be >= 1, got {samples_per_prompt} and "
                         f"{batch_size}")
    pipe.check_size(settings.width, settings.height)
    outdir = Path(outdir)
    config = {**settings.record(), **(record or {}), "samples_per_prompt": samples_per_prompt,
              "seed": seed, "seed_rule": "seed + prompt_index * samples_per_prompt + sample_index",
              "metadata": str(metadata_path)}
    config_file = outdir / "config.json"
    earlier = json.loads(config_file.read_text()) if config_file.is_file() else config
    if earlier != config:
        if not overwrite:
            key = next(k for k in sorted(set(earlier) | set(config)) if earlier.get(k) != config.get(k))
            raise ValueError(f"{outdir} holds another run ({key}: {earlier.get(key)!r} there, "
                             f"{config.get(key)!r} now); pass --overwrite or use another --outdir")
        import shutil

        for folder in outdir.iterdir():   # the other run's images go (each rank its own prompts'): no mixing
            if folder.is_dir() and folder.name.isdigit() and int(folder.name) % world_size == rank:
                shutil.rmtree(folder)
    outdir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    jobs, folders = [], []
    for i, entry in enumerate(entries):
        if i % world_size != rank:
            continue
        folder = outdir / f"{i:05d}"
        folders.append(folder)
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        (folder / "metadata.jsonl").write_text(json.dumps(entry) + "\n")
        for j in range(samples_per_prompt):
            if not (folder / "samples" / f"{j:04d}.png").is_file():
                jobs.append((entry["prompt"], image_seed(seed, i, j, samples_per_prompt),
                             folder / "samples" / f"{j:04d}.png"))
    bar = progress(len(jobs)) if progress else None
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start:start + batch_size]
        images = pipe.generate([p for p, _, _ in batch], [s for _, s, _ in batch], settings)
        for (prompt, s, path), image in zip(batch, images):
            save_png(image, path, {"prompt": prompt, "seed": s, **config})
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    if grid:
        from PIL import Image

        for folder in folders:
            samples = [np.asarray(Image.open(folder / "samples" / f"{j:04d}.png").convert("RGB"))
                       for j in range(samples_per_prompt)]
            prompt = entries[int(folder.name)]["prompt"]
            save_png(np.concatenate(samples, axis=1), folder / "grid.png", {"prompt": prompt})
    return len(jobs)


if __name__ == "__main__":   # `python3 -m mmdit.eval.geneval ...`, as the README writes it
    from mmdit.eval.cli import main

    main()
