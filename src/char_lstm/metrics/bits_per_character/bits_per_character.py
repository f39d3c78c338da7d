"""bits_per_character: the cross-entropy of a character-level language model, in nats, bits and perplexity.

An `evaluate` module (loaded from this folder with `evaluate.load(path)`, since Hub-hosted metric scripts cannot be
reached offline). Inputs are per-character values, so evaluation never has to keep (tokens x vocabulary) logits:

* `predictions`: the negative log-likelihood (natural log) the model gave to each target character;
* `references`: the target character ids; positions whose reference is -100 are ignored (padding).
"""

import math

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """Mean negative log-likelihood per character (nats), bits per character and perplexity."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[float]`): negative log-likelihood, in nats, of each target character.
    references (`list[int]`): the target ids; -100 marks a position to ignore.
Returns:
    loss (`float`): mean negative log-likelihood in nats per character.
    bits_per_character (`float`): loss / ln 2.
    perplexity (`float`): exp(loss).
    characters (`int`): how many characters were counted.
Examples:
    >>> bpc = evaluate.load("src/char_lstm/metrics/bits_per_character")
    >>> bpc.compute(predictions=[0.6931471805599453, 0.6931471805599453], references=[5, 7])["bits_per_character"]
    1.0
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class BitsPerCharacter(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        nll = np.asarray(predictions, dtype=np.float64)
        keep = np.asarray(references) != -100
        count = int(keep.sum())
        if count == 0:
            raise ValueError("bits_per_character got no character to count: "
                             + ("no predictions and references were given." if keep.size == 0 else
                                "every reference is -100 (ignored)."))
        loss = float(nll[keep].mean())
        return {
            "loss": loss,
            "bits_per_character": loss / math.log(2),
            "perplexity": math.exp(loss) if loss < 709.0 else float("inf"),  # exp overflows a float past 709
            "characters": count,
        }
