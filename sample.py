"""Text to image with an SD3 / SD3.5 model: python3 sample.py --prompt "..." --model PATH --out image.png

The i-th image written (prompt by prompt, num-images each) is drawn from seed + i, so any image can be made again
alone; with batch size 1 the first image equals StableDiffusion3Pipeline's for the same seed and settings.
Output: --out FILE.png for one image; for several, FILE-0000.png, FILE-0001.png, ... beside it, or, when --out
is not a .png, DIR/00000.png, DIR/00001.png, ... Each PNG carries its prompt and settings in its metadata.
"""

import itertools
import os
from pathlib import Path

from mmdit import sampling_cli
from mmdit.cli import Parser, UsageError, fail, one_line

PROG = "sample.py"


def parse_args(argv=None):
    p = Parser(prog=PROG, description=__doc__)
    job = p.add_argument_group("job")
    job.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    job.add_argument("--prompts-file", help="a text file with one prompt per line")
    job.add_argument("--num-images", type=int, default=1, help="images per prompt")
    job.add_argument("--out", required=True, help="a .png file, or a directory for several images")
    sampling_cli.add_arguments(p, seed=0, batch_size=1)
    return p.parse_args(argv)


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            prompts += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
        except OSError as e:
            raise UsageError(f"cannot read --prompts-file {args.prompts_file}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise UsageError(f"--prompts-file {args.prompts_file} is not UTF-8 text") from None
    if not prompts:
        raise UsageError("no prompt: give --prompt TEXT or --prompts-file FILE")
    return prompts


def output_path(out: str, index: int, count: int) -> Path:
    """Image index of count: --out itself for one .png, else numbered (wide enough for count, in order)."""
    out = Path(out)
    if out.suffix.lower() == ".png":
        digits = max(4, len(str(count - 1)))
        return out if count == 1 else out.with_name(f"{out.stem}-{index:0{digits}d}.png")
    return out / f"{index:0{max(5, len(str(count - 1)))}d}.png"


def check_writable(path: Path):
    """Fail before any work if the images could not be written; create nothing."""
    if path.is_dir():
        raise UsageError(f"cannot write --out {path}: it is a directory (give a .png file, or a folder without .png)")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write --out {path}: {folder} is not a writable directory")


def main(argv=None):
    args = parse_args(argv)
    try:
        prompts = read_prompts(args)
        if args.num_images < 1:
            raise UsageError(f"--num-images must be >= 1, got {args.num_images}")
        count = len(prompts) * args.num_images
        sampling_cli.check_arguments(args, images=count)
        check_writable(output_path(args.out, 0, count))
        device, dtype = sampling_cli.device_and_dtype(args)
        pipe, settings = sampling_cli.load_pipeline(args, device, dtype)
    except UsageError as e:
        fail(PROG, str(e))

    from tqdm import tqdm

    from mmdit.images import save_png

    record = sampling_cli.run_record(args, pipe, settings, dtype)
    # Jobs are made as they are needed: a run of a billion images starts at once and stops cleanly when cut.
    jobs = enumerate(p for p in prompts for _ in range(args.num_images))
    for batch in iter(lambda: list(itertools.islice(jobs, args.batch_size)), []):
        first, last = batch[0][0] + 1, batch[-1][0] + 1
        bar = lambda steps: tqdm(steps, desc=f"images {first}-{last} of {count}", leave=False)
        try:
            images = pipe.generate([p for _, p in batch], [args.seed + i for i, _ in batch], settings, progress=bar)
        except (ValueError, RuntimeError) as e:  # e.g. out of memory: the images already written stay whole
            fail(PROG, f"generation failed: {one_line(e)}")
        for (i, prompt), image in zip(batch, images):
            path = output_path(args.out, i, count)
            save_png(image, path, {"prompt": prompt, "seed": args.seed + i, **record})
            print(path)


if __name__ == "__main__":
    main()
