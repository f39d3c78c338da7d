#!/usr/bin/env python
"""Runs benchmarks/benchmark.py (the benchmarks live outside the library, in benchmarks/): same flags, same output.

    python scripts/benchmark.py --quick      # the same as: python benchmarks/benchmark.py --quick
"""

import runpy
import sys
from pathlib import Path


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

if __name__ == "__main__":
    sys.path.insert(0, str(BENCHMARKS))  # as running benchmarks/benchmark.py itself would (its reference_loop.py)
    runpy.run_path(str(BENCHMARKS / "benchmark.py"), run_name="__main__")
