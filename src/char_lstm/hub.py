"""Loading (and, later, sharing) CharLSTM models: a model and its tokenizer go together."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase


def check_vocab_match(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """Raise a one-line ValueError when `tokenizer` cannot be the tokenizer `config`'s model was trained with."""
    if len(tokenizer) != config.vocab_size:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}: they were not "
            "saved together; load the tokenizer from the model's own folder (or resize the model's embeddings)."
        )
    for name in ("pad_token_id", "unk_token_id"):
        model_id, tokenizer_id = getattr(config, name, None), getattr(tokenizer, name, None)
        if model_id is not None and tokenizer_id is not None and model_id != tokenizer_id:
            raise ValueError(
                f"The tokenizer's {name} is {tokenizer_id} but the model's is {model_id}: they were not saved together; "
                "load the tokenizer from the model's own folder."
            )


def load_model_and_tokenizer(
    name_or_path: str,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
):
    """Load a saved CharLSTM model (local folder or Hub id) with its tokenizer, checked to match, in eval mode."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, revision=revision, dtype=dtype, trust_remote_code=trust_remote_code
    )
    check_vocab_match(model.config, tokenizer)
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer
