"""Every bad input of the issue "nothing lost, ever" gives one line naming the file or flag and the fix, exit code 2,
and leaves the output folder as it was; checked before any training step.

The command-line entry points run in this process (`main(argv)` of scripts/train.py, `run_command` of the other
scripts: the code the scripts run, minus the interpreter start-up of ~10 s per case), and one case of each script runs
as a real subprocess."""

import json
import runpy
import shutil
import signal

import pytest
import torch

from char_lstm.cli import run_command
from char_lstm.convert import ConvertArguments, run_convert
from char_lstm.hub import PushArguments, run_push
from char_lstm.sampling import GenerateArguments, run_generate
from helpers import ROOT, run_script, shakespeare_like, write_text


TINY = ["--embedding_size", "16", "--hidden_size", "32", "--block_size", "32", "--per_device_train_batch_size", "8",
        "--report_to", "none", "--max_steps", "2", "--sample_every_evals", "0"]


@pytest.fixture
def train_main():
    """scripts/train.py's main(), with this process's signal handlers put back afterwards."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield runpy.run_path(str(ROOT / "scripts" / "train.py"))["main"]
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


def the_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


def corpus(d):
    return str(write_text(d / "corpus.txt", shakespeare_like(3000)))


def blank_folder(d):
    (d / "blank").mkdir()
    write_text(d / "blank" / "a.txt", "\n" * 10000)
    write_text(d / "blank" / "b.txt", "  \t ")
    return d / "blank"


TRAIN_CASES = {
    # name: (argv from the tmp folder, the message)
    "yaml wrong type": (lambda d: [str(write_text(d / "c.yaml", f"train_file: {corpus(d)}\nlearning_rate: fast\n"))],
                        "c.yaml: learning_rate must be a number, got 'fast'"),
    "yaml quoted int": (lambda d: [str(write_text(d / "c.yaml", f"train_file: {corpus(d)}\nblock_size: '32'\n"))],
                        "c.yaml: block_size must be an integer, got '32'"),
    "yaml bool": (lambda d: [str(write_text(d / "c.yaml", f"train_file: {corpus(d)}\nbf16: 3\n"))],
                  "c.yaml: bf16 must be true or false, got 3"),
    "yaml syntax": (lambda d: [str(write_text(d / "c.yaml", "train_file: a\n  learning_rate: [1\n"))],
                    "c.yaml is not valid YAML:"),
    "yaml unknown key": (lambda d: [str(write_text(d / "c.yaml", "learning_rat: 0.1\n"))],
                         "c.yaml: unknown argument 'learning_rat'"),
    "json list": (lambda d: [str(write_text(d / "c.json", '["--learning_rate", "0.1"]'))],
                  "c.json holds a list, not a mapping of argument names"),
    "json syntax": (lambda d: [str(write_text(d / "c.json", '{"learning_rate": 0.1,}'))],
                    "c.json is not valid JSON: Expecting property name enclosed in double quotes at line 1"),
    "accumulation 0": (lambda d: ["--train_file", corpus(d), *TINY, "--gradient_accumulation_steps", "0"],
                       "--gradient_accumulation_steps must be at least 1, got 0"),
    "eval batch 0": (lambda d: ["--train_file", corpus(d), *TINY, "--per_device_eval_batch_size", "0"],
                     "--per_device_eval_batch_size must be at least 1, got 0"),
    "jsonl numbers": (lambda d: ["--train_file", str(write_text(d / "n.jsonl", '{"text": 1}\n{"text": 2}\n')), *TINY],
                      "column 'text' holds int64 values, not text; choose the text column with --text_column"),
    "malformed csv": (lambda d: ["--train_file", str(write_text(d / "b.csv", 'text\n"ok"\n"a","b","c"\n"x\n')), *TINY],
                      "b.csv as CSV (ParserError"),
    "whitespace only": (lambda d: ["--train_file", str(write_text(d / "w.txt", " \n\t\n  \n")), *TINY],
                        "w.txt holds only whitespace"),
    "whitespace only, 12 kB": (lambda d: ["--train_file", str(write_text(d / "w.txt", " \t\n" * 4000)), *TINY],
                               "w.txt holds only whitespace: the training text needs characters to learn from."),
    "folder of whitespace": (lambda d: ["--train_file", str(blank_folder(d)), "--include", "*.txt", *TINY],
                             "--train_file: its 2 text file(s) hold only whitespace"),
    "utf-16 without bom": (lambda d: ["--train_file", str((d / "u.txt").write_bytes(shakespeare_like(600).encode(
                           "utf-16-le")) and d / "u.txt"), *TINY], "u.txt has NUL characters next to every character: "
                           "it looks like UTF-16 without a byte-order mark; pass --encoding utf-16-le"),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_bad_input_is_one_line_exit_2_and_touches_nothing(tmp_path, capsys, train_main, case):
    make, message = TRAIN_CASES[case]
    out = tmp_path / "out"
    (out / "checkpoint-1").mkdir(parents=True)  # a previous run's, which --overwrite_output_dir would delete
    write_text(out / "checkpoint-1" / "note.txt", "kept")
    argv = make(tmp_path)
    if argv[0].endswith(".yaml") and case != "yaml syntax":  # the output folder goes in the config file
        with open(argv[0], "a", encoding="utf-8") as f:
            f.write(f"output_dir: {out}\noverwrite_output_dir: true\n")
    elif argv[0].startswith("--"):
        argv += ["--output_dir", str(out), "--overwrite_output_dir", "true"]
    assert train_main(argv) == 2
    assert message in the_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in out.rglob("*")) == ["checkpoint-1", "note.txt"]


def test_argument_prefixes_are_not_flags(tmp_path, train_main, capsys):
    assert train_main(["--learning_rat", "0.05", "--output_dir", str(tmp_path / "o")]) == 2
    assert ("Unknown argument(s) --learning_rat 0.05 (did you mean --learning_rate?): write flags in full"
            in the_error_line(capsys.readouterr().err))
    assert run_command(GenerateArguments, run_generate, ["--model_name_or_path", "m", "--max_new_tok", "5"]) == 2
    assert "Unknown argument(s) --max_new_tok 5 (did you mean --max_new_tokens?)" in the_error_line(
        capsys.readouterr().err)
    assert run_command(GenerateArguments, run_generate, ["--model_name_or_path", "m", "--zzzqqq"]) == 2
    assert "Unknown argument(s) --zzzqqq: write flags in full" in the_error_line(capsys.readouterr().err)  # no guess
    assert not (tmp_path / "o").exists()


def test_a_misspelled_flag_is_answered_with_the_closest_flags(tmp_path):
    """A real interpreter: scripts/evaluate.py with two misspelled flags names the flag meant for each."""
    result = run_script("evaluate.py", ["--model_name_or_path", "m", "--block_siz", "64", "--moodes=fixed"], tmp_path)
    assert result.returncode == 2
    assert the_error_line(result.stderr) == (
        "error: Unknown argument(s) --block_siz 64 --moodes=fixed (did you mean --block_size for --block_siz, --modes "
        "for --moodes?): write flags in full, without abbreviation (evaluate.py --help lists them).")


def test_streaming_with_max_eval_samples_trains(tmp_path):
    """The cpu-small preset sets --max_eval_samples; with --streaming it used to crash on len() of a stream."""
    from char_lstm.training import train
    from char_lstm.training.arguments import parse_arguments

    rows = [json.dumps({"text": shakespeare_like(2000)[i * 200:(i + 1) * 200]}) for i in range(10)]
    train_file = write_text(tmp_path / "t.jsonl", "\n".join(rows) + "\n")
    validation = write_text(tmp_path / "v.jsonl", "\n".join(rows[:3]) + "\n")
    metrics = train(*parse_arguments(["--train_file", str(train_file), "--validation_file", str(validation),
                                      "--streaming", "true", "--max_eval_samples", "4", "--output_dir",
                                      str(tmp_path / "out"), *TINY, "--eval_steps", "2", "--save_steps", "2"]))
    assert metrics["global_step"] == 2 and metrics["eval_loss"] > 0
    assert (tmp_path / "out" / "model.safetensors").exists()


def model_copy(trained_model, tmp_path, change):
    folder = tmp_path / "model"
    shutil.copytree(trained_model, folder, ignore=shutil.ignore_patterns("checkpoint-*"))
    change(folder)
    return str(folder)


def edit_config(folder):
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] *= 2
    (folder / "config.json").write_text(json.dumps(config))


def old_vocab(folder, text):  # a folder saved before tokenizer.json, with a broken vocab.json
    (folder / "tokenizer.json").unlink(missing_ok=True)
    (folder / "vocab.json").write_text(text)


GENERATE_CASES = {
    "no sequences": ([], ["--num_return_sequences", "0"], "--num_return_sequences must be at least 1, got 0"),
    "top_p above 1": ([], ["--top_p", "1.5"], "--top_p must be in (0, 1] (1 keeps every character), got 1.5"),
    "cuda without cuda": ([], ["--device", "cuda"], "--device cuda: this machine has no CUDA GPU"),
    "not a device": ([], ["--device", "tpu9"], "--device 'tpu9' is not a device"),
    "config does not fit the weights": (edit_config, [], "do not fit its config.json: "),
    "vocab.json not JSON": (lambda f: old_vocab(f, '{"a": 1,,}'), [], "vocab.json is not valid JSON (Expecting"),
    "vocab.json a list": (
        lambda f: old_vocab(f, '["a", "b"]'),
        [],
        "vocab.json holds a list, not a mapping of tokens",
    ),
}


@pytest.mark.parametrize("case", list(GENERATE_CASES))
def test_generate_bad_input_is_one_line_exit_2(trained_model, tmp_path, capsys, case):
    change, extra, message = GENERATE_CASES[case]
    if case == "cuda without cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    folder = model_copy(trained_model, tmp_path, change) if change else str(trained_model)
    argv = ["--model_name_or_path", folder, "--prompt", "ROMEO:", "--max_new_tokens", "5", *extra]
    assert run_command(GenerateArguments, run_generate, argv) == 2
    assert message in the_error_line(capsys.readouterr().err)


def test_convert_and_push_bad_files_are_named(trained_model, tmp_path, capsys):
    notes = write_text(tmp_path / "notes.txt", "not weights")
    chars = write_text(tmp_path / "chars.json", '["a", "b",]')
    state = tmp_path / "model.pt"
    torch.save({"embedding.weight": torch.zeros(2, 3)}, state)
    out = tmp_path / "converted"
    cases = [
        (ConvertArguments, run_convert, ["--checkpoint", str(notes), "--chars", str(chars), "--output_dir", str(out)],
         f"--checkpoint {notes} is not a PyTorch checkpoint"),
        (ConvertArguments, run_convert, ["--checkpoint", str(state), "--chars", str(chars), "--output_dir", str(out)],
         f"--chars {chars} is not valid JSON (Expecting value"),
        (PushArguments, run_push, ["--model_dir", str(trained_model), "--repo_id", "me/m", "--dry_run", "true",
                                   "--output_dir", str(tmp_path / "hub"), "--eval_results", str(chars)],
         f"--eval_results {chars} is not valid JSON"),
        (PushArguments, run_push, ["--model_dir", str(trained_model), "--repo_id", "me/m", "--dry_run", "true",
                                   "--output_dir", str(tmp_path / "hub"), "--eval_results", str(write_text(
                                       tmp_path / "list.json", "[1, 2]"))],
         "list.json holds a list, not the JSON object written by scripts/evaluate.py"),
    ]
    for arguments, run, argv, message in cases:
        assert run_command(arguments, run, argv) == 2
        assert message in the_error_line(capsys.readouterr().err)
    assert not out.exists() and not (tmp_path / "hub").exists()


def test_the_script_itself_answers_in_one_line(tmp_path):
    """The same errors through a real interpreter: scripts/train.py with a broken config file. (generate.py and the
    other scripts run in real interpreters in their own tests.)"""
    config = write_text(tmp_path / "c.yaml", "learning_rate: [1\n")
    result = run_script("train.py", [str(config)], tmp_path)
    assert result.returncode == 2
    assert "c.yaml is not valid YAML" in the_error_line(result.stderr)
