"""benchmarks/benchmark.py (run through scripts/benchmark.py): --smoke runs every section (no timing is asserted)."""

import json
import sys

import pytest

from helpers import ROOT, call_script


sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmarks are scripts beside each other, not a package
from benchmark import benchmark_text, meets  # noqa: E402


@pytest.mark.heavy
@pytest.mark.timeout(600)  # ~15 s of CPU (the memory section in a subprocess); 216 s wall measured at load 8
def test_benchmark_runs_every_section_and_writes_json(tmp_path):
    """--smoke: every section of the harness, with a 2x32 model and ~1 MB of text (the numbers mean nothing); the
    script's code in this process (scripts/benchmark.py only hands over to benchmarks/benchmark.py)."""
    out = tmp_path / "bench.json"
    result = call_script("benchmark.py", ["--smoke", "--output_json", str(out)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {row["benchmark"]: row for row in data["results"]}
    assert {row["section"] for row in data["results"]} == {"training", "decode", "batch", "encoding", "memory"}
    for name in ("Trainer (fp32) vs reference loop (fp32)", "Trainer (fp32) vs kernel bound (fp32)",
                 "generate() vs reference loop, time per char", "generate() vs decoding floor, time per char",
                 "time per char, 500 vs 50",
                 "generate() (fp32) vs reference loop, batch 8", "encode_corpus, best of 3", "peak RSS preparing it"):
        assert name in rows, name
    assert all(row["value"] > 0 for row in data["results"])
    assert 0.5 < rows["corpus prepared"]["value"] < 1.5  # MB: 1/20 of the quick mode's 20 MB
    assert data["quick"] and data["smoke"]
    assert {"torch", "threads", "cpu", "isa", "device"} <= set(data["environment"])
    assert "encode_corpus" in result.stdout and "target" in result.stdout


def test_targets_are_checked_in_both_directions():
    assert meets(1.2, ">= 1.1") and not meets(1.0, ">= 1.1")
    assert meets(0.4, "<= 0.5") and not meets(0.6, "<= 0.5")
    assert meets(1500, "< 2000") and not meets(2000, "< 2000")


def test_benchmark_rejects_unknown_section(tmp_path):
    result = call_script("benchmark.py", ["--sections", "nope"], tmp_path)
    assert result.returncode == 2
    assert "Unknown --sections ['nope']" in result.stderr


def test_smoke_shows_targets_without_verdicts(tmp_path):
    """--smoke's numbers mean nothing: a row with a target says "n/a (smoke)", never "ok" or "MISSED"."""
    out = tmp_path / "bench.json"
    result = call_script("benchmark.py", ["--smoke", "--sections", "encoding", "--output_json", str(out)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    targeted = [line for line in result.stdout.splitlines() if line.startswith("encoding ") and ">= 50" in line]
    assert len(targeted) == 2 and all(line.endswith(">= 50 n/a (smoke)") for line in targeted), result.stdout
    assert "MISSED" not in result.stdout and " ok" not in result.stdout
    assert json.loads(out.read_text())["corpus"] == "generated text"


def test_a_missing_corpus_is_one_line_naming_the_flag_and_the_bundled_default(tmp_path):
    result = call_script("benchmark.py", ["--corpus", "../shared/data/tinyshakespeare.txt", "--smoke"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --corpus ../shared/data/tinyshakespeare.txt is not a file: give a text file, or leave --corpus out to "
        "measure on the tiny Shakespeare bundled with char_lstm.")
    assert not (tmp_path / "benchmark.json").exists()


def test_the_full_run_measures_on_the_bundled_tiny_shakespeare_by_default():
    text = benchmark_text(None, quick=False)
    assert len(text) == 1_115_394 and text.startswith("First Citizen:\nBefore we proceed any further")
    assert benchmark_text(None, quick=True) != text  # --quick and --smoke: generated text, as before


def test_the_whole_run_benchmark_splits_the_wall_time_and_reports_the_precision(tmp_path):
    """benchmarks/end_to_end.py on a small text with a few steps (the numbers mean nothing): its parts add up to the
    wall time, and the final evaluation's precision and characters come from the run's own record."""
    import subprocess

    from helpers import script_env, shakespeare_like, write_text

    text = write_text(tmp_path / "text.txt", shakespeare_like(200_000))
    out = tmp_path / "end_to_end.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "end_to_end.py"), "--train_file", str(text), "--work_dir",
         str(tmp_path), "--output_json", str(out), "--", "--max_steps", "4", "--max_train_seconds", "0",
         "--eval_steps", "2", "--save_steps", "2", "--hidden_size", "16", "--embedding_size", "8"],
        capture_output=True, text=True, env=script_env(HF_HUB_OFFLINE="1"), timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    parts = result["training_s"] + result["periodic_eval_s"] + result["final_eval_s"] + result["rest_s"]
    assert result["steps"] == 4 and abs(parts - result["wall_s"]) < 1e-6 and result["periodic_eval_s"] > 0
    assert result["eval_characters"] > 0 and result["eval_loss_stderr"] >= 0
    assert "evaluation's share of the wall time" in done.stdout


def _web_benchmark_unavailable() -> str | None:
    """Why benchmarks/web.py cannot run here (None: it can): a browser to drive, onnxruntime-web's files."""
    from char_lstm.errors import UsageError
    from char_lstm.web_browser import browser_unavailable
    from char_lstm.web_export import find_runtime

    try:
        find_runtime()
    except UsageError as error:
        return str(error)
    return browser_unavailable()


@pytest.mark.heavy  # a headless Chromium and its renderers beside the benchmark's process
@pytest.mark.timeout(300)  # ~25 s wall at load 5 on 2 cores
@pytest.mark.skipif(_web_benchmark_unavailable() is not None, reason=str(_web_benchmark_unavailable()))
def test_the_web_benchmark_measures_both_sizes_in_the_page_and_in_python(tmp_path):
    """benchmarks/web.py --quick: both presets' sizes, the page's characters/s beside generate()'s and their ratio, the
    page's memory over its texts, the CPU named (the numbers mean nothing: no target judged)."""
    import subprocess

    from helpers import script_env

    out = tmp_path / "web.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "web.py"), "--quick", "--output_json", str(out)],
                          capture_output=True, text=True, env=script_env(), cwd=tmp_path, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {row["benchmark"]: row for row in result["results"]}
    for size in ("cpu-small", "char-rnn"):
        assert rows[f"{size}: page / generate()"]["value"] > 0
        assert rows[f"{size}: greedy text equal to generate()'s, share"]["value"] == 1.0
        assert f"{size}: page / generate()" in done.stdout
    assert "cpu-small (2x256 LSTM)" in done.stdout and "char-rnn (2x512 LSTM)" in done.stdout
    assert ">= 0.25 n/a (quick)" in done.stdout and "MISSED" not in done.stdout
    assert [sample["characters"] for sample in result["memory"]] == [1000, 1000]
    assert result["environment"]["cpu"] in done.stdout and result["environment"]["onnxruntime_web"]


def test_the_web_benchmark_without_onnxruntime_web_is_one_line(tmp_path):
    """No runtime (or no browser): one line saying what is missing, exit code 2, as the scripts' bad arguments."""
    import subprocess

    from helpers import script_env

    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "web.py"), "--web_runtime", str(tmp_path)],
                          capture_output=True, text=True, env=script_env(), cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith("error: the web benchmark cannot run: ")
    assert done.stdout == "" and not (tmp_path / "web_benchmark.json").exists()
