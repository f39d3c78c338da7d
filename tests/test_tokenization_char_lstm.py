import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from char_lstm import CharLSTMTokenizer
from helpers import CORPUS


UNICODE_TEXT = "tab\there\n\nline  with   spaces \u00a0nbsp\r\nemoji 😀👍🏽 cjk 中文字 e\u0301 a\u0308 \u200d end "


def test_from_corpus_is_deterministic_and_sorted():
    a = CharLSTMTokenizer.from_corpus(iter(["hello", " world\n"]))
    b = CharLSTMTokenizer.from_corpus(["world\n", "hello "])
    assert a.get_vocab() == b.get_vocab()
    vocab = a.get_vocab()
    assert vocab["<pad>"] == 0 and vocab["<unk>"] == 1
    chars = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])][2:]
    assert chars == sorted(set("hello world\n"))
    assert len(a) == a.vocab_size == len(set("hello world\n")) + 2


@pytest.mark.parametrize(
    "text", [CORPUS, UNICODE_TEXT, "", " ", "\n", "  leading and trailing  ", "<pad> and <unk> typed as text"]
)
def test_decode_encode_round_trip_is_exact(text):
    tokenizer = CharLSTMTokenizer.from_corpus([CORPUS, UNICODE_TEXT, "<pad> and <unk> typed as text"])
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text)  # one token per code point
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_tokens_to_string(tokenizer.tokenize(text)) == text


def test_combining_marks_and_emoji_are_separate_code_points():
    tokenizer = CharLSTMTokenizer.from_corpus(UNICODE_TEXT)
    assert tokenizer.tokenize("e\u0301") == ["e", "\u0301"]
    assert tokenizer.tokenize("👍🏽") == ["👍", "🏽"]


def test_unknown_characters_map_to_unk_and_are_reported():
    tokenizer = CharLSTMTokenizer.from_corpus("abc ")
    ids = tokenizer("abz xy")["input_ids"]
    assert ids == [tokenizer.convert_tokens_to_ids(c) for c in "ab"] + [1, tokenizer.convert_tokens_to_ids(" "), 1, 1]
    assert tokenizer.oov_characters("abz xy zz") == ["x", "y", "z"]
    assert tokenizer.oov_characters("abc") == []
    assert tokenizer.decode(ids) == "ab<unk> <unk><unk>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab "


def test_padding_is_left_by_default_and_pads_skip_on_decode():
    tokenizer = CharLSTMTokenizer.from_corpus("abc")
    batch = tokenizer(["a", "abc"], padding=True)
    assert batch["input_ids"][0][:2] == [0, 0]
    assert batch["attention_mask"] == [[0, 0, 1], [1, 1, 1]]
    assert tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True) == ["a", "abc"]
    assert "token_type_ids" not in batch


def test_bos_eos_are_optional():
    plain = CharLSTMTokenizer.from_corpus("ab")
    assert plain.bos_token is None and plain.eos_token is None
    assert plain("ab")["input_ids"] == [2, 3]
    tokenizer = CharLSTMTokenizer.from_corpus("ab", add_bos_token=True, add_eos_token=True)
    vocab = tokenizer.get_vocab()
    assert (vocab["<bos>"], vocab["<eos>"]) == (2, 3)
    assert tokenizer("ab")["input_ids"] == [2, 4, 5, 3]
    assert tokenizer.decode(tokenizer("ab")["input_ids"], skip_special_tokens=True) == "ab"


def test_save_and_auto_tokenizer_round_trip(tmp_path):
    tokenizer = CharLSTMTokenizer.from_corpus([CORPUS, UNICODE_TEXT], add_eos_token=True)
    tokenizer.save_pretrained(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert vocab == tokenizer.get_vocab()
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(loaded, CharLSTMTokenizer)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.padding_side == "left"
    assert loaded.add_eos_token and loaded.eos_token == "<eos>"
    assert loaded(UNICODE_TEXT)["input_ids"] == tokenizer(UNICODE_TEXT)["input_ids"]
    assert loaded.decode(loaded(UNICODE_TEXT)["input_ids"], skip_special_tokens=True) == UNICODE_TEXT


def test_encode_corpus_equals_tokenizer():
    tokenizer = CharLSTMTokenizer.from_corpus([CORPUS, UNICODE_TEXT])
    text = CORPUS + UNICODE_TEXT + "unknown: ~§ 🚀 \U0010ffff" + CORPUS
    ids = tokenizer.encode_corpus(text)
    assert isinstance(ids, np.ndarray) and ids.dtype == np.uint8  # smallest dtype for < 256 tokens
    assert tokenizer.encode_corpus(text, dtype=np.int64).dtype == np.int64
    assert ids.tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.encode_corpus("").shape == (0,)


def test_encode_corpus_works_across_chunks(monkeypatch):
    import char_lstm.tokenization_char_lstm as module

    monkeypatch.setattr(module, "_CORPUS_CHUNK_CHARS", 7)
    tokenizer = CharLSTMTokenizer.from_corpus(CORPUS)
    assert tokenizer.encode_corpus(CORPUS).tolist() == tokenizer(CORPUS)["input_ids"]


def test_bad_vocabularies_are_refused(tmp_path):
    with pytest.raises(ValueError, match="needs a vocabulary"):
        CharLSTMTokenizer()
    with pytest.raises(ValueError, match="no '<unk>' token"):
        CharLSTMTokenizer(vocab={"<pad>": 0, "a": 1})
    with pytest.raises(ValueError, match="single characters"):
        CharLSTMTokenizer(vocab={"<pad>": 0, "<unk>": 1, "ab": 2})


def test_encode_corpus_with_a_large_vocabulary():
    text = "".join(chr(0x4E00 + i) for i in range(300)) + "abc"
    tokenizer = CharLSTMTokenizer.from_corpus(text)
    ids = tokenizer.encode_corpus(text + "?")
    assert ids.dtype == np.uint16
    assert ids.tolist() == tokenizer(text + "?")["input_ids"]
