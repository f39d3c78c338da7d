#!/usr/bin/env python
"""Convert a plain-PyTorch char LSTM checkpoint (the course's plain PyTorch track) into a CharLSTM model folder.

    python scripts/convert_pytorch_checkpoint.py --checkpoint model.pt --chars chars.json --output_dir converted
    python scripts/convert_pytorch_checkpoint.py --checkpoint model.pt --chars shakespeare.txt --output_dir converted \
        --dropout 0.5

--chars is a JSON list of the characters, or the training text (its sorted set of characters is the vocabulary,
as that code builds it). The checkpoint is loaded with torch.load(weights_only=True).
"""

import sys

from char_lstm.cli import run_command
from char_lstm.convert import ConvertArguments, run_convert


if __name__ == "__main__":
    sys.exit(run_command(ConvertArguments, run_convert))
