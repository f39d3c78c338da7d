"""Stage 6 of `train()`: evaluate the final model on the whole validation split and write it, complete or absent."""

import json
import logging
import os

from transformers.trainer import TRAINER_STATE_NAME

from ..hub import RUN_INFO_NAME, TRAINING_CURVES_NAME, results_from_training, write_model_card
from .callbacks import TimeLimitCallback
from .checkpoints import FINAL_STAGING_DIR, failed_save_reported, publish_files
from .curves import plot_training_curves, stop_mark
from .diagnostics import Baselines, bits
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
    # the whole validation split (the periodic evaluations may have read a sample of it), with a progress bar
    metrics = {**train_metrics, **trainer.evaluate(eval_dataset=eval_blocks), "global_step": trainer.state.global_step}
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
    return f"Training finished: {state.global_step} steps in {metrics.get('train_runtime', 0):.0f} s."


