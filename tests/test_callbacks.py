"""The callbacks of a training run (char_lstm.training.callbacks): the divergence guard, the time budget
(--max_train_seconds), the log line of the plateau schedule's cuts, and the prompt of the samples printed while
training."""

import json
import logging
import math
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from char_lstm.data import load_raw_datasets
from char_lstm.tokenization_char_lstm import CharLSTMTokenizer
from char_lstm.training.callbacks import TrainingDiverged, default_sample_prompt
from helpers import log_history, run, write_text


# ---------------------------------------------------------------------------------------------------------------------
# The divergence guard: NaN/inf weights or a loss that explodes stop the run, with no checkpoint after them


class PoisonWeights(TrainerCallback):
    """Makes the weights NaN at the start of a given step (what a diverging run does)."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            with torch.no_grad():
                model.lm_head.weight.fill_(float("nan"))


def test_divergence_guard_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged) as error:
        run(tmp_path, "--max_steps", "20", "--eval_steps", "2", "--save_steps", "2", "--sample_every_evals", "0",
            callbacks=[PoisonWeights(step=5)])
    message = str(error.value)
    assert "Training diverged at step 6: the weights became NaN/inf" in message  # found before saving step 6
    assert "--learning_rate 1e-4" in message and "--max_grad_norm" in message and "--fp16/--bf16" in message
    # the summary: the last good checkpoint with its evaluation, and what to do with it
    checkpoint = tmp_path / "out" / "checkpoint-4"
    eval_loss = [e for e in log_history(checkpoint) if "eval_loss" in e][-1]["eval_loss"]
    assert f"Last checkpoint: {checkpoint} (eval loss {eval_loss:#.4g} nats/char, " in message
    assert message.splitlines()[-1].startswith(
        f"Sample from it: python scripts/generate.py --model_name_or_path {checkpoint}"
    )
    assert "Resume" not in message  # the same run would diverge again
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-2",
        "checkpoint-4",
    ]
    weights = load_file(out / "checkpoint-4" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (out / "model.safetensors").exists()


def test_a_finite_explosion_stops_the_run_and_saves_no_checkpoint_after_it(tmp_path):
    """--learning_rate 1e3: the loss goes from ~4 to thousands and stays finite; the guard stops the run after 3 logs
    far above the start, with the advice, and writes no checkpoint once the loss has left."""
    with pytest.raises(TrainingDiverged) as error:
        run(tmp_path, "--max_steps", "40", "--eval_steps", "100", "--save_steps", "1", "--logging_steps", "1",
            "--learning_rate", "1e3", "--sample_every_evals", "0", "--save_total_limit", "100",
            "--load_best_model_at_end", "false")
    message = str(error.value)
    assert "stayed above 2x its start or best" in message and "for 3 logs in a row" in message
    assert "--learning_rate 1e-4" in message and "--max_grad_norm" in message and "--fp16/--bf16" in message
    out = tmp_path / "out"
    assert not (out / "model.safetensors").exists()
    for checkpoint in out.glob("checkpoint-*"):
        losses = [
            e["loss"]
            for e in json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
            if "loss" in e
        ]
        assert losses[-1] < 2 * math.log(len(json.loads((checkpoint / "vocab.json").read_text()))), checkpoint


# ---------------------------------------------------------------------------------------------------------------------
# The time budget: --max_train_seconds stops the run, saves it, and ends its learning-rate schedule


def test_max_train_seconds_stops_the_run_and_saves(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="char_lstm")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # not installed: the run trains without its picture
    metrics, out = run(tmp_path, "--max_steps", "500", "--eval_steps", "250", "--save_steps", "250",
                       "--sample_every_evals", "0", "--max_train_seconds", "0.001")
    assert metrics["global_step"] == 1
    assert (out / "model.safetensors").exists() and math.isfinite(metrics["eval_loss"])
    assert not (out / "training_curves.png").exists() and "training_curves.png" not in (out / "README.md").read_text()
    assert caplog.text.count("matplotlib is not installed: no training_curves.png was drawn") == 1
    assert (out / "checkpoint-1").is_dir()  # the last step is saved (and evaluated), so it can be the best model

    # ... but never NaN weights: the divergence guard checks the step the time limit saves
    with pytest.raises(TrainingDiverged):
        run(tmp_path, "--max_steps", "500", "--eval_steps", "250", "--save_steps", "250", "--sample_every_evals", "0",
            "--max_train_seconds", "0.001", callbacks=[PoisonWeights(step=1)], out="nan")
    assert not (tmp_path / "nan" / "checkpoint-1").exists()
    assert (
        "--max_train_seconds 0.001 reached at step 1 of 500: stopping (the learning-rate schedule" not in caplog.text
    )
    assert "--max_train_seconds 0.001 reached at step 1 of 500: stopping." in caplog.text  # the plateau scheduler
    stop = next(record for record in caplog.records if "--max_train_seconds 0.001 reached" in record.message)
    assert stop.levelno == logging.INFO  # the user's budget, not a warning


def test_a_time_budget_ends_the_learning_rate_schedule(tmp_path, capsys, monkeypatch):
    """A slow machine still gets a finished cosine schedule: with a budget of 10 s for 1000 steps that take 1 s each
    (a clock that advances one second per step), training stops at step 10 with the schedule at its end; a fast
    machine (a budget it never reaches) gets exactly the schedule over steps."""
    ticks = iter(range(10**6))
    monkeypatch.setattr("char_lstm.training.callbacks.time", SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    common = ("--eval_steps", "100000", "--save_steps", "100000", "--logging_steps", "1", "--sample_every_evals", "0",
              "--lr_scheduler_type", "cosine", "--learning_rate", "1e-2")
    metrics, out = run(tmp_path, "--max_steps", "1000", "--max_train_seconds", "10", *common)
    assert metrics["global_step"] == 10
    lrs = [entry["learning_rate"] for entry in log_history(out) if "learning_rate" in entry]
    # the rate used at step k follows the clock read at step k - 1: (k - 1) / 10 of the budget, of the schedule
    expected = [1e-2 * 0.5 * (1 + math.cos(math.pi * (k - 1) / 10)) for k in range(1, 11)]
    assert lrs == pytest.approx(expected)
    printed = capsys.readouterr().out
    assert "Stopped by --max_train_seconds 10 at step 10 of 1000, its learning-rate schedule ended." in printed
    assert f"Model: {out} (eval loss" in printed  # the final model is saved and evaluated

    _, fast = run(tmp_path, "--max_steps", "8", "--max_train_seconds", "10000", *common, out="fast")
    _, plain = run(tmp_path, "--max_steps", "8", *common, out="plain")
    assert [e["learning_rate"] for e in log_history(fast) if "learning_rate" in e] == pytest.approx(
        [e["learning_rate"] for e in log_history(plain) if "learning_rate" in e]
    )


# ---------------------------------------------------------------------------------------------------------------------
# The learning rate: the plateau schedule's cuts, each logged once


def test_plateau_halves_the_learning_rate_after_patience_evaluations(tmp_path, caplog):
    # a learning rate so small that the eval loss cannot improve by the scheduler's threshold: every eval is "bad"
    _, out = run(tmp_path, "--max_steps", "9", "--eval_steps", "1", "--save_steps", "100", "--logging_steps", "1",
                 "--learning_rate", "1e-7", "--lr_scheduler_kwargs", '{"factor": 0.5, "patience": 2}',
                 "--sample_every_evals", "0", "--load_best_model_at_end", "false")
    lrs = [entry["learning_rate"] for entry in log_history(out) if "learning_rate" in entry]
    # eval 1 sets the best, evals 2-4 do not improve: after the 3rd bad one (> patience) the LR is halved
    assert lrs[:4] == pytest.approx([1e-7] * 4)
    assert lrs[4:7] == pytest.approx([5e-8] * 3)
    assert lrs[7:9] == pytest.approx([2.5e-8] * 2)
    assert "learning rate reduced 1e-07 -> 5e-08" in caplog.text


def test_a_cosine_schedule_lowers_the_lr_every_step_and_no_plateau_cut_is_reported(tmp_path, caplog):
    _, out = run(tmp_path, "--max_steps", "4", "--eval_steps", "2", "--save_steps", "100", "--logging_steps", "1",
                 "--lr_scheduler_type", "cosine", "--sample_every_evals", "0")
    lrs = [entry["learning_rate"] for entry in log_history(out) if "learning_rate" in entry]
    assert len(lrs) == 4 and all(later < earlier for earlier, later in zip(lrs, lrs[1:])), lrs
    assert "learning rate reduced" not in caplog.text


# ---------------------------------------------------------------------------------------------------------------------
# The samples printed while training: a prompt of characters the model knows


def test_default_sample_prompt_uses_known_characters(tmp_path):
    raw = load_raw_datasets(train_file=str(write_text(tmp_path / "t.txt", "Über alles")))
    tokenizer = CharLSTMTokenizer.from_corpus("er all")
    assert default_sample_prompt(tokenizer, raw["train"], "text") == "er alle"
    romeo = CharLSTMTokenizer.from_corpus("ROMEO: x")
    assert default_sample_prompt(romeo, raw["train"], "text", default_corpus=True) == "ROMEO:"
    assert default_sample_prompt(romeo, raw["train"], "text") != "ROMEO:"  # another text: a prompt of its own
    code = "x = 1\n\tindented line\nstatic int count_lines(const char *text)\n}\n"
    raw = load_raw_datasets(train_file=str(write_text(tmp_path / "c.c", code)))
    c_tokenizer = CharLSTMTokenizer.from_corpus(code)
    assert default_sample_prompt(c_tokenizer, raw["train"], "text") == "static int"  # a line start, at a word end
