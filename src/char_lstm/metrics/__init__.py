"""The project's `evaluate` modules, loaded from their folders (no Hub access needed)."""

import importlib
import os
import sys


def _import_evaluate_library():
    """`import evaluate`, the library. `scripts/evaluate.py` has the same name, and when a script of `scripts/` runs,
    that folder comes first on sys.path: leave such folders out while importing."""
    shadowing = [p for p in sys.path if os.path.isfile(os.path.join(p or os.getcwd(), "evaluate.py"))]
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if p not in shadowing]
    try:
        return importlib.import_module("evaluate")
    finally:
        sys.path[:] = saved


BITS_PER_CHARACTER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bits_per_character")


def load_bits_per_character():
    """`evaluate.load` of the bits_per_character module shipped with char_lstm. Kept in memory: no cache files, so
    several training processes can use it at once without locking each other. `evaluate` is imported here, not with
    the package: it pulls in pandas and scipy, a few seconds of every script's start-up."""
    return _import_evaluate_library().load(BITS_PER_CHARACTER, keep_in_memory=True)
