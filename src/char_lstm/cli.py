"""What the command-line scripts share: parse one dataclass of arguments, run, turn bad input into one line."""

import logging
import sys
from collections.abc import Callable

from transformers import HfArgumentParser

from .data import quiet_progress_bars
from .errors import UsageError


def console_logging(level: int = logging.INFO) -> None:
    """char_lstm's log lines (its few info lines: bundled data, files used; its warnings) on stderr as
    `LEVEL name: message`, from `level` up. The handler goes on char_lstm's logger only: the libraries have their own
    handlers, and one on the root logger would print their warnings a second time."""
    logger = logging.getLogger("char_lstm")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)


def parse_command_line(parser: HfArgumentParser, argv: list[str] | None = None) -> tuple:
    """The dataclasses of `parser` from `argv`; an argument that is not a flag (a typo, an abbreviation: prefix
    matching is off, so --learning_rat is not --learning_rate) is a one-line UsageError."""
    *dataclasses, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if remaining:
        raise UsageError(f"Unknown argument(s) {' '.join(remaining)}: write flags in full, without abbreviation "
                         f"({parser.prog} --help lists them).")
    return tuple(dataclasses)


def run_command(arguments_class: type, run: Callable, argv: list[str] | None = None) -> int:
    """Parse `arguments_class` from `argv` (default: the command line; flags spelled out, no prefix matching), call
    `run(args)`; a UsageError or DataError (bad arguments, bad data), another ValueError (a library's check of a
    value) or an OSError (missing files) prints `error: ...` on stderr and gives exit code 2."""
    console_logging()
    try:
        (args,) = parse_command_line(HfArgumentParser(arguments_class, allow_abbrev=False), argv)
        with quiet_progress_bars():  # no bars for loading a small model or a one-row dataset
            run(args)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
