"""The output folder (char_lstm.training.output_dir): one run at a time (`OutputDirLock`), and what a run may do
with what the folder holds: a previous run's checkpoints or model and the user's own files are not written over
unasked, and --overwrite_output_dir deletes only what it must, only once the run can start."""

import logging
import os
import signal

import pytest
from transformers import TrainerCallback

from char_lstm.errors import DataError, UsageError
from char_lstm.training import train
from char_lstm.training.arguments import parse_arguments
from char_lstm.training.output_dir import (
    LOCK_NAME,
    OutputDirInUse,
    OutputDirLock,
    delete_previous_run,
    lock_holder_gone,
)
from helpers import TINY, checkpoints, run, write_text


# ---------------------------------------------------------------------------------------------------------------------
# One run per output folder: the lock


posix_only = pytest.mark.skipif(not hasattr(os, "fork"), reason="the lock is flock's (POSIX); its holder, a fork")


def hold_the_lock(folder):
    """A process that takes the lock of `folder` as a run does and holds it until it is killed: its process id. (The
    caller kills and reaps it.)"""
    ready, told = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only the lock, then wait; no pytest cleanup of its own
        try:
            OutputDirLock(str(folder)).acquire()
            os.write(told, b"locked")
            signal.pause()
        finally:
            os._exit(1)
    os.close(told)
    locked = os.read(ready, 6)
    os.close(ready)
    if locked != b"locked":
        os.waitpid(pid, 0)
        pytest.fail(f"the child could not take the lock of {folder}")
    return pid


def kill(pid):
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


@posix_only
def test_a_run_into_a_locked_folder_is_refused_in_one_line_naming_the_holder_and_leaves_its_lock(tmp_path):
    out = tmp_path / "out"
    holder = hold_the_lock(out)
    try:
        assert (out / LOCK_NAME).read_text() == f"{holder}\n"
        with pytest.raises(OutputDirInUse) as refused:
            OutputDirLock(str(out)).acquire()
        assert str(refused.value) == (
            f"{out} is in use by another training run (process {holder}, lock {out / LOCK_NAME}): wait for it to end "
            "or stop it, or choose another --output_dir."
        )
        assert isinstance(refused.value, UsageError)  # scripts/train.py prints it as one line, without a traceback
        # a whole run: refused before it reads anything (its training file does not exist), the holder's lock kept
        with pytest.raises(OutputDirInUse, match=f"process {holder}, lock "):
            train(*parse_arguments(["--train_file", str(tmp_path / "missing.txt"), "--output_dir", str(out), *TINY]))
        assert os.listdir(out) == [LOCK_NAME] and (out / LOCK_NAME).read_text() == f"{holder}\n"
    finally:
        kill(holder)


@posix_only
def test_the_lock_of_a_killed_run_is_taken_over_and_a_released_lock_leaves_nothing(tmp_path, caplog):
    out = tmp_path / "out"
    killed = hold_the_lock(out)
    kill(killed)
    assert (out / LOCK_NAME).read_text() == f"{killed}\n"  # what a killed run leaves: the kernel dropped its flock
    lock = OutputDirLock(str(out))
    with caplog.at_level(logging.WARNING, logger="char_lstm.training.output_dir"):
        lock.acquire()
    try:
        assert (out / LOCK_NAME).read_text() == f"{os.getpid()}\n"
        assert [record.getMessage() for record in caplog.records] == [
            f"Took over the lock of {out} left by process {killed}, which is no longer running."
        ]
    finally:
        lock.release()
    assert os.listdir(out) == []  # the lock file goes; the folder, made before this run, stays
    fresh = OutputDirLock(str(tmp_path / "new"))
    fresh.acquire()
    assert os.listdir(tmp_path / "new") == [LOCK_NAME]
    fresh.release()
    assert not (tmp_path / "new").exists()  # a run that wrote nothing leaves no empty folder of its own behind


@posix_only
def test_lock_holder_gone_tells_a_killed_run_from_a_running_or_ended_one(tmp_path):
    """What the other processes of a multi-process run ask when a collective fails: was the main one killed?"""
    out = tmp_path / "out"
    assert lock_holder_gone(str(out), wait_seconds=0) is False  # no lock file: no run, or one that ended its own way
    holder = hold_the_lock(out)
    try:
        assert lock_holder_gone(str(out), wait_seconds=0.2) is False  # running
    finally:
        os.kill(holder, signal.SIGKILL)  # killed, and not reaped yet by its parent (this process, as a launcher)
    try:
        if os.path.isdir("/proc"):  # a zombie is gone (Linux: its state in /proc)
            assert lock_holder_gone(str(out)) is True
    finally:
        os.waitpid(holder, 0)
    assert lock_holder_gone(str(out), wait_seconds=0) is True  # killed: its lock file is left behind
    lock = OutputDirLock(str(out))
    lock.acquire()
    lock.release()
    assert lock_holder_gone(str(out), wait_seconds=0) is False  # the next run ended its own way: its file is gone


# ---------------------------------------------------------------------------------------------------------------------
# A folder that holds a previous run or files of the user's: not written over unasked


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


def test_an_output_dir_that_is_a_file_is_one_line(tmp_path):
    with pytest.raises(UsageError, match="--output_dir .*train.txt is a file, not a folder: choose a folder"):
        run(tmp_path, "--max_steps", "2", "--output_dir", str(write_text(tmp_path / "train.txt", "text " * 200)))


# ---------------------------------------------------------------------------------------------------------------------
# --overwrite_output_dir: what it deletes, and when


def test_overwrite_deletes_nothing_when_the_run_cannot_start(tmp_path):
    args = ("--max_steps", "2", "--eval_steps", "2", "--save_steps", "2", "--sample_every_evals", "0")
    run(tmp_path, *args)
    with pytest.raises(DataError, match="does not exist"):
        train(*parse_arguments(["--train_file", str(tmp_path / "missing.txt"), "--output_dir", str(tmp_path / "out"),
                                "--overwrite_output_dir", "true", *TINY]))
    assert (tmp_path / "out" / "checkpoint-2" / "model.safetensors").exists()


def test_overwrite_keeps_the_weights_a_run_starts_from(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"weights")
    _, _, args = parse_arguments(["--output_dir", str(out), "--overwrite_output_dir", "true"])
    delete_previous_run(args, started_from=f"{out}/.")  # the same folder, spelled otherwise
    assert (out / "model.safetensors").exists() and not (out / "checkpoint-2").exists()
    delete_previous_run(args, started_from=str(tmp_path / "elsewhere"))
    assert not (out / "model.safetensors").exists()
