"""Everything a run needs before its Trainer (stages 1 to 3 of `train()`): the raw texts, the tokenizer and model,
and the blocks of ids."""

import logging
from dataclasses import replace

import numpy as np
from accelerate.utils import broadcast_object_list
from datasets import IterableDataset
from transformers import AutoTokenizer

from ..cache import cache_root, cached_step, dataset_bytes, preparation_needs, space_reported, step_folder, text_bytes
from ..configuration_char_lstm import CharLSTMConfig
from ..data import BUNDLED_DATASET, DEFAULT_DATASET, load_raw_datasets, resolve_dataset_name, split_validation_tail
from ..encoding import count_characters, encode_blocks, vocabulary_from_counts
from ..errors import DataError, UsageError
from ..loading import check_vocab_match, hub_cache_only
from ..modeling_char_lstm import CharLSTMForCausalLM
from ..streams import encode_streams
from .arguments import CharLSTMTrainingArguments, DataArguments, ModelArguments
from .callbacks import default_sample_prompt
from .defaults import config_arguments
from .final import evaluation_order


logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# 1. Datasets


def load_datasets(data_args: DataArguments, training_args: CharLSTMTrainingArguments):
    """(data_args with the dataset actually used, training text, validation text): the raw datasets, the validation
    text cut from the end of the training text when there is no validation split. Their cache is sound, or made
    again (--overwrite_cache: always, by the local main process); a full disk is one line with what the preparation
    needs (`cache.CacheFull`)."""
    if data_args.train_file is None:  # karpathy/tiny_shakespeare without Hub access: the bundled copy
        data_args = replace(
            data_args, dataset_name=resolve_dataset_name(data_args.dataset_name, data_args.dataset_config_name)
        )

    def needs() -> str | None:  # about what the rows of the text files and their blocks (or streams) take
        size = text_bytes([data_args.train_file, data_args.validation_file], data_args.include, data_args.exclude)
        return preparation_needs(size, data_args.block_size, data_args.stride, data_args.stateful)

    with training_args.main_process_first(desc="loading the data"), space_reported("the rows of the text",
                                                                                   cache_root(), needs):
        raw = load_raw_datasets(
            dataset_name=None if data_args.train_file else data_args.dataset_name,
            dataset_config_name=data_args.dataset_config_name,
            train_file=data_args.train_file,
            validation_file=data_args.validation_file,
            text_column=data_args.text_column,
            encoding=data_args.encoding,
            streaming=data_args.streaming,
            include=data_args.include,
            exclude=data_args.exclude,
            num_proc=data_args.preprocessing_num_workers,
            overwrite_cache=data_args.overwrite_cache and training_args.local_process_index == 0,
        )
        train_raw, eval_raw = raw["train"], raw.get("validation")
        if eval_raw is None:
            if data_args.streaming:
                raise DataError("--streaming needs a validation split or --validation_file.")
            train_raw, eval_raw = cached_step(lambda rows=train_raw: split_validation_tail(
                rows, data_args.text_column, data_args.validation_split_percentage), "the validation split",
                step_folder(train_raw))
    return data_args, train_raw, eval_raw


def is_default_corpus(data_args: DataArguments) -> bool:
    """Whether the run trains on tiny Shakespeare (from the Hub or the bundled copy)."""
    return data_args.train_file is None and data_args.dataset_name in (DEFAULT_DATASET, BUNDLED_DATASET)


def count_training_characters(data_args: DataArguments, training_args: CharLSTMTrainingArguments, train_raw):
    """How often each character occurs in the training text (`count_characters`: one pass, kept in the `datasets`
    cache), which gives the vocabulary, the characters outside it and the unigram baseline. A streamed text is read
    to its end for it (as it always was to build a vocabulary), by the main process only: the others get its counts
    and read only their own part of the text, to train on."""
    if data_args.streaming and training_args.world_size > 1:
        counts = [count_characters(train_raw, data_args.text_column) if training_args.process_index == 0 else None]
        return broadcast_object_list(counts, from_process=0)[0]
    with training_args.main_process_first(desc="counting characters"):
        return count_characters(train_raw, data_args.text_column, data_args.preprocessing_num_workers)


def shard_the_stream(training_args: CharLSTMTrainingArguments, train_blocks) -> None:
    """With --streaming and several processes, each process reads its own shards of the training text (a file, or a
    part of a large one: `datasets` shards, dealt out by accelerate) instead of the main process reading all of it
    and sending the batches out (accelerate's default for a stream). A text with fewer shards than processes is
    read by the main process, as before, said in one line."""
    world = training_args.world_size
    if world <= 1 or not isinstance(train_blocks, IterableDataset):
        return
    if train_blocks.n_shards >= world:
        training_args.accelerator_config.dispatch_batches = False
    elif training_args.process_index == 0:
        logger.info(f"--streaming: the training text has {train_blocks.n_shards} part(s) for {world} processes, so "
                    "the main process reads it and sends each process its batches (more files, or larger ones, "
                    "let every process read its own part).")


# ---------------------------------------------------------------------------------------------------------------------
# 2. Tokenizer and model


def load_tokenizer_and_model(model_args: ModelArguments, data_args: DataArguments, train_counts: dict[str, int],
                             training_args: CharLSTMTrainingArguments | None = None):
    """The saved model and its tokenizer (`--model_name_or_path`), or a new model over a saved tokenizer
    (`--tokenizer_name`) or over a vocabulary built from the training text's character counts."""
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
            vocab_args = (train_counts, data_args.document_separator, data_args.max_vocab_size,
                          data_args.min_char_count)
            tokenizer, left_out = vocabulary_from_counts(*vocab_args)
            if adaptive_cutoffs(model_args.adaptive_softmax, len(tokenizer)) is not None:
                tokenizer, _ = vocabulary_from_counts(*vocab_args, by_frequency=True)  # ids by frequency
            if left_out:
                _say_left_out(left_out, train_counts, data_args)
        cutoffs = adaptive_cutoffs(model_args.adaptive_softmax, len(tokenizer), say=True)
        config = CharLSTMConfig(
            **config_arguments(model_args),  # --embedding_size, --hidden_size, --cell_type...
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            unk_token_id=tokenizer.unk_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            adaptive_softmax_cutoffs=cutoffs,
        )
        model = CharLSTMForCausalLM(config)
    check_vocab_match(model.config, tokenizer)
    if model.config.adaptive_softmax_cutoffs and training_args is not None and training_args.label_smoothing_factor:
        raise UsageError("--label_smoothing_factor smooths over the logits of the full softmax, which an adaptive "
                         "softmax does not compute in training: pass --adaptive_softmax off, or drop it.")
    return tokenizer, model


def run_sample_prompt(tokenizer, data_args: DataArguments, training_args: CharLSTMTrainingArguments, eval_raw) -> str:
    """--sample_prompt, or the default one (`default_sample_prompt`); characters outside the vocabulary are one
    line. It is also the prompt the stop messages suggest sampling with: one the model knows."""
    prompt = training_args.sample_prompt or default_sample_prompt(tokenizer, eval_raw, data_args.text_column,
                                                                  is_default_corpus(data_args))
    if tokenizer.oov_characters(prompt):
        raise UsageError(
            f"--sample_prompt {prompt!r} has characters outside the vocabulary: {tokenizer.oov_characters(prompt)}."
        )
    return prompt


# Vocabularies above this many tokens get an adaptive softmax with --adaptive_softmax auto (the default).
ADAPTIVE_MIN_VOCAB = 1024


def adaptive_cutoffs(setting: str, vocab_size: int, say: bool = False) -> list[int] | None:
    """The cutoffs of the adaptive softmax for `--adaptive_softmax` (`auto`, `off` or cutoffs such as `256,2048`),
    or None for the full softmax. `auto`: 256 (the frequent characters get the full layer) and, above 4096 tokens,
    2048 too, for vocabularies of more than `ADAPTIVE_MIN_VOCAB` tokens (then said in one info line with `say`)."""
    setting = setting.strip().lower()
    if setting == "off" or (setting == "auto" and vocab_size <= ADAPTIVE_MIN_VOCAB):
        return None
    if setting == "auto":
        cutoffs = [256, 2048] if vocab_size > 4096 else [256]
        if say:
            logger.info(f"{vocab_size} tokens: the output layer is an adaptive softmax (cutoffs {cutoffs}: the 256 "
                        "most frequent characters get the full layer, the rarer ones narrower clusters), several "
                        "times cheaper than one layer over the whole vocabulary; --adaptive_softmax off for that.")
        return cutoffs
    try:
        cutoffs = [int(part) for part in setting.split(",") if part.strip()]
    except ValueError:
        cutoffs = None
    if not cutoffs or cutoffs != sorted(set(cutoffs)) or cutoffs[0] < 1 or cutoffs[-1] >= vocab_size - 1:
        raise UsageError(f"--adaptive_softmax {setting!r}: use auto, off, or increasing cutoffs below the vocabulary "
                         f"size minus 1 ({vocab_size - 1}), e.g. 256,2048.")
    return cutoffs


def _say_left_out(left_out: dict[str, int], counts: dict[str, int], data_args: DataArguments) -> None:
    """One info line: the characters --max_vocab_size / --min_char_count leave out and the share of text they are."""
    share = sum(left_out.values()) / max(1, sum(counts.values()))
    rule = " and ".join(flag for flag, on in (
        (f"--max_vocab_size {data_args.max_vocab_size}", data_args.max_vocab_size is not None),
        (f"--min_char_count {data_args.min_char_count}", data_args.min_char_count > 1)) if on)
    rarest = "".join(sorted(left_out, key=lambda c: -left_out[c])[:20])
    logger.info(f"{rule}: {len(left_out)} of the {len(counts)} distinct characters become <unk> ({share:.3%} of the "
                f"training text), e.g. {rarest!r}.")


def warn_unknown_characters(tokenizer, model_args: ModelArguments, data_args: DataArguments, train_counts, eval_raw):
    """One warning per text with characters outside the vocabulary (they become <unk>), with the share of the text
    they are; characters left out of the vocabulary on purpose (--max_vocab_size, --min_char_count) were said
    already."""
    texts = {"validation": count_characters(eval_raw, data_args.text_column)}
    if model_args.model_name_or_path or model_args.tokenizer_name:
        texts = {"training": train_counts, **texts}  # a vocabulary not built from this text
    known = tokenizer.get_vocab()
    if not (model_args.model_name_or_path or model_args.tokenizer_name):
        known = {**dict.fromkeys(train_counts), **known}  # left out by --max_vocab_size/--min_char_count: said
    for name, counts in texts.items():
        oov = {char: n for char, n in counts.items() if char not in known}
        if oov:
            share = sum(oov.values()) / max(1, sum(counts.values()))
            more = f" and {len(oov) - 40} more" if len(oov) > 40 else ""
            logger.warning(
                f"{sum(oov.values())} characters of the {name} text ({share:.3%}) are not in the vocabulary and "
                f"become <unk>: {''.join(sorted(oov)[:40])!r}{more}"
            )


# ---------------------------------------------------------------------------------------------------------------------
# 3. Blocks of ids


def encode_datasets(
    tokenizer, data_args: DataArguments, training_args: CharLSTMTrainingArguments, train_raw, eval_raw
):
    """(training blocks, validation blocks): windows of block_size + 1 ids, or with --stateful one stream per batch
    row of every process (see `stream_layout`). --overwrite_cache makes them again (by the local main process; the
    others read them); a full disk is one line with what encoding needs (`cache.CacheFull`)."""
    overwrite = data_args.overwrite_cache and training_args.local_process_index == 0
    kwargs = dict(
        tokenizer=tokenizer,
        column=data_args.text_column,
        block_size=data_args.block_size,
        separator=data_args.document_separator,
    )

    def needs() -> str | None:
        return preparation_needs(dataset_bytes(train_raw, eval_raw), data_args.block_size, data_args.stride,
                                 data_args.stateful, rows=False, itemsize=tokenizer.corpus_dtype.itemsize)

    with training_args.main_process_first(desc="encoding"), space_reported("the blocks of ids",
                                                                           step_folder(train_raw), needs):
        if data_args.stateful:
            world = training_args.world_size
            train_streams = world * training_args.per_device_train_batch_size
            eval_streams = world * training_args.per_device_eval_batch_size
            train_blocks = encode_streams(train_raw, num_streams=train_streams, overwrite=overwrite, **kwargs)
            eval_blocks = encode_streams(eval_raw, num_streams=eval_streams, name="validation", overwrite=overwrite,
                                         **kwargs)
        else:
            kwargs["stride"] = data_args.stride
            if not data_args.streaming:
                kwargs.update(num_proc=data_args.preprocessing_num_workers, load_from_cache_file=not overwrite)
            train_blocks, eval_blocks = encode_blocks(train_raw, **kwargs), encode_blocks(eval_raw, **kwargs)
    if data_args.streaming:
        return train_blocks, eval_blocks
    window = data_args.block_size + 1
    for name, blocks in (("training", train_blocks), ("validation", eval_blocks)):
        if len(blocks) == 0:
            raise DataError(
                f"The {name} text is shorter than one block ({window} characters): use more text or a smaller "
                "--block_size."
            )
    logger.info(f"{len(train_blocks)} training blocks, {len(eval_blocks)} validation blocks of {window} ids")
    return train_blocks, eval_blocks


# The periodic evaluations' share of the training time they may take, and how much faster than training an
# evaluation reads a block (forward only, no dropout or optimizer: 2.9-4.3x, benchmarks/scale.py); 2.5 for headroom.
# The final evaluation (`final.final_evaluation`) costs about as much again: together under 10% of a run.
EVAL_TIME_SHARE = 0.05
EVAL_SPEEDUP = 2.5


def periodic_eval_blocks(data_args: DataArguments, training_args: CharLSTMTrainingArguments, train_blocks,
                         eval_blocks):
    """The blocks of the periodic evaluations: `--max_eval_samples` when given; else, when the validation split is
    larger, a fixed sample (the first blocks of `evaluation_order`: the same at every evaluation, and in every run
    on the same text) of as many blocks as cost about `EVAL_TIME_SHARE` of the training time between two
    evaluations, said once. With --stateful the sample is the
    first windows of every stream (it keeps the streams' order), with --streaming the first blocks of the stream.
    The final evaluation reads a sample of its own (`final.final_evaluation`)."""
    args = training_args
    most = data_args.max_eval_samples
    if most is None:
        most = max(args.per_device_eval_batch_size * args.world_size,
                   int(EVAL_TIME_SHARE * EVAL_SPEEDUP * _eval_interval(args, train_blocks) * _blocks_per_step(args)))
    if data_args.streaming:
        return eval_blocks.take(most)
    if len(eval_blocks) <= most:
        return eval_blocks
    if data_args.stateful:  # the first windows of every stream
        streams = args.world_size * args.per_device_eval_batch_size
        return eval_blocks.select(range(max(1, most // streams) * streams))
    chosen = evaluation_order(len(eval_blocks))[:most]  # the final evaluation's first blocks too
    if data_args.max_eval_samples is None:
        logger.info(f"Evaluations while training read a fixed sample of {most} of the {len(eval_blocks)} validation "
                    f"blocks ({most * data_args.block_size:,} characters: about {EVAL_TIME_SHARE:.0%} of the training "
                    "time between two evaluations; --max_eval_samples sets it).")
    return eval_blocks.select(np.sort(chosen), keep_in_memory=True)  # its indices: in memory, not a cache file


def _blocks_per_step(args: CharLSTMTrainingArguments) -> int:
    return args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps


def _eval_interval(args: CharLSTMTrainingArguments, train_blocks) -> float:
    """Training steps between two evaluations: --eval_steps (a number, or a fraction of the run), else one epoch
    (a stream, which has no length: the run's --max_steps); at most the run's --max_steps."""
    epoch = len(train_blocks) / _blocks_per_step(args) if hasattr(train_blocks, "__len__") else args.max_steps
    interval = args.eval_steps if str(getattr(args.eval_strategy, "value", args.eval_strategy)) == "steps" else None
    if interval is not None and interval < 1:  # a fraction of the run
        interval = interval * (args.max_steps if args.max_steps > 0 else epoch)
    interval = interval or epoch
    return min(interval, args.max_steps) if args.max_steps > 0 else interval  # a run shorter than one interval
