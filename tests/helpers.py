"""Helpers shared by the tests (imported as `helpers`; fixtures live in conftest.py)."""

import os
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


def make_model(tokenizer, cell_type="lstm", hidden_size=24, embedding_size=12, num_layers=2, dropout=0.0, seed=0, **kw):
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
