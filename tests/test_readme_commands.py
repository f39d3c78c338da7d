"""Every command of the README and docs/ that runs one of this project's scripts parses with that script's own argument
parser (in-process: a renamed or removed flag fails here, not in a reader's terminal), and every Python snippet of the
README compiles. What the commands do is tested by the script tests."""

import re
import runpy
import shlex
import subprocess
import sys

import pytest
from accelerate.commands.launch import launch_command_parser
from transformers import HfArgumentParser

from char_lstm.cli import parse_command_line
from char_lstm.convert import ConvertArguments
from char_lstm.doctor import DoctorArguments
from char_lstm.evaluation import EvaluateArguments
from char_lstm.export_command import ExportArguments
from char_lstm.hub import PushArguments
from char_lstm.sampling import GenerateArguments
from char_lstm.serving.server import ServeArguments
from char_lstm.training.arguments import parse_arguments as parse_train_arguments
from helpers import ROOT


DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_OURS = ("pip", "npm", "cd", "lm_eval", "echo", "bash", "curl", "scripts/mutation.sh", "CHAR_LSTM_KILL_LOOP=8")


def dataclass_parser(*classes):
    return lambda argv: parse_command_line(HfArgumentParser(classes, allow_abbrev=False), argv)


def script_function(path: str, name: str):
    """A function defined by a script that is not part of the package (loaded without running its main)."""
    sys.path.insert(0, str((ROOT / path).parent))
    try:
        return runpy.run_path(str(ROOT / path), run_name="readme_check")[name]
    finally:
        sys.path.pop(0)


def benchmark_parser(argv):
    return dataclass_parser(script_function("benchmarks/benchmark.py", "BenchmarkArguments"))(argv)


def demo_parser(argv):
    pytest.importorskip("gradio", reason="demo/app.py imports gradio (pip install -e '.[demo]')")
    return script_function("demo/app.py", "parse_arguments")(argv)


PARSERS = {
    "scripts/train.py": parse_train_arguments,
    "scripts/generate.py": dataclass_parser(GenerateArguments),
    "scripts/evaluate.py": dataclass_parser(EvaluateArguments),
    "scripts/push_to_hub.py": dataclass_parser(PushArguments),
    "scripts/convert_pytorch_checkpoint.py": dataclass_parser(ConvertArguments),
    "scripts/export.py": dataclass_parser(ExportArguments),
    "scripts/doctor.py": dataclass_parser(DoctorArguments),
    "scripts/serve.py": dataclass_parser(ServeArguments),
    "scripts/bptt_demo.py": lambda argv: script_function("scripts/bptt_demo.py", "parse_arguments")(argv),
    "scripts/benchmark.py": benchmark_parser,
    "benchmarks/benchmark.py": benchmark_parser,
    "benchmarks/scale.py": lambda argv: script_function("benchmarks/scale.py", "build_parser")().parse_args(argv),
    "benchmarks/web.py": lambda argv: dataclass_parser(script_function("benchmarks/web.py",
                                                                       "WebBenchmarkArguments"))(argv),
    "demo/app.py": demo_parser,
}


def shell_commands(document):
    """(document name, one command as argv) for every command of the document's ```bash blocks: continuation lines
    joined, comments dropped, `&&` and `|` separating commands, leading VAR=value assignments dropped."""
    for block in re.findall(r"```bash\n(.*?)```", document.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            command = []
            for word in [*words, "&&"]:
                if word in ("&&", "|"):
                    while command and re.fullmatch(r"[A-Z_]+=\S*", command[0]):
                        command.pop(0)
                    if command:
                        yield document.name, command
                    command = []
                else:
                    command.append(word)


def our_commands():
    """(where, script, argv) for each command that runs one of this project's scripts, through `accelerate launch`
    (its launcher flags parsed by accelerate's own parser) or `python`."""
    found = []
    for document in DOCUMENTS:
        for name, argv in shell_commands(document):
            where = f"{name}: {shlex.join(argv)}"
            if argv[:2] == ["accelerate", "launch"]:
                launch = launch_command_parser().parse_args(argv[2:])
                assert launch.config_file is None or (ROOT / launch.config_file).is_file(), where
                found.append((where, launch.training_script, launch.training_script_args))
            elif argv[0] == "python" and argv[1] != "-m":
                found.append((where, argv[1], argv[2:]))
            else:
                assert argv[0] in NOT_OURS or argv[:2] in (["accelerate", "config"], ["python", "-m"]), where
    return found


COMMANDS = our_commands()


def test_the_readme_runs_every_script():
    readme = {script for where, script, _ in COMMANDS if where.startswith("README.md")}
    assert readme == set(PARSERS) - {"scripts/benchmark.py"}, readme


@pytest.mark.parametrize(("where", "script", "argv"), COMMANDS, ids=[where for where, _, _ in COMMANDS])
def test_command_parses(where, script, argv):
    assert script in PARSERS, f"{where}: no parser known for {script}"
    if argv == ["--help"]:
        with pytest.raises(SystemExit) as exit:
            PARSERS[script](argv)
        assert exit.value.code == 0
    elif script == "scripts/train.py" and len(argv) == 1 and argv[0].endswith((".json", ".yaml")):
        pass  # a config file the reader writes: its reading is tested in test_training.py
    else:
        PARSERS[script](argv)


def test_readme_commands_in_order_write_distinct_folders():
    """Pasted in order, no README command writes into a folder an earlier one wrote, unless it says to rebuild it
    (a refusal in the reader's terminal otherwise)."""

    def flag(argv, name):
        return argv[argv.index(name) + 1] if name in argv else None

    written = set()
    for where, script, argv in COMMANDS:
        if not where.startswith("README.md") or argv == ["--help"]:
            continue
        folders = [flag(argv, "--output_dir")]
        if script == "scripts/push_to_hub.py":
            model_dir = flag(argv, "--model_dir")
            folders = [folders[0] or f"{model_dir}-hub", flag(argv, "--space") and (flag(argv, "--space_dir")
                                                                                   or f"{model_dir}-space")]
        for folder in filter(None, folders):
            assert folder not in written or "--overwrite_output_dir" in argv, f"{where}: {folder} written before"
            written.add(folder)


def test_no_readme_command_writes_over_a_file_of_the_checkout():
    """A file a README command writes (--plot, --output_json), pasted at the checkout's root, is none the checkout
    tracks: the reader's clone stays as it came (bptt_demo's example used to redraw docs/gradient_flow.png)."""
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    tracked = set(listed.stdout.splitlines())
    for where, _, argv in COMMANDS:
        for flag in ("--plot", "--output_json"):
            if where.startswith("README.md") and flag in argv:
                path = argv[argv.index(flag) + 1]
                assert path not in tracked, f"{where}: {flag} {path} would overwrite the checkout's {path}"


def test_readme_python_compiles():
    for snippet in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        compile(snippet, "README.md", "exec")
