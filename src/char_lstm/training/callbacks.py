"""What the run adds to Trainer through callbacks: samples while training, the divergence guard, the time budget,
the progress bars' numbers and the plateau scheduler's log line."""

import logging
import math
import sys
import time

import torch
from tqdm.auto import tqdm
from transformers import ProgressCallback, TrainerCallback

from ..encoding import iter_texts, release_mapped_pages
from ..errors import see_troubleshooting
from ..sampling import repetition_warning
from ..terminal import as_shown
from .summary import run_summary


logger = logging.getLogger(__name__)


class SampleCallback(TrainerCallback):
    """Every `every` evaluations, print a sample (main process only) and log it to TensorBoard as text; once per
    step (the evaluation of the final model after training does not print the last step's sample again). The first
    sample caught in a repetition loop is reported (`repetition_warning`), once. On a terminal, a sample's control
    characters (terminal escape codes) are shown as escapes (`visible_controls`), said once; TensorBoard gets the
    exact text."""

    def __init__(self, tokenizer, prompt: str, every: int, length: int, temperature: float):
        self.tokenizer, self.prompt, self.every = tokenizer, prompt, every
        self.length, self.temperature = length, temperature
        self.evaluations = 0
        self.sampled_step = None
        self.repetition_said = self.controls_said = False
        self.trainer = None  # set by train(), to find the TensorBoard writer

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self.evaluations += 1
        if not self.every or self.evaluations % self.every or not state.is_world_process_zero:
            return
        if state.global_step == self.sampled_step:
            return
        self.sampled_step = state.global_step
        text = sample(model, self.tokenizer, self.prompt, self.length, self.temperature)
        shown = as_shown(text, sys.stdout)  # where tqdm.write writes
        # through tqdm, so that the progress bars are cleared first and drawn again after the sample
        tqdm.write(f"----- sample at step {state.global_step} -----\n{shown}\n-----")
        if shown != text and not self.controls_said:
            self.controls_said = True
            logger.warning(f"The sample at step {state.global_step} holds control characters (such as terminal "
                           "escape codes), shown on the terminal as \\x1b-style escapes; scripts/generate.py "
                           "--raw_output writes them as they are.")
        if not self.repetition_said:
            warning = repetition_warning(text[len(self.prompt):], f"the sample at step {state.global_step}",
                                         training=True)
            if warning is not None:
                self.repetition_said = True
                logger.warning(warning)
        for callback in self.trainer.callback_handler.callbacks if self.trainer else ():
            writer = getattr(callback, "tb_writer", None)
            if writer is not None:
                writer.add_text("sample", text, state.global_step)
                writer.flush()


@torch.no_grad()
def sample(model, tokenizer, prompt: str, length: int, temperature: float) -> str:
    was_training = model.training
    model.eval()
    inputs = tokenizer([prompt], return_tensors="pt").to(model.device)
    out = model.generate(**inputs, max_new_tokens=length, do_sample=True, temperature=temperature, top_k=0)
    model.train(was_training)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def default_sample_prompt(tokenizer, texts, column: str, default_corpus: bool = False, most: int = 16) -> str:
    """The prompt of the samples printed while training when none is given: "ROMEO:" on the default corpus (tiny
    Shakespeare), else the start of a line of `texts` (the validation text: the model has not trained on it) whose
    first characters are all in the vocabulary, cut to at most `most` characters at a word end where there is one;
    else the known characters of its start; else one character of the vocabulary."""
    if default_corpus and not tokenizer.oov_characters("ROMEO:"):
        return "ROMEO:"
    start = next(iter_texts(texts, column), "")[: 1 << 16]
    for line in start.split("\n")[1:-1]:  # the first and last lines may be cut
        head = line[:most]
        # printable (no tab, no terminal escape codes), not starting with a space, every character known
        if len(head.strip()) >= 3 and head.isprintable() and head[0] != " " and not tokenizer.oov_characters(head):
            cut = head.rfind(" ") if len(line) > most else -1
            return head[:cut] if cut > len(head) // 2 else head
    known = "".join(c for c in start[:64] if not tokenizer.oov_characters(c))[:8]
    return known or next(t for t in tokenizer.get_vocab() if len(t) == 1)


class ReleaseMappedPages(TrainerCallback):
    """Every `every` steps, and after each evaluation, unmap the pages of the memory-mapped training and evaluation
    blocks that reading them has mapped into the process (`release_mapped_pages`): the training process's memory
    stays flat however large its data."""

    def __init__(self, datasets_to_release: list, every: int = 10):
        self.datasets, self.every = [d for d in datasets_to_release if d is not None], every

    def _release(self) -> None:
        for dataset in self.datasets:
            release_mapped_pages(dataset)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self._release()

    def on_evaluate(self, args, state, control, **kwargs):
        self._release()


DIVERGENCE_HELP = (
    "Likely causes and fixes: a learning rate too high (try --learning_rate 1e-4), exploding gradients (keep "
    "gradient clipping on: --max_grad_norm 1.0 or lower), or half-precision overflow (train in float32 first: "
    "drop --fp16/--bf16). " + see_troubleshooting("loss-is-nan-or-explodes")
)


class TrainingDiverged(RuntimeError):
    """The loss or the weights stopped being finite, or the loss stayed far above its start (`DivergenceGuard`)."""


class DivergenceGuard(TrainerCallback):
    """Stop when the loss or the weights stop being finite, before a NaN checkpoint or evaluation; and when the
    training loss stays far above where it started or its best for several logs (a finite explosion, such as
    `--learning_rate 1e3` taking the loss from 4 to thousands), saving no checkpoint while it is up there.

    "Far above" is more than `factor` times the reference: the best logged loss, or ln(vocab_size) (the loss of a
    uniform guess, where an untrained model starts) when that is lower. `patience` logs in a row trip the guard."""

    def __init__(self, factor: float = 2.0, patience: int = 3):
        self.factor, self.patience = factor, patience
        self.diverged_at: int | None = None
        self.what = ""
        self.best = math.inf
        self.logs_above = 0  # consecutive logs far above the reference

    def _trip(self, state, control, what: str):
        if self.diverged_at is None:
            self.diverged_at, self.what = state.global_step, what
        control.should_training_stop = True
        control.should_save = False
        control.should_evaluate = False

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.logs_above:  # the last logged loss is far up: these weights are not worth a checkpoint
            control.should_save = False
        # Checked before anything is saved, evaluated or logged (and at the end), not at every step: the check waits
        # for the device, and weights that are neither saved nor used cannot do harm in between.
        if not (control.should_save or control.should_evaluate or control.should_log or control.should_training_stop):
            return
        total = torch.stack([p.detach().float().sum() for p in model.parameters()]).sum()
        if not torch.isfinite(total):
            self._trip(state, control, "the weights became NaN/inf")

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is None:
            return
        if not math.isfinite(loss):
            self._trip(state, control, f"the training loss became {loss}")
            return
        vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
        reference = min(self.best, math.log(vocab_size)) if vocab_size else self.best
        if loss > self.factor * reference:
            self.logs_above += 1
            control.should_save = False  # logged before this step's save
            if self.logs_above >= self.patience:
                self._trip(state, control, f"the training loss ({loss:.4g}) stayed above {self.factor:g}x its start "
                           f"or best ({reference:.4g}) for {self.logs_above} logs in a row")
        else:
            self.logs_above = 0
            self.best = min(self.best, loss)

    def message(self, output_dir: str, prompt: str, grad_norms: str = "") -> str:
        """The run's last lines: what diverged and when (with `grad_norms`, the gradient norms logged before it, from
        `diagnostics.describe_grad_norms`), the likely causes and fixes, the last good checkpoint."""
        measured = f" ({grad_norms})" if grad_norms else ""
        return run_summary(
            output_dir,
            f"Training diverged at step {self.diverged_at}: {self.what}{measured}. {DIVERGENCE_HELP} Nothing was "
            "overwritten.",
            prompt=prompt,
            resume=False,
        )


class TimeLimitCallback(TrainerCallback):
    """A time budget (`--max_train_seconds`): stop training once `seconds` of training have passed, evaluating and
    saving that last step (the run then ends as usual), and run a decaying learning-rate schedule over the budget.

    The schedule (any `LambdaLR` Trainer builds: cosine, linear, polynomial, with warm-up) is read at
    `max(step, elapsed / seconds * max_steps)`: on a machine fast enough for `max_steps` in time nothing changes, on a
    slower one the schedule reaches its end when the time does, so the model it leaves is a finished one, not the
    middle of a schedule. Under several processes the elapsed time is the slowest process's (one all_reduce per
    step), so every process uses the same learning rate and stops at the same step. A resumed run counts its time
    from the resume."""

    def __init__(self, seconds: float):
        self.seconds, self.start, self.stopped_at = seconds, None, None
        self.fraction = 0.0  # of the time budget used, as of the last step
        self.schedule_over_time = False

    def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        self.start, self.fraction = time.perf_counter(), 0.0
        scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate may wrap it
        if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR) and state.max_steps > 0:
            scheduler.lr_lambdas = [self._over_time(schedule, state.max_steps) for schedule in scheduler.lr_lambdas]
            self.schedule_over_time = True

    def _over_time(self, schedule, max_steps: int):
        def scheduled(step: int) -> float:  # a plain function, so LambdaLR.state_dict() leaves it out of checkpoints
            return schedule(max(step, min(max_steps, round(self.fraction * max_steps))))

        return scheduled

    def on_optimizer_step(self, args, state, control, **kwargs):
        # after the optimizer step and before the scheduler's, so the next learning rate sees this step's time
        elapsed = time.perf_counter() - self.start
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # the slowest process's clock for all (one process alone needs no tensor and no device sync per step)
            clock = torch.tensor([elapsed], dtype=torch.float64, device=args.device)
            torch.distributed.all_reduce(clock, op=torch.distributed.ReduceOp.MAX)
            elapsed = float(clock.item())
        self.fraction = elapsed / self.seconds

    def on_step_end(self, args, state, control, **kwargs):
        if self.stopped_at is None and self.fraction >= 1:
            self.stopped_at = state.global_step
            control.should_training_stop = True
            # Evaluate and save this last step too, so the best model kept at the end can be the latest one.
            control.should_evaluate = args.eval_strategy != "no"
            control.should_save = args.save_strategy != "no"
            if state.is_world_process_zero:  # the budget the user set, not a problem: an info line
                logger.info(f"--max_train_seconds {self.seconds:g} reached at step {state.global_step} of "
                            f"{state.max_steps}: stopping"
                            + (" (the learning-rate schedule, run over the time budget, has ended)."
                               if self.schedule_over_time else "."))


class MetricsProgressCallback(ProgressCallback):
    """Trainer's progress bars and log lines, with every number at 4 significant digits (`2.000`, not `2`) and
    without the timings (`*_runtime`, `*_per_second`: they stay in trainer_state.json and all_results.json), so that
    a line holds what the run learned."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = {
            key: f"{value:#.4g}" if isinstance(value, float) else value
            for key, value in (logs or {}).items()
            if not key.endswith(("_runtime", "_per_second"))
        }
        super().on_log(args, state, control, logs=logs, **kwargs)


class LearningRateLogCallback(TrainerCallback):
    """Print a line whenever the learning rate goes down (the plateau scheduler halving it)."""

    def __init__(self):
        self.last_lr: float | None = None

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        lr = optimizer.param_groups[0]["lr"]
        if self.last_lr is not None and lr < self.last_lr and state.is_world_process_zero:
            logger.warning(
                f"Step {state.global_step}: eval loss stopped improving, learning rate reduced {self.last_lr:.3g} -> "
                f"{lr:.3g}"
            )
        self.last_lr = lr

