"""The GenEval command line: `python3 -m mmdit.eval.geneval generate | score | summary` (or `-m mmdit.eval`).

    generate  images in GenEval's folder layout, with sample.py's flags (mmdit.sampling_cli)
    score     judge a generated folder (Mask2Former and CLIP colours, the toy detector, or the official evaluator)
    summary   per-task and overall scores of a results.jsonl

Under `accelerate launch` (RANK, WORLD_SIZE, LOCAL_RANK) each process generates or scores every world_size-th
prompt or image.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from mmdit import sampling_cli
from mmdit.cli import Parser, UsageError, fail, one_line
from mmdit.eval.geneval import TASKS, generate, read_layout, read_metadata, score, summarize

PROG = "python3 -m mmdit.eval.geneval"


def parse_args(argv=None):
    p = Parser(prog=PROG, description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="images in GenEval's folder layout", description="Images in GenEval's "
                       "folder layout: OUTDIR/NNNNN/metadata.jsonl and OUTDIR/NNNNN/samples/NNNN.png; image j of "
                       "prompt i is drawn from seed + i * samples_per_prompt + j.")
    job = g.add_argument_group("job")
    job.add_argument("--metadata", required=True, help="GenEval's evaluation_metadata.jsonl (or the toy world's)")
    job.add_argument("--outdir", required=True, help="the output folder")
    job.add_argument("--samples-per-prompt", type=int, default=4, help="images per prompt")
    job.add_argument("--overwrite", action="store_true", help="replace a run with other settings in --outdir")
    job.add_argument("--grid", action="store_true", help="also OUTDIR/NNNNN/grid.png: each prompt's samples in a row")
    sampling_cli.add_arguments(g, seed=42, batch_size=4)
    c = sub.add_parser("score", help="judge a generated folder; writes results.jsonl in GenEval's format")
    c.add_argument("outdir", help="a folder in GenEval's layout (what `generate` writes)")
    c.add_argument("--outfile", help="default: OUTDIR/results.jsonl")
    c.add_argument("--detector", choices=("mask2former", "toy"), default="mask2former", help="what finds objects")
    c.add_argument("--detector-model", default=None, help="Mask2Former in transformers' layout (folder or hub id; "
                   "default facebook/mask2former-swin-small-coco-instance)")
    c.add_argument("--clip-model", default="ViT-L-14", help="open_clip model name for colours")
    c.add_argument("--clip-pretrained", default="openai", help="open_clip weights: a tag or a file")
    c.add_argument("--official", metavar="PATH", help="score with the official evaluator: a djghosh13/geneval "
                   "checkout, run with --official-python (an environment with mmdet)")
    c.add_argument("--official-python", default=sys.executable, help="the Python that runs the official evaluator")
    c.add_argument("--official-model-path", default=None, help="the evaluator's --model-path (default PATH/models)")
    s = sub.add_parser("summary", help="per-task and overall scores of a results.jsonl")
    s.add_argument("results", help="a results.jsonl (what `score` writes)")
    s.add_argument("--json", help="also write the summary here")
    s.add_argument("--only", choices=("held_out", "seen"), help="prompts whose metadata marks them held out of "
                   "training (\"held_out\": true, as the toy prompt file does), or the others")
    return p.parse_args(argv)


def print_summary(summary: dict):
    print(f"images {summary['images']}, prompts {summary['prompts']}: {summary['correct_images']:.2%} of images "
          f"and {summary['correct_prompts']:.2%} of prompts correct")
    for tag in [t for t in TASKS if t in summary["tasks"]] + [t for t in summary["tasks"] if t not in TASKS]:
        print(f"  {tag:<14s} {summary['tasks'][tag]:.4f}")
    print(f"  {'overall':<14s} {summary['overall']:.4f}   (unweighted mean of the task accuracies)")


def run_summary(args):
    results = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line.strip()]
    if args.only:
        def held_out(r):
            meta = json.loads(r["metadata"]) if isinstance(r["metadata"], str) else r["metadata"]
            return bool(meta.get("held_out", False))

        results = [r for r in results if held_out(r) == (args.only == "held_out")]
        if not results:
            raise UsageError(f"no results in {args.results} are marked {args.only}")
    summary = summarize(results)
    print_summary(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


def run_score(args, rank: int, world_size: int):
    import torch

    # under accelerate launch each process has its own GPU (LOCAL_RANK)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    from mmdit.eval.detectors import MASK2FORMER_ID, ClipColors, Mask2FormerDetector, run_official

    outfile = Path(args.outfile or Path(args.outdir) / "results.jsonl")
    if not read_layout(args.outdir):
        raise UsageError(f"{args.outdir} holds no images in GenEval's layout (NNNNN/samples/NNNN.png)")
    if args.official:
        if rank == 0:
            run_official(args.outdir, outfile, args.official, args.official_python, args.official_model_path)
            print(f"official results in {outfile}")
        return
    if args.detector == "toy":
        from mmdit.toy.detector import ToyDetector

        detector, colors = ToyDetector(), None
    else:
        detector = Mask2FormerDetector(args.detector_model or MASK2FORMER_ID, device)
        colors = ClipColors.from_open_clip(args.clip_model, args.clip_pretrained, device)
    written = score(args.outdir, detector, outfile, colors, rank, world_size)
    if written:
        print_summary(summarize([json.loads(line) for line in written.read_text().splitlines()]))
        print(f"results in {written}")


def run_generate(args, rank: int, world_size: int):
    try:
        entries = read_metadata(args.metadata)   # a bad line stops here, before any model loads
    except OSError as e:
        raise UsageError(f"cannot read --metadata {args.metadata}: {e.strerror}") from None
    if args.samples_per_prompt < 1:
        raise UsageError(f"--samples-per-prompt must be >= 1, got {args.samples_per_prompt}")
    sampling_cli.check_arguments(args, images=len(entries) * args.samples_per_prompt)
    if Path(args.outdir).exists() and not Path(args.outdir).is_dir():
        raise UsageError(f"--outdir {args.outdir} exists and is not a folder")
    if args.device is None and world_size > 1:   # under accelerate launch each process has its own GPU
        import torch

        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else None
    device, dtype = sampling_cli.device_and_dtype(args)
    pipe, settings = sampling_cli.load_pipeline(args, device, dtype)

    from tqdm import tqdm

    from mmdit.loading import component_digests, resolve_model, weights_digest

    model = resolve_model(args.model, args.no_t5)
    record = {**sampling_cli.run_record(args, pipe, settings, dtype), "model_sha256": weights_digest(model),
              "components_sha256": component_digests(model, args.no_t5),
              "clip_g_sha256": weights_digest(args.clip_g) if args.clip_g else None}
    made = generate(args.metadata, args.outdir, pipe, settings, samples_per_prompt=args.samples_per_prompt,
                    seed=args.seed, batch_size=args.batch_size, record=record, rank=rank, world_size=world_size,
                    overwrite=args.overwrite, grid=args.grid,
                    progress=lambda total: tqdm(total=total, desc="images", unit="image", disable=rank != 0 or None))
    print(f"{made} images written to {args.outdir}")


def main(argv=None):
    args = parse_args(argv)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        if args.command == "summary":
            run_summary(args)
        elif args.command == "score":
            run_score(args, rank, world_size)
        else:
            run_generate(args, rank, world_size)
    except (ValueError, OSError) as e:   # UsageError, a bad metadata line, an unreadable file
        fail(PROG, one_line(e))


if __name__ == "__main__":
    main()
