"""The server's decoding loop (char_lstm.serving.engine) in this process: every cell type, rows joining and leaving
a running batch, the adaptive softmax and bf16; the HTTP server is tested in tests/scripts/test_serve_script.py."""

import threading

import pytest
import torch

from char_lstm.serving.engine import Busy, Engine, Job
from char_lstm.serving.sampling import Settings
from helpers import CORPUS, adaptive_model, make_model


class Collected:
    """What the engine delivers for each job, and an event set when all of them finished."""

    def __init__(self, count: int):
        self.texts, self.reasons, self.entries, self.done = {}, {}, {}, threading.Event()
        self.count = count

    def deliver(self, job, text, entries, reason, error=None):
        assert error is None, error
        self.texts[id(job)] = self.texts.get(id(job), "") + text
        self.entries.setdefault(id(job), []).extend(entries)
        if reason is not None:
            self.reasons[id(job)] = reason
            if len(self.reasons) == self.count:
                self.done.set()


def serve(model, tokenizer, cases: list[tuple[str, Settings]], max_batch_size=4, seeds=None):
    """Run `cases` (prompt, settings) through an engine of `max_batch_size` rows (more cases than rows: requests
    wait, then join a running batch as rows free up); their texts and finish reasons in order."""
    collected = Collected(len(cases))
    engine = Engine(model, tokenizer, max_batch_size=max_batch_size)
    jobs = [Job(tokenizer(prompt)["input_ids"], settings, collected.deliver,
                generator=None if settings.seed is None else torch.Generator().manual_seed(settings.seed))
            for prompt, settings in cases]
    engine.start()
    try:
        for job in jobs:  # one at a time: each joins whatever is running
            engine.submit([job])
        assert collected.done.wait(60)
    finally:
        engine.stop()
    assert engine.slots_in_use == 0 and engine.queue_length == 0
    return [collected.texts.get(id(job), "") for job in jobs], [collected.reasons[id(job)] for job in jobs], \
        [collected.entries.get(id(job), []) for job in jobs]


def generated(model, tokenizer, prompt: str, max_tokens: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


PROMPTS = ["R", "ROMEO:\nBut, soft", "All:\nSpeak", "First Citizen:\nBefore we proceed any further", "a", "\t"]


def test_greedy_rows_joining_a_running_batch_get_what_generate_gives_alone(tokenizer, cell_type, monkeypatch):
    """Six requests on a batch of four rows (two wait, then join rows others left): each greedy text is
    generate()'s for its prompt alone, for every cell type."""
    monkeypatch.setattr("char_lstm.step_char_lstm._MKL_MAX_ROWS", 0)  # the server's products at one row too
    model = make_model(tokenizer, cell_type, hidden_size=64, embedding_size=16)
    cases = [(prompt, Settings(max_tokens=5 + 7 * i, temperature=0)) for i, prompt in enumerate(PROMPTS)]
    texts, reasons, _ = serve(model, tokenizer, cases)
    assert texts == [generated(model, tokenizer, prompt, settings.max_tokens) for prompt, settings in cases]
    assert reasons == ["length"] * len(cases)


def test_a_seeded_row_draws_the_same_text_whatever_else_is_served(tokenizer):
    model = make_model(tokenizer, "gru", hidden_size=64, embedding_size=16)
    seeded = ("ROMEO:", Settings(max_tokens=40, temperature=0.9, top_p=0.9, seed=7))
    alone, _, _ = serve(model, tokenizer, [seeded])
    others = [(prompt, Settings(max_tokens=30, temperature=1.0)) for prompt in PROMPTS]
    crowded, _, _ = serve(model, tokenizer, [*others[:3], seeded, *others[3:]])
    assert crowded[3] == alone[0] and alone[0]


def test_stop_strings_end_rows_and_logprobs_are_reported(tokenizer):
    model = make_model(tokenizer, "lstm", hidden_size=64, embedding_size=16)
    full = generated(model, tokenizer, "All:", 30)
    stop = full[12:14]
    texts, reasons, entries = serve(model, tokenizer, [
        ("All:", Settings(max_tokens=30, temperature=0, stop=(stop,))),
        ("All:", Settings(max_tokens=30, temperature=0, logprobs=3)),
    ])
    assert texts[0] == full[: full.index(stop)] and reasons[0] == "stop"
    assert "".join(text for text, _, _ in entries[1]) == full
    assert all(len(top) == 3 and logprob <= 0 and text in top for text, logprob, top in entries[1])


@pytest.mark.parametrize("kind", ["adaptive softmax", "bfloat16"])
def test_the_adaptive_softmax_head_and_bf16_weights_serve(tokenizer, kind):
    if kind == "bfloat16":
        model = make_model(tokenizer, "lstm", hidden_size=64, embedding_size=16).to(torch.bfloat16)
        prompt_tokenizer = tokenizer
    else:
        from char_lstm import CharLSTMTokenizer

        prompt_tokenizer = CharLSTMTokenizer.from_corpus(CORPUS + "".join(map(chr, range(0x400, 0x400 + 280))))
        model = adaptive_model(vocab_size=len(prompt_tokenizer)).eval()
    cases = [(prompt, Settings(max_tokens=25, temperature=t)) for prompt, t in zip(PROMPTS, (0, 0.8, 0, 1.2))]
    texts, reasons, _ = serve(model, prompt_tokenizer, cases, max_batch_size=3)
    assert reasons == ["length"] * 4 and all(texts)


def test_more_waiting_requests_than_the_limit_are_refused_all_or_none(tokenizer):
    engine = Engine(make_model(tokenizer, "rnn"), tokenizer, max_batch_size=1, max_waiting=2)
    job = Job([1, 2], Settings(), lambda *event: None)
    engine.submit([job, job])
    with pytest.raises(Busy, match="2 requests wait for a row"):
        engine.submit([job])
    assert engine.queue_length == 2
