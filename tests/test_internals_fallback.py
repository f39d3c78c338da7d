"""The Hub modeling file against a changed transformers: where a private internal that the lean decoding loop, the
one-token preparation, the cache plumbing or the decoding step leans on is gone, renamed or re-signed, the model steps
aside to transformers' (or torch's) own code and generates the same sequences, greedy and sampled.

Each test simulates one change of a future release by patching transformers' classes (the third party; none of
char_lstm's code is replaced). transformers' own loop, which such a release would have changed along with it, runs as
it runs today: it is wrapped to put the internal back for its call, and the wrapper counts its calls, which tells
which loop generated the sequences."""

import contextlib
import functools

import pytest
import torch
from transformers import DynamicCache, GenerationMixin
from transformers.cache_utils import Cache
from transformers.generation.stopping_criteria import MaxLengthCriteria

from char_lstm.internals_char_lstm import _onednn_linear_usable
from helpers import count_forward_calls, make_model


SETTINGS = {"greedy": dict(do_sample=False), "sampled": dict(do_sample=True, temperature=0.9, top_k=20)}
_ABSENT = object()


@pytest.fixture
def model(tokenizer):
    return make_model(tokenizer, "lstm", hidden_size=32)


@pytest.fixture
def batch(tokenizer):
    return tokenizer(["ROMEO:\nBut, soft", "All:"], return_tensors="pt", padding=True, padding_side="left")


def generate_each_way(model, batch, **extra):
    """{setting: sequences} for greedy search and for sampling from seed 0."""
    sequences = {}
    for name, settings in SETTINGS.items():
        torch.manual_seed(0)
        sequences[name] = model.generate(**batch, max_new_tokens=20, **settings, **extra)
    return sequences


def assert_same(after, before):
    assert after.keys() == before.keys()
    for name in before:
        assert torch.equal(after[name], before[name]), name


@contextlib.contextmanager
def attribute_as_today(owner, name, value):
    """`owner.name` set to today's `value` (deleted when `_ABSENT`) within, and put back as the simulation has it."""
    simulated = owner.__dict__.get(name, _ABSENT)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if simulated is _ABSENT:
            delattr(owner, name)
        else:
            setattr(owner, name, simulated)


def transformers_loop_as_today(monkeypatch, put_back=lambda kwargs: contextlib.nullcontext()):
    """transformers' `_sample` replaced by itself, run within `put_back(its keyword arguments)`, with the same
    signature (functools.wraps). Returns the list its calls are counted in."""
    calls, original = [], GenerationMixin._sample

    @functools.wraps(original)
    def transformers_loop(self, *args, **kwargs):
        calls.append(1)
        with put_back(kwargs):
            return original(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "_sample", transformers_loop)
    return calls


def test_with_the_installed_transformers_the_lean_loop_runs(model, batch, monkeypatch):
    """The checks pass on the installed release (5.24-5.25): the lean loop, not transformers' loop, generates, with
    one forward call (the prompt) per generate()."""
    loop_calls = transformers_loop_as_today(monkeypatch)
    forward_calls = count_forward_calls(monkeypatch)
    generate_each_way(model, batch)
    assert loop_calls == [] and len(forward_calls) == 2


def test_a_renamed_keyword_of_prefill_sends_generate_to_transformers_loop(model, batch, monkeypatch):
    before = generate_each_way(model, batch)
    original = GenerationMixin._prefill

    def prefill(self, input_ids, generation_config, model_kwargs, first_iteration=True):  # was is_first_iteration
        return original(self, input_ids, generation_config, model_kwargs, is_first_iteration=first_iteration)

    monkeypatch.setattr(GenerationMixin, "_prefill", prefill)
    calls = transformers_loop_as_today(monkeypatch, lambda kwargs: attribute_as_today(GenerationMixin, "_prefill",
                                                                                        original))
    assert_same(generate_each_way(model, batch), before)
    assert len(calls) == 2


def test_a_resigned_sample_gets_what_generate_passes_it(model, batch, monkeypatch):
    """A release whose generate() hands `_sample` a new argument: the lean loop, which would pass it on to the
    model's forward as an input, leaves the call to transformers' `_sample`, with the argument."""
    before = generate_each_way(model, batch)
    original, extract = GenerationMixin._sample, GenerationMixin._extract_generation_mode_kwargs
    received = []

    def sample(self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
               streamer=None, decoding_budget=None, **model_kwargs):
        received.append(decoding_budget)
        return original(self, input_ids, logits_processor, stopping_criteria, generation_config,
                        synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)

    monkeypatch.setattr(GenerationMixin, "_sample", sample)
    monkeypatch.setattr(GenerationMixin, "_extract_generation_mode_kwargs",
                        lambda self, *args, **kwargs: {**extract(self, *args, **kwargs), "decoding_budget": 100})
    assert_same(generate_each_way(model, batch), before)
    assert received == [100, 100]


def test_without_update_model_kwargs_for_generation_the_lean_loop_still_runs(model, batch, monkeypatch):
    """The lean loop takes the cache from the prompt's output: it does not need the method, which transformers' own
    loop calls at every step."""
    before = generate_each_way(model, batch)
    original = GenerationMixin._update_model_kwargs_for_generation
    monkeypatch.delattr(GenerationMixin, "_update_model_kwargs_for_generation")
    name = "_update_model_kwargs_for_generation"
    calls = transformers_loop_as_today(monkeypatch, lambda kwargs: attribute_as_today(GenerationMixin, name, original))
    assert_same(generate_each_way(model, batch), before)
    assert calls == []


def test_without_pad_token_tensor_rows_that_stop_are_padded_by_transformers_loop(tokenizer, model, batch,
                                                                                 monkeypatch):
    """generate() keeps the pad id for finished rows in `generation_config._pad_token_tensor`; in a release without
    it (simulated: it is moved to another name just before `_sample` is called) the lean loop, which pads with it
    once a row meets its eos, leaves the call to transformers' loop."""
    free = model.generate(**batch, max_new_tokens=20, do_sample=False)
    stops = dict(eos_token_id=int(free[0, batch["input_ids"].shape[1] + 3]), pad_token_id=tokenizer.pad_token_id)
    before = generate_each_way(model, batch, **stops)
    assert (before["greedy"][0, -10:] == tokenizer.pad_token_id).all()  # row 0 stopped and was padded
    original = GenerationMixin._get_stopping_criteria  # the last step of generate() before `_sample`

    def stopping_criteria(self, generation_config, *args, **kwargs):
        criteria = original(self, generation_config, *args, **kwargs)
        generation_config.pad_tensor_renamed = generation_config.__dict__.pop("_pad_token_tensor")
        return criteria

    @contextlib.contextmanager
    def pad_as_today(kwargs):
        config = kwargs["generation_config"]
        config._pad_token_tensor = config.pad_tensor_renamed
        yield

    monkeypatch.setattr(GenerationMixin, "_get_stopping_criteria", stopping_criteria)
    calls = transformers_loop_as_today(monkeypatch, pad_as_today)
    assert_same(generate_each_way(model, batch, **stops), before)
    assert len(calls) == 2


def _max_length_init_without_the_attribute(self, max_length, max_position_embeddings=None):
    self.max_length = max_length


def _max_length_init_resigned(self, max_length, max_position_embeddings=None, min_length=0):
    self.max_length, self.max_position_embeddings, self.min_length = max_length, max_position_embeddings, min_length


def _max_length_call(self, input_ids, scores, **kwargs):
    return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.max_length, dtype=torch.bool)


def _max_length_call_resigned(self, input_ids, scores, new_tokens=None, **kwargs):
    return _max_length_call(self, input_ids, scores)


@pytest.mark.parametrize("init, call", [
    (_max_length_init_without_the_attribute, _max_length_call),
    (_max_length_init_resigned, _max_length_call),
    (MaxLengthCriteria.__init__, _max_length_call_resigned),
])
def test_a_changed_max_length_criteria_is_called_as_transformers_calls_it(model, batch, monkeypatch, init, call):
    """The lean loop reads a `MaxLengthCriteria` as verified as a comparison of lengths; one without
    `max_position_embeddings`, or whose methods take other parameters, it calls at every step, as transformers'
    loop does."""
    before = generate_each_way(model, batch)
    lengths = []

    @functools.wraps(call)
    def counted_call(self, *args, **kwargs):
        lengths.append(args[0].shape[1])
        return call(self, *args, **kwargs)

    monkeypatch.setattr(MaxLengthCriteria, "__init__", init)
    monkeypatch.setattr(MaxLengthCriteria, "__call__", counted_call)
    calls = transformers_loop_as_today(monkeypatch)
    assert_same(generate_each_way(model, batch), before)
    width = batch["input_ids"].shape[1]
    assert calls == [] and lengths == list(range(width + 1, width + 21)) * 2  # the lean loop called it every step


def test_a_resigned_prepare_inputs_for_generation_prepares_every_step(model, batch, monkeypatch):
    """The model prepares a one-token step itself (no mask, no positions) where transformers'
    `prepare_inputs_for_generation` takes the parameters verified; otherwise transformers prepares every step."""
    original = GenerationMixin.prepare_inputs_for_generation
    before = generate_each_way(model, batch, return_dict_in_generate=True)  # transformers' loop: a step per token
    calls = []

    def prepare(self, input_ids, next_sequence_length=None, cache=None, attention_mask=None, inputs_embeds=None,
                is_first_iteration=False, position_offset=0, **kwargs):
        calls.append(1)
        return original(self, input_ids, next_sequence_length=next_sequence_length, cache=cache,
                        attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                        is_first_iteration=is_first_iteration, **kwargs)

    monkeypatch.setattr(GenerationMixin, "prepare_inputs_for_generation", prepare)
    after = generate_each_way(model, batch, return_dict_in_generate=True)
    for name in SETTINGS:
        assert torch.equal(after[name].sequences, before[name].sequences)
    assert len(calls) == 2 * 20  # the prompt and the 19 steps after it, in each of the two generate() calls


def test_a_cache_without_update_recurrent_state_makes_generate_run_without_a_cache(model, batch, monkeypatch):
    """Where transformers' cache lacks what the model reads and writes (simulated: `update_recurrent_state` renamed),
    generate() runs without a cache, saying so, with the same sequences; a forward call returns no cache; and a cache
    passed in gets a one-line error that names the missing method."""
    before = generate_each_way(model, batch)
    with torch.no_grad():
        logits = model(**batch).logits
    monkeypatch.delattr(Cache, "update_recurrent_state")
    with pytest.warns(UserWarning, match="generate\\(\\) runs without a cache"):
        assert_same(generate_each_way(model, batch), before)
    with pytest.warns(UserWarning, match="returns no cache"), torch.no_grad():
        out = model(**batch)
    assert out.cache is None
    torch.testing.assert_close(out.logits, logits)
    with pytest.raises(ValueError, match="has no update_recurrent_state.*use_cache=False"):
        model(**batch, cache=DynamicCache(config=model.config))


@pytest.mark.parametrize("change", ["raises", "computes something else"])
def test_a_changed_onednn_op_makes_the_decoding_step_use_torchs_products(model, batch, monkeypatch, change):
    """The decoding step's oneDNN products (torch's private `torch.ops.mkldnn._linear_pointwise`) are checked once
    against `nn.functional.linear`; an op that fails or computes another thing is not used, and generate() gives
    the tokens of the sequence kernel."""
    if change == "raises":
        def linear_pointwise(*args, **kwargs):
            raise RuntimeError("the schema changed")
    else:
        def linear_pointwise(x, weight, bias, *args, **kwargs):
            return torch.zeros(x.shape[0], bias.shape[0])
    linear_pointwise.binary = linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", linear_pointwise)
    _onednn_linear_usable.cache_clear()
    try:
        assert not _onednn_linear_usable()
        out = model.generate(**batch, max_new_tokens=20, do_sample=False)
    finally:
        _onednn_linear_usable.cache_clear()
    expected = batch["input_ids"]
    mask = batch["attention_mask"]
    with torch.no_grad():
        for _ in range(20):  # greedy by whole-sequence forwards: the sequence kernel, no decoding step
            next_ids = model(input_ids=expected, attention_mask=mask, use_cache=False).logits[:, -1].argmax(-1)
            expected = torch.cat([expected, next_ids[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(out, expected)
