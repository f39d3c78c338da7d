"""Character-level tokenizer for CharLSTM: one token per Unicode code point.

This file is shipped to the Hub next to the weights (``trust_remote_code``), so it imports only the standard library,
NumPy and transformers.
"""

import json
import os
from collections.abc import Iterable

import numpy as np
from transformers import PreTrainedTokenizer


VOCAB_FILES_NAMES = {"vocab_file": "vocab.json"}

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"

# Texts are encoded by `encode_corpus` in slices of this many characters, which bounds the temporary UTF-32 copy.
_CORPUS_CHUNK_CHARS = 1 << 24
_UNICODE_SIZE = 0x110000


class CharLSTMTokenizer(PreTrainedTokenizer):
    r"""
    Character tokenizer: every Unicode code point of the text is one token, looked up in `vocab.json`. Nothing is
    normalized, stripped or inserted, so `decode(encode(text)) == text` for any text whose characters are in the
    vocabulary (newlines, tabs, runs of spaces, emoji, CJK, combining marks included). Characters outside the
    vocabulary become `<unk>`; `oov_characters(text)` lists them.

    Special tokens: `<pad>` (id 0) and `<unk>` (id 1) always; `<bos>`/`<eos>` only when built with
    `add_bos_token=True` / `add_eos_token=True`, and then prepended/appended by `encode`. Special token strings typed in
    a text are *not* special: `"<pad>"` in a text is five characters, which keeps the round trip exact.

    Padding is on the left by default, as generation with a batch of prompts needs.

    Build one from text with `CharLSTMTokenizer.from_corpus(texts)`; encode large texts with `encode_corpus(text)`
    (vectorized, same ids as the tokenizer).

    Args:
        vocab_file (`str`, *optional*): path of a `vocab.json` ({token: id}).
        vocab (`dict[str, int]`, *optional*): the vocabulary itself, instead of `vocab_file`.
        add_bos_token / add_eos_token (`bool`, *optional*): add `<bos>` / `<eos>` around every encoded text; by default
            True exactly when the tokenizer has that token.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | None = None,
        vocab: dict[str, int] | None = None,
        pad_token: str = PAD_TOKEN,
        unk_token: str = UNK_TOKEN,
        bos_token: str | None = None,
        eos_token: str | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        padding_side: str = "left",
        split_special_tokens: bool = True,
        clean_up_tokenization_spaces: bool = False,
        **kwargs,
    ):
        if vocab is None:
            if vocab_file is None:
                raise ValueError(
                    "CharLSTMTokenizer needs a vocabulary: pass vocab_file=... (a vocab.json) or vocab={...}, "
                    "or build one with CharLSTMTokenizer.from_corpus(texts)."
                )
            with open(vocab_file, encoding="utf-8") as f:
                vocab = json.load(f)
        for token in (str(pad_token), str(unk_token)):
            if token not in vocab:
                raise ValueError(f"The vocabulary has no {token!r} token; build it with CharLSTMTokenizer.from_corpus.")
        bad = [token for token in vocab if len(token) != 1 and not (token.startswith("<") and token.endswith(">"))]
        if bad:
            raise ValueError(f"Vocabulary entries must be single characters or <special> tokens, got {bad[:5]}.")
        # A tokenizer that has <bos>/<eos> adds them (transformers does not save add_bos_token/add_eos_token).
        add_bos_token = bos_token is not None if add_bos_token is None else add_bos_token
        add_eos_token = eos_token is not None if add_eos_token is None else add_eos_token
        if add_bos_token and bos_token is None:
            bos_token = BOS_TOKEN
        if add_eos_token and eos_token is None:
            eos_token = EOS_TOKEN
        for token in (bos_token, eos_token):
            if token is not None and str(token) not in vocab:
                raise ValueError(
                    f"{token!r} is not in the vocabulary; build the tokenizer with "
                    "CharLSTMTokenizer.from_corpus(texts, add_bos_token=..., add_eos_token=...)."
                )
        self.vocab = dict(vocab)
        self.ids_to_tokens = {i: t for t, i in self.vocab.items()}
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self._corpus_table = None
        pattern = {(True, True): "bos_eos", (True, False): "bos", (False, True): "eos"}.get(
            (add_bos_token, add_eos_token), "none"
        )
        super().__init__(
            pad_token=pad_token,
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            padding_side=padding_side,
            split_special_tokens=split_special_tokens,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            special_tokens_pattern=pattern,
            **kwargs,
        )

    @classmethod
    def from_corpus(
        cls,
        texts: str | Iterable[str],
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        **kwargs,
    ) -> "CharLSTMTokenizer":
        """Build the vocabulary from a text or an iterable of texts (any iterator works; it is read once).

        Ids: `<pad>`=0, `<unk>`=1, then `<bos>`/`<eos>` when asked for, then every distinct character sorted by code
        point, so the same text always gives the same ids.
        """
        if isinstance(texts, str):
            texts = [texts]
        characters: set[str] = set()
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"from_corpus takes a str or an iterable of str, got an item of type {type(text).__name__}.")
            characters.update(text)
        specials = [PAD_TOKEN, UNK_TOKEN]
        if add_bos_token:
            specials.append(BOS_TOKEN)
        if add_eos_token:
            specials.append(EOS_TOKEN)
        tokens = specials + sorted(characters)
        vocab = {token: idx for idx, token in enumerate(tokens)}
        return cls(vocab=vocab, add_bos_token=add_bos_token, add_eos_token=add_eos_token, **kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return list(text)

    def _convert_token_to_id(self, token: str) -> int:
        return self.vocab.get(token, self.vocab[self.unk_token])

    def _convert_id_to_token(self, index: int) -> str:
        return self.ids_to_tokens.get(index, self.unk_token)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens)

    def oov_characters(self, text: str) -> list[str]:
        """The distinct characters of `text` that are not in the vocabulary (they would become `<unk>`), sorted."""
        return sorted(set(text).difference(self.vocab))

    @property
    def corpus_dtype(self) -> np.dtype:
        """The smallest integer dtype that holds every id: uint8 up to 256 tokens, uint16 up to 65536, else int32."""
        size = len(self.vocab)
        return np.dtype(np.uint8 if size <= 1 << 8 else np.uint16 if size <= 1 << 16 else np.int32)

    def _lookup_table(self) -> np.ndarray:
        """Code point -> id table over all of Unicode (0x110000 entries), `<unk>` where not in the vocab."""
        if self._corpus_table is None:
            table = np.full(_UNICODE_SIZE, self.vocab[self.unk_token], dtype=self.corpus_dtype)
            for token, idx in self.vocab.items():
                if len(token) == 1:
                    table[ord(token)] = idx
            self._corpus_table = table
        return self._corpus_table

    def encode_corpus(self, text: str, dtype=None) -> np.ndarray:
        """Vectorized encoding of a (large) text: the ids `convert_tokens_to_ids(list(text))` would give, without
        special tokens, as a NumPy array of `dtype` (default `corpus_dtype`, the smallest that fits: one byte per
        character for vocabularies up to 256 tokens). Each slice of 16M characters becomes an array of code points (one
        byte each for ASCII text, four otherwise), which indexes a code point -> id table."""
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
        if not os.path.isdir(save_directory):
            raise ValueError(f"Vocabulary path {save_directory!r} should be a directory.")
        path = os.path.join(
            save_directory, (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        )
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.vocab, f, ensure_ascii=False, indent=0, sort_keys=False)
            f.write("\n")
        return (path,)


__all__ = ["CharLSTMTokenizer"]
