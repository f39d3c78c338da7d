"""The streams of stateful truncated BPTT (`--stateful`): the text as `num_streams` contiguous streams read one window
per step (`stream_layout`), written to disk as they are laid out (`encode_streams`), and their collator.

The whole text's ids go to a file batch of rows by batch of rows, and the windows are read back from it with plain
file reads, a few steps of every stream at a time, into an Arrow file that the training reads memory-mapped: neither
the text nor its ids are ever in memory whole, whatever the size of the corpus.
"""

import hashlib
import json
import logging
import os
import tempfile

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset, IterableDataset

from .cache import arrow_file_problem, preparation_needs, space_reported
from .encoding import boundary_id, iter_documents, join_documents, rows_per_batch
from .errors import DataError
from .tokenization_char_lstm import CharLSTMTokenizer


logger = logging.getLogger(__name__)

# Windows written per Arrow record batch (and read back per `_window_batches` step).
WINDOWS_PER_BATCH = 1 << 14


def _write_ids(dataset: Dataset, tokenizer: CharLSTMTokenizer, column: str, separator: str, path: str) -> int:
    """The whole text of `dataset` as ids (documents joined by `join_documents`), written to `path` batch by batch;
    returns how many ids."""
    boundary = boundary_id(tokenizer)
    separator_ids = tokenizer.encode_corpus(separator)
    first, count = True, 0
    rows = iter_documents(dataset, column)
    with open(path, "wb") as f:
        while batch := [row for _, row in zip(range(rows_per_batch(dataset)), rows)]:
            texts, continues = [text for text, _ in batch], [flag for _, flag in batch]
            ids = join_documents(tokenizer, texts, separator, boundary, continues)
            if boundary is None and not first and not continues[0]:  # the separator between two batches' documents
                ids = np.concatenate([separator_ids, ids])
            f.write(ids.tobytes())
            count += len(ids)
            first = False
    return count


def encode_text(dataset: Dataset, tokenizer: CharLSTMTokenizer, column: str, separator: str = "\n\n") -> np.ndarray:
    """The whole text of `dataset` (documents joined by `join_documents`) as one array of ids (in memory: for the
    tests and small texts; `encode_streams` keeps them on disk)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "ids")
        _write_ids(dataset, tokenizer, column, separator, path)
        return np.fromfile(path, dtype=tokenizer.corpus_dtype)


def stream_layout(num_ids: int, num_streams: int, block_size: int, name: str = "training") -> np.ndarray:
    """Where each window starts, for `num_streams` contiguous streams read `block_size` characters per step.

    The text (`num_ids` ids) is cut into `num_streams` equal contiguous pieces; step k reads the k-th window of
    `block_size + 1` ids of every piece. Returns the start offsets in row order `k * num_streams + s` (window k of
    stream s), shape `(windows_per_stream * num_streams,)`.

    Why this order: with a sequential sampler, batches of `B` rows are consecutive streams, and accelerate deals
    batches out to the processes in turn (batch i to process i % P). So with `num_streams = P * B`, process p always
    gets streams p*B .. p*B + B - 1, each continuing where its previous batch stopped, and no two processes share
    any text."""
    stream_length, windows = _stream_shape(num_ids, num_streams, block_size, name)
    stream_starts = np.arange(num_streams, dtype=np.int64) * stream_length
    window_offsets = np.arange(windows, dtype=np.int64) * block_size
    return (window_offsets[:, None] + stream_starts[None, :]).reshape(-1)


def _stream_shape(num_ids: int, num_streams: int, block_size: int, name: str) -> tuple[int, int]:
    """(ids per stream, windows per stream), or a one-line DataError when the text is too short."""
    stream_length = (num_ids - 1) // num_streams  # predictions per stream
    windows = stream_length // block_size
    if windows <= 0:
        raise DataError(
            f"The {name} text ({num_ids} characters) is too short for {num_streams} streams (one per batch row of "
            f"every process) of at least {block_size + 1} characters: use more text, a smaller "
            f"--per_device_{'eval' if name == 'validation' else 'train'}_batch_size or a smaller --block_size."
        )
    return stream_length, windows


def _window_batches(path: str, dtype: np.dtype, num_ids: int, num_streams: int, block_size: int, name: str):
    """Arrow record batches of the windows in `stream_layout`'s order, read from the ids file at `path` a few steps
    at a time (each stream's ids for those steps are one contiguous read)."""
    stream_length, windows = _stream_shape(num_ids, num_streams, block_size, name)
    window, itemsize = block_size + 1, np.dtype(dtype).itemsize
    steps_per_batch = max(1, WINDOWS_PER_BATCH // num_streams)
    with open(path, "rb") as f:
        for first_step in range(0, windows, steps_per_batch):
            steps = min(steps_per_batch, windows - first_step)
            span = steps * block_size + 1  # the ids of `steps` windows of one stream (they overlap by one)
            pieces = []
            for stream in range(num_streams):
                f.seek((stream * stream_length + first_step * block_size) * itemsize)
                ids = np.frombuffer(f.read(span * itemsize), dtype=dtype)
                pieces.append(np.lib.stride_tricks.sliding_window_view(ids, window)[::block_size])
            rows = np.stack(pieces, axis=1).reshape(-1, window)  # step-major: window k of every stream, in order
            yield pa.record_batch({
                "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), window),
                "window": pa.array(np.repeat(np.arange(first_step, first_step + steps, dtype=np.int32), num_streams)),
            })


def encode_streams(
    dataset: Dataset,
    tokenizer: CharLSTMTokenizer,
    column: str,
    block_size: int,
    num_streams: int,
    separator: str = "\n\n",
    name: str = "training",
    overwrite: bool = False,
) -> Dataset:
    """Rows of text -> windows of `block_size + 1` ids laid out as `num_streams` contiguous streams (see
    `stream_layout`), with a `window` column giving each row's step in its stream (0 = the stream starts). The
    windows are written to an Arrow file in the `datasets` cache, named after the text and the layout (a second run
    reads it again, unless it is damaged or `overwrite`) and memory-mapped; a full disk is one line (`CacheFull`)."""
    if block_size <= 0:
        raise DataError(f"--block_size must be a positive number of characters, got {block_size}.")
    if isinstance(dataset, IterableDataset):
        raise DataError(
            "--stateful needs the length of the text to lay out its streams: it cannot be used with --streaming."
        )
    if not dataset.cache_files:  # a dataset in memory: the windows in a file that goes once it is mapped
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "windows.arrow")
            _write_windows(dataset, tokenizer, column, block_size, num_streams, separator, name, path)
            return Dataset.from_file(path)
    # beside the text's own cache files, named after the text and the layout: a second run reads it again
    key = json.dumps([dataset._fingerprint, sorted(tokenizer.get_vocab().items()), column, block_size, num_streams,
                      separator], ensure_ascii=True)
    folder = os.path.dirname(dataset.cache_files[0]["filename"])
    path = os.path.join(folder, f"char_lstm-streams-{hashlib.sha256(key.encode()).hexdigest()[:24]}.arrow")
    problem = os.path.isfile(path) and not overwrite and arrow_file_problem(path)
    if problem:
        logger.info(f"The datasets cache file {path} is damaged ({problem}): making the {name} streams again.")
    if problem or overwrite or not os.path.isfile(path):
        itemsize = tokenizer.corpus_dtype.itemsize
        with space_reported(f"the {name} streams", folder, lambda: preparation_needs(
                dataset.data.nbytes, block_size, stateful=True, rows=False, itemsize=itemsize)):
            _write_windows(dataset, tokenizer, column, block_size, num_streams, separator, name, path)
    return Dataset.from_file(path)


def _write_windows(dataset, tokenizer, column: str, block_size: int, num_streams: int, separator: str, name: str,
                   path: str) -> None:
    """The stream windows of `dataset` (`encode_streams`) into the Arrow file at `path`, complete or absent."""
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as scratch:
        ids_path, staged = os.path.join(scratch, "ids"), os.path.join(scratch, "windows.arrow")
        num_ids = _write_ids(dataset, tokenizer, column, separator, ids_path)
        batches = _window_batches(ids_path, tokenizer.corpus_dtype, num_ids, num_streams, block_size, name)
        first = next(batches)
        with pa.OSFile(staged, "wb") as sink, pa.ipc.new_stream(sink, first.schema) as writer:
            writer.write_batch(first)
            for batch in batches:
                writer.write_batch(batch)
        os.replace(staged, path)


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
