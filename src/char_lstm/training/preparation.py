"""Everything a run needs before its Trainer (stages 1 to 3 of `train()`): the raw texts, the tokenizer and model,
and the blocks of ids."""

import logging
from dataclasses import replace

from transformers import AutoTokenizer

from ..configuration_char_lstm import CharLSTMConfig
from ..data import load_raw_datasets, resolve_dataset_name, split_validation_tail
from ..encoding import build_tokenizer, count_oov, encode_blocks, encode_streams
from ..errors import DataError
from ..loading import check_vocab_match, hub_cache_only
from ..modeling_char_lstm import CharLSTMForCausalLM
from .arguments import CharLSTMTrainingArguments, DataArguments, ModelArguments


logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# 1. Datasets


def load_datasets(data_args: DataArguments, training_args: CharLSTMTrainingArguments):
    """(data_args with the dataset actually used, training text, validation text): the raw datasets, the validation
    text cut from the end of the training text when there is no validation split."""
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
    return data_args, train_raw, eval_raw


# ---------------------------------------------------------------------------------------------------------------------
# 2. Tokenizer and model


def load_tokenizer_and_model(model_args: ModelArguments, data_args: DataArguments, train_raw):
    """The saved model and its tokenizer (`--model_name_or_path`), or a new model over a saved tokenizer
    (`--tokenizer_name`) or over a vocabulary built from the training text."""
    if model_args.model_name_or_path is not None:
        name = model_args.model_name_or_path
        model = CharLSTMForCausalLM.from_pretrained(name, local_files_only=hub_cache_only(name))
        name = model_args.tokenizer_name or name
        cache_only = hub_cache_only(name, None, "--tokenizer_name")
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=cache_only)
    else:
        if model_args.tokenizer_name is not None:
            name = model_args.tokenizer_name
            cache_only = hub_cache_only(name, None, "--tokenizer_name")
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=cache_only)
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


def warn_unknown_characters(tokenizer, model_args: ModelArguments, data_args: DataArguments, train_raw, eval_raw):
    """One warning per text with characters outside the vocabulary (they become <unk>)."""
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


# ---------------------------------------------------------------------------------------------------------------------
# 3. Blocks of ids


def encode_datasets(
    tokenizer, data_args: DataArguments, training_args: CharLSTMTrainingArguments, train_raw, eval_raw
):
    """(training blocks, validation blocks): windows of block_size + 1 ids, or with --stateful one stream per batch
    row of every process (see `stream_layout`); at most --max_eval_samples validation blocks."""
    kwargs = dict(
        tokenizer=tokenizer,
        column=data_args.text_column,
        block_size=data_args.block_size,
        separator=data_args.document_separator,
    )
    with training_args.main_process_first(desc="encoding"):
        if data_args.stateful:
            world = training_args.world_size
            train_streams = world * training_args.per_device_train_batch_size
            eval_streams = world * training_args.per_device_eval_batch_size
            train_blocks = encode_streams(train_raw, num_streams=train_streams, **kwargs)
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
            train_blocks, eval_blocks = encode_blocks(train_raw, **kwargs), encode_blocks(eval_raw, **kwargs)
    if data_args.streaming:
        if data_args.max_eval_samples is not None:  # the first blocks of the validation stream
            eval_blocks = eval_blocks.take(data_args.max_eval_samples)
        return train_blocks, eval_blocks
    window = data_args.block_size + 1
    for name, blocks in (("training", train_blocks), ("validation", eval_blocks)):
        if len(blocks) == 0:
            raise DataError(
                f"The {name} text is shorter than one block ({window} characters): use more text or a smaller "
                "--block_size."
            )
    most = data_args.max_eval_samples
    if not data_args.stateful and most is not None and len(eval_blocks) > most:
        eval_blocks = eval_blocks.select(range(data_args.max_eval_samples))
    logger.info(f"{len(train_blocks)} training blocks, {len(eval_blocks)} validation blocks of {window} ids")
    return train_blocks, eval_blocks
