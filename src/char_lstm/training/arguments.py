"""The arguments of a training run: the three dataclasses `scripts/train.py` parses (as run_clm.py's), the presets,
and the checks that run before anything is loaded."""

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, TrainingArguments
from transformers.hf_argparser import string_to_bool
from transformers.utils import is_torch_xla_available

from ..cli import parse_command_line, removed_in_v5
from ..configuration_char_lstm import CELL_TYPES
from ..errors import UsageError
from ..loading import check_model_path
from .defaults import check_evaluation_needs, config_field, follow_given_flags
from .runtime import native_bf16


logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    preset: str | None = field(
        default=None,
        metadata={"help": "Named settings for model and schedule: 'cpu-small' (learns in minutes on 2 CPU cores) or "
                  "'char-rnn' (the course's 2x512 recipe, for a GPU; 'seed' is its old name). Flags given on the "
                  "command line win."},
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Continue from a saved model (folder or Hub id); its tokenizer is reused."}
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Use this saved tokenizer instead of building one from the training text."}
    )
    embedding_size: int = config_field("embedding_size", "Character embedding size.")
    hidden_size: int = config_field("hidden_size", "Units per recurrent layer.")
    num_hidden_layers: int = config_field("num_hidden_layers", "Number of recurrent layers.")
    dropout: float = config_field("dropout", "Dropout between layers and before the head, in [0, 1).")
    cell_type: str = config_field("cell_type", f"The recurrent cell: {', '.join(CELL_TYPES)}.", choices=CELL_TYPES)
    adaptive_softmax: str = field(default="auto", metadata={"help": "Output layer for large vocabularies: 'auto' (an "
                                  "adaptive softmax above 1024 characters), 'off', or its cutoffs, e.g. '256,2048'."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default="karpathy/tiny_shakespeare",
        metadata={"help": "A Hub dataset id, or a local folder laid out like one. Ignored with --train_file."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration."})
    train_file: str | None = field(
        default=None,
        metadata={"help": "Training text: a text file of any extension, a folder (read recursively) or a glob "
                  "('src/**/*.c'); files that are not text are skipped. Or .jsonl/.json/.csv/.parquet files."},
    )
    validation_file: str | None = field(default=None, metadata={"help": "Validation text, same formats."})
    include: list[str] | None = field(
        default=None, metadata={"help": "In a folder or glob, read only the files matching these patterns ('*.c' "
                                "'*.h'; with a '/': the path inside the folder, e.g. 'drivers/*')."})
    exclude: list[str] | None = field(
        default=None, metadata={"help": "In a folder or glob, leave out the files matching these patterns."})
    max_vocab_size: int | None = field(
        default=None, metadata={"help": "Keep only the N most frequent characters of the training text (the rest "
                                "become <unk>; special tokens come on top)."})
    min_char_count: int = field(
        default=1, metadata={"help": "Characters that occur fewer times than this in the training text become <unk>."})
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
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Validation blocks read by each evaluation while training; when not given, a "
                                "fixed sample sized to cost ~5%% of the training time between two evaluations. It "
                                "does not bound the final evaluation: --final_eval_stderr does."})
    final_eval_stderr: float = field(
        default=0.005, metadata={"help": "The final evaluation reads a random sample of the validation blocks (the "
                                 "same for every run on the same text, at least 250k characters) until the eval "
                                 "loss's standard error is at most this many nats/char, or the whole split when it is "
                                 "reached first (its loss is then exact); 0 reads the whole validation split."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for encoding."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Encode again instead of using the cache."})
    streaming: bool = field(default=False, metadata={"help": "Stream the data (needs --max_steps)."})
    stateful: bool = field(
        default=False,
        metadata={"help": "Stateful truncated BPTT (char-rnn style): the text is read as batch-size contiguous "
                  "streams and each step starts from the previous step's final state, so the model learns "
                  "dependencies longer than one block. Evaluation reads its text the same way."},
    )


def _plateau_defaults() -> dict:
    return {"factor": 0.5, "patience": 3}


@dataclass
class CharLSTMTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the char-rnn recipe's defaults, plus sampling and output-directory safety."""

    output_dir: str | None = field(
        default="outputs/char-lstm", metadata={"help": "Where checkpoints and the model go."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start over in --output_dir: delete its checkpoints and the previous model's weights (its "
                  "other files are written over at the end)."},
    )
    learning_rate: float = field(default=2e-3, metadata={"help": "Adam learning rate."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Blocks per batch per device."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Blocks per eval batch per device."})
    num_train_epochs: float = field(default=50.0, metadata={"help": "Passes over the training blocks."})
    weight_decay: float = field(default=0.0, metadata={"help": "0 makes AdamW plain Adam, as in the char-rnn recipe."})
    lr_scheduler_type: str = field(
        default="reduce_lr_on_plateau", metadata={"help": "Default: multiply the LR by factor on eval-loss plateaus."}
    )
    lr_scheduler_kwargs: dict | str | None = field(
        default_factory=_plateau_defaults,
        metadata={
            "help": "For the plateau scheduler: factor and patience, e.g. '{\"factor\": 0.5, \"patience\": 3}'."
        },
    )
    eval_strategy: str = field(default="steps", metadata={"help": "Evaluate every --eval_steps."})
    eval_steps: float | None = field(default=250, metadata={"help": "Steps between evaluations."})
    save_steps: float = field(default=250, metadata={"help": "Steps between checkpoints."})
    save_total_limit: int | None = field(
        default=3, metadata={"help": "Checkpoints kept: the best (eval loss) and the latest ones."}
    )
    load_best_model_at_end: bool = field(
        default=True, metadata={"help": "Keep the checkpoint with the best eval loss."}
    )
    metric_for_best_model: str | None = field(
        default=None, metadata={"help": "Metric for the best checkpoint (TrainingArguments: loss, when it is kept)."}
    )
    logging_steps: float = field(default=50, metadata={"help": "Steps between training-loss logs."})
    logging_nan_inf_filter: bool = field(
        default=False, metadata={"help": "Keep NaN/inf losses visible in the logs (the divergence guard needs them)."}
    )
    batch_eval_metrics: bool = field(
        default=True, metadata={"help": "Sum the evaluation's metrics batch by batch (memory flat in the validation "
                                "text's size) instead of keeping one number per character until the end."}
    )
    sample_prompt: str | None = field(
        default=None, metadata={"help": "Prompt of the samples printed while training (default: the start of a "
                                "line of the validation text; 'ROMEO:' on tiny Shakespeare)."}
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
    early_stopping_patience: int | None = field(
        default=None,
        metadata={"help": "Stop training after this many evaluations without a better eval loss (transformers' "
                  "EarlyStoppingCallback; the best checkpoint is loaded at the end). Default: train to the end."},
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
        check_evaluation_needs(self)  # before Trainer's own checks, which are several lines
        if self.greater_is_better is None and self.metric_for_best_model is not None:
            # Trainer takes any metric whose name does not end in "loss" as higher-is-better
            metric = self.metric_for_best_model.removeprefix("eval_")
            if metric in LOWER_IS_BETTER:
                self.greater_is_better = False
        no_accelerator = self.use_cpu or not _accelerator_available()
        if self.fp16 and no_accelerator:
            # accelerate turns fp16 autocast off on a CPU: the run would be float32, recorded as fp16
            raise UsageError("--fp16 needs a GPU (on a CPU the run would be float32): drop it"
                             + (" or --use_cpu" if self.use_cpu and _accelerator_available() else "")
                             + ", or pass --bf16 "
                             + ("(this CPU computes bf16 natively)." if native_bf16("cpu") else
                                "(this CPU emulates bf16, slower than float32: float32 is the better choice here)."))
        if self.bf16 and no_accelerator:
            self.use_cpu = True  # Trainer refuses CPU bf16 without it ("Your setup doesn't support bf16/gpu")
        if self.lr_scheduler_type != "reduce_lr_on_plateau" and self.lr_scheduler_kwargs == _plateau_defaults():
            self.lr_scheduler_kwargs = {}
        if not torch.cuda.is_available():  # pinned memory only speeds up copies to a GPU (torch warns otherwise)
            self.dataloader_pin_memory = False
        super().__post_init__()


# Metrics logged at each evaluation (training/metrics.py) for which lower is better, as for the loss.
LOWER_IS_BETTER = frozenset({"loss", "bits_per_char", "perplexity"})


def _accelerator_available() -> bool:
    """Whether torch sees a GPU or another accelerator (CUDA, ROCm, MPS, XPU...)."""
    if is_torch_xla_available():  # a TPU: Trainer exempts it from its CPU checks too
        return True
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None:
        return accelerator.is_available()
    return torch.cuda.is_available() or torch.backends.mps.is_available()


# Presets: values for the three dataclasses' fields, applied as defaults (explicit flags win).
PRESETS = {
    # The CPU recipe, tuned for quality per CPU second on tiny_shakespeare (2 cores, docs/results.md): a 2x256 LSTM,
    # blocks of 64 (cheaper per character than 100 on CPU, and the length the test measure reads), 48 blocks per step
    # shared by the processes (48 // processes each), a cosine schedule that ends at 0, AdamW's weight decay against
    # the gap between training and held-out text, bf16 autocast where the hardware computes bf16 natively. Fastest on
    # 2 cores as 2 processes of 1 thread:
    # `accelerate launch --multi_gpu --num_processes 2 scripts/train.py --preset cpu-small`.
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
        # The time budget decides: the cosine schedule runs over the 155 s, so a faster machine turns its speed into
        # more steps (2 CPU cores: 2600-3700 steps, docs/results.md) and only a GPU-fast one reaches max_steps.
        "max_steps": 5000,
        "max_train_seconds": 155,
        "bf16": "auto",
        "eval_steps": 1000,
        "save_steps": 1000,
        # 31 loss lines (the first step's too): the points of training_curves.png, and a slow machine's run that
        # stops early still logs a few
        "logging_steps": 100,
        "logging_first_step": True,
    },
    # The char-rnn recipe of the course's model (the defaults, named).
    "char-rnn": {
        "embedding_size": 128,
        "hidden_size": 512,
        "num_hidden_layers": 2,
        "dropout": 0.5,
        "per_device_train_batch_size": 64,
        "num_train_epochs": 50,
    },
}


def parse_arguments(argv: list[str] | None = None):
    """(ModelArguments, DataArguments, CharLSTMTrainingArguments) from the command line or from one .json/.yaml file,
    with `--preset` values as defaults. Flags must be spelled out (no prefix matching: --learning_rat is an error).
    char_lstm's defaults that need evaluations follow the flags given (`defaults.follow_given_flags`: one info line,
    said by the main process)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, CharLSTMTrainingArguments), allow_abbrev=False)
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        given = read_config_file(argv[0], parser)
        preset = _preset_values(given.get("preset"))
        defaults = {action.dest: parser.get_default(action.dest) for action in parser._actions}
        followed, said = follow_given_flags({**defaults, **preset, **given}, set(given))
        parsed = parser.parse_dict({**preset, **followed, **given})
    else:
        pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        pre.add_argument("--preset", default=None)
        known, _ = pre.parse_known_args(argv)
        parser.set_defaults(**_preset_values(known.preset))
        given = given_on_command_line(parser, argv)
        values = {action.dest: given.get(action.dest, parser.get_default(action.dest)) for action in parser._actions}
        followed, said = follow_given_flags(values, set(given))
        parser.set_defaults(**followed)
        parsed = parse_command_line(parser, argv)
    if said and os.environ.get("RANK", "0") == "0":  # every process parses the same flags: the first one says it
        logger.info(said)
    return parsed


def given_on_command_line(parser: HfArgumentParser, argv: list[str]) -> dict:
    """The arguments `argv` gives, by name, with their values, however written (--name value, --name=value,
    --no_name); the defaults and presets are not in it. Unknown flags are left to `parse_command_line`."""
    unset = object()
    namespace = argparse.Namespace(**{action.dest: unset for action in parser._actions})
    given, _ = parser.parse_known_args(argv, namespace=namespace)  # --help, a bad value: argparse's own exit
    return {name: value for name, value in vars(given).items() if value is not unset}


def read_config_file(name: str, parser: HfArgumentParser) -> dict:
    """The arguments in a .json/.yaml config file, checked as the command line checks them: one-line errors naming
    the file for a syntax error, a file that is not a mapping, an unknown name or a value of the wrong type."""
    import yaml

    path = os.path.abspath(name)
    if not os.path.isfile(path):
        raise UsageError(f"Config file {name} does not exist.")
    kind = "JSON" if path.endswith(".json") else "YAML"
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f) if kind == "JSON" else yaml.safe_load(f)
    except json.JSONDecodeError as error:
        raise UsageError(f"Config file {name} is not valid JSON: {error.msg} at line {error.lineno}, column "
                        f"{error.colno}.") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or error
        raise UsageError(f"Config file {name} is not valid YAML: {problem}{where}.") from None
    except UnicodeDecodeError:
        raise UsageError(f"Config file {name} is not UTF-8 text.") from None
    if not isinstance(values, dict):
        raise UsageError(f"Config file {name} holds a {type(values).__name__}, not a mapping of argument names to "
                        "values (such as `learning_rate: 0.002`).")
    expected = {int: "an integer", float: "a number", string_to_bool: "true or false"}
    for key, value in values.items():
        action = parser._option_string_actions.get(f"--{key}")
        if action is None:
            removed = removed_in_v5(f"--{key}", parser)
            raise UsageError(f"Config file {name}: unknown argument {key!r} "
                             + (f"({removed})." if removed else "(python scripts/train.py --help lists them)."))
        if value is None or action.type not in expected:
            continue
        if action.type is string_to_bool:
            valid = isinstance(value, bool)
        else:
            valid = isinstance(value, int if action.type is int else (int, float)) and not isinstance(value, bool)
        if not valid:
            raise UsageError(f"Config file {name}: {key} must be {expected[action.type]}, got {value!r}.")
    return values


# Old preset names that still work, each said once to be deprecated: name -> the preset it now is.
RENAMED_PRESETS = {"seed": "char-rnn"}
_renames_said = set()


def _preset_values(name: str | None) -> dict:
    if name is None:
        return {}
    if name in RENAMED_PRESETS:
        if name not in _renames_said:
            _renames_said.add(name)
            logger.warning(f"--preset {name} is deprecated: it is now called {RENAMED_PRESETS[name]!r} (same values).")
        name = RENAMED_PRESETS[name]
    if name not in PRESETS:
        raise UsageError(f"Unknown --preset {name!r}; choose from {sorted(PRESETS)}.")
    values = dict(PRESETS[name])
    if "global_train_batch_size" in values:  # the same global batch under any number of processes
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        values["per_device_train_batch_size"] = max(1, values.pop("global_train_batch_size") // world_size)
    if values.get("bf16") == "auto":  # bf16 autocast where the hardware has it (Trainer needs use_cpu for CPU bf16)
        values["bf16"] = native_bf16()
        if values["bf16"] and not torch.cuda.is_available():
            values["use_cpu"] = True
    return values


def check_arguments(model_args: ModelArguments, data_args: DataArguments, training_args: CharLSTMTrainingArguments):
    """One-line errors for arguments that cannot work together, before the output folder or the data are touched."""
    if os.path.exists(training_args.output_dir) and not os.path.isdir(training_args.output_dir):
        raise UsageError(f"--output_dir {training_args.output_dir} is a file, not a folder: choose a folder (it is "
                         "created if it does not exist).")
    if data_args.streaming and training_args.max_steps <= 0:
        raise UsageError("--streaming needs --max_steps (the length of a stream is not known in advance).")
    if data_args.max_vocab_size is not None and data_args.max_vocab_size < 1:
        raise UsageError(f"--max_vocab_size must be at least 1 character, got {data_args.max_vocab_size}.")
    if data_args.min_char_count < 1:
        raise UsageError(f"--min_char_count must be at least 1, got {data_args.min_char_count}.")
    if data_args.stateful:
        if data_args.streaming:
            raise UsageError("--stateful lays the whole text out as streams and needs its length: drop --streaming.")
        if data_args.stride is not None and data_args.stride != data_args.block_size:
            raise UsageError("--stateful reads each stream window after window: drop --stride (it is --block_size).")
        if training_args.auto_find_batch_size:
            raise UsageError("--stateful lays out one stream per batch row: drop --auto_find_batch_size.")
        if training_args.n_gpu > 1:
            raise UsageError(
                "--stateful needs one process per GPU (DataParallel splits the batch rows): launch with "
                "`accelerate launch --multi_gpu --num_processes N` instead."
            )
    if training_args.early_stopping_patience is not None:
        if training_args.early_stopping_patience < 1:
            raise UsageError(f"--early_stopping_patience must be at least 1, got "
                             f"{training_args.early_stopping_patience}.")
        if str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy)) == "no":
            raise UsageError("--early_stopping_patience needs evaluations: drop --eval_strategy no.")
    if model_args.model_name_or_path is not None:  # a mistyped folder is said now, not after loading the data
        check_model_path(model_args.model_name_or_path)
