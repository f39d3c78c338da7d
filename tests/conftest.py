import os

import pytest
import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")

from char_lstm import CharLSTMConfig, CharLSTMForCausalLM, CharLSTMTokenizer  # noqa: E402


CORPUS = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\tIndented line with  two spaces.\n"
    "ROMEO:\nBut, soft! what light through yonder window breaks?\n"
)


@pytest.fixture(scope="session")
def tokenizer():
    return CharLSTMTokenizer.from_corpus(CORPUS)


def make_model(tokenizer, cell_type="lstm", hidden_size=24, embedding_size=12, num_layers=2, dropout=0.0, seed=0, **kw):
    torch.manual_seed(seed)
    config = CharLSTMConfig(
        vocab_size=len(tokenizer),
        embedding_size=embedding_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        dropout=dropout,
        cell_type=cell_type,
        pad_token_id=tokenizer.pad_token_id,
        unk_token_id=tokenizer.unk_token_id,
        **kw,
    )
    return CharLSTMForCausalLM(config).eval()


@pytest.fixture(params=["lstm", "gru", "rnn"])
def cell_type(request):
    return request.param
