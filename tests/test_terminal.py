"""Generated text on a terminal: control characters shown as escapes (char_lstm.terminal), in scripts/generate.py
(also in a real pseudo-terminal), the samples printed while training and the demo page; files and pipes get the exact
text."""

import importlib.util
import io
import logging
import os
import pty
import runpy
import select
import subprocess
import sys
import tty
import unicodedata

import pytest
import torch
from transformers import TrainerControl, TrainerState

from char_lstm import CharLSTMTokenizer, load_model_and_tokenizer
from char_lstm.sampling import GenerateArguments, run_generate
from char_lstm.terminal import SHOWN_CODES, TerminalWriter, is_terminal, visible_controls
from char_lstm.training.callbacks import SampleCallback
from helpers import ROOT, SUBPROCESS_TIMEOUT, make_model, script_env


# What the model below writes, over and over: a clear-screen sequence, an 8-bit CSI, a right-to-left override and a
# lone carriage return (every character once, so that each one says which comes next).
UNIT = "ok\x1b[2J\x9b\u202e\r"
RAW = ("\x1b", "\x9b", "\u202e")
UTF8 = {"PYTHONIOENCODING": "utf-8"}  # the exact text whatever the locale


class Terminal(io.StringIO):
    """A StringIO that says it is a terminal, as sys.stdout does on one."""

    def isatty(self):
        return True


def test_visible_controls_shows_each_control_as_its_python_escape_and_keeps_everything_else():
    for code in SHOWN_CODES:
        assert visible_controls(chr(code)) == ascii(chr(code))[1:-1], hex(code)
    assert visible_controls("\x1b[2J\x1b]52;c;cHduZWQ=\x07") == "\\x1b[2J\\x1b]52;c;cHduZWQ=\\x07"
    assert visible_controls("a\r\nb\rc\r") == "a\r\nb\\rc\\r"  # a line end stays; a lone return is shown
    kept = "line\n\tindented, é, 漢字, 👩\u200d💻, \u00a0, \\x1b written out\n"
    assert visible_controls(kept) == kept
    # every code point below U+3000: nothing a terminal acts on is left (but the line feed and the tab)
    everything = "".join(chr(code) for code in range(0x3000) if not 0xD800 <= code < 0xE000)
    shown = visible_controls(everything)
    left = {c for c in shown if unicodedata.category(c) == "Cc" or 0x202A <= ord(c) <= 0x202E
            or 0x2066 <= ord(c) <= 0x2069}
    assert left == {"\t", "\n"}
    # the escapes read back as the text (here, text without backslashes of its own and with ASCII letters only)
    text = "".join(chr(code) for code in SHOWN_CODES) + "ok\r\n"
    assert visible_controls(text).isascii()
    assert visible_controls(text).encode("ascii").decode("unicode_escape") == text


def test_terminal_writer_shows_controls_on_a_terminal_one_character_at_a_time_and_nowhere_else():
    text = "a\r\nb\rc\x1b[2J\u202e\r"
    terminal = Terminal()
    writer = TerminalWriter(terminal)
    for character in text:  # as a streamer writes: a "\r\n" split over two writes stays a line end
        print(character, end="", file=writer, flush=True)
    writer.finish()
    assert terminal.getvalue() == "a\r\nb\\rc\\x1b[2J\\u202e\\r" and writer.escaped
    plain = TerminalWriter(Terminal())
    print("a\r", end="", file=plain)
    print("b", file=plain)
    plain.finish()
    assert plain.file.getvalue() == "a\\rb\n" and plain.escaped
    line_ends = TerminalWriter(Terminal())
    print("a\r", end="", file=line_ends)
    print("\nb\r", file=line_ends)
    line_ends.finish()
    assert line_ends.file.getvalue() == "a\r\nb\r\n" and not line_ends.escaped
    for writer in (TerminalWriter(io.StringIO()), TerminalWriter(Terminal(), raw=True)):  # a file; the raw flag
        for character in text:
            writer.write(character)
        writer.finish()
        assert writer.file.getvalue() == text and not writer.escaped


def test_is_terminal_on_a_pseudo_terminal_a_pipe_and_a_closed_file():
    leader, follower = pty.openpty()
    reader, writer = os.pipe()
    with open(follower, "w") as terminal, open(writer, "w") as pipe:
        assert is_terminal(terminal) and not is_terminal(pipe) and not is_terminal(object())
    os.close(leader)
    os.close(reader)
    assert not is_terminal(terminal)  # closed: isatty() raises ValueError


@pytest.fixture(scope="module")
def escape_model(tmp_path_factory):
    """A tiny model trained to write UNIT over and over (greedy, and almost surely when sampled), saved."""
    tokenizer = CharLSTMTokenizer.from_corpus(UNIT)
    model = make_model(tokenizer, hidden_size=16, embedding_size=8, num_layers=1).train()
    ids = torch.tensor([tokenizer(UNIT * 8)["input_ids"]])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(60):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    folder = tmp_path_factory.mktemp("escape_model")
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("stream", [True, False], ids=["one prompt, streamed", "two prompts, batched"])
def test_generate_shows_the_controls_on_a_terminal_with_one_warning_and_raw_output_keeps_them(
        escape_model, stream, caplog):
    args = dict(model_name_or_path=str(escape_model), prompt=["ok\x1b"] * (1 if stream else 2), max_new_tokens=27,
                greedy=True)
    terminal = Terminal()
    with caplog.at_level(logging.WARNING, logger="char_lstm"):
        texts = run_generate(GenerateArguments(**args), stdout=terminal)
    assert texts[0] == UNIT * 3 + "ok\x1b"  # the model writes the escape codes
    shown = terminal.getvalue()
    assert not any(c in shown for c in RAW) and "\r" not in shown  # the prompt's ESC too
    headers = [""] if stream else ["===== sample 1 of 2 =====\n", "===== sample 2 of 2 =====\n"]
    assert shown == "".join(header + visible_controls(texts[0]) + "\n" for header in headers)
    warnings = [r.getMessage() for r in caplog.records if "control characters" in r.getMessage()]
    assert len(warnings) == 1 and "--raw_output" in warnings[0], warnings
    caplog.clear()
    for stdout, raw in ((Terminal(), True), (io.StringIO(), False)):  # --raw_output; a file
        with caplog.at_level(logging.WARNING, logger="char_lstm"):
            assert run_generate(GenerateArguments(**args, raw_output=raw), stdout=stdout) == texts
        header = "" if stream else "===== sample 1 of 2 =====\n"
        assert stdout.getvalue().startswith(header + texts[0] + "\n")
        assert not any("control characters" in r.getMessage() for r in caplog.records)


def test_the_samples_printed_while_training_show_the_controls_on_a_terminal(escape_model, monkeypatch, caplog):
    model, tokenizer = load_model_and_tokenizer(str(escape_model))
    callback = SampleCallback(tokenizer, "ok", every=1, length=18, temperature=0.5)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)  # where tqdm.write writes
    with caplog.at_level(logging.WARNING, logger="char_lstm"):
        for step in (10, 20):
            callback.on_evaluate(None, TrainerState(global_step=step), TrainerControl(), model=model)
    shown = terminal.getvalue()
    assert "----- sample at step 20 -----" in shown and "ok\\x1b[2J\\x9b\\u202e\\rok" in shown
    assert not any(c in shown for c in RAW)
    warnings = [r.getMessage() for r in caplog.records if "control characters" in r.getMessage()]
    assert len(warnings) == 1 and "step 10" in warnings[0], warnings  # said once
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # a log file gets the exact text
    callback.on_evaluate(None, TrainerState(global_step=30), TrainerControl(), model=model)
    assert "\x1b[2J\x9b\u202e\r" in sys.stdout.getvalue()


def test_the_demo_page_shows_the_controls(escape_model):
    if importlib.util.find_spec("gradio") is None:
        pytest.skip("the demo needs gradio (pip install -e '.[demo]')")
    app = runpy.run_path(str(ROOT / "demo" / "app.py"), run_name="demo_app")
    model, tokenizer = load_model_and_tokenizer(str(escape_model))
    texts = list(app["stream_generation"](model, tokenizer, "ok\x1b", 18, 0.5, 1.0, 0))
    assert all(text.startswith("ok\\x1b") for text in texts)  # the prompt shown too
    assert not any(c in text for text in texts for c in RAW)
    text = texts[-1].encode("ascii").decode("unicode_escape")  # the escapes read back
    assert len(text) == 3 + 18 and set(text) <= set(UNIT) and "\x1b[2J\x9b\u202e\r" in text, text


def run_on_a_terminal(args: list[str]) -> tuple[bytes, str]:
    """scripts/generate.py ARGS with its stdout on a pseudo-terminal (raw mode: the bytes as written); returns them
    and the stderr."""
    leader, follower = pty.openpty()
    tty.setraw(follower)
    process = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "generate.py"), *args], stdout=follower,
                               stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=script_env(**UTF8))
    os.close(follower)
    received = b""
    while True:
        if not select.select([leader], [], [], SUBPROCESS_TIMEOUT)[0]:
            process.kill()
            pytest.fail(f"scripts/generate.py wrote nothing for {SUBPROCESS_TIMEOUT} s; so far: {received!r}")
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the script has ended and closed the terminal
            break
        if not chunk:
            break
        received += chunk
    os.close(leader)
    stderr = process.communicate(timeout=SUBPROCESS_TIMEOUT)[1].decode()
    assert process.returncode == 0, stderr[-2000:]
    return received, stderr


@pytest.mark.slow
def test_generate_script_on_a_real_terminal_writes_no_escape_code_and_a_pipe_gets_the_exact_text(escape_model):
    args = ["--model_name_or_path", str(escape_model), "--prompt", "ok", "--max_new_tokens", "27", "--greedy"]
    exact = (UNIT * 3 + "ok\n").encode()
    shown, stderr = run_on_a_terminal(args)
    assert not any(c.encode() in shown for c in RAW) and b"\r" not in shown, shown
    assert shown == visible_controls(exact.decode()).encode()
    assert stderr.count("control characters") == 1 and "--raw_output" in stderr, stderr
    raw, stderr = run_on_a_terminal([*args, "--raw_output"])
    assert raw == exact and "control characters" not in stderr
    piped = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), *args], capture_output=True,
                           env=script_env(**UTF8), timeout=SUBPROCESS_TIMEOUT)
    assert piped.returncode == 0 and piped.stdout == exact, piped.stderr[-2000:]
    assert b"control characters" not in piped.stderr
