"""Stage 6 of `train()`: evaluate the final model on a sample of the validation split precise to a standard error
(or on all of it) and write it, complete or absent."""

import json
import logging
import math
import os
import time

import numpy as np
from transformers import ProgressCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import speed_metrics

from ..model_card import RUN_INFO_NAME, TRAINING_CURVES_NAME, results_from_training, write_model_card
from .callbacks import TimeLimitCallback
from .checkpoints import FINAL_STAGING_DIR, failed_save_reported, publish_files
from .curves import plot_training_curves, stop_mark
from .diagnostics import Baselines, bits
from .metrics import metrics_from_rows
from .summary import training_run_info


logger = logging.getLogger(__name__)


def save_final_model(trainer, model_args, data_args, train_blocks, eval_blocks, train_metrics: dict, prompt: str,
                     stopped_at: int | None, baselines: Baselines | None = None) -> dict:
    """Evaluate the final model and write it with all_results.json, trainer_state.json, training_run.json, its
    training_curves.png and card into a staging folder, then into output_dir (`publish_files`: complete or absent).
    Returns the metrics, with the unigram baseline of the data in bits/char (`unigram_bits_per_char`) when
    `baselines` are given."""
    args = trainer.args
    staged = os.path.join(args.output_dir, FINAL_STAGING_DIR)
    staging = staged if trainer.is_world_process_zero() else None
    with failed_save_reported("the final model", args.output_dir, staging):
        trainer.save_model(staged, _internal_call=True)  # the best model when load_best_model_at_end, with tokenizer
    evaluation = final_evaluation(trainer, eval_blocks, data_args.final_eval_stderr, data_args.block_size,
                                  data_args.stateful, reusable_rows(trainer, eval_blocks, data_args.stateful))
    metrics = {**train_metrics, **evaluation, "global_step": trainer.state.global_step}
    if baselines is not None:
        metrics["unigram_bits_per_char"] = bits(baselines.unigram)
    if not data_args.streaming:
        metrics["train_blocks"], metrics["eval_blocks"] = len(train_blocks), len(eval_blocks)
    if not trainer.is_world_process_zero():
        return metrics
    with failed_save_reported("the final model", args.output_dir, staging):
        with open(os.path.join(staged, "all_results.json"), "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=4, sort_keys=True)
        trainer.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
        run = training_run_info(model_args, data_args, args, metrics, prompt, trainer.state, stopped_at)
        with open(os.path.join(staged, RUN_INFO_NAME), "w", encoding="utf-8") as f:
            json.dump(run, f, indent=2)
        plot_training_curves(trainer.state.log_history, os.path.join(staged, TRAINING_CURVES_NAME),
                             stop_mark(trainer.state, stopped_at))
        # the card is named as Trainer's cards are, after the output folder (not _tmp-final), and its snippet loads
        # that folder, unless the model goes to the Hub
        write_model_card(staged, trainer.model, run, results_from_training(metrics),
                         repo_id=args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)),
                         tokenizer=trainer.processing_class,  # the one in memory, not read back from staged/
                         model_path=None if args.hub_model_id or args.push_to_hub else args.output_dir)
        publish_files(staged, args.output_dir)
    return metrics


def how_it_stopped(trainer, metrics: dict, time_limit: TimeLimitCallback | None) -> str:
    state = trainer.state
    if "train_runtime" not in metrics:  # resumed from the checkpoint that ends the run: nothing left to train
        return f"Training had already finished at step {state.global_step}: no step was left to run."
    if time_limit is not None and time_limit.stopped_at is not None:
        end = ", its learning-rate schedule ended." if time_limit.schedule_over_time else "."
        return (f"Stopped by --max_train_seconds {time_limit.seconds:g} at step {time_limit.stopped_at} of "
                f"{state.max_steps}{end}")
    runtime = metrics.get("train_runtime", 0)
    return f"Training finished: {state.global_step} steps in {runtime:.{1 if runtime < 10 else 0}f} s."




# The final evaluation's first stage, in characters, and its least (then as many as the measured spread needs), and
# the margin on the blocks that spread asks for (the spread of the first stage is itself an estimate).
FINAL_EVAL_FIRST_CHARACTERS = 250_000
FINAL_EVAL_MARGIN = 1.15
# The order in which evaluations sample the validation blocks (`evaluation_order`): not --seed, so that every run on
# the same text reads the same blocks and runs compare pairwise.
EVALUATION_SEED = 0


def evaluation_order(population: int) -> np.ndarray:
    """The validation blocks' order for sampling them: the periodic evaluations read its first blocks, the final
    evaluation as many of its first blocks as its precision needs (and so can reuse what the last periodic
    evaluation read of the final model: `reusable_rows`)."""
    return np.random.default_rng(EVALUATION_SEED).permutation(population)


def reusable_rows(trainer, eval_blocks, stateful: bool):
    """(loss sums, character counts) of the blocks the last periodic evaluation read, when it scored the final
    model (the last step, which --load_best_model_at_end keeps when it is the best) on the first blocks of
    `evaluation_order`; else None. The final evaluation then reads only the blocks its precision needs beyond those."""
    state, rows = trainer.state, getattr(trainer.compute_metrics, "rows", None)
    evaluations = [entry["step"] for entry in state.log_history if "eval_loss" in entry]
    if stateful or not hasattr(eval_blocks, "__len__") or rows is None or not len(rows[0]) or not evaluations:
        return None
    best_is_last = not trainer.args.load_best_model_at_end or state.best_global_step == state.global_step
    return rows if evaluations[-1] == state.global_step and best_is_last else None


def final_evaluation(trainer, eval_blocks, target_stderr: float, block_size: int, stateful: bool = False,
                     reused=None) -> dict:
    """The final model's evaluation: a random sample of `eval_blocks` read in stages (each a Trainer evaluation loop)
    until the eval loss's standard error is at most `target_stderr` nats/char, or all of them with `target_stderr`
    0 or a split that small (blocks of `block_size` targets; at least `FINAL_EVAL_FIRST_CHARACTERS` characters).
    `reused`: the rows of the first blocks of the order, read already (`reusable_rows`).
    The metrics, logged once and passed to the callbacks as `Trainer.evaluate()` does, have `eval_loss` (the mean over
    the characters read), its standard error `eval_loss_stderr` (0 when every block was read) and `eval_characters`
    (those read). The order is `evaluation_order`; --stateful reads the first windows of every stream in order, a
    stream (--streaming) its first blocks.

    Hand-written because Trainer evaluates a dataset whole: it has no sample that grows until it is precise."""
    args, scorer = trainer.args, trainer.compute_metrics
    population = len(eval_blocks) if hasattr(eval_blocks, "__len__") else None
    unit = args.per_device_eval_batch_size * args.world_size if stateful else 1  # stateful: whole windows of streams
    order = None if stateful or population is None else evaluation_order(population)
    start = time.time()
    totals, counts = reused if reused is not None else (np.zeros(0), np.zeros(0))
    read = len(totals)
    # at least this many blocks: a standard error measured on fewer is itself uncertain
    least = max(2, FINAL_EVAL_FIRST_CHARACTERS // block_size)
    wanted = math.inf if target_stderr <= 0 else least
    if read and target_stderr > 0:
        wanted = _more_blocks(totals, counts, population, target_stderr, unit, least)
    while wanted is not None and (population is None or read < population):
        stop = _round_up(min(wanted, population or math.inf), unit)
        if stop <= read:
            break
        output = trainer.evaluation_loop(trainer.get_eval_dataloader(_stage(eval_blocks, read, stop, order)),
                                         description="Final evaluation", metric_key_prefix="eval")
        _close_prediction_bars(trainer)
        totals, counts = np.concatenate([totals, scorer.rows[0]]), np.concatenate([counts, scorer.rows[1]])
        if population is None and output.num_samples < stop - read:  # a stream that has ended: all of it is read
            population = read + output.num_samples
        read += output.num_samples
        wanted = None if target_stderr <= 0 else _more_blocks(totals, counts, population, target_stderr, unit, least)
    metrics = {f"eval_{name}": value for name, value in metrics_from_rows(totals, counts, population).items()}
    # the speed of the blocks this evaluation read itself (not those the last periodic one had read)
    fresh = read - (len(reused[0]) if reused is not None else 0)
    metrics.update(eval_characters=int(counts.sum()), **speed_metrics("eval", start, num_samples=fresh))
    trainer.log(metrics)
    trainer.control = trainer.callback_handler.on_evaluate(args, trainer.state, trainer.control, metrics)
    return metrics


def _more_blocks(totals: np.ndarray, counts: np.ndarray, population: int | None, target: float, unit: int,
                 least: int) -> float | None:
    """How many blocks the sample needs in all, read from the first, for a standard error of `target` and at least
    `least` blocks; None when the blocks read (`totals`, `counts`) are enough."""
    read = len(totals)
    stderr = metrics_from_rows(totals, counts, population)["loss_stderr"]
    if stderr <= target and (read >= least or (population is not None and read >= population)):  # NaN reads on
        return None
    return max(read + unit, least, FINAL_EVAL_MARGIN * _blocks_needed(stderr, read, population, target))


def _blocks_needed(stderr: float, read: int, population: int | None, target: float) -> float:
    """The blocks a sample needs for a standard error of `target`, from the `stderr` of `read` blocks: the error's
    square is spread / n x (1 - n / population), with the spread (the blocks' variance) measured on the blocks read."""
    if math.isnan(stderr):
        return read + 1
    correction = 1.0 - read / population if population else 1.0
    spread = stderr**2 * read / correction
    return spread / (target**2 + (spread / population if population else 0.0))


def _round_up(blocks: float, unit: int) -> float:
    return blocks if math.isinf(blocks) else math.ceil(blocks / unit) * unit


def _stage(eval_blocks, start: int, stop: float, order):
    """Blocks `start` to `stop` of the final evaluation's order: of the seeded permutation `order` (sorted: the
    memory-mapped file is read forward; its indices are kept in memory, not written to the cache: a full disk cannot
    stop it, and runs leave no file behind), else in the data's order."""
    if order is not None:
        return eval_blocks.select(np.sort(order[start:int(stop)]), keep_in_memory=True)  # no file in the cache
    if hasattr(eval_blocks, "select"):
        return eval_blocks.select(range(start, int(min(stop, len(eval_blocks)))))
    stream = eval_blocks.skip(start)
    return stream if math.isinf(stop) else stream.take(int(stop) - start)


def _close_prediction_bars(trainer) -> None:
    """Close the evaluation's progress bar after each stage (Trainer closes it in `evaluate()`), so the next stage
    counts its own batches."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, ProgressCallback) and callback.prediction_bar is not None:
            callback.prediction_bar.close()
            callback.prediction_bar = None
