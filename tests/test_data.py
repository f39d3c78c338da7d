"""char_lstm.data: loading exact text with datasets, the validation tail, vectorized blocks, the cache."""

import json
import logging
import os

import numpy as np
import pandas as pd
import pytest
from datasets import Dataset

from char_lstm import CharLSTMTokenizer
from char_lstm.data import (
    BUNDLED_DATASET,
    DEFAULT_DATASET,
    DataError,
    build_tokenizer,
    collate_blocks,
    collate_stream_blocks,
    count_oov,
    encode_blocks,
    encode_streams,
    encode_text,
    load_raw_datasets,
    read_text_file,
    resolve_dataset_name,
    split_validation_tail,
)
from helpers import shakespeare_like, write_text


MESSY = "line one\r\nline two\n\n\tindented  two spaces   three\r\n\u00e9t\u00e9 \u4e2d\u6587 \U0001f600 end\n"


def test_text_file_is_read_exactly(tmp_path):
    path = write_text(tmp_path / "messy.txt", MESSY)
    assert read_text_file(path) == MESSY
    raw = load_raw_datasets(train_file=str(path))
    assert raw["train"][0]["text"] == MESSY  # no line splitting, no newline translation


def test_empty_and_missing_files(tmp_path):
    empty = write_text(tmp_path / "empty.txt", "")
    with pytest.raises(DataError, match="empty.txt is empty"):
        load_raw_datasets(train_file=str(empty))
    with pytest.raises(DataError, match="nope.txt does not exist"):
        load_raw_datasets(train_file=str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="matches no file"):
        load_raw_datasets(train_file=str(tmp_path / "*.missing"))


def test_non_utf8_file_names_the_byte_offset_and_encoding_option(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\u00e9 ol\u00e9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.txt is not valid utf-8: the byte at offset 3 \(0xe9\).*--encoding"):
        load_raw_datasets(train_file=str(path))
    raw = load_raw_datasets(train_file=str(path), encoding="latin-1")
    assert raw["train"][0]["text"] == "caf\u00e9 ol\u00e9"


def test_directory_glob_jsonl_csv_parquet(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    write_text(folder / "b.txt", "second\n")
    write_text(folder / "a.txt", "first\n")
    (folder / "notes.bin").write_bytes(b"\x00\x01")
    assert load_raw_datasets(train_file=str(folder))["train"]["text"] == ["first\n", "second\n"]
    assert load_raw_datasets(train_file=str(folder / "*.txt"))["train"]["text"] == ["first\n", "second\n"]

    rows = [{"body": "one\n  two"}, {"body": "three\tfour"}]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    assert load_raw_datasets(train_file=str(jsonl), text_column="body")["train"]["body"] == [r["body"] for r in rows]
    pd.DataFrame(rows).to_csv(tmp_path / "data.csv", index=False)
    assert load_raw_datasets(train_file=str(tmp_path / "data.csv"), text_column="body")["train"]["body"] == [
        r["body"] for r in rows
    ]
    pd.DataFrame(rows).to_parquet(tmp_path / "data.parquet")
    raw = load_raw_datasets(train_file=str(tmp_path / "data.parquet"), text_column="body")
    assert raw["train"]["body"] == [r["body"] for r in rows]
    with pytest.raises(DataError, match=r"no column 'text' \(columns: \['body'\]\); choose one with --text_column"):
        load_raw_datasets(train_file=str(jsonl))


def test_directory_of_mixed_files_uses_the_txt_files_and_says_which(tmp_path, caplog):
    books = tmp_path / "books"
    (books / "drafts").mkdir(parents=True)
    write_text(books / "b.txt", "second\n")
    write_text(books / "a.txt", "first\n")
    write_text(books / "README.md", "# not a book\n")
    write_text(books / "index.csv", "title\nfirst\n")
    (books / "cover.png").write_bytes(b"\x89PNG")
    with caplog.at_level(logging.INFO, logger="char_lstm.data"):
        raw = load_raw_datasets(train_file=str(books))
    assert raw["train"]["text"] == ["first\n", "second\n"]
    assert (
        f"--train_file {books}: using 2 .txt file(s): a.txt, b.txt; skipped 4 other entries: README.md, cover.png, "
        "drafts/, index.csv" in caplog.text
    )
    for name in ("a.txt", "b.txt"):
        (books / name).unlink()
    with pytest.raises(DataError, match=r"books is a directory without .txt files \(it holds README.md, .*\); give "
                                        r"a file or a glob"):
        load_raw_datasets(train_file=str(books))


def test_local_folder_laid_out_like_the_hub_dataset(tmp_path):
    """Same layout as karpathy/tiny_shakespeare: data/{split}-00000-of-00001.parquet, one row each."""
    data = tmp_path / "tiny" / "data"
    data.mkdir(parents=True)
    texts = {"train": "First Citizen:\nSpeak.\n", "validation": "All:\nSpeak, speak.\n", "test": "ROMEO:\nSoft!\n"}
    for split, text in texts.items():
        pd.DataFrame({"text": [text]}).to_parquet(data / f"{split}-00000-of-00001.parquet")
    raw = load_raw_datasets(dataset_name=str(tmp_path / "tiny"))
    assert {split: raw[split][0]["text"] for split in texts} == texts


def test_unknown_or_offline_dataset_id_names_train_file():
    with pytest.raises(DataError, match="Could not load the dataset 'no-such-user/no-such-dataset'.*--train_file"):
        load_raw_datasets(dataset_name="no-such-user/no-such-dataset")
    assert resolve_dataset_name("no-such-user/no-such-dataset") == "no-such-user/no-such-dataset"  # no fallback


def test_bundled_tiny_shakespeare_replaces_the_hub_dataset_offline(caplog):
    """Offline (conftest sets HF_HUB_OFFLINE=1), the default dataset becomes the bundled copy, said in one info line,
    split like karpathy/tiny_shakespeare: one row per split, the first 90% / next 5% / last 5% of the characters."""
    with caplog.at_level(logging.INFO, logger="char_lstm.data"):
        name = resolve_dataset_name(DEFAULT_DATASET)
    assert name == BUNDLED_DATASET
    assert [r.getMessage() for r in caplog.records if "bundled" in r.getMessage()] == [
        f"{DEFAULT_DATASET} cannot be reached (HF_HUB_OFFLINE is set): using the copy of tiny_shakespeare bundled "
        "with char_lstm (same train/validation/test split)."
    ]
    raw = load_raw_datasets(dataset_name=name)
    texts = {split: raw[split]["text"] for split in ("train", "validation", "test")}
    assert {split: len(rows) for split, rows in texts.items()} == {"train": 1, "validation": 1, "test": 1}
    lengths = {split: len(rows[0]) for split, rows in texts.items()}
    assert lengths == {"train": 1003854, "validation": 55770, "test": 55770}
    assert texts["train"][0].startswith("First Citizen:\nBefore we proceed any further, hear me speak.")
    assert texts["test"][0].endswith("Whiles thou art waking.\n")
    streamed = load_raw_datasets(dataset_name=name, streaming=True)
    assert next(iter(streamed["validation"]))["text"] == texts["validation"][0]


def test_validation_tail_is_contiguous_and_exact(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    docs = ["a" * 50, "b" * 30, "c" * 20]
    for i, doc in enumerate(docs):
        write_text(folder / f"{i}.txt", doc)
    train = load_raw_datasets(train_file=str(folder))["train"]
    head, tail = split_validation_tail(train, "text", 25)
    assert head["text"] == ["a" * 50, "b" * 25]
    assert tail["text"] == ["b" * 5, "c" * 20]
    with pytest.raises(DataError, match=r"in \(0, 100\)"):
        split_validation_tail(train, "text", 0)


def test_blocks_cover_the_text_once_and_keep_every_character(tmp_path):
    text = MESSY * 20
    tokenizer = CharLSTMTokenizer.from_corpus(text)
    raw = load_raw_datasets(train_file=str(write_text(tmp_path / "t.txt", text)))
    blocks = encode_blocks(raw["train"], tokenizer, "text", block_size=16)
    assert blocks.features["input_ids"].feature.dtype == "uint8"
    rows = [np.asarray(r) for r in blocks["input_ids"]]
    assert all(len(r) == 17 for r in rows)
    assert len(rows) == (len(text) - 1) // 16
    # consecutive windows share one character; together they give back the text exactly
    rebuilt = tokenizer.decode(np.concatenate([rows[0]] + [r[1:] for r in rows[1:]]).tolist())
    assert text.startswith(rebuilt) and len(text) - len(rebuilt) < 17

    overlapping = encode_blocks(raw["train"], tokenizer, "text", block_size=16, stride=4)
    assert len(overlapping) == (len(text) - 17) // 4 + 1
    assert overlapping[1]["input_ids"][:13] == overlapping[0]["input_ids"][4:]


def test_documents_are_joined_with_the_separator(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    write_text(folder / "1.txt", "abcdefgh")
    write_text(folder / "2.txt", "ijklmnop")
    raw = load_raw_datasets(train_file=str(folder))
    tokenizer = build_tokenizer(raw["train"], "text", "|")
    assert "|" in tokenizer.get_vocab()
    blocks = encode_blocks(raw["train"], tokenizer, "text", block_size=17, separator="|")
    # the tokenizers train.py builds have a boundary token: every document starts with it
    assert tokenizer.decode(blocks[0]["input_ids"]) == "<eos>abcdefgh<eos>ijklmnop"
    assert encode_text(raw["train"], tokenizer, "text", "|").tolist() == blocks[0]["input_ids"]
    # a tokenizer without one (saved by an earlier version) joins them with the separator
    plain = CharLSTMTokenizer.from_corpus("abcdefghijklmnop|")
    blocks = encode_blocks(raw["train"], plain, "text", block_size=16, separator="|")
    assert plain.decode(blocks[0]["input_ids"]) == "abcdefgh|ijklmnop"


def test_bad_block_size_and_stride(tmp_path):
    raw = load_raw_datasets(train_file=str(write_text(tmp_path / "t.txt", "abc" * 10)))
    tokenizer = CharLSTMTokenizer.from_corpus("abc")
    with pytest.raises(DataError, match="--block_size must be a positive"):
        encode_blocks(raw["train"], tokenizer, "text", block_size=0)
    with pytest.raises(DataError, match="--stride must be a positive"):
        encode_blocks(raw["train"], tokenizer, "text", block_size=4, stride=-1)


def test_second_run_reuses_the_encoded_cache(tmp_path):
    path = write_text(tmp_path / "t.txt", shakespeare_like(3000))

    def prepare():
        raw = load_raw_datasets(train_file=str(path))
        tokenizer = build_tokenizer(raw["train"], "text", "\n\n")
        return encode_blocks(raw["train"], tokenizer, "text", block_size=32)

    first = prepare()
    files = [f["filename"] for f in first.cache_files]
    assert files and all(os.path.exists(f) for f in files)
    mtimes = [os.stat(f).st_mtime_ns for f in files]
    second = prepare()
    assert [f["filename"] for f in second.cache_files] == files  # loaded from the cache...
    assert [os.stat(f).st_mtime_ns for f in files] == mtimes  # ...not written again
    assert second["input_ids"] == first["input_ids"]

    write_text(path, shakespeare_like(3000).upper())  # changed data -> new cache
    assert [f["filename"] for f in prepare().cache_files] != files


def test_oov_count_and_collator(tmp_path):
    tokenizer = CharLSTMTokenizer.from_corpus("abc ")
    raw = load_raw_datasets(train_file=str(write_text(tmp_path / "v.txt", "abc xyz zz")))
    assert count_oov(raw["train"], "text", tokenizer) == {"x": 1, "y": 1, "z": 3}
    batch = collate_blocks([{"input_ids": [1, 2, 3]}, {"input_ids": [3, 2, 1]}])
    assert batch["input_ids"].dtype == batch["labels"].dtype
    assert batch["input_ids"].tolist() == batch["labels"].tolist() == [[1, 2, 3], [3, 2, 1]]


def test_empty_cells_read_as_empty_text(tmp_path):
    pd.DataFrame({"text": ["first row", None, "third"]}).to_csv(tmp_path / "d.csv", index=False)
    raw = load_raw_datasets(train_file=str(tmp_path / "d.csv"))
    tokenizer = build_tokenizer(raw["train"], "text", "|")
    blocks = encode_blocks(raw["train"], tokenizer, "text", block_size=10, separator="|")
    assert tokenizer.decode(blocks[0]["input_ids"]) == "<eos>first row<eos>"
    head, tail = split_validation_tail(raw["train"], "text", 20)
    assert "".join(t or "" for t in list(head["text"]) + list(tail["text"])) == "first rowthird"


def test_streams_are_contiguous_and_each_process_owns_its_own(tmp_path):
    """The stateful layout read the way Trainer reads it: a sequential sampler, batches dealt to 2 processes by
    accelerate's own BatchSamplerShard. Every batch row continues its stream exactly, and the processes share no
    text."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler, SequentialSampler

    text = "".join(np.random.default_rng(0).choice(list("abcdefghijklmnop \n"), size=2000))  # no repeated stretch
    tokenizer = CharLSTMTokenizer.from_corpus(text)
    batch, processes, block = 3, 2, 10
    streams = encode_streams(
        Dataset.from_dict({"text": [text]}), tokenizer, "text", block, num_streams=batch * processes
    )
    windows = (len(text) - 1) // (batch * processes) // block
    assert len(streams) == windows * batch * processes
    read = {}
    for rank in range(processes):
        shard = BatchSamplerShard(BatchSampler(SequentialSampler(streams), batch, drop_last=False), processes, rank)
        steps = [collate_stream_blocks([streams[i] for i in indices]) for indices in shard]
        assert len(steps) == windows
        for row in range(batch):
            assert [step["window"][row].item() for step in steps] == list(range(windows))
            inputs = "".join(tokenizer.decode(step["input_ids"][row]) for step in steps)
            targets = "".join(tokenizer.decode(step["shift_labels"][row]) for step in steps)
            start = text.index(inputs)
            assert len(inputs) == windows * block and targets == text[start + 1 : start + 1 + len(inputs)]
            read[(rank, row)] = range(start, start + len(inputs) + 1)
    spans = sorted(read.values(), key=lambda span: span.start)
    assert len(spans) == batch * processes
    assert all(a.stop - 1 <= b.start for a, b in zip(spans, spans[1:]))  # predicted characters never overlap
    assert spans[0].start == 0


def test_stateful_text_too_short_names_the_split_and_the_fix():
    from char_lstm.data import stream_layout

    with pytest.raises(DataError, match="training text \\(0 characters\\) is too short"):
        stream_layout(0, 4, 10)
    tokenizer = CharLSTMTokenizer.from_corpus("abc")
    with pytest.raises(
        DataError, match="validation text .* too short for 8 streams.*smaller --per_device_eval_batch_size"
    ):
        encode_streams(Dataset.from_dict({"text": ["abc" * 20]}), tokenizer, "text", 10, 8, name="validation")
