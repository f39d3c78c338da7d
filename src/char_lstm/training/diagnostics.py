"""The reference text's troubleshooting table, live: a run watches itself for each failure mode and says, once, in one
or two lines, what it sees, the likely cause measured from the run and the flags of this project that fix it, with a
link to its section of docs/troubleshooting.md.

* loss NaN or exploding: `callbacks.DivergenceGuard` stops the run; its message quotes `recent_grad_norms`;
* loss stuck high, overfitting, training very slow, the checklist: `TrainingDiagnostics` (a TrainerCallback);
* gibberish: `baseline_gain_warning`, on the final model's evaluation;
* repeats the same phrase: `sampling.repetition_warning`, on the training samples and on `scripts/generate.py`;
* out of memory: `out_of_memory_message`, for the allocation failure `train()` catches.

The baselines the losses are compared with come from the data (`Baselines`): a uniform guess over the vocabulary
(ln V nats/char, where training starts) and the unigram entropy of the training text (what a model that knows only
the characters' frequencies scores)."""

import collections
import logging
import math
import os
import time
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from accelerate.utils.memory import should_reduce_batch_size
from transformers import TrainerCallback

from ..cells_char_lstm import CELLS
from ..encoding import usable_cores
from ..errors import see_troubleshooting


logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# The baselines of the data


@dataclass
class Baselines:
    """Losses in nats/char a model must beat: `uniform` (ln of the vocabulary size) and `unigram` (the entropy of the
    training text's character frequencies)."""

    uniform: float
    unigram: float

    @classmethod
    def from_texts(cls, texts: Iterable[str], vocab_size: int, most_characters: int = 4_000_000) -> "Baselines":
        """From the first `most_characters` of `texts` (a streamed dataset is not read to its end for this)."""
        counts, seen = collections.Counter(), 0
        for text in texts:
            counts.update(text[: most_characters - seen])
            seen += min(len(text), most_characters - seen)
            if seen >= most_characters:
                break
        total = sum(counts.values())
        unigram = -sum(n / total * math.log(n / total) for n in counts.values()) if total else math.log(vocab_size)
        return cls(uniform=math.log(vocab_size), unigram=unigram)


def unigram_entropy(counts: Iterable[int]) -> float | None:
    """The entropy in nats of a distribution given by counts, or None when they are all zero."""
    counts = [n for n in counts if n]
    total = sum(counts)
    return -sum(n / total * math.log(n / total) for n in counts) if total else None


def baselines_from_counts(counts: dict[str, int], tokenizer, vocab_size: int) -> "Baselines":
    """The baselines of a text from its character counts (`count_characters`), characters outside the vocabulary
    counted as the one `<unk>` they become."""
    known = tokenizer.get_vocab()
    unknown = sum(n for char, n in counts.items() if char not in known)
    unigram = unigram_entropy([*(n for char, n in counts.items() if char in known), unknown])
    return Baselines(uniform=math.log(vocab_size), unigram=math.log(vocab_size) if unigram is None else unigram)


def bits(nats: float) -> float:
    return nats / math.log(2)


def baseline_gain_warning(eval_loss: float, baselines: Baselines, min_gain_bits: float = 0.5) -> str | None:
    """Gibberish: the final model beats the unigram baseline by less than `min_gain_bits` bits/char (it has learned
    little more than which characters are frequent), or None."""
    gain = bits(baselines.unigram - eval_loss)
    if gain >= min_gain_bits:
        return None
    beats = (f"beats the unigram baseline of the data ({bits(baselines.unigram):.2f} bits/char) by only {gain:.2f} "
             f"bits/char" if gain > 0 else
             f"does not beat the unigram baseline of the data ({bits(baselines.unigram):.2f} bits/char)")
    return (f"Generates gibberish: the final model ({bits(eval_loss):.2f} bits/char) {beats}: it has not converged. "
            f"Train longer (--max_steps, --num_train_epochs), check that the loss decreases, and sample "
            f"(scripts/generate.py) at a lower --temperature (0.5-0.8). {see_troubleshooting('generates-gibberish')}")


# ---------------------------------------------------------------------------------------------------------------------
# Out of memory


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA, MPS, XPU or CPU allocation failure (accelerate's test, the one --auto_find_batch_size uses), or
    --auto_find_batch_size having found no batch size that fits."""
    return (isinstance(error, (MemoryError, torch.OutOfMemoryError)) or should_reduce_batch_size(error)
            or "No executable batch size found" in str(error))


class TrainingOutOfMemory(RuntimeError):
    """An allocation failure while training, told with the sizes in use and the options (`out_of_memory_message`)."""


@contextmanager
def out_of_memory_reported(training_args, block_size: int, model):
    """Turns an allocation failure in the block into `TrainingOutOfMemory` (one message, no traceback)."""
    try:
        yield
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        raise TrainingOutOfMemory(out_of_memory_message(error, training_args, block_size, model)) from None


def out_of_memory_message(error: BaseException, training_args, block_size: int, model) -> str:
    """Out of memory: what failed, the sizes in use (batch, block, model) and the options that need less memory."""
    what = str(error).splitlines()[0] if str(error) else type(error).__name__
    what = what.split("DefaultCPUAllocator: ")[-1]  # "[enforce fail at alloc_cpu.cpp:127] err == 0. " says nothing
    batch, accumulation = training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps
    parameters = sum(p.numel() for p in model.parameters())
    device = "GPU" if training_args.device.type == "cuda" else training_args.device.type.upper()
    precision = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "float32"
    half = max(1, batch // 2)
    return (f"Out of memory on the {device} ({what[:160]}) with batches of {batch} blocks of {block_size} characters "
            f"per device (eval: {training_args.per_device_eval_batch_size}), a model of {parameters / 1e6:.2f}M "
            f"parameters, {precision}. Options: a smaller batch with the same effective batch (--per_device_train_"
            f"batch_size {half} --gradient_accumulation_steps {accumulation * batch // half}), --bf16, "
            f"--auto_find_batch_size, a shorter --block_size (with --stateful to keep the context), a smaller "
            f"--per_device_eval_batch_size. {see_troubleshooting('out-of-memory')}")


# ---------------------------------------------------------------------------------------------------------------------
# While training


def recent_grad_norms(log_history: list[dict], most: int = 5) -> list[float]:
    """The gradient norms before clipping that Trainer logged last (one per logging step), oldest first."""
    return [entry["grad_norm"] for entry in log_history if "grad_norm" in entry][-most:]


def describe_grad_norms(norms: list[float], max_grad_norm: float) -> str:
    """"gradient norm before clipping over the last 3 logs: 0.41, 2.3e+03, inf (clipped to 1)"."""
    if not norms:
        return "no gradient norm logged yet"
    clipping = f"clipped to {max_grad_norm:g}" if max_grad_norm and max_grad_norm > 0 else "clipping off"
    return (f"gradient norm before clipping over the last {len(norms)} log{'s' if len(norms) > 1 else ''}: "
            f"{', '.join(f'{n:.3g}' for n in norms)} ({clipping})")


def _gated_cells() -> str:
    """The flags of the gated cells (registry `cells_char_lstm.CELLS`), e.g. "--cell_type lstm or gru"."""
    gated = [name for name, cell in CELLS.items() if cell.gated]
    return "--cell_type " + (" or ".join([", ".join(gated[:-1]), gated[-1]]) if len(gated) > 1 else gated[0])


def checklist_warnings(training_args, cell_type: str, block_size: int, has_eval_data: bool) -> list[str]:
    """The reference text's checklist, for the arguments of a run: clip gradients, prefer LSTM/GRU over a vanilla RNN
    for long blocks, watch the validation loss, save checkpoints."""
    warnings = []
    if not training_args.max_grad_norm or training_args.max_grad_norm <= 0:
        warnings.append(
            f"Gradient clipping is off (--max_grad_norm {training_args.max_grad_norm or 0:g}): one exploding gradient "
            f"can ruin a recurrent network's training; keep --max_grad_norm 1.0 (the default). "
            f"{see_troubleshooting('the-checklist')}")
    if not CELLS[cell_type].gated and block_size > 50:
        warnings.append(
            f"A cell without gates (--cell_type {cell_type}) on blocks of {block_size} characters: its gradient "
            f"vanishes within a few dozen steps, so most of each block teaches it little; prefer {_gated_cells()}, or "
            f"a shorter --block_size. {see_troubleshooting('the-checklist')}")
    if str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy)) == "no" or not has_eval_data:
        warnings.append(
            "No validation loss during training (--eval_strategy no): overfitting will go unseen; evaluate with "
            f"--eval_strategy steps --eval_steps N. {see_troubleshooting('the-checklist')}")
    if str(getattr(training_args.save_strategy, "value", training_args.save_strategy)) == "no":
        warnings.append(
            "No checkpoints (--save_strategy no): a crash or a divergence loses the whole run; save every "
            f"--save_steps N (the default). {see_troubleshooting('the-checklist')}")
    return warnings


def slow_training_causes(training_args, block_size: int, local_processes: int) -> list[str]:
    """What makes training slower than this machine allows, from simple rules: an unused GPU, emulated bf16, threads
    left idle, tiny batches, long blocks."""
    causes = []
    on_cpu = training_args.device.type == "cpu"
    if on_cpu and torch.cuda.is_available():
        causes.append("a GPU is present but unused (drop --use_cpu)")
    elif on_cpu and torch.backends.mps.is_available():
        causes.append("an Apple GPU (MPS) is present but unused (drop --use_cpu)")
    if on_cpu and training_args.bf16:
        from .runtime import native_bf16

        if not native_bf16("cpu"):
            causes.append("--bf16 on a CPU without native bf16 (no AVX512-BF16/AMX) is emulated, slower than "
                          "float32: drop --bf16")
    cores = usable_cores()
    if on_cpu and torch.get_num_threads() * local_processes * 4 <= cores:
        causes.append(f"{torch.get_num_threads()} thread(s) in {local_processes} process(es) on {cores} cores: unset "
                      f"OMP_NUM_THREADS, or launch one process per core or two (accelerate launch --multi_gpu "
                      f"--num_processes N)")
    if training_args.per_device_train_batch_size < 4:
        causes.append(f"batches of {training_args.per_device_train_batch_size} block(s) leave the hardware idle "
                      f"between steps: raise --per_device_train_batch_size (e.g. 32)")
    if block_size > 256:
        causes.append(f"blocks of {block_size} characters are processed one character after the other: a shorter "
                      f"--block_size with --stateful keeps the context (truncated BPTT)")
    return causes


class TrainingDiagnostics(TrainerCallback):
    """Watches a training run for the table's failure modes and reports each once (main process):

    * at the start, the checklist (`checklist_warnings`);
    * at the first training-loss log, training very slow (`slow_training_causes`, with the measured throughput);
    * at each evaluation, after `min_evaluations` (and `min_steps`): loss stuck high (the eval and training losses no
      better than the unigram baseline and improving by less than `plateau` over the last evaluations, with the cause
      from the learning rate, the gradient norms, the cell type and the size), and overfitting (the eval loss rising
      for `overfit_evaluations` evaluations in a row while the training loss falls)."""

    def __init__(self, baselines: Baselines, cell_type: str, hidden_size: int, block_size: int,
                 has_eval_data: bool = True, early_stopping_patience: int | None = None, min_evaluations: int = 3,
                 min_steps: int = 20, plateau: float = 0.05, overfit_evaluations: int = 3):
        self.baselines, self.cell_type = baselines, cell_type
        self.hidden_size, self.block_size = hidden_size, block_size
        self.has_eval_data, self.early_stopping_patience = has_eval_data, early_stopping_patience
        self.min_evaluations, self.min_steps, self.plateau = min_evaluations, min_steps, plateau
        self.overfit_evaluations = overfit_evaluations
        self.said: dict[str, str] = {}  # symptom -> its message, each said once
        self.evaluations: list[tuple[int, float, float | None]] = []  # (step, eval loss, last training loss)
        self.train_loss: float | None = None
        self.start = None
        self.start_step = 0
        self.slow_checked = False  # training speed is measured once, at the first training-loss log

    def _say(self, state, symptom: str, message: str) -> None:
        if symptom in self.said:
            return
        self.said[symptom] = message
        if state.is_world_process_zero:
            logger.warning(message)

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.start_step = time.perf_counter(), state.global_step
        if not self.evaluations:  # a resumed run: the evaluations of the run so far count (its trainer state's)
            train_loss = None
            for entry in state.log_history:
                train_loss = entry.get("loss", train_loss)
                if "eval_loss" in entry and "step" in entry and (
                        not self.evaluations or self.evaluations[-1][0] != entry["step"]):
                    self.evaluations.append((entry["step"], entry["eval_loss"], train_loss))
            self.train_loss = train_loss
        for number, warning in enumerate(checklist_warnings(args, self.cell_type, self.block_size,
                                                            self.has_eval_data)):
            self._say(state, f"checklist {number}", warning)

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is None:
            return
        self.train_loss = loss
        if self.slow_checked or self.start is None:
            return
        self.slow_checked = True
        steps = state.global_step - self.start_step
        seconds = time.perf_counter() - self.start
        causes = slow_training_causes(args, self.block_size, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        if causes and steps > 0 and seconds > 0:
            characters = steps * args.per_device_train_batch_size * args.gradient_accumulation_steps
            characters *= args.world_size * self.block_size
            self._say(state, "slow", f"Training very slow: {characters / seconds:,.0f} characters/s over the "
                      f"first {steps} steps, because {'; '.join(causes)}. {see_troubleshooting('training-very-slow')}")

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        eval_loss = (metrics or {}).get("eval_loss")
        if eval_loss is None or (self.evaluations and self.evaluations[-1][0] == state.global_step):
            return  # the final model's evaluation repeats the last step's
        self.evaluations.append((state.global_step, eval_loss, self.train_loss))
        if "stuck" not in self.said and "overfitting" not in self.said:
            message = self._stuck_high(args, state)
            if message:
                self._say(state, "stuck", message)
        if "overfitting" not in self.said:
            message = self._overfitting(args, state)
            if message:
                self._say(state, "overfitting", message)

    def _stuck_high(self, args, state) -> str | None:
        if len(self.evaluations) < self.min_evaluations or state.global_step < self.min_steps:
            return None
        (_, first, _), (_, earlier, _), (_, last, train_loss) = (
            self.evaluations[0], self.evaluations[-self.min_evaluations], self.evaluations[-1])
        level = min(last, train_loss if train_loss is not None else last)
        if level < self.baselines.unigram - 0.1 or (earlier - last) / earlier >= self.plateau:
            return None  # better than the unigram baseline, or still improving fast
        norms = recent_grad_norms(state.log_history, most=10)
        typical = sorted(norms)[len(norms) // 2] if norms else None
        moved = (first - last) / first
        causes, fixes = [], []
        vanishing = typical is not None and typical < 1e-3
        lr_too_low = not vanishing and moved < 0.01  # gradients there, weights hardly moving
        if vanishing:
            causes.append(f"vanishing gradients (gradient norms around {typical:.2g})")
            fixes.append("a higher --learning_rate")
        if lr_too_low:
            causes.append(f"a learning rate too low (--learning_rate {args.learning_rate:g}: the eval loss moved "
                          f"{moved:.1%} in {len(self.evaluations)} evaluations"
                          + (f", with gradient norms around {typical:.2g})" if typical is not None else ")"))
            fixes.append("--learning_rate 2e-3 (the default; 5e-3 for small models)")
        if not CELLS[self.cell_type].gated:
            causes.append(f"a cell without gates (--cell_type {self.cell_type})")
            fixes.append(_gated_cells())
        if self.hidden_size < 32 and not lr_too_low:
            causes.append(f"a model too small ({self.hidden_size} units)")
            fixes.append(f"--hidden_size {max(128, 4 * self.hidden_size)}")
        if not causes:
            causes.append(f"a model too small or a learning rate too low ({self.hidden_size} units, --learning_rate "
                          f"{args.learning_rate:g})")
            fixes.append(f"--hidden_size {2 * self.hidden_size} or a higher --learning_rate")
        return (f"Loss stuck high: after {len(self.evaluations)} evaluations the eval loss ({last:.3f} nats/char) is "
                f"no better than the unigram baseline of the data ({self.baselines.unigram:.3f}; uniform over the "
                f"vocabulary: {self.baselines.uniform:.3f}). Likely cause: {' and '.join(causes)}; try "
                f"{', '.join(fixes)}. {see_troubleshooting('loss-stuck-high')}")

    def _overfitting(self, args, state) -> str | None:
        window = self.evaluations[-self.overfit_evaluations - 1:]
        if len(window) <= self.overfit_evaluations:
            return None
        eval_losses = [loss for _, loss, _ in window]
        train_losses = [loss for _, _, loss in window]
        if any(loss is None for loss in train_losses):
            return None
        rising = all(later > earlier for earlier, later in zip(eval_losses, eval_losses[1:]))
        falling = train_losses[-1] < train_losses[0]
        if not (rising and falling):
            return None
        best_step, best_loss = min(((step, loss) for step, loss, _ in self.evaluations), key=lambda e: e[1])
        if args.load_best_model_at_end:
            kept = (f"The best checkpoint (step {best_step}, eval loss {best_loss:.3f}) is kept and loaded at the end"
                    if state.best_model_checkpoint else "The best checkpoint is loaded at the end")
        elif str(getattr(args.save_strategy, "value", args.save_strategy)) != str(
                getattr(args.eval_strategy, "value", args.eval_strategy)):
            kept = ("To keep the best checkpoint, save when you evaluate (the same --save_strategy and "
                    "--eval_strategy) and pass --load_best_model_at_end true")
        else:
            kept = "Pass --load_best_model_at_end true to keep the best checkpoint"
        stop = ("" if self.early_stopping_patience else
                f"; --early_stopping_patience {self.overfit_evaluations} stops such a run")
        return (f"Overfitting: the eval loss rose for {self.overfit_evaluations} evaluations in a row "
                f"({eval_losses[0]:.3f} -> {eval_losses[-1]:.3f} nats/char) while the training loss fell "
                f"({train_losses[0]:.3f} -> {train_losses[-1]:.3f}). {kept}{stop}; against it: more --dropout, "
                f"--weight_decay, a smaller --hidden_size, or more text. {see_troubleshooting('overfitting')}")
