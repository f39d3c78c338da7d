"""scripts/export.py: a trained model exported with transformers' exporters into a folder of programs, config and
tokenizer, checked against generate() through the written files; a folder in use, an unknown format or a missing
package is one line (exit 2)."""

import importlib.util

import pytest

from char_lstm import load_model_and_tokenizer
from char_lstm.export import FORMATS, exporters_unavailable, greedy_generate, load_export
from helpers import call_script, run_script


pytestmark = pytest.mark.skipif(exporters_unavailable() is not None, reason=str(exporters_unavailable()))


def greedy_text(model_dir, prompt: str, max_new_tokens: int) -> str:
    model, tokenizer = load_model_and_tokenizer(model_dir)
    input_ids = tokenizer([prompt], return_tensors="pt")["input_ids"]
    out = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_k=None,
                         top_p=None, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def test_export_writes_programs_that_generate_what_the_model_does(trained_model, tmp_path):
    out = tmp_path / "exported"
    result = run_script("export.py", ["--model_name_or_path", trained_model, "--format", "dynamo", "--output_dir",
                                      out, "--prompt", "ROMEO:", "--max_new_tokens", "40"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # no traceback, not even torch's "--- Logging error ---" of a .pt2's loading (torch 2.13)
    assert "Traceback" not in result.stderr and "Logging error" not in result.stderr, result.stderr[-3000:]
    assert "as dynamo in" in result.stdout and "decode.pt2" in result.stdout and "prefill.pt2" in result.stdout
    expected = greedy_text(trained_model, "ROMEO:", 40)
    assert "equal model.generate(do_sample=False)'s:\n" + expected in result.stdout
    names = {path.name for path in out.iterdir()}
    assert {"prefill.pt2", "decode.pt2", "export.json", "config.json", "tokenizer.json"} <= names
    # what the folder holds runs on its own: its tokenizer and programs
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    input_ids = tokenizer(["ROMEO:"], return_tensors="pt")["input_ids"]
    tokens = greedy_generate(load_export(str(out), trust_remote_code=True), input_ids, 40)  # .pt2: our own
    assert tokenizer.decode(tokens[0], skip_special_tokens=True) == expected


def test_a_folder_in_use_is_refused_unless_overwritten(trained_model, tmp_path):
    out = tmp_path / "exported"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["--model_name_or_path", trained_model, "--output_dir", out, "--max_new_tokens", "5"]
    result = call_script("export.py", argv, cwd=tmp_path)
    assert result.returncode == 2
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {out} is not empty: choose another --output_dir or pass --overwrite_output_dir."]
    assert [path.name for path in out.iterdir()] == ["notes.txt"]
    result = call_script("export.py", [*argv, "--overwrite_output_dir"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    names = {path.name for path in out.iterdir()}
    assert "notes.txt" not in names and {"prefill.pt2", "decode.pt2"} <= names
    # nor may the export replace the model it reads
    result = call_script("export.py", ["--model_name_or_path", trained_model, "--output_dir", trained_model,
                                       "--overwrite_output_dir"], cwd=tmp_path)
    assert result.returncode == 2 and "would replace the model in --model_name_or_path" in result.stderr
    assert (trained_model / "model.safetensors").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--format", "tflite"], "error: --format must be one of dynamo, onnx, executorch, web, got 'tflite'."),
    (["--max_new_tokens", "0"], "error: --max_new_tokens must be at least 1, got 0."),
    (["--prompt", "\u263a"], "error: --prompt has characters the model has never seen: ['\u263a']"),
])
def test_bad_input_is_one_line(trained_model, tmp_path, argv, message):
    result = call_script("export.py", ["--model_name_or_path", trained_model, "--output_dir", tmp_path / "out", *argv],
                         cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and errors[0].startswith(message), result.stderr[-2000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("export_format", ["onnx", "executorch"])
def test_the_other_formats_export_or_name_what_to_install(trained_model, tmp_path, export_format):
    """With its packages, the format exports and passes the check; without them, one line says what to install."""
    packages, install = FORMATS[export_format]
    installed = all(importlib.util.find_spec(name) is not None for name in packages)
    result = call_script("export.py", ["--model_name_or_path", trained_model, "--format", export_format,
                                       "--output_dir", tmp_path / "out", "--max_new_tokens", "20"], cwd=tmp_path)
    if not installed:
        assert result.returncode == 2 and f"error: --format {export_format} needs " in result.stderr
        assert install in result.stderr and not (tmp_path / "out").exists()
        return
    assert result.returncode == 0, result.stderr[-3000:]
    assert "equal model.generate(do_sample=False)'s" in result.stdout
    suffix = {"onnx": ".onnx", "executorch": ".pte"}[export_format]
    assert (tmp_path / "out" / f"decode{suffix}").is_file()
