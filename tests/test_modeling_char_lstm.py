"""The model itself: forward pass, loss, padding, initialization, training, embeddings and keyword arguments of
CharLSTMForCausalLM (the cache, the decoding step, the heads and generate() have files of their own)."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from char_lstm import CharLSTMConfig, CharLSTMForCausalLM, CharLSTMModel
from char_lstm.cache_char_lstm import cache_from_states
from char_lstm.cells_char_lstm import CELLS
from helpers import CORPUS, decode_token_by_token, encode, make_model


# ---------------------------------------------------------------------------------------------------------------------
# Forward pass, loss, shapes and inputs


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


def test_out_of_vocabulary_ids_give_a_clear_error(tokenizer):
    model = make_model(tokenizer)
    with pytest.raises(
        ValueError, match=f"holds id {len(tokenizer) + 3}, outside .*tokenizer does not match this model"
    ):
        model(input_ids=torch.tensor([[1, 2, len(tokenizer) + 3]]))
    with pytest.raises(ValueError, match="holds id -1"):
        model(input_ids=torch.tensor([[1, -1]]))


def test_empty_input_is_a_clear_error(tokenizer):
    model = make_model(tokenizer)
    with pytest.raises(ValueError, match="The input has no tokens"):
        model(input_ids=torch.zeros(1, 0, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------------------------
# Padding: left, right, inside a batch, and masks longer than the inputs


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


# ---------------------------------------------------------------------------------------------------------------------
# Initialization, training, dropout and gradient checkpointing


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


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_cpu_dropout_has_the_distribution_of_dropout(p):
    from char_lstm.layers_char_lstm import CharLSTMDropout

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


# ---------------------------------------------------------------------------------------------------------------------
# Embeddings, the base model, loading and bfloat16


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


# ---------------------------------------------------------------------------------------------------------------------
# Keyword arguments: the old cache names, unknown arguments, position_ids


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


# ---------------------------------------------------------------------------------------------------------------------
# Adapters and parametrized weights: peft's LoRA, torch.nn.utils.parametrize


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
    assert all(type(layer) is CELLS[cell_type].layer for layer in merged.model.layers)
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
