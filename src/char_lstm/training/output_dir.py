"""The output folder: one run at a time (`OutputDirLock`), and what a run may do with what the folder holds (resume
from it, refuse to clobber it, clear what an interrupted save left)."""

import contextlib
import logging
import os
import shutil
import time

from transformers import TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_NAME

from ..errors import UsageError
from .checkpoints import (
    FINAL_STAGING_DIR,
    SET_ASIDE_PREFIX,
    STAGING_DIR,
    checkpoint_problem,
    latest_complete_checkpoint,
    model_only,
    model_only_refusal,
    remove_staging,
)


try:
    import fcntl
except ImportError:  # Windows: no lock on the output folder
    fcntl = None


logger = logging.getLogger(__name__)

LOCK_NAME = "_train.lock"  # a "_*" name: Trainer.push_to_hub leaves it out


class OutputDirInUse(UsageError):
    """Another run holds the output folder's lock."""


class OutputDirLock:
    """One run per output folder: `output_dir/_train.lock` holds the process id of the run that uses the folder and
    is locked (flock) while it runs. The kernel drops the lock when the process ends, however it ends, so the file a
    killed run leaves behind is a stale lock: the next run takes it over. Without fcntl (Windows) there is no lock."""

    def __init__(self, output_dir: str):
        self.output_dir, self.path = output_dir, os.path.join(output_dir, LOCK_NAME)
        self.fd: int | None = None
        self.created_dir = False

    def acquire(self) -> None:
        if fcntl is None:
            return
        self.created_dir = not os.path.isdir(self.output_dir)
        os.makedirs(self.output_dir, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise OutputDirInUse(
                    f"{self.output_dir} is in use by another training run (process {holder}, lock {self.path}): wait "
                    "for it to end or stop it, or choose another --output_dir."
                ) from None
            try:
                same_file = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:  # the previous holder removed it between our open and our lock
                same_file = False
            if same_file:
                break
            os.close(fd)
        stale = os.read(fd, 32).decode("ascii", "replace").strip()
        if stale:
            logger.warning(
                f"Took over the lock of {self.output_dir} left by process {stale}, which is no longer running."
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.remove(self.path)
        os.close(self.fd)  # drops the flock
        self.fd = None
        if self.created_dir:  # a run that stopped before writing anything leaves no empty folder behind
            with contextlib.suppress(OSError):
                os.rmdir(self.output_dir)


# What a run leaves in its folder besides checkpoints and the final model, none of it a result: the lock, the staging
# folders of saves cut short, checkpoints a resume set aside, TensorBoard's event files. Dot files (.DS_Store, .git)
# are not results either.
_RUN_LEFTOVERS = (LOCK_NAME, STAGING_DIR, FINAL_STAGING_DIR, "runs")
# The final model's weights: --overwrite_output_dir removes them when the new run starts, so that a run stopped before
# its end never leaves the old model beside the new checkpoints (the old model's other files are replaced at the end).
_FINAL_WEIGHTS = (SAFE_WEIGHTS_NAME, WEIGHTS_NAME)


def _results_in(output_dir: str) -> list[str]:
    """The entries of `output_dir` that a run must not write over unasked: everything but checkpoints and the
    leftovers of runs (a model's weights first, its code last, else by name; [] for a folder that does not exist)."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(
        (name for name in os.listdir(output_dir)
         if not name.startswith((PREFIX_CHECKPOINT_DIR + "-", SET_ASIDE_PREFIX, ".")) and name not in _RUN_LEFTOVERS),
        key=lambda name: (name not in _FINAL_WEIGHTS, name.endswith(".py"), name.lower()),
    )


def _described(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def lock_holder_gone(output_dir: str, wait_seconds: float = 2.0) -> bool:
    """Whether the run that locked `output_dir` was killed: its lock file is still there, naming a process that no
    longer runs, or does within `wait_seconds` (a killed process closes its sockets, which its peers notice, a moment
    before it is gone). A run that ended in any other way removed the file. For the other processes of a
    multi-process run, to know whether the main one is still there to say why the run stopped."""
    def holder() -> int | None:
        try:
            with open(os.path.join(output_dir, LOCK_NAME), encoding="ascii") as f:
                return int(f.read().strip())
        except (OSError, ValueError):  # released: the run ended in its own way (and said how)
            return None

    pid = holder()
    deadline = time.monotonic() + wait_seconds
    while pid is not None and not _process_gone(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
        pid = holder()
    # gone with its lock left behind: killed (a process that ended otherwise removed the file before it ended)
    return pid is not None


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # another user's process: running
        return False
    try:  # killed, but not yet reaped by its launcher: a zombie (Linux)
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def prepare_output_dir(args: TrainingArguments) -> str | None:
    """With the folder's lock held (main process): remove what interrupted saves left, refuse to clobber a previous
    run or files of the user's (nothing is deleted here), and return the checkpoint to resume from (or None): with
    `--resume_from_checkpoint True` the newest complete one, incomplete or damaged ones being skipped; a folder that
    holds nothing yet (a run killed before its first checkpoint, a first run of a job that always resumes) starts
    from the beginning, with one warning line."""
    resume = args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "false"):
        resume = resume.lower() == "true" or None
    if os.path.isdir(args.output_dir):
        remove_staging(args.output_dir)  # what a killed run was writing
    last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
    results = _results_in(args.output_dir)
    if resume is True:
        if last is None:
            if results:
                model = (f" To train the model it holds further: --model_name_or_path {args.output_dir} with another "
                         "--output_dir." if os.path.isfile(os.path.join(args.output_dir, CONFIG_NAME)) else "")
                raise UsageError(
                    f"--resume_from_checkpoint True, but {args.output_dir} holds no checkpoint to resume from (it "
                    f"holds {_described(results)}).{model}"
                )
            logger.warning(f"--resume_from_checkpoint True: {args.output_dir} holds no checkpoint yet; training "
                           "from the start.")
            return None
        resume = latest_complete_checkpoint(args.output_dir)
        if resume is None:
            raise UsageError(
                f"--resume_from_checkpoint True, but no checkpoint in {args.output_dir} is complete: start over with "
                "--overwrite_output_dir, or choose another --output_dir."
            )
    elif isinstance(resume, str):
        if not os.path.isdir(resume):
            raise UsageError(f"--resume_from_checkpoint {resume} is not a checkpoint folder.")
        if model_only(resume):
            raise model_only_refusal(resume)
        problem = checkpoint_problem(resume)
        if problem is not None:
            raise UsageError(
                f"--resume_from_checkpoint {resume} cannot be resumed from: {problem}; give another checkpoint, or "
                "--resume_from_checkpoint True for the newest complete one."
            )
    elif last is not None and not args.overwrite_output_dir:
        raise UsageError(
            f"{args.output_dir} already holds checkpoints ({os.path.basename(last)}): resume with "
            "--resume_from_checkpoint True, start over with --overwrite_output_dir, or choose another --output_dir."
        )
    elif results and not args.overwrite_output_dir:
        raise UsageError(
            f"{args.output_dir} already holds files ({_described(results)}) and no checkpoint: choose another "
            "--output_dir, or pass --overwrite_output_dir to write this run's model over them."
        )
    return resume


def delete_previous_run(args: TrainingArguments, started_from: str | None = None) -> None:
    """--overwrite_output_dir: remove the previous run's checkpoints and its final model's weights, once everything
    else is known to work. Other files stay until the new final model replaces them. The weights stay when the run
    started from them (`started_from`, its --model_name_or_path, is the output folder): until the new model is
    written they are the only copy."""
    if args.process_index != 0 or not os.path.isdir(args.output_dir):
        return
    keep_weights = started_from is not None and os.path.isdir(started_from) and os.path.samefile(
        started_from, args.output_dir)
    deleted = []
    old = [name for name in os.listdir(args.output_dir) if name.startswith(PREFIX_CHECKPOINT_DIR + "-")]
    for name in old:
        shutil.rmtree(os.path.join(args.output_dir, name))
    if old:
        deleted.append("the checkpoints")
    weights = [name for name in _FINAL_WEIGHTS
               if not keep_weights and os.path.isfile(os.path.join(args.output_dir, name))]
    for name in weights:
        os.remove(os.path.join(args.output_dir, name))
    if weights:
        deleted.append("the previous model's weights")
    if deleted:
        logger.warning(f"--overwrite_output_dir: deleted {' and '.join(deleted)} in {args.output_dir}")
