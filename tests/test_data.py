"""char_lstm.data: loading exact text with datasets, the validation tail, vectorized blocks, the cache."""

import json
import logging
import math
import os

import numpy as np
import pandas as pd
import pytest
from datasets import Dataset

from char_lstm import CharLSTMTokenizer
from char_lstm.data import (
    BUNDLED_DATASET,
    DEFAULT_DATASET,
    load_files,
    load_raw_datasets,
    read_text_file,
    resolve_dataset_name,
    split_validation_tail,
)
from char_lstm.encoding import build_tokenizer, collate_blocks, count_oov, encode_blocks
from char_lstm.errors import DataError
from char_lstm.streams import collate_stream_blocks, encode_streams, encode_text
from char_lstm.text_files import CONTINUES_COLUMN, LENGTH_COLUMN, file_parts, part_rows
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


def test_a_folder_is_read_recursively_and_what_is_not_text_is_skipped_and_counted(tmp_path, caplog):
    tree = tmp_path / "project"
    (tree / "src" / "deep").mkdir(parents=True)
    (tree / ".git").mkdir()
    write_text(tree / "src" / "main.c", "int main(void) { return 0; }\n")
    write_text(tree / "src" / "deep" / "util.h", "#define ONE 1\n")
    write_text(tree / "Makefile", "all:\n\tcc src/main.c\n")
    write_text(tree / "package.json", '{"name": "x"}\n')  # text in a tree of text, not a JSON dataset
    write_text(tree / ".git" / "config", "[core]\n")
    (tree / "src" / "main.o").write_bytes(b"\x7fELF\x02\x01\x01\x00\x00")
    (tree / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (tree / "latin.txt").write_bytes("caf\u00e9".encode("latin-1"))
    (tree / "empty.txt").write_bytes(b"")
    with caplog.at_level(logging.INFO, logger="char_lstm.text_files"):
        raw = load_raw_datasets(train_file=str(tree))
    assert raw["train"]["text"] == ["all:\n\tcc src/main.c\n", '{"name": "x"}\n', "#define ONE 1\n",
                                    "int main(void) { return 0; }\n"]
    assert raw["train"][CONTINUES_COLUMN] == [False] * 4
    assert raw["train"][LENGTH_COLUMN] == [len(text) for text in raw["train"]["text"]]
    head, tail = split_validation_tail(raw["train"], "text", 10)  # the cut row's pieces carry their own lengths
    for part in (head, tail):
        assert part[LENGTH_COLUMN] == [len(text) for text in part["text"]]
    assert "".join(list(head["text"]) + list(tail["text"])) == "".join(raw["train"]["text"])
    assert len("".join(tail["text"])) == 8  # 10% of 77 characters, rounded up
    line = [r.message for r in caplog.records if "skipped" in r.message]
    assert len(line) == 1 and line[0].startswith("--train_file: reading 4 text file(s); skipped 3 that are not utf-8 "
                                                 "text (binaries, images...): ") and "and 1 empty one(s)" in line[0]
    assert all(name in line[0] for name in ("latin.txt", "logo.png", "main.o"))
    only_c = load_raw_datasets(train_file=str(tree), include=["*.c", "*.h"], exclude=["src/deep/*"])
    assert only_c["train"]["text"] == ["int main(void) { return 0; }\n"]
    assert load_raw_datasets(train_file=str(tree / "**" / "*.[ch]"))["train"]["text"] == [
        "#define ONE 1\n", "int main(void) { return 0; }\n"]  # src/deep/util.h, src/main.c
    with pytest.raises(DataError, match="holds no file \\(--include \\*.rs\\): it holds Makefile, empty.txt"):
        load_raw_datasets(train_file=str(tree), include=["*.rs"])
    with pytest.raises(DataError, match="main.o has NUL bytes: it is a binary file"):
        load_raw_datasets(train_file=str(tree / "src" / "main.o"))


def test_files_of_any_extension_or_none_are_text(tmp_path):
    for name in ("notes", "song.abc", "paper.tex", "main.rs"):
        write_text(tmp_path / name, f"text of {name}\n")
        assert load_raw_datasets(train_file=str(tmp_path / name))["train"]["text"] == [f"text of {name}\n"]


def test_large_files_become_rows_that_cover_the_text_exactly_and_blocks_do_not_change(tmp_path):
    """A file is cut into rows of bounded size (and parts, for several processes) at any character, multi-byte
    ones included; the blocks and the document boundaries are those of the file read whole."""
    text = ("Sing, O goddess \u4e2d\u6587 \U0001f600 the anger of Achilles\n" * 300)
    path = write_text(tmp_path / "big.txt", text)
    other = write_text(tmp_path / "small.txt", "the second document\n" * 20)
    data = text.encode("utf-8")
    parts = file_parts([str(path)], "utf-8", part_bytes=1000)
    assert len(parts) > 10 and parts[0][1] == 0 and parts[-1][2] == len(data)
    assert all(a[2] == b[1] for a, b in zip(parts, parts[1:]))
    assert "".join(t for part in parts for t, _ in part_rows(part, "utf-8", row_chars=97)) == text
    rows = load_files([str(path), str(other)], "text", "utf-8", row_chars=97)
    assert "".join(rows["text"]) == text + "the second document\n" * 20
    starts = [i for i, continues in enumerate(rows[CONTINUES_COLUMN]) if not continues]
    assert starts == [0, math.ceil(len(text) / 97)]
    whole = Dataset.from_dict({"text": [text, "the second document\n" * 20]})
    tokenizer = build_tokenizer(whole, "text", "\n\n")
    assert encode_text(rows, tokenizer, "text").tolist() == encode_text(whole, tokenizer, "text").tolist()
    assert build_tokenizer(rows, "text", "\n\n").get_vocab() == tokenizer.get_vocab()


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
    from char_lstm.streams import stream_layout

    with pytest.raises(DataError, match="training text \\(0 characters\\) is too short"):
        stream_layout(0, 4, 10)
    tokenizer = CharLSTMTokenizer.from_corpus("abc")
    with pytest.raises(
        DataError, match="validation text .* too short for 8 streams.*smaller --per_device_eval_batch_size"
    ):
        encode_streams(Dataset.from_dict({"text": ["abc" * 20]}), tokenizer, "text", 10, 8, name="validation")


def test_a_stream_over_several_processes_gives_each_its_own_files(tmp_path):
    """--streaming with two processes: accelerate deals the stream's shards (files, parts of large files) out to the
    processes, so each reads only its own, and together they read every block once."""
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    for index in range(4):
        write_text(tmp_path / f"part{index}.txt", f"file number {index} " * 30)
    raw = load_raw_datasets(train_file=str(tmp_path / "part*.txt"), streaming=True)
    assert raw["train"].n_shards == 4
    tokenizer = build_tokenizer(raw["train"], "text", "\n\n")
    blocks = encode_blocks(raw["train"], tokenizer, "text", block_size=16)
    seen = []
    for rank in (0, 1):
        loader = prepare_data_loader(DataLoader(blocks, batch_size=2, collate_fn=collate_blocks), num_processes=2,
                                     process_index=rank, dispatch_batches=False, put_on_device=False)
        texts = {tokenizer.decode(row) for batch in loader for row in batch["input_ids"]}
        seen.append({digit for text in texts for digit in "0123" if f"number {digit}" in text})
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == {"0", "1", "2", "3"}
