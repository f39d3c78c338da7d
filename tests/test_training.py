"""char_lstm.training with a real Trainer: end-to-end, plateau LR, divergence guard, arguments, output safety."""

import dataclasses
import json
import logging
import math
import os
import pickle
import platform
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from transformers.generation.utils import logger as generation_logger
from transformers.testing_utils import CaptureLogger

from char_lstm import CharLSTMTokenizer
from char_lstm.data import DataError, collate_stream_blocks, encode_streams
from char_lstm.errors import UsageError
from char_lstm.training import (
    PRESETS,
    CharLSTMTrainingArguments,
    StatefulTrainer,
    TrainingDiverged,
    keep_freed_memory,
    parse_arguments,
    train,
)
from helpers import make_model, shakespeare_like, write_text


TINY = [
    "--embedding_size", "16", "--hidden_size", "32", "--dropout", "0.0", "--block_size", "32",
    "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--report_to", "none",
    "--dataloader_pin_memory", "false", "--sample_length", "40",
]


def run(tmp_path, *extra, text=None, callbacks=None, out="out"):
    data = tmp_path / "train.txt"
    if not data.exists():
        write_text(data, text if text is not None else shakespeare_like(8000))
    argv = ["--train_file", str(data), "--output_dir", str(tmp_path / out), *TINY, *extra]
    metrics = train(*parse_arguments(argv), callbacks=callbacks)
    return metrics, tmp_path / out


def log_history(out):
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


def test_eval_steps_that_do_not_divide_save_steps_name_both_flags():
    """--eval_steps 20 with --load_best_model_at_end true (checkpoints every 250 steps by default) was refused by
    Trainer naming neither flag. (--eval_steps 20 alone: tests/test_training_defaults.py.)"""
    message = (r"^--save_steps 250 is not a multiple of --eval_steps 20 and --load_best_model_at_end true: "
               r".*--save_steps 20 ")
    with pytest.raises(ValueError, match=message):
        parse_arguments(["--eval_steps", "20", "--load_best_model_at_end", "true", "--output_dir", "unused"])
    parse_arguments(["--eval_steps", "20", "--load_best_model_at_end", "false", "--output_dir", "unused"])
    parse_arguments(["--eval_steps", "125", "--output_dir", "unused"])


def test_end_to_end_eval_loss_falls_and_outputs_load(tmp_path, capsys):
    metrics, out = run(tmp_path, "--max_steps", "60", "--eval_steps", "20", "--save_steps", "20",
                       "--logging_steps", "10", "--learning_rate", "1e-2")
    evals = [entry["eval_loss"] for entry in log_history(out) if "eval_loss" in entry]
    assert len(evals) >= 3 and evals[-1] < evals[0] - 0.3
    assert math.isclose(metrics["eval_bits_per_char"], metrics["eval_loss"] / math.log(2), rel_tol=1e-9)
    assert math.isclose(metrics["eval_perplexity"], math.exp(metrics["eval_loss"]), rel_tol=1e-9)
    for entry in log_history(out):  # the evaluations while training: one loss, whichever way it is shown
        if "eval_loss" in entry:
            assert math.isclose(entry["eval_bits_per_char"], entry["eval_loss"] / math.log(2), rel_tol=1e-9)
    out_text = capsys.readouterr().out
    # no --sample_prompt, not tiny Shakespeare: the samples start from a line start of the validation text
    assert "----- sample at step 20 -----\nFirst Citizen:" in out_text
    # the last step's sample once (the final evaluation does not print another), then the summary
    assert out_text.count("----- sample at step 60 -----") == 1
    assert out_text.rstrip().splitlines()[-3:] == [
        "Training finished: 60 steps in " + out_text.split("Training finished: 60 steps in ")[1].split()[0] + " s.",
        f"Model: {out} (eval loss {metrics['eval_loss']:#.4g} nats/char (all {metrics['eval_characters']:,} "
        "validation characters), "
        f"{metrics['eval_bits_per_char']:#.4g} bits/char, "
        f"{metrics['unigram_bits_per_char'] - metrics['eval_bits_per_char']:.2f} bits/char better than the data's "
        "unigram baseline).",
        f"Sample from it: python scripts/generate.py --model_name_or_path {out} --prompt 'First Citizen:' "
        "--max_new_tokens 300",
    ]
    for name in ("model.safetensors", "config.json", "generation_config.json", "vocab.json", "README.md"):
        assert (out / name).exists(), name
    assert (out / "training_curves.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    card = (out / "README.md").read_text()
    assert "### Training results\n\n![Training curves](training_curves.png)\n" in card
    assert f"value: {round(metrics['eval_loss'], 4)}" in card and "| block (sequence) length | 32 |" in card
    # the card tells what this run did: procedure, a training-results table, the data by name (no local path)
    assert "Trained with `transformers.Trainer` for 60 steps" in card
    assert "Adam (AdamW with weight decay 0)" in card and "multiplied by 0.5 after 3 evaluations without" in card
    assert "halved" not in card and "cosine" not in card
    history = log_history(out)
    for step in (20, 40, 60):
        evaluation = next(e for e in history if e.get("step") == step and "eval_loss" in e)
        loss = next(e["loss"] for e in history if e.get("step") == step and "loss" in e)
        assert (f"| {step} | {loss:.4f} | {evaluation['eval_loss']:.4f} | "
                f"{evaluation['eval_bits_per_char']:.4f} |") in card
    assert "`train.txt`" in card and str(tmp_path / "train.txt") not in card
    assert f"# {out.name}\n" in card and f'from_pretrained("{out}"' in card  # the folder, not its staging copy
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    # the model's use_cache, not Trainer's training-time False: a forward in eval mode returns its cache
    assert json.loads((out / "config.json").read_text())["use_cache"] is True
    assert json.loads((out / "checkpoint-60" / "config.json").read_text())["use_cache"] is True
    assert model(**tokenizer(["ROMEO:"], return_tensors="pt")).cache is not None
    assert model.generation_config.do_sample and model.generation_config.temperature == 0.8
    assert model.generation_config.top_k == 0  # sampling from every character, not transformers' top 50
    text = tokenizer.decode(model.generate(**tokenizer(["ROMEO:"], return_tensors="pt"), max_new_tokens=20)[0])
    assert text.startswith("ROMEO:") and len(text) == 26
    # no saved length overrides the caller's (a saved max_new_tokens would win over max_length), and a caller's
    # max_new_tokens draws no "Both max_new_tokens and max_length" warning (which a saved max_length causes)
    saved = json.loads((out / "generation_config.json").read_text())
    assert "max_new_tokens" not in saved and "max_length" not in saved
    prompt = tokenizer(["ROMEO:"], return_tensors="pt")
    assert model.generate(**prompt, max_length=16).shape == (1, 16)
    with CaptureLogger(generation_logger) as captured:
        assert model.generate(**prompt, max_new_tokens=4).shape == (1, 10)
    assert "max_length" not in captured.out


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


def checkpoints(out):
    return sorted(
        (p.name for p in out.iterdir() if p.name.startswith("checkpoint-")), key=lambda n: int(n.split("-")[1])
    )


def test_output_dir_with_checkpoints_is_refused_and_overwrite_deletes_the_old_checkpoints(tmp_path):
    args = ("--max_steps", "4", "--eval_steps", "2", "--save_steps", "2", "--sample_every_evals", "0")
    run(tmp_path, *args)
    out = tmp_path / "out"
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4"]
    before = (out / "checkpoint-4" / "model.safetensors").read_bytes()
    with pytest.raises(
        UsageError, match="already holds checkpoints \\(checkpoint-4\\).*--resume_from_checkpoint True"
    ):
        run(tmp_path, *args)
    assert (out / "checkpoint-4" / "model.safetensors").read_bytes() == before
    # a run that saves at other steps: only its own checkpoints are left, the old ones are gone (not overwritten)
    run(tmp_path, "--max_steps", "3", "--eval_steps", "3", "--save_steps", "3", "--sample_every_evals", "0",
        "--overwrite_output_dir", "true")
    assert checkpoints(out) == ["checkpoint-3"]


def test_default_run_keeps_three_checkpoints_with_the_best_and_ends_with_the_best_model(tmp_path):
    """The defaults (save_total_limit=3, load_best_model_at_end by eval loss): the model saved at the end is the
    best checkpoint's, and only 3 checkpoints stay, the best one among them. The weights are spoiled at step 5, so
    that the best checkpoint (step 4) is neither the last one nor among the latest ones."""

    class SpoilHeadAtStep5(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step + 1 == 5:
                with torch.no_grad():
                    model.lm_head.bias.add_(
                        torch.randn(model.lm_head.bias.shape, generator=torch.Generator().manual_seed(0)) * 10
                    )

    _, out = run(tmp_path, "--max_steps", "12", "--eval_steps", "2", "--save_steps", "2", "--learning_rate", "1e-2",
                 "--sample_every_evals", "0", callbacks=[SpoilHeadAtStep5()])
    evals = {entry["step"]: entry["eval_loss"] for entry in log_history(out)
             if "eval_loss" in entry and "eval_characters" not in entry}  # the periodic ones, not the final one
    assert min(evals, key=evals.get) == 4, evals
    # rotation deletes the oldest checkpoints but never the best one or the latest
    assert checkpoints(out) == ["checkpoint-4", "checkpoint-10", "checkpoint-12"]
    final, best = load_file(out / "model.safetensors"), load_file(out / "checkpoint-4" / "model.safetensors")
    last = load_file(out / "checkpoint-12" / "model.safetensors")
    assert final.keys() == best.keys() and all(torch.equal(final[k], best[k]) for k in best)
    assert not torch.equal(final["lm_head.bias"], last["lm_head.bias"])


def test_overwrite_deletes_nothing_when_the_run_cannot_start(tmp_path):
    args = ("--max_steps", "2", "--eval_steps", "2", "--save_steps", "2", "--sample_every_evals", "0")
    run(tmp_path, *args)
    with pytest.raises(DataError, match="does not exist"):
        train(*parse_arguments(["--train_file", str(tmp_path / "missing.txt"), "--output_dir", str(tmp_path / "out"),
                                "--overwrite_output_dir", "true", *TINY]))
    assert (tmp_path / "out" / "checkpoint-2" / "model.safetensors").exists()


def test_default_sample_prompt_uses_known_characters(tmp_path):
    from char_lstm import CharLSTMTokenizer
    from char_lstm.data import load_raw_datasets
    from char_lstm.training import default_sample_prompt

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


def test_mistyped_model_folder_is_reported_before_the_data_are_loaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "shakespeare").mkdir(parents=True)
    with pytest.raises(OSError, match="outputs/shakespear does not exist; did you mean outputs/shakespeare"):
        # the training file does not exist either: the model path is checked first
        train(*parse_arguments(["--model_name_or_path", "outputs/shakespear", "--train_file", "missing.txt",
                                "--output_dir", "out", *TINY]))


def test_resume_true_without_checkpoint_starts_from_the_beginning_unless_the_folder_holds_a_model(tmp_path, caplog):
    """A job that always resumes (or a run killed before its first checkpoint): the folder holds nothing yet, and
    `--resume_from_checkpoint True` trains from step 0. A folder that holds a model but no checkpoint is refused."""
    args = ("--max_steps", "2", "--eval_steps", "2", "--save_strategy", "no", "--sample_every_evals", "0",
            "--load_best_model_at_end", "false")
    (tmp_path / "out" / "runs").mkdir(parents=True)  # what a killed run leaves: TensorBoard files, the lock
    (tmp_path / "out" / "_train.lock").write_text("12345\n")
    with caplog.at_level(logging.WARNING, logger="char_lstm"):
        metrics, out = run(tmp_path, *args, "--resume_from_checkpoint", "True")
    assert metrics["global_step"] == 2 and (out / "model.safetensors").exists()
    assert "holds no checkpoint yet; training from the start" in caplog.text
    with pytest.raises(UsageError, match="holds no checkpoint to resume from \\(it holds model.safetensors, "
                       "all_results.json, config.json.*--model_name_or_path .*out with another --output_dir"):
        run(tmp_path, *args, "--resume_from_checkpoint", "True")


def test_a_folder_with_a_model_or_other_files_but_no_checkpoint_is_not_written_over_unasked(tmp_path, caplog):
    args = ("--max_steps", "2", "--eval_steps", "2", "--save_strategy", "no", "--sample_every_evals", "0",
            "--load_best_model_at_end", "false")
    _, out = run(tmp_path, *args)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(UsageError, match="already holds files \\(model.safetensors, all_results.json, config.json"
                       " and \\d+ more\\) and no checkpoint: .*--overwrite_output_dir"):
        run(tmp_path, *args)
    assert (out / "model.safetensors").read_bytes() == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my notes")
    with pytest.raises(UsageError, match="mine already holds files \\(notes.txt\\)"):
        run(tmp_path, *args, out="mine")
    # asked: the previous model's weights go when the run starts (a run stopped early leaves no stale model beside
    # its checkpoints); the user's own files stay
    (out / "notes.txt").write_text("my notes")

    class WeightsAtFirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            self.present = (out / "model.safetensors").exists()

    seen = WeightsAtFirstStep()
    with caplog.at_level(logging.WARNING, logger="char_lstm"):
        run(tmp_path, *args, "--overwrite_output_dir", "true", "--seed", "1", callbacks=[seen])
    assert seen.present is False and "deleted the previous model's weights" in caplog.text
    assert (out / "notes.txt").read_text() == "my notes" and (out / "model.safetensors").read_bytes() != before


class Evil:
    """Unpickling this runs a command: a hostile checkpoint file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


RESUMABLE = ("--max_steps", "6", "--eval_steps", "2", "--save_steps", "2", "--logging_steps", "2", "--seed", "5",
             "--sample_every_evals", "0", "--save_total_limit", "5", "--load_best_model_at_end", "false",
             "--dropout", "0.1")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run of 6 steps with checkpoints 2, 4, 6 (and the final model, = checkpoint-6)."""
    _, out = run(tmp_path_factory.mktemp("finished"), *RESUMABLE)
    return out


def damage(checkpoint, how, marker):
    if how == "truncated weights":
        data = (checkpoint / "model.safetensors").read_bytes()
        (checkpoint / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "no trainer state":
        (checkpoint / "trainer_state.json").unlink()
    else:  # a hostile pickle as rng_state.pth / optimizer.pt / scheduler.pt / stream_state_0.pt (--stateful)
        (checkpoint / how).write_bytes(pickle.dumps(Evil(marker)))


@pytest.mark.parametrize(
    "how",
    ["truncated weights", "no trainer state", "rng_state.pth", "optimizer.pt", "scheduler.pt", "stream_state_0.pt"],
)
def test_resume_skips_an_incomplete_or_hostile_checkpoint(tmp_path, finished_run, how, caplog):
    """The newest checkpoint is damaged: the resume says so in one line, sets it aside, continues from the one before
    and ends with the weights of the uninterrupted run. Nothing in a hostile file runs."""
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    for name in ("model.safetensors", "trainer_state.json"):  # killed before the final model was written
        (out / name).unlink()
    marker = tmp_path / "pwned"
    damage(out / "checkpoint-6", how, marker)

    with pytest.raises(UsageError, match=r"checkpoint-6 cannot be resumed from: .*another checkpoint"):
        run(tmp_path, *RESUMABLE, "--resume_from_checkpoint", str(out / "checkpoint-6"))
    with caplog.at_level(logging.WARNING, logger="char_lstm.training"):
        run(tmp_path, *RESUMABLE, "--resume_from_checkpoint", "True")
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Skipped")]
    assert len(skipped) == 1 and "\n" not in skipped[0]
    assert skipped[0].startswith("Skipped checkpoint-6 (") and skipped[0].endswith("resuming from checkpoint-4.")
    assert not marker.exists()
    assert (out / "_incomplete-checkpoint-6").is_dir()
    expected, got = load_file(finished_run / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_resume_of_a_finished_run_trains_no_more(tmp_path, finished_run, caplog, capsys):
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    (out / "model.safetensors").unlink()  # killed while writing the final model
    with caplog.at_level(logging.WARNING, logger="char_lstm.training"):
        metrics, _ = run(tmp_path, *RESUMABLE, "--resume_from_checkpoint", "True")
    assert "checkpoint-6 is at step 6, where the run ends: no more training" in caplog.text
    assert metrics["global_step"] == 6 and not (out / "checkpoint-7").exists()
    assert "Training had already finished at step 6: no step was left to run." in capsys.readouterr().out
    expected, got = load_file(finished_run / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(expected[name], got[name]) for name in expected)


@pytest.mark.parametrize(
    "extra, text, message",
    [
        (("--block_size", "0"), None, "--block_size must be a positive"),
        ((), "too short", r"training text is shorter than one block \(33 characters\)"),
        (("--validation_split_percentage", "1"), "x" * 40, r"validation text is shorter than one block"),
        (("--preset", "huge"), None, r"Unknown --preset 'huge'; choose from \['char-rnn', 'cpu-small'\]"),
        (("--sample_prompt", "Zebra~"), None, "has characters outside the vocabulary"),
    ],
)
def test_bad_input_errors(tmp_path, extra, text, message):
    with pytest.raises(UsageError, match=message):  # DataError (a UsageError) for the data, UsageError for arguments
        run(tmp_path, "--max_steps", "2", *extra, text=text)


def test_tokenizer_that_does_not_match_the_model(tmp_path):
    _, out = run(tmp_path, "--max_steps", "2", "--eval_steps", "2", "--save_steps", "2", "--sample_every_evals", "0")
    other = tmp_path / "other"
    (tmp_path / "other.txt").write_text("completely different characters: 0123456789", encoding="utf-8")
    from char_lstm import CharLSTMTokenizer

    CharLSTMTokenizer.from_corpus((tmp_path / "other.txt").read_text()).save_pretrained(other)
    with pytest.raises(ValueError, match="tokenizer has \\d+ tokens but the model's vocab_size is \\d+"):
        run(tmp_path, "--max_steps", "2", "--model_name_or_path", str(out), "--tokenizer_name", str(other),
            "--output_dir", str(tmp_path / "out2"))


def test_model_name_or_path_continues_from_the_saved_weights_architecture_and_tokenizer(tmp_path):
    _, out = run(tmp_path, "--max_steps", "4", "--eval_steps", "2", "--save_steps", "2", "--sample_every_evals", "0",
                 "--learning_rate", "1e-2")
    first = load_file(out / "model.safetensors")
    # learning rate 0 (and no weight decay): the continued run's weights are exactly those it started from
    argv = ["--train_file", str(tmp_path / "train.txt"), "--output_dir", str(tmp_path / "more"), *TINY,
            "--model_name_or_path", str(out), "--max_steps", "2", "--eval_steps", "2", "--sample_every_evals", "0",
            "--learning_rate", "0", "--hidden_size", "64"]  # ignored: the saved model's architecture is used
    train(*parse_arguments(argv))
    second = load_file(tmp_path / "more" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert json.loads((tmp_path / "more" / "vocab.json").read_text()) == json.loads((out / "vocab.json").read_text())


def test_arguments_from_json_and_yaml_files_and_presets(tmp_path):
    values = {"train_file": "x.txt", "hidden_size": 48, "learning_rate": 0.01, "output_dir": str(tmp_path / "o")}
    (tmp_path / "c.json").write_text(json.dumps(values))
    model_args, data_args, training_args = parse_arguments([str(tmp_path / "c.json")])
    assert (model_args.hidden_size, data_args.train_file, training_args.learning_rate) == (48, "x.txt", 0.01)
    (tmp_path / "c.yaml").write_text("train_file: y.txt\npreset: cpu-small\nembedding_size: 24\n")
    model_args, data_args, training_args = parse_arguments([str(tmp_path / "c.yaml")])
    assert (model_args.embedding_size, model_args.hidden_size) == (24, PRESETS["cpu-small"]["hidden_size"])
    assert training_args.max_steps == PRESETS["cpu-small"]["max_steps"]
    # command line: the preset fills in, explicit flags win
    model_args, _, training_args = parse_arguments(["--preset", "cpu-small", "--hidden_size", "100"])
    assert model_args.hidden_size == 100 and model_args.dropout == PRESETS["cpu-small"]["dropout"]
    # the char-rnn recipe's defaults without a preset (the same as --preset char-rnn)
    model_args, data_args, training_args = parse_arguments([])
    assert (model_args.embedding_size, model_args.hidden_size, model_args.num_hidden_layers) == (128, 512, 2)
    assert (model_args.dropout, data_args.block_size, training_args.per_device_train_batch_size) == (0.5, 100, 64)
    assert (training_args.learning_rate, training_args.max_grad_norm) == (2e-3, 1.0)
    assert training_args.lr_scheduler_kwargs == {"factor": 0.5, "patience": 3}
    assert data_args.dataset_name == "karpathy/tiny_shakespeare"
    _, _, cosine = parse_arguments(["--lr_scheduler_type", "cosine"])
    assert cosine.lr_scheduler_kwargs == {}


def test_the_old_preset_name_seed_still_works_and_says_once_it_is_deprecated(caplog, monkeypatch):
    """`--preset seed` (renamed `char-rnn`) gives the same values, with one deprecation line per process."""
    from char_lstm.training import arguments

    monkeypatch.setattr(arguments, "_renames_said", set())  # as in a fresh process
    renamed = [parse_arguments(["--preset", "char-rnn", "--output_dir", "x"])]
    with caplog.at_level(logging.WARNING, logger="char_lstm"):
        renamed += [parse_arguments(["--preset", "seed", "--output_dir", "x"]) for _ in range(2)]
    for model_args, *rest in renamed[1:]:
        assert model_args.preset == "seed"
        assert (dataclasses.replace(model_args, preset="char-rnn"), *rest) == renamed[0]
    said = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert said == ["--preset seed is deprecated: it is now called 'char-rnn' (same values)."]


def test_tensorboard_gets_metrics_and_samples(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(tmp_path, "--max_steps", "4", "--eval_steps", "2", "--save_steps", "2", "--report_to", "tensorboard")
    event_dirs = {os.path.dirname(p) for p in map(str, (tmp_path).rglob("events.out.tfevents*"))}
    assert event_dirs
    tags = {"tensors": set(), "scalars": set()}
    for folder in event_dirs:
        acc = EventAccumulator(folder)
        acc.Reload()
        tags["tensors"] |= set(acc.Tags()["tensors"])
        tags["scalars"] |= set(acc.Tags()["scalars"])
    assert any("sample" in tag for tag in tags["tensors"]), tags
    assert "eval/bits_per_char" in tags["scalars"] and "eval/loss" in tags["scalars"]


class RecordTrainingForwards(TrainerCallback):
    """Records, for every forward of the model in training mode, the batch size and the dtype the output layer
    computes the logits in (accelerate hands the model's outputs back in float32 on some CPUs, so the model's own
    output dtype says nothing about autocast). Its hook is on the head from the start of each optimizer step to its
    end only, so evaluation and the samples printed at evaluations see the model as a run without it does (a hook
    sends generate() to transformers' own loop)."""

    def __init__(self):
        self.calls, self.handle = [], None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        def hook(module, inputs, output):
            if module.training:
                self.calls.append((output.shape[0], output.dtype))

        self.handle = model.lm_head.register_forward_hook(hook)

    def on_step_end(self, args, state, control, **kwargs):
        self.handle.remove()


def test_bf16_autocast_computes_the_training_forward_in_bf16_and_accumulation_runs_two_batches_per_step(tmp_path):
    recorder = RecordTrainingForwards()
    metrics, out = run(tmp_path, "--max_steps", "6", "--eval_steps", "3", "--save_steps", "3", "--bf16", "true",
                       "--use_cpu", "true", "--gradient_accumulation_steps", "2", "--sample_every_evals", "1",
                       "--sample_length", "20", callbacks=[recorder])
    assert math.isfinite(metrics["eval_loss"]) and metrics["global_step"] == 6  # sampling under bf16 autocast too
    # 6 optimizer steps x 2 accumulated batches of 8 blocks, each forward under bf16 autocast
    assert recorder.calls == [(8, torch.bfloat16)] * 12
    state = json.loads((out / "trainer_state.json").read_text())
    blocks = int(len(shakespeare_like(8000)) * 0.95 - 1) // 32  # blocks of 33 ids, one every 32 characters
    assert state["global_step"] == 6 and state["epoch"] == pytest.approx(6 * 2 * 8 / blocks, rel=0.05)


def test_streaming_with_a_validation_file_trains_and_reports_its_characters_outside_the_vocabulary(tmp_path, caplog):
    write_text(tmp_path / "valid.txt", shakespeare_like(2000) + "\u00a7\u00a7 \u00b6")
    metrics, out = run(tmp_path, "--max_steps", "5", "--eval_steps", "5", "--save_steps", "5", "--streaming", "true",
                       "--validation_file", str(tmp_path / "valid.txt"), "--sample_every_evals", "0")
    assert math.isfinite(metrics["eval_loss"]) and metrics["global_step"] == 5
    # the final evaluation read the stream to its end (fewer characters than its least sample): all of it, exactly
    assert metrics["eval_loss_stderr"] == 0 and 1900 < metrics["eval_characters"] <= 2003
    assert "3 characters of the validation text (0.1" in caplog.text and "are not in the vocabulary" in caplog.text
    assert "'\u00a7\u00b6'" in caplog.text
    with pytest.raises(UsageError, match="--streaming needs --max_steps"):
        run(tmp_path, "--streaming", "true", "--output_dir", str(tmp_path / "o2"))


def test_validation_characters_outside_the_vocabulary_are_reported(tmp_path, caplog):
    write_text(tmp_path / "valid.txt", shakespeare_like(2000) + "\u00a7\u00a7 \u00b6")
    run(tmp_path, "--max_steps", "2", "--eval_steps", "2", "--save_steps", "2", "--sample_every_evals", "0",
        "--validation_file", str(tmp_path / "valid.txt"))
    assert "3 characters of the validation text (0.1" in caplog.text and "are not in the vocabulary" in caplog.text
    assert "'\u00a7\u00b6'" in caplog.text


# ---------------------------------------------------------------------------------------------------------------------
# Stateful truncated BPTT (--stateful)

STATEFUL = ("--stateful", "true", "--sample_every_evals", "0", "--learning_rate", "1e-2", "--logging_steps", "1",
            "--per_device_eval_batch_size", "2")


def final_weights(out):
    return load_file(out / "model.safetensors")


def test_stateful_trainer_carries_the_state_and_resets_it_where_streams_start(tmp_path):
    """Trainer's own loss on consecutive batches equals the loss of one long read of each stream, and a batch that
    starts the streams again (the next epoch) starts from zero."""
    text = shakespeare_like(3000)
    tokenizer = CharLSTMTokenizer.from_corpus(text)
    streams = encode_streams(Dataset.from_dict({"text": [text]}), tokenizer, "text", block_size=20, num_streams=4)
    args = CharLSTMTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to="none",
                                     train_sampling_strategy="sequential", label_names=["shift_labels"], use_cpu=True,
                                     eval_strategy="no", load_best_model_at_end=False, lr_scheduler_type="constant")
    model = make_model(tokenizer)
    trainer = StatefulTrainer(model=model, args=args, train_dataset=streams, data_collator=collate_stream_blocks)
    batches = list(trainer.get_train_dataloader())
    windows = len(streams) // 4
    assert len(batches) == windows and [int(b["window"][0]) for b in batches] == list(range(windows))

    model.train()  # dropout is 0: train mode, the state of the "train" streams
    with torch.no_grad():
        losses = [trainer.compute_loss(model, batch).item() for batch in batches[:3]]
        restart = trainer.compute_loss(model, batches[0]).item()  # window 0 again: a new epoch
        inputs = torch.cat([b["input_ids"] for b in batches[:3]], dim=1)
        targets = torch.cat([b["shift_labels"] for b in batches[:3]], dim=1)
        logits = model(input_ids=inputs, use_cache=False).logits
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    expected = [nll[:, k * 20 : (k + 1) * 20].mean().item() for k in range(3)]
    assert losses == pytest.approx(expected, abs=1e-5)
    assert restart == pytest.approx(losses[0], abs=1e-6)
    zero_state_loss = torch.nn.functional.cross_entropy(
        model(input_ids=batches[2]["input_ids"], use_cache=False).logits.transpose(1, 2), batches[2]["shift_labels"]
    ).item()
    assert abs(zero_state_loss - losses[2]) > 1e-3  # the carried state does make a difference


@pytest.mark.parametrize("accumulation", ["1", "2"])
def test_stateful_resume_continues_the_streams_exactly(tmp_path, accumulation):
    args = ("--max_steps", "8", "--eval_steps", "4", "--save_steps", "4",
            "--gradient_accumulation_steps", accumulation, "--load_best_model_at_end", "false", *STATEFUL)
    _, full = run(tmp_path, *args, out="full")
    _, part = run(tmp_path, *args, "--max_steps", "4", out="part")
    assert (part / "checkpoint-4" / "stream_state_0.pt").exists()
    _, resumed = run(tmp_path, *args, "--resume_from_checkpoint", "True", out="part")
    expected, got = final_weights(full), final_weights(resumed)
    assert all(torch.allclose(expected[k], got[k], atol=1e-6) for k in expected)

    # Without its saved state the resumed run reads on from zero states, and ends elsewhere.
    if accumulation == "1":
        with pytest.raises(UsageError, match="trained with 8 streams per process and 1 process.*this run has 4 and 1"):
            run(tmp_path, *args, "--resume_from_checkpoint", str(part / "checkpoint-4"),
                "--per_device_train_batch_size", "4", out="part")
        (part / "checkpoint-4" / "stream_state_0.pt").unlink()
        for name in os.listdir(part):
            if name.startswith("checkpoint-") and name != "checkpoint-4":
                shutil.rmtree(part / name)
        _, cold = run(tmp_path, *args, "--resume_from_checkpoint", str(part / "checkpoint-4"), out="part")
        got = final_weights(cold)
        assert not all(torch.allclose(expected[k], got[k], atol=1e-6) for k in expected)


def test_stateful_evaluation_leaves_the_training_streams_alone(tmp_path):
    _, quiet = run(tmp_path, "--max_steps", "6", "--eval_steps", "100", "--save_steps", "100", *STATEFUL, out="quiet")
    metrics, busy = run(tmp_path, "--max_steps", "6", "--eval_steps", "1", "--save_steps", "100", *STATEFUL,
                        "--load_best_model_at_end", "false", out="busy")
    a, b = final_weights(quiet), final_weights(busy)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert math.isclose(metrics["eval_bits_per_char"], metrics["eval_loss"] / math.log(2), rel_tol=1e-3)
    run_info = json.loads((busy / "training_run.json").read_text())
    assert run_info["stateful"] and "Stateful truncated BPTT" in (busy / "README.md").read_text()


def test_stateful_refuses_streaming_and_stride(tmp_path):
    with pytest.raises(UsageError, match="--stateful .* drop --streaming"):
        run(tmp_path, "--stateful", "true", "--streaming", "true", "--max_steps", "2")
    with pytest.raises(UsageError, match="drop --stride"):
        run(tmp_path, "--stateful", "true", "--stride", "7", "--max_steps", "2")


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


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_every_parameter_gets_a_gradient_so_ddp_needs_no_unused_parameter_search(cell, tokenizer):
    """Why `ddp_find_unused_parameters` defaults to False (DDP warns when it searches and finds nothing)."""
    model = make_model(tokenizer, cell_type=cell, dropout=0.1).train()
    ids = torch.tensor([tokenizer.encode("ROMEO: But soft")])
    model(input_ids=ids, labels=ids).loss.backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []
    assert CharLSTMTrainingArguments(output_dir="x").ddp_find_unused_parameters is False


@pytest.mark.skipif(torch.cuda.is_available() or not os.path.isfile("/proc/cpuinfo"), reason="reads the CPU's flags")
def test_preset_bf16_is_on_exactly_where_the_cpu_flags_say_bf16_is_native():
    from char_lstm.training import native_bf16

    # an oracle apart from torch's own checks: the kernel's list of the CPU's features
    flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":")[1].split())
    native = bool({"avx512_bf16", "amx_bf16", "amx_tile"} & flags)
    assert native_bf16("cpu") == native
    model_args, data_args, training_args = parse_arguments(["--preset", "cpu-small", "--output_dir", "x"])
    assert training_args.bf16 == native and training_args.use_cpu == native
    model_args, data_args, training_args = parse_arguments(
        ["--preset", "cpu-small", "--output_dir", "x", "--bf16", "false"]
    )
    assert not training_args.bf16


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the malloc settings are glibc's")
def test_keep_freed_memory_takes_on_glibc():
    # in a forked child: the settings hold for the whole process, and this one should keep its defaults
    child = os.fork()
    if child == 0:
        os._exit(0 if keep_freed_memory() is True else 1)
    assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 0


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints and the stateful streams, on the Trainer directly (a second each: the mutation run uses them)


def stateful_trainer(out, streams, tokenizer, **overrides):
    """A StatefulTrainer of a tiny GRU (one state per layer; the LSTM's two are in the end-to-end test above) on 4
    streams: 4 steps, evaluation and a checkpoint every 2 steps. Dropout draws from the RNG, so a resume is exact only
    with the RNG state restored too."""
    settings = dict(output_dir=str(out), per_device_train_batch_size=4, per_device_eval_batch_size=4, report_to="none",
                    train_sampling_strategy="sequential", label_names=["shift_labels"], use_cpu=True, max_steps=4,
                    eval_strategy="steps", eval_steps=2, save_steps=2, save_total_limit=None, logging_strategy="no",
                    lr_scheduler_type="constant", learning_rate=1e-2, seed=3, disable_tqdm=True)
    args = CharLSTMTrainingArguments(**{**settings, **overrides})
    model = make_model(tokenizer, cell_type="gru", hidden_size=16, embedding_size=8, dropout=0.1)
    return StatefulTrainer(model=model, args=args,
                           train_dataset=streams, eval_dataset=streams.select(range(8)),
                           data_collator=collate_stream_blocks)


class CopyCheckpoint(TrainerCallback):
    """Copies checkpoint-`step` of the run to `to` once it is saved (before checkpoint rotation can delete it)."""

    def __init__(self, step, to):
        self.step, self.to, self.saved = step, to, {}

    def on_save(self, args, state, control, **kwargs):
        self.saved[state.global_step] = sorted(os.listdir(args.output_dir))  # what a kill at this point would leave
        if state.global_step == self.step:
            name = f"checkpoint-{self.step}"
            shutil.copytree(os.path.join(args.output_dir, name), self.to / name)


def test_stateful_checkpoint_saves_and_restores_the_training_streams(tmp_path, monkeypatch, caplog):
    """A run resumed from the step-2 checkpoint ends with the weights of the uninterrupted run (at step 4). The
    checkpoints are staged inside output_dir (nothing written elsewhere, nothing left in the staging folder),
    published as output_dir/checkpoint-N, rotated at each save (save_total_limit=1: the best, here the last, stays),
    and the best one is named by its final place. Without the saved stream state the resumed run reads on from zero
    states (a warning) and ends elsewhere; with another number of streams it is refused."""
    monkeypatch.chdir(tmp_path)
    text = shakespeare_like(3000)
    tokenizer = CharLSTMTokenizer.from_corpus(text)
    streams = encode_streams(Dataset.from_dict({"text": [text]}), tokenizer, "text", block_size=20, num_streams=4)

    step2 = tmp_path / "step2"  # a run stopped at step 2 has this checkpoint-2 (same data, seed and steps up to there)
    full = stateful_trainer(tmp_path / "full", streams, tokenizer, save_total_limit=1)
    copy = CopyCheckpoint(2, step2)
    full.add_callback(copy)
    full.train()
    assert copy.saved == {2: ["checkpoint-2"], 4: ["checkpoint-4"]}  # rotated at each save, not only at the end
    assert full.state.best_model_checkpoint == str(tmp_path / "full" / "checkpoint-4")  # the eval loss went down
    assert checkpoints(tmp_path / "full") == ["checkpoint-4"]
    assert sorted(os.listdir(tmp_path / "full")) == ["checkpoint-4"]  # the staging folder is gone
    saved_state = json.loads((tmp_path / "full" / "checkpoint-4" / "trainer_state.json").read_text())
    assert saved_state["best_model_checkpoint"] == full.state.best_model_checkpoint
    expected = load_file(tmp_path / "full" / "checkpoint-4" / "model.safetensors")

    saved = torch.load(step2 / "checkpoint-2" / "stream_state_0.pt", weights_only=True)
    assert saved["world_size"] == 1 and len(saved["states"]) == 2  # 2 layers of (h,), 4 streams of 16 units
    assert all(len(layer) == 1 and layer[0].shape == (4, 16) and layer[0].abs().sum() > 0
               for layer in saved["states"])
    stateful_trainer(tmp_path / "resumed", streams, tokenizer).train(
        resume_from_checkpoint=str(step2 / "checkpoint-2")
    )
    got = load_file(tmp_path / "resumed" / "checkpoint-4" / "model.safetensors")
    assert expected.keys() == got.keys() and all(torch.allclose(expected[k], got[k], atol=1e-6) for k in expected)

    with pytest.raises(
        UsageError,
        match=r"trained with 4 streams per process and 1 process\(es\), this run has 2 and 1: resume a --stateful "
        r"run with the same --per_device_train_batch_size and number of processes \(the streams are laid out for "
        r"them\)\.$",
    ):
        stateful_trainer(tmp_path / "other", streams, tokenizer, per_device_train_batch_size=2).train(
            resume_from_checkpoint=str(step2 / "checkpoint-2"))
    (step2 / "checkpoint-2" / "stream_state_0.pt").unlink()
    # a staging folder another writer still uses (not empty): left alone
    (tmp_path / "cold" / "_tmp-checkpoints" / "checkpoint-9").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="char_lstm.training"):
        stateful_trainer(tmp_path / "cold", streams, tokenizer).train(
            resume_from_checkpoint=str(step2 / "checkpoint-2")
        )
    assert "checkpoint-2 has no stream state for process 0: the streams continue from a zero state." in caplog.text
    cold = load_file(tmp_path / "cold" / "checkpoint-4" / "model.safetensors")
    assert not all(torch.allclose(expected[k], cold[k], atol=1e-6) for k in expected)
    assert os.listdir(tmp_path / "cold" / "_tmp-checkpoints") == ["checkpoint-9"]
    assert sorted(os.listdir(tmp_path)) == ["cold", "full", "other", "resumed", "step2"]  # nothing staged in the cwd


def write_checkpoint(folder, step):
    """The files Trainer writes in a checkpoint (plain contents, the same kinds of file)."""
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (folder / "config.json").write_text("{}")
    save_file({"weight": torch.full((2, 3), float(step))}, folder / "model.safetensors")
    torch.save({"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}, folder / "optimizer.pt")
    torch.save({"last_epoch": step}, folder / "scheduler.pt")
    torch.save({"cpu": torch.get_rng_state()}, folder / "rng_state.pth")
    return folder


def test_checkpoint_problem_names_what_is_missing_damaged_or_unsafe(tmp_path):
    from char_lstm.training import checkpoint_problem, checkpoint_step

    complete = write_checkpoint(tmp_path / "complete" / "checkpoint-3", 3)
    assert checkpoint_problem(str(complete)) is None
    assert checkpoint_problem(str(tmp_path / "absent")) == "not a folder"
    assert [
        checkpoint_step(p) for p in (str(complete), f"{complete}/", "out/checkpoint-12a", "_incomplete-checkpoint-3")
    ] == [3, 3, None, None]

    def problem(damage, name="x"):
        folder = tmp_path / name
        shutil.copytree(complete, folder)
        damage(folder)
        return checkpoint_problem(str(folder))

    for i, name in enumerate(["config.json", "model.safetensors", "optimizer.pt", "scheduler.pt"]):
        assert problem(lambda f: (f / name).unlink(), f"missing{i}") == f"no {name}"
    assert problem(lambda f: (f / "trainer_state.json").unlink(), "no_state") == "no trainer_state.json"
    for i, state in enumerate(['{"step": 3}', '{"global_step": "three"}', "{", "[3]", b"\xff\xfe"]):
        write = (lambda f: (f / "trainer_state.json").write_bytes(state)) if isinstance(state, bytes) else \
            (lambda f: (f / "trainer_state.json").write_text(state))
        assert problem(write, f"state{i}") == "trainer_state.json is not a trainer state", state

    def truncate(folder):
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])

    damaged = problem(truncate, "truncated")  # safetensors' own reason, its first line
    assert damaged.startswith("model.safetensors is damaged (Error while deserializing header") and "\n" not in damaged
    assert damaged.endswith(")")
    marker = tmp_path / "pwned"
    for name in ("rng_state.pth", "optimizer.pt", "stream_state_0.pt"):
        unsafe = problem(lambda f: (f / name).write_bytes(pickle.dumps(Evil(marker))), f"evil-{name}")
        assert unsafe.startswith(f"{name} cannot be loaded safely (UnpicklingError: Weights only load failed"), unsafe
        assert "\n" not in unsafe
    assert not marker.exists()
    # a file cut short by a kill: empty, or a zip without its directory (torch's long message: its first sentence)
    empty = problem(lambda f: (f / "scheduler.pt").write_bytes(b""), "empty")
    assert empty == "scheduler.pt is empty (cut short)"
    cut = problem(lambda f: (f / "optimizer.pt").write_bytes((f / "optimizer.pt").read_bytes()[:50]), "cut")
    assert cut == ("optimizer.pt is truncated or damaged (RuntimeError: PytorchStreamReader failed reading zip "
                   "archive: failed finding central directory)")


def test_latest_complete_checkpoint_sets_newer_incomplete_ones_aside(tmp_path, caplog):
    from char_lstm.training import latest_complete_checkpoint

    out = tmp_path / "out"
    for step in (2, 9, 10):
        write_checkpoint(out / f"checkpoint-{step}", step)
    (write_checkpoint(out / "checkpoint-100", 100) / "optimizer.pt").unlink()
    eleven = write_checkpoint(out / "checkpoint-11", 11)
    (eleven / "model.safetensors").write_bytes(b"not safetensors")
    write_checkpoint(out / "_incomplete-checkpoint-11" / "old", 1)  # set aside by an earlier resume: replaced
    write_checkpoint(out / "_tmp-checkpoints" / "checkpoint-12", 12)  # a checkpoint being written: not a candidate
    (out / "checkpoint-12a").mkdir()

    with caplog.at_level(logging.WARNING, logger="char_lstm.training"):
        assert latest_complete_checkpoint(str(out)) == str(out / "checkpoint-10")  # 10 > 9: steps, not names
    [message] = [r.getMessage() for r in caplog.records]
    assert message.startswith(
        "Skipped checkpoint-100 (no optimizer.pt); checkpoint-11 (model.safetensors is damaged ("
    )
    assert (
        message.endswith("): kept as _incomplete-checkpoint-N; resuming from checkpoint-10.") and "\n" not in message
    )
    assert sorted(os.listdir(out)) == ["_incomplete-checkpoint-100", "_incomplete-checkpoint-11", "_tmp-checkpoints",
                                       "checkpoint-10", "checkpoint-12a", "checkpoint-2", "checkpoint-9"]
    assert (out / "_incomplete-checkpoint-11" / "model.safetensors").read_bytes() == b"not safetensors"
    assert (out / "checkpoint-10" / "model.safetensors").exists() and (out / "checkpoint-9" / "optimizer.pt").exists()

    caplog.clear()
    alone = tmp_path / "alone"
    (write_checkpoint(alone / "checkpoint-5", 5) / "scheduler.pt").unlink()
    with caplog.at_level(logging.WARNING, logger="char_lstm.training"):
        assert latest_complete_checkpoint(str(alone)) is None
        assert latest_complete_checkpoint(str(tmp_path / "out" / "checkpoint-2")) is None  # no checkpoint in it
    assert [r.getMessage() for r in caplog.records] == [
        "Skipped checkpoint-5 (no scheduler.pt): kept as _incomplete-checkpoint-N; no complete checkpoint is left."
    ]


def test_publish_moves_a_complete_folder_or_its_files_into_place_weights_last(tmp_path, monkeypatch):
    from char_lstm.training import publish_files, publish_folder

    def staged(name, content):
        folder = tmp_path / name
        (folder / "sub").mkdir(parents=True)
        for file in ("config.json", "model.safetensors", "README.md", "sub/inner.txt"):
            (folder / file).write_text(f"{content} {file}")
        return folder

    runs = tmp_path / "runs"
    runs.mkdir()
    publish_folder(str(staged("s1", "first")), str(runs / "checkpoint-4"))
    (runs / "_incomplete-checkpoint-4").mkdir()  # set aside by an earlier run: replaced
    (runs / "_incomplete-checkpoint-4" / "x").write_text("old")
    publish_folder(str(staged("s2", "second")), str(runs / "checkpoint-4"))  # the same step again: replaced whole
    assert os.listdir(runs) == ["checkpoint-4"] and not (tmp_path / "s1").exists() and not (tmp_path / "s2").exists()
    assert sorted(os.listdir(runs / "checkpoint-4")) == ["README.md", "config.json", "model.safetensors", "sub"]
    assert (runs / "checkpoint-4" / "sub" / "inner.txt").read_text() == "second sub/inner.txt"

    # publish_files: into a folder that holds the old model and the checkpoints
    moved, real_replace = [], os.replace

    def watching_replace(source, target):  # what the folder holds at each move
        moved.append((os.path.basename(target), (runs / "model.safetensors").exists()))
        real_replace(source, target)

    for file in ("model.safetensors", "README.md", "old.txt"):
        (runs / file).write_text(f"old {file}")
    (runs / "sub").mkdir()
    (runs / "sub" / "gone.txt").write_text("old")
    monkeypatch.setattr(os, "replace", watching_replace)
    publish_files(str(staged("s3", "new")), str(runs))
    monkeypatch.undo()
    # the old weights are gone before anything moves, the new ones come last: never new files with the old weights
    assert [name for name, _ in moved][-1] == "model.safetensors" and not any(present for _, present in moved)
    assert sorted(moved) == sorted((n, False) for n in ("config.json", "model.safetensors", "README.md", "sub"))
    assert sorted(os.listdir(runs)) == ["README.md", "checkpoint-4", "config.json", "model.safetensors", "old.txt",
                                        "sub"]
    assert [(runs / f).read_text() for f in ("model.safetensors", "README.md", "old.txt", "sub/inner.txt")] == [
        "new model.safetensors", "new README.md", "old old.txt", "new sub/inner.txt"]
    assert os.listdir(runs / "sub") == ["inner.txt"] and not (tmp_path / "s3").exists()
    (tmp_path / "first").mkdir()  # the first model in a folder: no old weights to remove
    publish_files(str(staged("s4", "first")), str(tmp_path / "first"))
    assert sorted(os.listdir(tmp_path / "first")) == ["README.md", "config.json", "model.safetensors", "sub"]


def test_finished_at_is_the_step_of_a_checkpoint_that_ends_the_run(tmp_path):
    """--max_steps when given (> 0; 0 and -1 mean "not given", as for Trainer), else the length the checkpoint's own
    run had; None while steps are left."""
    from char_lstm.training import finished_at

    folder = write_checkpoint(tmp_path / "checkpoint-6", 6)
    ends = {}
    cases = [(6, None), (5, None), (1, None), (7, None), (-1, 6), (0, 6), (-1, 8), (-1, None), (-1, 0), (6, 100)]
    for max_steps, saved_max_steps in cases:
        state = {"global_step": 6, **({"max_steps": saved_max_steps} if saved_max_steps is not None else {})}
        (folder / "trainer_state.json").write_text(json.dumps(state))
        ends[max_steps, saved_max_steps] = finished_at(str(folder), SimpleNamespace(max_steps=max_steps))
    assert ends == {(6, None): 6, (5, None): 6, (1, None): 6, (7, None): None, (-1, 6): 6, (0, 6): 6, (-1, 8): None,
                    (-1, None): None, (-1, 0): None, (6, 100): 6}


def test_the_cards_training_results_show_no_training_loss_where_none_was_logged_since_the_evaluation_before():
    """A time-budget stop at step 1036, just after the evaluation at 1000: its row has no training loss of its own
    (it repeated step 1000's), and the final model's evaluation at the same step is not a row of its own."""
    from char_lstm.training import training_results

    history = [{"loss": 2.0, "step": 500}, {"loss": 1.5, "step": 1000}, {"eval_loss": 1.6, "step": 1000},
               {"eval_loss": 1.55, "step": 1036}, {"eval_loss": 1.55, "step": 1036}]
    rows = training_results(history)
    assert [(row["step"], row["training_loss"], row["validation_loss"]) for row in rows] == [
        (1000, 1.5, 1.6), (1036, None, 1.55)]
    assert rows[0]["bits_per_char"] == pytest.approx(1.6 / math.log(2))


def test_the_summary_says_worse_when_the_model_does_not_beat_the_unigram_baseline(tmp_path):
    from char_lstm.training import run_summary

    metrics = {"eval_loss": 3.0 * math.log(2), "unigram_bits_per_char": 2.5}
    line = run_summary(str(tmp_path), "Training finished.", metrics).splitlines()[1]
    assert line.endswith("3.000 bits/char, 0.50 bits/char worse than the data's unigram baseline).")
    line = run_summary(str(tmp_path), "Training finished.", {**metrics, "unigram_bits_per_char": 4.0}).splitlines()[1]
    assert line.endswith("3.000 bits/char, 1.00 bits/char better than the data's unigram baseline).")


def test_the_summarys_sample_command_runs_from_any_folder(tmp_path, monkeypatch):
    from char_lstm.training import run_summary

    metrics = {"eval_loss": 1.0}
    assert "Sample from it: python scripts/generate.py --model_name_or_path out " in run_summary("out", "x", metrics)
    monkeypatch.chdir(tmp_path)  # elsewhere: the script's own path
    command = run_summary("out", "x", metrics).splitlines()[-1].split()
    assert command[:2] == ["Sample", "from"] and os.path.isabs(command[4]) and os.path.isfile(command[4])
    assert command[4].endswith(os.path.join("scripts", "generate.py"))


def test_an_output_dir_that_is_a_file_is_one_line(tmp_path):
    with pytest.raises(UsageError, match="--output_dir .*train.txt is a file, not a folder: choose a folder"):
        run(tmp_path, "--max_steps", "2", "--output_dir", str(write_text(tmp_path / "train.txt", "text " * 200)))


def test_overwrite_keeps_the_weights_a_run_starts_from(tmp_path):
    from char_lstm.training import delete_previous_run

    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"weights")
    _, _, args = parse_arguments(["--output_dir", str(out), "--overwrite_output_dir", "true"])
    delete_previous_run(args, started_from=f"{out}/.")  # the same folder, spelled otherwise
    assert (out / "model.safetensors").exists() and not (out / "checkpoint-2").exists()
    delete_previous_run(args, started_from=str(tmp_path / "elsewhere"))
    assert not (out / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Trainer flags from a client test: label smoothing, the best checkpoint by bits/char, resuming into another model


@pytest.mark.parametrize("targets", ["labels", "shift_labels"])
def test_label_smoothing_smooths_the_next_character_in_training_and_evaluation_measures_the_text(tmp_path, tokenizer,
                                                                                               targets):
    """Trainer shifts labels for its smoother only for transformers' own causal LMs: it smoothed towards each
    position's own character here (a model that learns to copy its input), and stateful training's `shift_labels`
    were not smoothed at all."""
    from torch.nn.functional import cross_entropy

    from char_lstm.training import CharLSTMTrainer

    model = make_model(tokenizer)
    args = CharLSTMTrainingArguments(output_dir=str(tmp_path), label_smoothing_factor=0.1, report_to="none",
                                     eval_strategy="no", load_best_model_at_end=False, lr_scheduler_type="constant")
    trainer = CharLSTMTrainer(model=model, args=args)
    ids = torch.randint(0, len(tokenizer), (4, 17))
    if targets == "labels":
        inputs, given = {"input_ids": ids[:, :-1], "labels": ids[:, :-1]}, ids[:, 1:-1]
    else:  # stateful training: the targets of every position, the window's next character too
        given = ids[:, 1:].contiguous()
        inputs = {"input_ids": ids[:, :-1], "labels": ids[:, :-1], "shift_labels": given}

    def expected(smoothing):
        with torch.no_grad():
            logits = model(input_ids=ids[:, :-1]).logits[:, : given.shape[1]]
        return cross_entropy(logits.reshape(-1, logits.shape[-1]), given.reshape(-1), label_smoothing=smoothing)

    model.train()  # dropout 0: train and eval mode compute the same logits
    with torch.no_grad():
        assert torch.allclose(trainer.compute_loss(model, dict(inputs)), expected(0.1), atol=1e-6)
        # normalised by the targets of the whole accumulated batch when Trainer counts them (here: twice these)
        halved = trainer.compute_loss(model, dict(inputs), num_items_in_batch=torch.tensor(2 * given.numel()))
        assert torch.allclose(halved, expected(0.1) / 2, atol=1e-6)
        model.eval()
        assert torch.allclose(trainer.compute_loss(model, dict(inputs)), expected(0.0), atol=1e-6)
    assert trainer.label_smoother is not None  # still on for the next training step


def test_lower_is_better_for_bits_per_char_and_perplexity():
    """Trainer takes a metric whose name does not end in "loss" as higher-is-better: the best checkpoint by
    bits/char was the worst one."""
    def greater(*flags):
        return parse_arguments(["--output_dir", "unused", *flags])[2].greater_is_better

    assert greater("--metric_for_best_model", "bits_per_char") is False
    assert greater("--metric_for_best_model", "eval_perplexity") is False
    assert greater("--metric_for_best_model", "bits_per_char", "--greater_is_better", "true") is True


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--save_strategy", "epoch", "--load_best_model_at_end", "true"),
         r"^--save_strategy epoch with --eval_strategy steps and --load_best_model_at_end true: .*\(--eval_strategy "
         r"epoch or --save_strategy steps\), or drop --load_best_model_at_end\.$"),
        (("--fp16",), r"^--fp16 needs a GPU \(on a CPU the run would be float32\): drop it, or pass --bf16"),
        (("--save_safetensors", "False"), r"^--save_safetensors is removed in transformers v5, which always saves "),
        (("--evaluation_strategy", "epoch", "--save_strategy", "epoch"),  # a v4 command line: the rename is said
         r"^--evaluation_strategy is renamed --eval_strategy in transformers v5\.$"),
        (("--save_strategy", "no", "--load_best_model_at_end", "true"), r"needs checkpoints; drop one of the two\.$"),
    ],
)
def test_flags_trainer_refuses_in_several_lines_or_ignores_on_a_cpu_are_one_line(flags, message):
    if flags == ("--fp16",) and (torch.cuda.is_available() or torch.backends.mps.is_available()):
        pytest.skip("fp16 runs on the GPU")
    with pytest.raises(UsageError, match=message):
        parse_arguments(["--output_dir", "unused", *flags])


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, bf16 runs there")
def test_bf16_on_a_machine_without_gpu_trains_on_the_cpu():
    assert parse_arguments(["--output_dir", "unused", "--bf16"])[2].use_cpu is True  # Trainer refused it without


def test_best_checkpoint_by_bits_per_char_and_no_clipping_are_recorded_as_such(tmp_path):
    _, out = run(tmp_path, "--max_steps", "6", "--eval_steps", "2", "--save_steps", "2", "--logging_steps", "2",
                 "--learning_rate", "1e-2", "--metric_for_best_model", "bits_per_char", "--max_grad_norm", "0",
                 "--sample_every_evals", "0")
    state = json.loads((out / "trainer_state.json").read_text())
    evals = {h["step"]: h["eval_bits_per_char"] for h in state["log_history"] if "eval_bits_per_char" in h}
    best = min(evals, key=evals.get)
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{best}") and evals[best] < max(evals.values())
    run_record = json.loads((out / "training_run.json").read_text())
    assert run_record["procedure"].endswith("no gradient clipping.")
    assert "| gradient clipping (max norm) | none |" in (out / "README.md").read_text()


def test_resume_into_a_model_of_other_flags_is_one_line_naming_the_checkpoints_values(tmp_path, finished_run):
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    message = (r"checkpoint-6 holds a model with hidden_size 32 \(this run: 48\), cell_type lstm \(this run: gru\): "
               r"to resume, pass --hidden_size 32 --cell_type lstm; or start over")
    with pytest.raises(UsageError, match=message):
        run(tmp_path, *RESUMABLE, "--max_steps", "8", "--resume_from_checkpoint", "True", "--hidden_size", "48",
            "--cell_type", "gru")
    (tmp_path / "train.txt").unlink()  # another text: other characters
    with pytest.raises(UsageError, match=r"vocab_size \d+ \(this run: \d+\): to resume, pass --tokenizer_name "
                                         r".*checkpoint-6 \(its vocabulary\)"):
        run(tmp_path, *RESUMABLE, "--max_steps", "8", "--resume_from_checkpoint", "True",
            text="0123456789" + shakespeare_like(8000))


def test_resume_with_another_output_layer_is_one_line_naming_the_flag(tmp_path):
    """A checkpoint of an adaptive softmax (1,500 characters: --adaptive_softmax auto) resumed with --adaptive_softmax
    off: the output layer's weights differ, so one line names the flag before Trainer loads anything (it printed
    missing/unexpected keys, then the optimizer's size mismatch). Its own cutoffs resume."""
    text = "".join(chr(0x4E00 + (i * 7919) % 1500) + ("\n" if i % 40 == 39 else "") for i in range(30000))
    flags = ("--save_steps", "2", "--eval_steps", "2", "--sample_every_evals", "0", "--load_best_model_at_end",
             "false")
    run(tmp_path, *flags, "--max_steps", "2", text=text)
    message = (r"checkpoint-2 holds a model with adaptive_softmax_cutoffs \[256\] \(this run: None\): to resume, "
               r"pass --adaptive_softmax 256; or start over")
    with pytest.raises(UsageError, match=message):
        run(tmp_path, *flags, "--max_steps", "4", "--resume_from_checkpoint", "True", "--adaptive_softmax", "off")
    metrics, _ = run(tmp_path, *flags, "--max_steps", "4", "--resume_from_checkpoint", "True",
                     "--adaptive_softmax", "256")
    assert metrics["global_step"] == 4


def test_checkpoints_saved_with_save_only_model_are_refused_for_resuming_and_left_as_they_are(tmp_path, finished_run):
    """They were renamed `_incomplete-checkpoint-N` and the message said to start over."""
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    for checkpoint in out.glob("checkpoint-*"):  # what --save_only_model writes: no optimizer or scheduler state
        (checkpoint / "optimizer.pt").unlink()
        (checkpoint / "scheduler.pt").unlink()
    before = sorted(p.name for p in out.iterdir())
    message = r"checkpoint-6 was saved with --save_only_model .*--model_name_or_path .*checkpoint-6 and another"
    with pytest.raises(UsageError, match=message):
        run(tmp_path, *RESUMABLE, "--max_steps", "8", "--resume_from_checkpoint", "True")
    with pytest.raises(UsageError, match=message):
        run(tmp_path, *RESUMABLE, "--max_steps", "8", "--resume_from_checkpoint", str(out / "checkpoint-6"))
    assert sorted(p.name for p in out.iterdir()) == before
