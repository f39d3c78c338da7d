"""Sampling text from a trained model with `model.generate()` (what `scripts/generate.py` runs)."""

import logging
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import TextStreamer, set_seed

from .errors import see_troubleshooting
from .loading import load_model_and_tokenizer, pick_device, resolve_dtype
from .terminal import TerminalWriter


@dataclass
class GenerateArguments:
    model_name_or_path: str = field(metadata={"help": "A trained model: a local folder or a Hub id."})
    prompt: list[str] | None = field(
        default=None, metadata={"help": "One or more prompts (batched together); default: read one from stdin."}
    )
    max_new_tokens: int = field(default=500, metadata={"help": "Characters to generate per sample."})
    do_sample: bool = field(default=True, metadata={"help": "Sample (true) or take the most likely character."})
    greedy: bool = field(default=False, metadata={"help": "Same as --do_sample false."})
    temperature: float = field(default=0.8, metadata={"help": "Below 1: safer text; above 1: more surprising."})
    top_k: int = field(default=0, metadata={"help": "Sample among the k most likely characters (0: all)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling: the smallest set with this probability."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Above 1 discourages repeating characters."})
    num_return_sequences: int = field(default=1, metadata={"help": "Samples per prompt."})
    seed: int | None = field(default=None, metadata={"help": "Random seed, for reproducible samples."})
    device: str = field(default="auto", metadata={"help": "auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps."})
    dtype: str = field(default="auto", metadata={"help": "auto (as saved), float32, bfloat16 or float16."})
    unknown_to_unk: bool = field(
        default=False, metadata={"help": "Map prompt characters outside the vocabulary to <unk> instead of failing."}
    )
    stream: bool = field(default=True, metadata={"help": "Print characters as they come (one prompt, one sample)."})
    raw_output: bool = field(default=False, metadata={
        "help": "Write the exact text to a terminal too, control characters (escape codes) included; by default a "
        "terminal shows them as \\x1b-style escapes (a file or a pipe always gets the exact text)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run the model code shipped with a Hub model."})


logger = logging.getLogger(__name__)


class CharacterStreamer(TextStreamer):
    """`TextStreamer` that prints every character as soon as it is generated (TextStreamer waits for whole words)."""

    def __init__(self, tokenizer, skip_prompt: bool = False, file=None, **decode_kwargs):
        super().__init__(tokenizer, skip_prompt=skip_prompt, **decode_kwargs)
        self.file = file

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        print(text, end="\n" if stream_end else "", file=self.file or sys.stdout, flush=True)

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1:
            if value.shape[0] > 1:
                raise ValueError("CharacterStreamer only supports batch size 1")
            value = value[0]
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.next_tokens_are_prompt = False
        self.on_finalized_text(self.tokenizer.decode(value.tolist(), **self.decode_kwargs))

    def end(self) -> None:
        self.next_tokens_are_prompt = True
        self.on_finalized_text("", stream_end=True)


def check_prompts(tokenizer, prompts: list[str], unknown_to_unk: bool) -> None:
    unknown = sorted(set().union(*(tokenizer.oov_characters(p) for p in prompts)))
    if unknown and not unknown_to_unk:
        raise ValueError(
            f"The prompt has characters the model has never seen: {unknown}; remove them, or pass --unknown_to_unk "
            "to map them to <unk>."
        )
    if any(not p for p in prompts):
        raise ValueError("A prompt is empty: a character model needs at least one character to start from.")
    only_unknown = [index for index, p in enumerate(prompts) if len(tokenizer.oov_characters(p)) == len(set(p))]
    if only_unknown:
        # the model reads <unk> as it reads any id; a person who typed only characters it never saw gets noise
        raise ValueError(
            f"Prompt(s) {only_unknown} contain only unknown characters (all <unk>): the model has never seen them; "
            "use characters from its vocabulary (the keys of tokenizer.get_vocab(), with any tokenizer class)."
        )


def generate_texts(model, tokenizer, prompts: list[str], streamer=None, **generate_kwargs) -> list[str]:
    """prompt + generated text for every prompt (and every returned sequence), in order, from one batched
    `model.generate()` call (left padding; each row generates what its prompt generates alone)."""
    batch = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt").to(model.device)
    out = model.generate(**batch, streamer=streamer, **generate_kwargs)
    width = batch["input_ids"].shape[1]
    repeats = generate_kwargs.get("num_return_sequences", 1)
    return [
        prompts[row // repeats] + tokenizer.decode(out[row, width:], skip_special_tokens=True)
        for row in range(out.shape[0])
    ]


def repetition_loop(text: str, min_share: float = 1 / 3, max_period: int = 64, min_repeats: int = 3,
                    min_length: int = 40) -> tuple[str, float] | None:
    """A repetition loop in generated `text` (its last 2000 characters): substrings of at most `max_period`
    characters, each repeated back to back at least `min_repeats` times, that together fill at least `min_share` of
    the text (a model in a loop often goes from one loop to another). Returns (the substring of the longest loop, the
    share of the text the loops fill), or None for text without loops (or shorter than `min_length`: too short to
    tell).

    For each period p, the text is periodic where text[i] == text[i - p]: a stretch of such positions, with the p
    characters before it, is a loop of period p; the shortest period of the longest loop is the one reported."""
    text = text[-2000:]
    if len(text) < min_length:
        return None
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    in_loop = np.zeros(len(codes), dtype=bool)
    longest, unit = 0, None
    for period in range(1, min(max_period, len(codes) // min_repeats) + 1):
        same = np.concatenate([[False], codes[period:] == codes[:-period], [False]])
        edges = np.flatnonzero(np.diff(same.astype(np.int8)))  # starts and ends of the stretches, in text[period:]
        for start, end in zip(edges[0::2], edges[1::2]):
            length = int(end - start) + period  # the loop: text[start : end + period]
            if length < min_repeats * period:
                continue
            in_loop[start:end + period] = True
            if length > longest:
                longest, unit = length, text[start:start + period]
    share = float(in_loop.mean())
    if unit is None or share < min_share:
        return None
    return unit, share


def repetition_warning(text: str, where: str, training: bool = False) -> str | None:
    """The one-line report of a repetition loop in `text` (the generated characters, without the prompt), or None:
    what repeats and how much of the text it fills, and the flags that break the loop (`training`: for the samples
    printed while training, whose temperature is --sample_temperature)."""
    loop = repetition_loop(text)
    if loop is None:
        return None
    unit, share = loop
    sampling = ("a higher --sample_temperature (0.8-1.0); scripts/generate.py also has --top_p 0.9 and "
                "--repetition_penalty 1.2" if training else
                "a higher --temperature (0.8-1.0), --top_p 0.9 or --repetition_penalty 1.2")
    return (f"Repeats the same phrase: {where} repeats {unit!r} over {share:.0%} of its characters (a repetition "
            f"loop). Sample with {sampling}; if it persists, train with more --dropout. "
            f"{see_troubleshooting('repeats-the-same-phrase')}")


def check_generate_arguments(args: GenerateArguments) -> None:
    """One-line ValueErrors for values generate() would reject late, divide by, or silently accept."""
    if args.num_return_sequences < 1:
        raise ValueError(f"--num_return_sequences must be at least 1, got {args.num_return_sequences}.")
    if args.max_new_tokens < 0:
        raise ValueError(f"--max_new_tokens must be 0 or more, got {args.max_new_tokens}.")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top_p must be in (0, 1] (1 keeps every character), got {args.top_p}.")
    if args.top_k < 0:
        raise ValueError(f"--top_k must be 0 (every character) or more, got {args.top_k}.")
    if args.temperature <= 0:
        raise ValueError(f"--temperature must be above 0, got {args.temperature}; for the most likely character "
                         "use --greedy.")
    if args.repetition_penalty <= 0:
        raise ValueError(f"--repetition_penalty must be above 0 (1: none), got {args.repetition_penalty}.")


def run_generate(args: GenerateArguments, stdout=None) -> list[str]:
    """Check the arguments, load the model, generate, print; returns the texts."""
    stdout = stdout or sys.stdout
    check_generate_arguments(args)
    prompts = args.prompt
    if not prompts:
        if sys.stdin is None or sys.stdin.isatty():
            raise ValueError("No prompt: pass --prompt TEXT (several allowed) or pipe the prompt on stdin.")
        prompts = [sys.stdin.read()]
    device = pick_device(args.device)
    model, tokenizer = load_model_and_tokenizer(
        args.model_name_or_path,
        device=device,
        dtype=resolve_dtype(args.dtype),
        trust_remote_code=args.trust_remote_code,
    )
    check_prompts(tokenizer, prompts, args.unknown_to_unk)
    if args.seed is not None:
        set_seed(args.seed)
    do_sample = args.do_sample and not args.greedy
    kwargs = dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=do_sample,
        num_return_sequences=args.num_return_sequences,
        repetition_penalty=args.repetition_penalty,
        pad_token_id=tokenizer.pad_token_id,
    )
    if do_sample:
        kwargs.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    else:
        kwargs.update(temperature=None, top_k=None, top_p=None)
    single = len(prompts) == 1 and args.num_return_sequences == 1
    streamer = None
    out = TerminalWriter(stdout, raw=args.raw_output)  # a terminal shows control characters; a file gets them
    if args.stream and single:
        # the prompt as typed (its unknown characters would decode as nothing), then the new characters as they come
        print(prompts[0], end="", file=out, flush=True)
        streamer = CharacterStreamer(tokenizer, skip_prompt=True, file=out, skip_special_tokens=True)
    texts = generate_texts(model, tokenizer, prompts, streamer=streamer, **kwargs)
    if streamer is None:
        for index, text in enumerate(texts):
            if not single:
                print(f"===== sample {index + 1} of {len(texts)} =====", file=out)
            print(text, file=out, flush=True)
    out.finish()
    if out.escaped:
        logger.warning("The text holds control characters (such as terminal escape codes), shown on the terminal as "
                       "\\x1b-style escapes; --raw_output writes them as they are (a file or a pipe gets the exact "
                       "text).")
    _warn_repetition(texts, prompts, args.num_return_sequences)
    return texts


def _warn_repetition(texts: list[str], prompts: list[str], repeats: int) -> None:
    """One warning for the first sample caught in a repetition loop (the others are likely the same)."""
    for index, text in enumerate(texts):
        label = "the sample" if len(texts) == 1 else f"sample {index + 1} of {len(texts)}"
        warning = repetition_warning(text[len(prompts[index // repeats]):], label)
        if warning is not None:
            logger.warning(warning)
            return


run = run_generate  # the name before issue 14 (entry points are run_<command>)
