"""Measuring a model on a text: loss (nats/char), bits per character and perplexity, in two modes.

* `fixed`: the text cut into windows of `block_size + 1` characters, each read from a zero state (every character
  but the first of a window is predicted once). Comparable with any model of the same context length.
* `streaming`: the whole text read once, the recurrent state carried from each window to the next, so every
  character but the first is predicted with all the text before it as context: what an RNN can do and a
  fixed-context model cannot.

Both go through the `bits_per_character` evaluate module (`char_lstm.metrics`), as Trainer's evaluation does.
"""

import inspect
import json
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from .data import dataset_label, load_raw_datasets, resolve_dataset_name
from .encoding import boundary_id, iter_documents, join_documents
from .errors import DataError, UsageError
from .loading import check_model_path, load_model_and_tokenizer, pick_device, resolve_dtype
from .metrics import load_bits_per_character


MODES = ("fixed", "streaming")


def _nll(model, input_ids: torch.Tensor, targets: torch.Tensor, cache=None) -> torch.Tensor:
    """Per-position loss (B, T) of `targets` (the next characters of input_ids). An adaptive softmax computes only the
    targets' clusters (`logits_at_targets`, where the model's code has it: a folder saved by an older release
    brings its own), not the distribution over every character."""
    adaptive = getattr(model.config, "adaptive_softmax_cutoffs", None)
    if adaptive and "logits_at_targets" in inspect.signature(model.forward).parameters:
        return -model(input_ids=input_ids, cache=cache, use_cache=cache is not None, shift_labels=targets,
                      logits_at_targets=True).logits
    logits = model(input_ids=input_ids, cache=cache, use_cache=cache is not None).logits
    return F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")


@torch.no_grad()
def fixed_window_nll(model, ids: np.ndarray, block_size: int, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(negative log-likelihoods, target ids) of every character predicted from zero-state windows."""
    device = model.device
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    n_windows = (len(ids) - 1) // block_size
    losses, targets = [], []
    if n_windows:
        windows = ids[: n_windows * block_size + 1].unfold(0, block_size + 1, block_size)  # (W, block_size + 1)
        for start in range(0, n_windows, batch_size):
            batch = windows[start : start + batch_size].to(device)
            losses.append(_nll(model, batch[:, :-1], batch[:, 1:]).flatten().cpu())
            targets.append(batch[:, 1:].flatten().cpu())
    rest = ids[n_windows * block_size :]
    if len(rest) >= 2:  # the end of the text, shorter than a window
        rest = rest.unsqueeze(0).to(device)
        losses.append(_nll(model, rest[:, :-1], rest[:, 1:]).flatten().cpu())
        targets.append(rest[:, 1:].flatten().cpu())
    if not losses:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    return torch.cat(losses).numpy(), torch.cat(targets).numpy()


@torch.no_grad()
def streaming_nll(model, ids: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(negative log-likelihoods, target ids) reading the whole text once, window after window, with the state
    carried across windows."""
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64)).unsqueeze(0).to(model.device)
    cache = DynamicCache(config=model.config)
    losses, targets = [], []
    for start in range(0, ids.shape[1] - 1, block_size):
        end = min(start + block_size, ids.shape[1] - 1)
        losses.append(_nll(model, ids[:, start:end], ids[:, start + 1 : end + 1], cache=cache).flatten().cpu())
        targets.append(ids[0, start + 1 : end + 1].cpu())
    if not losses:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    return torch.cat(losses).numpy(), torch.cat(targets).numpy()


def evaluate_ids(model, ids: np.ndarray, block_size: int, batch_size: int = 64, modes=MODES) -> dict[str, dict]:
    """{mode: {"loss", "bits_per_character", "perplexity", "characters"}} for an encoded text."""
    if block_size <= 0:
        raise ValueError(f"--block_size must be a positive number of characters, got {block_size}.")
    if len(ids) < 2:
        raise ValueError(f"The text has {len(ids)} character(s): it needs at least 2 to predict one.")
    model.eval()
    metric = load_bits_per_character()
    results = {}
    for mode in modes:
        if mode == "fixed":
            nll, targets = fixed_window_nll(model, ids, block_size, batch_size)
        elif mode == "streaming":
            nll, targets = streaming_nll(model, ids, block_size)
        else:
            raise ValueError(f"Unknown evaluation mode {mode!r}; choose from {MODES}.")
        results[mode] = metric.compute(predictions=nll, references=targets)
    return results


@dataclass
class EvaluateArguments:
    model_name_or_path: str = field(metadata={"help": "A trained model: a local folder or a Hub id."})
    validation_file: str | None = field(
        default=None,
        metadata={"help": "Text to measure: a .txt file, a directory or glob of them, or .jsonl/.csv/.parquet."},
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "Or a dataset (Hub id or local folder laid out like one) ..."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "... its configuration ..."})
    split: str = field(default="test", metadata={"help": "... and its split."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    encoding: str = field(default="utf-8", metadata={"help": "Encoding of .txt files."})
    document_separator: str = field(default="\n\n", metadata={"help": "Joins documents (rows, files)."})
    block_size: int = field(default=100, metadata={"help": "Characters per window."})
    batch_size: int = field(default=64, metadata={"help": "Windows per batch in the fixed-window mode."})
    modes: str = field(default="fixed,streaming", metadata={"help": "fixed, streaming, or both (comma-separated)."})
    device: str = field(default="auto", metadata={"help": "auto (cuda, then mps, then cpu), cpu, cuda, mps."})
    dtype: str = field(default="auto", metadata={"help": "auto (as saved), float32, bfloat16 or float16."})
    output_json: str = field(default="eval_results.json", metadata={"help": "Where to write the results."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run the model code shipped with a Hub model."})


def load_evaluation_text(args: EvaluateArguments) -> tuple[list[tuple[str, bool]], str]:
    """(the rows to measure, each (text, continues the document before it); what they are, for the results)."""
    if args.validation_file is not None:
        dataset = load_raw_datasets(train_file=args.validation_file, text_column=args.text_column,
                                    encoding=args.encoding, file_option="--validation_file")["train"]
        name = dataset_label(args.validation_file)
    elif args.dataset_name is not None:
        dataset_name = resolve_dataset_name(args.dataset_name, args.dataset_config_name)
        raw = load_raw_datasets(dataset_name=dataset_name, dataset_config_name=args.dataset_config_name,
                                text_column=args.text_column, file_option="--validation_file")
        if args.split not in raw:
            raise DataError(f"The dataset {args.dataset_name!r} has no split {args.split!r} (it has {list(raw)}).")
        dataset, name = raw[args.split], f"{dataset_label(dataset_name)}:{args.split}"
    else:
        raise UsageError("Nothing to evaluate on: pass --validation_file or --dataset_name (with --split).")
    return list(iter_documents(dataset, args.text_column)), name


def run_evaluate(args: EvaluateArguments) -> dict:
    """Load, measure in each mode, print a table and write the JSON file; returns the results."""
    modes = tuple(mode.strip() for mode in args.modes.split(",") if mode.strip())
    unknown_modes = set(modes) - set(MODES)
    if unknown_modes:
        raise UsageError(f"Unknown --modes {sorted(unknown_modes)}; choose from {list(MODES)}.")
    check_model_path(args.model_name_or_path)  # before the data are loaded
    rows, data = load_evaluation_text(args)
    documents, continues = [text for text, _ in rows], [flag for _, flag in rows]
    text = "".join(("" if flag or index == 0 else args.document_separator) + row
                   for index, (row, flag) in enumerate(zip(documents, continues)))
    model, tokenizer = load_model_and_tokenizer(
        args.model_name_or_path, device=pick_device(args.device), dtype=resolve_dtype(args.dtype),
        trust_remote_code=args.trust_remote_code,
    )
    oov = tokenizer.oov_characters(text)
    unknown = sum(text.count(char) for char in oov)
    if unknown:
        print(f"warning: {unknown} characters of the text are not in the vocabulary and count as <unk>: "
              f"{''.join(oov)!r}", file=sys.stderr)
    # As in training: every document starts with the boundary token when the tokenizer has one (so the first
    # character is predicted too, given "a document starts"), else documents joined with the separator.
    ids = join_documents(tokenizer, documents, args.document_separator, boundary_id(tokenizer), continues)
    results = {
        "model": args.model_name_or_path,
        "data": data,
        "characters": len(text),
        "unknown_characters": unknown,
        "block_size": args.block_size,
        **evaluate_ids(model, ids, args.block_size, args.batch_size, modes),
    }
    print(f"{results['data']}: {len(text)} characters, windows of {args.block_size}")
    print(f"{'mode':<10} {'loss (nats/char)':>17} {'bits/char':>10} {'perplexity':>11} {'characters':>11}")
    for mode in modes:
        r = results[mode]
        print(f"{mode:<10} {r['loss']:>17.4f} {r['bits_per_character']:>10.4f} {r['perplexity']:>11.4f} "
              f"{r['characters']:>11}")
    with open(args.output_json, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.output_json}")
    return results


run = run_evaluate  # the name before issue 14 (entry points are run_<command>)
