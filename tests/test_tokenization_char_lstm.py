import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
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


@pytest.mark.parametrize("text", [CORPUS, UNICODE_TEXT, "", " ", "\n", "\n\n\r\n", "  leading and trailing  ",
                                  "spaces before . , ! ? ' s do n't"])
def test_decode_encode_round_trip_is_exact(text):
    tokenizer = CharLSTMTokenizer.from_corpus([CORPUS, UNICODE_TEXT, "!?'"], document_boundary=True)
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text)  # one token per code point
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_tokens_to_string(tokenizer.tokenize(text)) == text
    offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    assert offsets == [(i, i + 1) for i in range(len(text))]


def test_special_token_strings_typed_in_text_are_the_special_tokens():
    """The one rule: a special token's string in a text is that token (as in every transformers tokenizer); the
    round trip stays exact; split_special_tokens=True reads it as characters, as encode_corpus always does."""
    text = "<pad> and <eos> typed as text"
    tokenizer = CharLSTMTokenizer.from_corpus([CORPUS, text], document_boundary=True)
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.pad_token_id and ids[6] == tokenizer.eos_token_id and len(ids) == len(text) - 8
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == " and  typed as text"
    as_characters = tokenizer(text, split_special_tokens=True)["input_ids"]
    assert len(as_characters) == len(text) and tokenizer.decode(as_characters) == text
    assert tokenizer.encode_corpus(text).tolist() == as_characters


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


def test_padding_is_right_by_default_and_pads_skip_on_decode():
    tokenizer = CharLSTMTokenizer.from_corpus("abc")
    batch = tokenizer(["a", "abc"], padding=True)
    assert batch["input_ids"][0][1:] == [0, 0]
    assert batch["attention_mask"] == [[1, 0, 0], [1, 1, 1]]
    assert tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True) == ["a", "abc"]
    assert "token_type_ids" not in batch
    assert tokenizer(["a", "abc"], padding=True, padding_side="left")["attention_mask"] == [[0, 0, 1], [1, 1, 1]]


def test_document_boundary_is_one_token_for_bos_and_eos_never_added():
    tokenizer = CharLSTMTokenizer.from_corpus("ab", document_boundary=True)
    assert tokenizer.get_vocab()["<eos>"] == 2 == tokenizer.bos_token_id == tokenizer.eos_token_id
    assert tokenizer("ab")["input_ids"] == [3, 4]
    assert len(tokenizer) == 5


@pytest.mark.parametrize("add_eos_token", [False, True])
def test_document_boundary_tokenizer_saved_and_loaded_adds_what_it_added(tmp_path, add_eos_token):
    """Whether encode adds bos/eos is read back from tokenizer.json's template: a boundary token that is also the
    bos token is not added in front because it exists (or because eos is added at the end)."""
    tokenizer = CharLSTMTokenizer.from_corpus("ab", document_boundary=True, add_eos_token=add_eos_token)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.bos_token == loaded.eos_token == "<eos>"
    assert loaded("ab")["input_ids"] == tokenizer("ab")["input_ids"] == [3, 4] + [2] * add_eos_token
    assert not loaded.add_bos_token and loaded.add_eos_token == add_eos_token


def test_tokenizer_from_a_vocab_file_or_a_tokenizer_file_by_path(tmp_path):
    """A vocab.json given by path is a folder saved before tokenizer.json: bos/eos are added when given, as then.
    A vocabulary given as a dict, or a tokenizer.json by path, adds them only when asked (or as its template says)."""
    (tmp_path / "vocab.json").write_text(json.dumps(LEGACY_VOCAB), encoding="utf-8")
    specials = {"bos_token": "<bos>", "eos_token": "<eos>"}
    assert CharLSTMTokenizer(vocab_file=str(tmp_path / "vocab.json"), **specials)("ab")["input_ids"] == [2, 5, 6, 3]
    assert CharLSTMTokenizer(vocab=str(tmp_path / "vocab.json"), **specials)("ab")["input_ids"] == [2, 5, 6, 3]
    assert CharLSTMTokenizer(vocab=LEGACY_VOCAB, **specials)("ab")["input_ids"] == [5, 6]
    # a post-processor that is not a template (a tokenizer.json from elsewhere) adds nothing
    from tokenizers import processors

    byte_level = CharLSTMTokenizer(vocab=LEGACY_VOCAB, post_processor=processors.ByteLevel(), **specials)
    assert byte_level("ab")["input_ids"] == [5, 6]
    CharLSTMTokenizer.from_corpus([CORPUS, UNICODE_TEXT]).save_pretrained(tmp_path / "saved")
    from_file = CharLSTMTokenizer(tokenizer_file=str(tmp_path / "saved" / "tokenizer.json"))
    assert (
        from_file(UNICODE_TEXT)["input_ids"]
        == CharLSTMTokenizer.from_corpus([CORPUS, UNICODE_TEXT])(UNICODE_TEXT)["input_ids"]
    )


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
    assert "auto_map" not in json.loads((tmp_path / "tokenizer_config.json").read_text())  # loads with no code
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(loaded, CharLSTMTokenizer)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.padding_side == "right"
    assert loaded.add_eos_token and loaded.eos_token == "<eos>"
    assert loaded(UNICODE_TEXT)["input_ids"] == tokenizer(UNICODE_TEXT)["input_ids"]
    assert loaded.decode(loaded(UNICODE_TEXT)["input_ids"], skip_special_tokens=True) == UNICODE_TEXT
    # The tokenizers library alone reads tokenizer.json with the same ids (template included).
    assert (
        Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(UNICODE_TEXT).ids
        == tokenizer(UNICODE_TEXT)["input_ids"]
    )


CLEAN_PROCESS = """
import json, sys
sys.modules["char_lstm"] = None  # the package cannot be imported
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
text = sys.argv[2]
encoding = tokenizer([text], return_offsets_mapping=True)
explicit = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=False)
assert explicit([text])["input_ids"] == encoding["input_ids"]
print("RESULT", json.dumps({"class": type(tokenizer).__name__, "ids": encoding["input_ids"][0],
                  "offsets": encoding["offset_mapping"][0], "decoded": tokenizer.decode(encoding["input_ids"][0]),
                  "bos": tokenizer.bos_token, "eos": tokenizer.eos_token, "padding_side": tokenizer.padding_side}))
"""


def test_auto_tokenizer_without_remote_code_in_a_process_without_the_package(tmp_path):
    """A saved model folder (config.json with auto_map included) loads its tokenizer from tokenizer.json with no
    trust_remote_code and without char_lstm."""
    from helpers import make_model

    tokenizer = CharLSTMTokenizer.from_corpus([CORPUS, UNICODE_TEXT], document_boundary=True)
    make_model(tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    text = UNICODE_TEXT + "<eos>" + CORPUS
    out = subprocess.run(
        [sys.executable, "-c", CLEAN_PROCESS, str(tmp_path), text],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    # (transformers asks once whether to run the config's code; with no terminal it goes on without it)
    result = json.loads(out.stdout.split("RESULT ", 1)[1])
    assert result["class"] == "TokenizersBackend"
    assert result["ids"] == tokenizer(text)["input_ids"]
    assert result["decoded"] == text
    assert [tuple(o) for o in result["offsets"]] == tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    assert (result["bos"], result["eos"], result["padding_side"]) == ("<eos>", "<eos>", "right")


# What the version before tokenizer.json wrote (vocab.json + tokenizer_config.json, copied from a real save).
LEGACY_TOKENIZER_CONFIG = {
    "added_tokens_decoder": {
        str(i): {"content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": True}
        for i, token in enumerate(["<pad>", "<unk>", "<bos>", "<eos>"])
    },
    "auto_map": {"AutoTokenizer": ["tokenization_char_lstm.CharLSTMTokenizer", None]},
    "backend": "custom",
    "bos_token": "<bos>",
    "clean_up_tokenization_spaces": False,
    "eos_token": "<eos>",
    "model_max_length": 1000000000000000019884624838656,
    "pad_token": "<pad>",
    "padding_side": "left",
    "split_special_tokens": True,
    "tokenizer_class": "CharLSTMTokenizer",
    "unk_token": "<unk>",
}
LEGACY_VOCAB = {"<pad>": 0, "<unk>": 1, "<bos>": 2, "<eos>": 3, " ": 4, "a": 5, "b": 6, "c": 7}


def test_folders_saved_before_tokenizer_json_still_load(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps(LEGACY_VOCAB, indent=0), encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(LEGACY_TOKENIZER_CONFIG, indent=2), encoding="utf-8")
    for loaded in (CharLSTMTokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)):
        assert isinstance(loaded, CharLSTMTokenizer)
        assert loaded.get_vocab() == LEGACY_VOCAB and len(loaded) == 8
        # as that version did: bos/eos added, left padding, special strings typed in text read as characters
        assert loaded("ab c")["input_ids"] == [2, 5, 6, 4, 7, 3]
        assert loaded.padding_side == "left"
        assert len(loaded("<eos>", add_special_tokens=False)["input_ids"]) == 5
        assert loaded.decode(loaded("ab c")["input_ids"], skip_special_tokens=True) == "ab c"
        assert loaded.encode_corpus("ab cz").tolist() == [5, 6, 4, 7, 1]
    # saved again, it gains tokenizer.json and keeps its behaviour
    loaded.save_pretrained(tmp_path / "again")
    again = AutoTokenizer.from_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "tokenizer.json").is_file()
    assert again("ab c")["input_ids"] == [2, 5, 6, 4, 7, 3] and again.padding_side == "left"


def test_special_tokens_given_at_init_or_load_are_added(tmp_path):
    tokenizer = CharLSTMTokenizer.from_corpus("abc", pad_token="[PAD]", eos_token="</s>")
    vocab = tokenizer.get_vocab()
    assert {tokenizer.pad_token_id, tokenizer.eos_token_id} == {vocab["[PAD]"], vocab["</s>"]} == {5, 6}
    assert len(tokenizer) == 7
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, bos_token="<s>", add_bos_token=True)
    assert loaded.bos_token_id == 7 and len(loaded) == 8
    assert loaded("ab")["input_ids"] == [7, 2, 3]
    assert loaded.decode(loaded("ab")["input_ids"], skip_special_tokens=True) == "ab"


def test_added_tokens_are_in_the_vocabulary_matched_in_text_and_resize_the_model():
    from helpers import make_model

    tokenizer = CharLSTMTokenizer.from_corpus("abc []ST")
    before = len(tokenizer)
    assert tokenizer.add_tokens(["[ST]", "<new>"]) == 2
    assert len(tokenizer) == before + 2
    vocab = tokenizer.get_vocab()
    assert vocab["[ST]"] == before and vocab["<new>"] == before + 1
    assert tokenizer.tokenize("a[ST]b") == ["a", "[ST]", "b"]
    assert tokenizer.decode(tokenizer("a[ST]b<new>")["input_ids"]) == "a[ST]b<new>"
    model = make_model(CharLSTMTokenizer.from_corpus("abc []ST"))
    model.resize_token_embeddings(len(tokenizer))
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == model.config.vocab_size
    assert model.lm_head.weight.shape[0] == len(tokenizer)
    with torch.no_grad():
        assert model(**tokenizer(["a[ST]b<new>"], return_tensors="pt")).logits.shape == (1, 4, len(tokenizer))


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
    with pytest.raises(
        ValueError,
        match=r"^CharLSTMTokenizer needs a vocabulary: pass vocab=\{...\} or vocab_file=... "
        r"\(a vocab.json\), or build one with CharLSTMTokenizer.from_corpus\(texts\).$",
    ):
        CharLSTMTokenizer()
    with pytest.raises(TypeError, match="^from_corpus takes a str or an iterable of str, got an item of type int.$"):
        CharLSTMTokenizer.from_corpus(["ab", 3])
    path = tmp_path / "vocab.json"
    for content in (b'{"a": 0,', b"\xff\xfe{}"):
        path.write_bytes(content)
        with pytest.raises(ValueError, match=f"^{path} is not valid JSON .*; save the tokenizer again"):
            CharLSTMTokenizer(vocab_file=str(path))
    for content, kind in (('["a", "<unk>"]', "list"), ('{"a": "0", "<unk>": 1}', "dict")):
        path.write_text(content)
        with pytest.raises(ValueError, match=f"^{path} holds a {kind}, not a mapping of tokens to ids "
                           + r'\(such as \{"a": 0, "<unk>": 1\}\); save the tokenizer again'):
            CharLSTMTokenizer(vocab=str(path))
    with pytest.raises(ValueError, match="no '<unk>' token"):
        CharLSTMTokenizer(vocab={"<pad>": 0, "a": 1})


def test_encode_corpus_with_a_large_vocabulary():
    text = "".join(chr(0x4E00 + i) for i in range(300)) + "abc"
    tokenizer = CharLSTMTokenizer.from_corpus(text)
    ids = tokenizer.encode_corpus(text + "?")
    assert ids.dtype == np.uint16
    assert ids.tolist() == tokenizer(text + "?")["input_ids"]


def test_a_folder_with_tokenizer_json_alone_loads(tmp_path):
    """vocab.json is written for earlier versions; tokenizer.json alone (as other runtimes save it) is enough."""
    tokenizer = CharLSTMTokenizer.from_corpus([CORPUS, UNICODE_TEXT], add_eos_token=True)
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "vocab.json").unlink()
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded(UNICODE_TEXT)["input_ids"] == tokenizer(UNICODE_TEXT)["input_ids"]


def test_vocab_json_is_utf8_in_id_order_one_entry_a_line_without_added_tokens(tmp_path):
    tokenizer = CharLSTMTokenizer.from_corpus("b a中")
    tokenizer.add_tokens(["<new>"])
    assert tokenizer.save_vocabulary(str(tmp_path)) == (str(tmp_path / "vocab.json"),)
    text = (tmp_path / "vocab.json").read_bytes().decode("utf-8")
    # the layout earlier versions wrote: ids in order (not sorted by token), characters as they are (not \u escapes)
    assert text == '{\n"<pad>": 0,\n"<unk>": 1,\n" ": 2,\n"a": 3,\n"b": 4,\n"中": 5\n}\n'
    assert tokenizer.save_vocabulary(str(tmp_path), filename_prefix="run") == (str(tmp_path / "run-vocab.json"),)
    assert (tmp_path / "run-vocab.json").read_text(encoding="utf-8") == text
    with pytest.raises(ValueError, match="should be a directory"):
        tokenizer.save_vocabulary(str(tmp_path / "vocab.json"))


def test_encode_corpus_builds_its_table_once_and_again_when_tokens_are_added():
    """The code point -> id table (0x110000 entries) is built at the first call, reused while the vocabulary stays
    the same, and rebuilt when tokens are added."""
    tokenizer = CharLSTMTokenizer.from_corpus("ab")
    assert tokenizer.encode_corpus("abc").tolist() == [2, 3, 1]
    table = tokenizer._lookup_table()
    assert tokenizer.encode_corpus("ba").tolist() == [3, 2] and tokenizer._lookup_table() is table
    assert tokenizer.oov_characters("abc") == ["c"]
    tokenizer.add_tokens(["c"])
    assert tokenizer.oov_characters("abc") == []
    assert tokenizer.encode_corpus("abc").tolist() == [2, 3, 4] and tokenizer._lookup_table() is not table


def test_encode_corpus_reads_a_lone_surrogate_as_unk():
    """Text decoded with errors="surrogateescape" can hold lone surrogates: they are characters outside the
    vocabulary."""
    tokenizer = CharLSTMTokenizer.from_corpus("ab")
    assert tokenizer.encode_corpus("a\udcffb\ud800").tolist() == [2, 1, 3, 1]
    assert tokenizer.oov_characters("a\udcffb") == ["\udcff"]


def test_loading_options_are_not_saved_with_the_tokenizer(tmp_path):
    """from_pretrained(..., local_files_only=True) (as the scripts load a folder when the Hub cannot be reached)
    then save_pretrained (push_to_hub.py's folder) wrote "is_local" and "local_files_only" into
    tokenizer_config.json."""
    CharLSTMTokenizer.from_corpus("hello world").save_pretrained(tmp_path / "first")
    loaded = CharLSTMTokenizer.from_pretrained(tmp_path / "first", local_files_only=True)
    loaded.save_pretrained(tmp_path / "second")
    config = json.loads((tmp_path / "second" / "tokenizer_config.json").read_text())
    assert "is_local" not in config and "local_files_only" not in config
    assert config["tokenizer_class"] == "CharLSTMTokenizer"
