"""Helpers shared by the tests (imported as `helpers`; fixtures live in conftest.py)."""

import contextlib
import io
import logging
import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import torch

from char_lstm import CharLSTMConfig, CharLSTMForCausalLM


ROOT = Path(__file__).resolve().parents[1]

CORPUS = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\tIndented line with  two spaces.\n"
    "ROMEO:\nBut, soft! what light through yonder window breaks?\n"
)


def make_model(
    tokenizer, cell_type="lstm", hidden_size=24, embedding_size=12, num_layers=2, dropout=0.0, seed=0, **kw
):
    torch.manual_seed(seed)
    config = CharLSTMConfig(
        vocab_size=len(tokenizer),
        embedding_size=embedding_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        dropout=dropout,
        cell_type=cell_type,
        pad_token_id=tokenizer.pad_token_id,
        unk_token_id=tokenizer.unk_token_id,
        **kw,
    )
    return CharLSTMForCausalLM(config).eval()


def count_forward_calls(monkeypatch):
    """Count the calls of CharLSTMForCausalLM.forward (wrapped on the class: a wrapper on the instance, as accelerate
    puts there, sends generate() to transformers' loop). Returns the list that grows by one per call."""
    calls, forward = [], CharLSTMForCausalLM.forward

    def counted(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(CharLSTMForCausalLM, "forward", counted)
    return calls


def write_text(path, text: str):
    """Write `text` exactly (no newline translation)."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return path


def shakespeare_like(n_chars: int = 6000) -> str:
    """A small deterministic corpus with speaker lines, so a tiny model learns something in a few steps."""
    lines = [
        "ROMEO:\nBut, soft! what light through yonder window breaks?\n\n",
        "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\n\n",
        "First Citizen:\nBefore we proceed any further, hear me speak.\n\n",
        "All:\nSpeak, speak.\n\n",
    ]
    text = "".join(lines[i % len(lines)] for i in range(n_chars // 40 + 1))
    return text[:n_chars]


def script_env(**extra):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


# Below pytest's per-test limit (pyproject: 300 s), so that a stuck subprocess fails with its own output.
SUBPROCESS_TIMEOUT = 240


def run_script(name, args, cwd, timeout=SUBPROCESS_TIMEOUT, stdin=None, **env):
    """Run scripts/NAME as a user would, in a subprocess."""
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *args],
        capture_output=True, text=True, cwd=cwd, env=script_env(**env), timeout=timeout, input=stdin,
    )


def call_script(name, args, cwd, stdin=None):
    """scripts/NAME run in this process as `python scripts/NAME args` would run it (the same file, argument parsing,
    `run` and exit code), minus the interpreter start-up (torch, transformers, datasets: several seconds a call).
    For the cases that check what a script computes or refuses; what a user sees on the console from the libraries
    (their warnings, a traceback) is checked by `run_script`'s real subprocesses. Returns a CompletedProcess."""
    script = str(ROOT / "scripts" / name)
    stdout, stderr = io.StringIO(), io.StringIO()
    logger = logging.getLogger("char_lstm")  # the script adds its handler on the stderr of this call
    saved = sys.argv, sys.stdin, os.getcwd(), logger.handlers[:], logger.level
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    threads = torch.get_num_threads()  # the scripts may compute with fewer threads when the cores are busy
    logger.handlers.clear()
    sys.argv = [script, *map(str, args)]
    sys.stdin = io.StringIO(stdin) if stdin is not None else open(os.devnull)
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                runpy.run_path(script, run_name="__main__")
                code = 0
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
    finally:
        sys.stdin.close()
        sys.argv, sys.stdin, cwd, logger.handlers[:], level = saved
        os.chdir(cwd)
        logger.setLevel(level)
        torch.set_num_threads(threads)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return subprocess.CompletedProcess(sys.argv, code, stdout.getvalue(), stderr.getvalue())
