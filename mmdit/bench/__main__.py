"""python -m mmdit.bench WHAT [options]: each benchmark prints what it compared and the ratios."""

import argparse

from mmdit.bench import data, lora, model, sample, train


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mmdit.bench", description=__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    model.add_arguments(sub.add_parser("model", help=model.__doc__.splitlines()[0]))
    sample.add_arguments(sub.add_parser("sample", help=sample.__doc__.splitlines()[0]))
    data.add_arguments(sub.add_parser("data", help=data.__doc__.splitlines()[0]))
    train.add_arguments(sub.add_parser("train", help=train.__doc__.splitlines()[0]))
    lora.add_arguments(sub.add_parser("lora", help=lora.__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
