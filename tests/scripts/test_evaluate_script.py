import json
import math
import os
import subprocess
import sys
import time

import pandas as pd
import pytest

from char_lstm import load_model_and_tokenizer
from char_lstm.encoding import boundary_id, join_documents
from char_lstm.errors import DataError
from char_lstm.evaluation import EvaluateArguments, evaluate_ids, run
from helpers import call_script, run_script, shakespeare_like, write_text


def test_evaluate_a_text_file(trained_model, tmp_path):
    """A real `python scripts/evaluate.py` (the other tests call the script's code in this process)."""
    text = shakespeare_like(3000)[::-1][:2000] + "\u00a7"  # held-out-like text with one unknown character
    path = write_text(tmp_path / "held_out.txt", text)
    out = tmp_path / "results.json"
    result = run_script("evaluate.py", ["--model_name_or_path", str(trained_model), "--validation_file", str(path),
                                        "--block_size", "32", "--output_json", str(out)], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1 characters of the text are not in the vocabulary" in result.stderr
    data = json.loads(out.read_text())
    assert data["characters"] == len(text) and data["unknown_characters"] == 1
    # the numbers are those of the library function (checked against hand-computed cross-entropy in its tests)
    model, tokenizer = load_model_and_tokenizer(str(trained_model))
    assert boundary_id(tokenizer) is not None  # the document starts with <eos>, as in training
    expected = evaluate_ids(model, join_documents(tokenizer, [text], "\n\n", boundary_id(tokenizer)), 32)
    for mode in ("fixed", "streaming"):
        assert data[mode]["loss"] == pytest.approx(expected[mode]["loss"], rel=1e-6)
        assert data[mode]["bits_per_character"] == pytest.approx(data[mode]["loss"] / math.log(2))
        assert f"{data[mode]['loss']:.4f}" in result.stdout
    assert data["fixed"]["characters"] == data["streaming"]["characters"] == len(text)  # the first one too


def test_evaluate_a_dataset_split(trained_model, tmp_path):
    folder = tmp_path / "ds" / "data"
    folder.mkdir(parents=True)
    for split in ("train", "validation", "test"):
        pd.DataFrame({"text": [shakespeare_like(1500)]}).to_parquet(folder / f"{split}-00000-of-00001.parquet")
    out = tmp_path / "r.json"
    result = call_script("evaluate.py", ["--model_name_or_path", str(trained_model), "--dataset_name",
                                        str(tmp_path / "ds"), "--split", "test", "--block_size", "64",
                                        "--modes", "fixed", "--output_json", str(out)], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())
    assert "fixed" in data and "streaming" not in data and data["block_size"] == 64
    missing = call_script("evaluate.py", ["--model_name_or_path", str(trained_model), "--dataset_name",
                                         str(tmp_path / "ds"), "--split", "dev"], tmp_path)
    assert missing.returncode == 2 and "has no split 'dev'" in missing.stderr


def test_evaluate_errors(trained_model, tmp_path):
    nothing = call_script("evaluate.py", ["--model_name_or_path", str(trained_model)], tmp_path)
    assert nothing.returncode == 2 and "error: Nothing to evaluate on" in nothing.stderr
    no_model = call_script("evaluate.py", ["--model_name_or_path", str(tmp_path / "nope"), "--validation_file",
                                          str(write_text(tmp_path / "t.txt", "abc"))], tmp_path)
    assert no_model.returncode == 2 and "error:" in no_model.stderr



def test_evaluate_messages_name_the_folder_and_its_own_flags(trained_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "shakespeare").symlink_to(trained_model, target_is_directory=True)
    write_text(tmp_path / "t.txt", "abc")
    # a mistyped folder: the closest existing one, before the data are read (the text file is not even needed)
    with pytest.raises(OSError, match=r"^--model_name_or_path outputs/shakespear does not exist; did you mean "
                                      r"outputs/shakespeare\?$"):
        run(EvaluateArguments(model_name_or_path="outputs/shakespear", validation_file="missing.txt"))
    # a dataset that cannot be loaded: the way out is evaluate.py's own --validation_file
    with pytest.raises(DataError, match="Could not load the dataset 'no-one/no-data'.*--validation_file") as error:
        run(EvaluateArguments(model_name_or_path="outputs/shakespeare", dataset_name="no-one/no-data"))
    assert "--train_file" not in str(error.value)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2
                    or not os.path.exists("/proc/stat"), reason="Linux, 2 cores or more")
def test_the_scripts_compute_with_the_idle_cores_only(monkeypatch):
    """A core kept busy by another process (a training run): generate and evaluate use one thread less, instead of
    a thread that waits for its core at every product (0.10-0.36 s against 0.05 s per forward, docs/benchmarks.md).
    OMP_NUM_THREADS, when set, is left as it is."""
    import torch

    from char_lstm.cli import busy_cores, use_idle_cores

    cores = sorted(os.sched_getaffinity(0))
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                           preexec_fn=lambda: os.sched_setaffinity(0, {cores[0]}))
    threads = torch.get_num_threads()
    try:
        time.sleep(0.3)
        torch.set_num_threads(len(cores))
        monkeypatch.setenv("OMP_NUM_THREADS", str(len(cores)))
        use_idle_cores()
        assert torch.get_num_threads() == len(cores)  # the user's choice
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert busy_cores() >= 0.8  # the other process's core, at least
        use_idle_cores()
        assert torch.get_num_threads() <= len(cores) - 1
    finally:
        hog.kill()
        hog.wait()
        torch.set_num_threads(threads)
