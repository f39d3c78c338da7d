"""Training data: load raw text with `datasets` (files, Hub datasets, the bundled tiny Shakespeare) and split off the
validation text. From text to ids (vocabulary, blocks, streams): `char_lstm.encoding`.

The text is never split into lines or stripped: `.txt` files are read as bytes and decoded exactly (``\\r\\n``, tabs
and runs of spaces survive), and several documents are joined with `document_separator`. Every step is a
`datasets` operation with a deterministic fingerprint, so a second run with the same data and arguments loads the
encoded blocks from the `datasets` cache instead of encoding again.
"""

import hashlib
import logging
import lzma
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager

import datasets
import numpy as np
import pyarrow.compute as pc
import transformers
from datasets import Dataset, DatasetDict, Features, IterableDataset, Value
from huggingface_hub import HfApi, is_offline_mode

from .cache import CACHE_ERRORS, prepared
from .encoding import BATCH_CHARS, passes_num_proc, rows_per_batch
from .errors import DataError
from .text_files import (
    CONTINUES_COLUMN,
    LENGTH_COLUMN,
    PART_BYTES,
    ROW_CHARS,
    TextFiles,
    check_encoding,
    decode_error,
    file_encoding,
    file_parts,
    find_files,
    part_rows,
    rows_code,
    structured_builder,
    text_files,
    wide_encoding,
)


logger = logging.getLogger(__name__)

# Parts of a streamed text file (`file_parts`): each training process reads its own parts (`datasets` shards).
STREAM_PART_BYTES = 1 << 23
# The text of text files, one row per piece of at most ROW_CHARS characters (`char_lstm.text_files`).
TEXT_FEATURES = Features(
    {"text": Value("large_string"), CONTINUES_COLUMN: Value("bool"), LENGTH_COLUMN: Value("int64")}
)


# The default dataset, and the copy of it that ships with the package (public-domain text, xz-compressed) so that the
# main job runs without Hub access. Same train/validation/test split as the Hub dataset: the first 90% of the
# characters, the next 5%, the last 5% (one row each).
DEFAULT_DATASET = "karpathy/tiny_shakespeare"
BUNDLED_DATASET = "tiny_shakespeare (bundled)"
BUNDLED_CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tinyshakespeare.txt.xz")
BUNDLED_SPLITS = {"train": (0.0, 0.9), "validation": (0.9, 0.95), "test": (0.95, 1.0)}


@contextmanager
def quiet_progress_bars():
    """No `datasets` or `transformers` progress bars inside the block (each is restored as it was after): for the
    quick steps whose bars would only add lines (splitting, one-row datasets, writing one weights file)."""
    datasets_on = datasets.is_progress_bar_enabled()
    transformers_on = transformers.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if datasets_on:
            datasets.enable_progress_bars()
        if transformers_on:
            transformers.utils.logging.enable_progress_bar()


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def read_text_file(path: str, encoding: str = "utf-8") -> str:
    """The exact text of a file (no newline translation; a file with a byte-order mark in the encoding the mark names,
    without the mark: `file_encoding`), with one-line errors for empty, undecodable or whitespace-only files."""
    check_encoding(encoding)
    with open(path, "rb") as f:
        data = f.read()
    encoding, mark = file_encoding(data[:4], encoding)
    if len(data) == mark:
        raise DataError(f"{path} is empty: the training text needs at least one block of characters.")
    try:
        text = data[mark:].decode(encoding)
    except UnicodeDecodeError as error:
        raise decode_error(path, data[mark:], error, encoding, mark) from None
    if "\x00" in text and not wide_encoding(encoding):
        # UTF-16 without a byte-order mark decodes as UTF-8 with a NUL next to every ASCII character
        raise DataError(
            f"{path} has NUL characters (the first at character {text.index(chr(0))}): it looks like UTF-16 without a "
            "byte-order mark; pass --encoding utf-16-le (or utf-16-be), or convert the file to UTF-8."
        )
    if not text.strip():
        raise DataError(f"{path} holds only whitespace: the training text needs characters to learn from.")
    return text


def _text_file_rows(parts: list, encoding: str, row_chars: int = ROW_CHARS) -> Iterator[dict]:
    """Generator behind `Dataset.from_generator`: the rows of each part of the files (`part_rows`). `parts` is a
    list, so that `datasets` deals the parts out to its processes (and, streamed, to the training processes)."""
    for part in parts:
        for text, continues in part_rows(tuple(part), encoding, row_chars):
            yield {"text": text, CONTINUES_COLUMN: continues, LENGTH_COLUMN: len(text)}


# What `expand_files` read for each --train_file / --validation_file value in this process, by its arguments: the
# run's record and model card say it (`file_selection`) without going through the files again.
_SELECTIONS: dict[tuple, dict] = {}


def expand_files(spec: str, option: str, include: list[str] | None = None, exclude: list[str] | None = None,
                 encoding: str = "utf-8") -> list[str]:
    """A file, a folder (recursive) or a glob -> the sorted list of files to read; in a folder or glob, files that
    are not text are skipped (one info line), and `include` / `exclude` patterns filter the paths. What was read is
    kept for `file_selection`."""
    files, named = find_files(spec, option, include, exclude)
    if structured_builder(files) is not None:
        found = TextFiles(files, bytes=sum(os.path.getsize(path) for path in files))
    else:
        found = text_files(files, named, encoding, option)  # named on its own: why it is not text is an error
    _SELECTIONS[(spec, tuple(include or ()), tuple(exclude or ()), encoding)] = {
        "kind": "file" if named else "folder" if os.path.isdir(spec) else "glob",
        "include": [] if named else list(include or []), "exclude": [] if named else list(exclude or []),
        "files": len(found.paths), "skipped_not_text": found.skipped, "skipped_empty": found.empty,
        "bytes": found.bytes, "encoding": encoding}
    return found.paths


def file_selection(spec: str, include: list[str] | None = None, exclude: list[str] | None = None,
                   encoding: str = "utf-8") -> dict | None:
    """What `expand_files` read for these arguments in this process: the kind of `spec` (file, folder, glob), the
    --include / --exclude patterns applied, the number of files read and of those skipped (not text, empty), the
    bytes read and the --encoding; None when it has not read them."""
    found = _SELECTIONS.get((spec, tuple(include or ()), tuple(exclude or ()), encoding))
    return dict(found) if found is not None else None


def _text_rows_fingerprint(files: list[str], kwargs: dict) -> str:
    """The `datasets` cache key of the text files' rows: the code that makes them, its arguments, and every file's
    size and modification time (a changed file: a new key). `datasets` would otherwise hash the arguments itself,
    with `dill`: 2 s for the 55k parts of a source tree."""
    digest = hashlib.sha256()
    digest.update(_text_file_rows.__code__.co_code + rows_code())
    digest.update(repr((kwargs["encoding"], kwargs["row_chars"], ROW_CHARS, datasets.__version__)).encode())
    for path, start, end in kwargs["parts"]:
        digest.update(f"{path}\0{start}\0{end}\n".encode("utf-8", "surrogateescape"))
    for path in files:
        stat = os.stat(path)
        digest.update(f"{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return "char_lstm-text-" + digest.hexdigest()[:32]


def load_files(
    files: list[str], text_column: str, encoding: str, streaming: bool = False, num_proc: int | None = None,
    row_chars: int = ROW_CHARS,
) -> Dataset | IterableDataset:
    """Text files (rows of at most `row_chars` characters, exact text, `CONTINUES_COLUMN` marking the rows that
    continue a file) or, when every file is .jsonl/.json/.csv/.parquet, their rows as they are."""
    builder = structured_builder(files)
    if builder is None:
        # streamed: smaller parts, so that even a text of one file has a part for each of several processes
        parts = file_parts([os.path.abspath(path) for path in files], encoding,
                           STREAM_PART_BYTES if streaming else PART_BYTES)
        kwargs = {"parts": [list(part) for part in parts], "encoding": encoding, "row_chars": row_chars}
        if streaming:
            return IterableDataset.from_generator(_text_file_rows, gen_kwargs=kwargs, features=TEXT_FEATURES)
        num_proc = num_proc if num_proc and len(parts) > 1 else None  # (2 processes read a tree no faster)
        # rows are written 16 at a time (16 MB of ASCII text), not datasets' default 1000 (1 GB) held in memory
        return Dataset.from_generator(_text_file_rows, gen_kwargs=kwargs, features=TEXT_FEATURES, num_proc=num_proc,
                                      writer_batch_size=max(1, BATCH_CHARS // row_chars),
                                      fingerprint=_text_rows_fingerprint(files, kwargs))
    builder_log = logging.getLogger("datasets.packaged_modules")
    level = builder_log.level
    builder_log.setLevel(logging.CRITICAL)  # the builders log a parse error before raising it: one line below instead
    try:
        dataset = datasets.load_dataset(
            builder, data_files=[os.path.abspath(p) for p in files], split="train", streaming=streaming
        )
    except Exception as error:  # pyarrow's / pandas' parse errors (a malformed CSV, a line that is not JSON), ...
        while error.__cause__ is not None:  # datasets wraps them in DatasetGenerationError
            error = error.__cause__
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise DataError(
            f"Could not read {', '.join(files)} as {builder.upper()} ({type(error).__name__}: {reason}); fix the file "
            f"or give the text as a .txt file."
        ) from None
    finally:
        builder_log.setLevel(level)
    return dataset


def dataset_label(name_or_path: str) -> str:
    """How model cards and results name a dataset: a Hub id or the bundled copy as it is; a local file, folder or glob
    by its last part only (never a path of this machine)."""
    if name_or_path == BUNDLED_DATASET or not (os.path.exists(name_or_path) or any(c in name_or_path for c in "*?[")):
        return name_or_path
    return os.path.basename(os.path.normpath(name_or_path))


def hub_unreachable_reason(repo_id: str, repo_type: str = "dataset", timeout: float = 5.0) -> str | None:
    """Why the Hub repository `repo_id` cannot be reached (offline mode, no connection...), or None when it can: one
    request with a short timeout, no retries (the libraries' own downloads retry for over a minute)."""
    if is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    try:
        HfApi().repo_info(repo_id, repo_type=repo_type, timeout=timeout)
    except Exception as error:  # no network, DNS, proxy, timeout, HTTP error: all mean "not from the Hub"
        reason = str(error).splitlines()[0] if str(error) else ""
        return f"{type(error).__name__}: {reason[:120]}".rstrip(": ")
    return None


def resolve_dataset_name(dataset_name: str | None, dataset_config_name: str | None = None) -> str | None:
    """The dataset to load: `karpathy/tiny_shakespeare` is replaced by the bundled copy when the Hub cannot be reached
    (said in one info line); any other name is returned as it is."""
    if dataset_name != DEFAULT_DATASET or dataset_config_name not in (None, "default"):
        return dataset_name
    reason = hub_unreachable_reason(dataset_name)
    if reason is None:
        return dataset_name
    logger.info(f"{DEFAULT_DATASET} cannot be reached ({reason}): using the copy of tiny_shakespeare bundled with "
                "char_lstm (same train/validation/test split).")
    return BUNDLED_DATASET


def bundled_split_text(split: str) -> str:
    """One split of the bundled tiny_shakespeare, cut exactly as the Hub dataset's."""
    with lzma.open(BUNDLED_CORPUS, "rb") as f:
        text = f.read().decode("utf-8")
    start, end = BUNDLED_SPLITS[split]
    return text[int(len(text) * start) : int(len(text) * end)]


def _bundled_rows(split: str) -> Iterator[dict]:
    yield {"text": bundled_split_text(split)}


def load_bundled_dataset(streaming: bool = False) -> DatasetDict | datasets.IterableDatasetDict:
    """The bundled tiny_shakespeare as the Hub dataset loads: train/validation/test, one row of `text` each."""
    features = Features({"text": Value("string")})
    if streaming:
        return datasets.IterableDatasetDict({
            split: IterableDataset.from_generator(_bundled_rows, gen_kwargs={"split": split}, features=features)
            for split in BUNDLED_SPLITS
        })
    return DatasetDict({
        split: Dataset.from_generator(_bundled_rows, gen_kwargs={"split": split}, features=features)
        for split in BUNDLED_SPLITS
    })


def load_raw_datasets(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_file: str | None = None,
    validation_file: str | None = None,
    text_column: str = "text",
    encoding: str = "utf-8",
    streaming: bool = False,
    file_option: str = "--train_file",
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    num_proc: int | None = None,
    overwrite_cache: bool = False,
) -> DatasetDict | datasets.IterableDatasetDict:
    """`train` (and `validation` when the data has one) with the text in `text_column`. `dataset_name` may be
    `BUNDLED_DATASET` (see `resolve_dataset_name`); `file_option` is the flag the error messages suggest instead of a
    dataset that cannot be loaded. The rows come from a sound cache, or made again (`overwrite_cache`: always)."""
    def files(spec: str, option: str):
        paths = expand_files(spec, option, include, exclude, encoding)
        return prepared(lambda: load_files(paths, text_column, encoding, streaming, num_proc), paths, overwrite_cache)

    if train_file is not None:
        raw = {"train": files(train_file, file_option)}
        if validation_file is not None:
            raw["validation"] = files(validation_file, "--validation_file")
        raw = (datasets.IterableDatasetDict if streaming else DatasetDict)(raw)
    elif dataset_name == BUNDLED_DATASET:
        raw = prepared(lambda: load_bundled_dataset(streaming), overwrite=overwrite_cache)
    elif dataset_name is not None:
        # A local folder laid out like a Hub dataset loads the same way as the Hub id (absolute path: see README).
        name = os.path.abspath(dataset_name) if os.path.isdir(dataset_name) else dataset_name
        try:
            raw = prepared(lambda: datasets.load_dataset(name, dataset_config_name, streaming=streaming),
                           overwrite=overwrite_cache)
        except Exception as error:  # offline, unknown id, private repo...: datasets raises many different types
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise error if isinstance(error, CACHE_ERRORS) else DataError(  # a full disk, a damaged cache: said
                f"Could not load the dataset {dataset_name!r} ({type(error).__name__}: {reason[:200]}); "
                f"without Hub access, use a local text file with {file_option} path/to/text.txt."
            ) from None
        if "train" not in raw:
            raise DataError(f"The dataset {dataset_name!r} has no 'train' split (it has {list(raw)}).")
        if "validation" not in raw and "valid" in raw:
            raw["validation"] = raw.pop("valid")
        if validation_file is not None:
            raw["validation"] = files(validation_file, "--validation_file")
    else:
        raise DataError("No training data: pass --dataset_name (a Hub id or a local dataset folder) or --train_file.")

    for split, dataset in raw.items():
        columns = dataset.column_names
        if columns is not None and text_column not in columns:
            raise DataError(f"The {split} data has no column {text_column!r} (columns: {columns}); choose one with "
                            "--text_column.")
        feature = (dataset.features or {}).get(text_column)
        if feature is not None and getattr(feature, "dtype", None) not in ("string", "large_string"):
            raise DataError(f"The {split} data's column {text_column!r} holds {getattr(feature, 'dtype', feature)} "
                            "values, not text; choose the text column with --text_column (or quote the values in the "
                            "file).")
    return raw


# ---------------------------------------------------------------------------------------------------------------------
# Validation split


def _cut_row(batch: dict, column: str, cut: int, keep: str) -> dict:
    """Keep the head (`keep="head"`: characters before `cut`) or the tail of the one row of `batch`; the tail starts
    the validation text, so it continues no document."""
    texts = [(text or "")[:cut] if keep == "head" else (text or "")[cut:] for text in batch[column]]
    cut_batch = {**batch, column: texts}
    if keep == "tail" and CONTINUES_COLUMN in batch:
        cut_batch[CONTINUES_COLUMN] = [False] * len(texts)
    if LENGTH_COLUMN in batch:
        cut_batch[LENGTH_COLUMN] = [len(text) for text in texts]
    return cut_batch


def _text_lengths(batch: dict, column: str) -> dict:
    return {"_length": [len(text or "") for text in batch[column]]}


def text_lengths(dataset: Dataset, column: str) -> np.ndarray:
    """The number of characters of every row: the rows' own `LENGTH_COLUMN` (text files), or counted in the Arrow
    column (no Python strings) when the dataset has no indices mapping, else by a map."""
    if LENGTH_COLUMN in dataset.column_names and dataset._indices is None:
        return np.asarray(dataset.data.column(LENGTH_COLUMN).to_numpy(), dtype=np.int64)
    num_proc = passes_num_proc(dataset)
    if dataset._indices is None and num_proc is None:
        lengths = pc.fill_null(pc.utf8_length(dataset.data.column(column)), 0)
        return np.asarray(lengths.to_numpy(), dtype=np.int64)
    lengths = dataset.map(_text_lengths, batched=True, batch_size=rows_per_batch(dataset), num_proc=num_proc,
                          fn_kwargs={"column": column}, remove_columns=dataset.column_names)
    return np.asarray(lengths["_length"], dtype=np.int64)


def split_validation_tail(train: Dataset, column: str, percentage: float, num_proc: int | None = None):
    """Split off the last `percentage`% of the characters (a contiguous tail, so no block of one split overlaps the
    other) -> (train, validation)."""
    if not 0 < percentage < 100:
        raise DataError(f"--validation_split_percentage must be in (0, 100), got {percentage}.")
    lengths = text_lengths(train, column)
    total = int(lengths.sum())
    tail = math.ceil(total * percentage / 100)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    boundary = total - tail  # first character of the validation text
    row = int(np.searchsorted(starts, boundary, side="right") - 1)
    cut = boundary - int(starts[row])
    # Only the row with the boundary is written again (two pieces); the rows on either side are selected as they are.
    with quiet_progress_bars():
        pieces = {keep: train.select([row]).map(_cut_row, batched=True, fn_kwargs={"column": column, "cut": cut,
                                                                                   "keep": keep})
                  for keep in ("head", "tail")}
        head = datasets.concatenate_datasets([train.select(range(row)), pieces["head"]]) if row else pieces["head"]
        after = [train.select(range(row + 1, len(train)))] if row + 1 < len(train) else []
        tail_ds = datasets.concatenate_datasets([pieces["tail"], *after]) if after else pieces["tail"]
    return head, tail_ds
