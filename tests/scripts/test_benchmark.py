import json
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_quick_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--quick", "--output_json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    names = {row["benchmark"] for row in data["results"]}
    assert {"encode_corpus, best of 3", "time per char, 500 vs 50"} <= names
    assert all(row["value"] > 0 for row in data["results"])
    assert "torch" in data["environment"]
    assert "encode_corpus" in result.stdout


def test_benchmark_rejects_unknown_section(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--sections", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "Unknown --sections ['nope']" in result.stderr
