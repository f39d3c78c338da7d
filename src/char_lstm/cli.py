"""What the command-line scripts share: parse one dataclass of arguments, run, turn bad input into one line."""

import logging
import sys
from collections.abc import Callable

from transformers import HfArgumentParser

from .data import quiet_progress_bars


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


def run_command(arguments_class: type, run: Callable, argv: list[str] | None = None) -> int:
    """Parse `arguments_class` from `argv` (default: the command line), call `run(args)`; a ValueError or OSError
    (bad input, missing files) prints `error: ...` on stderr and gives exit code 2."""
    console_logging()
    (args,) = HfArgumentParser(arguments_class).parse_args_into_dataclasses(args=argv)
    try:
        with quiet_progress_bars():  # no bars for loading a small model or a one-row dataset
            run(args)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
