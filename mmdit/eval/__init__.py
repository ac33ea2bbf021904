"""Evaluation: GenEval-compatible judging and summaries (mmdit.eval.geneval)."""
