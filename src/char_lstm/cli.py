"""What the command-line scripts share: parse one dataclass of arguments, run, turn bad input into one line."""

import difflib
import logging
import os
import sys
import time
from collections.abc import Callable

import torch
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
    matching is off, so --learning_rat is not --learning_rate) is a one-line UsageError, naming the closest flags."""
    for word in sys.argv[1:] if argv is None else argv:  # before parsing: the dataclasses' checks run in it
        removed = removed_in_v5(word.split("=", 1)[0], parser)
        if removed:
            raise UsageError(f"{word.split('=', 1)[0]} is {removed}.")
    *dataclasses, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if remaining:
        raise UsageError(f"Unknown argument(s) {' '.join(remaining)}{_did_you_mean(parser, remaining)}: write flags "
                         f"in full, without abbreviation ({parser.prog} --help lists them).")
    return tuple(dataclasses)


# TrainingArguments flags that transformers v5 removed (v4 scripts and tutorials still pass them): what to do instead.
_REMOVED_IN_V5 = {
    "--save_safetensors": "removed in transformers v5, which always saves safetensors: drop it",
    "--evaluation_strategy": "renamed --eval_strategy in transformers v5",
    "--no_cuda": "renamed --use_cpu in transformers v5",
    "--per_gpu_train_batch_size": "renamed --per_device_train_batch_size in transformers v5",
    "--per_gpu_eval_batch_size": "renamed --per_device_eval_batch_size in transformers v5",
    "--push_to_hub_model_id": "renamed --hub_model_id in transformers v5",
    "--push_to_hub_token": "renamed --hub_token in transformers v5",
}


def removed_in_v5(flag: str, parser) -> str | None:
    """What to do instead of `flag`, a TrainingArguments flag transformers v5 removed, when `parser` parses
    TrainingArguments and has no such flag of its own; else None."""
    actions = parser._option_string_actions
    if flag in _REMOVED_IN_V5 and flag not in actions and "--per_device_train_batch_size" in actions:
        return _REMOVED_IN_V5[flag]
    return None


def _did_you_mean(parser, remaining: list[str]) -> str:
    """" (did you mean --learning_rate?)" for the unknown flags of `remaining` that resemble the parser's own flags
    (difflib's closest match, and any as close; each flag once, by its first name, not its --dashed-alias); "" when
    none does."""
    flags = [next((o for o in action.option_strings if o.startswith("--")), None) for action in parser._actions]
    flags = [flag for flag in flags if flag]
    guesses = {}
    for word in remaining:
        name = word.split("=", 1)[0]
        if not name.startswith("--") or name in guesses:
            continue
        scored = sorted(((difflib.SequenceMatcher(None, name, flag).ratio(), flag) for flag in flags), reverse=True)
        close = [flag for score, flag in scored if score >= max(0.6, scored[0][0] - 0.05)] if scored else []
        if close:
            guesses[name] = " or ".join(close[:3])
    if not guesses:
        return ""
    if len(guesses) == 1:
        return f" (did you mean {next(iter(guesses.values()))}?)"
    return " (did you mean " + ", ".join(f"{guess} for {name}" for name, guess in guesses.items()) + "?)"


def busy_cores(interval: float = 0.1) -> float | None:
    """How many of this process's cores other processes kept busy over the next `interval` seconds (this one sleeps
    meanwhile), from the kernel's per-CPU counters; None where they cannot be read (not Linux)."""
    try:
        cpus = {f"cpu{index}" for index in os.sched_getaffinity(0)}

        def counters() -> tuple[int, int]:
            total = idle = 0
            with open("/proc/stat", encoding="ascii") as f:
                for line in f:
                    name, *values = line.split()
                    if name in cpus:
                        ticks = [int(value) for value in values[:8]]  # user nice system idle iowait irq softirq steal
                        total, idle = total + sum(ticks), idle + ticks[3] + ticks[4]
            return total, idle

        total0, idle0 = counters()
        time.sleep(interval)
        total1, idle1 = counters()
    except (AttributeError, OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return len(cpus) * (1 - (idle1 - idle0) / (total1 - total0))


def use_idle_cores() -> None:
    """Compute with as many threads as there are idle cores (at least 1; at most torch's default, one per core). A
    thread of torch's per core, with other work on some of the cores, waits at every product for the one that the
    scheduler has set aside: measured on 2 cores with one busy, a forward of 64x64 characters took 0.10-0.36 s with 2
    threads and 0.05 s with 1. OMP_NUM_THREADS, when set, is left as it is."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    busy = busy_cores()
    if busy is None:
        return
    threads = max(1, min(torch.get_num_threads(), round(len(os.sched_getaffinity(0)) - busy)))
    if threads < torch.get_num_threads():
        logging.getLogger("char_lstm").info(
            f"{busy:.1f} of {len(os.sched_getaffinity(0))} cores are busy with other work: computing with {threads} "
            f"thread{'s' if threads > 1 else ''} (OMP_NUM_THREADS sets the number).")
        torch.set_num_threads(threads)


def run_command(arguments_class: type, run: Callable, argv: list[str] | None = None, compute: bool = False) -> int:
    """Parse `arguments_class` from `argv` (default: the command line; flags spelled out, no prefix matching), call
    `run(args)`; a UsageError or DataError (bad arguments, bad data), another ValueError (a library's check of a
    value) or an OSError (missing files) prints `error: ...` on stderr and gives exit code 2. `compute`: the command
    computes on the CPU (generate, evaluate): it uses the idle cores (`use_idle_cores`)."""
    console_logging()
    try:
        (args,) = parse_command_line(HfArgumentParser(arguments_class, allow_abbrev=False), argv)
        if compute:
            use_idle_cores()
        with quiet_progress_bars():  # no bars for loading a small model or a one-row dataset
            run(args)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
