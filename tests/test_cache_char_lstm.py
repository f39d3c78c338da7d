"""The recurrent state in transformers' cache (cache_char_lstm.py): cached steps equal the full forward, gradients
flow through it, truncated backpropagation detaches it, and the stream state helpers save, restore and reset it."""

import pytest
import torch
from transformers import DynamicCache

from char_lstm.cells_char_lstm import CELLS
from helpers import CORPUS, encode, make_model


# ---------------------------------------------------------------------------------------------------------------------
# The state a cache holds: step by step equals the full forward, h and c, reset, wrong caches


@pytest.mark.parametrize("hidden_size, num_layers", [(24, 1), (24, 2), (40, 3)])
def test_cached_step_by_step_equals_full_forward(tokenizer, cell_type, hidden_size, num_layers):
    model = make_model(tokenizer, cell_type, hidden_size=hidden_size, num_layers=num_layers)
    ids = encode(tokenizer, ["Before we proceed any", "hear me speak. ROMEO!"])["input_ids"]
    full = model(input_ids=ids, use_cache=False).logits

    cache = DynamicCache(config=model.config)
    prefix = model(input_ids=ids[:, :7], cache=cache, use_cache=True)
    assert prefix.cache is cache
    steps = [prefix.logits]
    for t in range(7, ids.shape[1]):
        steps.append(model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_cache_holds_h_and_c_for_lstm_h_for_gru(tokenizer, cell_type):
    model = make_model(tokenizer, cell_type)
    out = model(input_ids=encode(tokenizer, ["abc", "def"])["input_ids"], use_cache=True)
    states = CELLS[cell_type].num_states
    for layer in out.cache.layers:
        assert [layer.recurrent_states[i].shape for i in range(states)] == [torch.Size([2, 24])] * states
        assert all(layer.has_previous_state.values())
    # the cached h is the last output of the top layer
    top = model.model(input_ids=encode(tokenizer, ["abc", "def"])["input_ids"], use_cache=False).last_hidden_state
    torch.testing.assert_close(out.cache.layers[-1].recurrent_states[0], top[:, -1])


def test_reset_cache_means_zero_state(tokenizer):
    model = make_model(tokenizer)
    ids = encode(tokenizer, ["speak"])["input_ids"]
    cache = DynamicCache(config=model.config)
    first = model(input_ids=ids, cache=cache).logits
    cache.reset()
    torch.testing.assert_close(model(input_ids=ids, cache=cache).logits, first)


def test_wrong_cache_is_refused(tokenizer):
    model = make_model(tokenizer)
    ids = encode(tokenizer, ["speak"])["input_ids"]
    with pytest.raises(ValueError, match=r"DynamicCache\(config=model.config\)"):
        model(input_ids=ids, cache=DynamicCache())
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, cache=cache)
    with pytest.raises(ValueError, match="batch of 1 but the inputs have batch size 2"):
        model(input_ids=ids.repeat(2, 1), cache=cache)


# ---------------------------------------------------------------------------------------------------------------------
# Gradients through the cache: backpropagation across calls, truncated BPTT


def test_backprop_through_the_cache_across_calls(tokenizer, cell_type):
    """Two calls chained by a cache give the gradients of one call over the whole sequence."""
    model = make_model(tokenizer, cell_type)
    ids = encode(tokenizer, ["ROMEO:\nBut, soft! what"])["input_ids"]
    whole = model(input_ids=ids).logits.sum()
    whole.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    cache = DynamicCache(config=model.config)
    first = model(input_ids=ids[:, :9], cache=cache, use_cache=True).logits.sum()
    second = model(input_ids=ids[:, 9:], cache=cache, use_cache=True).logits.sum()
    (first + second).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-5, msg=name)


def test_truncated_bptt_with_detach_cache(tokenizer):
    from char_lstm.cache_char_lstm import detach_cache

    model = make_model(tokenizer).train()
    ids = encode(tokenizer, ["ROMEO:\nBut, soft! what light"])["input_ids"]
    cache = DynamicCache(config=model.config)
    for start in range(0, ids.shape[1] - 1, 8):  # chunk after chunk, one backward each
        chunk = ids[:, start : start + 9]
        model(input_ids=chunk, labels=chunk, cache=cache, use_cache=True).loss.backward()
        detach_cache(cache)
    assert all(not s.requires_grad for layer in cache.layers for s in layer.recurrent_states.values())


# ---------------------------------------------------------------------------------------------------------------------
# The stream state helpers: cache_states, cache_from_states, reset_cache_rows, detach_cache


def test_stream_state_helpers_save_restore_and_reset_rows(tokenizer, cell_type):
    from char_lstm.cache_char_lstm import cache_from_states, cache_states, reset_cache_rows

    model = make_model(tokenizer, cell_type=cell_type)
    ids = encode(tokenizer, [CORPUS[:12], CORPUS[40:52]])["input_ids"]
    cache = DynamicCache(config=model.config)
    assert cache_states(cache) is None
    model(input_ids=ids[:, :6], cache=cache, use_cache=True)
    states = cache_states(cache)
    assert len(states) == 2 and len(states[0]) == CELLS[cell_type].num_states
    restored = cache_from_states(model.config, states)
    with torch.no_grad():
        expected = model(input_ids=ids[:, 6:], cache=cache, use_cache=True).logits
        assert torch.allclose(model(input_ids=ids[:, 6:], cache=restored, use_cache=True).logits, expected)
        reset_cache_rows(restored, torch.tensor([True, False]))
        reset = cache_states(restored)
        assert all((s[0] == 0).all() and (s[1] != 0).any() for layer in reset for s in layer)
    with pytest.raises(ValueError, match=r"^Expected states for 2 layers, got 1\.$"):
        cache_from_states(model.config, states[:1])


def test_stream_state_helpers_leave_a_cache_of_keys_and_values_alone():
    """The helpers take any transformers cache: layers without recurrent states (an attention model's keys and
    values) are left as they are, and such a cache holds no states to save."""
    from char_lstm.cache_char_lstm import cache_states, detach_cache, reset_cache_rows

    cache = DynamicCache()
    keys = torch.ones(2, 1, 3, 4, requires_grad=True) * 2  # (batch, heads, tokens, head size), with a history
    cache.update(keys, keys, layer_idx=0)
    assert detach_cache(cache) is cache and reset_cache_rows(cache, torch.tensor([True, False])) is cache
    assert cache.layers[0].keys.requires_grad and bool((cache.layers[0].keys == 2).all())
    assert cache_states(cache) is None
