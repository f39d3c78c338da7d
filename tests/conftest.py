import os
import tempfile

import pytest


os.environ.setdefault("HF_HUB_OFFLINE", "1")
# datasets' cache of the tests (and of the scripts they run) stays out of the user's cache
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="char_lstm_datasets_cache_"))

from char_lstm import CharLSTMTokenizer  # noqa: E402
from helpers import CORPUS  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return CharLSTMTokenizer.from_corpus(CORPUS)


@pytest.fixture(params=["lstm", "gru", "rnn"])
def cell_type(request):
    return request.param
