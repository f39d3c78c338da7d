"""Training with `transformers.Trainer`: `train()`, in labelled stages as run_clm.py's `main()`.

`scripts/train.py` parses the three argument dataclasses and calls `train()`. Hand-written, one concern per module, is
only what Trainer does not do by itself:

* `arguments`: the argument dataclasses (the reference char-rnn recipe's defaults), the presets, parsing and checks;
* `defaults`: char_lstm's defaults that need evaluations follow the flags given;
* `preparation`: the stages before the Trainer: raw texts, character counts, tokenizer and model, blocks of ids, the
  evaluation sample;
* `samplers`: accelerate's random order without a Python list of every index (large corpora);
* `callbacks`: samples while training, the divergence guard (Trainer keeps going with NaN weights), the time budget,
  the log line when the plateau scheduler lowers the learning rate;
* `diagnostics`: the troubleshooting table, live: each failure mode (stuck loss, overfitting, gibberish, slow
  training, out of memory, the checklist) reported once with its cause and flags;
* `metrics`: bits per character and perplexity from the evaluation loss;
* `checkpoints`: checkpoints and a final model that are complete or absent;
* `resuming`: the checkpoint must hold the model the run builds; a run that had ended is finished without training;
* `output_dir`: one run per output folder, and what a run may do with what the folder holds;
* `stateful`: stateful truncated BPTT (the state carried from batch to batch);
* `runtime`: the process (CPU DDP launch, console, allocator, bf16 detection, Ctrl-C / SIGTERM);
* `summary`: the lines a run ends with, and the record of the run the model card is written from;
* `curves`: training_curves.png, the picture of the run on the model card;
* `final`: the final evaluation on a sample of the validation split precise to --final_eval_stderr (or all of it),
  and the final model written complete or absent.
"""

import logging
from functools import partial

from transformers import EarlyStoppingCallback, ProgressCallback, TrainerCallback, set_seed

from ..encoding import collate_blocks
from ..streams import collate_stream_blocks
from .arguments import CharLSTMTrainingArguments, DataArguments, ModelArguments, check_arguments, parse_arguments
from .callbacks import (
    DivergenceGuard,
    LearningRateLogCallback,
    MetricsProgressCallback,
    ReleaseMappedPages,
    SampleCallback,
    TimeLimitCallback,
    TrainingDiverged,
)
from .checkpoints import CharLSTMTrainer, remove_staging
from .diagnostics import (
    TrainingDiagnostics,
    TrainingOutOfMemory,
    baseline_gain_warning,
    baselines_from_counts,
    describe_grad_norms,
    out_of_memory_reported,
    recent_grad_norms,
)
from .final import how_it_stopped, save_final_model
from .metrics import BatchedMetrics, preprocess_logits_for_metrics
from .output_dir import OutputDirLock, delete_previous_run, lock_holder_gone, prepare_output_dir
from .preparation import (
    count_training_characters,
    encode_datasets,
    load_datasets,
    load_tokenizer_and_model,
    periodic_eval_blocks,
    run_sample_prompt,
    shard_the_stream,
    warn_unknown_characters,
)
from .resuming import check_resume_matches, finished_at, restore_finished_run
from .runtime import (
    STOP_SIGNALS,
    ReportedByMainProcess,
    ignore_stop_signals,
    keep_freed_memory,
    lost_peer,
    native_bf16,
    on_main_process,
    prepare_launch_environment,
    received_stop_signal,
    stop_on_signals,
    stop_when_the_launcher_ends,
    training_console,
)
from .stateful import StatefulTrainer
from .summary import (
    close_progress_bars,
    interrupted_message,
    lost_peer_message,
    run_summary,
    scheduler_name,
)


logger = logging.getLogger(__name__)


def train(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: CharLSTMTrainingArguments,
    callbacks: list[TrainerCallback] | None = None,
) -> dict:
    """Train a CharLSTM model with Trainer; returns the final metrics. `callbacks` are added to the run's own.
    Raises UsageError for arguments that cannot work, DataError (a UsageError) for bad data, and TrainingDiverged
    when the loss stops being finite.

    The output folder is locked for the run (`OutputDirLock`); a resume that finds the run already finished writes the
    final model from its last checkpoint without training."""
    check_arguments(model_args, data_args, training_args)
    if data_args.stateful:
        # Streams are read in order, and the loss and metrics use the targets that `collate_stream_blocks` gives.
        training_args.train_sampling_strategy = "sequential"
        training_args.label_names = ["shift_labels"]
    lock = OutputDirLock(training_args.output_dir)

    def take_output_dir() -> str | None:  # main process: lock the folder, then look at what it holds
        lock.acquire()
        return prepare_output_dir(training_args)

    try:
        resume = on_main_process(training_args, take_output_dir)
        return _train(model_args, data_args, training_args, callbacks, resume)
    except BaseException:
        if lock.fd is not None:  # the main process of a run that stops (a signal, an error): no save cut short stays
            remove_staging(training_args.output_dir)
        raise
    finally:
        lock.release()


def _train(model_args, data_args, training_args, callbacks, resume: str | None) -> dict:
    """`train()` once the output folder is locked and the checkpoint to resume from (if any) is known."""
    set_seed(training_args.seed)

    # 1. Datasets: the raw text of the training and validation splits
    data_args, train_raw, eval_raw = load_datasets(data_args, training_args)

    # 2. Tokenizer and model: new ones built for the text (one pass of character counts), or a saved model
    train_counts = count_training_characters(data_args, training_args, train_raw)
    tokenizer, model = load_tokenizer_and_model(model_args, data_args, train_counts, training_args)
    if resume is not None:
        check_resume_matches(resume, model, model_args.model_name_or_path)
    if training_args.process_index == 0:
        warn_unknown_characters(tokenizer, model_args, data_args, train_counts, eval_raw)

    # 3. Blocks of ids; the periodic evaluations read a sample of the validation blocks, the final one all of them
    train_blocks, eval_blocks = encode_datasets(tokenizer, data_args, training_args, train_raw, eval_raw)
    sample_blocks = periodic_eval_blocks(data_args, training_args, train_blocks, eval_blocks)
    shard_the_stream(training_args, train_blocks)

    # 4. Trainer, with the run's callbacks
    set_generation_defaults(model, tokenizer, training_args)
    prompt = training_args.sample_prompt = run_sample_prompt(tokenizer, data_args, training_args, eval_raw)
    baselines = baselines_from_counts(train_counts, tokenizer, model.config.vocab_size)
    diagnostics = TrainingDiagnostics(baselines, model.config.cell_type, model.config.hidden_size,
                                      data_args.block_size, has_eval_data=eval_blocks is not None,
                                      early_stopping_patience=training_args.early_stopping_patience)
    guard, time_limit, run_callbacks = make_callbacks(training_args, callbacks, diagnostics)
    trainer = build_trainer(
        model, tokenizer, train_blocks, sample_blocks, data_args, training_args, prompt, run_callbacks
    )

    # 5. Train (a resume of a run that had already ended trains no more); an allocation failure is one message
    with out_of_memory_reported(training_args, data_args.block_size, model):
        train_metrics = run_training(trainer, resume, model_args.model_name_or_path)
        if guard.diverged_at is not None:
            norms = describe_grad_norms(recent_grad_norms(trainer.state.log_history), training_args.max_grad_norm)
            raise TrainingDiverged(guard.message(training_args.output_dir, prompt, norms))

        # 6. Evaluate, and save the final model with its results and card (it appears in output_dir complete)
        stopped_at = time_limit.stopped_at if time_limit else None
        metrics = save_final_model(trainer, model_args, data_args, train_blocks, eval_blocks, train_metrics, prompt,
                                   stopped_at, baselines)
    if training_args.push_to_hub:
        # Trainer.push_to_hub writes its generic card over README.md first; the run's own card stays instead
        trainer.create_model_card = lambda *args, **kwargs: None
        trainer.push_to_hub(commit_message="char_lstm training run")
    trainer.accelerator.wait_for_everyone()  # no process leaves while the main one still writes

    # 7. The lines the run ends with
    if trainer.is_world_process_zero():
        warning = baseline_gain_warning(metrics["eval_loss"], baselines) if "eval_loss" in metrics else None
        if warning is not None:
            logger.warning(warning)
        print(run_summary(training_args.output_dir, how_it_stopped(trainer, metrics, time_limit), metrics, prompt),
              flush=True)
    return metrics


# ---------------------------------------------------------------------------------------------------------------------
# 4. Trainer


def set_generation_defaults(model, tokenizer, training_args: CharLSTMTrainingArguments) -> None:
    """The sampling defaults saved with the model (generation_config.json)."""
    model.generation_config.do_sample = True
    model.generation_config.temperature = training_args.sample_temperature
    model.generation_config.top_k = 0  # the whole distribution, as char-rnn samples (transformers' default keeps 50)
    # No saved length: a saved max_new_tokens would win over a caller's max_length (generate(max_length=16) gave 200
    # characters), and a saved max_length makes transformers warn at every call that passes max_new_tokens. The
    # caller's length applies, or transformers' defaults (pipeline: 256 new characters).
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def make_callbacks(training_args: CharLSTMTrainingArguments, callbacks: list[TrainerCallback] | None,
                   diagnostics: TrainingDiagnostics | None = None):
    """(the divergence guard, the time budget or None, the callbacks of the run in their order)."""
    guard = DivergenceGuard()
    time_limit = TimeLimitCallback(training_args.max_train_seconds) if training_args.max_train_seconds else None
    run_callbacks = [
        # before the guard: the guard checks the weights whenever a save or evaluation is due, this one included
        *([time_limit] if time_limit else []),
        guard,
        # only the plateau scheduler's cuts are news; a cosine or linear schedule lowers the LR every step
        *([LearningRateLogCallback()] if scheduler_name(training_args) == "reduce_lr_on_plateau" else []),
        *([diagnostics] if diagnostics else []),
        *([EarlyStoppingCallback(training_args.early_stopping_patience)]
          if training_args.early_stopping_patience else []),
        *(callbacks or []),
    ]
    return guard, time_limit, run_callbacks


def build_trainer(model, tokenizer, train_blocks, eval_blocks, data_args: DataArguments,
                  training_args: CharLSTMTrainingArguments, prompt: str, callbacks: list[TrainerCallback]):
    """The run's Trainer (`StatefulTrainer` under --stateful), with the sampling callback first, then `callbacks`,
    and progress bars that show numbers at 4 significant digits."""
    sampler = SampleCallback(
        tokenizer,
        prompt,
        training_args.sample_every_evals,
        training_args.sample_length,
        training_args.sample_temperature,
    )
    trainer_class = StatefulTrainer if data_args.stateful else CharLSTMTrainer
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=train_blocks,
        eval_dataset=eval_blocks,
        data_collator=collate_stream_blocks if data_args.stateful else collate_blocks,
        processing_class=tokenizer,
        compute_metrics=BatchedMetrics(shifted=data_args.stateful),
        preprocess_logits_for_metrics=partial(preprocess_logits_for_metrics, shifted=data_args.stateful),
        callbacks=[sampler, ReleaseMappedPages([train_blocks, eval_blocks]), *callbacks],
    )
    sampler.trainer = trainer
    # evaluation reads each position's loss only: an adaptive softmax computes the labels' clusters, not all of them
    trainer.eval_logits_at_targets = bool(model.config.adaptive_softmax_cutoffs)
    if trainer.pop_callback(ProgressCallback) is not None:  # the same bars, with numbers at 4 significant digits
        trainer.add_callback(MetricsProgressCallback)
    return trainer


# ---------------------------------------------------------------------------------------------------------------------
# 5. Train


def run_training(trainer, resume: str | None, started_from: str | None = None) -> dict:
    """`trainer.train()` from `resume` (or from scratch); a checkpoint where the run already ends (killed while
    writing the final model) is restored instead, without a step more. Returns the train metrics."""
    args = trainer.args
    end = finished_at(resume, args) if resume is not None else None
    if end is not None:
        if trainer.is_world_process_zero():
            logger.warning(f"{resume} is at step {end}, where the run ends: no more training; writing the final "
                           "model from it.")
        return restore_finished_run(trainer, resume)
    if resume is None and args.overwrite_output_dir:
        delete_previous_run(args, started_from)
    trainer.accelerator.wait_for_everyone()
    return trainer.train(resume_from_checkpoint=resume).metrics


# The public training API: train() and what scripts/train.py, benchmarks/ and docs/training.md import from here.
# Everything else is imported from the submodule that defines it.
__all__ = [
    "CharLSTMTrainingArguments",
    "ReportedByMainProcess",
    "STOP_SIGNALS",
    "TrainingDiverged",
    "TrainingOutOfMemory",
    "close_progress_bars",
    "ignore_stop_signals",
    "interrupted_message",
    "keep_freed_memory",
    "lock_holder_gone",
    "lost_peer",
    "lost_peer_message",
    "native_bf16",
    "parse_arguments",
    "prepare_launch_environment",
    "received_stop_signal",
    "stop_on_signals",
    "stop_when_the_launcher_ends",
    "train",
    "training_console",
]
