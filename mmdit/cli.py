"""What every command line of mmdit shares: one-line errors with exit status 2, and quiet library loading.

Entry points raise UsageError for input they refuse (before any work or write) and call `fail` with it; the
argument parser reports its own errors the same way, in one line, instead of argparse's usage block.
"""

from __future__ import annotations

import argparse
import sys


class UsageError(ValueError):
    """Input the command refuses: the message says what was wrong and what is accepted, in one line."""


def fail(prog: str, message: str):
    """Print `prog: error: message` (its first line) to stderr and exit with status 2."""
    lines = str(message).splitlines()
    print(f"{prog}: error: {lines[0] if lines else 'failed'}", file=sys.stderr)
    sys.exit(2)


def one_line(error: BaseException) -> str:
    """An exception as a one-line message: its first line, or its type when it says nothing."""
    return str(error).splitlines()[0] if str(error) else type(error).__name__


class Parser(argparse.ArgumentParser):
    """argparse with defaults shown in --help and errors in one line (`prog: error: ... (see --help)`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        fail(self.prog, f"{message} (see --help)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default after its help."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, argparse.SUPPRESS, [], ""):
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            text += " (default: %(default)s)"
        return text


def quiet_libraries():
    """Hide transformers' and diffusers' per-file loading bars: our own progress bar says where a run is, and
    theirs would bury an error. Their warnings stay."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
