"""Continuous batching of recurrent states: one decoding loop over the rows of the requests being served.

A recurrent model's whole memory of a text is a fixed-size state per layer (``(h, c)`` for an LSTM, each ``(H,)``),
so a request can join the running batch at any step and leave at any step: no paging, no memory growing with the
text. `Engine` keeps the states of the running requests as rows of one batch (``(n, H)`` per state tensor). Each
loop iteration it reads the prompts of waiting requests (each alone, through the model's forward, as `generate()`
reads a prompt), appends their rows, runs one step of every row (the model's one-token step and head, as
`generate()`'s lean loop runs them), picks each row's next character with that row's own settings, and drops the
rows that finished (end of text, `max_tokens`, a stop string, a client gone); a freed row is taken at the next step.

Exactness: on a CPU in float32 a row's arithmetic does not depend on the rows beside it (the step's products are
oneDNN's prepacked ones, row by row the same at every batch size), so a greedy request gets exactly what
`model.generate(do_sample=False)` gives for its prompt alone, and a seeded one the same text whatever else is served
(docs/serving.md). The loop runs in a thread of its own; torch releases the GIL while it computes.

Shapes: ``n`` running rows, ``H`` hidden size, ``V`` vocabulary size.
"""

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..cache_char_lstm import _read_state
from ..generation_char_lstm import _lean_head, _lean_layers, _lean_plan
from .sampling import Settings, choose_tokens, logprob_entries, prompt_logprob_entries


logger = logging.getLogger(__name__)


class Busy(Exception):
    """More requests wait than the server takes (`max_waiting`): the client should retry later."""


@dataclass
class Job:
    """One completion being generated: a prompt's ids, its settings, and where its events go.

    `deliver(job, text, entries, finish_reason, error=None)` is called from the loop's thread, once per step with the
    text the job may show so far (characters that could start a stop string are held back), their log-probability
    entries (with `settings.logprobs`) and, at the end, the reason it finished ("stop", "length", "abort"; "error"
    with the error's line)."""

    prompt_ids: list[int]
    settings: Settings
    deliver: Callable
    generator: torch.Generator | None = None
    sink: object = None  # where the server reads this job's events (its request's queue)
    index: int = 0  # its choice's index in the request's response
    cancelled: bool = False
    done: bool = False
    pieces: list = field(default_factory=list)  # (text, entry) of every generated token
    prompt_entries: list = field(default_factory=list)  # the prompt's (text, logprob, top) with prompt_logprobs
    text: str = ""
    shown: int = 0  # characters of `text` delivered
    shown_pieces: int = 0
    generated: int = 0  # tokens generated (the usage's completion count)
    first_at: float | None = None  # perf_counter of the first character
    started: float = field(default_factory=time.perf_counter)


class Engine:
    """The decoding loop over the rows of the requests being served (the module docstring says how)."""

    def __init__(self, model: nn.Module, tokenizer, max_batch_size: int = 64, max_waiting: int = 1024,
                 on_step: Callable | None = None):
        self.model, self.max_batch_size, self.max_waiting = model.eval(), max_batch_size, max_waiting
        self.on_step = on_step
        vocab = len(tokenizer)
        special = set(tokenizer.all_special_ids)
        # the text of every id (special tokens show nothing, as generate()'s decode(skip_special_tokens=True))
        self.pieces = ["" if i in special else tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(i)])
                       for i in range(vocab)]
        self.eos_id = tokenizer.eos_token_id
        self.num_states = model.config.number_of_conv_states
        self.device = next(model.parameters()).device
        with torch.inference_mode():
            self.plan = _lean_plan(model, torch.zeros(1, 1, dtype=torch.long, device=self.device))
        for linear in [layer[1] for layer in self.plan[0]] + [layer[2] for layer in self.plan[0]] + [self.plan[3]]:
            if hasattr(linear, "mkl_rows"):
                linear.mkl_rows = 0  # oneDNN at every batch size: a row's values never depend on the batch
        self.rows: list[Job] = []
        self.states: list[tuple[torch.Tensor, ...]] = []
        self.tokens = torch.zeros(0, dtype=torch.long, device=self.device)
        self.waiting: deque[Job] = deque()
        self.condition = threading.Condition()
        self.stopping = False
        self.steps = 0
        self.thread = threading.Thread(target=self._run, name="char_lstm-decoding", daemon=True)

    # -----------------------------------------------------------------------------------------------------------------
    # What the server calls (from its event loop's thread)

    def start(self) -> None:
        self.thread.start()

    def submit(self, jobs: list[Job]) -> None:
        """Queue `jobs` (the choices of one request, all or none); `Busy` when `max_waiting` would be exceeded."""
        with self.condition:
            if self.stopping:
                raise Busy("the server is shutting down")
            if len(self.waiting) + len(jobs) > self.max_waiting:
                raise Busy(f"{len(self.waiting)} requests wait for a row, the server's limit is {self.max_waiting}")
            self.waiting.extend(jobs)
            self.condition.notify()

    def cancel(self, jobs: list[Job]) -> None:
        """Stop generating for `jobs` (a client gone): their rows are freed at the next step."""
        with self.condition:
            for job in jobs:
                job.cancelled = True
            self.condition.notify()

    def stop(self, timeout: float = 5.0) -> None:
        """End every request now (finish reason "abort", their streams close cleanly), then the loop."""
        with self.condition:
            self.stopping = True
            self.condition.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)

    @property
    def slots_in_use(self) -> int:
        return len(self.rows)

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    # -----------------------------------------------------------------------------------------------------------------
    # The loop (its own thread)

    def _run(self) -> None:
        while True:
            with self.condition:
                while not self.waiting and not self.rows and not self.stopping:
                    self.condition.wait()
                if self.stopping:
                    self._abort_all()
                    if self.on_step is not None:
                        self.on_step(self)
                    return
                admitted = [self.waiting.popleft() for _ in range(min(len(self.waiting),
                                                                      self.max_batch_size - len(self.rows)))]
            try:
                with torch.inference_mode():
                    for job in admitted:
                        self._read_prompt(job)
                    self._leave()
                    if self.rows:
                        self._step()
                        self._leave()
            except Exception as error:  # the loop must not die: every running request gets the error
                logger.exception("The decoding loop failed")
                for job in self.rows + [job for job in admitted if not job.done]:
                    job.deliver(job, "", [], "error", f"{type(error).__name__}: {error}")
                self.rows, self.states, self.tokens = [], [], self.tokens[:0]
            if self.on_step is not None:
                self.on_step(self)

    def _read_prompt(self, job: Job) -> None:
        """The prompt through the model (as generate() reads it), its first character, and its row in the batch."""
        if job.cancelled:
            return
        ids = torch.tensor([job.prompt_ids], dtype=torch.long, device=self.device)
        outputs = self.model(input_ids=ids, use_cache=True)
        if job.settings.prompt_logprobs:  # each prompt character scored by the ones before it (the first: none)
            job.prompt_entries = prompt_logprob_entries(outputs.logits[0], job.prompt_ids, job.settings.logprobs,
                                                        self.pieces)
        if job.settings.max_tokens == 0:  # the prompt alone (echo)
            job.done = True
            job.deliver(job, "", [], "length")
            return
        logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32)
        state = [_read_state(outputs.cache, layer, self.num_states) for layer in range(len(self.plan[0]))]
        token = choose_tokens(logits, [job])
        token_id = int(token[0])
        self._append(job, token_id, logits, 0)
        if not self._finished(job, token_id):
            self.rows.append(job)
            self.states = [tuple(torch.cat([old, new]) for old, new in zip(olds, news))
                           for olds, news in zip(self.states, state)] if self.states else state
            self.tokens = torch.cat([self.tokens, token])

    def _step(self) -> None:
        """One character for every running row."""
        hidden = _lean_layers(self.plan, self.tokens, self.states)
        logits = _lean_head(self.plan, hidden)
        self.tokens = choose_tokens(logits, self.rows)
        self.steps += 1
        for row, (job, token_id) in enumerate(zip(self.rows, self.tokens.tolist())):
            self._append(job, token_id, logits, row)
            self._finished(job, token_id)

    def _append(self, job: Job, token_id: int, logits: torch.Tensor, row: int) -> None:
        """Add the token `token_id` chosen for `job` from row `row` of `logits` (V,) to its text."""
        job.generated += 1
        if token_id == self.eos_id:
            return
        entry = None
        if job.settings.logprobs is not None:
            entry = logprob_entries(logits[row], token_id, job.settings.logprobs, self.pieces)
        job.pieces.append((self.pieces[token_id], entry))
        job.text += self.pieces[token_id]

    def _finished(self, job: Job, token_id: int) -> bool:
        """Deliver what `job` may show after its newest token; True (and `job.done`) when it is finished."""
        settings = job.settings
        reason = "stop" if token_id == self.eos_id else None
        stop_at = None
        if settings.stop:
            start = job.shown  # the characters shown hold no start of a stop string (held back until they cannot)
            found = [i for i in (job.text.find(stop, start) for stop in settings.stop) if i >= 0]
            if found:
                stop_at, reason = min(found), "stop"
        if reason is None and job.generated >= settings.max_tokens:
            reason = "length"
        end = stop_at if stop_at is not None else (len(job.text) if reason else
                                                   len(job.text) - max(0, settings.longest_stop - 1))
        self._deliver(job, max(end, job.shown), reason)
        job.done = reason is not None or job.cancelled
        return job.done

    def _deliver(self, job: Job, end: int, reason: str | None) -> None:
        """The characters of `job.text` up to `end` not shown yet, with their log-probability entries."""
        text, entries, length = "", [], job.shown
        while job.shown_pieces < len(job.pieces) and length + len(job.pieces[job.shown_pieces][0]) <= end:
            piece, entry = job.pieces[job.shown_pieces]
            text, length, job.shown_pieces = text + piece, length + len(piece), job.shown_pieces + 1
            if entry is not None:
                entries.append(entry)
        if text or reason:
            if text and job.first_at is None:
                job.first_at = time.perf_counter()
            job.shown += len(text)
            job.deliver(job, text, entries, reason)

    def _leave(self) -> None:
        """Drop the rows whose requests finished or were cancelled; the rows after them move up."""
        keep = [row for row, job in enumerate(self.rows) if not (job.done or job.cancelled)]
        if len(keep) == len(self.rows):
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.rows = [self.rows[row] for row in keep]
        self.states = [tuple(state.index_select(0, index) for state in layer) for layer in self.states]
        self.tokens = self.tokens.index_select(0, index)

    def _abort_all(self) -> None:
        for job in self.rows + list(self.waiting):
            if not job.cancelled:
                self._deliver(job, len(job.text), "abort")
        self.rows, self.waiting = [], deque()
