"""What a run says about itself: the lines it ends with (however it stopped), and the record of the run the model
card is written from (training_run.json)."""

import json
import math
import os
import shlex

from tqdm.auto import tqdm
from transformers.trainer_utils import get_last_checkpoint

from ..data import BUNDLED_DATASET, DEFAULT_DATASET, dataset_label, file_selection
from .runtime import STOP_SIGNALS, launcher_gone


def _checkpoint_metrics(checkpoint: str) -> dict:
    """The last evaluation saved in a checkpoint's trainer_state.json ({} without one)."""
    path = os.path.join(checkpoint, "trainer_state.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        history = json.load(f).get("log_history", [])
    return next((entry for entry in reversed(history) if "eval_loss" in entry), {})


def _generate_script() -> str:
    """scripts/generate.py as the user can run it from where they are: relative from the checkout or below it, else
    its absolute path; `scripts/generate.py` when the package is installed without its checkout."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "scripts", "generate.py")
    script = os.path.normpath(script)
    if not os.path.isfile(script):
        return "scripts/generate.py"
    relative = os.path.relpath(script)
    return script if relative.startswith("..") else relative


def run_summary(output_dir: str, stopped: str, metrics: dict | None = None, prompt: str = "ROMEO:",
                resume: bool = True) -> str:
    """The lines every run ends with, however it stopped (`stopped` says how and why): where the model is, its eval
    loss and bits per character, and the command to run next.

    With `metrics` (the final model's evaluation), the model is in `output_dir` and the next command samples from it.
    Without, the run stopped before saving a final model: the last checkpoint is named with the evaluation saved in
    it, and the next command resumes from it (`resume=True`) or samples from it."""
    def measured(values: dict) -> str:
        if "eval_loss" not in values:
            return "not evaluated"
        bits = values.get("eval_bits_per_char", values["eval_loss"] / math.log(2))
        gain = ""
        if "unigram_bits_per_char" in values:
            better = values["unigram_bits_per_char"] - bits
            gain = (f", {abs(better):.2f} bits/char {'better' if better >= 0 else 'worse'} than the data's unigram "
                    "baseline")
        return f"eval loss {values['eval_loss']:#.4g}{_precision(values)}, {bits:#.4g} bits/char{gain}"

    def generate(folder: str) -> str:
        return (f"python {shlex.quote(_generate_script())} --model_name_or_path {shlex.quote(folder)} "
                f"--prompt {shlex.quote(prompt)} --max_new_tokens 300")

    if metrics is not None:
        lines = [f"Model: {output_dir} ({measured(metrics)}).", f"Sample from it: {generate(output_dir)}"]
    else:
        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is None:
            lines = ["No checkpoint had been saved yet."]
        else:
            lines = [f"Last checkpoint: {last} ({measured(_checkpoint_metrics(last))})."]
            if resume:
                lines.append("Resume: the same command with --resume_from_checkpoint True.")
            lines.append(f"Sample from it: {generate(last)}")
    return "\n".join([stopped, *lines])


def _precision(values: dict) -> str:
    """The eval loss's unit and how precise it is: " ± 0.0031 nats/char (standard error; a sample of 412,160
    validation characters)" after a final evaluation of a sample, " nats/char (all 50,112,512 validation
    characters)" after one of every block, " nats/char" for metrics without the counts (a checkpoint's)."""
    if "eval_characters" not in values:
        return " nats/char"
    read = f"{values['eval_characters']:,}"
    if values.get("eval_loss_stderr") == 0:
        return f" nats/char (all {read} validation characters)"
    return f" ± {values.get('eval_loss_stderr', float('nan')):.2g} nats/char (standard error; a sample of {read} " \
           "validation characters)"


def close_progress_bars() -> None:
    """Close the progress bars a stop cut short, so that the line printed next stands alone (not glued to a bar)."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def interrupted_message(signum: int, output_dir: str | None, prompt: str | None = None) -> str:
    """The line printed when a signal stops the run: `run_summary` (what is kept, how to go on) on one line. The
    progress bars the signal cut short are closed first, so that the line is the last one and stands alone."""
    launcher = launcher_gone()
    cause = f"the launcher (process {launcher}) ended" if launcher is not None else f"by {STOP_SIGNALS[signum][0]}"
    return stop_message(f"Stopped{':' if launcher is not None else ''} {cause}; checkpoints are complete (a save cut "
                        "short is discarded).", output_dir, prompt)


def lost_peer_message(reason: str, output_dir: str | None, prompt: str | None = None) -> str:
    """The line printed when another process of the run ended (killed, crashed) and a collective failed."""
    return stop_message(f"Stopped: another process of this run ended ({reason}); checkpoints are complete.",
                        output_dir, prompt)


def stop_message(stopped: str, output_dir: str | None, prompt: str | None = None) -> str:
    """`run_summary` on one line, after the progress bars a stop cut short are closed."""
    close_progress_bars()
    if not output_dir:
        return stopped
    return " ".join(run_summary(output_dir, stopped, prompt=prompt or "ROMEO:").splitlines())


def scheduler_name(training_args) -> str:
    return getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)


def _describe_optimizer(training_args) -> str:
    optim = getattr(training_args.optim, "value", training_args.optim)
    if not optim.startswith("adamw"):
        return f"`{optim}`"
    name = ("Adam (AdamW with weight decay 0)" if training_args.weight_decay == 0
            else f"AdamW with weight decay {training_args.weight_decay:g}")
    return (f"{name}, betas ({training_args.adam_beta1:g}, {training_args.adam_beta2:g}), eps "
            f"{training_args.adam_epsilon:g} (`{optim}`)")


def _describe_schedule(training_args, max_steps: int, stopped_at: int | None) -> str:
    scheduler = scheduler_name(training_args)
    if scheduler == "reduce_lr_on_plateau":
        kwargs = training_args.lr_scheduler_kwargs or {}
        return (f"constant, multiplied by {kwargs.get('factor', 0.1)} after {kwargs.get('patience', 10)} evaluations "
                "without improvement of the validation loss")
    warmup = training_args.get_warmup_steps(max_steps)
    text = (f"{warmup} warm-up step{'s' if warmup > 1 else ''}, then " if warmup else "") + scheduler
    text += f", over {max_steps} steps"
    if training_args.max_train_seconds:
        text += (f" or {training_args.max_train_seconds:g} s of training, whichever ends first (here "
                 + (f"the time, at step {stopped_at})" if stopped_at is not None else "the steps)"))
    return text


def training_results(log_history: list[dict]) -> list[dict]:
    """The card's training-results table, as Trainer's own cards have it: one row per evaluation during training
    (step, the last training loss logged since the evaluation before, or None, which the card shows as "no log", as
    Trainer's do; validation loss, bits per character)."""
    rows, train_loss, steps = [], None, set()
    for entry in log_history:
        train_loss = entry.get("loss", train_loss)
        if "eval_loss" in entry and entry.get("step") not in steps:  # the final model's evaluation is not a new row
            steps.add(entry.get("step"))
            rows.append({"step": entry.get("step"), "training_loss": train_loss, "validation_loss": entry["eval_loss"],
                         "bits_per_char": entry.get("eval_bits_per_char", entry["eval_loss"] / math.log(2))})
            train_loss = None  # a time-budget stop right after an evaluation has no new training loss of its own
    return rows


def _data_files(data_args) -> dict | None:
    """What --train_file read (`char_lstm.data.file_selection`: a file, folder or glob, the --include / --exclude
    patterns, the files read and skipped, their bytes), kept when the data was loaded in this process; None for a
    dataset by name."""
    if data_args.train_file is None:
        return None
    return file_selection(data_args.train_file, data_args.include, data_args.exclude, data_args.encoding)


def training_run_info(model_args, data_args, training_args, metrics: dict, prompt: str, state,
                      stopped_at: int | None = None) -> dict:
    """What the model card says about the run, from the run itself (saved as training_run.json next to the model):
    the data by name (a Hub id, the bundled copy, or a local file's name: never a path of this machine) and, for
    --train_file, what was read (`data_files`), the optimizer, the schedule, the steps, and the evaluations."""
    source = data_args.train_file or data_args.dataset_name
    dataset = dataset_label(source)
    hub_dataset = (DEFAULT_DATASET if source == BUNDLED_DATASET
                   else source if data_args.train_file is None and not os.path.exists(source) else None)
    validation = (
        f"`{dataset_label(data_args.validation_file)}`" if data_args.validation_file
        else "its validation split" if data_args.train_file is None
        else f"the last {data_args.validation_split_percentage:g}% of the text, held out"
    )
    blocks, eval_blocks = metrics.get("train_blocks"), metrics.get("eval_blocks")
    world = training_args.world_size
    batch = training_args.per_device_train_batch_size * world * training_args.gradient_accumulation_steps
    steps = state.global_step
    return {
        "dataset": dataset,
        "hub_dataset": hub_dataset,
        "data_files": _data_files(data_args),
        "training_data": (f"`{dataset}`: {blocks if blocks is not None else 'streamed'} training blocks of "
                          f"{data_args.block_size} characters; validation: {validation}."
                          + (" Stateful truncated BPTT: each batch row reads one contiguous stream, starting from the "
                             "previous step's state." if data_args.stateful else "")),
        "procedure": (f"Trained with `transformers.Trainer` for {steps} steps ({float(metrics.get('epoch', 0.0)):.3g} "
                      f"epochs) of {batch} blocks of {data_args.block_size} characters"
                      + (", each batch row continuing its stream from the previous step's state"
                         if data_args.stateful else ", each block from a zero state")
                      + f": {_describe_optimizer(training_args)}, learning rate {training_args.learning_rate:g}, "
                      f"schedule {_describe_schedule(training_args, state.max_steps, stopped_at)}, "
                      + (f"gradient clipping at norm {training_args.max_grad_norm:g}." if training_args.max_grad_norm
                         else "no gradient clipping.")),
        "evaluation_data": (f"{eval_blocks} blocks of {data_args.block_size} characters of the validation text"
                            if eval_blocks is not None else "the validation text") + ", each from a zero state",
        "training_results": training_results(state.log_history),
        "stateful": data_args.stateful,
        "block_size": data_args.block_size,
        "batch_size": f"{training_args.per_device_train_batch_size} x {world} x "
                      f"{training_args.gradient_accumulation_steps}",
        "optimizer": _describe_optimizer(training_args),
        "learning_rate": training_args.learning_rate,
        "lr_scheduler": _describe_schedule(training_args, state.max_steps, stopped_at),
        "max_grad_norm": training_args.max_grad_norm,
        "global_step": steps,
        "epochs": round(float(metrics.get("epoch", 0.0)), 3),
        "precision": "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32",
        "seed": training_args.seed,
        "train_runtime_s": metrics.get("train_runtime"),
        "sample_prompt": prompt,
    }

