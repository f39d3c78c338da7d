"""From text to ids: the vocabulary built from the training text, documents joined with a boundary token, fixed
blocks (`encode_blocks`) and the streams of stateful truncated BPTT (`encode_streams`), with their collators."""

import ctypes
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from functools import lru_cache

import numpy as np
import torch
from datasets import Dataset, Features, IterableDataset, Sequence, Value

from .cache import cached_step, preparation_needs, step_folder
from .errors import DataError
from .text_files import CONTINUES_COLUMN, ROW_CHARS
from .tokenization_char_lstm import CharLSTMTokenizer


# Characters per batch of a pass over rows of text files (16 rows of `ROW_CHARS`): what a pass holds in memory.
BATCH_CHARS = 1 << 24
# Texts larger than this are read by one process per core (`passes_num_proc`).
PARALLEL_BYTES = 1 << 26
_UNICODE_SIZE = 0x110000
_MADV_DONTNEED = 4  # <sys/mman.h>, the same on every Linux architecture


def iter_texts(dataset: Dataset | IterableDataset, column: str) -> Iterator[str]:
    """The texts of `dataset`, an empty cell (None) read as an empty text."""
    for batch in dataset.iter(batch_size=rows_per_batch(dataset)):
        yield from (text or "" for text in batch[column])


def rows_per_batch(dataset: Dataset | IterableDataset) -> int:
    """Rows per batch of a pass over `dataset`: rows of text files hold up to `ROW_CHARS` characters each, so a
    batch of them is bounded to `BATCH_CHARS`; other rows (documents of a Hub dataset, lines of a .jsonl) go 256 at
    a time."""
    return max(1, BATCH_CHARS // ROW_CHARS) if CONTINUES_COLUMN in (dataset.column_names or ()) else 256


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def passes_num_proc(dataset: Dataset | IterableDataset, requested: int | None = None) -> int | None:
    """Processes for a pass over `dataset` (a `datasets` map): `requested` (--preprocessing_num_workers) when given;
    else, for a text of more than `PARALLEL_BYTES`, one per core (at most 8): the pass goes faster, and the text it
    reads is mapped into those processes, not into the training process, whose memory stays flat in the size of the
    text. Small texts: None (in this process; starting processes would cost more than the pass)."""
    if requested is not None or isinstance(dataset, IterableDataset):
        return requested or None
    cores = usable_cores()
    large = dataset.data.nbytes > PARALLEL_BYTES and len(dataset) >= 2
    return min(cores, 8, len(dataset)) if large and cores > 1 else None


def iter_documents(dataset: Dataset | IterableDataset, column: str) -> Iterator[tuple[str, bool]]:
    """(text, continues) for every row: `continues` is True where the row continues the document before it (rows of
    one text file, `CONTINUES_COLUMN`)."""
    for batch in dataset.iter(batch_size=rows_per_batch(dataset)):
        continues = batch.get(CONTINUES_COLUMN) or [False] * len(batch[column])
        yield from ((text or "", bool(flag)) for text, flag in zip(batch[column], continues))


def _count_batch(batch: dict, column: str) -> dict:
    """One row per batch: the distinct code points of the batch's texts and how often each occurs."""
    ascii_counts = np.zeros(128, dtype=np.int64)
    wide = None
    for text in batch[column]:
        if not text:
            continue
        if text.isascii():
            ascii_counts += np.bincount(np.frombuffer(text.encode("ascii"), dtype=np.uint8), minlength=128)
        else:
            if wide is None:
                wide = np.zeros(_UNICODE_SIZE, dtype=np.int64)
            codes = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
            wide += np.bincount(codes, minlength=_UNICODE_SIZE)
    if wide is not None:
        wide[:128] += ascii_counts
        counts = wide
    else:
        counts = ascii_counts
    codes = np.flatnonzero(counts).astype(np.uint32)
    return {"codes": [codes], "counts": [counts[codes]]}


def count_characters(dataset: Dataset | IterableDataset, column: str, num_proc: int | None = None) -> Counter:
    """How many times each character occurs in `dataset`: one pass over the text, batch by batch (a map whose result
    the `datasets` cache keeps, so a second run on the same data reads a few rows instead of the text). Gives the
    vocabulary, the characters outside it and the unigram baseline. Its cache is checked (`cache.sound_cache`)."""
    kwargs = dict(batched=True, batch_size=rows_per_batch(dataset), fn_kwargs={"column": column},
                  remove_columns=dataset.column_names,
                  features=Features({"codes": Sequence(Value("uint32")), "counts": Sequence(Value("int64"))}))
    if isinstance(dataset, IterableDataset):
        per_batch = dataset.map(_count_batch, **kwargs)
    else:
        per_batch = cached_step(lambda: dataset.map(_count_batch, num_proc=passes_num_proc(dataset, num_proc),
                                                    desc="Counting characters", **kwargs),
                                "the character counts", step_folder(dataset))
    counts: Counter = Counter()
    for row in per_batch.with_format("numpy") if not isinstance(per_batch, IterableDataset) else per_batch:
        for code, count in zip(np.asarray(row["codes"]).tolist(), np.asarray(row["counts"]).tolist()):
            counts[chr(code)] += count
    return counts


def vocabulary_from_counts(counts: Counter, separator: str, max_vocab_size: int | None = None,
                           min_char_count: int = 1, by_frequency: bool = False
                           ) -> tuple[CharLSTMTokenizer, dict[str, int]]:
    """(the tokenizer of the training text's characters, with the document boundary token `<eos>`; the characters
    left out, with their counts). With `max_vocab_size` only the most frequent characters are kept (ties: the lower
    code point), with `min_char_count` only those that occur at least that often; the others become `<unk>`. The
    separator's characters are always kept (see `join_documents`). Ids follow the code points (`from_corpus`), or
    with `by_frequency` the counts, most frequent first after the special tokens (what an adaptive softmax needs)."""
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    kept = [char for char, count in ranked if count >= min_char_count]
    if max_vocab_size is not None:
        kept = kept[:max_vocab_size]
    kept_set = set(kept)
    left_out = {char: count for char, count in counts.items() if char not in kept_set}
    kept += [char for char in dict.fromkeys(separator) if char not in kept_set]
    tokenizer = CharLSTMTokenizer.from_corpus(["".join(kept)], document_boundary=True)
    if by_frequency:
        ordered = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
        specials = [token for token, _ in ordered if len(token) > 1]
        vocab = {token: index for index, token in enumerate(specials + kept)}
        tokenizer = CharLSTMTokenizer(vocab=vocab, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
    return tokenizer, left_out


def build_tokenizer(train: Dataset | IterableDataset, column: str, separator: str) -> CharLSTMTokenizer:
    """The vocabulary of the training text (plus the document separator's characters), with the document boundary
    token `<eos>` (see `join_documents`)."""
    return vocabulary_from_counts(count_characters(train, column), separator)[0]


def boundary_id(tokenizer: CharLSTMTokenizer) -> int | None:
    """The id of the tokenizer's document boundary token: one token that is both its bos and its eos token (every
    tokenizer `scripts/train.py` builds has `<eos>`), else None."""
    eos = tokenizer.eos_token_id
    return eos if eos is not None and eos == tokenizer.bos_token_id else None


def join_documents(
    tokenizer: CharLSTMTokenizer, texts: Iterable[str], separator: str, boundary: int | None,
    continues: Iterable[bool] | None = None,
) -> np.ndarray:
    """Documents as one array of ids. With a boundary token every document starts with it (``<eos> doc1 <eos> doc2``):
    the model learns to end a document with it and to start one after it, which is how clients use a causal LM's
    eos token (lm-evaluation-harness conditions on it and stops at it). Without one (tokenizers saved by earlier
    versions) documents are joined with `separator`. `continues` (one flag per text): True for a text that continues
    the document before it (a row of a large file), which gets no boundary."""
    texts = [text or "" for text in texts]
    continues = [False] * len(texts) if continues is None else [bool(flag) for flag in continues]
    if boundary is None:
        joined = "".join(("" if flag or index == 0 else separator) + text
                         for index, (text, flag) in enumerate(zip(texts, continues)))
        return tokenizer.encode_corpus(joined)
    mark = np.array([boundary], dtype=tokenizer.corpus_dtype)
    parts = [piece for text, flag in zip(texts, continues)
             for piece in ((tokenizer.encode_corpus(text),) if flag else (mark, tokenizer.encode_corpus(text)))]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=tokenizer.corpus_dtype)


def count_oov(dataset: Dataset | IterableDataset, column: str, tokenizer: CharLSTMTokenizer) -> dict[str, int]:
    """How many times each character outside the vocabulary occurs in `dataset`."""
    known = tokenizer.get_vocab()
    return {char: count for char, count in count_characters(dataset, column).items() if char not in known}


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
    ids = join_documents(tokenizer, batch[column], separator, boundary, batch.get(CONTINUES_COLUMN))
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
    batch_size: int | None = None,
) -> Dataset | IterableDataset:
    """Rows of text -> rows of `input_ids` windows of `block_size + 1` ids (stored in the smallest integer dtype).
    Windows do not cross batches of rows (`rows_per_batch` by default): at most `block_size` characters per batch
    of rows go unread. The cache is checked (`cache.sound_cache`); a full disk is one line (`cache.CacheFull`)."""
    if block_size <= 0:
        raise DataError(f"--block_size must be a positive number of characters, got {block_size}.")
    stride = block_size if stride is None else stride
    if stride <= 0:
        raise DataError(f"--stride must be a positive number of characters, got {stride}.")
    dtype = {np.uint8: "uint8", np.uint16: "uint16", np.int32: "int32"}[tokenizer.corpus_dtype.type]
    kwargs = dict(
        batched=True,
        batch_size=batch_size or (1000 if CONTINUES_COLUMN not in (dataset.column_names or ()) else
                                  rows_per_batch(dataset)),
        remove_columns=dataset.column_names,
        # fixed-size rows (no offsets), written 10000 at a time: opening the cache reads one header per batch, so
        # fewer, larger batches leave more of the memory-mapped file untouched until training reads it
        features=Features({"input_ids": Sequence(Value(dtype), length=block_size + 1)}),
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
    itemsize = tokenizer.corpus_dtype.itemsize
    return cached_step(lambda: dataset.map(_encode_blocks, num_proc=passes_num_proc(dataset, num_proc),
                                           writer_batch_size=10_000, load_from_cache_file=load_from_cache_file,
                                           desc="Encoding blocks", **kwargs),
                       "the blocks of ids", step_folder(dataset),
                       lambda: preparation_needs(dataset.data.nbytes, block_size, stride, rows=False,
                                                 itemsize=itemsize))


def release_mapped_pages(dataset: Dataset) -> None:
    """Unmap the pages of `dataset`'s memory-mapped blocks that reads have mapped into this process (madvise
    MADV_DONTNEED: the file's pages stay in the page cache, and a later read maps its page again). Random batches
    otherwise map a large piece of the file per block read (the kernel maps read-ahead windows and whole large
    folios: 40 steps over the blocks of 1 GB of text mapped 680 MB), so the training process's RSS would grow to the
    size of its data. Linux only; elsewhere, or where the mapping cannot be reached, nothing changes."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        page = os.sysconf("SC_PAGE_SIZE")
        chunks = dataset.data.table.column("input_ids").chunks
    except (AttributeError, OSError, ValueError, KeyError):
        return
    for chunk in chunks:
        for buffer in chunk.buffers():
            if buffer is None or buffer.size < page:
                continue
            start = buffer.address + (-buffer.address) % page  # whole pages inside the buffer only
            end = buffer.address + buffer.size - (buffer.address + buffer.size) % page
            if end > start:
                libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


def collate_blocks(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack blocks into `input_ids` and `labels` (the same ids: the model shifts them)."""
    input_ids = torch.from_numpy(np.asarray([example["input_ids"] for example in examples], dtype=np.int64))
    return {"input_ids": input_ids, "labels": input_ids.clone()}
