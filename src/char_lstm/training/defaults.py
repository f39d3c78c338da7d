"""char_lstm's defaults: the model's are its config's, and those that need evaluations and checkpoints follow the
user's own flags.

The model's defaults (--embedding_size, --hidden_size, --cell_type...) are written once, as the defaults of
`CharLSTMConfig.__init__`: `ModelArguments` takes its fields' defaults from there (`config_field`), and a run builds
its config from the fields the config takes (`config_arguments`).

Two of char_lstm's defaults are not transformers': keeping the best checkpoint (`--load_best_model_at_end true`,
which needs every checkpoint evaluated) and the plateau learning-rate schedule (`--lr_scheduler_type
reduce_lr_on_plateau`, which needs evaluations). Where the flags the user gave leave them without what they need
(`--eval_strategy no`, `--save_strategy no` or `epoch`, `--eval_steps` that do not divide the checkpoint steps...),
the defaults the user did not give turn into transformers' own (no reload of the best checkpoint; the linear schedule,
transformers' default, which run_clm.py trains with), said in one info line (`follow_given_flags`). Only a flag the
user gave that cannot work with the others is refused, in one line (`check_evaluation_needs`)."""

import dataclasses
import inspect

from ..configuration_char_lstm import CharLSTMConfig
from ..errors import UsageError


def config_default(name: str):
    """The default of `CharLSTMConfig`'s argument `name` (the one place the model's defaults are written)."""
    parameter = inspect.signature(CharLSTMConfig.__init__).parameters.get(name)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        raise TypeError(f"CharLSTMConfig has no argument {name!r} with a default: name one of its arguments.")
    return parameter.default


def config_field(name: str, help: str, **metadata):
    """A `ModelArguments` field for `CharLSTMConfig`'s argument `name`, whose default is the config's (--help shows
    it); `metadata` goes to argparse with the help (e.g. `choices`)."""
    return dataclasses.field(default=config_default(name), metadata={"help": help, **metadata})


def config_arguments(model_args) -> dict:
    """The fields of `model_args` (`ModelArguments`) that `CharLSTMConfig` takes, by name: the model the flags give."""
    accepted = inspect.signature(CharLSTMConfig.__init__).parameters
    return {field.name: getattr(model_args, field.name) for field in dataclasses.fields(model_args)
            if field.name in accepted}


# The schedules that step on evaluations (transformers refuses them without).
EVALUATED_SCHEDULES = {"reduce_lr_on_plateau": "the plateau schedule", "greedy": "the greedy schedule"}
# What a followed plateau schedule becomes: TrainingArguments' default, the schedule of run_clm.py's runs.
NO_EVALUATION_SCHEDULE = "linear"


def name_of(value) -> str:
    """The name of a strategy or schedule, given as a string or as transformers' enum."""
    return str(getattr(value, "value", value))


def steps_evaluated(eval_steps: float, save_steps: float) -> bool:
    """Whether every checkpoint (every `save_steps`) falls on an evaluation (every `eval_steps`), as transformers
    checks it: steps or fractions of the run, not a mix of the two."""
    if eval_steps >= 1 and save_steps >= 1:
        return save_steps % eval_steps == 0
    if eval_steps < 1 and save_steps < 1:
        return round(save_steps * 1_000_000) % round(eval_steps * 1_000_000) == 0
    return False


def _steps(steps: float) -> str:
    """`steps` as the run's interval: "250 steps", or "0.25 of the run" (a fraction of the training steps)."""
    return f"{steps:g} steps" if steps >= 1 else f"{steps:g} of the run"


def _unevaluated_checkpoints(values: dict, given: set[str]) -> tuple[str, str, str] | None:
    """(the flags, what they leave out, how to keep the best) when checkpoints are saved that are not evaluated, or
    none are saved; None when every checkpoint is evaluated (or with --save_strategy best, which saves at
    evaluations)."""
    eval_strategy, save_strategy = name_of(values["eval_strategy"]), name_of(values["save_strategy"])
    if save_strategy == "best":
        return None
    if save_strategy == "no":
        return "--save_strategy no", "checkpoints", ""
    if eval_strategy != save_strategy:
        first, other = ("save", "eval") if "save_strategy" in given else ("eval", "save")
        strategies = {"eval": eval_strategy, "save": save_strategy}
        hint = ("; pass the same --eval_strategy and --save_strategy to keep the best"
                if {"eval_strategy", "save_strategy"} <= given
                else f"; pass --{other}_strategy {strategies[first]} too to keep the best")
        flags = f"--{first}_strategy {strategies[first]} with --{other}_strategy {strategies[other]}"
        return flags, "every checkpoint evaluated", hint
    eval_steps, save_steps = values["eval_steps"] or values["logging_steps"], values["save_steps"]  # as transformers
    if eval_strategy != "steps" or steps_evaluated(eval_steps, save_steps):
        return None
    if "eval_steps" in given:
        flags = f"--eval_steps {eval_steps:g} with checkpoints every {_steps(save_steps)}"
        hint = f"; pass --save_steps {eval_steps:g} (or a multiple) to keep the best"
    else:
        flags = f"--save_steps {save_steps:g} with evaluations every {_steps(eval_steps)}"
        hint = f"; pass --eval_steps {save_steps:g} (or a divisor of it) to keep the best"
    return flags, "every checkpoint evaluated", hint


def follow_given_flags(values: dict, given: set[str]) -> tuple[dict, str | None]:
    """The defaults that follow the flags given: (new values for arguments not in `given`, the info line that says
    so), or ({}, None). `values`: every argument's value (given, from a preset or the default), by name."""
    eval_strategy = name_of(values["eval_strategy"])
    if eval_strategy == "no":
        cause = "--eval_strategy no", "evaluations", ""
    else:
        cause = _unevaluated_checkpoints(values, given)
    if cause is None:
        return {}, None
    changes, said = {}, []
    if values["load_best_model_at_end"] and "load_best_model_at_end" not in given:
        changes["load_best_model_at_end"] = False
        said.append("the final model is the last one, not the best (--load_best_model_at_end false)")
    scheduler = name_of(values["lr_scheduler_type"])
    # --lr_scheduler_kwargs given configures the schedule: it stays, and is refused with the flag that rules it out
    if (eval_strategy == "no" and scheduler in EVALUATED_SCHEDULES
            and not given & {"lr_scheduler_type", "lr_scheduler_kwargs"}):
        changes["lr_scheduler_type"] = NO_EVALUATION_SCHEDULE
        said.append(f"the learning rate decays linearly to 0 (--lr_scheduler_type {NO_EVALUATION_SCHEDULE}, "
                    f"transformers' default) instead of at eval-loss plateaus")
    if not changes:
        return {}, None
    if eval_strategy == "no" and values["early_stopping_patience"] is not None:
        return changes, None  # the run is refused (check_arguments: early stopping needs evaluations): nothing to say
    flags, needed, hint = cause
    defaults = "default that needs" if len(said) == 1 else "defaults that need"
    off = "is off" if len(said) == 1 else "are off"
    return changes, f"{flags}: char_lstm's {defaults} {needed} {off}: {', and '.join(said)}{hint}."


def check_evaluation_needs(args) -> None:
    """One-line errors for settings of `args` (TrainingArguments) that need evaluations or checkpoints they will not
    get. From the command line these are flags the user gave (the defaults follow them: `follow_given_flags`);
    Trainer's own messages are several lines, one flag at a time, and name no fix."""
    eval_strategy, save_strategy = name_of(args.eval_strategy), name_of(args.save_strategy)
    if eval_strategy == "no":  # (--early_stopping_patience: check_arguments)
        scheduler = name_of(args.lr_scheduler_type)
        needing = [(flag, what) for flag, what, on in [
            ("--load_best_model_at_end true", "keeping the best checkpoint", args.load_best_model_at_end),
            (f"--lr_scheduler_type {scheduler}", EVALUATED_SCHEDULES.get(scheduler), scheduler in EVALUATED_SCHEDULES),
            (f"--metric_for_best_model {args.metric_for_best_model}", "a metric for the best checkpoint",
             args.metric_for_best_model is not None),
            ("--save_strategy best", "saving the best checkpoints", save_strategy == "best"),
        ] if on]
        if needing:
            one = len(needing) == 1
            raise UsageError(
                f"--eval_strategy no with {' and '.join(flag for flag, _ in needing)}: "
                f"{' and '.join(what for _, what in needing)} need{'s' if one else ''} evaluations; drop "
                f"{'it' if one else 'them'} or --eval_strategy no.")
        return
    if not args.load_best_model_at_end or save_strategy == "best":
        return
    if save_strategy == "no":
        raise UsageError("--save_strategy no with --load_best_model_at_end true: keeping the best checkpoint needs "
                         "checkpoints; drop one of the two.")
    if save_strategy != eval_strategy:
        raise UsageError(
            f"--save_strategy {save_strategy} with --eval_strategy {eval_strategy} and --load_best_model_at_end true: "
            f"keeping the best checkpoint needs every checkpoint evaluated; evaluate and save alike (--eval_strategy "
            f"{save_strategy} or --save_strategy {eval_strategy}), or drop --load_best_model_at_end.")
    eval_steps = args.eval_steps or args.logging_steps
    if eval_strategy == "steps" and not steps_evaluated(eval_steps, args.save_steps):
        raise UsageError(
            f"--save_steps {args.save_steps:g} is not a multiple of --eval_steps {eval_steps:g} and "
            f"--load_best_model_at_end true: keeping the best checkpoint needs every checkpoint evaluated; pass "
            f"--save_steps {eval_steps:g} (or a multiple), or drop --load_best_model_at_end.")
