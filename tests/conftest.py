import atexit
import os
import shutil
import tempfile

import pytest


def own_share_of_the_cores():
    """Under pytest-xdist, each worker runs on its own share of the cores (and so does every process it starts: the
    affinity is inherited), and torch uses one thread per core of it. Without this, N workers each run torch with a
    thread per core of the machine: on 2 cores, 2 workers x 2 threads spend much of the suite's CPU time spinning in
    OpenMP's waits (a tiny training run took 33 s of CPU instead of 2)."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not worker or not count or not hasattr(os, "sched_setaffinity"):
        return
    cores, index, count = sorted(os.sched_getaffinity(0)), int(worker.removeprefix("gw")), int(count)
    share = max(1, len(cores) // count)
    start = (index * share) % len(cores)
    os.sched_setaffinity(0, cores[start : start + share])


own_share_of_the_cores()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# datasets' cache of the tests (and of the scripts they run) stays out of the user's cache, and goes when they end
if "HF_DATASETS_CACHE" not in os.environ:
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="char_lstm_datasets_cache_")
    atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)

from char_lstm import CharLSTMTokenizer  # noqa: E402
from char_lstm.cells_char_lstm import CELL_TYPES  # noqa: E402
from helpers import CORPUS  # noqa: E402


def pytest_collection_modifyitems(items):
    """The `heavy` tests first (in their order), so that no worker is left with a minute-long test at the end."""
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)


@pytest.fixture(scope="session")
def tokenizer():
    return CharLSTMTokenizer.from_corpus(CORPUS)


@pytest.fixture(params=CELL_TYPES)
def cell_type(request):
    """Each cell type of the registry (`cells_char_lstm.CELLS`)."""
    return request.param
