#!/usr/bin/env python
"""Train a character-level LSTM language model.

    accelerate launch scripts/train.py                                   # tiny_shakespeare from the Hub
    accelerate launch scripts/train.py --train_file my_text.txt --preset cpu-small
    python scripts/train.py config.json                                  # the same arguments from a JSON/YAML file
    python scripts/train.py --help                                       # every option

The work is done by `char_lstm.training.train`. Ctrl-C / SIGTERM stop it with one line and exit code 130 / 143.
"""

import signal
import sys


# While the libraries load (seconds), Ctrl-C / SIGTERM end the process quietly: nothing has been written yet.
signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(130))
signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))

import logging  # noqa: E402
import os  # noqa: E402

import torch  # noqa: E402

from char_lstm.cli import console_logging  # noqa: E402
from char_lstm.errors import UsageError  # noqa: E402
from char_lstm.training import (  # noqa: E402
    STOP_SIGNALS,
    ReportedByMainProcess,
    TrainingDiverged,
    TrainingOutOfMemory,
    close_progress_bars,
    ignore_stop_signals,
    interrupted_message,
    keep_freed_memory,
    lock_holder_gone,
    lost_peer,
    lost_peer_message,
    parse_arguments,
    prepare_launch_environment,
    received_stop_signal,
    stop_on_signals,
    stop_when_the_launcher_ends,
    train,
    training_console,
)


def main(argv: list[str] | None = None) -> int:
    console_logging()
    stop_on_signals()
    stop_when_the_launcher_ends()  # a launcher killed with SIGKILL: its processes stop as if it had sent SIGTERM
    output_dir = training_args = None
    parsing = True
    try:
        prepare_launch_environment()
        keep_freed_memory()  # a quarter faster CPU steps: no page faults for every step's fresh tensors
        model_args, data_args, training_args = parse_arguments(argv)
        parsing = False
        output_dir = training_args.output_dir
        # char_lstm's few info lines on the main process only (other processes: --log_level_replica, warning)
        console_logging(logging.INFO if training_args.should_log and training_args.log_level == "passive"
                        else training_args.get_process_log_level())
        with training_console():
            train(model_args, data_args, training_args)
        ignore_stop_signals()  # the run is over: a signal now is no stop
    except BaseException as error:
        ignore_stop_signals()  # what follows is said once, however many signals the launcher sends meanwhile
        signum = received_stop_signal()
        prompt = training_args.sample_prompt if training_args is not None else None  # set by train(): one it knows
        # Said once: by the main process, or by the others when the main one was killed (its lock is left behind),
        # on a line of their own (the main process's progress bar may have been cut mid-line)
        main_process = os.environ.get("RANK", "0") == "0"
        bars = training_args is not None and not training_args.disable_tqdm

        def say_once(message) -> None:  # message: a function giving the line, called only by the process that says it
            if main_process:
                print(message(), file=sys.stderr)
            elif output_dir and lock_holder_gone(output_dir):
                print(("\n" if bars else "") + message(), file=sys.stderr)

        if signum is not None:  # stopped by a signal; whatever was raised since is a consequence of it
            say_once(lambda: interrupted_message(signum, output_dir, prompt))
            return STOP_SIGNALS[signum][1]
        if isinstance(error, ReportedByMainProcess):  # the main process prints it
            return 2
        reason = lost_peer(error)
        if reason is not None:  # another process was killed or crashed
            say_once(lambda: lost_peer_message(reason, output_dir, prompt))
            return 2
        # bad input (UsageError, DataError: ValueErrors, as the libraries' own), a missing file: one line, no traceback
        if isinstance(error, (UsageError, TrainingDiverged, TrainingOutOfMemory, ValueError, OSError)):
            # every process parses the same command line, so the first one alone says what is wrong with it
            if not parsing or main_process:
                close_progress_bars()
                print(f"error: {error}", file=sys.stderr)
            return 2
        raise
    finally:
        # leave a multi-process run cleanly (gloo aborts a process that exits with its group still open)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            try:
                torch.distributed.destroy_process_group()
            except Exception:  # a peer already gone (stopped by a signal)
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
