"""What evaluation measures: bits per character and perplexity, from one loss per position."""

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from ..metrics import load_bits_per_character


def preprocess_logits_for_metrics(logits: torch.Tensor, labels: torch.Tensor, shifted: bool = False) -> torch.Tensor:
    """Per-position loss of the next character, so evaluation keeps B*T numbers instead of B*T*V.

    `labels` are the inputs (transformers' convention: position t predicts label t + 1), or with `shifted=True` the
    targets of each position already (`shift_labels`, stateful training). `logits` are the scores (B, T, V), or the
    log-probabilities of the labels (B, T) when the model computed only those (`logits_at_targets=True`, which
    `CharLSTMTrainer` asks of an adaptive softmax)."""
    if not shifted:
        logits, labels = logits[:, :-1], labels[:, 1:]
    if logits.dim() == labels.dim():
        nll = -logits.float()
    else:
        nll = F.cross_entropy(logits.float().transpose(1, 2), labels.clamp(min=0), reduction="none")
    return nll.masked_fill(labels == -100, 0.0)


def loss_stderr(totals: np.ndarray, counts: np.ndarray, population: int | None = None) -> float:
    """The standard error of the loss per character `totals.sum() / counts.sum()` of a random sample of blocks, each
    with its loss sum `totals[i]` over `counts[i]` characters (the ratio estimator's); with `population`, the number of
    blocks sampled from, the finite-population correction makes it 0 when every block was read. NaN below 2 blocks."""
    n = len(totals)
    if n < 2 or counts.sum() == 0:
        return 0.0 if population is not None and n >= population else float("nan")
    mean = totals.sum() / counts.sum()
    spread = float(((totals - mean * counts) ** 2).sum()) / (n - 1)
    correction = max(0.0, 1.0 - n / population) if population else 1.0
    return math.sqrt(spread / n * correction) / (counts.sum() / n)


class BatchedMetrics:
    """Trainer's `compute_metrics` with `batch_eval_metrics=True`: called once per evaluation batch with that batch's
    per-position losses (`preprocess_logits_for_metrics`), it keeps only each block's sum and count, so an evaluation
    of the whole validation split of a large corpus holds no array of one number per character (50 M of them for 1 GB
    of text). The result is what the `bits_per_character` evaluate module computes from all of them at once (the mean
    over the positions whose label is not -100), in float64, with the loss's standard error over the blocks read
    (`loss_stderr`). The blocks' sums and counts of the last evaluation stay in `rows` (the final evaluation reads
    its sample in stages and combines them)."""

    def __init__(self, shifted: bool = False):
        self.shifted = shifted
        self._totals, self._counts = [], []
        self.rows = (np.zeros(0), np.zeros(0))

    def __call__(self, eval_prediction, compute_result: bool = True) -> dict[str, float] | None:
        nll = torch.as_tensor(eval_prediction.predictions).double()
        nll = nll.reshape(nll.shape[0], -1)
        labels = torch.as_tensor(eval_prediction.label_ids)
        labels = (labels if self.shifted else labels[:, 1:]).reshape(nll.shape[0], -1)
        keep = (labels != -100).to(nll.device)
        self._totals.append((nll * keep).sum(dim=1).cpu().numpy())
        self._counts.append(keep.sum(dim=1).cpu().numpy().astype(np.float64))
        if not compute_result:
            return None
        self.rows = (np.concatenate(self._totals), np.concatenate(self._counts))
        self._totals, self._counts = [], []
        return metrics_from_rows(*self.rows)


def metrics_from_rows(totals: np.ndarray, counts: np.ndarray, population: int | None = None) -> dict[str, float]:
    """The loss per character, bits per character, perplexity and the loss's standard error (`loss_stderr`,
    nats/char) of blocks whose loss sums and character counts are `totals` and `counts` (see `loss_stderr` for
    `population`)."""
    if counts.sum() == 0:
        raise ValueError("The evaluation read no character: every label is -100.")
    loss = float(totals.sum() / counts.sum())
    # "loss" becomes eval_loss in place of Trainer's mean of the batches' losses, which under several processes
    # (accelerate's padded last batches) differed from the bits per character in the fourth digit
    return {"loss": loss, "bits_per_char": loss / math.log(2),
            "perplexity": math.exp(loss) if loss < 709.0 else float("inf"),
            "loss_stderr": loss_stderr(totals, counts, population)}


def compute_metrics(eval_prediction, shifted: bool = False) -> dict[str, float]:
    """Bits per character and perplexity of the evaluation text, through the bits_per_character evaluate module."""
    nll = np.asarray(eval_prediction.predictions, dtype=np.float64).reshape(-1)
    labels = np.asarray(eval_prediction.label_ids)
    labels = (labels if shifted else labels[:, 1:]).reshape(-1)
    result = _bits_per_character().compute(predictions=nll, references=labels)
    return {"bits_per_char": result["bits_per_character"], "perplexity": result["perplexity"]}


@lru_cache(maxsize=1)
def _bits_per_character():
    return load_bits_per_character()
