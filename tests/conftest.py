import atexit
import os
import shutil
import tempfile

import pytest


os.environ.setdefault("HF_HUB_OFFLINE", "1")
# datasets' cache of the tests (and of the scripts they run) stays out of the user's cache, and goes when they end
if "HF_DATASETS_CACHE" not in os.environ:
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="char_lstm_datasets_cache_")
    atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)

from char_lstm import CharLSTMTokenizer  # noqa: E402
from helpers import CORPUS  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return CharLSTMTokenizer.from_corpus(CORPUS)


@pytest.fixture(params=["lstm", "gru", "rnn"])
def cell_type(request):
    return request.param
