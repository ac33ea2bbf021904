"""Make the toy world (mmdit/toy/): its image-caption data, its SD3 components, its GenEval prompts.

    python3 data/make_toy.py world --out runs/toy/world        # images + components, trained once (minutes)
    python3 data/make_toy.py world --out runs/toy/world --components bundled   # images; the shipped components
    python3 data/make_toy.py prompts --out data/toy_geneval.jsonl
    python3 data/make_toy.py bundle runs/toy/export/pipeline   # the trained pipeline -> the bundled default model
    python3 data/make_toy.py decoder mmdit/toy_pipeline --images runs/toy/world/images/train   # the VAE decoder's
                                                               # second phase on a built pipeline; latents stay
    python3 data/make_toy.py align mmdit/toy_pipeline --images runs/toy/world/images/train     # the alignment
                                                               # encoder (REPA's targets) of a built pipeline

`world` writes OUT/images/train/NNNNN.tar and OUT/images/val/NNNNN.tar (KEY.png, KEY.txt, KEY.json, as
img2dataset writes them, so data/precompute.py reads them like real data) and OUT/pipeline, a diffusers SD3
pipeline directory: a 16-channel VAE trained on the training images, CLIP-L / CLIP-G / T5 towers trained against
them (contrastively, with near-miss captions as negatives) with the real CLIP tokenizer and a SentencePiece
tokenizer trained on the captions, an alignment encoder on the latents against those towers (REPA's targets,
OUT/pipeline/align_encoder, which diffusers ignores), and an untrained MM-DiT. The bundled model ships those components, and toy
recipes reuse them (--components bundled) as SD3 users reuse Stability's VAE and encoders. Everything is a
function of --seed; finished parts are kept when rerun.
"""

import json
import os
import shutil
import sys
from pathlib import Path

from mmdit.cli import Parser, fail
from mmdit.toy import BUNDLED_MODEL as BUNDLED

PROG = "make_toy.py"
# Steps on a built toy pipeline: (the check of their flags and inputs, before any work: ValueError, which becomes one
# line and exit 2; the step itself), named in mmdit.toy.prepare.
PIPELINE_STEPS = {"decoder": ("check_decoder_arguments", "mend_pipeline_decoder"),
                  "align": ("check_align_arguments", "train_pipeline_align_encoder")}


def parse_args(argv=None):
    p = Parser(prog=PROG, description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    from mmdit.toy.prepare import add_align_arguments, add_decoder_arguments, add_world_arguments

    add_world_arguments(sub.add_parser("world", help="toy images and the toy pipeline's components"))
    q = sub.add_parser("prompts", help="the toy GenEval prompt file (held-out prompts marked)")
    q.add_argument("--out", required=True, help="the JSONL file to write")
    add_decoder_arguments(sub.add_parser("decoder", help="the VAE decoder's second phase on a toy pipeline"))
    add_align_arguments(sub.add_parser("align", help="the alignment encoder (REPA's targets) of a toy pipeline"))
    b = sub.add_parser("bundle", help="copy a trained toy pipeline, in float16 (its alignment encoder as it is), "
                                       "to the bundled default model")
    b.add_argument("pipeline", help="a trained toy pipeline (train.py's runs/toy/export/pipeline)")
    b.add_argument("--to", default=str(BUNDLED), help="where the bundle goes")
    return p.parse_args(argv)


def bundle(args):
    """float16 copy of every weight file (the toy's results do not change: tested) but the alignment encoder's,
    other files as they are (the CLIP tokenizers are already vocab.json + merges.txt: save_toy_pipeline stores them
    so). The alignment encoder is the recipe's training target, not part of what samples: it is kept as it is, so a
    new bundle leaves the recipe's targets, and what it was measured with, unchanged."""
    from safetensors.torch import load_file, save_file

    from mmdit.toy.components import ALIGN_ENCODER

    source, target = Path(args.pipeline), Path(args.to)
    if not (source / "model_index.json").is_file():
        fail(PROG, f"{source} is not a diffusers pipeline directory (no model_index.json)")
    from mmdit.config import SAMPLING_DEFAULTS_FILE

    if not (source / SAMPLING_DEFAULTS_FILE).is_file():   # without it the default model would sample at SD3's CFG
        fail(PROG, f"{source} has no {SAMPLING_DEFAULTS_FILE} (the toy's sampling defaults; every toy pipeline "
                   f"carries one: copy it from {BUNDLED})")
    if not (source / ALIGN_ENCODER).is_dir():   # without it `python3 train.py` (align.encoder) could not start
        fail(PROG, f"{source} has no {ALIGN_ENCODER}/ (the recipe's alignment targets; a pipeline built before "
                   f"they existed lacks it: copy it from {BUNDLED})")
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    for f in tmp.rglob("*.safetensors"):
        if f.parent.name == ALIGN_ENCODER:
            continue
        state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(f).items()}
        save_file(state, f, metadata={"format": "pt"})
    for f in tmp.rglob("config.json"):   # the libraries record the dtype they saved in; keep it truthful
        config = json.loads(f.read_text())
        recorded = [k for k in ("torch_dtype", "dtype") if k in config]
        for key in recorded:
            config[key] = "float16"
        if recorded:
            f.write_text(json.dumps(config, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    print(f"bundled {source} -> {target} ({size / 2**20:.1f} MiB, float16)", file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    if args.command == "world":
        from mmdit.toy.prepare import build_world, check_world_arguments

        try:
            check_world_arguments(args)
            build_world(args)
        except ValueError as e:   # bad flags, or images of an earlier world in --out
            fail(PROG, str(e))
    elif args.command == "prompts":
        from mmdit.toy.world import evaluation_prompts

        prompts = evaluation_prompts()
        Path(args.out).write_text("".join(json.dumps(p) + "\n" for p in prompts))
        print(f"{len(prompts)} prompts -> {args.out}", file=sys.stderr)
    elif args.command in PIPELINE_STEPS:
        from mmdit.toy import prepare

        check, run = (getattr(prepare, name) for name in PIPELINE_STEPS[args.command])
        try:
            checked = check(args)
        except ValueError as e:
            fail(PROG, str(e))
        run(args, *checked)
    else:
        bundle(args)


if __name__ == "__main__":
    main()
