"""Text files as users bring them: one file, a glob (`'**/*.c'`), or a folder (a source tree, a folder of books), of
any size and any extension.

A folder is read recursively (version-control folders `.git`, `.hg`, `.svn` left out), filtered by `--include` /
`--exclude` patterns. Files that are not text in the given encoding (binaries, images, object files: a NUL byte, or
bytes that do not decode, in their first `SNIFF_BYTES`) are skipped and counted in one line; a file named on its own
that is not text is an error, and so is text of whitespace only. A file that starts with a byte-order mark is read in
the encoding the mark names, without it (`file_encoding`).

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
from dataclasses import dataclass
from typing import NamedTuple

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
# Byte-order marks and the encodings they name (UTF-32's first: FF FE 00 00 starts with UTF-16's FF FE).
BYTE_ORDER_MARKS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"), (codecs.BOM_UTF8, "utf-8"),
                    (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
# The encodings whose files are cut into parts (`file_parts`), and the bytes of their code units.
CODE_UNITS = {"utf-8": 1, "utf-16-le": 2, "utf-16-be": 2, "utf-32-le": 4, "utf-32-be": 4}


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


def decode_error(path: str, data: bytes, error: UnicodeDecodeError, encoding: str, offset: int = 0) -> DataError:
    """`data`: the bytes given to the decoder, from byte `offset` of the file (the error of an incremental decoder may
    be in bytes held from before them: its `object`)."""
    offset += len(data) - len(error.object) + error.start
    return DataError(
        f"{path} is not valid {encoding}: the byte at offset {offset} (0x{error.object[error.start]:02x}) "
        "cannot be decoded; convert the file to UTF-8 or pass its encoding, e.g. --encoding latin-1."
    )


def check_encoding(encoding: str) -> None:
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise DataError(
            f"Unknown --encoding {encoding!r}; use a Python codec name such as utf-8 or latin-1."
        ) from None


class _Sniff(NamedTuple):
    """What the first `SNIFF_BYTES` of a file say: why it is not text (None: text), the encoding it is read in and the
    length of its byte-order mark (`file_encoding`), those bytes and their text."""

    reason: str | None
    encoding: str
    bom: int
    head: bytes
    text: str


def _read_head(path: str) -> bytes:
    """The first `SNIFF_BYTES` of a file (all of it when smaller). Unbuffered reads: a Python file object costs more
    than the read itself, once per file of a source tree."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        head = os.read(fd, SNIFF_BYTES)
        while 0 < len(head) < SNIFF_BYTES and (more := os.read(fd, SNIFF_BYTES - len(head))):
            head += more
    finally:
        os.close(fd)
    return head


def _sniff(path: str, encoding: str) -> _Sniff:
    """Whether the file at `path` is text in `encoding` (or in the encoding its byte-order mark names), from its first
    `SNIFF_BYTES`: NUL bytes outside UTF-16/32, or bytes that do not decode, make it not text."""
    head = _read_head(path)
    encoding, bom = file_encoding(head, encoding)
    body = head[bom:]
    if b"\x00" in body and not wide_encoding(encoding):
        return _Sniff("NUL bytes", encoding, bom, head, "")
    final = len(head) < SNIFF_BYTES  # all of the file: a character cut at the end is an error
    try:
        if _utf8(encoding):
            text = codecs.utf_8_decode(body, "strict", final)[0]
        else:
            text = codecs.getincrementaldecoder(encoding)().decode(body, final=final)
    except UnicodeDecodeError:
        return _Sniff(f"not {encoding}", encoding, bom, head, "")
    return _Sniff(None, encoding, bom, head, text)


def _has_characters(path: str, encoding: str, bom: int) -> bool:
    """Whether the file holds a character other than whitespace, read in chunks from its start (after its byte-order
    mark) up to the first such character: only a file of whitespace is read to its end. A byte that does not decode
    is a one-line DataError."""
    decoder, offset = codecs.getincrementaldecoder(encoding)(), bom
    with open(path, "rb") as f:
        f.seek(bom)
        while True:
            data = f.read(ROW_CHARS)
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as error:
                raise decode_error(path, data, error, encoding, offset) from None
            if text and not text.isspace():  # (isspace stops at the first character that is not whitespace)
                return True
            if not data:
                return False
            offset += len(data)


@dataclass
class TextFiles:
    """The files of a `--train_file` value that are read as text (`paths`), the number skipped as not text or empty,
    and the size of the files read (`bytes`): what the run's record says about them."""

    paths: list[str]
    skipped: int = 0
    empty: int = 0
    bytes: int = 0


def _nul_error(path: str, head: bytes) -> DataError:
    odd, even = head[1::2].count(0), head[0::2].count(0)
    if max(odd, even) > 0.8 * (len(head) // 2):  # a NUL next to every ASCII character
        order = "le" if odd > even else "be"
        return DataError(
            f"{path} has NUL characters next to every character: it looks like UTF-16 without a byte-order "
            f"mark; pass --encoding utf-16-{order}, or convert the file to UTF-8."
        )
    return DataError(f"{path} has NUL bytes: it is a binary file, not text; give a text file (or a folder, where such "
                     "files are skipped).")


def _named_text_file(path: str, encoding: str) -> TextFiles:
    """A file named on its own, which must be text with characters to learn from: else a one-line error says why."""
    size = os.path.getsize(path)
    if size == 0:
        raise DataError(f"{path} is empty: the training text needs at least one block of characters.")
    sniff = _sniff(path, encoding)
    if sniff.reason == "NUL bytes":
        raise _nul_error(path, sniff.head)
    if sniff.reason is not None:
        try:
            sniff.head[sniff.bom :].decode(sniff.encoding)
        except UnicodeDecodeError as error:
            raise decode_error(path, sniff.head[sniff.bom :], error, sniff.encoding, sniff.bom) from None
    if size == sniff.bom:
        raise DataError(f"{path} is empty (a byte-order mark only): the training text needs at least one block of "
                        "characters.")
    if not (sniff.text and not sniff.text.isspace()) and (
            len(sniff.head) < SNIFF_BYTES or not _has_characters(path, sniff.encoding, sniff.bom)):
        raise DataError(f"{path} holds only whitespace: the training text needs characters to learn from.")
    return TextFiles([path], bytes=size)


def text_files(files: list[str], named: bool, encoding: str, option: str) -> TextFiles:
    """The files of `files` that are text; the others are skipped, in one info line with their count. A file `named`
    on its own must be text: a one-line error says why it is not. The text must have a character other than
    whitespace: a file (or all the text files of a folder or glob) of whitespace only is an error."""
    check_encoding(encoding)
    if named:
        return _named_text_file(files[0], encoding)
    kept, skipped, empty, size = [], [], 0, 0
    characters, blank = False, []  # blank: files of whitespace up to their first SNIFF_BYTES, until one has characters
    for path in files:
        file_size = os.path.getsize(path)
        if file_size == 0:
            empty += 1
            continue
        sniff = _sniff(path, encoding)
        if sniff.reason is not None:
            skipped.append(path)
            continue
        kept.append(path)
        size += file_size
        if not characters:
            characters = bool(sniff.text) and not sniff.text.isspace()
            if not characters and len(sniff.head) == SNIFF_BYTES:  # larger than its head: read further if need be
                blank.append((path, sniff.encoding, sniff.bom))
    if skipped or empty:
        logger.info(f"{option}: reading {len(kept)} text file(s); skipped {len(skipped)} that are not {encoding} text "
                    f"(binaries, images...){': ' + _some(skipped) if skipped else ''}"
                    + (f" and {empty} empty one(s)" if empty else ""))
    if not kept:
        raise DataError(f"{option}: none of its {len(files)} file(s) is {encoding} text (e.g. {_some(skipped)}); "
                        "pass the encoding of the text with --encoding.")
    if not characters and not any(_has_characters(*file) for file in blank):
        raise DataError(f"{option}: its {len(kept)} text file(s) hold only whitespace ({_some(kept)}): the training "
                        "text needs characters to learn from.")
    return TextFiles(kept, len(skipped), empty, size)


@functools.cache
def _utf8(encoding: str) -> bool:
    return codecs.lookup(encoding).name == "utf-8"


@functools.cache
def wide_encoding(encoding: str) -> bool:
    """Whether `encoding` is UTF-16 or UTF-32, whose text has NUL bytes next to ASCII characters."""
    return codecs.lookup(encoding).name.startswith(("utf-16", "utf-32"))


def file_encoding(head: bytes, encoding: str) -> tuple[str, int]:
    """(the encoding a file is read in, the bytes of its byte-order mark) from its first 4 bytes (`head`): a file that
    starts with a byte-order mark (UTF-8, UTF-16 or UTF-32, either byte order) is read in the encoding the mark names,
    whatever `encoding` says, and without the mark (its text does not start with U+FEFF); any other in `encoding`."""
    for mark, name in BYTE_ORDER_MARKS:
        if head.startswith(mark):
            return name, len(mark)
    return encoding, 0


def _char_start(f, offset: int, encoding: str = "utf-8") -> int:
    """The first offset at or after `offset` where a character starts, in an encoding of `CODE_UNITS`: in UTF-8 not on
    a continuation byte (0b10xxxxxx); in UTF-16 on a code unit (an even offset) that is not the second half of a
    surrogate pair; in UTF-32 on a multiple of 4."""
    name = codecs.lookup(encoding).name
    unit = CODE_UNITS[name]
    offset += -offset % unit
    f.seek(offset)
    head = f.read(4)
    if unit == 2 and len(head) >= 2:
        return offset + 2 * (0xDC00 <= int.from_bytes(head[:2], "little" if name.endswith("le") else "big") <= 0xDFFF)
    skip = 0
    while unit == 1 and skip < len(head) and head[skip] & 0xC0 == 0x80:
        skip += 1
    return offset + skip


def file_parts(files: list[str], encoding: str, part_bytes: int = PART_BYTES) -> list[tuple[str, int, int]]:
    """(path, start, end) byte ranges covering `files` in order: files larger than `part_bytes` in UTF-8, UTF-16 or
    UTF-32 (`--encoding`, or their byte-order mark: `file_encoding`) are cut into parts that start on a character, so
    that several processes (`--preprocessing_num_workers`, `--streaming` over several processes) can each read their
    own part of one large file. Other encodings: one part per file."""
    parts = []
    for path in files:
        size = os.path.getsize(path)
        if size <= part_bytes:
            parts.append((path, 0, size))
            continue
        with open(path, "rb") as f:
            cut_encoding = file_encoding(f.read(4), encoding)[0]
            if codecs.lookup(cut_encoding).name not in CODE_UNITS:
                parts.append((path, 0, size))
                continue
            offsets = range(part_bytes, size, part_bytes)
            cuts = [0, *sorted({min(size, _char_start(f, offset, cut_encoding)) for offset in offsets}), size]
        parts.extend((path, a, b) for a, b in zip(cuts, cuts[1:]) if b > a)
    return parts


def _pieces(path: str, encoding: str, start: int, end: int) -> Iterator[str]:
    """The text of bytes `start:end` of the file, exactly (no newline translation), in pieces, in the encoding its
    byte-order mark names if it has one (`file_encoding`: the mark itself is left out); a decoding error, or NUL
    characters in a text not read as UTF-16/32 (UTF-16 read as UTF-8), is a one-line DataError."""
    with open(path, "rb") as f:
        encoding, mark = file_encoding(f.read(4), encoding)
        start = max(start, mark)
        f.seek(start)
        if end - start <= WHOLE_FILE_BYTES:
            data = f.read(max(0, end - start))
            try:
                yield _no_nul(path, data.decode(encoding), encoding)
            except UnicodeDecodeError as error:
                raise decode_error(path, data, error, encoding, start) from None
            return
        decoder, offset = codecs.getincrementaldecoder(encoding)(), start
        while True:
            data = f.read(min(ROW_CHARS, end - offset))
            try:
                yield _no_nul(path, decoder.decode(data, final=not data), encoding)
            except UnicodeDecodeError as error:
                raise decode_error(path, data, error, encoding, offset) from None
            if not data:
                return
            offset += len(data)


def _no_nul(path: str, text: str, encoding: str) -> str:
    if "\x00" in text and not wide_encoding(encoding):
        raise DataError(f"{path} has NUL characters: it looks like UTF-16 without a byte-order mark; pass --encoding "
                        "utf-16-le (or utf-16-be), or convert the file to UTF-8.")
    return text


def part_rows(part: tuple[str, int, int], encoding: str, row_chars: int = ROW_CHARS) -> Iterator[tuple[str, bool]]:
    """(text, continues) rows of at most `row_chars` characters covering a part's text exactly (`file_parts`; a file
    with a byte-order mark in the encoding it names, without the mark); `continues` is False on the first row of a
    file only. A text with NUL characters (UTF-16 read as UTF-8) is an error."""
    path, start, end = part
    first, pending = start == 0, ""
    for piece in _pieces(path, encoding, start, end):
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
    functions = (file_parts, file_encoding, _char_start, _pieces, _no_nul, part_rows)
    return b"".join(function.__code__.co_code for function in functions) + repr(BYTE_ORDER_MARKS).encode()
