#!/usr/bin/env python
"""Measure a trained char_lstm model on a text: loss (nats/char), bits per character, perplexity.

    python scripts/evaluate.py --model_name_or_path outputs/shakespeare --validation_file held_out.txt
    python scripts/evaluate.py --model_name_or_path outputs/shakespeare --dataset_name karpathy/tiny_shakespeare \
        --split test
    python scripts/evaluate.py --model_name_or_path outputs/shakespeare \
        --dataset_name ../shared/datasets/tiny_shakespeare --block_size 64

Two modes are reported: `fixed` (windows of --block_size from a zero state, comparable with any model) and
`streaming` (the whole text in one pass, the recurrent state carried across windows). Results go to --output_json.
"""

import sys

from char_lstm.cli import run_command
from char_lstm.evaluation import EvaluateArguments, run_evaluate


if __name__ == "__main__":
    sys.exit(run_command(EvaluateArguments, run_evaluate, compute=True))
