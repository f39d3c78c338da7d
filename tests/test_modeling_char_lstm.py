"""Forward pass, loss, cache and padding of CharLSTMForCausalLM (generation has its own file)."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, DynamicCache

from char_lstm import CharLSTMConfig, CharLSTMForCausalLM, CharLSTMModel
from char_lstm.modeling_char_lstm import (
    _STEP_WEIGHTS,
    _adaptive_argmax,
    _adaptive_sample,
    _StepLinear,
    cache_from_states,
)
from helpers import CORPUS, make_model


def encode(tokenizer, texts, **kwargs):
    return tokenizer(texts, return_tensors="pt", **kwargs)


def test_labels_loss_matches_manual_cross_entropy(tokenizer, cell_type):
    model = make_model(tokenizer, cell_type)
    ids = encode(tokenizer, ["ROMEO: But, soft!"])["input_ids"]
    labels = ids.clone()
    labels[0, 3] = -100
    out = model(input_ids=ids, labels=labels)
    manual = F.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, manual, rtol=1e-6, atol=1e-6)
    # a wrong shift would give a different number
    assert not torch.allclose(out.loss, F.cross_entropy(out.logits[0], ids[0]))


def test_output_shapes_hidden_states_and_logits_to_keep(tokenizer, cell_type):
    model = make_model(tokenizer, cell_type, num_layers=3)
    ids = encode(tokenizer, ["hear me", "speak!!"])["input_ids"]
    out = model(input_ids=ids, output_hidden_states=True)
    assert out.logits.shape == (2, 7, len(tokenizer))
    assert len(out.hidden_states) == 4  # embeddings + one per layer
    assert out.hidden_states[0].shape == (2, 7, 12)
    assert all(h.shape == (2, 7, 24) for h in out.hidden_states[1:])
    last = model(input_ids=ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, len(tokenizer))
    torch.testing.assert_close(last[:, 0], out.logits[:, -1])
    as_tuple = model(input_ids=ids, return_dict=False, use_cache=False)
    torch.testing.assert_close(as_tuple[0], out.logits)


def test_inputs_embeds_equal_input_ids(tokenizer):
    model = make_model(tokenizer)
    ids = encode(tokenizer, ["All:\nSpeak"])["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    torch.testing.assert_close(model(inputs_embeds=embeds).logits, model(input_ids=ids).logits)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(input_ids=ids, inputs_embeds=embeds)


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
    states = 2 if cell_type == "lstm" else 1
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


def test_left_padding_is_exact(tokenizer, cell_type):
    model = make_model(tokenizer, cell_type)
    texts = ["ROMEO:\nBut, soft", "All:", "hear me speak."]
    batch = encode(tokenizer, texts, padding=True, padding_side="left")
    out = model(**batch).logits
    for row, text in enumerate(texts):
        alone = model(**encode(tokenizer, [text])).logits[0]
        n = alone.shape[0]
        torch.testing.assert_close(out[row, -n:], alone, rtol=1e-5, atol=1e-5)


def test_right_padding_is_exact_and_final_state_is_last_real_token(tokenizer, cell_type):
    model = make_model(tokenizer, cell_type)
    texts = ["All:", "ROMEO:\nBut, soft", "speak"]
    batch = encode(tokenizer, texts, padding=True, padding_side="right")
    cache = DynamicCache(config=model.config)
    out = model(**batch, cache=cache).logits
    for row, text in enumerate(texts):
        alone_cache = DynamicCache(config=model.config)
        alone = model(**encode(tokenizer, [text]), cache=alone_cache).logits[0]
        n = alone.shape[0]
        torch.testing.assert_close(out[row, :n], alone, rtol=1e-5, atol=1e-5)
        for layer, alone_layer in zip(cache.layers, alone_cache.layers):
            torch.testing.assert_close(layer.recurrent_states[0][row], alone_layer.recurrent_states[0][0])


def test_padding_does_not_touch_the_state(tokenizer):
    model = make_model(tokenizer)
    ids = encode(tokenizer, ["hear", "me!!"])["input_ids"]
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, cache=cache)
    before = [s.clone() for layer in cache.layers for s in layer.recurrent_states.values()]
    # a step where row 0 is padding and row 1 is real: row 0 keeps its state
    step = torch.tensor([[tokenizer.pad_token_id], [5]])
    model(input_ids=step, attention_mask=torch.tensor([[0], [1]]), cache=cache)
    after = [s for layer in cache.layers for s in layer.recurrent_states.values()]
    for b, a in zip(before, after):
        torch.testing.assert_close(a[0], b[0])
        assert not torch.allclose(a[1], b[1])


def test_mask_longer_than_inputs_uses_last_columns(tokenizer):
    """generate() passes the mask of the whole sequence; only the columns of the new tokens matter."""
    model = make_model(tokenizer)
    batch = encode(tokenizer, ["All:", "ROMEO:"], padding=True, padding_side="left")
    cache = DynamicCache(config=model.config)
    model(**batch, cache=cache)
    nxt = torch.tensor([[7], [7]])
    full_mask = torch.cat([batch["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1)
    a = model(input_ids=nxt, attention_mask=full_mask, cache=cache).logits
    cache2 = DynamicCache(config=model.config)
    model(**batch, cache=cache2)
    torch.testing.assert_close(a, model(input_ids=nxt, cache=cache2).logits)


def test_out_of_vocabulary_ids_give_a_clear_error(tokenizer):
    model = make_model(tokenizer)
    with pytest.raises(
        ValueError, match=f"holds id {len(tokenizer) + 3}, outside .*tokenizer does not match this model"
    ):
        model(input_ids=torch.tensor([[1, 2, len(tokenizer) + 3]]))
    with pytest.raises(ValueError, match="holds id -1"):
        model(input_ids=torch.tensor([[1, -1]]))


def test_weight_init(tokenizer):
    model = make_model(tokenizer, "lstm", hidden_size=16)
    rnn = model.model.layers[0]
    for g in range(4):
        block = rnn.weight_hh_l0[g * 16 : (g + 1) * 16]
        torch.testing.assert_close(block @ block.T, torch.eye(16), atol=1e-5, rtol=0)
    assert rnn.bias_ih_l0.abs().sum() == 0 and rnn.bias_hh_l0.abs().sum() == 0
    assert model.lm_head.bias.abs().sum() == 0
    assert model.lm_head.weight.abs().max() <= 1 / 16**0.5
    assert 0.8 < model.model.embeddings.weight.std() < 1.2
    # the first predictions are nearly uniform
    ids = encode(tokenizer, [CORPUS[:50]])["input_ids"]
    loss = model(input_ids=ids, labels=ids).loss
    assert abs(loss.item() - torch.log(torch.tensor(float(len(tokenizer)))).item()) < 0.1
    # the forget gate bias is configurable; the other gates stay at zero
    rnn = make_model(tokenizer, "lstm", hidden_size=16, forget_bias=1.0).model.layers[1]
    torch.testing.assert_close(rnn.bias_ih_l0[16:32], torch.ones(16))
    assert rnn.bias_ih_l0[:16].abs().sum() == 0 and rnn.bias_ih_l0[32:].abs().sum() == 0


def test_training_step_reduces_loss_and_dropout_only_in_train(tokenizer):
    model = make_model(tokenizer, dropout=0.3)
    ids = encode(tokenizer, [CORPUS[:60], CORPUS[60:120]])["input_ids"]
    model.eval()
    torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=ids).logits)
    model.train()
    assert not torch.allclose(model(input_ids=ids).logits, model(input_ids=ids).logits)
    assert model(input_ids=ids).cache is None  # no cache while training unless asked
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_embeddings_accessors_and_resize(tokenizer):
    model = make_model(tokenizer)
    vocab = len(tokenizer)
    assert model.get_input_embeddings() is model.model.embeddings
    assert model.get_output_embeddings() is model.lm_head
    ids = encode(tokenizer, ["speak"])["input_ids"]
    before = model(input_ids=ids).logits
    model.resize_token_embeddings(vocab + 5)
    assert model.config.vocab_size == vocab + 5
    assert model.get_input_embeddings().weight.shape == (vocab + 5, 12)
    assert model.lm_head.weight.shape == (vocab + 5, 24) and model.lm_head.bias.shape == (vocab + 5,)
    after = model(input_ids=ids).logits
    torch.testing.assert_close(after[..., :vocab], before)
    model(input_ids=torch.tensor([[vocab + 4]]))  # the new ids are usable
    new_embeddings = torch.nn.Embedding(vocab + 5, 12)
    model.set_input_embeddings(new_embeddings)
    assert model.model.embeddings is new_embeddings


def test_tied_embeddings_share_the_matrix(tokenizer, tmp_path):
    model = make_model(tokenizer, hidden_size=16, embedding_size=16, tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embeddings.weight.data_ptr()
    model.save_pretrained(tmp_path)
    loaded = CharLSTMForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embeddings.weight.data_ptr()
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)


def test_base_model_returns_last_hidden_state(tokenizer):
    config = CharLSTMConfig(vocab_size=len(tokenizer), embedding_size=8, hidden_size=16, dropout=0.0)
    base = CharLSTMModel(config).eval()
    out = base(input_ids=encode(tokenizer, ["speak"])["input_ids"])
    assert out.last_hidden_state.shape == (1, 5, 16)
    assert out.cache is not None


def test_bfloat16_logits_sequence_and_decoding_step_within_bf16_rounding_of_float32(tokenizer, tmp_path):
    model = make_model(tokenizer)
    with torch.no_grad():  # non-zero biases, so that how the step folds them is seen too
        for name, param in model.named_parameters():
            if "bias" in name:
                param.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(1))
    model.save_pretrained(tmp_path)
    bf16 = CharLSTMForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert bf16.dtype == torch.bfloat16
    ids = encode(tokenizer, ["hear me speak"])["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        out = bf16(input_ids=ids)
        cache = DynamicCache(config=bf16.config)  # the one-token decoding step in bf16 (looked-up input projection)
        steps = torch.cat([bf16(input_ids=ids[:, t : t + 1], cache=cache).logits for t in range(ids.shape[1])], dim=1)
    assert out.logits.dtype == steps.dtype == torch.bfloat16
    assert out.cache.layers[0].recurrent_states[0].dtype == torch.bfloat16
    # Measured bf16 error (logits up to 0.35): 1.6e-3 to 1.9e-3 over three seeds, sequence and step alike. Zeroing one
    # recurrent matrix (layer 1's weight_hh) moves the logits by 0.043-0.049, which the old bound (0.05) let through.
    torch.testing.assert_close(out.logits.float(), expected, atol=6e-3, rtol=0)
    torch.testing.assert_close(steps.float(), expected, atol=6e-3, rtol=0)
    generated = bf16.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 5)


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


@pytest.mark.parametrize(
    "hidden_size, embedding_size, num_layers, batch",
    [(24, 12, 2, 1), (40, 40, 1, 3), (64, 16, 3, 5), (128, 16, 2, 40)],  # the last: float32 CPU tanh via sigmoid
)
def test_fast_single_step_decode_equals_the_sequence_kernel(
    tokenizer, cell_type, hidden_size, embedding_size, num_layers, batch
):
    model = make_model(tokenizer, cell_type, hidden_size=hidden_size, embedding_size=embedding_size,
                       num_layers=num_layers)
    ids = torch.randint(2, len(tokenizer), (batch, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits  # one call of the sequence kernels
        cache = DynamicCache(config=model.config)
        steps = [model(input_ids=ids[:, t : t + 1], cache=cache).logits for t in range(ids.shape[1])]  # fast path
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert all(layer in _STEP_WEIGHTS for layer in model.model.layers)  # the fast path did run
    assert _STEP_WEIGHTS[model.model.layers[0]][1][0] is not None  # the first layer looked its input projection up


@pytest.mark.parametrize("rows", [1, 2, 3, 64])
@pytest.mark.parametrize("kernel", ["plain", "onednn"])
@pytest.mark.parametrize("with_bias, with_add, sigmoid", [(True, False, False), (True, False, True),
                                                          (False, True, True), (True, True, False)])
def test_the_decoding_steps_product_with_its_fused_addition_and_sigmoid(rows, kernel, with_bias, with_add, sigmoid):
    """Both kernels of `_StepLinear` (torch's matmul, taken for up to `mkl_rows` rows, and oneDNN's prepacked product
    with the addition or sigmoid fused) compute sigmoid?(x @ W.T + b + add), at any number of rows."""
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 40, generator=generator)
    bias = torch.randn(96, generator=generator) if with_bias else None
    add = torch.randn(rows, 96, generator=generator) if with_add else None
    x = torch.randn(rows, 40, generator=generator)
    linear = _StepLinear(weight, bias)
    if kernel == "onednn" and linear.packed is False:
        pytest.skip("this torch has no oneDNN linear")
    linear.mkl_rows = 0 if kernel == "onednn" else rows  # the kernel each CPU would pick, forced here
    expected = x.double() @ weight.double().T
    expected = expected + (bias.double() if with_bias else 0) + (add.double() if with_add else 0)
    expected = expected.sigmoid() if sigmoid else expected
    got = linear(x, add=add, sigmoid=sigmoid)
    assert got.dtype == torch.float32 and got.shape == (rows, 96)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    # oneDNN's weights are packed on first use only: the plain kernel never pays for it
    if kernel == "plain":
        assert linear.packed is None or linear.packed is False
    else:
        assert isinstance(linear.packed, torch.Tensor)


@pytest.mark.parametrize("edit", ["layer0.weight_hh", "layer1.bias_ih", "embeddings"])
def test_token_by_token_decoding_uses_weights_updated_in_place_between_steps(tokenizer, cell_type, edit):
    """An in-place update between two one-token steps (as an optimizer step does; it bumps the version counter) is
    used by the next step: nothing but one-token steps runs in between, so only the version check can notice it."""
    from char_lstm.modeling_char_lstm import cache_from_states, cache_states

    model = make_model(tokenizer, cell_type)
    ids = torch.randint(2, len(tokenizer), (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :1], cache=cache)  # a one-token step: builds the decoding weights
        assert model.model.layers[0] in _STEP_WEIGHTS
        # the cache is updated in place
        after_first = [tuple(s.clone() for s in layer) for layer in cache_states(cache)]
        if edit == "layer0.weight_hh":
            model.model.layers[0].weight_hh_l0.mul_(1.5)
        elif edit == "layer1.bias_ih":
            model.model.layers[1].bias_ih_l0.add_(0.5)
        else:
            model.model.embeddings.weight.mul_(2)  # the first layer's looked-up input projection
        got = torch.cat([model(input_ids=ids[:, t : t + 1], cache=cache).logits for t in range(1, 8)], dim=1)
    # the same 7 tokens through the sequence kernel of a copy (no decoding weights), from the same state
    expected = copy.deepcopy(model)(input_ids=ids[:, 1:], cache=cache_from_states(model.config, after_first)).logits
    # measured: <= 1.2e-7 (logits up to 0.6); without the version check 1.2e-2 to 0.49
    torch.testing.assert_close(got, expected.detach(), rtol=0, atol=1e-6)


def test_empty_input_is_a_clear_error(tokenizer):
    model = make_model(tokenizer)
    with pytest.raises(ValueError, match="The input has no tokens"):
        model(input_ids=torch.zeros(1, 0, dtype=torch.long))


def test_truncated_bptt_with_detach_cache(tokenizer):
    from char_lstm.modeling_char_lstm import detach_cache

    model = make_model(tokenizer).train()
    ids = encode(tokenizer, ["ROMEO:\nBut, soft! what light"])["input_ids"]
    cache = DynamicCache(config=model.config)
    for start in range(0, ids.shape[1] - 1, 8):  # chunk after chunk, one backward each
        chunk = ids[:, start : start + 9]
        model(input_ids=chunk, labels=chunk, cache=cache, use_cache=True).loss.backward()
        detach_cache(cache)
    assert all(not s.requires_grad for layer in cache.layers for s in layer.recurrent_states.values())


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_cpu_dropout_has_the_distribution_of_dropout(p):
    from char_lstm.modeling_char_lstm import CharLSTMDropout

    torch.manual_seed(0)
    dropout = CharLSTMDropout(p).train()
    x = torch.ones(200_000, requires_grad=True)
    y = dropout(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.005
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / (1 - p)))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient goes through the kept elements, scaled the same
    assert torch.equal(dropout.eval()(x), x)
    dropout.train()
    assert dropout(x.detach().bfloat16()).dtype == torch.bfloat16
    default = torch.get_default_dtype()
    try:  # the mask is drawn in float32 whatever the default dtype, and never changes x's dtype
        torch.set_default_dtype(torch.float64)
        assert dropout(x.detach()).dtype == torch.float32
    finally:
        torch.set_default_dtype(default)


def test_stream_state_helpers_save_restore_and_reset_rows(tokenizer, cell_type):
    from char_lstm.modeling_char_lstm import cache_from_states, cache_states, reset_cache_rows

    model = make_model(tokenizer, cell_type=cell_type)
    ids = encode(tokenizer, [CORPUS[:12], CORPUS[40:52]])["input_ids"]
    cache = DynamicCache(config=model.config)
    assert cache_states(cache) is None
    model(input_ids=ids[:, :6], cache=cache, use_cache=True)
    states = cache_states(cache)
    assert len(states) == 2 and len(states[0]) == (2 if cell_type == "lstm" else 1)
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
    from char_lstm.modeling_char_lstm import cache_states, detach_cache, reset_cache_rows

    cache = DynamicCache()
    keys = torch.ones(2, 1, 3, 4, requires_grad=True) * 2  # (batch, heads, tokens, head size), with a history
    cache.update(keys, keys, layer_idx=0)
    assert detach_cache(cache) is cache and reset_cache_rows(cache, torch.tensor([True, False])) is cache
    assert cache.layers[0].keys.requires_grad and bool((cache.layers[0].keys == 2).all())
    assert cache_states(cache) is None


@pytest.mark.parametrize("batch", [16, 64])
def test_fast_step_at_large_batches_and_from_embeddings(tokenizer, cell_type, batch):
    """Generation batches decode through the fused step too (oneDNN's prepacked products on a CPU); fed
    `inputs_embeds`, the first layer computes its input projection instead of looking it up. 64 rows x 64 units
    reach the size from which float32 tanh is computed through sigmoid."""
    model = make_model(tokenizer, cell_type, hidden_size=64)
    ids = torch.randint(2, len(tokenizer), (batch, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        cache, cache_embeds = DynamicCache(config=model.config), DynamicCache(config=model.config)
        steps, steps_embeds = [], []
        for t in range(ids.shape[1]):
            steps.append(model(input_ids=ids[:, t : t + 1], cache=cache).logits)
            embeds = model.get_input_embeddings()(ids[:, t : t + 1])
            steps_embeds.append(model(inputs_embeds=embeds, cache=cache_embeds).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps_embeds, dim=1), full, rtol=1e-5, atol=1e-5)
    if torch.backends.mkldnn.is_available():  # the product ran in oneDNN, not MKL
        assert _STEP_WEIGHTS[model.model.layers[1]][1][2].packed is not None


def test_training_forward_and_backward_under_cpu_bf16_autocast_on_any_cpu(tokenizer, cell_type):
    """`--bf16` on CPU is autocast: the logits come out in bf16 and the gradients are finite, on CPUs with native bf16
    and on AVX2-only CPUs, where oneDNN has no bf16 LSTM kernel (the LSTM then runs in float32 there)."""
    model = make_model(tokenizer, cell_type, hidden_size=32).train()
    ids = torch.randint(2, len(tokenizer), (4, 12), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16
    float32_loss = model(input_ids=ids, labels=ids).loss
    # measured on an AVX2 CPU: 8e-6 (lstm, float32 kernel), 3e-4 (gru, rnn); a wrong model is off by ~0.1-1 nat
    assert abs(out.loss.item() - float32_loss.item()) < 0.01
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_fast_step_under_cpu_autocast(tokenizer, cell_type):
    """A bf16 training run samples text under autocast: the float32 model's decoding step then runs in bf16 as
    `nn.Linear` would, close to the sequence kernels under the same autocast."""
    model = make_model(tokenizer, cell_type, hidden_size=64)
    ids = torch.randint(2, len(tokenizer), (3, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(input_ids=ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :4], cache=cache)  # the prompt leaves bf16 states, as in generate()
        steps = [model(input_ids=ids[:, t : t + 1], cache=cache).logits for t in range(4, 8)]
        generated = model.generate(ids, max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(torch.cat(steps, dim=1).float(), full[:, 4:].float(), atol=0.05, rtol=0.05)
    assert generated.shape == (3, 11)
    step_linear = _STEP_WEIGHTS[model.model.layers[1]][1][-1]
    x = torch.randn(3, step_linear.weight.shape[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert step_linear(x).dtype == torch.bfloat16  # cast as autocast's linear does, not oneDNN in float32
    assert step_linear(x).dtype == torch.float32


def test_decoding_sees_weights_edited_through_data(tokenizer, cell_type):
    """`.data` edits bump no version counter: the decoding weights are rebuilt at every generate() and prompt."""
    model = make_model(tokenizer, cell_type).eval()
    ids = torch.randint(2, len(tokenizer), (2, 5), generator=torch.Generator().manual_seed(0))
    # one-character prompts: every step of generate() is a one-token step, so only generate()'s own refresh at its
    # start can see the edit (a longer prompt goes through the sequence kernel, which refreshes them too)
    prompts = ids[:, :1]
    model.generate(prompts, max_new_tokens=3, do_sample=False)  # builds the decoding weights
    with torch.no_grad():
        model.model.embeddings.weight.data.mul_(2)
        model.model.layers[1].weight_hh_l0.data.mul_(1.5)
    # a copy has no cached weights
    expected = copy.deepcopy(model).generate(prompts, max_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(prompts, max_new_tokens=12, do_sample=False), expected)
    with torch.no_grad():  # token by token: the prompt (a sequence) refreshes them too
        model.model.layers[0].weight_hh_l0.data.mul_(0.5)
        full = model(input_ids=ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :2], cache=cache)
        steps = [model(input_ids=ids[:, t : t + 1], cache=cache).logits for t in range(2, 5)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 2:], rtol=1e-5, atol=1e-5)


def test_generation_under_accelerate_cpu_offload(tokenizer):
    """Offloaded weights sit on `meta` until accelerate's hooks bring them in: decoding runs the layers' own
    forward."""
    from accelerate import cpu_offload

    model = make_model(tokenizer).eval()
    ids = torch.randint(2, len(tokenizer), (2, 5), generator=torch.Generator().manual_seed(0))
    expected = model.generate(ids, max_new_tokens=8, do_sample=False)
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert model.model.layers[0].weight_hh_l0.is_meta
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), expected)


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
def test_decoding_step_calls_no_onednn_op_under_mkldnn_flags_off(tokenizer):
    """Under `torch.backends.mkldnn.flags(enabled=False)` the one-token step's products call no oneDNN op (seen in
    torch's profiler; with the flag on they do, where oneDNN is usable) and give the sequence kernel's logits."""
    from char_lstm.modeling_char_lstm import _onednn_linear_usable

    model = make_model(tokenizer, hidden_size=64)
    ids = torch.randint(2, len(tokenizer), (3, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        for enabled in (True, False):
            with torch.backends.mkldnn.flags(enabled=enabled):
                cache = DynamicCache(config=model.config)
                steps = [model(input_ids=ids[:, :1], cache=cache).logits]  # builds (and prepacks) the weights
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                    steps += [model(input_ids=ids[:, t : t + 1], cache=cache).logits for t in range(1, 6)]
            torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
            ops = {event.key for event in profile.key_averages()}
            assert ("mkldnn::_linear_pointwise" in ops) == (enabled and _onednn_linear_usable()), (enabled, ops)


def test_decoding_step_of_a_model_made_under_inference_mode(tokenizer):
    ids = torch.randint(2, len(tokenizer), (3, 6), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():  # parameters without version counters: the step rebuilds its weights every time
        model = make_model(tokenizer, hidden_size=64).eval()
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        steps = [model(input_ids=ids[:, t : t + 1], cache=cache).logits for t in range(6)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_model_with_decoding_weights_still_deep_copies(tokenizer):
    model = make_model(tokenizer)
    with torch.no_grad():
        model(input_ids=torch.tensor([[5]]), cache=DynamicCache(config=model.config))
    assert model.model.layers[0] in _STEP_WEIGHTS
    clone = copy.deepcopy(model)  # oneDNN's packed weights have no storage: they must not live on the module
    assert clone.model.layers[0] not in _STEP_WEIGHTS


@pytest.mark.parametrize("old_name", ["past_key_values", "cache_params"])
def test_old_cache_names_are_mapped_with_a_deprecation_warning(tokenizer, old_name):
    model = make_model(tokenizer)
    ids = encode(tokenizer, ["ROMEO:"])["input_ids"]
    reference = DynamicCache(config=model.config)
    expected = model(input_ids=ids[:, 3:], cache=model(input_ids=ids[:, :3], cache=reference).cache).logits
    for module in (model, model.model):
        old = DynamicCache(config=model.config)
        module(input_ids=ids[:, :3], cache=old)
        with pytest.warns(FutureWarning, match=f"`{old_name}` is deprecated"):
            out = module(input_ids=ids[:, 3:], **{old_name: old})
        if module is model:
            torch.testing.assert_close(out.logits, expected)  # the state was used, not ignored
        with pytest.raises(ValueError, match="both `cache` and"):
            module(input_ids=ids, cache=DynamicCache(config=model.config), **{old_name: old})


def test_unknown_keyword_arguments_are_errors(tokenizer):
    model = make_model(tokenizer)
    ids = encode(tokenizer, ["ROMEO:"])["input_ids"]
    with pytest.raises(TypeError, match=r"unsupported keyword argument\(s\) \['token_type_ids'\]"):
        model(input_ids=ids, token_type_ids=ids)
    with pytest.raises(TypeError, match="no attention weights"):
        model.model(input_ids=ids, output_attentions=True)
    with pytest.raises(TypeError, match="num_items_in_batch"):
        model.model(input_ids=ids, num_items_in_batch=4)  # the base model computes no loss
    model(input_ids=ids, output_attentions=False)
    loss = model(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(5)).loss
    torch.testing.assert_close(loss, model(input_ids=ids, labels=ids).loss)  # 5 targets: the same mean


def test_position_ids_are_accepted_and_change_nothing(tokenizer):
    """transformers' helpers and generate() pass `position_ids` to every causal LM: a recurrent model takes them and
    ignores them (the same logits, loss and generated text)."""
    model = make_model(tokenizer)
    batch = encode(tokenizer, ["ROMEO:", "All:\nSpeak"], padding=True)
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    for module in (model, model.model):
        plain = module(**batch)
        given = module(**batch, position_ids=positions)
        assert torch.equal(*(out.logits if module is model else out.last_hidden_state for out in (given, plain)))
    ids = batch["input_ids"][:1]
    torch.testing.assert_close(model(input_ids=ids, labels=ids, position_ids=positions[:1]).loss,
                               model(input_ids=ids, labels=ids).loss)
    seen = []  # what forward received: a hook also sends generate() through transformers' own loop
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: seen.append("position_ids" in kwargs),
                                           with_kwargs=True)
    try:
        generated = model.generate(**batch, position_ids=positions, max_new_tokens=8, do_sample=False)
        assert len(seen) == 8 and all(seen)  # the prompt, then 7 steps, each with the positions passed through
        seen.clear()
        assert torch.equal(generated, model.generate(**batch, max_new_tokens=8, do_sample=False))
        assert len(seen) == 8 and not any(seen)  # not a parameter of forward: generate() builds none of its own
    finally:
        hook.remove()


def test_from_pretrained_with_a_state_dict_and_no_folder(tokenizer):
    model = make_model(tokenizer)
    loaded = CharLSTMForCausalLM.from_pretrained(None, config=model.config, state_dict=model.state_dict()).eval()
    ids = encode(tokenizer, ["ROMEO:"])["input_ids"]
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_default_config_sets_no_unk_id_so_any_prompt_generates():
    config = CharLSTMConfig(vocab_size=8, hidden_size=8, embedding_size=4)
    assert config.unk_token_id is None
    model = CharLSTMForCausalLM(config).eval()
    out = model.generate(torch.ones(2, 3, dtype=torch.long), max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 7)


def test_gradient_checkpointing_gives_the_plain_gradients(tokenizer, cell_type):
    model = make_model(tokenizer, cell_type, dropout=0.0).train()
    batch = encode(tokenizer, ["ROMEO:\nBut, soft", "All:"], padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    def gradients(start=None):
        model.zero_grad()
        cache = cache_from_states(model.config, start) if start is not None else None
        model(**batch, labels=labels, cache=cache).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    start = [tuple(torch.randn(2, model.config.hidden_size) for _ in range(model.config.number_of_conv_states))] * 2
    plain, plain_from_state = gradients(), gradients(start)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers 5.24's name, not its deprecated alias
        model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing and all(layer.gradient_checkpointing for layer in model.model.layers)
    checkpointed, checkpointed_from_state = gradients(), gradients(start)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(checkpointed_from_state[name], plain_from_state[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch, hidden_size", [(2, 24), (64, 64)])
def test_decoding_step_with_non_zero_biases_equals_the_sequence_kernel(tokenizer, cell_type, batch, hidden_size):
    """Trained models have biases (initialization leaves them at zero, which hides how the step folds them): both
    biases of every layer, through the looked-up first layer (input_ids) and the computed one (inputs_embeds)."""
    model = make_model(tokenizer, cell_type, hidden_size=hidden_size)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "bias" in name:
                param.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    ids = torch.randint(2, len(tokenizer), (batch, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        cache, cache_embeds = DynamicCache(config=model.config), DynamicCache(config=model.config)
        steps = [model(input_ids=ids[:, t : t + 1], cache=cache).logits for t in range(6)]
        embeds = model.get_input_embeddings()(ids)
        steps_embeds = [model(inputs_embeds=embeds[:, t : t + 1], cache=cache_embeds).logits for t in range(6)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps_embeds, dim=1), full, rtol=1e-5, atol=1e-5)


def test_decoding_weights_are_prepared_once_and_reused_while_no_weight_changes(tokenizer):
    """The point of preparing them (prepacking for oneDNN, the input table) is to do it once, not at every token."""
    model = make_model(tokenizer)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([[5]]), cache=cache)
        prepared = [_STEP_WEIGHTS[layer][1] for layer in model.model.layers]
        model(input_ids=torch.tensor([[6]]), cache=cache)
    assert all(_STEP_WEIGHTS[layer][1] is p for layer, p in zip(model.model.layers, prepared))


def test_decoding_step_of_an_inference_mode_model_follows_in_place_edits(tokenizer):
    """Parameters made under `torch.inference_mode` have no version counter, so the step cannot tell an in-place edit
    from no change: it prepares their weights again at every step rather than decode with stale ones."""
    with torch.inference_mode():
        model = make_model(tokenizer)
        ids = torch.tensor([[5], [9]])
        before = model(input_ids=ids).logits
        model.model.layers[0].weight_ih_l0.mul_(2)  # in place, inside inference mode: no version counter moves
        after = model(input_ids=ids).logits
        model.model.forget_decoding_weights()
        expected = model(input_ids=ids).logits  # prepared from the edited weights
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, expected, rtol=0, atol=0)


def decode_token_by_token(model, ids, prompt_length=3):
    """The logits of `ids` fed as a prompt of `prompt_length` tokens, then one token per call (the decoding step)."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = [model(input_ids=ids[:, :prompt_length], cache=cache, use_cache=True).logits]
        for t in range(prompt_length, ids.shape[1]):
            logits.append(model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    return torch.cat(logits, dim=1)


HOOK_PLACES = ["layer", "layer pre", "global", "global pre", "embeddings", "embeddings pre"]


@pytest.mark.parametrize("place", HOOK_PLACES)
def test_hooks_on_the_modules_the_decoding_step_bypasses_fire_and_count(tokenizer, cell_type, place):
    """The one-token step computes the layers itself, and looks the first layer's input projection up in a table by
    character id instead of using the embedding's output. A forward hook or pre-hook on a layer, on every module
    (`register_module_forward_hook`), or on the embeddings still fires at every step, and what it returns counts:
    token by token gives what the whole sequence gives with the same hook (it was skipped)."""
    model = make_model(tokenizer, cell_type)
    ids = torch.randint(2, len(tokenizer), (2, 8), generator=torch.Generator().manual_seed(0))
    embeddings = model.model.embeddings
    target = embeddings if place.startswith("embeddings") else model.model.layers[1]
    without_hook = model(input_ids=ids).logits
    calls = []

    def forward_hook(module, args, output):
        if module is not target:  # a global hook sees every module
            return None
        calls.append(args[0].shape[1])
        # a layer returns (output, *final states): the output changes, the state in the cache does not
        return output * 0.5 if module is embeddings else (output[0] * 0.5, *output[1:])

    def pre_hook(module, args):
        if module is not target:
            return None
        calls.append(args[0].shape[1])
        return ((args[0] + 1) % len(tokenizer),) if module is embeddings else (args[0] * 0.5, *args[1:])

    hook = pre_hook if place.endswith("pre") else forward_hook
    if place.startswith("global"):
        register = (torch.nn.modules.module.register_module_forward_pre_hook if place.endswith("pre")
                    else torch.nn.modules.module.register_module_forward_hook)
        handle = register(hook)
    else:
        handle = (target.register_forward_pre_hook if place.endswith("pre") else target.register_forward_hook)(hook)
    try:
        full = model(input_ids=ids).logits
        assert calls == [8]
        calls.clear()
        stepped = decode_token_by_token(model, ids, prompt_length=3)
        assert calls == [3] + [1] * 5  # the prompt, then every single token
    finally:
        handle.remove()
    assert not torch.allclose(full, without_hook, atol=1e-3)  # the hook changes the outputs
    torch.testing.assert_close(stepped, full, rtol=1e-5, atol=1e-5)
    # without the hook, the decoding step (and its table) is back
    torch.testing.assert_close(decode_token_by_token(model, ids), without_hook, rtol=1e-5, atol=1e-5)


def adapted_logits(lora, ids):
    """The logits of the peft model `lora`, checked to differ from those without its adapter."""
    with torch.no_grad():
        full = lora(input_ids=ids).logits
        with lora.disable_adapter():
            assert not torch.allclose(full, lora(input_ids=ids).logits, atol=1e-3)
    return full


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft reads it
def test_lora_on_the_embeddings_with_peft(tokenizer, cell_type):
    """peft's LoRA puts the embedding in its own module, which has no `num_embeddings` (reading it was an
    AttributeError): forward, the one-token step (without the per-id table, which would skip the adapter) and
    generate() give what the merged model gives, on a vocabulary enlarged by `resize_token_embeddings`, and ids
    outside it still get the clear error."""
    peft = pytest.importorskip("peft")
    model = make_model(tokenizer, cell_type)
    vocab = len(tokenizer) + 3
    model.resize_token_embeddings(vocab, mean_resizing=False)  # the config follows: vocab_size is the new size
    lora = peft.get_peft_model(model, peft.LoraConfig(target_modules=["embeddings"], r=4, init_lora_weights=False))
    assert not isinstance(model.model.embeddings, torch.nn.Embedding)
    ids = torch.randint(2, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    ids[:, -1] = vocab - 1  # an id of the enlarged vocabulary
    prompt = ids[:, :4]
    full = adapted_logits(lora, ids)
    stepped = decode_token_by_token(lora, ids)
    generated = lora.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                              do_sample=False)
    with pytest.raises(ValueError, match=f"outside \\[0, {vocab - 1}\\] \\(vocab_size={vocab}\\)"):
        lora(input_ids=torch.tensor([[vocab]]))
    torch.testing.assert_close(stepped, full, rtol=1e-5, atol=1e-5)

    merged = lora.merge_and_unload()
    assert type(merged.model.embeddings) is torch.nn.Embedding
    torch.testing.assert_close(merged(input_ids=ids).logits, full, rtol=1e-5, atol=1e-5)
    assert torch.equal(
        merged.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False),
        generated,
    )


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft reads it
def test_lora_on_the_recurrent_weights_with_peft_target_parameters(tokenizer, cell_type):
    """peft's `target_parameters` puts each targeted layer in a `ParamWrapper` (nested for two weights of one layer)
    whose forward applies the adapter to the weight through `torch.nn.utils.parametrize` around the layer's call.
    The one-token step read the wrapped layer's weights (AttributeError in forward and generate()); it now stands
    aside, and forward, token by token decoding and generate() give what the merged model gives."""
    peft = pytest.importorskip("peft", minversion="0.17")  # target_parameters: peft 0.17
    model = make_model(tokenizer, cell_type)
    targets = ["model.layers.0.weight_hh_l0", "model.layers.1.weight_ih_l0", "model.layers.1.weight_hh_l0"]
    lora = peft.get_peft_model(model, peft.LoraConfig(target_parameters=targets, r=4, init_lora_weights=False))
    assert type(model.model.layers[0]).__name__ == "ParamWrapper"
    ids = torch.randint(2, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))
    prompt = ids[:, :4]
    full = adapted_logits(lora, ids)
    stepped = decode_token_by_token(lora, ids)
    greedy = lora.generate(input_ids=prompt, max_new_tokens=12, do_sample=False)
    torch.manual_seed(1)
    sampled = lora.generate(input_ids=prompt, max_new_tokens=12, do_sample=True)
    torch.testing.assert_close(stepped, full, rtol=1e-5, atol=1e-5)

    merged = lora.merge_and_unload()
    assert all(type(layer).__name__ == f"CharLSTM{cell_type.upper()}Layer" for layer in merged.model.layers)
    torch.testing.assert_close(merged(input_ids=ids).logits, full, rtol=1e-5, atol=1e-5)
    assert torch.equal(merged.generate(input_ids=prompt, max_new_tokens=12, do_sample=False), greedy)
    torch.manual_seed(1)
    assert torch.equal(merged.generate(input_ids=prompt, max_new_tokens=12, do_sample=True), sampled)


class ScaledWeight(torch.nn.Module):
    """A parametrization: the weight times a learnable scale."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, weight):
        return weight * self.scale


def test_a_parametrized_recurrent_weight_is_read_through_its_parametrization(tokenizer, cell_type):
    """`torch.nn.utils.parametrize` on a layer's weight (the mechanism of peft's `target_parameters`): the weight is
    recomputed at every read, so the one-token step, which caches the weights it prepares by their storage, stands
    aside. An edit of the parametrization's own parameter between two tokens is followed (the step could reuse the
    previous weights when the new tensor landed where the old one was), and generate() gives what the model with the
    parametrized weight written in gives."""
    from torch.nn.utils import parametrize

    model = make_model(tokenizer, cell_type)
    layer = model.model.layers[0]
    parametrize.register_parametrization(layer, "weight_hh_l0", ScaledWeight())
    scale = layer.parametrizations.weight_hh_l0[0].scale
    ids = torch.randint(2, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        scale.fill_(1.5)
    torch.testing.assert_close(decode_token_by_token(model, ids), model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    for trial in range(5):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            scale.fill_(1.0)
            model(input_ids=ids[:, :4], cache=cache, use_cache=True)
            model(input_ids=ids[:, 4:5], cache=cache, use_cache=True)
            scale.fill_(2.0 + trial)
            reference_cache = copy.deepcopy(cache)
            step = model(input_ids=ids[:, 5:6], cache=cache, use_cache=True).logits
        reference = model(input_ids=ids[:, 5:6], cache=reference_cache, use_cache=True).logits  # autograd on: the
        torch.testing.assert_close(step, reference.detach(), rtol=1e-5, atol=1e-5)  # layer's own forward
    generated = model.generate(input_ids=ids[:, :4], max_new_tokens=12, do_sample=False)
    parametrize.remove_parametrizations(layer, "weight_hh_l0", leave_parametrized=True)
    assert type(layer) is type(model.model.layers[1])  # the layer's own class again: the decoding step is back
    assert torch.equal(model.generate(input_ids=ids[:, :4], max_new_tokens=12, do_sample=False), generated)


# ---------------------------------------------------------------------------------------------------------------------
# Large vocabularies: the adaptive softmax head


def adaptive_model(vocab_size=300, cell_type="lstm", seed=0):
    torch.manual_seed(seed)
    config = CharLSTMConfig(vocab_size=vocab_size, embedding_size=16, hidden_size=32, dropout=0.1,
                            cell_type=cell_type, adaptive_softmax_cutoffs=[20, 100], unk_token_id=1, eos_token_id=2,
                            bos_token_id=2)
    return CharLSTMForCausalLM(config)


def test_adaptive_softmax_trains_on_the_target_clusters_and_scores_with_full_log_probabilities():
    model = adaptive_model()
    ids = torch.randint(0, 300, (4, 30), generator=torch.Generator().manual_seed(1))
    model.train()
    out = model(input_ids=ids, labels=ids)
    assert out.logits is None and torch.isfinite(out.loss)  # training computes only the targets' clusters
    out.loss.backward()
    assert all(p.grad is not None for p in model.model.parameters())
    model.eval()
    with torch.no_grad():
        scored = model(input_ids=ids, labels=ids)
        log_probs = model.lm_head.log_prob(model.model(input_ids=ids).last_hidden_state.reshape(-1, 32))
    assert scored.logits.shape == (4, 30, 300)
    assert torch.allclose(torch.logsumexp(scored.logits, dim=-1), torch.zeros(4, 30), atol=1e-5)
    assert torch.allclose(scored.logits.reshape(-1, 300), log_probs)
    targets = ids[:, 1:].reshape(-1)
    nll = -scored.logits[:, :-1].reshape(-1, 300).gather(1, targets[:, None]).mean()
    assert torch.allclose(scored.loss, nll, atol=1e-5)
    with pytest.raises(ValueError, match="adaptive_softmax_cutoffs must be increasing ids"):
        CharLSTMConfig(vocab_size=50, adaptive_softmax_cutoffs=[40, 10])
    with pytest.raises(ValueError, match="needs the linear output layer"):
        CharLSTMConfig(vocab_size=50, embedding_size=8, hidden_size=8, tie_word_embeddings=True,
                       adaptive_softmax_cutoffs=[10])


def chi_square(counts: torch.Tensor, probabilities: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of `counts` against `probabilities` (classes expected fewer than 5 times pooled) and its
    degrees of freedom."""
    expected = probabilities.double() * counts.sum()
    small = expected < 5
    observed = torch.cat([counts[~small].double(), counts[small].double().sum().reshape(1)])
    expected = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    keep = expected > 0
    return float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()), int(keep.sum()) - 1


@pytest.mark.parametrize("head", ["linear", "adaptive"])
def test_logits_at_targets_are_the_log_probabilities_of_the_next_labels(head):
    model = adaptive_model() if head == "adaptive" else CharLSTMForCausalLM(
        CharLSTMConfig(vocab_size=300, embedding_size=16, hidden_size=32, unk_token_id=1, eos_token_id=2,
                       bos_token_id=2))
    model.eval()
    ids = torch.randint(0, 300, (3, 20), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, 5:9] = -100
    with torch.no_grad():
        full = model(input_ids=ids, labels=labels)
        at_targets = model(input_ids=ids, labels=labels, logits_at_targets=True)
        shifted = model(input_ids=ids, shift_labels=F.pad(labels, (0, 1), value=-100)[:, 1:], logits_at_targets=True)
    log_probs = torch.log_softmax(full.logits.float(), dim=-1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    scored = labels[:, 1:] != -100
    assert at_targets.logits.shape == (3, 20)
    assert torch.allclose(at_targets.logits[:, :-1][scored], log_probs[scored], atol=1e-5)
    assert torch.all(at_targets.logits[:, :-1][~scored] == 0) and torch.all(at_targets.logits[:, -1] == 0)
    assert torch.allclose(at_targets.loss, full.loss, atol=1e-6)
    assert torch.equal(shifted.logits, at_targets.logits) and torch.allclose(shifted.loss, full.loss, atol=1e-6)
    with pytest.raises(ValueError, match="logits_at_targets=True needs labels"):
        model(input_ids=ids, logits_at_targets=True)


def test_adaptive_softmax_greedy_choice_equals_the_argmax_of_the_full_distribution():
    torch.manual_seed(0)
    head = torch.nn.AdaptiveLogSoftmaxWithLoss(16, 60, [8, 30], div_value=2.0).eval()
    with torch.no_grad():
        head.head.weight[8:] *= 3  # the clusters' entries often beat the shortlist's best character
        hidden = torch.randn(4000, 16) * 2
        full = head.log_prob(hidden).argmax(dim=1)
        chosen = _adaptive_argmax(head, hidden)
    assert torch.equal(chosen, full)
    assert (full < 8).any() and ((full >= 8) & (full < 30)).any() and (full >= 30).any()


@pytest.mark.parametrize("temperature", [0.3, 0.8, 1.0, 1.7])
@pytest.mark.parametrize("clusters", ["peaked", "flat"])
def test_adaptive_softmax_draws_follow_the_tempered_full_distribution(temperature, clusters):
    """The hierarchical draw against softmax(log_prob / T) over 200k rows. "flat": the clusters hold most of the mass,
    spread evenly, so at low temperatures their tempered masses are small and most proposals are rejected (rows then
    draw from all clusters at once)."""
    torch.manual_seed(1)
    head = torch.nn.AdaptiveLogSoftmaxWithLoss(16, 40, [6, 20], div_value=2.0).eval()
    hidden = torch.randn(1, 16) * 2
    with torch.no_grad():
        if clusters == "flat":
            head.head.weight[6:] = hidden[0] / hidden.norm() ** 2 * 4  # each cluster's entry: e^4 times a character's
            for tail in head.tail:
                tail[1].weight.zero_()
        expected = torch.softmax(head.log_prob(hidden)[0] / temperature, dim=0)
        drawn = _adaptive_sample(head, hidden.expand(200_000, -1), temperature)
    statistic, freedom = chi_square(torch.bincount(drawn, minlength=40), expected)
    assert statistic < freedom + 6 * (2 * freedom) ** 0.5, (statistic, freedom)  # chi-square: mean k, sd sqrt(2k)


@pytest.mark.parametrize("temperature", [0.6, 1.5])
def test_adaptive_softmax_sampling_through_generate_follows_the_model(temperature, monkeypatch):
    """Two new characters of 100k copies of one prompt against the model's own probabilities, chi-square over the 144
    pairs; after the first character (drawn from the prompt's logits with torch.multinomial, as transformers' loop
    does) the lean loop draws from the head and one cluster, with no multinomial over the vocabulary."""
    torch.manual_seed(0)
    config = CharLSTMConfig(vocab_size=12, embedding_size=8, hidden_size=32, adaptive_softmax_cutoffs=[4, 8],
                            unk_token_id=1, eos_token_id=2, bos_token_id=2)
    model = CharLSTMForCausalLM(config).eval()
    prompt = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        first = torch.softmax(model(prompt).logits[0, -1] / temperature, dim=0)
        pairs = torch.cat([prompt.expand(12, -1), torch.arange(12)[:, None]], dim=1)
        second = torch.softmax(model(pairs).logits[:, -1] / temperature, dim=1)
    multinomial_calls = []
    multinomial = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda *a, **k: multinomial_calls.append(1) or multinomial(*a, **k))
    rows = prompt.expand(100_000, -1)
    out = model.generate(rows, attention_mask=torch.ones_like(rows), max_new_tokens=2, do_sample=True,
                         temperature=temperature, top_k=None, top_p=None, eos_token_id=None)
    assert len(multinomial_calls) == 1
    counts = torch.bincount(out[:, 3] * 12 + out[:, 4], minlength=144)
    statistic, freedom = chi_square(counts, (first[:, None] * second).reshape(-1))
    assert statistic < freedom + 6 * (2 * freedom) ** 0.5, (statistic, freedom)


@pytest.mark.parametrize("cell_type", ["lstm", "gru"])
def test_adaptive_softmax_generates_as_transformers_loop_and_round_trips(tmp_path, cell_type):
    model = adaptive_model(cell_type=cell_type).eval()
    prompt = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    mask = torch.ones_like(prompt)
    greedy = model.generate(prompt, attention_mask=mask, max_new_tokens=12, do_sample=False)
    transformers_loop = model.generate(prompt, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                       return_dict_in_generate=True).sequences
    assert torch.equal(greedy, transformers_loop)
    torch.manual_seed(3)
    sampled = model.generate(prompt, attention_mask=mask, max_new_tokens=12, do_sample=True, top_p=0.9)
    torch.manual_seed(3)
    assert torch.equal(sampled, model.generate(prompt, attention_mask=mask, max_new_tokens=12, do_sample=True,
                                               top_p=0.9, return_dict_in_generate=True).sequences)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded.lm_head) is torch.nn.AdaptiveLogSoftmaxWithLoss and loaded.get_output_embeddings() is None
    assert torch.equal(loaded.generate(prompt, attention_mask=mask, max_new_tokens=12, do_sample=False), greedy)
