"""From text to ids: the vocabulary built from the training text, documents joined with a boundary token, fixed
blocks (`encode_blocks`) and the streams of stateful truncated BPTT (`encode_streams`), with their collators."""

import itertools
from collections.abc import Iterable, Iterator
from functools import lru_cache

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset, Features, IterableDataset, Sequence, Value
from datasets.table import InMemoryTable

from .errors import DataError
from .tokenization_char_lstm import CharLSTMTokenizer


def iter_texts(dataset: Dataset | IterableDataset, column: str) -> Iterator[str]:
    """The texts of `dataset`, an empty cell (None) read as an empty text."""
    for batch in dataset.iter(batch_size=256):
        yield from (text or "" for text in batch[column])


def build_tokenizer(train: Dataset | IterableDataset, column: str, separator: str) -> CharLSTMTokenizer:
    """The vocabulary of the training text (plus the document separator's characters), with the document boundary
    token `<eos>` (see `join_documents`)."""
    texts = itertools.chain(iter_texts(train, column), [separator])
    return CharLSTMTokenizer.from_corpus(texts, document_boundary=True)


def boundary_id(tokenizer: CharLSTMTokenizer) -> int | None:
    """The id of the tokenizer's document boundary token: one token that is both its bos and its eos token (every
    tokenizer `scripts/train.py` builds has `<eos>`), else None."""
    eos = tokenizer.eos_token_id
    return eos if eos is not None and eos == tokenizer.bos_token_id else None


def join_documents(
    tokenizer: CharLSTMTokenizer, texts: Iterable[str], separator: str, boundary: int | None
) -> np.ndarray:
    """Documents as one array of ids. With a boundary token every document starts with it (``<eos> doc1 <eos> doc2``):
    the model learns to end a document with it and to start one after it, which is how clients use a causal LM's
    eos token (lm-evaluation-harness conditions on it and stops at it). Without one (tokenizers saved by earlier
    versions) documents are joined with `separator`."""
    if boundary is None:
        return tokenizer.encode_corpus(separator.join(text or "" for text in texts))
    mark = np.array([boundary], dtype=tokenizer.corpus_dtype)
    parts = [piece for text in texts for piece in (mark, tokenizer.encode_corpus(text or ""))]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=tokenizer.corpus_dtype)


def count_oov(dataset: Dataset | IterableDataset, column: str, tokenizer: CharLSTMTokenizer) -> dict[str, int]:
    """How many times each character outside the vocabulary occurs in `dataset`."""
    counts: dict[str, int] = {}
    for text in iter_texts(dataset, column):
        for char in tokenizer.oov_characters(text):
            counts[char] = counts.get(char, 0) + text.count(char)
    return counts


# ---------------------------------------------------------------------------------------------------------------------
# Encoding into blocks


@lru_cache(maxsize=4)
def _tokenizer_for(vocab_items: tuple) -> CharLSTMTokenizer:
    return CharLSTMTokenizer(vocab=dict(vocab_items))


def _encode_blocks(
    batch: dict, column: str, vocab_items: tuple, separator: str, boundary: int | None, block_size: int, stride: int
) -> dict:
    """Join the batch's documents (`join_documents`), encode them with the vectorized encoder, and cut windows of
    `block_size + 1` ids starting every `stride` characters (the model shifts the labels inside, so each window trains
    `block_size` predictions, and with `stride == block_size` every character is predicted once)."""
    tokenizer = _tokenizer_for(vocab_items)
    ids = join_documents(tokenizer, batch[column], separator, boundary)
    window = block_size + 1
    if len(ids) < window:
        return {"input_ids": np.empty((0, window), dtype=ids.dtype)}
    # A strided view of the ids, copied once: no (blocks, window) index array (8x the text's size in int64).
    return {"input_ids": np.ascontiguousarray(np.lib.stride_tricks.sliding_window_view(ids, window)[::stride])}


def encode_blocks(
    dataset: Dataset | IterableDataset,
    tokenizer: CharLSTMTokenizer,
    column: str,
    block_size: int,
    stride: int | None = None,
    separator: str = "\n\n",
    num_proc: int | None = None,
    load_from_cache_file: bool = True,
    batch_size: int = 1000,
) -> Dataset | IterableDataset:
    """Rows of text -> rows of `input_ids` windows of `block_size + 1` ids (stored in the smallest integer dtype)."""
    if block_size <= 0:
        raise DataError(f"--block_size must be a positive number of characters, got {block_size}.")
    stride = block_size if stride is None else stride
    if stride <= 0:
        raise DataError(f"--stride must be a positive number of characters, got {stride}.")
    dtype = {np.uint8: "uint8", np.uint16: "uint16", np.int32: "int32"}[tokenizer.corpus_dtype.type]
    kwargs = dict(
        batched=True,
        batch_size=batch_size,
        remove_columns=dataset.column_names,
        features=Features({"input_ids": Sequence(Value(dtype))}),
        fn_kwargs={
            "column": column,
            "vocab_items": tuple(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])),
            "separator": separator,
            "boundary": boundary_id(tokenizer),
            "block_size": block_size,
            "stride": stride,
        },
    )
    if isinstance(dataset, IterableDataset):
        return dataset.map(_encode_blocks, **kwargs)
    return dataset.map(
        _encode_blocks, num_proc=num_proc, load_from_cache_file=load_from_cache_file, desc="Encoding blocks", **kwargs
    )


def collate_blocks(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack blocks into `input_ids` and `labels` (the same ids: the model shifts them)."""
    input_ids = torch.from_numpy(np.asarray([example["input_ids"] for example in examples], dtype=np.int64))
    return {"input_ids": input_ids, "labels": input_ids.clone()}


# ---------------------------------------------------------------------------------------------------------------------
# Streams for stateful truncated BPTT


def encode_text(dataset: Dataset, tokenizer: CharLSTMTokenizer, column: str, separator: str = "\n\n") -> np.ndarray:
    """The whole text of `dataset` (documents joined by `join_documents`) as one array of ids."""
    return join_documents(tokenizer, iter_texts(dataset, column), separator, boundary_id(tokenizer))


def stream_layout(num_ids: int, num_streams: int, block_size: int, name: str = "training") -> np.ndarray:
    """Where each window starts, for `num_streams` contiguous streams read `block_size` characters per step.

    The text (`num_ids` ids) is cut into `num_streams` equal contiguous pieces; step k reads the k-th window of
    `block_size + 1` ids of every piece. Returns the start offsets in row order `k * num_streams + s` (window k of
    stream s), shape `(windows_per_stream * num_streams,)`.

    Why this order: with a sequential sampler, batches of `B` rows are consecutive streams, and accelerate deals
    batches out to the processes in turn (batch i to process i % P). So with `num_streams = P * B`, process p always
    gets streams p*B .. p*B + B - 1, each continuing where its previous batch stopped, and no two processes share
    any text."""
    stream_length = (num_ids - 1) // num_streams  # predictions per stream
    windows = stream_length // block_size
    if windows <= 0:
        raise DataError(
            f"The {name} text ({num_ids} characters) is too short for {num_streams} streams (one per batch row of "
            f"every process) of at least {block_size + 1} characters: use more text, a smaller "
            f"--per_device_{'eval' if name == 'validation' else 'train'}_batch_size or a smaller --block_size."
        )
    stream_starts = np.arange(num_streams, dtype=np.int64) * stream_length
    window_offsets = np.arange(windows, dtype=np.int64) * block_size
    return (window_offsets[:, None] + stream_starts[None, :]).reshape(-1)


def encode_streams(
    dataset: Dataset,
    tokenizer: CharLSTMTokenizer,
    column: str,
    block_size: int,
    num_streams: int,
    separator: str = "\n\n",
    name: str = "training",
) -> Dataset:
    """Rows of text -> windows of `block_size + 1` ids laid out as `num_streams` contiguous streams (see
    `stream_layout`), with a `window` column giving each row's step in its stream (0 = the stream starts)."""
    if block_size <= 0:
        raise DataError(f"--block_size must be a positive number of characters, got {block_size}.")
    if isinstance(dataset, IterableDataset):
        raise DataError(
            "--stateful needs the length of the text to lay out its streams: it cannot be used with --streaming."
        )
    ids = encode_text(dataset, tokenizer, column, separator)
    starts = stream_layout(len(ids), num_streams, block_size, name)
    windows = np.lib.stride_tricks.sliding_window_view(ids, block_size + 1)[starts]
    window_index = np.repeat(np.arange(len(starts) // num_streams, dtype=np.int32), num_streams)
    # Built as Arrow arrays directly: `Dataset.from_dict` would go through Python lists (20 s for 50 MB of text).
    offsets = np.arange(0, (len(starts) + 1) * (block_size + 1), block_size + 1, dtype=np.int64)
    table = pa.table(
        {
            "input_ids": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(windows.reshape(-1))),
            "window": pa.array(window_index),
        }
    )
    return Dataset(InMemoryTable(table))


def collate_stream_blocks(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Windows of `block_size + 1` ids -> `input_ids` (the first `block_size`), `shift_labels` (the next character of
    each), `labels` (= `input_ids`, what transformers' causal-LM convention expects) and `window`.

    The inputs stop one id short of the window so that the state carried to the next window has read exactly the text
    before it; `shift_labels` keeps the last prediction of each window (the model's loss uses it instead of shifting
    `labels`)."""
    blocks = torch.from_numpy(np.asarray([example["input_ids"] for example in examples], dtype=np.int64))
    input_ids = blocks[:, :-1]
    return {
        "input_ids": input_ids,
        "labels": input_ids.clone(),
        "shift_labels": blocks[:, 1:].contiguous(),
        "window": torch.tensor([example["window"] for example in examples], dtype=torch.int64),
    }
