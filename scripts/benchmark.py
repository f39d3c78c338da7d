#!/usr/bin/env python
"""Benchmarks of char_lstm against the seed's Track B code and the bare kernels: a table on stdout, JSON on disk.

    python scripts/benchmark.py --corpus ../shared/data/tinyshakespeare.txt     # a few minutes
    python scripts/benchmark.py --quick                                         # about a minute, generated text
    python scripts/benchmark.py --sections training,decode --device cuda        # some sections, on a GPU

Sections: training (Trainer vs the seed's loop vs bare nn.LSTM, chars/s), decode (generate() at batch 1 vs the seed's
loop; 100 vs 2000 new characters), batch (generation at batch 64), encoding (MB/s), memory (peak RSS preparing a
100 MB corpus). The work is done by `char_lstm.benchmark`.
"""

import sys

from char_lstm.benchmark import BenchmarkArguments, run
from char_lstm.cli import run_command


if __name__ == "__main__":
    sys.exit(run_command(BenchmarkArguments, run))
