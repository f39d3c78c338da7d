"""Generated text on a terminal: its control characters shown, not obeyed.

A model writes whatever characters its training text held: one trained on text with terminal escape codes (Debian's
fortune files hold them), or any model downloaded from the Hub, can generate sequences that move the cursor, clear or
rewrite the screen, set the window title or, in terminals that honour it, write the clipboard. Written to a terminal,
such text is shown with its control characters as visible escapes; a file or a pipe gets the exact text.

This module needs only the standard library: scripts/push_to_hub.py --space copies it next to the demo's app.py, in a
Space where char_lstm is not installed.
"""

import re


# The characters a terminal acts on instead of showing, or that reorder what it shows: the C0 controls but the line
# feed and the tab, DEL, the C1 controls (U+0080-U+009F: an 8-bit CSI or OSC starts an escape sequence as ESC [ and
# ESC ] do), and the bidirectional embeddings, overrides and isolates (U+202A-U+202E, U+2066-U+2069), which reorder
# the rest of the line ("Trojan Source"). The carriage return is one too, but only alone: "\r\n" ends a line.
SHOWN_CODES = (*(code for code in range(0x20) if chr(code) not in "\t\n"), 0x7F, *range(0x80, 0xA0),
               *range(0x202A, 0x202F), *range(0x2066, 0x206A))
_VISIBLE = {code: ascii(chr(code))[1:-1] for code in SHOWN_CODES if chr(code) != "\r"}  # "\x1b", "\u202e"
_LONE_CARRIAGE_RETURN = re.compile(r"\r(?!\n)")


def visible_controls(text: str) -> str:
    """`text` with its control characters shown as Python's escapes: ESC as the four characters `\\x1b`, a carriage
    return not followed by a line feed as `\\r`, U+202E as `\\u202e` (`SHOWN_CODES` lists them); line feeds, tabs,
    "\\r\\n" line ends and every other character (accents, CJK, emoji and their joiners) stay as they are.

    Why this form: it names the exact code point (a caret `^[` or a control picture `␛` has no form for the C1 and
    bidirectional controls), it is plain ASCII that no terminal acts on, and it is what `repr()` and Python's error
    messages show, so it can be pasted back into a Python string. Backslashes of the text itself are not doubled (code
    and paths would be changed too): a text that spells out `\\x1b` reads the same; the exact text is in a file or a
    pipe, or on the terminal with the flag that writes it raw."""
    return _LONE_CARRIAGE_RETURN.sub(r"\\r", text).translate(_VISIBLE)


def is_terminal(file) -> bool:
    """Whether `file` is a terminal (`file.isatty()`); False for objects without `isatty` and for closed files."""
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def as_shown(text: str, file) -> str:
    """`text` as it is written to `file`: with its control characters shown (`visible_controls`) on a terminal, exact
    anywhere else."""
    return visible_controls(text) if is_terminal(file) else text


class TerminalWriter:
    """A file for `print(..., file=)` in front of `file`: to a terminal (`is_terminal`), unless `raw`, it writes the
    text with its control characters shown (`visible_controls`); to anything else, or with `raw`, the exact text.

    The text may come one character at a time (a streamer's): a carriage return at the end of a write waits for the
    next one, so that a "\\r\\n" line end split between two writes stays a line end; `finish()` writes out one still
    waiting. `escaped` tells whether any character was shown escaped (for a one-line note on stderr)."""

    def __init__(self, file, raw: bool = False):
        self.file = file
        self.showing = not raw and is_terminal(file)
        self.escaped = False
        self._carriage_return = False  # a "\r" written last, not yet shown

    def write(self, text: str) -> int:
        if not self.showing:
            return self.file.write(text)
        count = len(text)
        if self._carriage_return:
            text, self._carriage_return = "\r" + text, False
        if text.endswith("\r"):
            text, self._carriage_return = text[:-1], True
        shown = visible_controls(text)
        self.escaped = self.escaped or shown != text  # every escape is longer than the character it shows
        self.file.write(shown)
        return count

    def flush(self) -> None:
        self.file.flush()

    def finish(self) -> None:
        """Write out a carriage return still waiting (the text ended with it), and flush."""
        if self._carriage_return:
            self._carriage_return, self.escaped = False, True
            self.file.write("\\r")
        self.file.flush()
