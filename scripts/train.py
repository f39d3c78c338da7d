#!/usr/bin/env python
"""Train a character-level LSTM language model.

    accelerate launch scripts/train.py                                   # tiny_shakespeare from the Hub
    accelerate launch scripts/train.py --train_file my_text.txt --preset cpu-small
    python scripts/train.py config.json                                  # the same arguments from a JSON/YAML file
    python scripts/train.py --help                                       # every option

The work is done by `char_lstm.training.train`.
"""

import logging
import sys

import torch

from char_lstm.data import DataError
from char_lstm.training import (
    TrainingDiverged,
    keep_freed_memory,
    parse_arguments,
    prepare_launch_environment,
    train,
    training_console,
)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        prepare_launch_environment()
        keep_freed_memory()  # a quarter faster CPU steps: no page faults for every step's fresh tensors
        model_args, data_args, training_args = parse_arguments(argv)
        logging.getLogger().setLevel(training_args.get_process_log_level())
        if training_args.should_log and training_args.log_level == "passive":  # char_lstm's few info lines: once
            logging.getLogger("char_lstm").setLevel(logging.INFO)
        with training_console():
            train(model_args, data_args, training_args)
    except (DataError, TrainingDiverged, ValueError, OSError) as error:  # bad input: one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        # leave a multi-process run cleanly (gloo aborts a process that exits with its group still open)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
