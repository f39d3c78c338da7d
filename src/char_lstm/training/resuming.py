"""Resuming a run: the checkpoint must hold the model this run builds, and a run that had already ended is finished
from its last checkpoint without training."""

import copy
import dataclasses
import inspect
import json
import os

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import TrainerState
from transformers.utils import CONFIG_NAME

from ..errors import UsageError
from .arguments import ModelArguments


def weight_shapes(model_class, config) -> dict[str, tuple[int, ...]]:
    """The name and shape of every weight a `model_class` built from `config` has, built on the meta device (no
    memory, no initialization): the model itself says which of its config's fields shape its weights."""
    with torch.device("meta"):
        model = model_class(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def _field_order(config) -> list[str]:
    """The config's own fields in the order its class lists them (for messages that read the same every time)."""
    parameters = inspect.signature(type(config).__init__).parameters.values()
    names = [p.name for p in parameters if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD]
    return names + sorted(set(config.to_dict()) - set(names))


def shaping_differences(model, saved: dict) -> list[str]:
    """The fields of the saved config `saved` that give its model other weights than `model`'s (each one alone
    changes the weights' names or shapes; all differing fields when only their combination does); [] when the
    saved model's weights have the names and shapes of `model`'s."""
    model_class, config = type(model), model.config
    now = weight_shapes(model_class, config)
    saved_config = copy.deepcopy(config)
    differ = []
    for name in _field_order(config):
        if name in saved and saved[name] != getattr(config, name, None) and not name.startswith("_"):
            setattr(saved_config, name, saved[name])
            differ.append(name)
    try:
        if weight_shapes(model_class, saved_config) == now:
            return []
    except (ValueError, TypeError, KeyError):  # a config this code cannot build: it differs somehow
        pass
    shaping = []
    for name in differ:
        alone = copy.deepcopy(config)
        setattr(alone, name, saved[name])
        try:
            if weight_shapes(model_class, alone) != now:
                shaping.append(name)
        except (ValueError, TypeError, KeyError):  # e.g. tied embeddings with another hidden size
            shaping.append(name)
    return shaping or differ


def _flag(name: str, value) -> str | None:
    """The train.py flag that sets config field `name` to `value`, or None when no flag sets it."""
    if name == "adaptive_softmax_cutoffs":
        return "--adaptive_softmax " + (",".join(str(cutoff) for cutoff in value) if value else "off")
    if name in {field.name for field in dataclasses.fields(ModelArguments)}:
        return f"--{name} {value}"
    return None


def check_resume_matches(checkpoint: str, model, started_from: str | None = None) -> None:
    """One line when the model this run builds (its flags, its vocabulary, or the saved model `started_from`, its
    --model_name_or_path) has other weights than the one `checkpoint` holds, instead of Trainer's warnings of missing
    and unexpected keys and the optimizer's size mismatch. Which config fields matter is derived from the model
    (`shaping_differences`): the output layer's kind and cutoffs as much as the layers' sizes."""
    try:
        with open(os.path.join(checkpoint, CONFIG_NAME), encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return  # checkpoint_problem has looked at the folder; Trainer reports what is left
    differ = shaping_differences(model, saved)
    if not differ:
        return
    config = model.config
    said = ", ".join(f"{name} {saved[name]} (this run: {getattr(config, name, None)})" for name in differ)
    fixes = []
    if started_from is not None:  # the shape and the vocabulary come from that model, not from the flags
        fixes.append(f"start from the model the run started from (--model_name_or_path {started_from} is another)")
    else:
        flags = [_flag(name, saved[name]) for name in differ]
        if any(flags):
            fixes.append("pass " + " ".join(flag for flag in flags if flag))
        if "vocab_size" in differ:
            fixes.append(f"pass --tokenizer_name {checkpoint} (its vocabulary)")
    fix = f"to resume, {' and '.join(fixes)}; or " if fixes else "it cannot be resumed by this run: "
    raise UsageError(f"{checkpoint} holds a model with {said}: {fix}start over with --overwrite_output_dir, or choose "
                     "another --output_dir.")


def restore_finished_run(trainer: Trainer, checkpoint: str) -> dict:
    """Leave `trainer` as `trainer.train()` leaves it at the end of the run that `checkpoint` ends (its state, its
    weights, or the best checkpoint's with --load_best_model_at_end), without training; returns the train metrics."""
    trainer.state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
    trainer._load_from_checkpoint(checkpoint)
    best = trainer.state.best_model_checkpoint
    if trainer.args.load_best_model_at_end and best is not None and os.path.isdir(best):
        trainer._load_best_model()
    return {"epoch": trainer.state.epoch}


def finished_at(checkpoint: str, args: TrainingArguments) -> int | None:
    """The step of `checkpoint` when it already ends the run (--max_steps, or the run's own length), else None."""
    with open(os.path.join(checkpoint, TRAINER_STATE_NAME), encoding="utf-8") as f:
        state = json.load(f)
    target = args.max_steps if args.max_steps > 0 else state.get("max_steps") or 0
    return state["global_step"] if target and state["global_step"] >= target else None
