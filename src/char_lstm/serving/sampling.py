"""Each request's own sampling settings, applied to its row of a batch: greedy, temperature, top-p, a seed, and the
character-level log-probabilities OpenAI's completions report.

Every operation here works row by row (the argmax, the softmax, the sort of top-p, a seeded row's draw with its own
generator), so a row's choice does not depend on the rows beside it. Rows without a seed draw together, from torch's
global generator.
"""

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class Settings:
    """One completion's settings, as the request gave them (checked by the server)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy, OpenAI's convention for deterministic output
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # how many most likely characters to report at each position (0-5), None: none
    prompt_logprobs: bool = False  # the prompt's characters' log-probabilities too (echo with logprobs: scoring)

    @cached_property
    def longest_stop(self) -> int:
        return max((len(stop) for stop in self.stop), default=0)


def _top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """`probs` (k, V) with the characters outside each row's nucleus set to 0: the smallest set of most likely
    characters whose probability reaches the row's `top_p` (k,) (at least one character)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # the mass of the more likely characters
    sorted_probs = sorted_probs.masked_fill(before >= top_p[:, None], 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def choose_tokens(logits: torch.Tensor, jobs: list) -> torch.Tensor:
    """The next token of each row (n,) from `logits` (n, V) in float32, by its job's settings: the argmax for
    temperature 0; else a draw from softmax(logits / temperature), within top-p, with the job's generator when it has
    a seed."""
    tokens = torch.argmax(logits, dim=-1)
    sampled = [row for row, job in enumerate(jobs) if job.settings.temperature > 0]
    if not sampled:
        return tokens
    index = torch.tensor(sampled, device=logits.device)
    settings = [jobs[row].settings for row in sampled]
    temperatures = {s.temperature for s in settings}
    scores = logits if len(sampled) == len(jobs) else logits.index_select(0, index)
    if len(temperatures) == 1:  # the same division, by a number instead of a column of it
        probs = torch.softmax(scores / temperatures.pop(), dim=-1)
    else:
        probs = torch.softmax(scores / torch.tensor([s.temperature for s in settings], device=logits.device)[:, None],
                              dim=-1)
    if any(s.top_p < 1 for s in settings):
        probs = _top_p(probs, torch.tensor([s.top_p for s in settings], device=logits.device))
    seeded = [i for i, row in enumerate(sampled) if jobs[row].generator is not None]
    unseeded = [i for i in range(len(sampled)) if jobs[sampled[i]].generator is None]
    if len(unseeded) == len(jobs):
        tokens = torch.multinomial(probs, 1).squeeze(1)
    elif unseeded:
        tokens[index[unseeded]] = torch.multinomial(probs[unseeded], 1).squeeze(1)
    for i in seeded:
        generator = jobs[sampled[i]].generator
        tokens[sampled[i]] = torch.multinomial(probs[i].cpu(), 1, generator=generator)[0].to(tokens.device)
    return tokens


def logprob_entries(logits: torch.Tensor, token_id: int, top: int, pieces: list[str]) -> tuple:
    """(the token's text, its log-probability, {text: log-probability} of the `top` most likely characters) from one
    row of logits (V,): the model's own distribution, before temperature and top-p (as OpenAI reports them)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    best = {}
    if top:
        values, ids = log_probs.topk(top)
        best = {pieces[i]: float(v) for v, i in zip(values.tolist(), ids.tolist())}
    return pieces[token_id], float(log_probs[token_id]), best


def prompt_logprob_entries(logits: torch.Tensor, ids: list[int], top: int, pieces: list[str]) -> list[tuple]:
    """`logprob_entries` of every character of a prompt, each scored by the logits (T, V) of the position before it
    (the model's forward over the prompt); the first character has none (None, None), as OpenAI reports it."""
    log_probs = torch.log_softmax(logits[:-1].float(), dim=-1)
    chosen = log_probs.gather(1, torch.tensor(ids[1:], device=logits.device)[:, None])[:, 0].tolist()
    tops = [{}] * len(chosen)
    if top:
        values, best = log_probs.topk(top, dim=-1)
        tops = [{pieces[i]: v for v, i in zip(row_values, row_ids)}
                for row_values, row_ids in zip(values.tolist(), best.tolist())]
    return [(pieces[ids[0]], None, None)] + [(pieces[i], lp, t) for i, lp, t in zip(ids[1:], chosen, tops)]
