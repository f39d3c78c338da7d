"""The one-token decoding step (step_char_lstm.py): it gives what the sequence kernels give, and the weights it
prepares follow in-place and `.data` edits, copies, inference mode and hooks on the modules it bypasses."""

import copy

import pytest
import torch
from transformers import DynamicCache

from char_lstm.step_char_lstm import _STEP_WEIGHTS, _StepLinear
from helpers import decode_token_by_token, make_model


# ---------------------------------------------------------------------------------------------------------------------
# The step against the sequence kernels: sizes, inputs_embeds, biases, autocast, mkldnn flags


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


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
def test_decoding_step_calls_no_onednn_op_under_mkldnn_flags_off(tokenizer):
    """Under `torch.backends.mkldnn.flags(enabled=False)` the one-token step's products call no oneDNN op (seen in
    torch's profiler; with the flag on they do, where oneDNN is usable) and give the sequence kernel's logits."""
    from char_lstm.internals_char_lstm import _onednn_linear_usable

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


# ---------------------------------------------------------------------------------------------------------------------
# The step's product: _StepLinear with its fused addition and sigmoid


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


# ---------------------------------------------------------------------------------------------------------------------
# The prepared decoding weights: reused, rebuilt after edits, under inference mode, left out of copies


def test_decoding_weights_are_prepared_once_and_reused_while_no_weight_changes(tokenizer):
    """The point of preparing them (prepacking for oneDNN, the input table) is to do it once, not at every token."""
    model = make_model(tokenizer)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([[5]]), cache=cache)
        prepared = [_STEP_WEIGHTS[layer][1] for layer in model.model.layers]
        model(input_ids=torch.tensor([[6]]), cache=cache)
    assert all(_STEP_WEIGHTS[layer][1] is p for layer, p in zip(model.model.layers, prepared))


@pytest.mark.parametrize("edit", ["layer0.weight_hh", "layer1.bias_ih", "embeddings"])
def test_token_by_token_decoding_uses_weights_updated_in_place_between_steps(tokenizer, cell_type, edit):
    """An in-place update between two one-token steps (as an optimizer step does; it bumps the version counter) is
    used by the next step: nothing but one-token steps runs in between, so only the version check can notice it."""
    from char_lstm.cache_char_lstm import cache_from_states, cache_states

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


def test_decoding_step_of_a_model_made_under_inference_mode(tokenizer):
    ids = torch.randint(2, len(tokenizer), (3, 6), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():  # parameters without version counters: the step rebuilds its weights every time
        model = make_model(tokenizer, hidden_size=64).eval()
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        steps = [model(input_ids=ids[:, t : t + 1], cache=cache).logits for t in range(6)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


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


def test_model_with_decoding_weights_still_deep_copies(tokenizer):
    model = make_model(tokenizer)
    with torch.no_grad():
        model(input_ids=torch.tensor([[5]]), cache=DynamicCache(config=model.config))
    assert model.model.layers[0] in _STEP_WEIGHTS
    clone = copy.deepcopy(model)  # oneDNN's packed weights have no storage: they must not live on the module
    assert clone.model.layers[0] not in _STEP_WEIGHTS


# ---------------------------------------------------------------------------------------------------------------------
# Hooks on the modules the step bypasses


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
