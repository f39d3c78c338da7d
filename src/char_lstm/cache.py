"""The `datasets` cache of the prepared text (under HF_DATASETS_CACHE): the rows of text files, the character counts,
the blocks of ids and the stateful streams, each an Arrow file.

* A full disk (or quota) while the cache is written is one line, `CacheFull`, naming the cache folder, the space free
  there and about how much the preparation needs (`preparation_needs`); what was half written is removed, so no
  partial file is left to pass for a cache (`datasets` removes its own unfinished builder folder, not the temporary
  file of a `map` that the disk cut short: `space_reported` does).
* A damaged cache file (cut short, its end zero-filled: `arrow_file_problem`) is found before anything trains on it,
  when `datasets` fails to read it or by a check of every cache file a step returns; it is removed and the step made
  again, said in one info line naming the file (`sound_cache`); one that stays damaged is a `CacheDamaged` line
  naming it and `--overwrite_cache`, which makes every step's cache again.
"""

import errno
import gc
import glob
import json
import logging
import os
import re
import shutil
import traceback
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import TypeVar

import datasets
import pyarrow as pa

from .errors import DataError, first_sentence, free_bytes, megabytes


logger = logging.getLogger(__name__)

T = TypeVar("T")

# The end of every Arrow stream `datasets` (and `encode_streams`) writes: a continuation marker and a length of 0.
_END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"
_FILE_MAGIC = b"ARROW1"  # the start of the Arrow file format (random access)
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = re.compile(r"No space left on device|Disk quota exceeded|os error (28|122)\b")
# Cache files already found sound in this process, by (path, inode, size, mtime): each is read once per process.
_SOUND: set[tuple] = set()


class CacheFull(OSError):
    """The `datasets` cache could not be written: a full disk or a quota. What was half written is removed."""

    def __init__(self, what: str, folder: str, reason: str, needs: str | None = None):
        self.what, self.folder, self.reason = what, folder, reason
        free = free_bytes(folder)
        space = ", and ".join(part for part in (f"{megabytes(free)} free there" if free is not None else None, needs)
                              if part)
        shown = cache_root() if in_cache(folder) else folder  # HF_DATASETS_CACHE, what a user sets
        super().__init__(
            f"Could not write {what} into the datasets cache {shown} ({reason}{'; ' + space if space else ''}). What "
            "was half written is removed: free some space there, or point HF_DATASETS_CACHE at a folder on a disk "
            "with room, and run the command again."
        )

    def needing(self, needs: str | None) -> "CacheFull":
        """The same error, with what the whole preparation needs (known to the caller) instead."""
        return CacheFull(self.what, self.folder, self.reason, needs) if needs else self


class CacheDamaged(DataError):
    """A `datasets` cache file that is damaged and could not be made again."""


CACHE_ERRORS = (CacheFull, CacheDamaged)


def cache_root() -> str:  # read when needed: HF_DATASETS_CACHE may be set after the import
    return str(datasets.config.HF_DATASETS_CACHE)


def in_cache(path: str) -> bool:
    """Whether `path` is inside the `datasets` cache (what may be removed and made again)."""
    root = os.path.realpath(cache_root())
    return os.path.commonpath([os.path.realpath(path), root]) == root


# ---------------------------------------------------------------------------------------------------------------------
# A full disk


def no_space_reason(error: BaseException) -> str | None:
    """"No space left on device" (or the quota's reason, as the OS says it) when a full disk is behind `error` (an
    OSError with its errno, or wrapped by pyarrow or datasets in a message), else None."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _NO_SPACE:
            return os.strerror(seen.errno)
        if _NO_SPACE_TEXT.search(str(seen)):
            return "No space left on device"
        seen = seen.__cause__ or seen.__context__
    return None


def _temporary_files(folder: str | None) -> set[str]:
    """The `tmp*` files of `folder`: what `datasets.Dataset.map` writes before renaming it to its cache file."""
    if folder is None or not os.path.isdir(folder):
        return set()
    return {entry.path for entry in os.scandir(folder) if entry.name.startswith("tmp") and entry.is_file()}


@contextmanager
def space_reported(what: str, folder: str | None, needs: Callable[[], str | None] | None = None):
    """A write of the block into the `datasets` cache that finds the disk full becomes one `CacheFull` line naming
    `folder` (where the block writes), the space free there and `needs()` (about how much the preparation needs);
    the temporary files the block left in `folder` are removed first. A `CacheFull` from inside gets `needs()`."""
    before = _temporary_files(folder)
    try:
        yield
    except CacheFull as error:
        if needs is None:
            raise
        raise error.needing(needs()) from error.__cause__
    except Exception as error:
        reason = no_space_reason(error)
        if reason is None or folder is None:
            raise
        for path in _temporary_files(folder) - before:
            os.remove(path)
        _release(error)
        raise CacheFull(what, folder, reason, needs() if needs else None) from error


def _release(error: BaseException) -> None:
    """Let go of what the frames of `error` hold (the writers of a file that was removed, still open: the space it
    takes is free once they are gone), so that the free space the line says is the space there is."""
    seen = error
    while seen is not None:
        traceback.clear_frames(seen.__traceback__)
        seen = seen.__cause__ or seen.__context__
    gc.collect()


def needs_clause(parts: list[tuple[str, float]], subject: str = "the preparation") -> str | None:
    """"the preparation needs about 64.9 MB: 31.5 MB of rows of text, 33.4 MB of blocks of ids"."""
    parts = [(name, size) for name, size in parts if size]
    if len(parts) == 1:
        return f"{subject} needs about {megabytes(int(parts[0][1]))} of {parts[0][0]}"
    listed = ", ".join(f"{megabytes(int(size))} of {name}" for name, size in parts)
    return f"{subject} needs about {megabytes(int(sum(size for _, size in parts)))}: {listed}" if parts else None


def encoded_parts(text_bytes: float, block_size: int, stride: int | None = None, stateful: bool = False,
                  itemsize: int = 1) -> list[tuple[str, float]]:
    """What encoding a text of `text_bytes` writes, one id (`itemsize` bytes) per byte of text (UTF-8 text has
    fewer characters than bytes): blocks of `block_size + 1` ids every `stride` characters; with `stateful`, the
    stream windows (`block_size + 1` ids every `block_size`) and, while they are written, every id once more."""
    if stateful:
        return [("stream windows", text_bytes * itemsize * (block_size + 1) / block_size),
                ("their ids while they are written", text_bytes * itemsize)]
    return [("blocks of ids", text_bytes * itemsize * (block_size + 1) / (stride or block_size))]


def preparation_needs(text_bytes: float | None, block_size: int, stride: int | None = None, stateful: bool = False,
                      rows: bool = True, itemsize: int = 1) -> str | None:
    """About how much the cache of a text of `text_bytes` takes: its rows (as many bytes as the text: `rows`) and
    what encoding it writes (`encoded_parts`); None when the size of the text is not known."""
    if not text_bytes:
        return None
    return needs_clause([("rows of text", text_bytes if rows else 0),
                         *encoded_parts(text_bytes, block_size, stride, stateful, itemsize)],
                        "the preparation" if rows else "the rest of the preparation")


def files_bytes(paths: Iterable[str]) -> int | None:
    try:
        return sum(os.path.getsize(path) for path in paths)
    except OSError:
        return None


def text_bytes(specs: Iterable[str | None], include: list[str] | None = None,
               exclude: list[str] | None = None) -> int | None:
    """The size of the files that --train_file / --validation_file values name (a file, a folder, a glob), or None
    when it cannot be told (a Hub dataset: no value)."""
    from .text_files import find_files

    try:
        return sum(files_bytes(find_files(spec, "--train_file", include, exclude)[0]) or 0 for spec in specs
                   if spec is not None) or None
    except Exception:  # the files changed since: no estimate, the line says the free space
        return None


def dataset_bytes(*loaded) -> int | None:
    """The size of the text of loaded datasets (their Arrow tables), or None for streamed ones."""
    sizes = [getattr(getattr(dataset, "data", None), "nbytes", None) for dataset in loaded]
    return sum(sizes) if sizes and None not in sizes else None


# ---------------------------------------------------------------------------------------------------------------------
# A damaged cache file


def arrow_file_problem(path: str) -> str | None:
    """Why the Arrow stream file at `path` is damaged, or None when it is sound: every record batch is read (zero
    copy, memory-mapped: the headers only, not the data), the stream must end with its end-of-stream marker and that
    marker at the end of the file. A file cut short mid-batch fails to read; one cut at a batch boundary reads as
    fewer rows (what `datasets` would train on) but has lost its marker; a zero-filled end reads as an early end."""
    try:
        stat = os.stat(path)
    except OSError as error:
        return f"cannot be read: {error.strerror}"
    key = (path, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key in _SOUND:
        return None
    try:
        with open(path, "rb") as f:
            if f.read(len(_FILE_MAGIC)) == _FILE_MAGIC:
                return None  # the Arrow file format: not what `datasets` writes, not checked here
            f.seek(max(0, stat.st_size - len(_END_OF_STREAM)))
            tail = f.read()
        with pa.memory_map(path) as source:
            for _ in pa.ipc.open_stream(source):
                pass
            end = source.tell()
    except (pa.ArrowException, OSError, ValueError) as error:
        return f"cut short or damaged: {first_sentence(error, 120) or type(error).__name__}"
    if end != stat.st_size or tail != _END_OF_STREAM:
        return f"cut short: its {stat.st_size:,} bytes end without the end of the Arrow stream"
    _SOUND.add(key)
    return None


def cache_files(result) -> list[str]:
    """The Arrow files a step's result reads (a Dataset, a DatasetDict, a tuple of them); none for streamed data."""
    if isinstance(result, (tuple, list)):
        return [path for item in result for path in cache_files(item)]
    if isinstance(result, dict):
        return cache_files(list(result.values()))
    files = getattr(result, "cache_files", None)
    return list(dict.fromkeys(entry["filename"] for entry in files)) if isinstance(files, list) else []


def damaged_file(error: BaseException, folders: Iterable[str] = ()) -> tuple[str, str] | None:
    """(path, problem) of the damaged cache file behind `error`: the Arrow file `datasets` was reading when it failed
    (the `filename` of its reading frames), else a damaged one in `folders`; None when the error is another."""
    if no_space_reason(error) is not None:  # a write, not a read (and its frames are left as they are: `_release`)
        return None
    candidates, seen = [], error
    while seen is not None:
        trace = seen.__traceback__
        while trace is not None:
            name = trace.tb_frame.f_locals.get("filename")
            if isinstance(name, str) and name.endswith(".arrow"):
                candidates.append(name)
            trace = trace.tb_next
        seen = seen.__cause__ or seen.__context__
    candidates += [path for folder in folders for path in sorted(glob.glob(os.path.join(glob.escape(folder),
                                                                                          "*.arrow")))]
    for path in dict.fromkeys(candidates):
        problem = os.path.isfile(path) and arrow_file_problem(path)
        if problem:
            return path, problem
    return None


def builder_folder(path: str) -> str | None:
    """The folder of a dataset's own rows (a `datasets` builder's output: `dataset_info.json` beside them) that
    `path` is in, when it is one of those rows; None for a cache file of a step on them (`cache-*.arrow`)."""
    folder, name = os.path.dirname(path), os.path.basename(path)
    if name.startswith(("cache-", "char_lstm-")) or not os.path.isfile(os.path.join(folder, "dataset_info.json")):
        return None
    return folder


def discard(path: str) -> str:
    """Remove the damaged cache file `path`: a step's file alone, a dataset's rows with their builder folder (the
    files of every step on them go too: `datasets` makes the folder again whole). Returns what was removed."""
    folder = builder_folder(path)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
        return f"removed its folder {folder} (the cache of that text)"
    if os.path.exists(path):
        os.remove(path)
    return "removed it"


def damaged_refusal(path: str, problem: str) -> CacheDamaged:
    target = builder_folder(path) or path
    return CacheDamaged(f"The datasets cache file {path} is damaged ({problem}) and was not made again: run the "
                        f"command again with --overwrite_cache (it makes the cache of this text again), or delete "
                        f"{target}.")


def _split_files(folder: str) -> list[str]:
    """The Arrow files of a dataset's own rows in its builder folder (not the files of steps on them)."""
    return [path for path in sorted(glob.glob(os.path.join(glob.escape(folder), "*.arrow")))
            if builder_folder(path) is not None]


def _folders_recording(split) -> list[str]:
    """The builder folders of the `datasets` cache whose dataset_info.json records `split` (its name, rows, bytes)."""
    found = []
    for folder, names, files in os.walk(cache_root()):
        names[:] = [name for name in names if not name.endswith(".incomplete")]
        if "dataset_info.json" in files:
            try:
                with open(os.path.join(folder, "dataset_info.json"), encoding="utf-8") as f:
                    recorded = json.load(f).get("splits", {}).get(split.name, {})
            except (OSError, ValueError, AttributeError):
                continue
            if (recorded.get("num_examples"), recorded.get("num_bytes")) == (split.num_examples, split.num_bytes):
                found.append(folder)
    return found


def _short_rows(result) -> tuple[str, str] | None:
    """(path, problem) of the damaged file of a dataset's rows that reads as fewer rows than its dataset_info.json
    records (a file cut after a record batch, or after its schema: `datasets` then leaves it out of the result)."""
    for dataset in result.values() if isinstance(result, dict) else [result]:
        if not isinstance(dataset, datasets.Dataset):  # streamed: read from the files, no cache
            continue
        split = (dataset.info.splits or {}).get(str(dataset.split))
        if split is None or not split.num_examples or len(dataset) >= split.num_examples:
            continue
        for path in [path for folder in _folders_recording(split) for path in _split_files(folder)]:
            if problem := arrow_file_problem(path):
                return path, problem
        raise CacheDamaged(f"The datasets cache of {split.name} rows holds {len(dataset)} of the {split.num_examples} "
                           f"rows it recorded, and its damaged file is not found: delete the datasets cache "
                           f"{cache_root()} (or the folder of this text in it) and run the command again.")
    return None


def result_problem(result, rows: bool = False) -> tuple[str, str] | None:
    """(path, problem) of a damaged cache file that a step's result reads: its own files (`cache_files`) and the
    other files of the rows in their builder folders; with `rows` (a dataset's own rows), also one that reads as
    fewer rows than recorded (`_short_rows`)."""
    paths = cache_files(result)
    paths += [path for folder in {builder_folder(path) for path in paths} - {None} for path in _split_files(folder)]
    found = next(((path, problem) for path in dict.fromkeys(paths) if (problem := arrow_file_problem(path))), None)
    return found or (_short_rows(result) if rows else None)


def sound_cache(make: Callable[[], T], what: str, overwrite: bool = False, folders: Iterable[str] = (),
                rows: bool = False) -> T:
    """`make()`, a step that reads its result from the `datasets` cache or writes it there, with every cache file of
    its result sound. A damaged file, found when `datasets` fails to read it (`damaged_file`; `folders`: where to
    look when the error does not say) or after (`result_problem`), is removed (`discard`) and the step made again
    once, said in one info line; one still damaged then is a `CacheDamaged` line. With `overwrite`, the rows of the
    datasets `make` returns (`rows`) are removed with their builder folders and made again."""
    folders, again = list(folders), False
    while True:
        result = None
        try:
            result = make()
            found = result_problem(result, rows)
        except CacheDamaged:
            raise
        except Exception as error:
            found = damaged_file(error, folders)
            if found is None:
                raise
        if overwrite and not again:  # made again, whatever the cache held
            stale = {builder_folder(path) for path in cache_files(result) + ([found[0]] if found else [])} - {None}
            result = None
            for folder in [folder for folder in stale if in_cache(folder)]:
                shutil.rmtree(folder, ignore_errors=True)
        elif found is None:
            return result
        else:
            result, (path, problem) = None, found
            if again or not in_cache(path):
                raise damaged_refusal(path, problem)
            logger.info(f"The datasets cache file {path} is damaged ({problem}): {discard(path)}; making {what} "
                        "again.")
        again = True


def cached_step(make: Callable[[], T], what: str, folder: str | None,
                needs: Callable[[], str | None] | None = None) -> T:
    """`make()`, a step that writes its result into the `datasets` cache folder `folder` (or reads it from there),
    with its cache files sound (`sound_cache`, which looks in `folder` when an error names no file) and a full disk
    while it writes them one line (`space_reported`, with `needs()`)."""
    with space_reported(what, folder, needs):
        return sound_cache(make, what, folders=[folder] if folder else [])


def step_folder(dataset) -> str | None:
    """Where a `map` on `dataset` writes its cache file: beside the dataset's own (None: in memory)."""
    files = cache_files(dataset)
    return os.path.dirname(files[0]) if files else None


def prepared(make: Callable[[], T], files: list[str] | None = None, overwrite: bool = False) -> T:
    """The rows of a text loaded by `make()` (text files, a Hub dataset), from its sound cache or made again
    (`sound_cache`); a full disk while they are written is one `CacheFull` line, with about what the rows of the
    text `files` and its blocks take."""
    def needs() -> str | None:
        size = files_bytes(files) if files else None
        return needs_clause([("rows of text", size), ("blocks of ids", size)]) if size else None

    with space_reported("the rows of the text", cache_root(), needs):
        return sound_cache(make, "the rows of the text", overwrite, rows=True)
