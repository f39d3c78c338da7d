"""What a run says about itself (char_lstm.training.summary): the lines every run ends with, and the
training-results table of the model card. The lines of a whole run: test_training.py's end-to-end test."""

import json
import math
import os
import shlex

import pytest

from char_lstm.training.summary import run_summary, training_results


# ---------------------------------------------------------------------------------------------------------------------
# The lines a run ends with: where the model is, how good it is, the command to run next


def test_the_summary_says_worse_when_the_model_does_not_beat_the_unigram_baseline(tmp_path):
    metrics = {"eval_loss": 3.0 * math.log(2), "unigram_bits_per_char": 2.5}
    line = run_summary(str(tmp_path), "Training finished.", metrics).splitlines()[1]
    assert line.endswith("3.000 bits/char, 0.50 bits/char worse than the data's unigram baseline).")
    line = run_summary(str(tmp_path), "Training finished.", {**metrics, "unigram_bits_per_char": 4.0}).splitlines()[1]
    assert line.endswith("3.000 bits/char, 1.00 bits/char better than the data's unigram baseline).")


def test_the_summarys_sample_command_runs_from_any_folder(tmp_path, monkeypatch):
    metrics = {"eval_loss": 1.0}
    assert "Sample from it: python scripts/generate.py --model_name_or_path out " in run_summary("out", "x", metrics)
    monkeypatch.chdir(tmp_path)  # elsewhere: the script's own path
    command = run_summary("out", "x", metrics).splitlines()[-1].split()
    assert command[:2] == ["Sample", "from"] and os.path.isabs(command[4]) and os.path.isfile(command[4])
    assert command[4].endswith(os.path.join("scripts", "generate.py"))


def test_a_run_stopped_before_its_final_model_names_its_last_checkpoint_and_how_to_go_on(tmp_path):
    """No final model: the summary names the newest checkpoint (by step) with the last evaluation saved in it, the
    command that resumes the run (unless `resume=False`, for a run that would only stop again) and the command that
    samples from the checkpoint, quoted so that it runs as printed."""
    out = tmp_path / "my runs"
    assert run_summary(str(out), "Stopped.") == "Stopped.\nNo checkpoint had been saved yet."
    for step, history in [
        (2, [{"eval_loss": 2.5, "step": 2}]),
        (10, [{"eval_loss": 2.5, "step": 2}, {"eval_loss": 1.5, "eval_bits_per_char": 2.2, "step": 10},
              {"loss": 1.4, "step": 12}]),
    ]:
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    lines = run_summary(str(out), "Stopped.", prompt="To be").splitlines()
    assert lines[:3] == [
        "Stopped.",
        f"Last checkpoint: {out / 'checkpoint-10'} (eval loss 1.500 nats/char, 2.200 bits/char).",
        "Resume: the same command with --resume_from_checkpoint True.",
    ]
    command = shlex.split(lines[3].removeprefix("Sample from it: "))
    assert command[2:] == ["--model_name_or_path", str(out / "checkpoint-10"), "--prompt", "To be",
                           "--max_new_tokens", "300"]
    assert len(lines) == 4 and lines[3].startswith("Sample from it: python ")
    assert [line.split(":")[0] for line in run_summary(str(out), "Diverged.", resume=False).splitlines()] == [
        "Diverged.", "Last checkpoint", "Sample from it"]
    (out / "checkpoint-12").mkdir()  # a newer checkpoint with no evaluation saved in it (here: no trainer state)
    last = run_summary(str(out), "Stopped.").splitlines()[1]
    assert last == f"Last checkpoint: {out / 'checkpoint-12'} (not evaluated)."


# ---------------------------------------------------------------------------------------------------------------------
# The model card's training results: one row per evaluation


def test_the_cards_training_results_show_no_training_loss_where_none_was_logged_since_the_evaluation_before():
    """A time-budget stop at step 1036, just after the evaluation at 1000: its row has no training loss of its own
    (it repeated step 1000's), and the final model's evaluation at the same step is not a row of its own."""
    history = [{"loss": 2.0, "step": 500}, {"loss": 1.5, "step": 1000}, {"eval_loss": 1.6, "step": 1000},
               {"eval_loss": 1.55, "step": 1036}, {"eval_loss": 1.55, "step": 1036}]
    rows = training_results(history)
    assert [(row["step"], row["training_loss"], row["validation_loss"]) for row in rows] == [
        (1000, 1.5, 1.6), (1036, None, 1.55)]
    assert rows[0]["bits_per_char"] == pytest.approx(1.6 / math.log(2))
