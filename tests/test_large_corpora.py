"""Corpora as users bring them, in training: many distinct characters (the adaptive softmax, the vocabulary
controls), source trees; and as files: byte-order marks, whitespace only, the record of what a folder gave. Small
generated data; the sizes and speeds are measured by benchmarks/scale.py."""

import logging
import math
import os

import numpy as np
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from char_lstm.data import file_selection, load_files, load_raw_datasets, read_text_file
from char_lstm.errors import DataError, UsageError
from char_lstm.text_files import LENGTH_COLUMN, SNIFF_BYTES, file_parts, part_rows
from char_lstm.training import train
from char_lstm.training.arguments import parse_arguments
from helpers import write_text


TINY = [
    "--embedding_size", "16", "--hidden_size", "32", "--dropout", "0.0", "--block_size", "32",
    "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--report_to", "none",
    "--dataloader_pin_memory", "false", "--sample_length", "20", "--max_steps", "4", "--eval_steps", "4",
    "--save_steps", "4", "--sample_every_evals", "0",
]


def many_characters(n_chars: int = 30_000, distinct: int = 1500, seed: int = 0) -> str:
    """Lines of CJK characters drawn with Zipf-like frequencies (a few hundred frequent, the rest rare), as Chinese
    text has them."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, distinct + 1)
    codes = 0x4E00 + rng.choice(distinct, size=n_chars, p=weights / weights.sum())
    chars = [chr(code) for code in codes]
    return "".join(c + ("\n" if i % 24 == 23 else "") for i, c in enumerate(chars))


def run(tmp_path, text, *extra, out="out"):
    data = write_text(tmp_path / "train.txt", text)
    metrics = train(*parse_arguments(["--train_file", str(data), "--output_dir", str(tmp_path / out), *TINY,
                                      *extra]))
    return metrics, tmp_path / out


def test_a_large_vocabulary_gets_an_adaptive_softmax_over_ids_by_frequency(tmp_path, caplog):
    text = many_characters()
    with caplog.at_level(logging.INFO, logger="char_lstm"):
        metrics, out = run(tmp_path, text)
    assert np.isfinite(metrics["eval_loss"]) and np.isfinite(metrics["eval_bits_per_char"])
    lines = [r.message for r in caplog.records if "adaptive softmax" in r.message]
    assert len(lines) == 1 and "--adaptive_softmax off" in lines[0]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.adaptive_softmax_cutoffs == [256]
    train_text = text[: len(text) - math.ceil(len(text) * 0.05)]  # without the validation tail
    counts = {c: train_text.count(c) for c in set(train_text)}
    most_frequent = max(counts, key=lambda c: (counts[c], -ord(c)))
    assert tokenizer.convert_tokens_to_ids(most_frequent) == 3  # after <pad>, <unk>, <eos>
    ids = [tokenizer.convert_tokens_to_ids(c) for c in sorted(counts, key=lambda c: (-counts[c], c))]
    assert ids == list(range(3, 3 + len(counts)))
    prompt = tokenizer([text[:5]], return_tensors="pt")
    assert model.generate(**prompt, max_new_tokens=8, do_sample=False).shape == (1, 13)


def test_evaluation_of_an_adaptive_softmax_reads_the_targets_clusters_only_and_measures_the_same(tmp_path,
                                                                                                monkeypatch):
    """Trainer's evaluation with `logits_at_targets` (what `train()` sets for an adaptive softmax) never computes the
    full distribution (torch's `log_prob`, counted) and gives its metrics."""
    from functools import partial

    import datasets
    import torch
    from transformers import TrainingArguments

    from char_lstm import CharLSTMConfig, CharLSTMForCausalLM
    from char_lstm.training.checkpoints import CharLSTMTrainer
    from char_lstm.training.metrics import BatchedMetrics, preprocess_logits_for_metrics

    torch.manual_seed(0)
    config = CharLSTMConfig(vocab_size=400, embedding_size=16, hidden_size=32, adaptive_softmax_cutoffs=[20, 100],
                            unk_token_id=1, eos_token_id=2, bos_token_id=2)
    model = CharLSTMForCausalLM(config)
    ids = torch.randint(3, 400, (40, 33), generator=torch.Generator().manual_seed(1))
    blocks = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}).with_format("torch")
    full_distributions = []
    log_prob = torch.nn.AdaptiveLogSoftmaxWithLoss.log_prob
    monkeypatch.setattr(torch.nn.AdaptiveLogSoftmaxWithLoss, "log_prob",
                        lambda self, x: full_distributions.append(len(x)) or log_prob(self, x))
    results, calls = {}, {}
    for at_targets in (False, True):
        trainer = CharLSTMTrainer(
            model=model, eval_dataset=blocks, compute_metrics=BatchedMetrics(),
            preprocess_logits_for_metrics=partial(preprocess_logits_for_metrics),
            args=TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=16, report_to="none",
                                   batch_eval_metrics=True, use_cpu=True),
        )
        trainer.eval_logits_at_targets = at_targets
        full_distributions.clear()
        results[at_targets] = trainer.evaluate()
        calls[at_targets] = len(full_distributions)
    assert calls == {False: 3, True: 0}  # 40 blocks in batches of 16
    for name in ("eval_loss", "eval_bits_per_char", "eval_perplexity"):
        assert results[True][name] == pytest.approx(results[False][name], rel=1e-5), name
    model.eval()
    with torch.no_grad():
        full = model(input_ids=ids, labels=ids)
        at_targets = model(input_ids=ids, labels=ids, logits_at_targets=True)
    expected = full.logits[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert at_targets.logits.shape == (40, 33) and torch.allclose(at_targets.logits[:, :-1], expected, atol=1e-5)
    assert torch.all(at_targets.logits[:, -1] == 0) and torch.allclose(at_targets.loss, full.loss)
    assert results[True]["eval_bits_per_char"] == pytest.approx(float(-expected.mean()) / math.log(2), rel=1e-5)


def test_the_full_softmax_and_the_vocabulary_controls(tmp_path, caplog):
    text = many_characters(distinct=1200)
    with caplog.at_level(logging.INFO, logger="char_lstm"):
        _, out = run(tmp_path, text, "--adaptive_softmax", "off", "--max_vocab_size", "300")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.adaptive_softmax_cutoffs is None and model.config.vocab_size == 300 + 3  # and 3 specials
    lines = [r.message for r in caplog.records if "become <unk>" in r.message]
    assert len(lines) == 1 and lines[0].startswith("--max_vocab_size 300: ")
    assert " distinct characters become <unk> (" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="char_lstm"):
        _, out = run(tmp_path, text, "--min_char_count", "20", "--adaptive_softmax", "16,64", out="out2")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.adaptive_softmax_cutoffs == [16, 64]
    assert any(r.message.startswith("--min_char_count 20: ") for r in caplog.records)
    assert all(text.count(c) >= 20 for c in AutoTokenizer.from_pretrained(out).get_vocab() if len(c) == 1 and
               c != "\n")


@pytest.mark.parametrize(("flags", "message"), [
    (("--adaptive_softmax", "2048,256"), "--adaptive_softmax '2048,256': use auto, off, or increasing cutoffs"),
    (("--adaptive_softmax", "many"), "--adaptive_softmax 'many': use auto, off"),
    (("--label_smoothing_factor", "0.1"), "--label_smoothing_factor smooths over the logits of the full softmax"),
    (("--max_vocab_size", "0"), "--max_vocab_size must be at least 1 character, got 0."),
])
def test_bad_large_vocabulary_flags_are_one_line(tmp_path, flags, message):
    with pytest.raises(UsageError, match=message.replace("(", "\\(").replace("'", ".")):
        run(tmp_path, many_characters(n_chars=10_000, distinct=2000), *flags)


def test_the_lean_sampler_gives_accelerates_order_without_a_list_of_every_index():
    """Trainer's RandomSampler, which accelerate replaces by its SeedableRandomSampler, makes a Python list of the
    whole epoch's indices (560 MB for 1 GB of text); LeanRandomSampler yields the same order slice by slice."""
    import torch
    from accelerate.data_loader import SeedableRandomSampler

    from char_lstm.training.samplers import LeanRandomSampler

    torch.manual_seed(7)
    data = range(10_007)
    reference = SeedableRandomSampler(data_source=data, data_seed=None)
    lean = LeanRandomSampler(len(data), None, slice_size=1000)
    for epoch in range(3):
        reference.set_epoch(epoch)
        lean.set_epoch(epoch)
        assert list(lean) == list(reference)
    assert list(LeanRandomSampler(len(data), 5)) != list(LeanRandomSampler(len(data), 6))


def test_the_blocks_pages_a_run_has_read_are_unmapped_and_read_again(tmp_path):
    """release_mapped_pages drops the pages of memory-mapped blocks from the process (Linux); the blocks read the
    same afterwards."""
    from datasets import Dataset, load_from_disk

    from char_lstm.encoding import release_mapped_pages

    rows = np.arange(200_000 * 65, dtype=np.uint16).reshape(-1, 65) % 300
    path = tmp_path / "blocks"
    Dataset.from_dict({"input_ids": rows}).save_to_disk(str(path))
    blocks = load_from_disk(str(path))

    def mapped_kb():
        total, inside = 0, False
        for line in open("/proc/self/smaps"):
            if "-" in line.split()[0] and not line.split()[0].endswith(":"):
                inside = str(path) in line
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
        return total

    if not os.path.exists("/proc/self/smaps"):
        pytest.skip("no /proc/self/smaps to read the mapped pages from")
    before = [blocks[int(i)]["input_ids"] for i in np.random.default_rng(0).integers(0, len(blocks), 300)]
    read = mapped_kb()
    release_mapped_pages(blocks)
    assert mapped_kb() < read / 4
    after = [blocks[int(i)]["input_ids"] for i in np.random.default_rng(0).integers(0, len(blocks), 300)]
    assert before == after


def test_whitespace_only_text_of_any_size_is_refused(tmp_path):
    """A file of whitespace is refused whatever its size (it was only when its first SNIFF_BYTES were all of it); a
    character after them is found; a folder or glob whose text files are all whitespace is refused too."""
    blank = " \t\n\r" * (3 * SNIFF_BYTES // 4)  # 3 x SNIFF_BYTES
    big = write_text(tmp_path / "big.txt", blank)
    for read in (lambda: load_raw_datasets(train_file=str(big)), lambda: read_text_file(big)):
        with pytest.raises(DataError, match=r"big.txt holds only whitespace: the training text needs characters"):
            read()
    late = write_text(tmp_path / "late.txt", blank + "x")
    assert load_raw_datasets(train_file=str(late))["train"]["text"] == [blank + "x"]
    utf16 = tmp_path / "blank16.txt"
    utf16.write_bytes(blank.encode("utf-16"))  # with a byte-order mark: its NUL bytes are UTF-16's, not binary
    with pytest.raises(DataError, match="blank16.txt holds only whitespace"):
        load_raw_datasets(train_file=str(utf16))
    folder = tmp_path / "blank"
    folder.mkdir()
    write_text(folder / "a.txt", blank)
    write_text(folder / "b.txt", "\n")
    for spec in (folder, folder / "*.txt"):
        with pytest.raises(DataError, match=r"^--train_file: its 2 text file\(s\) hold only whitespace \(.*a.txt, "
                                            r".*b.txt\): the training text needs characters to learn from.$"):
            load_raw_datasets(train_file=str(spec))
    write_text(folder / "c.txt", blank + "x")  # one character after a file's first SNIFF_BYTES is enough
    assert load_raw_datasets(train_file=str(folder))["train"][LENGTH_COLUMN] == [len(blank), 1, len(blank) + 1]


UNICODE_TEXT = "ROMEO:\nBut, soft! \u00e9t\u00e9 \u4e2d\u6587 \U0001f600 what light\n" * 40


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-be"])
def test_a_byte_order_mark_names_the_encoding_and_is_not_text(tmp_path, encoding):
    """A file that starts with a byte-order mark is read in the encoding it names (UTF-8, UTF-16, UTF-32, either
    byte order), whatever --encoding says, and its text does not start with U+FEFF: read whole, cut into parts on
    character boundaries (surrogate pairs kept whole), in a folder, and by read_text_file."""
    path = tmp_path / "bom.txt"
    # the codecs named by their byte order write no mark: the mark of that order first, as an editor saves it
    mark = {"utf-16-le": "\ufeff".encode("utf-16-le"), "utf-16-be": "\ufeff".encode("utf-16-be"),
            "utf-32-be": "\ufeff".encode("utf-32-be")}.get(encoding, b"")
    data = mark + UNICODE_TEXT.encode(encoding)
    path.write_bytes(data)
    assert read_text_file(path) == UNICODE_TEXT
    for given in ("utf-8", "latin-1"):
        assert load_raw_datasets(train_file=str(path), encoding=given)["train"]["text"] == [UNICODE_TEXT]
    parts = file_parts([str(path)], "utf-8", part_bytes=96)
    assert len(parts) > 10 and parts[-1][2] == len(data)
    unit = 4 if "32" in encoding else 2 if "16" in encoding else 1
    assert all(start % unit == 0 for _, start, _ in parts)
    if unit == 2:  # cuts every 96 bytes fall inside a surrogate pair (the emoji): they move to the pair's end
        order = "big" if data.startswith(b"\xfe\xff") else "little"
        low = [0xDC00 <= int.from_bytes(data[offset : offset + 2], order) <= 0xDFFF for offset in range(len(data))]
        assert any(low[offset] for offset in range(96, len(data), 96))
        assert not any(low[start] for _, start, _ in parts)
    texts = [text for part in parts for text, _ in part_rows(part, "utf-8", row_chars=37)]
    assert "".join(texts) == UNICODE_TEXT and not texts[0].startswith("\ufeff")
    rows = load_files([str(path)], "text", "utf-8", row_chars=37)
    assert "".join(rows["text"]) == UNICODE_TEXT and rows[LENGTH_COLUMN] == [len(text) for text in rows["text"]]
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "bom.txt").write_bytes(data)  # read, not skipped as NUL bytes or not UTF-8
    assert load_raw_datasets(train_file=str(folder))["train"]["text"] == [UNICODE_TEXT]
    assert file_selection(str(folder))["skipped_not_text"] == 0


def test_a_file_that_holds_only_a_byte_order_mark_is_empty(tmp_path):
    path = tmp_path / "mark.txt"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(DataError, match=r"mark.txt is empty \(a byte-order mark only\)"):
        load_raw_datasets(train_file=str(path))
    with pytest.raises(DataError, match="mark.txt is empty"):
        read_text_file(path)


def test_the_files_read_are_recorded_for_the_run(tmp_path):
    """What a --train_file value read (files, patterns, skipped, bytes) is kept by its arguments, from the one pass
    over the tree, for the run's record and model card."""
    tree = tmp_path / "kernel"
    (tree / "drivers").mkdir(parents=True)
    write_text(tree / "main.c", "int main(void) { return 0; }\n")
    write_text(tree / "util.h", "#define ONE 1\n")
    write_text(tree / "drivers" / "net.c", "int net;\n")
    write_text(tree / "notes.txt", "not code\n")
    (tree / "blob.c").write_bytes(b"\x7fELF\x00\x01")
    (tree / "empty.c").write_bytes(b"")
    load_raw_datasets(train_file=str(tree), include=["*.c", "*.h"], exclude=["drivers/*"])
    assert file_selection(str(tree), ["*.c", "*.h"], ["drivers/*"]) == {
        "kind": "folder", "include": ["*.c", "*.h"], "exclude": ["drivers/*"], "files": 2, "skipped_not_text": 1,
        "skipped_empty": 1, "bytes": 29 + 14, "encoding": "utf-8"}
    assert file_selection(str(tree)) is None  # other arguments: not read
    load_raw_datasets(train_file=str(tree / "main.c"), include=["*.h"])  # a file named on its own: no patterns
    assert file_selection(str(tree / "main.c"), ["*.h"]) == {
        "kind": "file", "include": [], "exclude": [], "files": 1, "skipped_not_text": 0, "skipped_empty": 0,
        "bytes": 29, "encoding": "utf-8"}
