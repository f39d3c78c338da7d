"""Faults of the disk and of the cache (issue 32): a full disk while the `datasets` cache is written (rows of text,
blocks of ids, stateful streams) or while a checkpoint or the final model is saved is one line naming the folder and
the space, and loses nothing; a damaged cache file is made again, never trained on; --overwrite_cache makes every
cache file of the preparation again.

The full disks are real: small tmpfs filesystems, mounted by the test (skipped, with the reason, where it cannot
mount one: not root, no CAP_SYS_ADMIN, not Linux). The damaged files are real cache files, cut or zero-filled."""

import gc
import json
import logging
import os
import shutil
import subprocess
import sys

import datasets
import numpy as np
import pyarrow as pa
import pytest

from char_lstm import CharLSTMForCausalLM
from char_lstm.cache import CacheDamaged, CacheFull, arrow_file_problem
from char_lstm.data import load_raw_datasets
from char_lstm.encoding import build_tokenizer, encode_blocks
from char_lstm.streams import encode_streams
from char_lstm.training.checkpoints import checkpoint_problem
from helpers import call_script, run_script, shakespeare_like, write_text


TINY = ["--embedding_size", "8", "--hidden_size", "16", "--block_size", "32", "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "8", "--report_to", "none", "--sample_every_evals", "0",
        "--disable_tqdm", "true"]
PAGE = 4096


# ---------------------------------------------------------------------------------------------------------------------
# Small filesystems


def _mount_problem(folder, kilobytes: int) -> str | None:
    """Mount a tmpfs of `kilobytes` on `folder`; why it cannot be done, or None once it is mounted."""
    if not sys.platform.startswith("linux"):
        return f"a tmpfs is Linux's ({sys.platform})"
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root (or CAP_SYS_ADMIN)"
    if shutil.which("mount") is None:
        return "no mount command"
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kilobytes}k", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    said = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[0]
    return None if done.returncode == 0 else f"cannot mount a tmpfs here: {said}"


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(kilobytes) -> a folder on a filesystem of that size of its own (a tmpfs), unmounted at the end."""
    mounted = []

    def mount(kilobytes: int, name: str = "disk"):
        folder = tmp_path / name
        folder.mkdir()
        problem = _mount_problem(folder, kilobytes)
        if problem is not None:
            pytest.skip(problem)
        mounted.append(folder)
        return folder

    yield mount
    gc.collect()  # datasets still mapping files of the disk
    for folder in mounted:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def resize(folder, kilobytes: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={kilobytes}k", str(folder)], check=True)


def fill(folder, leave: int):
    """A file that fills the disk of `folder` but for `leave` bytes; returns it (delete it to make room)."""
    filler = folder / "filler"
    size = (shutil.disk_usage(folder).free - leave) // PAGE * PAGE
    with open(filler, "wb") as f:
        for _ in range(size // (1 << 20)):
            f.write(bytes(1 << 20))
        f.write(bytes(size % (1 << 20)))
    return filler


def page_bytes(folder) -> int:
    """What the files under `folder` take on a tmpfs (whole pages)."""
    return sum(-(-os.path.getsize(os.path.join(root, name)) // PAGE) * PAGE
               for root, _, names in os.walk(folder) for name in names)


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """use(folder): the `datasets` cache of this test is `folder` (HF_DATASETS_CACHE, as a user sets it)."""
    def use(folder):
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(folder))
        return folder
    use(tmp_path / "cache")
    return use


def arrow_files(folder) -> list[str]:
    return sorted(str(path) for path in folder.rglob("*.arrow"))


def leftovers(folder) -> list[str]:
    """What a write cut short could leave: `datasets`' temporary files and unfinished folders, our scratch folders."""
    return sorted(str(path) for path in folder.rglob("*")
                  if path.name.startswith("tmp") or path.name.endswith(".incomplete"))


# ---------------------------------------------------------------------------------------------------------------------
# A full disk while the datasets cache is written


def test_rows_on_a_full_disk_are_one_line_and_no_cache(small_disk, cache, tmp_path):
    folder = cache(small_disk(3 * 1024) / "cache")
    text = shakespeare_like(1 << 20) * 4  # 4 MiB of text on a 3 MiB disk
    path = write_text(tmp_path / "big.txt", text)
    with pytest.raises(CacheFull) as caught:
        load_raw_datasets(train_file=str(path))
    message = str(caught.value)
    assert message.startswith(f"Could not write the rows of the text into the datasets cache {folder} (No space left "
                              "on device; 3.1 MB free there, and the preparation needs about 8.4 MB: 4.2 MB of rows "
                              "of text, 4.2 MB of blocks of ids). What was half written is removed: free some space "
                              "there, or point HF_DATASETS_CACHE at a folder on a disk with room"), message
    assert arrow_files(folder) == [] and leftovers(folder) == [] and not list(folder.rglob("dataset_info.json"))
    assert shutil.disk_usage(folder).used < 64 * 1024  # nothing half written takes the space
    resize(folder.parent, 12 * 1024)  # room: the same call makes the rows, all of the text
    rows = load_raw_datasets(train_file=str(path))["train"]
    assert "".join(rows["text"]) == text


def prepared_rows(tmp_path, chars: int):
    text = shakespeare_like(chars)
    rows = load_raw_datasets(train_file=str(write_text(tmp_path / "t.txt", text)))["train"]
    return text, rows, build_tokenizer(rows, "text", "\n\n")


def test_blocks_on_a_full_disk_are_one_line_and_no_cache(small_disk, cache, tmp_path):
    folder = cache(small_disk(4 * 1024) / "cache")
    text, rows, tokenizer = prepared_rows(tmp_path, 2_500_000)  # 2.5 MB of rows fit, their blocks do not
    before = arrow_files(folder)
    with pytest.raises(CacheFull) as caught:
        encode_blocks(rows, tokenizer, "text", 32)
    assert str(caught.value).startswith(
        f"Could not write the blocks of ids into the datasets cache {folder} (No space left on device; ")
    assert "free there, and the rest of the preparation needs about 2.6 MB of blocks of ids)" in str(caught.value)
    assert arrow_files(folder) == before and leftovers(folder) == []  # no partial blocks, no temporary file
    assert all(arrow_file_problem(path) is None for path in before)
    resize(folder.parent, 12 * 1024)
    blocks = encode_blocks(rows, tokenizer, "text", 32)
    assert len(blocks) == (len(text) + 1 - 33) // 32 + 1  # every block of the text (one batch of rows, <eos> first)


def test_streams_on_a_full_disk_are_one_line_and_no_cache(small_disk, cache, tmp_path):
    folder = cache(small_disk(4 * 1024) / "cache")
    text, rows, tokenizer = prepared_rows(tmp_path, 1_500_000)  # the ids and the windows do not fit
    before = arrow_files(folder)
    with pytest.raises(CacheFull) as caught:
        encode_streams(rows, tokenizer, "text", 32, 4)
    assert str(caught.value).startswith(
        f"Could not write the training streams into the datasets cache {folder} (No space left on device; ")
    assert ("the rest of the preparation needs about 3.0 MB: 1.5 MB of stream windows, 1.5 MB of their ids while "
            "they are written)") in str(caught.value)
    assert arrow_files(folder) == before  # no streams file
    assert [p.name for p in folder.rglob("*") if p.is_dir() and p.name.startswith("tmp")] == []  # nor scratch
    resize(folder.parent, 12 * 1024)
    streams = encode_streams(rows, tokenizer, "text", 32, 4)
    assert len(streams) == 4 * (len(text) // 4 // 32)  # (1 + len(text) ids: <eos> first) - 1 predictions


# ---------------------------------------------------------------------------------------------------------------------
# A damaged cache file


def batch_boundary(path) -> int:
    """A place between two messages of an Arrow stream file, halfway: after its schema or after a record batch."""
    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.open_stream(source)
        ends = [source.tell()]
        while True:
            try:
                reader.read_next_batch()
            except StopIteration:
                return ends[(len(ends) - 1) // 2]
            ends.append(source.tell())


DAMAGES = {  # what a crash, a full disk or a copy cut short leave
    "cut in half": lambda path: os.truncate(path, os.path.getsize(path) // 2),
    "cut at a batch boundary": lambda path: os.truncate(path, batch_boundary(path)),  # reads as fewer rows
    "end zero-filled": lambda path: zero_fill(path, batch_boundary(path)),  # reads as an early end
}


def zero_fill(path, start: int) -> None:
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(bytes(os.path.getsize(path) - start))


def prepare(text_file):
    """The preparation of a run, as the library does it: rows, vocabulary, blocks, stateful streams."""
    rows = load_raw_datasets(train_file=str(text_file))["train"]
    tokenizer = build_tokenizer(rows, "text", "\n\n")
    blocks = encode_blocks(rows, tokenizer, "text", 8)
    streams = encode_streams(rows, tokenizer, "text", 8, 4)
    return {"rows": rows, "blocks": blocks, "streams": streams}


def contents(prepared) -> dict:
    """The text and the ids, copied out of the memory-mapped files (which the test then damages)."""
    def ids(dataset):
        return np.array(dataset.data.column("input_ids").combine_chunks().flatten(), copy=True)

    return {"rows": "".join(prepared["rows"]["text"]), "blocks": ids(prepared["blocks"]),
            "streams": ids(prepared["streams"])}


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.parametrize("which", ["rows", "blocks", "streams"])
def test_a_damaged_cache_file_is_made_again_never_read(cache, tmp_path, caplog, which, damage):
    """The largest file of each step cut (or zero-filled) as a crash or a full disk leaves it: the next preparation
    says which file it makes again and gives all of the text, as the first did."""
    text_file = write_text(tmp_path / "t.txt", shakespeare_like(200_000) + "\n" + shakespeare_like(150_000))
    first = prepare(text_file)
    expected, path = contents(first), first[which].cache_files[0]["filename"]
    del first
    gc.collect()  # no mapping of the file while it is damaged
    DAMAGES[damage](path)
    assert arrow_file_problem(path) is not None
    with caplog.at_level(logging.INFO, logger="char_lstm"):
        again = contents(prepare(text_file))
    said = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"The datasets cache file {path} is damaged (cut short"), said
    assert again["rows"] == expected["rows"]
    for name in ("blocks", "streams"):
        np.testing.assert_array_equal(again[name], expected[name])


def test_a_damaged_file_outside_the_cache_is_refused_naming_it_and_the_flag(cache, tmp_path):
    """A cache file `char_lstm` may not remove (beside data saved outside the datasets cache): one line naming it and
    --overwrite_cache, which makes it again."""
    datasets.Dataset.from_dict({"text": [shakespeare_like(5000)]}).save_to_disk(str(tmp_path / "saved"))
    rows = datasets.load_from_disk(str(tmp_path / "saved"))
    tokenizer = build_tokenizer(rows, "text", "\n\n")
    blocks = encode_blocks(rows, tokenizer, "text", 8)
    expected, path = len(blocks), blocks.cache_files[0]["filename"]
    del blocks
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(CacheDamaged) as caught:
        encode_blocks(rows, tokenizer, "text", 8)
    assert str(caught.value).startswith(f"The datasets cache file {path} is damaged (cut short")
    assert str(caught.value).endswith(f"run the command again with --overwrite_cache (it makes the cache of this text "
                                      f"again), or delete {path}.")
    assert len(encode_blocks(rows, tokenizer, "text", 8, load_from_cache_file=False)) == expected


@pytest.mark.parametrize("stateful", [False, True], ids=["blocks", "streams"])
def test_overwrite_cache_makes_every_cache_file_again(cache, tmp_path, stateful):
    """--overwrite_cache: the rows of the text files (`Dataset.from_generator`), the character counts, the validation
    split, the blocks and the streams are all written again, not only the `.map` caches."""
    folder = cache(tmp_path / "cache")
    corpus = str(write_text(tmp_path / "corpus.txt", shakespeare_like(20_000)))
    argv = ["--train_file", corpus, *TINY, "--max_steps", "1", "--save_steps", "1"] + (["--stateful"] * stateful)
    assert call_script("train.py", argv + ["--output_dir", str(tmp_path / "a")], tmp_path).returncode == 0
    written = {path: os.stat(path).st_mtime_ns for path in arrow_files(folder)}
    kinds = {os.path.basename(path).split("-")[0] for path in written}
    assert kinds == ({"generator", "cache", "char_lstm"} if stateful else {"generator", "cache"})
    again = call_script("train.py", argv + ["--output_dir", str(tmp_path / "b"), "--overwrite_cache"], tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert {path: os.stat(path).st_mtime_ns for path in arrow_files(folder)}.keys() == written.keys()
    assert [path for path in written if os.stat(path).st_mtime_ns == written[path]] == []  # none read as it was


# ---------------------------------------------------------------------------------------------------------------------
# A full disk while a checkpoint or the final model is written


def the_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def run_sizes(tmp_path_factory):
    """(checkpoint, final model): what the checkpoint-2 of a run of 2 steps and the rest of its folder take."""
    folder = tmp_path_factory.mktemp("sizes")
    corpus = str(write_text(folder / "corpus.txt", shakespeare_like(3000)))
    out = folder / "out"
    result = call_script("train.py", ["--train_file", corpus, "--output_dir", str(out), *TINY, "--max_steps", "2",
                                      "--save_steps", "2"], folder)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = page_bytes(out / "checkpoint-2")
    return checkpoint, page_bytes(out) - checkpoint


def _train_on_a_full_disk(small_disk, tmp_path, leave: int, max_steps: int):
    """A run of `max_steps` steps (checkpoints every 2) into a 4 MiB disk with `leave` bytes free: (its output folder,
    its arguments, the file that fills the disk, its one error line)."""
    disk = small_disk(4 * 1024)
    filler = fill(disk, leave=leave)
    corpus = str(write_text(tmp_path / "corpus.txt", shakespeare_like(3000)))
    out = disk / "out"
    argv = ["--train_file", corpus, "--output_dir", str(out), *TINY, "--max_steps", str(max_steps), "--save_steps",
            "2"]
    result = call_script("train.py", argv, tmp_path)
    assert result.returncode == 2
    return out, argv, filler, the_error_line(result.stderr)


def test_a_checkpoint_on_a_full_disk_keeps_the_one_before_and_resumes(small_disk, tmp_path, run_sizes):
    checkpoint, _ = run_sizes
    # checkpoint-2 fits, checkpoint-4 does not
    out, argv, filler, line = _train_on_a_full_disk(small_disk, tmp_path, checkpoint * 3 // 2, max_steps=4)
    assert line.startswith(f"error: Could not write checkpoint-4 into {out} (No space left on device; "), line
    assert "checkpoint-2 and the checkpoints before it are complete and unchanged" in line
    assert ", a checkpoint takes " in line
    assert sorted(os.listdir(out)) == ["checkpoint-2"]  # no half-written checkpoint-4, no staging folder
    assert checkpoint_problem(str(out / "checkpoint-2")) is None
    CharLSTMForCausalLM.from_pretrained(out / "checkpoint-2")
    os.remove(filler)  # room: the same command resumes
    resumed = call_script("train.py", argv + ["--resume_from_checkpoint", "True"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    before = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["log_history"][:len(before["log_history"])] == before["log_history"]


def test_the_final_model_on_a_full_disk_keeps_the_checkpoint_and_is_written_on_resume(small_disk, tmp_path,
                                                                                       run_sizes):
    checkpoint, final = run_sizes
    # the last checkpoint fits, the final model does not
    out, argv, filler, line = _train_on_a_full_disk(small_disk, tmp_path, checkpoint + final // 2, max_steps=2)
    assert line.startswith(f"error: Could not write the final model into {out} (No space left on device; "), line
    assert ", the last checkpoint takes " in line
    assert not (out / "model.safetensors").exists() and not (out / "_tmp-final").exists()
    assert checkpoint_problem(str(out / "checkpoint-2")) is None
    os.remove(filler)
    resumed = call_script("train.py", argv + ["--resume_from_checkpoint", "True"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    CharLSTMForCausalLM.from_pretrained(out)


# ---------------------------------------------------------------------------------------------------------------------
# The issue, as the user ran it


@pytest.mark.slow
def test_the_issue_full_cache_disk_then_a_cut_cache_file(small_disk, cache, tmp_path):
    """`python scripts/train.py` with HF_DATASETS_CACHE on a small disk and more text than it holds: one line, exit
    2, no cache left. With room, it trains; the largest .arrow of that cache cut in half, the same command says
    which file it makes again, and trains (the run in between in this process: the same code, no start-up)."""
    disk = small_disk(2 * 1024)
    corpus = str(write_text(tmp_path / "corpus.txt", shakespeare_like(3_000_000)))
    argv = ["--train_file", corpus, *TINY, "--max_steps", "1", "--save_steps", "1", "--max_eval_samples", "8"]
    env = {"HF_DATASETS_CACHE": str(disk / "cache")}
    full = run_script("train.py", argv + ["--output_dir", str(tmp_path / "a")], tmp_path, **env)
    assert full.returncode == 2
    assert the_error_line(full.stderr).startswith(
        f"error: Could not write the rows of the text into the datasets cache {disk / 'cache'} (No space left on "
        "device; 2.1 MB free there, and the preparation needs about 6.1 MB: 3.0 MB of rows of text, 3.1 MB of blocks "
        "of ids). What was half written is removed")
    assert arrow_files(disk) == [] and leftovers(disk) == []
    resize(disk, 16 * 1024)
    cache(disk / "cache")
    assert call_script("train.py", argv + ["--output_dir", str(tmp_path / "b")], tmp_path).returncode == 0
    largest = max(arrow_files(disk), key=os.path.getsize)
    os.truncate(largest, os.path.getsize(largest) // 2)
    again = run_script("train.py", argv + ["--output_dir", str(tmp_path / "c")], tmp_path, **env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"The datasets cache file {largest} is damaged (cut short or damaged: Expected to be able to read" in (
        again.stderr)
    assert all(arrow_file_problem(path) is None for path in arrow_files(disk))
