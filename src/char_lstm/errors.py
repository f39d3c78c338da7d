"""The errors of bad input: one line naming the thing and the fix. The scripts print it as `error: ...` and exit with
code 2 (a traceback is for bugs)."""

import os
import re
import shutil


class UsageError(ValueError):
    """Arguments that cannot work: an unknown preset, a resume path that is no checkpoint, launcher flags, options
    that exclude each other, an output folder already in use. A ValueError, as transformers raises for bad
    arguments."""


class DataError(UsageError):
    """A problem with the data: a missing or empty file, text in another encoding, a text too short for one block."""


TROUBLESHOOTING = "docs/troubleshooting.md"


def see_troubleshooting(section: str) -> str:
    """The reference every diagnostic message ends with: its section of docs/troubleshooting.md (the README's table
    links to each)."""
    return f"See {TROUBLESHOOTING}#{section}."


def first_sentence(error: BaseException, limit: int = 160) -> str:
    """What a library's error says, for one of our lines: the first sentence of its first line, without the source
    location torch and gloo put in front ("[/path/pair.cc:537]", "[enforce fail at inline_container.cc:672] .")
    and the advice that follows; "" for an error without a message."""
    line = (str(error).strip().splitlines() or [""])[0]
    line = re.sub(r"^\[[^\]]*\]\s*[.:]?\s*", "", line)
    return line.split(". ")[0].rstrip(".")[:limit]


def megabytes(size: int) -> str:
    """A size for the lines about disk space: "12.3 MB", "1.2 GB"."""
    return f"{size / 1e6:.1f} MB" if size < 1e9 else f"{size / 1e9:.1f} GB"


def free_bytes(folder: str) -> int | None:
    """The free space of the disk that holds `folder` (or its nearest existing parent); None where it is unknown."""
    while folder and not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    try:
        return shutil.disk_usage(folder or ".").free
    except OSError:
        return None
