"""Text files as users bring them: one file, a glob (`'**/*.c'`), or a folder (a source tree, a folder of books), of
any size and any extension.

A folder is read recursively (version-control folders `.git`, `.hg`, `.svn` left out), filtered by `--include` /
`--exclude` patterns. Files that are not text in the given encoding (binaries, images, object files: a NUL byte, or
bytes that do not decode, in their first `SNIFF_BYTES`) are skipped and counted in one line; a file named on its own
that is not text is an error.

Every file becomes rows of at most `ROW_CHARS` characters, with a `CONTINUES_COLUMN` flag on the rows that continue
the file before them. Rows of bounded size keep every step of the data path bounded in memory (a batch of rows, not a
whole file, is in memory at a time) and keep each Arrow string array far below its 2 GB limit, whatever the size of
the file.
"""

import codecs
import fnmatch
import functools
import glob
import logging
import os
from collections.abc import Iterator

from .errors import DataError


logger = logging.getLogger(__name__)

# Characters per row of a text file (1M: 1 MB of ASCII text; a batch of `ROWS_PER_BATCH` rows is what the encoding
# holds in memory at once).
ROW_CHARS = 1 << 20
# The column that marks a row continuing the document (file) of the row before it; absent or False: a new document.
CONTINUES_COLUMN = "char_lstm_continues"
# The column with each row's number of characters (written with the rows: the validation split then reads no text).
LENGTH_COLUMN = "char_lstm_length"
# How much of each file of a folder or glob is read to tell text from a binary.
SNIFF_BYTES = 1 << 13
# Parts up to this size are read and decoded whole; larger ones are decoded piece by piece.
WHOLE_FILE_BYTES = 1 << 26
# Large UTF-8 files are read in parts of this size (`file_parts`), by several processes where there are several.
PART_BYTES = 1 << 26
# Folders never read from a tree (version control internals).
SKIPPED_FOLDERS = {".git", ".hg", ".svn"}
STRUCTURED_EXTENSIONS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _some(names: list[str], most: int = 5) -> str:
    """`a, b, c` or `a, b, ... (12 more)`."""
    return ", ".join(names[:most]) + (f", ... ({len(names) - most} more)" if len(names) > most else "")


def _matches(relative: str, patterns: list[str]) -> bool:
    """Whether a path relative to the folder matches a pattern: a pattern with a `/` matches the relative path, one
    without it the file name (as in .gitignore)."""
    name = os.path.basename(relative)
    return any(fnmatch.fnmatch(relative if "/" in p else name, p) for p in patterns)


def _walk(folder: str, relative: str = "") -> Iterator[tuple[str, str]]:
    """(path, path relative to the first `folder`, with "/") of every file under `folder`, symbolic links to folders
    not followed (as `os.walk`), version-control folders left out, unreadable folders skipped. `os.scandir` tells
    files from folders without a `stat` per file, which matters in a tree of tens of thousands."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            if entry.name not in SKIPPED_FOLDERS:
                yield from _walk(entry.path, relative + entry.name + "/")
        elif entry.is_file():
            yield entry.path, relative + entry.name


def find_files(spec: str, option: str, include: list[str] | None = None, exclude: list[str] | None = None):
    """(files, named): the sorted files a `--train_file` value names (a file, a folder read recursively, or a glob,
    `**` recursive), filtered by `include` / `exclude` patterns for folders and globs; `named` is True for one file
    named on its own (it must be text, or it is an error)."""
    if os.path.isdir(spec):
        files = sorted(_walk(spec))
    elif any(char in spec for char in "*?["):
        files = [(path, path) for path in sorted(glob.glob(spec, recursive=True)) if os.path.isfile(path)]
        if not files:
            raise DataError(f"{option} {spec} matches no file.")
    elif os.path.isfile(spec):
        return [spec], True
    else:
        raise DataError(f"{option} {spec} does not exist; give a text file, a folder or a glob (e.g. 'src/**/*.c').")
    kept = [path for path, relative in files if (not include or _matches(relative, include))
            and not (exclude and _matches(relative, exclude))]
    if not kept:
        patterns = f" (--include {' '.join(include or [])} --exclude {' '.join(exclude or [])})".replace(
            " --exclude )", ")").replace("--include  ", "")
        raise DataError(f"{option} {spec} holds no file{patterns if include or exclude else ''}: "
                        + (f"it holds {_some([r for _, r in files])}." if files else "it is empty."))
    return kept, False


def structured_builder(files: list[str]) -> str | None:
    """The `datasets` builder ("json", "csv", "parquet") when every file is one of those formats, else None (the
    files are read as text: a `package.json` in a source tree is text like the rest)."""
    builders = {STRUCTURED_EXTENSIONS.get(os.path.splitext(path)[1].lower()) for path in files}
    return builders.pop() if len(builders) == 1 and None not in builders else None


def _decode_error(path: str, data: bytes, error: UnicodeDecodeError, encoding: str, offset: int = 0) -> DataError:
    return DataError(
        f"{path} is not valid {encoding}: the byte at offset {offset + error.start} (0x{data[error.start]:02x}) "
        "cannot be decoded; convert the file to UTF-8 or pass its encoding, e.g. --encoding latin-1."
    )


def check_encoding(encoding: str) -> None:
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise DataError(
            f"Unknown --encoding {encoding!r}; use a Python codec name such as utf-8 or latin-1."
        ) from None


def _not_text(path: str, encoding: str) -> str | None:
    """Why the file at `path` is not text in `encoding`, from its first `SNIFF_BYTES`, or None. (Unbuffered reads:
    a Python file object costs more than the read itself, once per file of a source tree.)"""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        head = os.read(fd, SNIFF_BYTES)
        while 0 < len(head) < SNIFF_BYTES and (more := os.read(fd, SNIFF_BYTES - len(head))):
            head += more
    finally:
        os.close(fd)
    if b"\x00" in head and not codecs.lookup(encoding).name.startswith(("utf-16", "utf-32")):
        return "NUL bytes"
    final = len(head) < SNIFF_BYTES  # all of the file: a character cut at the end is an error
    try:
        if _utf8(encoding):
            codecs.utf_8_decode(head, "strict", final)
        else:
            codecs.getincrementaldecoder(encoding)().decode(head, final=final)
    except UnicodeDecodeError:
        return f"not {encoding}"
    return None


def text_files(files: list[str], named: bool, encoding: str, option: str) -> list[str]:
    """The files of `files` that are text; the others are skipped, in one info line with their count. A file `named`
    on its own must be text: a one-line error says why it is not."""
    check_encoding(encoding)
    if named:
        path = files[0]
        if os.path.getsize(path) == 0:
            raise DataError(f"{path} is empty: the training text needs at least one block of characters.")
        reason = _not_text(path, encoding)
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
        if reason == "NUL bytes":
            odd, even = head[1::2].count(0), head[0::2].count(0)
            if max(odd, even) > 0.8 * (len(head) // 2):  # a NUL next to every ASCII character
                order = "le" if odd > even else "be"
                raise DataError(
                    f"{path} has NUL characters next to every character: it looks like UTF-16 without a byte-order "
                    f"mark; pass --encoding utf-16-{order}, or convert the file to UTF-8."
                )
            raise DataError(f"{path} has NUL bytes: it is a binary file, not text; give a text file (or a folder, "
                            "where such files are skipped).")
        if reason is not None:
            try:
                head.decode(encoding)
            except UnicodeDecodeError as error:
                raise _decode_error(path, head, error, encoding) from None
        elif len(head) < SNIFF_BYTES and not head.decode(encoding).strip():
            raise DataError(f"{path} holds only whitespace: the training text needs characters to learn from.")
        return files
    kept, skipped, empty = [], [], 0
    for path in files:
        if os.path.getsize(path) == 0:
            empty += 1
        elif _not_text(path, encoding) is not None:
            skipped.append(path)
        else:
            kept.append(path)
    if skipped or empty:
        logger.info(f"{option}: reading {len(kept)} text file(s); skipped {len(skipped)} that are not {encoding} text "
                    f"(binaries, images...){': ' + _some(skipped) if skipped else ''}"
                    + (f" and {empty} empty one(s)" if empty else ""))
    if not kept:
        raise DataError(f"{option}: none of its {len(files)} file(s) is {encoding} text (e.g. {_some(skipped)}); "
                        "pass the encoding of the text with --encoding.")
    return kept


@functools.cache
def _utf8(encoding: str) -> bool:
    return codecs.lookup(encoding).name == "utf-8"


def _char_start(f, offset: int) -> int:
    """The first offset at or after `offset` where a UTF-8 character starts (continuation bytes are 0b10xxxxxx)."""
    f.seek(offset)
    head = f.read(4)
    skip = 0
    while skip < len(head) and head[skip] & 0xC0 == 0x80:
        skip += 1
    return offset + skip


def file_parts(files: list[str], encoding: str, part_bytes: int = PART_BYTES) -> list[tuple[str, int, int]]:
    """(path, start, end) byte ranges covering `files` in order: UTF-8 files larger than `part_bytes` are cut into
    parts that start on a character, so that several processes (`--preprocessing_num_workers`, `--streaming` over
    several processes) can each read their own part of one large file. Other encodings: one part per file."""
    parts = []
    for path in files:
        size = os.path.getsize(path)
        if size <= part_bytes or not _utf8(encoding):
            parts.append((path, 0, size))
            continue
        with open(path, "rb") as f:
            cuts = [0, *sorted({_char_start(f, offset) for offset in range(part_bytes, size, part_bytes)}), size]
        parts.extend((path, a, b) for a, b in zip(cuts, cuts[1:]) if b > a)
    return parts


def _pieces(path: str, encoding: str, start: int, end: int) -> Iterator[str]:
    """The text of bytes `start:end` of the file, exactly (no newline translation), in pieces; a decoding error is a
    one-line DataError with the byte offset."""
    with open(path, "rb") as f:
        f.seek(start)
        if end - start <= WHOLE_FILE_BYTES:
            data = f.read(end - start)
            try:
                yield data.decode(encoding)
            except UnicodeDecodeError as error:
                raise _decode_error(path, data, error, encoding, start) from None
            return
        decoder, offset = codecs.getincrementaldecoder(encoding)(), start
        while offset < end and (data := f.read(min(ROW_CHARS, end - offset))):
            try:
                yield decoder.decode(data, final=False)
            except UnicodeDecodeError as error:
                raise _decode_error(path, data, error, encoding, offset) from None
            offset += len(data)
        yield decoder.decode(b"", final=True)


def part_rows(part: tuple[str, int, int], encoding: str, row_chars: int = ROW_CHARS) -> Iterator[tuple[str, bool]]:
    """(text, continues) rows of at most `row_chars` characters covering a part's text exactly (`file_parts`);
    `continues` is False on the first row of a file only. A text with NUL characters (UTF-16 read as UTF-8) is an
    error."""
    path, start, end = part
    first, pending = start == 0, ""
    wide = codecs.lookup(encoding).name.startswith(("utf-16", "utf-32"))
    for piece in _pieces(path, encoding, start, end):
        if not wide and "\x00" in piece:
            raise DataError(
                f"{path} has NUL characters: it looks like UTF-16 without a byte-order mark; pass --encoding "
                "utf-16-le (or utf-16-be), or convert the file to UTF-8."
            )
        pending += piece
        start = 0
        while len(pending) - start >= row_chars:  # rows by offsets: no copy of what remains after each row
            yield pending[start : start + row_chars], not first
            first, start = False, start + row_chars
        pending = pending[start:]
    if pending:
        yield pending, not first


def rows_code() -> bytes:
    """The bytecode of the functions that cut text files into rows: part of the rows' cache key."""
    return b"".join(function.__code__.co_code for function in (file_parts, _char_start, _pieces, part_rows))
