"""Checkpoints that are complete or absent: Trainer writes each one into a staging folder that becomes
`checkpoint-N` in one rename; the final model's files are moved into place weights last; a resume skips (and sets
aside) a checkpoint that is damaged (`resuming` checks that it holds the run's model)."""

import contextlib
import errno
import json
import logging
import os
import pickle
import re
import shutil
import warnings

import torch
from safetensors import safe_open
from torch.utils.data import RandomSampler
from transformers import Trainer
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_pt_utils import safe_globals
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints
from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_NAME

from ..errors import UsageError, first_sentence, free_bytes, megabytes
from .samplers import LeanRandomSampler


logger = logging.getLogger(__name__)


STAGING_DIR = "_tmp-checkpoints"  # Trainer writes checkpoint-N in here; it moves to output_dir/ once complete
FINAL_STAGING_DIR = "_tmp-final"  # the final model, written here, then moved into output_dir/
SET_ASIDE_PREFIX = "_incomplete-"  # a checkpoint a resume could not use, kept under this name (not a checkpoint-*)
# "_*" names are what Trainer.push_to_hub leaves out, like checkpoint-*
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def _fsync(path: str) -> None:
    """Flush a file, or a folder's entries, to the disk (folders: POSIX only)."""
    if os.path.isdir(path) and os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: str) -> None:
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            _fsync(path)
    _fsync(folder)


def publish_folder(staged: str, final: str) -> None:
    """Make the complete folder `staged` appear as `final` in one rename, once its files are on the disk: a kill at
    any instant leaves `final` as it was (absent) or complete."""
    _fsync_folder(staged)
    old = None
    if os.path.exists(final):  # the same step written before (a resume from an earlier checkpoint)
        old = os.path.join(os.path.dirname(final), SET_ASIDE_PREFIX + os.path.basename(final))
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staged, final)
    _fsync(os.path.dirname(final))
    if old is not None:
        shutil.rmtree(old)


def publish_files(staged: str, folder: str, last: str = SAFE_WEIGHTS_NAME) -> None:
    """Move the files of the complete folder `staged` into `folder`, which holds other things too (the checkpoints):
    the old `last` file (the weights) goes first and the new one comes last, so at any instant `folder` holds the old
    model, a model without weights (not loadable), or the new complete one. `staged` is removed."""
    _fsync_folder(staged)
    names = sorted(os.listdir(staged), key=lambda name: name == last)
    if os.path.exists(os.path.join(folder, last)):
        os.remove(os.path.join(folder, last))
        _fsync(folder)
    for name in names:
        target = os.path.join(folder, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staged, name), target)
    _fsync(folder)
    os.rmdir(staged)


class SaveFailed(OSError):
    """A checkpoint or the final model could not be written: a full disk, a quota, a file size limit, permissions.
    What was half written is removed; what was written before stays as it was."""


def _io_error(error: BaseException) -> tuple[int | None, str]:
    """(errno or None, what went wrong in a few words) of a failed write: the OS error behind `error` when there is
    one (torch.save says only "file write failed", safetensors wraps it in its own error), else the first sentence
    of its message."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.errno, seen.strerror
        seen = seen.__cause__ or seen.__context__
    code = re.search(r"os error (\d+)", str(error))  # safetensors: "I/O error: No space left on device (os error 28)"
    if code:
        return int(code.group(1)), os.strerror(int(code.group(1)))
    return None, first_sentence(error) or type(error).__name__


def _folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names)


def save_failed(what: str, output_dir: str, error: BaseException) -> SaveFailed:
    """The one-line error of a save that failed (`what`: "checkpoint-N", "the final model"): why, with the space left
    and the space a checkpoint takes, what is kept, and how to go on (here once there is space, or on another disk).
    A torch.save cut short by a full disk says only "unexpected pos": less space left than a checkpoint takes is
    called a full disk."""
    last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    code, reason = _io_error(error)
    free, needed = free_bytes(output_dir), (_folder_bytes(last) if last else None)
    full = code in (errno.ENOSPC, errno.EDQUOT) or (free is not None and needed is not None and free < needed)
    if full and code not in (errno.ENOSPC, errno.EDQUOT):
        reason = f"the disk is full: {reason}"
    space = ""
    if free is not None:
        takes = "a checkpoint takes" if what.startswith(PREFIX_CHECKPOINT_DIR) else "the last checkpoint takes"
        space = f"; {megabytes(free)} free there" + (f", {takes} {megabytes(needed)}" if needed else "")
    if last:
        how = (f"{os.path.basename(last)} and the checkpoints before it are complete and unchanged: free some space "
               "and run the same command with --resume_from_checkpoint True, or go on on another disk with "
               f"--output_dir OTHER --resume_from_checkpoint {last}.")
    else:
        how = ("No checkpoint had been written yet: free some space or choose an --output_dir on another disk, then "
               "run the command again.")
    return SaveFailed(f"Could not write {what} into {output_dir} ({reason}{space}). {how}")


def remove_staging(output_dir: str) -> None:
    """Remove what saves cut short left in `output_dir` (its staging folders): never complete, never used."""
    for name in (STAGING_DIR, FINAL_STAGING_DIR):
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


@contextlib.contextmanager
def failed_save_reported(what: str, output_dir: str, staging: str | None):
    """A write in the block that fails (a full disk...) becomes one `SaveFailed` line, and the folder `staging` it
    was writing is removed: half written, it could never be used and would only fill the disk more."""
    try:
        yield
    except Exception as error:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise save_failed(what, output_dir, error) from error


def checkpoint_step(folder: str) -> int | None:
    match = _CHECKPOINT_NAME.match(os.path.basename(os.path.normpath(folder)))
    return int(match.group(1)) if match else None


def checkpoint_problem(folder: str) -> str | None:
    """Why `folder` cannot be resumed from (a missing, truncated or unreadable file), or None when it is complete.
    Every pickle in it is loaded the way Trainer loads it (weights_only, nothing from the file is run)."""
    if not os.path.isdir(folder):
        return "not a folder"
    try:
        with open(os.path.join(folder, TRAINER_STATE_NAME), encoding="utf-8") as f:
            int(json.load(f)["global_step"])
    except FileNotFoundError:
        return f"no {TRAINER_STATE_NAME}"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"{TRAINER_STATE_NAME} is not a trainer state"
    for name in (CONFIG_NAME, SAFE_WEIGHTS_NAME, OPTIMIZER_NAME, SCHEDULER_NAME):
        if not os.path.isfile(os.path.join(folder, name)):
            return f"no {name}"
    try:
        with safe_open(os.path.join(folder, SAFE_WEIGHTS_NAME), "pt") as f:
            f.keys()
    except Exception as error:  # SafetensorError (truncated, not safetensors), OSError
        return f"{SAFE_WEIGHTS_NAME} is damaged ({str(error).splitlines()[0][:120]})"
    for name in sorted(os.listdir(folder)):
        if name.endswith((".pt", ".pth")):
            try:
                with safe_globals(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch's note on the pickle protocol of a foreign file
                    torch.load(os.path.join(folder, name), map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as error:  # what weights_only refuses: a hostile or foreign pickle
                return f"{name} cannot be loaded safely ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
            except Exception as error:  # EOFError (empty), RuntimeError (a zip without its directory: cut short)...
                if os.path.getsize(os.path.join(folder, name)) == 0:
                    return f"{name} is empty (cut short)"
                return f"{name} is truncated or damaged ({type(error).__name__}: {first_sentence(error, 120)})"
    return None


def model_only(folder: str) -> bool:
    """Whether `folder` is a checkpoint saved with --save_only_model: weights and trainer state, no optimizer or
    scheduler state (transformers cannot resume from one)."""
    present = {name: os.path.isfile(os.path.join(folder, name))
               for name in (TRAINER_STATE_NAME, SAFE_WEIGHTS_NAME, OPTIMIZER_NAME, SCHEDULER_NAME)}
    return present[TRAINER_STATE_NAME] and present[SAFE_WEIGHTS_NAME] and not (
        present[OPTIMIZER_NAME] or present[SCHEDULER_NAME])


def model_only_refusal(folder: str) -> UsageError:
    return UsageError(
        f"{folder} was saved with --save_only_model (weights, no optimizer state), so it cannot be resumed: train on "
        f"from its weights with --model_name_or_path {folder} and another --output_dir (the optimizer starts afresh)."
    )


def latest_complete_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint of `output_dir` that is complete. Newer ones that are not (written by a version that
    saved in place, damaged, tampered with) are renamed `_incomplete-checkpoint-N`, with one warning line."""
    names = [name for name in os.listdir(output_dir) if _CHECKPOINT_NAME.match(name)]
    skipped = []
    for name in sorted(names, key=checkpoint_step, reverse=True):
        path = os.path.join(output_dir, name)
        if model_only(path):  # complete as saved, but not for resuming: said before anything is set aside
            raise model_only_refusal(path)
        problem = checkpoint_problem(path)
        if problem is None:
            break
        skipped.append(f"{name} ({problem})")
        aside = os.path.join(output_dir, SET_ASIDE_PREFIX + name)
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(path, aside)
    else:
        path = None
    if skipped:
        logger.warning(
            f"Skipped {'; '.join(skipped)}: kept as {SET_ASIDE_PREFIX}checkpoint-N; "
            + (f"resuming from {os.path.basename(path)}." if path else "no complete checkpoint is left.")
        )
    return path


class CharLSTMTrainer(Trainer):
    """`Trainer` whose checkpoints are complete or absent: Trainer writes `checkpoint-N/` inside
    `output_dir/_tmp-checkpoints/`, and once every process has written its files they are flushed to the disk and
    the folder is renamed to `output_dir/checkpoint-N` (one atomic rename). A kill at any instant leaves the previous
    checkpoints as they were, plus the new one only when it is complete; a leftover staging folder is removed when the
    next run starts."""

    _staging_root: str | None = None
    # evaluation asks the model for the log-probabilities of the labels only (`logits_at_targets`), which is all that
    # `preprocess_logits_for_metrics` keeps of the scores; set by `build_trainer` for an adaptive softmax
    eval_logits_at_targets = False

    def __init__(self, model=None, *args, **kwargs):
        # Trainer sets `model.config.use_cache` to TrainingArguments.use_cache (False: a cache while training is no
        # use), and the config is saved with every checkpoint and the final model: they save the model's own value.
        self._model_use_cache = getattr(getattr(model, "config", None), "use_cache", None)
        super().__init__(model, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        config = getattr(self.accelerator.unwrap_model(self.model), "config", None)
        if config is None or self._model_use_cache is None:
            return super()._save(output_dir, state_dict)
        training_value, config.use_cache = config.use_cache, self._model_use_cache
        try:
            super()._save(output_dir, state_dict)
        finally:
            config.use_cache = training_value

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is RandomSampler and self.args.accelerator_config.use_seedable_sampler:
            return LeanRandomSampler(len(sampler.data_source), self.args.data_seed)  # the same order, lean
        return sampler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # --label_smoothing_factor: Trainer shifts the labels for its smoother only for transformers' own causal LMs
        # (here it smoothed towards each position's own character, and left stateful training's `shift_labels`
        # alone). So the model computes its loss as without smoothing, and in training the smoothed loss of the next
        # character replaces it, scaled as Trainer scales the model's; evaluation measures the text's own loss.
        if self.eval_logits_at_targets and not model.training:
            inputs = {**inputs, "logits_at_targets": True}
        smoother, self.label_smoother = self.label_smoother, None
        try:
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
        finally:
            self.label_smoother = smoother
        if (smoother is not None and model.training and self.compute_loss_func is None
                and ("labels" in inputs or "shift_labels" in inputs)):
            shifted = "shift_labels" in inputs
            targets = inputs["shift_labels"] if shifted else inputs["labels"]
            loss = smoother(outputs, targets, shift_labels=not shifted, num_items_in_batch=num_items_in_batch)
            if (self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs
                    and num_items_in_batch is not None):
                loss = loss * (self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1
                               else self.args.n_gpu)
        return (loss, outputs) if return_outputs else loss

    def _get_output_dir(self, trial) -> str:
        # `_save_checkpoint` writes where this says; during a save that is the staging folder
        return self._staging_root or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self._staging_root = os.path.join(run_dir, STAGING_DIR)
        staged, final = os.path.join(self._staging_root, name), os.path.join(run_dir, name)
        with failed_save_reported(name, run_dir, self._staging_root if self.args.should_save else None):
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._staging_root = None
            if self.state.best_model_checkpoint == staged:  # this step is the best: its final place goes in the state
                self.state.best_model_checkpoint = final
                if self.args.should_save:
                    self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()  # every process has written its files (RNG state, stream state)
        if self.args.should_save:
            with failed_save_reported(name, run_dir, os.path.join(run_dir, STAGING_DIR)):
                publish_folder(staged, final)
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(run_dir, STAGING_DIR))
            # by step number (checkpoint-N), as Trainer rotates; by time, transformers says "mtime may not be reliable"
            # whenever two checkpoints are less than a second apart
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=False)
