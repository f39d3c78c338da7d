#!/usr/bin/env python
"""Export a trained char_lstm model with transformers' exporters, and check the exported programs against generate().

    python scripts/export.py --model_name_or_path outputs/shakespeare --format dynamo --output_dir outputs/sh-pt2
    python scripts/export.py --model_name_or_path outputs/shakespeare --format onnx --output_dir outputs/sh-onnx
    python scripts/export.py --model_name_or_path outputs/shakespeare --format executorch --output_dir outputs/sh-pte

Writes a prefill and a decode program (torch.export .pt2, ONNX, ExecuTorch .pte), config.json and the tokenizer, then
generates greedily through the written files and compares with model.generate(do_sample=False). docs/export.md.
"""

import sys

from char_lstm.cli import run_command
from char_lstm.export_command import ExportArguments, run_export


if __name__ == "__main__":
    sys.exit(run_command(ExportArguments, run_export, compute=True))
