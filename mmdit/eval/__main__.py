"""python3 -m mmdit.eval: the GenEval command line (mmdit.eval.cli), also run as python3 -m mmdit.eval.geneval."""

from mmdit.eval.cli import main

main()
