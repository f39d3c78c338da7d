"""What evaluation measures: bits per character and perplexity, from one loss per position."""

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from ..metrics import load_bits_per_character


def preprocess_logits_for_metrics(logits: torch.Tensor, labels: torch.Tensor, shifted: bool = False) -> torch.Tensor:
    """Per-position loss of the next character, so evaluation keeps B*T numbers instead of B*T*V.

    `labels` are the inputs (transformers' convention: position t predicts label t + 1), or with `shifted=True` the
    targets of each position already (`shift_labels`, stateful training)."""
    if not shifted:
        logits, labels = logits[:, :-1], labels[:, 1:]
    nll = F.cross_entropy(logits.float().transpose(1, 2), labels.clamp(min=0), reduction="none")
    return nll.masked_fill(labels == -100, 0.0)


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
