"""What the command-line scripts share: parse one dataclass of arguments, run, turn bad input into one line."""

import sys
from collections.abc import Callable

from transformers import HfArgumentParser


def run_command(arguments_class: type, run: Callable, argv: list[str] | None = None) -> int:
    """Parse `arguments_class` from `argv` (default: the command line), call `run(args)`; a ValueError or OSError
    (bad input, missing files) prints `error: ...` on stderr and gives exit code 2."""
    (args,) = HfArgumentParser(arguments_class).parse_args_into_dataclasses(args=argv)
    try:
        run(args)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
