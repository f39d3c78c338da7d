"""Loading a saved CharLSTM model: the device and dtype to load it on, one-line errors for a path that cannot work,
and the check that a model and its tokenizer belong together."""

import difflib
import functools
import logging
import os

import torch
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import CONFIG_NAME

from .data import hub_unreachable_reason


logger = logging.getLogger(__name__)


def pick_device(name: str = "auto") -> torch.device:
    """The device called `name` ("auto": cuda, then mps, then cpu), or a one-line ValueError when there is none: the
    one device choice of the scripts, the evaluation and the benchmarks."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"--device {name!r} is not a device: use auto, cpu, cuda, cuda:N or mps.") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this machine has no CUDA GPU that torch can use; use --device cpu (or "
                             "auto).")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA GPU(s).")
        if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"--device {name}: MPS (Apple GPU) is not available here; use --device cpu (or auto).")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str):
    if name == "auto":
        return "auto"
    if name not in DTYPES:
        raise ValueError(f"--dtype must be auto or one of {sorted(DTYPES)}, got {name!r}.")
    return DTYPES[name]


def check_vocab_match(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """Raise a one-line ValueError when `tokenizer` cannot be the tokenizer `config`'s model was trained with."""
    if len(tokenizer) != config.vocab_size:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}: they were "
            "not saved together; load the tokenizer from the model's own folder (or resize the model's embeddings)."
        )
    for name in ("pad_token_id", "unk_token_id"):
        model_id, tokenizer_id = getattr(config, name, None), getattr(tokenizer, name, None)
        if model_id is not None and tokenizer_id is not None and model_id != tokenizer_id:
            raise ValueError(
                f"The tokenizer's {name} is {tokenizer_id} but the model's is {model_id}: they were not saved "
                "together; load the tokenizer from the model's own folder."
            )


def _is_local_path(name_or_path: str) -> bool:
    """Whether `name_or_path` can only mean a folder: an absolute or ./ path, a name that is no valid Hub id, or
    `parent/name` where `parent` is a folder here (outputs/shakespear)."""
    if os.path.isabs(name_or_path) or name_or_path.startswith((".", "~")):
        return True
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return True
    parent = os.path.dirname(name_or_path)
    return bool(parent) and os.path.isdir(parent)


def missing_folder_message(path: str, option: str) -> str:
    """`OPTION PATH does not exist`, with the closest existing folder next to it when there is one."""
    parent = os.path.dirname(os.path.normpath(path)) or "."
    if not os.path.isdir(parent):
        return f"{option} {path} does not exist (nor does the folder {parent})."
    folders = [name for name in os.listdir(parent) if os.path.isdir(os.path.join(parent, name))]
    close = difflib.get_close_matches(os.path.basename(os.path.normpath(path)), folders, n=1, cutoff=0.6)
    hint = f" did you mean {os.path.join(parent, close[0]) if parent != '.' else close[0]}?" if close else ""
    return f"{option} {path} does not exist;{hint or ' give the --output_dir of a training run.'}"


@functools.lru_cache
def _hub_unreachable_and_cached(repo_id: str, revision: str | None) -> tuple[str | None, bool]:
    """Why the Hub cannot give `repo_id` (None: it can), and whether its config is in the cache; asked once a
    process."""
    reason = hub_unreachable_reason(repo_id, repo_type="model")
    cached = reason is not None and isinstance(try_to_load_from_cache(repo_id, CONFIG_NAME, revision=revision), str)
    if cached and reason != "HF_HUB_OFFLINE is set":  # in offline mode transformers goes to the cache by itself
        logger.info(f"The Hub cannot be reached ({reason}): loading {repo_id} from the Hugging Face cache.")
    return reason, cached


def hub_cache_only(name_or_path: str, revision: str | None = None, option: str = "--model_name_or_path") -> bool:
    """Whether the model `name_or_path` must be loaded from the Hugging Face cache alone (`local_files_only=True`):
    a Hub id while the Hub cannot be reached, asked with one 5 s request (`from_pretrained` alone retries for over a
    minute before it looks in the cache). In the cache neither: a one-line OSError now. False for a local folder."""
    if os.path.isdir(name_or_path):
        return False
    reason, cached = _hub_unreachable_and_cached(name_or_path, revision)
    if reason is not None and not cached:
        raise OSError(f"{option} {name_or_path} is no folder here, and it cannot be downloaded from the Hub "
                      f"({reason}) nor found in the Hugging Face cache: check the name, or give the folder of a saved "
                      "model.")
    return reason is not None


def check_model_path(name_or_path: str, option: str = "--model_name_or_path") -> None:
    """One-line errors, before anything is loaded, for a model path that cannot work: a local folder that does not
    exist (with the closest existing one), a folder of checkpoints without a final model (with the latest checkpoint),
    a folder that is no saved model, a Hub id that can neither be downloaded nor found in the cache."""
    path = os.fspath(name_or_path)
    if not os.path.isdir(path):
        if _is_local_path(path):
            raise OSError(missing_folder_message(path, option))
        hub_cache_only(path, option=option)
        return
    if os.path.isfile(os.path.join(path, "config.json")):
        return
    last = get_last_checkpoint(path)
    if last is not None:
        raise OSError(
            f"{option} {path} holds checkpoints but no final model (its training run stopped before the end): use the "
            f"latest checkpoint, {option} {last}, or resume the run with --resume_from_checkpoint True."
        )
    raise OSError(f"{option} {path} has no config.json: it is not a saved model; give the --output_dir of a "
                  "training run.")


def load_model_and_tokenizer(
    name_or_path: str,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
):
    """Load a saved CharLSTM model (local folder or Hub id) with its tokenizer, checked to match, in eval mode."""
    check_model_path(name_or_path)
    cache_only = hub_cache_only(os.fspath(name_or_path), revision)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code,
                                              local_files_only=cache_only)
    # modeling_utils' table of weights that do not fit: the one line below instead. With that logger above WARNING,
    # transformers also checks the (empty) tensor-parallel plan and warns that no layer is sharded: silenced too.
    quiet = [logging.getLogger(f"transformers.{name}") for name in ("modeling_utils", "distributed.tensor_parallel")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            name_or_path, revision=revision, dtype=dtype, trust_remote_code=trust_remote_code,
            ignore_mismatched_sizes=True, output_loading_info=True, local_files_only=cache_only,
        )
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
    if info["mismatched_keys"]:
        key, saved, expected = min(info["mismatched_keys"], key=lambda mismatch: mismatch[0])
        raise ValueError(
            f"The weights in {name_or_path} do not fit its config.json: {key} is saved with shape {tuple(saved)} but "
            f"the config makes it {tuple(expected)} ({len(info['mismatched_keys'])} weights differ); the config was "
            "edited or belongs to another model: save the model and its config together (model.save_pretrained)."
        )
    for kind in ("missing_keys", "unexpected_keys"):
        if info[kind]:
            logger.warning(f"{name_or_path}: {kind.replace('_', ' ')} in the weights: {sorted(info[kind])[:6]}")
    check_vocab_match(model.config, tokenizer)
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer
