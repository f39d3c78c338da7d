"""Checkpoints that are complete or absent, and resuming from them (char_lstm.training.checkpoints and
char_lstm.training.resuming): what makes a checkpoint resumable, how checkpoints and the final model are published,
which checkpoints a run keeps, and resuming a run from finished, incomplete, hostile, model-only or mismatched
checkpoints. The checkpoints of --stateful's streams: test_stateful.py."""

import json
import logging
import os
import pickle
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from char_lstm.errors import UsageError
from char_lstm.training.checkpoints import (
    checkpoint_problem,
    checkpoint_step,
    latest_complete_checkpoint,
    publish_files,
    publish_folder,
)
from char_lstm.training.resuming import finished_at
from helpers import checkpoints, log_history, run, shakespeare_like


# ---------------------------------------------------------------------------------------------------------------------
# What makes a checkpoint resumable: its files complete, undamaged and safe to load; the step that ends its run


class Evil:
    """Unpickling this runs a command: a hostile checkpoint file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


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


def test_finished_at_is_the_step_of_a_checkpoint_that_ends_the_run(tmp_path):
    """--max_steps when given (> 0; 0 and -1 mean "not given", as for Trainer), else the length the checkpoint's own
    run had; None while steps are left."""
    folder = write_checkpoint(tmp_path / "checkpoint-6", 6)
    ends = {}
    cases = [(6, None), (5, None), (1, None), (7, None), (-1, 6), (0, 6), (-1, 8), (-1, None), (-1, 0), (6, 100)]
    for max_steps, saved_max_steps in cases:
        state = {"global_step": 6, **({"max_steps": saved_max_steps} if saved_max_steps is not None else {})}
        (folder / "trainer_state.json").write_text(json.dumps(state))
        ends[max_steps, saved_max_steps] = finished_at(str(folder), SimpleNamespace(max_steps=max_steps))
    assert ends == {(6, None): 6, (5, None): 6, (1, None): 6, (7, None): None, (-1, 6): 6, (0, 6): 6, (-1, 8): None,
                    (-1, None): None, (-1, 0): None, (6, 100): 6}


# ---------------------------------------------------------------------------------------------------------------------
# Publishing: a checkpoint in one rename, the final model's files weights last


def test_publish_moves_a_complete_folder_or_its_files_into_place_weights_last(tmp_path, monkeypatch):
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


# ---------------------------------------------------------------------------------------------------------------------
# The checkpoints a run keeps: rotation keeps the best one, which becomes the final model


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


# ---------------------------------------------------------------------------------------------------------------------
# Resuming: --resume_from_checkpoint True or a checkpoint; finished runs; incomplete, hostile, model-only checkpoints


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


# ---------------------------------------------------------------------------------------------------------------------
# Resuming into the model this run builds: a checkpoint of other flags is one line naming them


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
