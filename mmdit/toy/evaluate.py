"""Toy GenEval of a training run: every checkpoint's EMA scored on the toy prompt file, seen and held-out prompts
apart, as a table and a learning curve (score against samples seen).

    python3 -m mmdit.toy.evaluate runs/toy --samples-per-prompt 16        # every checkpoint, then the export
    python3 -m mmdit.toy.evaluate runs/toy --only-export --no-t5
    python3 -m mmdit.toy.evaluate runs/toy --only-export --cfg 3          # another guidance scale, its own files
    python3 -m mmdit.toy.evaluate runs/toy --only-export --shift 3        # another sampling shift, its own files
    python3 -m mmdit.toy.evaluate runs/toy --only-export --slg-layers     # without skip-layer guidance, likewise
    python3 -m mmdit.toy.evaluate mmdit/toy_pipeline --out eval/bundled    # a pipeline: its own MM-DiT and components

Each checkpoint's EMA goes into the run's own components (train.sample_model), samples GenEval's layout with their
sampling defaults (28 Euler steps, the scheduler's shift, and their mmdit_sampling.json: CFG 2 and skip-layer
guidance on blocks 2 and 3 for the toy pipelines; --cfg, --shift and --slg-layers another), and the toy detector
judges it. Per attribute: shape = single and two objects, colour = colours, count = counting, position = position,
binding = colour attribution (GenEval's tasks). Writes RUN/eval/curve_t5.json, .md and .png (curve_no_t5.* with
--no-t5; with --cfg 3, curve_t5_cfg3.*, with --shift 3, curve_t5_shift3.*, with --slg-layers alone,
curve_t5_noslg.* and the like), and RUN/eval/drawn_t5.md: for each held-out prompt of the last model scored, what the
detector read in its images (the objects' colours and shapes), most common first, which tells a wrong colour from a
swapped one.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import Counter
from pathlib import Path

from mmdit.cli import Parser, UsageError, fail
from mmdit.config import MAX_GUIDANCE, MAX_SHIFT
from mmdit.sampling_cli import DEVICE_PATTERN, device_and_dtype, sampling_defaults
from mmdit.toy import TOY_CFG

TASKS_BY_ATTRIBUTE = {"shape": ("single_object", "two_object"), "colour": ("colors",), "count": ("counting",),
                      "position": ("position",), "binding": ("color_attr",)}


def attribute_scores(results: list[dict]) -> dict:
    """{"seen" / "held_out": {"overall": GenEval's score, attribute: image accuracy}} of toy GenEval results."""
    from mmdit.eval.geneval import summarize

    out = {}
    for split in ("seen", "held_out"):
        chosen = [r for r in results if json.loads(r["metadata"]).get("held_out", False) == (split == "held_out")]
        summary = summarize(chosen)
        scores = {"overall": summary["overall"], "images": summary["images"]}
        for attribute, tasks in TASKS_BY_ATTRIBUTE.items():
            hits = [r["correct"] for r in chosen if r["tag"] in tasks]
            scores[attribute] = sum(hits) / len(hits) if hits else None
        out[split] = scores
    return out


def score_weights(weights: Path, components: Path, outdir: Path, samples_per_prompt: int, no_t5: bool,
                  cfg: float | None = None, steps: int = 28, device: str = "cpu", shift: float | None = None,
                  slg_layers: list[int] | None = None) -> dict:
    """Toy GenEval of one MM-DiT (any format load_mmdit reads) inside the components' pipeline, in fp32 on
    device (the starting noise is drawn on the CPU, so a GPU draws the same pictures up to rounding). cfg,
    slg_layers None: the components' sampling defaults (their mmdit_sampling.json); shift None: their scheduler's.
    The scores per split, and the shift and skip-layer guidance sampled with."""
    import torch

    from mmdit.checkpoint import load_mmdit
    from mmdit.config import Settings
    from mmdit.eval.geneval import generate, score
    from mmdit.pipeline import SD3Pipeline
    from mmdit.toy.detector import ToyDetector
    from mmdit.toy.world import evaluation_prompts

    prompts = outdir.with_name("toy_geneval.jsonl")   # the same prompts as data/toy_geneval.jsonl (tested)
    prompts.parent.mkdir(parents=True, exist_ok=True)
    prompts.write_text("".join(json.dumps(p) + "\n" for p in evaluation_prompts()))
    pipe = SD3Pipeline.load(components, no_t5=no_t5, device=device)
    pipe.transformer = load_mmdit(weights, dtype=torch.float32).eval().to(device)
    depth = pipe.transformer.config.depth   # recommended blocks a shallower model lacks are left out, as in an export
    recommended = sampling_defaults(components, cfg_otherwise=TOY_CFG, depth=depth)
    settings = Settings(steps=steps, cfg=recommended["cfg"] if cfg is None else cfg,
                        shift=pipe.shift if shift is None else shift, width=pipe.default_side,
                        height=pipe.default_side, slg_scale=recommended["slg_scale"],
                        slg_layers=recommended["slg_layers"] if slg_layers is None else slg_layers)
    pipe.check_skip_layers(settings.slg_layers)   # before any image is written
    record = made_with(weights, components, no_t5)
    # overwrite: images of these very weights and settings are kept (a rerun only scores again), others replaced
    generate(prompts, outdir, pipe, settings, samples_per_prompt=samples_per_prompt, seed=42, batch_size=32,
             record=record, overwrite=True)
    results = score(outdir, ToyDetector(), outdir / "results.jsonl")
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    return {"shift": settings.shift, "slg_layers": list(settings.slg_layers), **attribute_scores(rows)}


def readings(image, detector) -> str:
    """What a picture shows, as the detector reads it: its clear objects (above GenEval's threshold) as "colour
    shape", sorted and joined by " + "; "nothing" when there is none."""
    from mmdit.eval.geneval import THRESHOLD

    objects = sorted(f"{d.color} {shape}" for shape, found in detector(image).items() for d in found
                     if d.score > THRESHOLD)
    return " + ".join(objects) or "nothing"


def drawn_table(results: list[dict], detector, only_held_out: bool = True, most_common: int = 3) -> str:
    """A markdown table: per prompt, its image accuracy and the readings of its images, most common first."""
    from PIL import Image

    by_prompt: dict[str, list[dict]] = {}
    for r in results:
        if not only_held_out or json.loads(r["metadata"]).get("held_out", False):
            by_prompt.setdefault(r["prompt"], []).append(r)
    lines = ["| prompt | correct | drawn (images) |", "|---|---|---|"]
    for prompt, rows in by_prompt.items():
        counts = Counter(readings(Image.open(r["filename"]), detector) for r in rows)
        drawn = "; ".join(f"{what} ({n})" for what, n in counts.most_common(most_common))
        meta = json.loads(rows[0]["metadata"])
        if meta.get("tag") == "position":
            asked, reversed_ = layout_counts(rows, meta)
            drawn += f"; layout as asked {asked}, reversed {reversed_}"
        lines.append(f"| {prompt} | {sum(r['correct'] for r in rows)}/{len(rows)} | {drawn} |")
    return "\n".join(lines)


def layout_counts(rows: list[dict], meta: dict) -> tuple[int, int]:
    """Of a position prompt's images that show both shapes, how many put them as asked and how many the other way
    round, by GenEval's own relation test (its dead zone included) on the most confident detection of each."""
    from mmdit.eval.detection import Detection
    from mmdit.eval.geneval import relative_position

    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    reference, placed = meta["include"][0]["class"], meta["include"][1]["class"]
    relation = meta["include"][1]["position"][0]
    asked = reversed_ = 0
    for r in rows:
        found = json.loads(r.get("details") or "{}")
        if reference in found and placed in found:
            relations = relative_position(Detection(tuple(found[placed][0][:4]), 1.0),
                                          Detection(tuple(found[reference][0][:4]), 1.0))
            asked, reversed_ = asked + (relation in relations), reversed_ + (opposite[relation] in relations)
    return asked, reversed_


def made_with(weights, components, no_t5: bool) -> dict:
    """What a toy GenEval image depends on, beyond the sampling settings: the MM-DiT's weights and every component's
    (the same MM-DiT with another VAE or other towers draws other images, so its kept images must not be reused)."""
    from mmdit.loading import component_digests, weights_digest

    return {"weights": str(weights), "weights_sha256": weights_digest(weights), "t5": not no_t5,
            "components": component_digests(components, no_t5)}


def plot_curve(rows: list[dict], path: Path, width: int = 640, height: int = 400):
    """A line chart (PIL, no plotting library): overall score of seen and held-out prompts against samples seen."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 60, width - 20, 20, height - 50
    most = max(r["samples"] for r in rows) or 1
    draw.rectangle((left, top, right, bottom), outline="black")
    for tick in range(0, 11, 2):
        y = bottom - (bottom - top) * tick / 10
        draw.line((left - 4, y, left, y), fill="black")
        draw.text((left - 34, y - 6), f"{tick / 10:.1f}", fill="black")
    for k in range(5):
        x = left + (right - left) * k / 4
        draw.text((x - 20, bottom + 6), f"{most * k / 4 / 1e3:.0f}k", fill="black")
    draw.text(((left + right) // 2 - 60, bottom + 26), "samples seen", fill="black")
    for split, color in (("seen", (30, 90, 200)), ("held_out", (220, 60, 30))):
        points = [(left + (right - left) * r["samples"] / most, bottom - (bottom - top) * r[split]["overall"])
                  for r in rows]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for x, y in points:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=color)
        draw.text((right - 150, top + (10 if split == "seen" else 26)), f"{split} overall", fill=color)
    image.save(path)


def curve_table(rows: list[dict]) -> str:
    attributes = list(TASKS_BY_ATTRIBUTE)
    lines = ["| step | samples | split | overall | " + " | ".join(attributes) + " |",
             "|---|---|---|---|" + "---|" * len(attributes)]
    for r in rows:
        for split in ("seen", "held_out"):
            s = r[split]
            cells = " | ".join("-" if s[a] is None else f"{s[a]:.3f}" for a in attributes)
            lines.append(f"| {r['step']} | {r['samples']} | {split} | {s['overall']:.3f} | {cells} |")
    return "\n".join(lines)


def run_targets(prog: str, run: Path, args) -> tuple[Path, Path, int, list[tuple[int, Path]]]:
    """A training run's components (train.sample_model), eval folder, samples per step, and the (step, EMA
    weights) to score: its checkpoints (all, or those of --steps) and its export."""
    recipe = json.loads((run / "config.json").read_text())
    if not (Path(recipe["train"]["sample_model"] or "") / "model_index.json").is_file():
        fail(prog, f"{run}'s train.sample_model {recipe['train']['sample_model']!r} is no pipeline directory: the "
                   f"components to sample with")
    components = Path(recipe["train"]["sample_model"] or "")
    world_size = json.loads((run / "run.json").read_text())["world_size"] if (run / "run.json").is_file() else 1
    batch = recipe["data"]["batch_size"] * recipe["optim"]["grad_accum"] * world_size   # samples per step
    targets = [] if args.only_export else [(int(c.name.split("_")[1]), c / "ema.safetensors")
                                           for c in sorted((run / "checkpoints").glob("step_*"))]
    targets = [(step, w) for step, w in targets if args.steps is None or step in args.steps]
    if (run / "export" / "ema.safetensors").is_file():
        targets.append((recipe["train"]["steps"], run / "export" / "ema.safetensors"))
    if not targets:
        fail(prog, f"{run} has no checkpoint or export to score (steps asked: {args.steps})")
    return components, Path(args.out) if args.out else run / "eval", batch, targets


def main(argv=None):
    p = Parser(prog="python3 -m mmdit.toy.evaluate", description=__doc__)
    p.add_argument("run", help="a training run's folder (train.out_dir), or a toy pipeline directory (its own MM-DiT "
                   "in its own components; give --out)")
    p.add_argument("--out", default=None, help="where the images and tables go (default: RUN/eval; a pipeline "
                   "needs one)")
    p.add_argument("--samples-per-prompt", type=int, default=16, help="images per prompt")
    p.add_argument("--no-t5", action="store_true", help="sample without T5, as sample.py --no-t5")
    p.add_argument("--only-export", action="store_true", help="score export/ema.safetensors only")
    p.add_argument("--steps", type=int, nargs="*", default=None, help="only the checkpoints of these steps (and "
                   "the export; default: every checkpoint)")
    p.add_argument("--cfg", type=float, default=None, help=f"guidance scale, 0 to {MAX_GUIDANCE} (default: the "
                   f"components' own, {TOY_CFG:g} for the toy pipelines); another one writes its own files, e.g. "
                   f"eval/curve_t5_cfg3.md")
    p.add_argument("--slg-layers", type=int, nargs="*", default=None, help="skip-layer guidance blocks; the flag "
                   "alone turns it off (default: the components' own); others write their own files, e.g. "
                   "eval/curve_t5_slg2-3.md, eval/curve_t5_noslg.md")
    p.add_argument("--shift", type=float, default=None, help=f"sampling shift, in (0, {MAX_SHIFT}] (default: the "
                   "pipeline's scheduler shift); another one writes its own files, e.g. eval/curve_t5_shift3.md")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps, xpu or xpu:N (default: cuda when "
                   "present, else cpu); fp32 on any")
    args = p.parse_args(argv)
    run = Path(args.run)
    if args.device is not None and not re.fullmatch(DEVICE_PATTERN, args.device):
        fail(p.prog, f"unknown --device {args.device!r}; accepted: cpu, cuda, cuda:N, mps, xpu, xpu:N")
    if args.samples_per_prompt < 1:
        fail(p.prog, f"--samples-per-prompt must be >= 1, got {args.samples_per_prompt}")
    if args.cfg is not None and not (math.isfinite(args.cfg) and 0 <= args.cfg <= MAX_GUIDANCE):
        fail(p.prog, f"--cfg must be a finite number in [0, {MAX_GUIDANCE}], got {args.cfg}")
    if args.shift is not None and not (math.isfinite(args.shift) and 0 < args.shift <= MAX_SHIFT):
        fail(p.prog, f"--shift must be a finite number in (0, {MAX_SHIFT}], got {args.shift}")
    if args.slg_layers is not None and not all(i >= 0 for i in args.slg_layers):
        fail(p.prog, f"--slg-layers must be block indices >= 0, got {args.slg_layers}")
    if (run / "model_index.json").is_file():   # a pipeline: one model, no checkpoints, no steps
        if args.out is None:
            fail(p.prog, f"{run} is a pipeline: give --out DIR for its images and tables (none go inside it)")
        components, out, batch = run, Path(args.out), 0
        targets = [(0, run / "transformer")]
    elif (run / "config.json").is_file():
        components, out, batch, targets = run_targets(p.prog, run, args)
    else:
        fail(p.prog, f"{run} is neither a training run (config.json) nor a pipeline (model_index.json)")
    try:   # sample.py's device rules (cuda when present), always in fp32 so that scores compare across devices
        device = str(device_and_dtype(argparse.Namespace(device=args.device, dtype="fp32"))[0])
    except ValueError as e:
        fail(p.prog, str(e))
    try:
        recommended = sampling_defaults(components, cfg_otherwise=TOY_CFG)
    except UsageError as e:
        fail(p.prog, str(e))
    rows, seen_steps = [], set()
    cfg = recommended["cfg"] if args.cfg is None else args.cfg
    layers = recommended["slg_layers"] if args.slg_layers is None else args.slg_layers
    tag = (("no_t5" if args.no_t5 else "t5") + ("" if cfg == recommended["cfg"] else f"_cfg{cfg:g}")
           + ("" if args.shift is None else f"_shift{args.shift:g}")
           + ("" if layers == recommended["slg_layers"] else
              f"_slg{'-'.join(map(str, layers))}" if layers else "_noslg"))
    for step, weights in targets:
        if step in seen_steps:
            continue
        seen_steps.add(step)
        try:
            scores = score_weights(weights, components, out / f"{tag}_step_{step:08d}",
                                   args.samples_per_prompt, args.no_t5, cfg=cfg, device=device, shift=args.shift,
                                   slg_layers=args.slg_layers)
        except (ValueError, OSError) as e:   # a corrupt checkpoint, a model the components do not fit
            fail(p.prog, f"{weights}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        rows.append({"step": step, "samples": step * batch, "cfg": cfg, **scores})
        print(json.dumps(rows[-1]), file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"curve_{tag}.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / f"curve_{tag}.md").write_text(curve_table(rows) + "\n")
    plot_curve(rows, out / f"curve_{tag}.png")
    from mmdit.toy.detector import ToyDetector

    last = out / f"{tag}_step_{rows[-1]['step']:08d}" / "results.jsonl"
    results = [json.loads(line) for line in last.read_text().splitlines()]
    (out / f"drawn_{tag}.md").write_text(drawn_table(results, ToyDetector()) + "\n")
    print(curve_table(rows))


if __name__ == "__main__":
    main()
