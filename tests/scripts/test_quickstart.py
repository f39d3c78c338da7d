"""The README's Quickstart as a new user runs it, without Hub access: its training and sampling commands, read from
the README itself, scaled down by a few flags so that they take seconds."""

import json
import re
import subprocess
import sys

import pytest

from helpers import ROOT, call_script, script_env


SMALL = ["--hidden_size", "32", "--embedding_size", "16", "--max_steps", "20", "--eval_steps", "10", "--save_steps",
         "10", "--logging_steps", "10", "--max_eval_samples", "16", "--sample_length", "40"]


def quickstart_commands() -> list[str]:
    """The commands of the Quickstart block that installs, trains and samples (continuation lines joined; one command
    a line, or joined by `&&`)."""
    section = (ROOT / "README.md").read_text().split("## Quickstart")[1].split("\n## ")[0]
    block = next(b for b in re.findall(r"```bash\n(.*?)```", section, re.S) if "scripts/train.py" in b)
    lines = block.replace("\\\n", " ").replace("&&", "\n").splitlines()
    return [" ".join(command.split()) for command in lines if command.strip()]


@pytest.mark.heavy
@pytest.mark.timeout(600)  # a training run (up to 420 s allowed) and a sampling run
def test_quickstart_runs_offline_to_a_sample(tmp_path):
    commands = quickstart_commands()
    assert commands[0] == 'pip install -e ".[dev]"'  # the install: done already (the package runs from this tree)
    train, sample = commands[1:]
    assert train.startswith("accelerate launch ") and sample.startswith("python scripts/generate.py ")
    out = str(tmp_path / "shakespeare")
    env = script_env(HF_HUB_OFFLINE="1")

    argv = train.replace("outputs/shakespeare", out).split()[2:]  # after `accelerate launch`
    trained = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *argv, *SMALL], cwd=ROOT,
                             capture_output=True, text=True, env=env, timeout=420)
    console = trained.stdout + trained.stderr
    assert trained.returncode == 0, console[-3000:]
    # no warning, but the diagnosis of a 20-step model (it has learned little: docs/troubleshooting.md)
    warnings = [line for line in console.splitlines() if re.search("warn", line, re.I)
                and "troubleshooting.md#generates-gibberish" not in line]
    assert "Traceback" not in console and not warnings, console[-3000:]
    # the bundled copy of the data, said once; the summary at the end, with the command to run next
    assert console.count("karpathy/tiny_shakespeare cannot be reached") == 1
    summary = trained.stdout.rstrip().splitlines()[-3:]
    assert summary[0] == "Training finished: 20 steps in " + summary[0].split(" in ")[1]
    assert summary[1].startswith(f"Model: {out} (eval loss ")
    assert summary[2] == (f"Sample from it: python scripts/generate.py --model_name_or_path {out} --prompt ROMEO: "
                          "--max_new_tokens 300")
    assert trained.stdout.count("----- sample at step 20 -----") == 1
    card = (tmp_path / "shakespeare" / "README.md").read_text()
    assert "name: tiny_shakespeare (bundled)" in card and "- karpathy/tiny_shakespeare" in card

    # the sampling command: the script's code in this process (its own interpreter start-up is tested elsewhere)
    script, *arguments = sample.replace("outputs/shakespeare", out).replace('"', "").split()[1:]
    assert script == "scripts/generate.py"
    # with a seed: unseeded, a 20-step model sometimes draws <eos> first and the continuation is empty
    sampled = call_script("generate.py", [*arguments, "--seed", "0"], ROOT)
    assert sampled.returncode == 0 and not sampled.stderr, sampled.stderr[-3000:]
    # a continuation (a 20-step model may end its document early: generation stops at <eos>)
    assert sampled.stdout.startswith("ROMEO:") and len(sampled.stdout.strip()) > len("ROMEO:")
    assert json.loads((tmp_path / "shakespeare" / "training_run.json").read_text())["dataset"] == (
        "tiny_shakespeare (bundled)"
    )


def test_an_error_under_the_quickstarts_launcher_is_one_line_with_the_launchers_status(tmp_path):
    """The README's launch command with a bad flag value: the script's one line, no traceback; the status is the
    launcher's 1 (accelerate exits 1 for any failure of its script, `python scripts/train.py` exits 2), as README
    says."""
    train = quickstart_commands()[1]
    argv = train.replace("outputs/shakespeare", str(tmp_path / "out")).split()[2:]
    failed = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *argv, "--block_size", "0"],
                            cwd=ROOT, capture_output=True, text=True, env=script_env(HF_HUB_OFFLINE="1"), timeout=240)
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error: ")]
    assert failed.returncode == 1 and len(errors) == 1 and "--block_size" in errors[0], failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr and not (tmp_path / "out").exists()
    assert "under `accelerate launch` the status is the launcher's, 1" in (ROOT / "README.md").read_text()
