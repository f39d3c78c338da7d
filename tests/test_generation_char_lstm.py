"""generate() with CharLSTMForCausalLM: one token per step, padding, beams, sampling, streaming, continuation, the
lean decoding loop, accelerate's cpu offload and the adaptive softmax head."""

from contextlib import nullcontext

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, TextStreamer

from char_lstm import CharLSTMConfig, CharLSTMForCausalLM
from char_lstm.step_char_lstm import _decoding_table_ids
from helpers import adaptive_model, chi_square, count_forward_calls, make_model


@pytest.fixture
def model(tokenizer):
    return make_model(tokenizer, "lstm", hidden_size=32)


def record_forward_lengths(model):
    lengths = []
    handle = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    return lengths, handle


def test_generate_feeds_one_token_per_step(tokenizer, cell_type):
    model = make_model(tokenizer, cell_type)
    prompt = tokenizer(["ROMEO:\nBut"], return_tensors="pt")
    lengths, handle = record_forward_lengths(model)
    out = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    handle.remove()
    assert out.shape == (1, prompt["input_ids"].shape[1] + 20)
    # the prompt once, then exactly one new token per forward: the prefix is never re-run
    assert lengths == [prompt["input_ids"].shape[1]] + [1] * 19


def test_greedy_with_cache_equals_recomputing_the_prefix(tokenizer, cell_type):
    model = make_model(tokenizer, cell_type)
    prompt = tokenizer(["hear me"], return_tensors="pt")
    cached = model.generate(**prompt, max_new_tokens=15, do_sample=False)
    uncached = model.generate(**prompt, max_new_tokens=15, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_left_padded_batch_generates_what_each_prompt_generates_alone(tokenizer, cell_type):
    model = make_model(tokenizer, cell_type)
    prompts = ["ROMEO:\nBut, soft", "All:", "First Citizen:\n"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    out = model.generate(
        **batch, max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    width = batch["input_ids"].shape[1]
    for row, prompt in enumerate(prompts):
        single = tokenizer([prompt], return_tensors="pt")
        alone = model.generate(
            **single, max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
        assert torch.equal(out.sequences[row, width:], alone.sequences[0, single["input_ids"].shape[1] :])
        for step_batch, step_alone in zip(out.logits, alone.logits):
            torch.testing.assert_close(step_batch[row], step_alone[0], rtol=1e-5, atol=1e-5)


def test_sampling_is_seeded_and_uses_the_cache_exactly(tokenizer, model):
    prompt = tokenizer(["All:\n"], return_tensors="pt")
    kwargs = dict(max_new_tokens=30, do_sample=True, temperature=0.8, top_k=20, top_p=0.95, repetition_penalty=1.1)
    torch.manual_seed(123)
    a = model.generate(**prompt, **kwargs)
    torch.manual_seed(123)
    b = model.generate(**prompt, **kwargs)
    torch.manual_seed(123)
    c = model.generate(**prompt, **kwargs, use_cache=False)
    torch.manual_seed(7)
    d = model.generate(**prompt, **kwargs)
    assert torch.equal(a, b)
    assert torch.equal(a, c)
    assert not torch.equal(a, d)


def test_top_k_1_sampling_is_greedy(tokenizer, model):
    prompt = tokenizer(["speak"], return_tensors="pt")
    greedy = model.generate(**prompt, max_new_tokens=10, do_sample=False)
    sampled = model.generate(**prompt, max_new_tokens=10, do_sample=True, top_k=1, temperature=1.5)
    assert torch.equal(greedy, sampled)


def test_num_return_sequences(tokenizer, model):
    batch = tokenizer(["All:", "ROMEO:"], return_tensors="pt", padding=True, padding_side="left")
    torch.manual_seed(0)
    out = model.generate(**batch, max_new_tokens=8, do_sample=True, num_return_sequences=3)
    assert out.shape == (6, batch["input_ids"].shape[1] + 8)
    assert torch.equal(out[:3, : batch["input_ids"].shape[1]], batch["input_ids"][0].expand(3, -1))
    assert torch.equal(out[3:, : batch["input_ids"].shape[1]], batch["input_ids"][1].expand(3, -1))
    assert len({tuple(row.tolist()) for row in out[:3]}) > 1  # sampled sequences differ


def test_beam_search_reorders_the_state(tokenizer, cell_type):
    model = make_model(tokenizer, cell_type, hidden_size=32)
    batch = tokenizer(["ROMEO:\nBut", "All:"], return_tensors="pt", padding=True, padding_side="left")
    kwargs = dict(max_new_tokens=10, num_beams=4, num_return_sequences=2, do_sample=False)
    with_cache = model.generate(**batch, **kwargs, return_dict_in_generate=True, output_scores=True)
    without_cache = model.generate(
        **batch, **kwargs, use_cache=False, return_dict_in_generate=True, output_scores=True
    )
    assert with_cache.sequences.shape == (4, batch["input_ids"].shape[1] + 10)
    # reordering the recurrent state with the beams gives what re-running every beam's prefix gives
    assert torch.equal(with_cache.sequences, without_cache.sequences)
    torch.testing.assert_close(with_cache.sequences_scores, without_cache.sequences_scores, rtol=1e-5, atol=1e-5)


def test_eos_stops_generation(tokenizer, model):
    prompt = tokenizer(["hear me"], return_tensors="pt")
    free = model.generate(**prompt, max_new_tokens=10, do_sample=False)
    new = free[0, prompt["input_ids"].shape[1] :].tolist()
    eos = new[3]
    stop_at = new.index(eos)
    stopped = model.generate(**prompt, max_new_tokens=10, do_sample=False, eos_token_id=eos)
    assert stopped[0, prompt["input_ids"].shape[1] :].tolist() == new[: stop_at + 1]


def test_return_dict_in_generate_with_scores(tokenizer, model):
    prompt = tokenizer(["speak"], return_tensors="pt")
    out = model.generate(
        **prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_scores=True
    )
    assert len(out.scores) == 6
    assert all(score.shape == (1, len(tokenizer)) for score in out.scores)
    new = out.sequences[0, prompt["input_ids"].shape[1] :]
    assert torch.equal(torch.stack([score[0].argmax() for score in out.scores]), new)
    assert isinstance(out.cache, DynamicCache)


def test_streamer_prints_the_generated_text_in_order(tokenizer, model, capsys):
    prompt = tokenizer(["ROMEO:"], return_tensors="pt")
    streamer = TextStreamer(tokenizer, skip_prompt=True)
    out = model.generate(**prompt, max_new_tokens=25, do_sample=False, streamer=streamer)
    printed = capsys.readouterr().out
    expected = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])
    assert printed.rstrip("\n") == expected.rstrip("\n")


@pytest.mark.parametrize("passed", ["full sequence", "new tokens only"])
def test_returned_cache_continues_the_sequence_exactly(tokenizer, cell_type, passed):
    """Both of transformers' conventions for a returned cache: the full sequence, or the new tokens only with the
    mask of the full sequence."""
    model = make_model(tokenizer, cell_type)
    batch = tokenizer(["ROMEO:\nBut, soft", "All:"], return_tensors="pt", padding=True, padding_side="left")
    reference = model.generate(**batch, max_new_tokens=16, do_sample=False)

    first = model.generate(**batch, max_new_tokens=7, do_sample=False, return_dict_in_generate=True)
    mask = torch.cat([batch["attention_mask"], torch.ones(2, 7, dtype=torch.long)], dim=1)
    lengths, handle = record_forward_lengths(model)
    given = first.sequences if passed == "full sequence" else first.sequences[:, -1:]
    second = model.generate(given, attention_mask=mask, cache=first.cache, max_new_tokens=9, do_sample=False)
    handle.remove()
    assert torch.equal(second, reference if passed == "full sequence" else reference[:, -10:])
    assert lengths[0] == 1  # only the last generated token, not yet seen by the state, is fed again
    if passed == "new tokens only":
        refused = "consumed 31 tokens and 1 new ones were passed, but the attention mask has 15 columns \\(expected 32"
        with pytest.raises(ValueError, match=refused):
            model.generate(second[:, -1:], attention_mask=mask[:, :-8], cache=first.cache, max_new_tokens=2)


def test_the_cache_counts_the_columns_it_consumed(tokenizer, cell_type):
    """`cache.get_seq_length()` is what transformers (5.25 on) slices a continued sequence by: it counts every column
    the states consumed, padding included, where the cache layers keep a count."""
    model = make_model(tokenizer, cell_type)
    batch = tokenizer(["ROMEO:\nBut, soft", "All:"], return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        out = model(**batch, use_cache=True)
    width = batch["input_ids"].shape[1]
    if not hasattr(out.cache.layers[0], "cumulative_length_linear"):
        pytest.skip("this transformers' recurrent cache layers keep no count (before 5.25)")
    assert int(out.cache.get_seq_length()) == width
    assert all(int(out.cache.get_seq_length(i)) == width for i in range(len(out.cache.layers)))
    generated = model.generate(**batch, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    assert int(generated.cache.get_seq_length()) == width + 4  # the last token was never fed
    generated.cache.reset()
    assert int(generated.cache.get_seq_length()) == 0


def test_chunked_prefill_gives_the_same_sequences(tokenizer, cell_type):
    """`prefill_chunk_size` feeds the prompt in chunks. transformers 5.24 cannot cut it for a cache of recurrent-state
    layers only (its `get_seq_length()` refuses one): the model then feeds it whole, saying so, with the same
    sequences."""
    model = make_model(tokenizer, cell_type)
    batch = tokenizer(["ROMEO:\nBut, soft! what light", "All:"], return_tensors="pt", padding=True,
                      padding_side="left")
    reference = model.generate(**batch, max_new_tokens=12, do_sample=False)
    counting = hasattr(DynamicCache(config=model.config).layers[0], "cumulative_length_linear")  # 5.25 on
    lengths, handle = record_forward_lengths(model)
    with nullcontext() if counting else pytest.warns(UserWarning, match="prefill_chunk_size is ignored"):
        chunked = model.generate(**batch, max_new_tokens=12, do_sample=False, prefill_chunk_size=8)
    handle.remove()
    assert torch.equal(chunked, reference)
    width = batch["input_ids"].shape[1]
    chunks = [8] * (width // 8) + ([width % 8] if width % 8 else []) if counting else [width]
    assert lengths[: -(12 - 1)] == chunks


def test_continuing_with_a_shorter_input_is_refused(tokenizer, model):
    prompt = tokenizer(["ROMEO:"], return_tensors="pt")
    first = model.generate(**prompt, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    with pytest.raises(ValueError, match="pass the full sequence"):
        model.generate(prompt["input_ids"], cache=first.cache, max_new_tokens=3)


def test_cost_per_token_does_not_depend_on_position(tokenizer, model):
    """Each decode step sees a (B, 1) input and a fixed-size state, whatever was generated before."""
    prompt = tokenizer(["All:"], return_tensors="pt")
    shapes = []
    handle = model.model.register_forward_hook(
        lambda module, args, kwargs, out: shapes.append(
            (kwargs["input_ids"].shape, tuple(s.shape for s in out.cache.layers[0].recurrent_states.values()))
        ),
        with_kwargs=True,
    )
    model.generate(**prompt, max_new_tokens=200, do_sample=False)
    handle.remove()
    assert len(set(shapes[1:])) == 1
    assert shapes[-1][0] == (1, 1)


def test_a_prompt_of_unknown_characters_only_is_read_like_any_ids(tokenizer, model):
    """The model accepts every id of its vocabulary, <unk> included (transformers' common tests prompt with any id);
    refusing a typed prompt of unknown characters is the scripts' job (tests/scripts/test_generate_script.py)."""
    ids = tokenizer(["###"], return_tensors="pt")
    assert (ids["input_ids"] == tokenizer.unk_token_id).all()
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    unk_row = torch.full((1, 3), tokenizer.unk_token_id)
    assert torch.equal(out, model.generate(unk_row, attention_mask=torch.ones_like(unk_row), max_new_tokens=3,
                                           do_sample=False))
    assert out.shape == (1, 6)


def test_generate_from_inputs_embeds(tokenizer, model):
    prompt = tokenizer(["ROMEO:"], return_tensors="pt")
    embeds = model.get_input_embeddings()(prompt["input_ids"])
    from_embeds = model.generate(inputs_embeds=embeds, max_new_tokens=8, do_sample=False)
    from_ids = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(from_embeds, from_ids[:, -8:])


# ---------------------------------------------------------------------------------------------------------------------
# The lean decoding loop (CharLSTMForCausalLM._sample on a CPU) against transformers' own loop


class transformers_loop:
    """Within it, generate() runs transformers' own `_sample` loop: a forward hook on the head (here doing nothing)
    is one of the things the lean loop leaves to it."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.handle = self.model.lm_head.register_forward_hook(lambda module, args, out: None)

    def __exit__(self, *exc):
        self.handle.remove()


def both_loops(model, seed=0, **kwargs):
    """generate(**kwargs) by the lean loop and by transformers' loop, from the same random state."""
    torch.manual_seed(seed)
    lean = model.generate(**kwargs)
    with transformers_loop(model):
        torch.manual_seed(seed)
        reference = model.generate(**kwargs)
    return lean, reference


def test_the_lean_loop_calls_the_model_for_the_prompt_only(tokenizer, model, monkeypatch):
    prompt = tokenizer(["ROMEO:"], return_tensors="pt")
    calls = count_forward_calls(monkeypatch)
    torch.manual_seed(0)
    lean = model.generate(**prompt, max_new_tokens=30, do_sample=True)
    assert len(calls) == 1  # the prompt; the 29 steps after it ran in the lean loop
    with transformers_loop(model):
        torch.manual_seed(0)
        reference = model.generate(**prompt, max_new_tokens=30, do_sample=True)
    assert len(calls) == 1 + 30
    assert torch.equal(lean, reference)
    # what the lean loop leaves to transformers' loop: scores to return, training mode
    del calls[:]
    model.generate(**prompt, max_new_tokens=5, return_dict_in_generate=True, output_scores=True)
    assert len(calls) == 5
    model.train()
    model.generate(**prompt, max_new_tokens=5)
    assert len(calls) == 10


@pytest.mark.parametrize("options", [
    dict(do_sample=True, temperature=0.8),
    dict(do_sample=True, temperature=1.3, top_k=5, top_p=0.9, repetition_penalty=1.3, min_new_tokens=10),
    dict(do_sample=False),
    dict(do_sample=False, no_repeat_ngram_size=2),
])
def test_the_lean_loop_generates_what_transformers_loop_generates(tokenizer, cell_type, options):
    model = make_model(tokenizer, cell_type, hidden_size=32)
    batch = tokenizer(["ROMEO:\nBut, soft", "All:"], return_tensors="pt", padding=True, padding_side="left")
    lean, reference = both_loops(model, **batch, max_new_tokens=40, **options)
    assert torch.equal(lean, reference)


def test_the_lean_loop_stops_rows_at_eos_and_pads_them_as_transformers_does(tokenizer, model):
    batch = tokenizer(["ROMEO:", "All:", "First"], return_tensors="pt", padding=True, padding_side="left")
    reference_free = model.generate(**batch, max_new_tokens=30, do_sample=False)
    width = batch["input_ids"].shape[1]
    eos = int(reference_free[0, width + 3])  # the 4th greedy character of row 0: row 0 stops there
    lean, reference = both_loops(model, **batch, max_new_tokens=30, do_sample=False, eos_token_id=eos,
                                 pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(lean, reference)
    assert (lean[0, width + 4 :] == tokenizer.pad_token_id).all()


def test_the_lean_loop_honours_other_stopping_criteria(tokenizer, model):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class AfterLength(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 17, dtype=torch.bool)

    prompt = tokenizer(["ROMEO:"], return_tensors="pt")
    lean, reference = both_loops(model, **prompt, max_new_tokens=40, do_sample=True,
                                 stopping_criteria=StoppingCriteriaList([AfterLength()]))
    assert lean.shape[1] == 17
    assert torch.equal(lean, reference)


def test_the_lean_loop_streams_and_leaves_the_cache_as_transformers_loop_does(tokenizer, cell_type):
    model = make_model(tokenizer, cell_type, hidden_size=32)
    prompt = tokenizer(["ROMEO:"], return_tensors="pt")
    results = []
    for loop in (nullcontext, lambda: transformers_loop(model)):
        cache, streamed = DynamicCache(config=model.config), []

        class Recorder:
            def put(self, value):
                streamed.append(value.tolist())

            def end(self):
                streamed.append("end")

        with loop():
            torch.manual_seed(3)
            out = model.generate(**prompt, cache=cache, max_new_tokens=12, do_sample=True, streamer=Recorder())
            more = model.generate(out, cache=cache, attention_mask=torch.ones_like(out), max_new_tokens=5,
                                  do_sample=False)
        states = [tuple(s.clone() for s in layer.recurrent_states.values()) for layer in cache.layers]
        results.append((out, more, streamed, states))
    (out, more, streamed, states), (out_ref, more_ref, streamed_ref, states_ref) = results
    assert torch.equal(out, out_ref) and torch.equal(more, more_ref)
    assert streamed == streamed_ref and streamed[-1] == "end"
    for layer, layer_ref in zip(states, states_ref):
        for state, state_ref in zip(layer, layer_ref):
            torch.testing.assert_close(state, state_ref, rtol=1e-6, atol=1e-6)


def test_the_lean_loop_without_the_input_table(tokenizer):
    """A vocabulary too large for the first layer's lookup table: the lean loop embeds and multiplies instead."""
    from char_lstm.step_char_lstm import _INPUT_TABLE_MAX_ELEMENTS

    model = make_model(tokenizer, "lstm", hidden_size=8, embedding_size=4)
    model.resize_token_embeddings(_INPUT_TABLE_MAX_ELEMENTS // (4 * 8) + 1)
    assert _decoding_table_ids(model.model, torch.zeros(1, 1, dtype=torch.long)) is None
    prompt = tokenizer(["ROMEO:"], return_tensors="pt")
    lean, reference = both_loops(model, **prompt, max_new_tokens=20, do_sample=False)
    assert torch.equal(lean, reference)


def test_the_lean_loop_in_bfloat16(tokenizer, model):
    model = model.to(torch.bfloat16)
    prompt = tokenizer(["ROMEO:"], return_tensors="pt")
    lean, reference = both_loops(model, **prompt, max_new_tokens=20, do_sample=True)
    assert torch.equal(lean, reference)


def test_a_forward_wrapped_in_autocast_as_accelerate_does_runs_transformers_loop(tokenizer, model):
    """A bf16 training run samples text from the model accelerate prepared: its forward, wrapped on the instance in
    autocast, computes in bf16; the lean loop, which would compute outside it, leaves such a model to transformers'
    loop (it failed there with a dtype mismatch)."""
    from types import MethodType

    from accelerate.utils import convert_outputs_to_fp32

    prompt = tokenizer(["ROMEO:"], return_tensors="pt")
    torch.manual_seed(0)
    plain = model.generate(**prompt, max_new_tokens=10, do_sample=False)
    forward = torch.autocast(device_type="cpu", dtype=torch.bfloat16)(CharLSTMForCausalLM.forward)
    model.forward = MethodType(convert_outputs_to_fp32(forward), model)
    out = model.generate(**prompt, max_new_tokens=10, do_sample=False)
    assert out.shape == plain.shape
    with transformers_loop(model):
        reference = model.generate(**prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(out, reference)


def test_the_lean_loop_under_autocast_reads_the_states_as_transformers_loop_does(tokenizer):
    """Under a user's autocast the prompt's LSTM kernel leaves bf16 states in the cache, which transformers' loop
    reads back at every step: the lean loop leaves such a run to it (it kept float32 states and drifted apart)."""
    model = make_model(tokenizer, "lstm", hidden_size=64)
    prompt = tokenizer(["ROMEO:"], return_tensors="pt")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lean, reference = both_loops(model, seed=1, **prompt, max_new_tokens=300, do_sample=True,
                                     num_return_sequences=4)
    assert torch.equal(lean, reference)


def test_dropout_on_in_a_submodule_and_a_head_with_its_own_forward_run_transformers_loop(tokenizer):
    model = make_model(tokenizer, "lstm", hidden_size=32, dropout=0.5)
    prompt = tokenizer(["ROMEO:"], return_tensors="pt")
    model.model.dropout.train()  # Monte Carlo dropout sampling: the top model stays in eval mode
    lean, reference = both_loops(model, seed=0, **prompt, max_new_tokens=20, do_sample=True)
    assert torch.equal(lean, reference)
    model.eval()

    class ScaledHead(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 4

    head = ScaledHead(model.config.hidden_size, model.config.vocab_size)
    head.load_state_dict(model.lm_head.state_dict())
    model.lm_head = head
    lean, reference = both_loops(model, seed=0, **prompt, max_new_tokens=20, do_sample=True)
    assert torch.equal(lean, reference)


def test_the_lean_loop_calls_criteria_before_the_streamer_at_every_step(tokenizer, model):
    from transformers import StoppingCriteria, StoppingCriteriaList

    prompt = tokenizer(["ROMEO:"], return_tensors="pt")
    events = {}
    for name, loop in (("lean", nullcontext), ("reference", lambda: transformers_loop(model))):
        log = events[name] = []

        class Logged(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                # what transformers' loop passes as `scores` (None unless scores are returned) is passed the same
                log.append(("criteria", input_ids.shape[1], type(scores)))
                return torch.zeros(input_ids.shape[0], dtype=torch.bool)

        class Streamer:
            def put(self, value):
                log.append(("put", value.shape))

            def end(self):
                log.append(("end",))

        with loop():
            model.generate(**prompt, max_new_tokens=10, do_sample=False, streamer=Streamer(),
                           stopping_criteria=StoppingCriteriaList([Logged()]))
    assert events["lean"] == events["reference"]
    assert sum(1 for event in events["lean"] if event[0] == "criteria") == 10


def test_stop_strings_with_the_tokenizer(tokenizer, model):
    """generate(stop_strings=..., tokenizer=...) hands `tokenizer` on with the model's keyword arguments."""
    prompt = tokenizer(["ROMEO:"], return_tensors="pt")
    free = tokenizer.decode(model.generate(**prompt, max_new_tokens=40, do_sample=False)[0])
    stop = free[len("ROMEO:") + 5]  # the 6th generated character
    lean, reference = both_loops(model, **prompt, max_new_tokens=40, do_sample=False, stop_strings=[stop],
                                 tokenizer=tokenizer)
    assert torch.equal(lean, reference)
    text = tokenizer.decode(lean[0])
    assert text.endswith(stop) and len(text) < len(free)


def test_a_pad_id_outside_the_vocabulary_gets_forwards_message(tokenizer, model):
    batch = tokenizer(["ROMEO:", "All:"], return_tensors="pt", padding=True, padding_side="left")
    eos = int(model.generate(**batch, max_new_tokens=2, do_sample=False)[0, -2])
    with pytest.raises(ValueError, match="outside"):
        model.generate(**batch, max_new_tokens=20, do_sample=False, eos_token_id=eos,
                       pad_token_id=model.config.vocab_size + 3)


def test_a_forward_hook_on_a_recurrent_layer_sees_every_token_generate_feeds(tokenizer, cell_type):
    """generate() feeds the new tokens one by one; the one-token step, which computes the layers itself, stands aside
    for a layer with a forward hook, so the hook sees every call (it saw the prompt only), each with the output the
    whole sequence gives at that position, and the text is the one generated without the hook."""
    model = make_model(tokenizer, cell_type)
    prompt = tokenizer(["ROMEO:\nBut"], return_tensors="pt")
    length = prompt["input_ids"].shape[1]
    expected = model.generate(**prompt, max_new_tokens=10, do_sample=False)
    seen = []
    handle = model.model.layers[-1].register_forward_hook(lambda module, args, output: seen.append(output[0][:, -1]))
    try:
        out = model.generate(**prompt, max_new_tokens=10, do_sample=False)
    finally:
        handle.remove()
    assert torch.equal(out, expected)
    assert len(seen) == 10  # the prompt, then the first nine new tokens (the tenth is not fed)
    with torch.no_grad():
        hidden = model.model(input_ids=out[:, :-1]).last_hidden_state  # (1, length + 9, H)
    torch.testing.assert_close(torch.stack(seen, dim=1), hidden[:, length - 1 :], rtol=1e-5, atol=1e-5)


def test_generate_with_a_dynamically_quantized_head_equals_greedy_full_forwards(tokenizer):
    """`torch.ao.quantization.quantize_dynamic` replaces the head by a Linear without a `weight` tensor: generate()
    read the device of the ids from it and crashed on every token after the prompt."""
    import warnings

    model = make_model(tokenizer, hidden_size=32).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notes
        quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    assert type(quantized.lm_head) is not torch.nn.Linear
    ids = tokenizer(["hear me"], return_tensors="pt")["input_ids"]
    out = quantized.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    expected = ids
    with torch.no_grad():
        for _ in range(8):
            next_id = quantized(input_ids=expected, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            expected = torch.cat([expected, next_id], dim=1)
    assert torch.equal(out, expected)


# ---------------------------------------------------------------------------------------------------------------------
# generate() under accelerate's cpu offload and with the adaptive softmax head


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
