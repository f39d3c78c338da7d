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
from transformers import DynamicCache

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


# ---------------------------------------------------------------------------------------------------------------------
# A tiny training run through char_lstm.training.train(), for the tests of the training package (test_training.py,
# test_checkpoints.py, test_output_dir.py, test_callbacks.py, test_stateful.py, test_diagnostics.py)

TINY = [
    "--embedding_size", "16", "--hidden_size", "32", "--dropout", "0.0", "--block_size", "32",
    "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--report_to", "none",
    "--dataloader_pin_memory", "false", "--sample_length", "40",
]


def run(tmp_path, *extra, text=None, callbacks=None, out="out"):
    """train() of a tiny model (TINY, then `extra`) on tmp_path/train.txt (`text`, by default 8,000 characters of
    `shakespeare_like`; written by the first run of a test) into tmp_path/`out`: (its metrics, its output folder)."""
    # imported here: the training package (Trainer, accelerate) is imported by the tests that train, not by all
    from char_lstm.training import train
    from char_lstm.training.arguments import parse_arguments

    data = tmp_path / "train.txt"
    if not data.exists():
        write_text(data, text if text is not None else shakespeare_like(8000))
    argv = ["--train_file", str(data), "--output_dir", str(tmp_path / out), *TINY, *extra]
    metrics = train(*parse_arguments(argv), callbacks=callbacks)
    return metrics, tmp_path / out


def log_history(out):
    """The log history of the trainer_state.json in `out` (a run's output folder or a checkpoint)."""
    import json

    return json.loads((out / "trainer_state.json").read_text())["log_history"]


def checkpoints(out):
    """The names of the checkpoint-N folders in `out`, by step."""
    return sorted(
        (p.name for p in out.iterdir() if p.name.startswith("checkpoint-")), key=lambda n: int(n.split("-")[1])
    )


# The model's code that travels with every saved folder: modeling_char_lstm.py and the siblings it imports
SHIPPED_CODE = frozenset(path.name for path in (ROOT / "src" / "char_lstm").glob("*_char_lstm.py"))


def encode(tokenizer, texts, **kwargs):
    return tokenizer(texts, return_tensors="pt", **kwargs)


def decode_token_by_token(model, ids, prompt_length=3):
    """The logits of `ids` fed as a prompt of `prompt_length` tokens, then one token per call (the decoding step)."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = [model(input_ids=ids[:, :prompt_length], cache=cache, use_cache=True).logits]
        for t in range(prompt_length, ids.shape[1]):
            logits.append(model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    return torch.cat(logits, dim=1)


def adaptive_model(vocab_size=300, cell_type="lstm", seed=0):
    torch.manual_seed(seed)
    config = CharLSTMConfig(vocab_size=vocab_size, embedding_size=16, hidden_size=32, dropout=0.1,
                            cell_type=cell_type, adaptive_softmax_cutoffs=[20, 100], unk_token_id=1, eos_token_id=2,
                            bos_token_id=2)
    return CharLSTMForCausalLM(config)


def chi_square(counts: torch.Tensor, probabilities: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of `counts` against `probabilities` (classes expected fewer than 5 times pooled) and its
    degrees of freedom."""
    expected = probabilities.double() * counts.sum()
    small = expected < 5
    observed = torch.cat([counts[~small].double(), counts[small].double().sum().reshape(1)])
    expected = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    keep = expected > 0
    return float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()), int(keep.sum()) - 1
