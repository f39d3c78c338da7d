"""The NumPy reference (hand-written forward and BPTT) as the oracle of the torch model, and its own gradient check."""

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from char_lstm.cache_char_lstm import detach_cache
from char_lstm.numpy_reference import NumpyCharLSTM, clip_grads_by_global_norm
from helpers import make_model


def random_ids(tokenizer, batch=3, length=13, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, len(tokenizer), (batch, length), generator=generator)


def rel_err(a, b):
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_forward_matches_the_torch_model(tokenizer, cell_type, num_layers):
    model = make_model(tokenizer, cell_type, hidden_size=16, embedding_size=8, num_layers=num_layers)
    ids = random_ids(tokenizer)
    with torch.no_grad():
        torch32 = model(input_ids=ids, use_cache=False).logits.numpy()
        torch64 = model.double()(input_ids=ids, use_cache=False).logits.numpy()
    ref64 = NumpyCharLSTM.from_model(model).forward(ids.numpy())
    ref32 = NumpyCharLSTM.from_model(model.float(), dtype=np.float32).forward(ids.numpy())
    assert ref64.dtype == np.float64 and ref32.dtype == np.float32
    assert rel_err(ref64, torch64) <= 1e-6
    assert rel_err(ref32, torch32) <= 1e-4


@pytest.mark.parametrize("padded", [False, True])
def test_gradients_match_autograd(tokenizer, cell_type, padded):
    model = make_model(tokenizer, cell_type, hidden_size=16, embedding_size=8).double()
    ids = random_ids(tokenizer, seed=1)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :4] = 0  # left padding
        mask[2, -3:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 5] = -100
    out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
    out.loss.backward()
    ref = NumpyCharLSTM.from_model(model)
    loss, grads = ref.loss_and_grads(ids.numpy(), labels.numpy(), attention_mask=mask.numpy())
    assert loss == pytest.approx(out.loss.item(), rel=1e-6)
    named = dict(model.named_parameters())
    assert grads.keys() == named.keys()
    for name, param in named.items():
        assert rel_err(grads[name], param.grad.numpy()) <= 1e-4, name
    assert rel_err(ref.forward(ids.numpy(), mask.numpy()), out.logits.detach().numpy()) <= 1e-6


def test_tied_embeddings_gradients(tokenizer):
    model = make_model(tokenizer, "lstm", hidden_size=8, embedding_size=8, tie_word_embeddings=True).double()
    ids = random_ids(tokenizer, seed=2)
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    _, grads = NumpyCharLSTM.from_model(model).loss_and_grads(ids.numpy(), ids.numpy())
    assert "lm_head.weight" not in grads  # one matrix, one gradient (both uses added)
    assert rel_err(grads["model.embeddings.weight"], model.model.embeddings.weight.grad.numpy()) <= 1e-4


def test_finite_difference_gradient_check(tokenizer, cell_type):
    """The hand-written backward against (L(w + e) - L(w - e)) / 2e for sampled entries of every parameter."""
    model = make_model(tokenizer, cell_type, hidden_size=6, embedding_size=5)
    ref = NumpyCharLSTM.from_model(model)
    ids = random_ids(tokenizer, batch=2, length=7, seed=3).numpy()
    mask = np.ones_like(ids)
    mask[0, :2] = 0
    _, grads = ref.loss_and_grads(ids, ids, attention_mask=mask)
    rng = np.random.default_rng(0)
    eps = 1e-6
    for name, param in ref.params.items():
        for flat in rng.choice(param.size, size=min(6, param.size), replace=False):
            index = np.unravel_index(flat, param.shape)
            if name == "model.embeddings.weight" and index[0] not in ids[mask.astype(bool)]:
                continue  # rows of characters that were not read have zero gradient and no effect
            saved = param[index]
            param[index] = saved + eps
            plus = ref.loss_and_grads(ids, ids, attention_mask=mask)[0]
            param[index] = saved - eps
            minus = ref.loss_and_grads(ids, ids, attention_mask=mask)[0]
            param[index] = saved
            numeric = (plus - minus) / (2 * eps)
            assert grads[name][index] == pytest.approx(numeric, rel=1e-5, abs=1e-8), (name, index)


def test_truncated_bptt_matches_torch_with_detached_state(tokenizer, cell_type):
    model = make_model(tokenizer, cell_type, hidden_size=12, embedding_size=6).double()
    ids = random_ids(tokenizer, batch=2, length=25, seed=4)
    ref = NumpyCharLSTM.from_model(model)
    chunks = ref.truncated_bptt(ids.numpy(), chunk_size=8, max_norm=0.5)
    assert len(chunks) == 3
    cache = DynamicCache(config=model.config)
    for index, start in enumerate(range(0, ids.shape[1] - 1, 8)):
        inputs = ids[:, start : start + 8]
        targets = ids[:, start + 1 : start + 9]
        model.zero_grad()
        logits = model(input_ids=inputs, cache=cache, use_cache=True).logits
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets)
        loss.backward()
        torch_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5).item()
        detach_cache(cache)  # truncation: the next chunk starts from the state, not from its history
        np_loss, np_grads, np_norm = chunks[index]
        assert np_loss == pytest.approx(loss.item(), rel=1e-6)
        assert np_norm == pytest.approx(torch_norm, rel=1e-6)
        for name, param in model.named_parameters():
            assert rel_err(np_grads[name], param.grad.numpy()) <= 1e-4, (index, name)


def test_clipping_by_global_norm():
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}
    clipped, norm = clip_grads_by_global_norm(grads, 1.0)
    assert norm == pytest.approx(5.0)
    assert np.sqrt(sum((g ** 2).sum() for g in clipped.values())) == pytest.approx(1.0, rel=1e-5)
    unchanged, _ = clip_grads_by_global_norm(grads, 10.0)
    assert all(np.array_equal(unchanged[k], grads[k]) for k in grads)


def test_vanishing_and_exploding_gradients(tokenizer):
    """The measured version of the course's BPTT section (see scripts/bptt_demo.py): the gradient of the last
    prediction w.r.t. the hidden state 40 steps earlier vanishes in a tanh RNN, survives in an LSTM whose forget gate
    is open, and explodes in an RNN whose recurrent weights are too large, where clipping bounds the update."""
    from char_lstm.numpy_reference import gradient_flow_demo

    rows = {row["model"]: row for row in gradient_flow_demo(tokenizer_size=len(tokenizer), steps=42, seed=5)}
    back = lambda name: rows[name]["norms_back"][40] / rows[name]["norms_back"][0]  # noqa: E731
    assert back("rnn, PyTorch default init") < 1e-9  # vanished
    assert back("lstm, forget bias 3") > 1e-2  # kept
    assert back("lstm, forget bias 3") > 1e6 * back("rnn, PyTorch default init")
    assert back("rnn, recurrent weights x3") > 1e2  # exploded
    exploding = rows["rnn, recurrent weights x3"]
    assert exploding["grad_norm"] > 100 and exploding["clipped_norm"] == pytest.approx(1.0, rel=1e-4)
