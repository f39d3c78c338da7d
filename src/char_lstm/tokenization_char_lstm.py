"""Character-level tokenizer for CharLSTM: one token per Unicode code point.

This file is shipped to the Hub next to the weights (``trust_remote_code``), so it imports only the standard library,
NumPy, ``tokenizers`` and transformers. It is a fast (``tokenizers``-backed) tokenizer: `save_pretrained` writes a
`tokenizer.json` (a WordLevel model over single characters, a pre-tokenizer that isolates every character and a Fuse
decoder) that `AutoTokenizer`, `tokenizers.Tokenizer.from_file` and other runtimes read without this code.
"""

import json
import os
import shutil
from collections.abc import Iterable

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import TokenizersBackend


VOCAB_FILES_NAMES = {"vocab_file": "vocab.json", "tokenizer_file": "tokenizer.json"}

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"

# Texts are encoded by `encode_corpus` in slices of this many characters, which bounds the temporary UTF-32 copy.
_CORPUS_CHUNK_CHARS = 1 << 24
_UNICODE_SIZE = 0x110000
# Every code point is a piece of its own (`.` would leave runs of newlines together).
_ONE_CHARACTER = Regex(r"[\s\S]")


def _backend(vocab: dict[str, int], unk_token: str) -> Tokenizer:
    """The `tokenizers` pipeline: each code point is looked up in `vocab`, `unk_token` where absent; decoding
    concatenates the tokens."""
    tokenizer = Tokenizer(WordLevel(vocab, unk_token=unk_token))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(_ONE_CHARACTER, behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return tokenizer


def _template_adds(post_processor) -> tuple[bool, bool]:
    """(adds a token before, adds a token after) for a `TemplateProcessing` read from a tokenizer.json."""
    try:
        single = json.loads(post_processor.__getstate__())["single"]
    except (AttributeError, KeyError, TypeError, ValueError):
        return False, False
    kinds = [next(iter(piece)) for piece in single]
    return bool(kinds) and kinds[0] == "SpecialToken", bool(kinds) and kinds[-1] == "SpecialToken"


def _read_vocab_file(path) -> dict[str, int]:
    """{token: id} from a vocab.json, or a one-line ValueError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            vocab = json.load(f)
    except (ValueError, UnicodeDecodeError) as error:  # json.JSONDecodeError is a ValueError
        raise ValueError(
            f"{path} is not valid JSON ({error}); save the tokenizer again (tokenizer.save_pretrained)."
        ) from None
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise ValueError(f"{path} holds a {type(vocab).__name__}, not a mapping of tokens to ids (such as "
                         '{"a": 0, "<unk>": 1}); save the tokenizer again (tokenizer.save_pretrained).')
    return vocab


class CharLSTMTokenizer(TokenizersBackend):
    r"""
    Character tokenizer: every Unicode code point of the text is one token. Nothing is normalized, stripped or
    inserted, so `decode(encode(text)) == text` for any text whose characters are in the vocabulary (newlines, tabs,
    runs of spaces, emoji, CJK, combining marks included). Characters outside the vocabulary become `<unk>`;
    `oov_characters(text)` lists them.

    Special tokens: `<pad>` and `<unk>` always; a tokenizer built for training with `document_boundary=True` has one
    `<eos>` token that is both `eos_token` and `bos_token` (it separates documents). Special and added tokens work as
    in every transformers tokenizer: given at init or load they are added when missing, they count in `len(tokenizer)`
    and `get_vocab()`, and `add_tokens` + `model.resize_token_embeddings(len(tokenizer))` grows the model.

    The one rule for special-token strings typed in a text: **they are the special token** (`"<eos>"` in a text is one
    token, as in every transformers tokenizer); the round trip stays exact as long as `decode` keeps special tokens
    (its default). Pass `split_special_tokens=True` to read them as characters. `encode_corpus` always reads
    characters.

    Padding is on the right by default, as for most transformers tokenizers: scoring a batch (the `evaluate`
    perplexity metric, lm-evaluation-harness) then equals scoring each text alone. Generation needs left padding:
    the text-generation pipeline sets it itself, otherwise call `tokenizer(prompts, padding=True,
    padding_side="left")`.

    Build one from text with `CharLSTMTokenizer.from_corpus(texts)`; encode large texts with `encode_corpus(text)`
    (vectorized, same ids as the tokenizer for plain text).

    Args:
        vocab (`dict[str, int]` or `str`, *optional*): the base vocabulary ({character or special token: id}), or the
            path of a `vocab.json`.
        vocab_file (`str`, *optional*): path of a `vocab.json`, instead of `vocab`.
        add_bos_token / add_eos_token (`bool`, *optional*): add `bos_token` / `eos_token` around every encoded text
            (default False).
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "right"

    def __init__(
        self,
        vocab: dict[str, int] | str | None = None,
        vocab_file: str | None = None,
        pad_token: str = PAD_TOKEN,
        unk_token: str = UNK_TOKEN,
        bos_token: str | None = None,
        eos_token: str | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        clean_up_tokenization_spaces: bool = False,
        **kwargs,
    ):
        tokenizer_file = kwargs.pop("tokenizer_file", None)
        kwargs.pop("special_tokens_pattern", None)  # written by versions before tokenizer.json; not used here
        # Loading options that transformers 5.24 passes on as init arguments (from_pretrained(..., local_files_only=
        # True)) and would write into tokenizer_config.json at the next save: they describe a load, not the tokenizer.
        kwargs.pop("is_local", None)
        kwargs.pop("local_files_only", None)
        post_processor = kwargs.get("post_processor")
        # A vocab.json alone (given by path): a folder saved before tokenizer.json existed.
        legacy_folder = tokenizer_file is None and post_processor is None and (
            isinstance(vocab, (str, os.PathLike)) or (vocab is None and vocab_file is not None)
        )
        if vocab is None and tokenizer_file is not None and os.path.isfile(tokenizer_file):
            with open(tokenizer_file, encoding="utf-8") as f:
                vocab = json.load(f)["model"]["vocab"]
        if vocab is None:
            vocab = vocab_file
        if vocab is None:
            raise ValueError(
                "CharLSTMTokenizer needs a vocabulary: pass vocab={...} or vocab_file=... (a vocab.json), "
                "or build one with CharLSTMTokenizer.from_corpus(texts)."
            )
        if isinstance(vocab, (str, os.PathLike)):
            vocab = _read_vocab_file(vocab)
        if str(unk_token) not in vocab:
            raise ValueError(
                f"The vocabulary has no {str(unk_token)!r} token; build it with CharLSTMTokenizer.from_corpus."
            )
        # Whether encode adds bos/eos: as the tokenizer.json's template says; folders saved before tokenizer.json
        # existed added every bos/eos token they had.
        from_file = _template_adds(post_processor) if post_processor is not None else (False, False)
        if add_bos_token is None:
            add_bos_token = from_file[0] or (legacy_folder and bos_token is not None)
        if add_eos_token is None:
            add_eos_token = from_file[1] or (legacy_folder and eos_token is not None)
        self._tokenizer = _backend(dict(vocab), str(unk_token))
        self._corpus_cache = None
        super().__init__(
            pad_token=pad_token,
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    @classmethod
    def from_corpus(
        cls,
        texts: str | Iterable[str],
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        document_boundary: bool = False,
        **kwargs,
    ) -> "CharLSTMTokenizer":
        """Build the vocabulary from a text or an iterable of texts (any iterator works; it is read once).

        Ids: `<pad>`=0, `<unk>`=1, then `<bos>`/`<eos>` when asked for, then every distinct character sorted by code
        point, so the same text always gives the same ids. `add_bos_token` / `add_eos_token` make encode add them.
        `document_boundary=True` adds one `<eos>` token that is both the bos and the eos token, not added by encode:
        the document boundary of a training text (see `char_lstm.data`).
        """
        if isinstance(texts, str):
            texts = [texts]
        characters: set[str] = set()
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(
                    f"from_corpus takes a str or an iterable of str, got an item of type {type(text).__name__}."
                )
            characters.update(text)
        specials = [PAD_TOKEN, UNK_TOKEN]
        if add_bos_token:
            specials.append(BOS_TOKEN)
            kwargs.setdefault("bos_token", BOS_TOKEN)
        if add_eos_token or document_boundary:
            specials.append(EOS_TOKEN)
            kwargs.setdefault("eos_token", EOS_TOKEN)
        if document_boundary and not add_bos_token:
            kwargs.setdefault("bos_token", EOS_TOKEN)
        tokens = specials + sorted(characters)
        vocab = {token: idx for idx, token in enumerate(tokens)}
        return cls(vocab=vocab, add_bos_token=add_bos_token, add_eos_token=add_eos_token, **kwargs)

    def _characters(self) -> tuple[dict[str, int], np.ndarray | None]:
        """{character: id} over the whole vocabulary (added tokens included), and the code point -> id table built
        from it on demand; rebuilt when tokens are added."""
        size = len(self)
        if self._corpus_cache is None or self._corpus_cache[0] != size:
            chars = {token: idx for token, idx in self.get_vocab().items() if len(token) == 1}
            self._corpus_cache = [size, chars, None]
        return self._corpus_cache[1], self._corpus_cache[2]

    def oov_characters(self, text: str) -> list[str]:
        """The distinct characters of `text` that are not in the vocabulary (they would become `<unk>`), sorted."""
        return sorted(set(text).difference(self._characters()[0]))

    @property
    def corpus_dtype(self) -> np.dtype:
        """The smallest integer dtype that holds every id: uint8 up to 256 tokens, uint16 up to 65536, else int32."""
        size = len(self)
        return np.dtype(np.uint8 if size <= 1 << 8 else np.uint16 if size <= 1 << 16 else np.int32)

    def _lookup_table(self) -> np.ndarray:
        """Code point -> id table over all of Unicode (0x110000 entries), `<unk>` where not in the vocab."""
        chars, table = self._characters()
        if table is None:
            table = np.full(_UNICODE_SIZE, self.unk_token_id, dtype=self.corpus_dtype)
            for token, idx in chars.items():
                table[ord(token)] = idx
            self._corpus_cache[2] = table
        return table

    def encode_corpus(self, text: str, dtype=None) -> np.ndarray:
        """Vectorized encoding of a (large) text: the ids the tokenizer gives without special tokens (every
        character one token; special-token strings typed in the text are read as characters), as a NumPy array of
        `dtype` (default `corpus_dtype`, the smallest that fits: one byte per character for vocabularies up to 256
        tokens). Each slice of 16M characters becomes an array of code points (one byte each for ASCII text, four
        otherwise), which indexes a code point -> id table."""
        table = self._lookup_table()
        out = np.empty(len(text), dtype=table.dtype)
        for start in range(0, len(text), _CORPUS_CHUNK_CHARS):
            piece = text[start : start + _CORPUS_CHUNK_CHARS]
            if piece.isascii():
                codes = np.frombuffer(piece.encode("ascii"), dtype=np.uint8)
            else:
                codes = np.frombuffer(piece.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
            np.take(table, codes, out=out[start : start + len(piece)], mode="clip")  # in range; no buffering
        return out if dtype is None or np.dtype(dtype) == out.dtype else out.astype(dtype)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        """Write `vocab.json`, the base vocabulary ({token: id}, added tokens excluded), as earlier versions did."""
        if not os.path.isdir(save_directory):
            raise ValueError(f"Vocabulary path {save_directory!r} should be a directory.")
        path = os.path.join(
            save_directory, (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        )
        vocab = self._tokenizer.get_vocab(with_added_tokens=False)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(dict(sorted(vocab.items(), key=lambda kv: kv[1])), f, ensure_ascii=False, indent=0)
            f.write("\n")
        return (path,)

    def _save_pretrained(self, save_directory, file_names, legacy_format=None, filename_prefix=None):
        file_names = super()._save_pretrained(save_directory, file_names, legacy_format, filename_prefix)
        file_names += self.save_vocabulary(str(save_directory), filename_prefix)
        # This file travels with the tokenizer for whoever wants this class itself (its corpus helpers:
        # `oov_characters`, `encode_corpus`), imported from the folder. AutoTokenizer (transformers 5.24 reads an
        # auto_map only from tokenizer_config.json) loads tokenizer.json as its generic TokenizersBackend: the same
        # ids, special tokens and padding. tokenizer_config.json gets no auto_map on purpose: with one, transformers
        # refuses to load the tokenizer without `trust_remote_code`, which tokenizer.json alone makes unnecessary.
        if filename_prefix is None:
            code = os.path.join(str(save_directory), os.path.basename(__file__))
            if os.path.abspath(code) != os.path.abspath(__file__):
                shutil.copyfile(__file__, code)
            file_names += (code,)
        return file_names


__all__ = ["CharLSTMTokenizer"]
