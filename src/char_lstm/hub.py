"""Loading (and, later, sharing) CharLSTM models: a model and its tokenizer go together."""

import os

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


MODEL_CARD_TEMPLATE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "model_cards", "char_lstm.md")


def _round(value, digits: int = 4):
    return round(float(value), digits) if value is not None else "n/a"


def write_model_card(output_dir: str, model, metrics: dict, dataset: str, training_args, data_args, prompt: str,
                     repo_id: str | None = None, license: str = "apache-2.0") -> str:
    """Render `model_cards/char_lstm.md` with the run's real hyperparameters and metrics into `output_dir/README.md`."""
    config = model.config
    if not os.path.isfile(MODEL_CARD_TEMPLATE):
        raise FileNotFoundError(
            f"The model card template {MODEL_CARD_TEMPLATE} is missing: install char_lstm from its repository "
            "(pip install -e .), which holds model_cards/."
        )
    with open(MODEL_CARD_TEMPLATE, encoding="utf-8") as f:
        template = f.read()
    is_hub_dataset = dataset is not None and not os.path.exists(dataset)
    scheduler = training_args.lr_scheduler_type
    scheduler = getattr(scheduler, "value", scheduler)
    if scheduler == "reduce_lr_on_plateau":
        kwargs = training_args.lr_scheduler_kwargs or {}
        scheduler = f"x{kwargs.get('factor', 0.1)} after {kwargs.get('patience', 10)} evaluations without improvement"
    values = {
        "license": license,
        "cell_type": config.cell_type,
        "cell_type_upper": config.cell_type.upper(),
        "datasets_yaml": f"datasets:\n- {dataset}\n" if is_hub_dataset else "",
        "model_name": repo_id or os.path.basename(os.path.abspath(output_dir)),
        "repo_id": repo_id or output_dir,
        "dataset": dataset if is_hub_dataset else os.path.basename(str(dataset)),
        "eval_loss": _round(metrics.get("eval_loss")),
        "bits_per_char": _round(metrics.get("eval_bits_per_char")),
        "perplexity": _round(metrics.get("eval_perplexity")),
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "embedding_size": config.embedding_size,
        "num_parameters": f"{model.num_parameters():,}",
        "vocab_size": config.vocab_size,
        "prompt": prompt,
        "train_blocks": metrics.get("train_blocks", "the"),
        "block_size": data_args.block_size,
        "validation": "its validation split" if data_args.validation_file or is_hub_dataset else
        f"the last {data_args.validation_split_percentage}% of the text",
        "dropout": config.dropout,
        "batch_size": training_args.per_device_train_batch_size,
        "optim": getattr(training_args.optim, "value", training_args.optim),
        "learning_rate": training_args.learning_rate,
        "lr_scheduler": scheduler,
        "max_grad_norm": training_args.max_grad_norm,
        "global_step": metrics.get("global_step", "n/a"),
        "precision": "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32",
        "seed": training_args.seed,
    }
    path = os.path.join(output_dir, "README.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(template.format(**values))
    return path
