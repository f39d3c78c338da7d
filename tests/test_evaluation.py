"""char_lstm.evaluation and the bits_per_character evaluate module against hand-computed cross-entropy."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from char_lstm.evaluation import evaluate_ids, fixed_window_nll, streaming_nll
from char_lstm.metrics import BITS_PER_CHARACTER, load_bits_per_character
from helpers import CORPUS, make_model


@pytest.fixture(params=["linear", "adaptive"])
def model_and_ids(tokenizer, request):
    """A model with a linear head, or with an adaptive softmax (whose evaluation computes the targets' clusters only:
    `logits_at_targets`; the hand-computed cross-entropy below reads its full log-probabilities)."""
    cutoffs = [10, 30] if request.param == "adaptive" else None
    model = make_model(tokenizer, "lstm", hidden_size=32, adaptive_softmax_cutoffs=cutoffs)
    ids = tokenizer.encode_corpus(CORPUS * 3).astype(np.int64)
    return model, ids


def manual_fixed(model, ids, block):
    """Cross-entropy of every window of block+1 ids (and of the shorter end) from a zero state, by hand."""
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, block):
        window = torch.tensor(ids[start : start + block + 1]).unsqueeze(0)
        if window.shape[1] < 2:
            continue
        with torch.no_grad():
            logits = model(input_ids=window[:, :-1], use_cache=False).logits[0]
        total += F.cross_entropy(logits, window[0, 1:], reduction="sum").item()
        count += window.shape[1] - 1
    return total / count, count


def test_fixed_windows_equal_manual_cross_entropy(model_and_ids):
    model, ids = model_and_ids
    results = evaluate_ids(model, ids, block_size=37, batch_size=4)
    loss, count = manual_fixed(model, ids, 37)
    assert results["fixed"]["characters"] == count == len(ids) - 1
    assert results["fixed"]["loss"] == pytest.approx(loss, rel=1e-5)
    assert results["fixed"]["bits_per_character"] == pytest.approx(loss / math.log(2), rel=1e-5)
    assert results["fixed"]["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_streaming_equals_one_forward_over_the_whole_text(model_and_ids):
    model, ids = model_and_ids
    results = evaluate_ids(model, ids, block_size=37, modes=("streaming",))
    whole = torch.tensor(ids).unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids=whole[:, :-1], use_cache=False).logits[0]
    loss = F.cross_entropy(logits, whole[0, 1:]).item()
    assert results["streaming"]["loss"] == pytest.approx(loss, rel=1e-5)
    assert results["streaming"]["characters"] == len(ids) - 1
    # carrying the state gives context the zero-state windows lack (here: a repeated text)
    assert results["streaming"]["loss"] != pytest.approx(
        evaluate_ids(model, ids, 37, modes=("fixed",))["fixed"]["loss"]
    )


def test_nll_helpers_return_targets(model_and_ids):
    model, ids = model_and_ids
    nll, targets = fixed_window_nll(model, ids, 50)
    assert np.array_equal(targets, ids[1:])  # every character but the first, once, in order
    nll_s, targets_s = streaming_nll(model, ids, 50)
    assert np.array_equal(targets_s, ids[1:]) and nll.shape == nll_s.shape


def test_bits_per_character_module():
    metric = load_bits_per_character()
    assert metric.name == "bits_per_character"
    result = metric.compute(predictions=[math.log(2), math.log(2), 7.0], references=[3, 4, -100])
    assert result == {"loss": math.log(2), "bits_per_character": 1.0, "perplexity": 2.0, "characters": 2}
    metric.add_batch(predictions=[1.0, 3.0], references=[1, 2])
    metric.add_batch(predictions=[2.0], references=[5])
    assert metric.compute()["loss"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="no character to count: every reference is -100"):
        metric.compute(predictions=[1.0], references=[-100])
    with pytest.raises(ValueError, match="no character to count: no predictions and references were given"):
        metric.compute(predictions=[], references=[])
    import evaluate

    assert evaluate.load(BITS_PER_CHARACTER).compute(predictions=[0.0], references=[1])["perplexity"] == 1.0


def test_bad_arguments(model_and_ids):
    model, ids = model_and_ids
    with pytest.raises(ValueError, match="--block_size must be a positive"):
        evaluate_ids(model, ids, 0)
    with pytest.raises(ValueError, match="at least 2"):
        evaluate_ids(model, ids[:1], 10)
    with pytest.raises(ValueError, match="Unknown evaluation mode"):
        evaluate_ids(model, ids, 10, modes=("sliding",))


def test_perplexity_of_a_diverged_model_is_infinite():
    assert load_bits_per_character().compute(predictions=[1e4], references=[1])["perplexity"] == float("inf")
