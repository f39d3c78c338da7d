"""Training with `transformers.Trainer`: arguments, presets, callbacks, and the `train()` entry point.

`scripts/train.py` only parses the three argument dataclasses and calls `train()`. Hand-written here is only what
Trainer does not do by itself: the sampling callback (the seed prints samples while training), the divergence guard
(Trainer keeps going with NaN weights), the log line when the plateau scheduler lowers the learning rate, and
bits-per-character / perplexity from the evaluation loss.
"""

import argparse
import contextlib
import ctypes
import json
import logging
import math
import os
import re
import shlex
import shutil
import signal
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import lru_cache, partial

try:
    import fcntl
except ImportError:  # Windows: no lock on the output folder
    fcntl = None

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import (
    AutoTokenizer,
    DynamicCache,
    HfArgumentParser,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from safetensors import safe_open
from transformers.hf_argparser import string_to_bool
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_callback import TrainerState
from transformers.trainer_pt_utils import safe_globals
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints
from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_NAME

from .cli import parse_command_line
from .configuration_char_lstm import CharLSTMConfig
from .data import (
    BUNDLED_DATASET,
    DEFAULT_DATASET,
    DataError,
    build_tokenizer,
    collate_blocks,
    collate_stream_blocks,
    count_oov,
    dataset_label,
    encode_blocks,
    encode_streams,
    iter_texts,
    load_raw_datasets,
    quiet_progress_bars,
    resolve_dataset_name,
    split_validation_tail,
)
from .hub import RUN_INFO_NAME, check_model_path, check_vocab_match, results_from_training, write_model_card
from .metrics import load_bits_per_character
from .modeling_char_lstm import (
    _cpu_has_native_bf16,
    CharLSTMForCausalLM,
    cache_from_states,
    cache_states,
    detach_cache,
    reset_cache_rows,
)


logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    preset: str | None = field(
        default=None,
        metadata={"help": "Named settings for model and schedule: 'cpu-small' (learns in minutes on 2 CPU cores) or "
                  "'seed' (the seed's 2x512 recipe, for a GPU). Flags given on the command line win."},
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Continue from a saved model (folder or Hub id); its tokenizer is reused."}
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Use this saved tokenizer instead of building one from the training text."}
    )
    embedding_size: int = field(default=128, metadata={"help": "Character embedding size."})
    hidden_size: int = field(default=512, metadata={"help": "Units per recurrent layer."})
    num_hidden_layers: int = field(default=2, metadata={"help": "Number of recurrent layers."})
    dropout: float = field(default=0.5, metadata={"help": "Dropout between layers and before the head, in [0, 1)."})
    cell_type: str = field(default="lstm", metadata={"help": "lstm, gru or rnn."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default="karpathy/tiny_shakespeare",
        metadata={"help": "A Hub dataset id, or a local folder laid out like one. Ignored with --train_file."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration."})
    train_file: str | None = field(
        default=None,
        metadata={"help": "Training text: a .txt file, a directory of .txt files, a glob, or .jsonl/.csv/.parquet."},
    )
    validation_file: str | None = field(default=None, metadata={"help": "Validation text, same formats."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text (.jsonl/.csv/.parquet)."})
    encoding: str = field(default="utf-8", metadata={"help": "Encoding of .txt files."})
    document_separator: str = field(default="\n\n", metadata={"help": "Joins documents (rows, files)."})
    validation_split_percentage: float = field(
        default=5.0, metadata={"help": "Without a validation split: the last N%% of the training text."}
    )
    block_size: int = field(default=100, metadata={"help": "Characters per training sequence (BPTT length)."})
    stride: int | None = field(
        default=None, metadata={"help": "Characters between block starts (default: block_size, no overlap)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on at most this many blocks."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for encoding."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Encode again instead of using the cache."})
    streaming: bool = field(default=False, metadata={"help": "Stream the data (needs --max_steps)."})
    stateful: bool = field(
        default=False,
        metadata={"help": "Stateful truncated BPTT (char-rnn style): the text is read as batch-size contiguous streams "
                  "and each step starts from the previous step's final state, so the model learns dependencies "
                  "longer than one block. Evaluation reads its text the same way."},
    )


def _plateau_defaults() -> dict:
    return {"factor": 0.5, "patience": 3}


@dataclass
class CharLSTMTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the seed's defaults, plus sampling and output-directory safety."""

    output_dir: str | None = field(default="outputs/char-lstm", metadata={"help": "Where checkpoints and the model go."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Delete the checkpoints already in --output_dir and start over."}
    )
    learning_rate: float = field(default=2e-3, metadata={"help": "Adam learning rate."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Blocks per batch per device."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Blocks per eval batch per device."})
    num_train_epochs: float = field(default=50.0, metadata={"help": "Passes over the training blocks."})
    weight_decay: float = field(default=0.0, metadata={"help": "0 makes AdamW plain Adam, as in the seed."})
    lr_scheduler_type: str = field(
        default="reduce_lr_on_plateau", metadata={"help": "Default: multiply the LR by factor on eval-loss plateaus."}
    )
    lr_scheduler_kwargs: dict | str | None = field(
        default_factory=_plateau_defaults,
        metadata={"help": "For the plateau scheduler: factor and patience, e.g. '{\"factor\": 0.5, \"patience\": 3}'."},
    )
    eval_strategy: str = field(default="steps", metadata={"help": "Evaluate every --eval_steps."})
    eval_steps: float | None = field(default=250, metadata={"help": "Steps between evaluations."})
    save_steps: float = field(default=250, metadata={"help": "Steps between checkpoints."})
    save_total_limit: int | None = field(default=3, metadata={"help": "Checkpoints kept: the best (eval loss) and the latest ones."})
    load_best_model_at_end: bool = field(default=True, metadata={"help": "Keep the checkpoint with the best eval loss."})
    metric_for_best_model: str | None = field(default="loss", metadata={"help": "Metric for the best checkpoint."})
    logging_steps: float = field(default=50, metadata={"help": "Steps between training-loss logs."})
    logging_nan_inf_filter: bool = field(
        default=False, metadata={"help": "Keep NaN/inf losses visible in the logs (the divergence guard needs them)."}
    )
    sample_prompt: str | None = field(
        default=None, metadata={"help": "Prompt of the samples printed while training (default: 'ROMEO:' if valid)."}
    )
    sample_every_evals: int = field(default=1, metadata={"help": "Print a sample every N evaluations (0: never)."})
    sample_length: int = field(default=200, metadata={"help": "Characters per sample."})
    sample_temperature: float = field(default=0.8, metadata={"help": "Temperature of the samples."})
    max_train_seconds: float | None = field(
        default=None,
        metadata={"help": "A time budget: training stops (evaluating and saving that step) once this many seconds of "
                  "training have passed, whatever --max_steps says, and a decaying learning-rate schedule (cosine, "
                  "linear...) runs over whichever of the two ends first, so a slow machine still ends its schedule. "
                  "0: no limit."},
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={"help": "DDP's search for parameters without gradient: every CharLSTM parameter gets one in every "
                  "step (tested), so the search is off."},
    )

    def __post_init__(self):
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:  # checked here, before any step (Trainer fails later, or divides by zero)
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if self.lr_scheduler_type != "reduce_lr_on_plateau" and self.lr_scheduler_kwargs == _plateau_defaults():
            self.lr_scheduler_kwargs = {}
        if not torch.cuda.is_available():  # pinned memory only speeds up copies to a GPU (torch warns otherwise)
            self.dataloader_pin_memory = False
        super().__post_init__()


# Presets: values for the three dataclasses' fields, applied as defaults (explicit flags win).
PRESETS = {
    # The CPU recipe, tuned for quality per CPU second on tiny_shakespeare (2 cores, README "Results"): a 2x256 LSTM,
    # blocks of 64 (cheaper per character than 100 on CPU, and the length the test measure reads), 48 blocks per step
    # shared by the processes (48 // processes each), a cosine schedule that ends at 0, AdamW's weight decay against the gap between
    # training and held-out text, bf16 autocast where the hardware computes bf16 natively. Fastest on 2 cores as 2
    # processes of 1 thread: `accelerate launch --multi_gpu --num_processes 2 scripts/train.py --preset cpu-small`.
    "cpu-small": {
        "embedding_size": 64,
        "hidden_size": 256,
        "num_hidden_layers": 2,
        "dropout": 0.1,
        "block_size": 64,
        "global_train_batch_size": 48,
        "learning_rate": 5e-3,
        "weight_decay": 0.1,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.02,
        "max_steps": 3000,
        "max_train_seconds": 155,  # the time budget: a slow or busy machine stops early (the LR is nearly 0 by then)
        "bf16": "auto",
        "eval_steps": 1000,
        "save_steps": 1000,
        "logging_steps": 250,  # 12 loss lines: the run's output fits in one screen
        "max_eval_samples": 256,
    },
    "seed": {
        "embedding_size": 128,
        "hidden_size": 512,
        "num_hidden_layers": 2,
        "dropout": 0.5,
        "per_device_train_batch_size": 64,
        "num_train_epochs": 50,
    },
}


def prepare_launch_environment() -> None:
    """Make multi-process launches on machines without GPU run real DDP over gloo.

    * `accelerate launch --multi_gpu --num_processes N` (or `torchrun`) on a CPU-only machine starts N processes, but
      accelerate only sets up CPU DDP when told to use the CPU: tell it.
    * `accelerate launch --cpu --num_processes N` starts a single process (accelerate runs several CPU processes only
      through mpirun), which would silently train alone: refuse it with the command that works.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true")
    if world_size > 1 and not torch.cuda.is_available():
        os.environ["ACCELERATE_USE_CPU"] = "true"
        return
    launched_by_mpi = any(name in os.environ for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"))
    if use_cpu and "MASTER_ADDR" in os.environ and not launched_by_mpi and "LOCAL_RANK" not in os.environ:
        raise DataError(
            "accelerate launch --cpu --num_processes N starts only one process; for N processes on CPU run "
            "`accelerate launch --multi_gpu --num_processes N scripts/train.py ...` (char_lstm uses gloo when there "
            "is no GPU)."
        )


@contextmanager
def training_console():
    """The console of `scripts/train.py`: log lines go through tqdm (each on its own line, never glued to a progress
    bar), and the quick steps (loading one-row datasets, splitting, writing one weights file) draw no bar of their
    own, so a run shows one bar for training and one for each evaluation."""
    with logging_redirect_tqdm(loggers=[logging.getLogger("char_lstm")]), quiet_progress_bars():
        yield


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed memory for the next training step instead of handing it back to the kernel.

    With glibc's defaults, large blocks are mmap-ed and unmapped again when freed, and the top of the heap is trimmed,
    so each step's activations and gradients come back as fresh pages that the kernel faults in and zeroes. On this
    project's 2-core machine that was a quarter of a `--preset cpu-small` step (300 steps in 12.2 s with 3.1 s of
    system time -> 9.3 s with 0.5 s). After this call blocks up to 32 MB come from the heap and up to 1 GB of freed
    memory stays there. It changes the whole process, so the training and benchmark scripts call it, not the library
    functions. Linux with glibc only; elsewhere nothing changes. Returns whether both settings took."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library (musl): leave it as it is
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def parse_arguments(argv: list[str] | None = None):
    """(ModelArguments, DataArguments, CharLSTMTrainingArguments) from the command line or from one .json/.yaml file,
    with `--preset` values as defaults. Flags must be spelled out (no prefix matching: --learning_rat is an error)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, CharLSTMTrainingArguments), allow_abbrev=False)
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        values = read_config_file(argv[0], parser)
        preset = _preset_values(values.get("preset"))
        return parser.parse_dict({**preset, **values})
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--preset", default=None)
    known, _ = pre.parse_known_args(argv)
    parser.set_defaults(**_preset_values(known.preset))
    return parse_command_line(parser, argv)


def read_config_file(name: str, parser: HfArgumentParser) -> dict:
    """The arguments in a .json/.yaml config file, checked as the command line checks them: one-line errors naming
    the file for a syntax error, a file that is not a mapping, an unknown name or a value of the wrong type."""
    import yaml

    path = os.path.abspath(name)
    if not os.path.isfile(path):
        raise DataError(f"Config file {name} does not exist.")
    kind = "JSON" if path.endswith(".json") else "YAML"
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f) if kind == "JSON" else yaml.safe_load(f)
    except json.JSONDecodeError as error:
        raise DataError(f"Config file {name} is not valid JSON: {error.msg} at line {error.lineno}, column "
                        f"{error.colno}.") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise DataError(f"Config file {name} is not valid YAML: {getattr(error, 'problem', None) or error}{where}.") from None
    except UnicodeDecodeError:
        raise DataError(f"Config file {name} is not UTF-8 text.") from None
    if not isinstance(values, dict):
        raise DataError(f"Config file {name} holds a {type(values).__name__}, not a mapping of argument names to "
                        "values (such as `learning_rate: 0.002`).")
    expected = {int: "an integer", float: "a number", string_to_bool: "true or false"}
    for key, value in values.items():
        action = parser._option_string_actions.get(f"--{key}")
        if action is None:
            raise DataError(f"Config file {name}: unknown argument {key!r} (python scripts/train.py --help lists them).")
        if value is None or action.type not in expected:
            continue
        if action.type is string_to_bool:
            valid = isinstance(value, bool)
        else:
            valid = isinstance(value, int if action.type is int else (int, float)) and not isinstance(value, bool)
        if not valid:
            raise DataError(f"Config file {name}: {key} must be {expected[action.type]}, got {value!r}.")
    return values


def native_bf16(device_type: str | None = None) -> bool:
    """Whether `device_type` ("cuda" or "cpu"; default: cuda when available) computes bf16 natively: a GPU with bf16,
    or a CPU with AVX512-BF16 or AMX (elsewhere bf16 on CPU is emulated and slower than float32)."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return _cpu_has_native_bf16()


def _preset_values(name: str | None) -> dict:
    if name is None:
        return {}
    if name not in PRESETS:
        raise DataError(f"Unknown --preset {name!r}; choose from {sorted(PRESETS)}.")
    values = dict(PRESETS[name])
    if "global_train_batch_size" in values:  # the same global batch under any number of processes
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        values["per_device_train_batch_size"] = max(1, values.pop("global_train_batch_size") // world_size)
    if values.get("bf16") == "auto":  # bf16 autocast where the hardware has it (Trainer needs use_cpu for CPU bf16)
        values["bf16"] = native_bf16()
        if values["bf16"] and not torch.cuda.is_available():
            values["use_cpu"] = True
    return values


# ----------------------------------------------------------------------------------------------------------------------
# Metrics


def preprocess_logits_for_metrics(logits: torch.Tensor, labels: torch.Tensor, shifted: bool = False) -> torch.Tensor:
    """Per-position loss of the next character, so evaluation keeps B*T numbers instead of B*T*V.

    `labels` are the inputs (transformers' convention: position t predicts label t + 1), or with `shifted=True` the
    targets of each position already (`shift_labels`, stateful training)."""
    if not shifted:
        logits, labels = logits[:, :-1], labels[:, 1:]
    nll = F.cross_entropy(logits.float().transpose(1, 2), labels.clamp(min=0), reduction="none")
    return nll.masked_fill(labels == -100, 0.0)


def compute_metrics(eval_prediction, shifted: bool = False) -> dict[str, float]:
    """Bits per character and perplexity of the evaluation text, through the bits_per_character evaluate module."""
    nll = np.asarray(eval_prediction.predictions, dtype=np.float64).reshape(-1)
    labels = np.asarray(eval_prediction.label_ids)
    labels = (labels if shifted else labels[:, 1:]).reshape(-1)
    result = _bits_per_character().compute(predictions=nll, references=labels)
    return {"bits_per_char": result["bits_per_character"], "perplexity": result["perplexity"]}


@lru_cache(maxsize=1)
def _bits_per_character():
    return load_bits_per_character()


# ----------------------------------------------------------------------------------------------------------------------
# Callbacks


class SampleCallback(TrainerCallback):
    """Every `every` evaluations, print a sample (main process only) and log it to TensorBoard as text; once per
    step (the evaluation of the final model after training does not print the last step's sample again)."""

    def __init__(self, tokenizer, prompt: str, every: int, length: int, temperature: float):
        self.tokenizer, self.prompt, self.every = tokenizer, prompt, every
        self.length, self.temperature = length, temperature
        self.evaluations = 0
        self.sampled_step = None
        self.trainer = None  # set by train(), to find the TensorBoard writer

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self.evaluations += 1
        if not self.every or self.evaluations % self.every or not state.is_world_process_zero:
            return
        if state.global_step == self.sampled_step:
            return
        self.sampled_step = state.global_step
        text = sample(model, self.tokenizer, self.prompt, self.length, self.temperature)
        # through tqdm, so that the progress bars are cleared first and drawn again after the sample
        tqdm.write(f"----- sample at step {state.global_step} -----\n{text}\n-----")
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


DIVERGENCE_HELP = (
    "Likely causes and fixes: a learning rate too high (try --learning_rate 1e-4), exploding gradients (keep "
    "gradient clipping on: --max_grad_norm 1.0 or lower), or half-precision overflow (train in float32 first: "
    "drop --fp16/--bf16)."
)


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
                self._trip(state, control, f"the training loss ({loss:.4g}) stayed above {self.factor:g}x its start or "
                           f"best ({reference:.4g}) for {self.logs_above} logs in a row")
        else:
            self.logs_above = 0
            self.best = min(self.best, loss)

    def message(self, output_dir: str, prompt: str) -> str:
        return run_summary(
            output_dir,
            f"Training diverged at step {self.diverged_at}: {self.what}. {DIVERGENCE_HELP} Nothing was overwritten.",
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
            if state.is_world_process_zero:
                logger.warning(f"--max_train_seconds {self.seconds:g} reached at step {state.global_step} of "
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
                f"Step {state.global_step}: eval loss stopped improving, learning rate reduced {self.last_lr:.3g} -> {lr:.3g}"
            )
        self.last_lr = lr


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints that are complete or absent


STAGING_DIR = "_tmp-checkpoints"  # Trainer writes checkpoint-N in here; it moves to output_dir/ once complete
FINAL_STAGING_DIR = "_tmp-final"  # the final model, written here, then moved into output_dir/
SET_ASIDE_PREFIX = "_incomplete-"  # a checkpoint a resume could not use, kept under this name (not a checkpoint-*)
LOCK_NAME = "_train.lock"
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
            except Exception as error:  # UnpicklingError (a hostile or foreign pickle), truncated zip, ...
                reason = str(error).splitlines()[0][:120] if str(error) else ""
                return f"{name} cannot be loaded safely ({type(error).__name__}: {reason})"
    return None


def latest_complete_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint of `output_dir` that is complete. Newer ones that are not (written by a version that
    saved in place, damaged, tampered with) are renamed `_incomplete-checkpoint-N`, with one warning line."""
    names = [name for name in os.listdir(output_dir) if _CHECKPOINT_NAME.match(name)]
    skipped = []
    for name in sorted(names, key=checkpoint_step, reverse=True):
        path = os.path.join(output_dir, name)
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

    def _get_output_dir(self, trial) -> str:
        # `_save_checkpoint` writes where this says; during a save that is the staging folder
        return self._staging_root or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self._staging_root = os.path.join(run_dir, STAGING_DIR)
        staged, final = os.path.join(self._staging_root, name), os.path.join(run_dir, name)
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
            publish_folder(staged, final)
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(run_dir, STAGING_DIR))
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True)


# ----------------------------------------------------------------------------------------------------------------------
# Stateful truncated BPTT


STREAM_STATE_NAME = "stream_state_{}.pt"


class StatefulTrainer(CharLSTMTrainer):
    """`Trainer` for stateful truncated BPTT (char-rnn style, `--stateful`): each batch row continues its own
    contiguous stream of text, starting from the state the previous batch left (detached, so gradients stop at the
    window boundary), and a stream that starts over (`window == 0`: a new epoch, a new evaluation) starts from zero.

    The data comes from `encode_streams` + `collate_stream_blocks`, read in order (`train_sampling_strategy` is
    "sequential"); accelerate deals the batches to the processes so that each process owns its own streams. What
    Trainer does not know and this class adds:

    * the carried state, one per mode: evaluation in the middle of training reads its own streams and leaves the
      training state alone;
    * the state saved in each checkpoint next to the RNG state (one file per process), and restored on resume, so a
      resumed run continues exactly as the uninterrupted one (with gradient accumulation too: micro-batches follow
      each other in the same order).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._stream_caches: dict[str, DynamicCache] = {}

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "window" not in self._signature_columns:  # the model does not take it, but the collator needs it
            self._signature_columns = [*self._signature_columns, "window"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        window = inputs.pop("window")
        mode = "train" if model.training else "eval"
        cache = self._stream_caches.get(mode)
        if cache is None:
            cache = DynamicCache(config=self.accelerator.unwrap_model(model).config)
        reset_cache_rows(cache, window == 0)
        loss, outputs = super().compute_loss(
            model, {**inputs, "cache": cache, "use_cache": True}, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        self._stream_caches[mode] = detach_cache(cache)
        return (loss, outputs) if return_outputs else loss

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        cache = self._stream_caches.get("train")
        states = cache_states(cache) if cache is not None else None
        if states is not None:
            saved = {"states": [tuple(s.cpu() for s in layer) for layer in states], "world_size": self.args.world_size}
            torch.save(saved, os.path.join(output_dir, STREAM_STATE_NAME.format(self.args.process_index)))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, STREAM_STATE_NAME.format(self.args.process_index))
        if not os.path.isfile(path):
            logger.warning(f"{checkpoint} has no stream state for process {self.args.process_index}: the streams "
                           "continue from a zero state.")
            return
        saved = torch.load(path, map_location="cpu", weights_only=True)
        rows, world_size = saved["states"][0][0].shape[0], saved["world_size"]
        if (rows, world_size) != (self.args.per_device_train_batch_size, self.args.world_size):
            raise DataError(
                f"{checkpoint} was trained with {rows} streams per process and {world_size} process(es), this run has "
                f"{self.args.per_device_train_batch_size} and {self.args.world_size}: resume a --stateful run with the "
                "same --per_device_train_batch_size and number of processes (the streams are laid out for them)."
            )
        device = next(self.model.parameters()).device
        states = [tuple(s.to(device) for s in layer) for layer in saved["states"]]
        self._stream_caches["train"] = cache_from_states(self.accelerator.unwrap_model(self.model).config, states)


# ----------------------------------------------------------------------------------------------------------------------
# The run


class TrainingDiverged(RuntimeError):
    pass


def _checkpoint_metrics(checkpoint: str) -> dict:
    """The last evaluation saved in a checkpoint's trainer_state.json ({} without one)."""
    path = os.path.join(checkpoint, "trainer_state.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        history = json.load(f).get("log_history", [])
    return next((entry for entry in reversed(history) if "eval_loss" in entry), {})


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
        return f"eval loss {values['eval_loss']:#.4g} nats/char, {bits:#.4g} bits/char"

    def generate(folder: str) -> str:
        return (f"python scripts/generate.py --model_name_or_path {shlex.quote(folder)} --prompt {shlex.quote(prompt)} "
                "--max_new_tokens 300")

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


class OutputDirInUse(DataError):
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
            logger.warning(f"Took over the lock of {self.output_dir} left by process {stale}, which is no longer running.")
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


def _on_main_process(args: CharLSTMTrainingArguments, function):
    """`function()` run by the main process only; its result, or its DataError, reaches every process. The other
    processes raise `ReportedByMainProcess` (the main process prints the error)."""
    result, error = None, None
    if args.process_index == 0:
        try:
            result = function()
        except DataError as exc:
            error = exc
    if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [(result, None if error is None else str(error))]
        torch.distributed.broadcast_object_list(box, src=0)
        result, message = box[0]
        if args.process_index != 0 and message is not None:
            raise ReportedByMainProcess(message)
    if error is not None:
        raise error
    return result


class ReportedByMainProcess(DataError):
    """An error of the main process, seen by another process (which exits without printing it again)."""


def _prepare_output_dir(args: CharLSTMTrainingArguments) -> str | None:
    """With the folder's lock held (main process): remove what interrupted saves left, refuse to clobber a previous
    run (nothing else is deleted here), and return the checkpoint to resume from (or None): with
    `--resume_from_checkpoint True` the newest complete one, incomplete or damaged ones being skipped."""
    resume = args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "false"):
        resume = resume.lower() == "true" or None
    if os.path.isdir(args.output_dir):
        for name in (STAGING_DIR, FINAL_STAGING_DIR):  # what a killed run was writing: never complete, never used
            shutil.rmtree(os.path.join(args.output_dir, name), ignore_errors=True)
    last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
    if resume is True:
        if last is None:
            raise DataError(f"--resume_from_checkpoint True, but {args.output_dir} holds no checkpoint to resume from.")
        resume = latest_complete_checkpoint(args.output_dir)
        if resume is None:
            raise DataError(
                f"--resume_from_checkpoint True, but no checkpoint in {args.output_dir} is complete: start over with "
                "--overwrite_output_dir, or choose another --output_dir."
            )
    elif isinstance(resume, str):
        if not os.path.isdir(resume):
            raise DataError(f"--resume_from_checkpoint {resume} is not a checkpoint folder.")
        problem = checkpoint_problem(resume)
        if problem is not None:
            raise DataError(
                f"--resume_from_checkpoint {resume} cannot be resumed from: {problem}; give another checkpoint, or "
                "--resume_from_checkpoint True for the newest complete one."
            )
    elif last is not None and not args.overwrite_output_dir:
        raise DataError(
            f"{args.output_dir} already holds checkpoints ({os.path.basename(last)}): resume with "
            "--resume_from_checkpoint True, start over with --overwrite_output_dir, or choose another --output_dir."
        )
    return resume


def _restore_finished_run(trainer: Trainer, checkpoint: str) -> dict:
    """Leave `trainer` as `trainer.train()` leaves it at the end of the run that `checkpoint` ends (its state, its
    weights, or the best checkpoint's with --load_best_model_at_end), without training; returns the train metrics."""
    trainer.state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
    trainer._load_from_checkpoint(checkpoint)
    best = trainer.state.best_model_checkpoint
    if trainer.args.load_best_model_at_end and best is not None and os.path.isdir(best):
        trainer._load_best_model()
    return {"epoch": trainer.state.epoch}


# ----------------------------------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM


STOP_SIGNALS = {signal.SIGINT: ("Ctrl-C (SIGINT)", 130), signal.SIGTERM: ("SIGTERM", 143)}  # name, exit code
_stop_signal: int | None = None


class RunInterrupted(BaseException):
    """SIGINT or SIGTERM reached the run (a BaseException, like KeyboardInterrupt: no `except Exception` keeps it)."""


def stop_on_signals() -> None:
    """Make SIGINT (Ctrl-C) and SIGTERM stop the run at once with `RunInterrupted`, wherever it is: checkpoints and
    the final model are written complete or not at all, so stopping anywhere leaves them consistent. Signals that come
    while it stops are ignored. For the training script (it changes the whole process)."""

    def handler(signum, frame):
        global _stop_signal
        if _stop_signal is None:
            _stop_signal = signum
            raise RunInterrupted(signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)


def received_stop_signal() -> int | None:
    """The signal that stopped the run, if one did (what was raised after it is a consequence: a collective whose
    peer left, an interrupted write...)."""
    return _stop_signal


def interrupted_message(signum: int, output_dir: str | None, prompt: str | None = None) -> str:
    """The line printed when a signal stops the run: `run_summary` (what is kept, how to go on) on one line. The
    progress bars the signal cut short are closed first, so that the line is the last one and stands alone."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    stopped = f"Stopped by {STOP_SIGNALS[signum][0]}; checkpoints are complete (a save cut short is discarded)."
    if not output_dir:
        return stopped
    return " ".join(run_summary(output_dir, stopped, prompt=prompt or "ROMEO:").splitlines())


def _finished_at(checkpoint: str, args: CharLSTMTrainingArguments) -> int | None:
    """The step of `checkpoint` when it already ends the run (--max_steps, or the run's own length), else None."""
    with open(os.path.join(checkpoint, TRAINER_STATE_NAME), encoding="utf-8") as f:
        state = json.load(f)
    target = args.max_steps if args.max_steps > 0 else state.get("max_steps") or 0
    return state["global_step"] if target and state["global_step"] >= target else None


def _delete_old_checkpoints(args: CharLSTMTrainingArguments) -> None:
    """--overwrite_output_dir: remove the previous run's checkpoints, once everything else is known to work."""
    if args.process_index == 0 and os.path.isdir(args.output_dir):
        old = [name for name in os.listdir(args.output_dir) if name.startswith("checkpoint-")]
        for name in old:
            shutil.rmtree(os.path.join(args.output_dir, name))
        if old:
            logger.warning(f"--overwrite_output_dir: deleted the checkpoints in {args.output_dir}")


def _load_tokenizer_and_model(model_args: ModelArguments, train_raw, data_args: DataArguments):
    if model_args.model_name_or_path is not None:
        model = CharLSTMForCausalLM.from_pretrained(model_args.model_name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    else:
        if model_args.tokenizer_name is not None:
            tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name)
        else:
            tokenizer = build_tokenizer(train_raw, data_args.text_column, data_args.document_separator)
        config = CharLSTMConfig(
            vocab_size=len(tokenizer),
            embedding_size=model_args.embedding_size,
            hidden_size=model_args.hidden_size,
            num_hidden_layers=model_args.num_hidden_layers,
            dropout=model_args.dropout,
            cell_type=model_args.cell_type,
            pad_token_id=tokenizer.pad_token_id,
            unk_token_id=tokenizer.unk_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        model = CharLSTMForCausalLM(config)
    check_vocab_match(model.config, tokenizer)
    return tokenizer, model


def default_sample_prompt(tokenizer, train_raw, column: str) -> str:
    """"ROMEO:" when the vocabulary has those characters, else the start of the training text (its characters that
    are in the vocabulary), else one character of the vocabulary."""
    if not tokenizer.oov_characters("ROMEO:"):
        return "ROMEO:"
    first = next(iter_texts(train_raw, column), "")[:64]
    known = "".join(c for c in first if not tokenizer.oov_characters(c))[:8]
    return known or next(t for t in tokenizer.get_vocab() if len(t) == 1)


def _scheduler_name(training_args) -> str:
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
    scheduler = _scheduler_name(training_args)
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
    (step, the last training loss logged by then, validation loss, bits per character)."""
    rows, train_loss, steps = [], None, set()
    for entry in log_history:
        train_loss = entry.get("loss", train_loss)
        if "eval_loss" in entry and entry.get("step") not in steps:  # the final model's evaluation is not a new row
            steps.add(entry.get("step"))
            rows.append({"step": entry.get("step"), "training_loss": train_loss, "validation_loss": entry["eval_loss"],
                         "bits_per_char": entry.get("eval_bits_per_char", entry["eval_loss"] / math.log(2))})
    return rows


def training_run_info(model_args, data_args, training_args, metrics: dict, prompt: str, state,
                      stopped_at: int | None = None) -> dict:
    """What the model card says about the run, from the run itself (saved as training_run.json next to the model):
    the data by name (a Hub id, the bundled copy, or a local file's name: never a path of this machine), the
    optimizer, the schedule, the steps, and the evaluations."""
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
        "training_data": (f"`{dataset}`: {blocks if blocks is not None else 'streamed'} training blocks of "
                          f"{data_args.block_size} characters; validation: {validation}."
                          + (" Stateful truncated BPTT: each batch row reads one contiguous stream, starting from the "
                             "previous step's state." if data_args.stateful else "")),
        "procedure": (f"Trained with `transformers.Trainer` for {steps} steps ({float(metrics.get('epoch', 0.0)):.3g} "
                      f"epochs) of {batch} blocks of {data_args.block_size} characters"
                      + (", each batch row continuing its stream from the previous step's state"
                         if data_args.stateful else ", each block from a zero state")
                      + f": {_describe_optimizer(training_args)}, learning rate {training_args.learning_rate:g}, "
                      f"schedule {_describe_schedule(training_args, state.max_steps, stopped_at)}, gradient clipping "
                      f"at norm {training_args.max_grad_norm:g}."),
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


def train(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: CharLSTMTrainingArguments,
    callbacks: list[TrainerCallback] | None = None,
) -> dict:
    """Train a CharLSTM model with Trainer; returns the final metrics. Raises DataError for bad input and
    TrainingDiverged when the loss stops being finite. `callbacks` are added to the run's own.

    The output folder is locked for the run (`OutputDirLock`); a resume that finds the run already finished writes the
    final model from its last checkpoint without training."""
    if data_args.streaming and training_args.max_steps <= 0:
        raise DataError("--streaming needs --max_steps (the length of a stream is not known in advance).")
    if data_args.stateful:
        if data_args.streaming:
            raise DataError("--stateful lays the whole text out as streams and needs its length: drop --streaming.")
        if data_args.stride is not None and data_args.stride != data_args.block_size:
            raise DataError("--stateful reads each stream window after window: drop --stride (it is --block_size).")
        if training_args.auto_find_batch_size:
            raise DataError("--stateful lays out one stream per batch row: drop --auto_find_batch_size.")
        if training_args.n_gpu > 1:
            raise DataError(
                "--stateful needs one process per GPU (DataParallel splits the batch rows): launch with "
                "`accelerate launch --multi_gpu --num_processes N` instead."
            )
        # Streams are read in order, and the loss and metrics use the targets that `collate_stream_blocks` gives.
        training_args.train_sampling_strategy = "sequential"
        training_args.label_names = ["shift_labels"]
    if model_args.model_name_or_path is not None:  # a mistyped folder is said now, not after loading the data
        check_model_path(model_args.model_name_or_path)
    lock = OutputDirLock(training_args.output_dir)

    def take_output_dir() -> str | None:  # main process: lock the folder, then look at what it holds
        lock.acquire()
        return _prepare_output_dir(training_args)

    try:
        resume = _on_main_process(training_args, take_output_dir)
        return _train(model_args, data_args, training_args, callbacks, resume)
    finally:
        lock.release()


def _train(model_args, data_args, training_args, callbacks, resume: str | None) -> dict:
    """`train()` once the output folder is locked and the checkpoint to resume from (if any) is known."""
    set_seed(training_args.seed)
    if data_args.train_file is None:  # karpathy/tiny_shakespeare without Hub access: the bundled copy
        data_args = replace(
            data_args, dataset_name=resolve_dataset_name(data_args.dataset_name, data_args.dataset_config_name)
        )

    with training_args.main_process_first(desc="loading the data"):
        raw = load_raw_datasets(
            dataset_name=None if data_args.train_file else data_args.dataset_name,
            dataset_config_name=data_args.dataset_config_name,
            train_file=data_args.train_file,
            validation_file=data_args.validation_file,
            text_column=data_args.text_column,
            encoding=data_args.encoding,
            streaming=data_args.streaming,
        )
        train_raw, eval_raw = raw["train"], raw.get("validation")
        if eval_raw is None:
            if data_args.streaming:
                raise DataError("--streaming needs a validation split or --validation_file.")
            train_raw, eval_raw = split_validation_tail(
                train_raw, data_args.text_column, data_args.validation_split_percentage
            )

    tokenizer, model = _load_tokenizer_and_model(model_args, train_raw, data_args)
    if training_args.process_index == 0:
        # Under --streaming the validation stream is read once more here (evaluation reads it anyway); a streamed
        # training text is not: it may be far too large to read before training starts.
        texts = {"validation": eval_raw}
        if (model_args.model_name_or_path or model_args.tokenizer_name) and not data_args.streaming:
            texts = {"training": train_raw, **texts}  # a vocabulary not built from this text
        for name, dataset in texts.items():
            oov = count_oov(dataset, data_args.text_column, tokenizer)
            if oov:
                logger.warning(
                    f"{sum(oov.values())} characters of the {name} text are not in the vocabulary and become <unk>: "
                    f"{''.join(sorted(oov))!r}"
                )

    with training_args.main_process_first(desc="encoding"):
        kwargs = dict(
            tokenizer=tokenizer,
            column=data_args.text_column,
            block_size=data_args.block_size,
            separator=data_args.document_separator,
        )
        if data_args.stateful:
            # One stream per batch row of every process (see `stream_layout`).
            world = training_args.world_size
            train_blocks = encode_streams(train_raw, num_streams=world * training_args.per_device_train_batch_size, **kwargs)
            eval_streams = world * training_args.per_device_eval_batch_size
            eval_blocks = encode_streams(eval_raw, num_streams=eval_streams, name="validation", **kwargs)
            if data_args.max_eval_samples is not None:  # the first windows of every stream
                keep = max(1, data_args.max_eval_samples // eval_streams) * eval_streams
                eval_blocks = eval_blocks.select(range(min(keep, len(eval_blocks))))
        else:
            kwargs["stride"] = data_args.stride
            if not data_args.streaming:
                kwargs.update(
                    num_proc=data_args.preprocessing_num_workers, load_from_cache_file=not data_args.overwrite_cache
                )
            train_blocks = encode_blocks(train_raw, **kwargs)
            eval_blocks = encode_blocks(eval_raw, **kwargs)
    if not data_args.streaming:
        window = data_args.block_size + 1
        for name, blocks in (("training", train_blocks), ("validation", eval_blocks)):
            if len(blocks) == 0:
                raise DataError(
                    f"The {name} text is shorter than one block ({window} characters): use more text or a "
                    "smaller --block_size."
                )
        if (
            not data_args.stateful
            and data_args.max_eval_samples is not None
            and len(eval_blocks) > data_args.max_eval_samples
        ):
            eval_blocks = eval_blocks.select(range(data_args.max_eval_samples))
        logger.info(f"{len(train_blocks)} training blocks, {len(eval_blocks)} validation blocks of {window} ids")
    elif data_args.max_eval_samples is not None:  # streamed: the first blocks of the validation stream
        eval_blocks = eval_blocks.take(data_args.max_eval_samples)

    # Sampling defaults saved with the model (generation_config.json)
    model.generation_config.do_sample = True
    model.generation_config.temperature = training_args.sample_temperature
    model.generation_config.top_k = 0  # the whole distribution, as char-rnn samples (transformers' default keeps 50)
    # No saved length: a saved max_new_tokens would win over a caller's max_length (generate(max_length=16) gave 200
    # characters), and a saved max_length makes transformers warn at every call that passes max_new_tokens. The
    # caller's length applies, or transformers' defaults (pipeline: 256 new characters).
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    prompt = training_args.sample_prompt or default_sample_prompt(tokenizer, train_raw, data_args.text_column)
    if tokenizer.oov_characters(prompt):
        raise DataError(
            f"--sample_prompt {prompt!r} has characters outside the vocabulary: {tokenizer.oov_characters(prompt)}."
        )
    sampler = SampleCallback(
        tokenizer, prompt, training_args.sample_every_evals, training_args.sample_length, training_args.sample_temperature
    )
    guard = DivergenceGuard()
    time_limit = TimeLimitCallback(training_args.max_train_seconds) if training_args.max_train_seconds else None
    trainer_class = StatefulTrainer if data_args.stateful else CharLSTMTrainer
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=train_blocks,
        eval_dataset=eval_blocks,
        data_collator=collate_stream_blocks if data_args.stateful else collate_blocks,
        processing_class=tokenizer,
        compute_metrics=partial(compute_metrics, shifted=data_args.stateful),
        preprocess_logits_for_metrics=partial(preprocess_logits_for_metrics, shifted=data_args.stateful),
        callbacks=[
            sampler,
            # before the guard: the guard checks the weights whenever a save or evaluation is due, this one included
            *([time_limit] if time_limit else []),
            guard,
            # only the plateau scheduler's cuts are news; a cosine or linear schedule lowers the LR every step
            *([LearningRateLogCallback()] if _scheduler_name(training_args) == "reduce_lr_on_plateau" else []),
            *(callbacks or []),
        ],
    )
    sampler.trainer = trainer
    if trainer.pop_callback(ProgressCallback) is not None:  # the same bars, with numbers at 4 significant digits
        trainer.add_callback(MetricsProgressCallback)

    finished_at = _finished_at(resume, training_args) if resume is not None else None
    if finished_at is not None:  # killed while writing the final model: write it again, do not train a step more
        if trainer.is_world_process_zero():
            logger.warning(f"{resume} is at step {finished_at}, where the run ends: no more training; writing the "
                           "final model from it.")
        train_metrics = _restore_finished_run(trainer, resume)
    else:
        if resume is None and training_args.overwrite_output_dir:
            _delete_old_checkpoints(training_args)
        trainer.accelerator.wait_for_everyone()
        train_metrics = trainer.train(resume_from_checkpoint=resume).metrics
    if guard.diverged_at is not None:
        raise TrainingDiverged(guard.message(training_args.output_dir, prompt))

    # The final model goes to a staging folder first and then into output_dir (`publish_files`): complete or absent.
    staged = os.path.join(training_args.output_dir, FINAL_STAGING_DIR)
    trainer.save_model(staged, _internal_call=True)  # the best model when load_best_model_at_end, with the tokenizer
    metrics = {**train_metrics, **trainer.evaluate(), "global_step": trainer.state.global_step}
    if not data_args.streaming:
        metrics["train_blocks"], metrics["eval_blocks"] = len(train_blocks), len(eval_blocks)
    if trainer.is_world_process_zero():
        with open(os.path.join(staged, "all_results.json"), "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=4, sort_keys=True)
        trainer.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
        run = training_run_info(model_args, data_args, training_args, metrics, prompt, trainer.state,
                                time_limit.stopped_at if time_limit else None)
        with open(os.path.join(staged, RUN_INFO_NAME), "w", encoding="utf-8") as f:
            json.dump(run, f, indent=2)
        write_model_card(staged, trainer.model, run, results_from_training(metrics),
                         repo_id=training_args.hub_model_id)  # default: the folder's name, as Trainer's cards
        publish_files(staged, training_args.output_dir)
    if training_args.push_to_hub:
        # Trainer.push_to_hub writes its generic card over README.md first; the run's own card stays instead
        trainer.create_model_card = lambda *args, **kwargs: None
        trainer.push_to_hub(commit_message="char_lstm training run")
    trainer.accelerator.wait_for_everyone()  # no process leaves while the main one still writes
    if trainer.is_world_process_zero():
        state = trainer.state
        if time_limit is not None and time_limit.stopped_at is not None:
            stopped = (f"Stopped by --max_train_seconds {time_limit.seconds:g} at step {time_limit.stopped_at} of "
                       f"{state.max_steps}" + (", its learning-rate schedule ended." if time_limit.schedule_over_time
                                               else "."))
        else:
            stopped = f"Training finished: {state.global_step} steps in {metrics.get('train_runtime', 0):.0f} s."
        print(run_summary(training_args.output_dir, stopped, metrics, prompt), flush=True)
    return metrics
