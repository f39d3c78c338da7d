"""scripts/train.py as users run it: subprocesses, `accelerate launch` with 2 processes, SIGKILL and resume."""

import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from char_lstm.training import train
from char_lstm.training.arguments import parse_arguments
from char_lstm.training.checkpoints import FINAL_STAGING_DIR, STAGING_DIR, checkpoint_problem
from char_lstm.training.output_dir import LOCK_NAME
from helpers import SUBPROCESS_TIMEOUT, call_script, shakespeare_like, write_text


ROOT = Path(__file__).resolve().parents[2]
TRAIN = str(ROOT / "scripts" / "train.py")
TINY = [
    "--embedding_size", "16", "--hidden_size", "32", "--dropout", "0.1", "--block_size", "32",
    "--per_device_train_batch_size", "8", "--report_to", "none", "--dataloader_pin_memory", "false",
    "--sample_length", "30",
]


def env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def with_own_port(accelerate):
    """accelerate's launch flags, with a rendezvous port of its own for a multi-process launch: two runs at once (the
    test workers, a test's second run) would both take accelerate's default port, 29500, and the second one fail."""
    if "--multi_gpu" in accelerate and "--main_process_port" not in accelerate:
        return [*accelerate, "--main_process_port", free_port()]
    return accelerate


def launch(args, cwd, timeout=SUBPROCESS_TIMEOUT, accelerate=None):
    prefix = ([sys.executable, "-m", "accelerate.commands.launch", *with_own_port(accelerate)] if accelerate
              else [sys.executable])
    return subprocess.run(prefix + [TRAIN, *args], capture_output=True, text=True, cwd=cwd, env=env(), timeout=timeout)


@pytest.fixture
def corpus(tmp_path):
    return str(write_text(tmp_path / "corpus.txt", shakespeare_like(8000)))


def test_cli_run_and_error_exit(tmp_path, corpus):
    out = tmp_path / "out"
    result = launch(["--train_file", corpus, "--output_dir", str(out), *TINY, "--max_steps", "30",
                     "--eval_steps", "10", "--save_steps", "10", "--learning_rate", "1e-2"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    evals = [e["eval_loss"] for e in state["log_history"] if "eval_loss" in e]
    assert evals[-1] < evals[0]
    assert "----- sample at step 10 -----" in result.stdout
    assert (out / "model.safetensors").exists() and (out / "README.md").exists()
    # metrics at 4 significant digits, on lines of their own; no warning, no traceback
    assert re.search(r"^\{'eval_loss': '\d\.\d{3}', 'eval_bits_per_char': '\d\.\d{3}'", result.stdout, re.M)
    assert "Warning" not in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]

    # the same run again refuses to touch the checkpoints, in one line (the script's code, in this process)
    again = call_script("train.py", ["--train_file", corpus, "--output_dir", str(out), *TINY, "--max_steps", "30"],
                        tmp_path)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "already holds checkpoints" in again.stderr


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: str(d / "missing.txt"), "missing.txt does not exist"),
        (lambda d: str(write_text(d / "empty.txt", "")), "empty.txt is empty"),
        (lambda d: (d / "bad.txt").write_bytes(b"ok \xff\xfe") and str(d / "bad.txt"), "offset 3 (0xff)"),
    ],
)
def test_cli_data_errors(tmp_path, make, message):
    result = call_script("train.py", ["--train_file", make(tmp_path), "--output_dir", str(tmp_path / "o"), *TINY],
                         tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == next(
        line for line in result.stderr.splitlines() if line.startswith("error: ")
    )
    assert message in result.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_cli_offline_hub_dataset_names_train_file(tmp_path):
    # an explicit dataset id that cannot be loaded stays an error (only the default has a bundled copy)
    result = call_script("train.py", ["--dataset_name", "no-such-user/no-such-dataset", "--output_dir",
                                      str(tmp_path / "o"), *TINY], tmp_path)
    assert result.returncode == 2
    assert "Could not load the dataset 'no-such-user/no-such-dataset'" in result.stderr
    assert "--train_file" in result.stderr


QUICK_RUN = [*TINY, "--max_steps", "2", "--eval_steps", "2", "--sample_every_evals", "0", "--seed", "5"]


def test_a_utf16_file_with_a_byte_order_mark_trains_as_its_utf8_copy(tmp_path):
    """A UTF-16 file with a byte-order mark (as Python's "utf-16" and Windows editors write it) is read as UTF-16,
    without the mark: the same vocabulary, blocks, loss and weights as the UTF-8 file of the same text."""
    text = shakespeare_like(3000).replace("soft!", "soft! \u00e9t\u00e9 \U0001f600")  # a surrogate pair in UTF-16
    (tmp_path / "utf16.txt").write_bytes(text.encode("utf-16"))
    assert (tmp_path / "utf16.txt").read_bytes()[:2] in (b"\xff\xfe", b"\xfe\xff")
    write_text(tmp_path / "utf8.txt", text)
    for name in ("utf16", "utf8"):
        result = call_script("train.py", ["--train_file", tmp_path / f"{name}.txt", "--output_dir", tmp_path / name,
                                          *QUICK_RUN], tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    vocab = json.loads((tmp_path / "utf16" / "vocab.json").read_text(encoding="utf-8"))
    assert vocab == json.loads((tmp_path / "utf8" / "vocab.json").read_text(encoding="utf-8"))
    assert "\ufeff" not in vocab and "\U0001f600" in vocab and "\x00" not in vocab
    results = [json.loads((tmp_path / name / "all_results.json").read_text()) for name in ("utf16", "utf8")]
    assert [{key: r[key] for key in ("train_blocks", "eval_blocks", "eval_loss")} for r in results][0] == {
        key: results[1][key] for key in ("train_blocks", "eval_blocks", "eval_loss")}
    assert_same_weights(tmp_path / "utf8" / "model.safetensors", tmp_path / "utf16" / "model.safetensors")


def test_a_folder_runs_card_and_record_say_what_was_read(tmp_path):
    """Trained on a folder with --include/--exclude, the run's record (training_run.json) and its card (README.md)
    give the patterns, the files read and skipped, and their bytes."""
    tree = tmp_path / "kernel"
    (tree / "drivers").mkdir(parents=True)
    code = shakespeare_like(3000)
    write_text(tree / "a.c", code[:1800])
    write_text(tree / "b.c", code[1800:])
    write_text(tree / "drivers" / "net.c", "int net;\n")  # excluded
    write_text(tree / "notes.md", "not C\n")  # not included
    (tree / "blob.c").write_bytes(b"\x7fELF\x00\x01")  # included, skipped: not text
    out = tmp_path / "out"
    result = call_script("train.py", ["--train_file", tree, "--include", "*.c", "--exclude", "drivers/*",
                                      "--output_dir", out, *QUICK_RUN], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((out / "training_run.json").read_text())
    assert run["dataset"] == "kernel"
    assert run["data_files"] == {"kind": "folder", "include": ["*.c"], "exclude": ["drivers/*"], "files": 2,
                                 "skipped_not_text": 1, "skipped_empty": 0, "bytes": 3000, "encoding": "utf-8"}
    card = (out / "README.md").read_text(encoding="utf-8")
    assert ("Data files: 2 files, 3,000 bytes, read from a folder with `--include '*.c' --exclude 'drivers/*'`; "
            "skipped: 1 not utf-8 text.") in card


KILL_RUN = [*TINY, "--max_steps", "12", "--eval_steps", "4", "--save_steps", "4", "--logging_steps", "4",
            "--max_eval_samples", "16", "--sample_every_evals", "0", "--save_total_limit", "10", "--seed", "3"]


def start(args, cwd, log):
    return subprocess.Popen([sys.executable, TRAIN, *args], cwd=cwd, env=env(), stdout=subprocess.DEVNULL,
                            stderr=open(log, "w"))


def wait_for(process, path):
    """Until `path` exists, polled every millisecond: an event of the run, never some time, so that a loaded machine
    changes nothing."""
    while not path.exists():
        assert process.poll() is None, f"the run ended before {path} appeared"
        time.sleep(0.001)


def kill_when(process, path):
    """SIGKILL `process` the instant `path` exists."""
    wait_for(process, path)
    process.kill()
    assert process.wait() == -signal.SIGKILL


def assert_same_weights(expected_file, got_file):
    expected, got = load_file(expected_file), load_file(got_file)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def reference_run(args, out):
    """The uninterrupted run, in this process (one thread, as the scripts run here: the same arithmetic)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(*parse_arguments([*args, "--output_dir", str(out)]))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.heavy
@pytest.mark.timeout(600)  # 4 runs of the script: 90-140 s measured on 2 shared cores (load ~5)
def test_sigkill_at_any_moment_then_resume_ends_with_the_same_weights(tmp_path, corpus):
    """One run killed three times (each resumed with --resume_from_checkpoint True): while checkpoint-8 is being
    written, the instant it is complete (training goes on), and while the final model is being written. Every kill
    leaves only complete checkpoints, and the run ends with exactly the weights of an uninterrupted one."""
    common = ["--train_file", corpus, *KILL_RUN]
    reference_run(common, tmp_path / "ref")

    out = tmp_path / "killed"
    resume, killed = [], None
    for moment in (Path(STAGING_DIR) / "checkpoint-8", Path("checkpoint-8"), Path(FINAL_STAGING_DIR)):
        run = start([*common, "--output_dir", str(out), *resume], tmp_path, tmp_path / "log")
        kill_when(run, out / moment)
        if killed is not None:  # the killed run's lock is stale: taken over
            assert f"left by process {killed}, which is no longer running" in (tmp_path / "log").read_text()
        assert (out / LOCK_NAME).read_text().strip() == str(run.pid)
        assert not (out / "model.safetensors").exists()
        assert_checkpoints_complete(out)
        resume, killed = ["--resume_from_checkpoint", "True"], run.pid

    resumed = launch([*common, "--output_dir", str(out), *resume], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"left by process {killed}" in resumed.stderr
    assert "checkpoint-12 is at step 12, where the run ends: no more training" in resumed.stderr
    assert not (out / "checkpoint-13").exists()
    assert_same_weights(
        tmp_path / "ref" / "checkpoint-12" / "model.safetensors", out / "checkpoint-12" / "model.safetensors"
    )
    assert_same_weights(tmp_path / "ref" / "model.safetensors", out / "model.safetensors")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "ref").iterdir())  # no lock


@pytest.mark.skipif(not os.environ.get("CHAR_LSTM_KILL_LOOP"), reason="opt-in: CHAR_LSTM_KILL_LOOP=N (minutes)")
@pytest.mark.timeout(3600)  # 2 runs of the script per kill, 40-60 s a kill on 2 shared cores
def test_random_sigkills_then_resume_end_with_the_same_weights(tmp_path, corpus):
    """CHAR_LSTM_KILL_LOOP=N runs, each SIGKILLed at a random instant (while a checkpoint or the final model is being
    written, or while training, a random time after a random event), then resumed: every one ends with exactly the
    uninterrupted run's weights. Prints where each kill landed."""
    rng = random.Random(int(os.environ.get("CHAR_LSTM_KILL_SEED", "0")))
    common = ["--train_file", corpus, *KILL_RUN, "--max_steps", "20"]
    reference_run(common, tmp_path / "ref")
    landed, trial = [], 0
    while len(landed) < int(os.environ["CHAR_LSTM_KILL_LOOP"]):
        trial += 1
        out = tmp_path / f"run{trial}"
        run = start([*common, "--output_dir", str(out)], tmp_path, tmp_path / "log")
        moment = rng.choice(["checkpoint write", "training", "final model write"])
        event = {"checkpoint write": Path(STAGING_DIR) / f"checkpoint-{rng.choice([4, 8, 12, 16, 20])}",
                 "training": Path(f"checkpoint-{rng.choice([4, 8, 12, 16])}"),
                 "final model write": Path(FINAL_STAGING_DIR)}[moment]
        wait_for(run, out / event)
        time.sleep(rng.uniform(0, 0.3 if moment == "training" else 0.03))
        run.kill()
        if run.wait() != -signal.SIGKILL:  # it ended before the kill: not a kill
            continue
        state = ("mid checkpoint write" if (out / STAGING_DIR).exists() else
                 "mid final-model write" if (out / FINAL_STAGING_DIR).exists() else "between writes")
        checkpoints = sorted(p.name for p in assert_checkpoints_complete(out))
        resumed = launch([*common, "--output_dir", str(out)] + (["--resume_from_checkpoint", "True"] if checkpoints
                                                                  else []), tmp_path)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert_same_weights(tmp_path / "ref" / "model.safetensors", out / "model.safetensors")
        assert_same_weights(tmp_path / "ref" / "checkpoint-20" / "model.safetensors",
                            out / "checkpoint-20" / "model.safetensors")
        landed.append(f"kill {len(landed) + 1}: after {event} appeared, {state}; complete checkpoints {checkpoints}: "
                      "resumed, identical")
    print("\n".join(landed))


LONG_RUN = [*TINY, "--max_steps", "100000", "--eval_steps", "4", "--save_steps", "4", "--logging_steps", "4",
            "--max_eval_samples", "16", "--sample_every_evals", "0", "--save_total_limit", "2"]


def assert_checkpoints_complete(out):
    checkpoints = list(out.glob("checkpoint-*"))
    for checkpoint in checkpoints:
        assert checkpoint_problem(str(checkpoint)) is None, checkpoint
    return checkpoints


@pytest.mark.timeout(600)  # 2 runs of the script, ~40 s measured on 2 shared cores
def test_one_run_per_output_dir_and_sigterm_mid_save(tmp_path, corpus):
    """A second run into the folder of a running one is refused in one line naming it; SIGTERM sent the instant a
    checkpoint is being written stops the run with one line, exit code 143, complete checkpoints, the lock released."""
    out = tmp_path / "out"
    args = ["--train_file", corpus, *LONG_RUN, "--output_dir", str(out)]
    first = start(args, tmp_path, tmp_path / "first.log")
    wait_for(first, out / "checkpoint-4")
    assert (out / LOCK_NAME).read_text().strip() == str(first.pid)

    second = call_script("train.py", args, tmp_path)  # from another process: this one
    assert second.returncode == 2
    line = the_error_line(second.stderr)
    assert f"is in use by another training run (process {first.pid}, lock " in line and "--output_dir" in line

    wait_for(first, out / STAGING_DIR)  # a checkpoint is being written now
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 143
    log = (tmp_path / "first.log").read_text()
    assert "Traceback" not in log
    last = log.strip().splitlines()[-1]
    assert last.startswith("Stopped by SIGTERM; checkpoints are complete") and "checkpoint-" in last
    assert "Resume: the same command with --resume_from_checkpoint True." in last
    assert len(assert_checkpoints_complete(out)) >= 1
    assert not (out / LOCK_NAME).exists() and not (out / STAGING_DIR).exists()  # the save cut short is gone


def test_ctrl_c_before_the_first_checkpoint(tmp_path, corpus):
    out = tmp_path / "out"
    run = start(["--train_file", corpus, *LONG_RUN, "--output_dir", str(out)], tmp_path, tmp_path / "log")
    wait_for(run, out / STAGING_DIR / "checkpoint-4")  # in the middle of the first save
    run.send_signal(signal.SIGINT)
    assert run.wait(timeout=120) == 130
    log = (tmp_path / "log").read_text()
    assert "Traceback" not in log and "KeyboardInterrupt" not in log
    assert log.strip().splitlines()[-1].startswith("Stopped by Ctrl-C (SIGINT); checkpoints are complete")
    assert not list(out.glob("checkpoint-*")) or assert_checkpoints_complete(out)


def test_the_stop_line_suggests_a_prompt_the_model_knows(tmp_path):
    """A text without the letters of ROMEO: the stop line's sample command uses the run's own prompt, and works."""
    text = write_text(tmp_path / "lower.txt", shakespeare_like(8000).lower())
    out = tmp_path / "out"
    run = start(["--train_file", str(text), *LONG_RUN, "--output_dir", str(out)], tmp_path, tmp_path / "log")
    wait_for(run, out / "checkpoint-4")
    run.send_signal(signal.SIGINT)
    assert run.wait(timeout=120) == 130
    line = (tmp_path / "log").read_text().strip().splitlines()[-1]
    command = shlex.split(line.split("Sample from it: ")[1])
    assert command[1].endswith("scripts/generate.py") and "ROMEO:" not in command, line
    sampled = call_script("generate.py", [*command[2:], "--max_new_tokens", "5"], ROOT)
    assert sampled.returncode == 0, sampled.stderr


def with_file_size_limit(limit):
    """A preexec_fn that makes every file write past `limit` bytes fail (EFBIG), as a full disk makes them fail
    (ENOSPC), for any user: RLIMIT_FSIZE, with SIGXFSZ (which would kill the process) ignored."""
    import resource

    def limit_writes():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_writes


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="POSIX file size limits")
@pytest.mark.parametrize("what", ["a checkpoint", "the final model"])
def test_a_save_that_fails_for_lack_of_space_is_one_line_and_leaves_the_previous_run_as_it_was(tmp_path, corpus,
                                                                                                  what):
    """A write that fails (a full disk; here a file size limit, which fails the same way for any user) is one
    `error:` line with exit code 2 naming what could not be written and how to go on. The half-written folder is
    removed and what the folder held before is unchanged: a resume goes on from the last complete checkpoint."""
    out = tmp_path / "out"
    big = [*TINY, "--hidden_size", "256", "--sample_every_evals", "0"]  # 3.8 MB of weights
    saves = ["--eval_steps", "2", "--save_steps", "2"] if what == "a checkpoint" else [
        "--eval_steps", "2", "--save_strategy", "no", "--load_best_model_at_end", "false"]
    train(*parse_arguments(["--train_file", corpus, "--output_dir", str(out), *big, *saves, "--max_steps", "2"]))
    before = {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()}
    again = ["--resume_from_checkpoint", "True"] if what == "a checkpoint" else ["--overwrite_output_dir", "true"]
    result = subprocess.run(
        [sys.executable, TRAIN, "--train_file", corpus, "--output_dir", str(out), *big, *saves, "--max_steps", "4",
         *again], capture_output=True, text=True, cwd=tmp_path, env=env(), timeout=SUBPROCESS_TIMEOUT,
        preexec_fn=with_file_size_limit(2_000_000),
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    if what == "a checkpoint":
        assert line.startswith(f"error: Could not write checkpoint-4 into {out} (File too large; "), line
        assert "checkpoint-2 and the checkpoints before it are complete and unchanged" in line
        assert "--resume_from_checkpoint True" in line and ", a checkpoint takes " in line
        assert line.endswith(f"or go on on another disk with --output_dir OTHER --resume_from_checkpoint "
                             f"{out / 'checkpoint-2'}.")
        after = {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()}
        assert after == before  # nothing half written is left, nothing there before was touched
        assert checkpoint_problem(str(out / "checkpoint-2")) is None
    else:
        assert line.startswith(f"error: Could not write the final model into {out} (File too large; "), line
        assert "No checkpoint had been written yet" in line
        assert not (out / FINAL_STAGING_DIR).exists() and not (out / "model.safetensors").exists()
        assert (out / "config.json").read_bytes() == before[Path("config.json")]  # asked to go: only the weights


OUR_FRAME = re.compile(r'File "[^"]*(scripts/train\.py|char_lstm/)')  # a traceback through our code


@pytest.mark.heavy
@pytest.mark.timeout(600)  # two 2-process runs, ~60 s measured on 2 shared cores
def test_lock_and_sigterm_under_accelerate_two_processes(tmp_path, corpus):
    """Under `accelerate launch` with 2 processes the main one holds the lock, and a second 2-process run into the
    same folder is refused: one error line in all, both ranks leave without a traceback. SIGTERM to the launcher (as
    a job scheduler sends it) reaches both ranks, which stop with one line in all (rank 0's) and no traceback; the
    checkpoints stay complete. (The launcher, torch elastic, reports a failed or signalled child with a traceback of
    its own: not ours.)"""
    out = tmp_path / "ddp"
    two = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
           "no"]
    args = ["--train_file", corpus, *LONG_RUN, "--output_dir", str(out)]
    process = subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", *with_own_port(two), TRAIN, *args],
                               cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL, stderr=open(tmp_path / "log", "w"),
                               start_new_session=True)
    wait_for(process, out / "checkpoint-4")
    # the running job is paused (launcher and ranks: SIGSTOP to its process group) while the second one starts: it
    # still holds the lock, and does not spend the cores training meanwhile
    os.killpg(process.pid, signal.SIGSTOP)
    try:
        second = launch(args, tmp_path, accelerate=two)
    finally:
        os.killpg(process.pid, signal.SIGCONT)
    assert second.returncode != 0
    refusals = [line for line in second.stderr.splitlines() if "is in use by another training run" in line]
    assert len(refusals) == 1 and refusals[0].startswith("error: "), second.stderr[-3000:]
    assert f"(process {(out / LOCK_NAME).read_text().strip()}, lock" in refusals[0]
    assert not OUR_FRAME.search(second.stderr), second.stderr[-3000:]

    wait_for(process, out / STAGING_DIR)  # a checkpoint is being written now
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    log = (tmp_path / "log").read_text()
    assert log.count("Stopped by SIGTERM; checkpoints are complete") == 1
    assert not OUR_FRAME.search(log), log[-3000:]
    assert len(assert_checkpoints_complete(out)) >= 1
    assert not (out / LOCK_NAME).exists()


def children(pid):
    """The process ids whose parent is `pid` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry))
    return found


def running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.heavy
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the launcher's processes in /proc")
@pytest.mark.timeout(600)  # ~25 s each on 2 shared cores
# rank 1 killed: the main process sees the lost peer and says so (the simplest path; ~20 s more of the suite's two
# cores): CHAR_LSTM_ALL_KILLS=1 runs it too
@pytest.mark.parametrize("victim", ["rank 0", "the launcher", *(["rank 1"] if os.environ.get("CHAR_LSTM_ALL_KILLS")
                                                                 else [])])
def test_a_process_of_a_two_process_run_killed_stops_the_others_with_one_line(tmp_path, corpus, victim):
    """SIGKILL of one process of a 2-process run (an out-of-memory kill, a user's kill -9): the others stop, one of
    them says once what is kept and how to resume, with no traceback; the checkpoints are complete. SIGKILL of the
    launcher: its processes stop too (they would train on alone, holding the folder's lock)."""
    out = tmp_path / "out"
    two = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-q"]
    launcher = subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", *with_own_port(two), TRAIN,
                                 "--train_file", corpus, *LONG_RUN, "--output_dir", str(out)], cwd=tmp_path, env=env(),
                                stdout=subprocess.DEVNULL, stderr=open(tmp_path / "log", "w"), start_new_session=True)
    try:
        wait_for(launcher, out / "checkpoint-4")
        workers = children(launcher.pid)
        main = int((out / LOCK_NAME).read_text())
        assert main in workers and len(workers) == 2, workers
        other = next(pid for pid in workers if pid != main)
        os.kill({"rank 0": main, "rank 1": other, "the launcher": launcher.pid}[victim], signal.SIGKILL)
        launcher.wait(timeout=120)
        deadline = time.monotonic() + 120
        while any(running(pid) for pid in workers):  # after the launcher's SIGKILL, no one else waits for them
            assert time.monotonic() < deadline, "the run's processes go on without their launcher"
            time.sleep(0.05)
    finally:
        os.killpg(launcher.pid, signal.SIGKILL) if any(running(pid) for pid in children(launcher.pid)) else None
    log = (tmp_path / "log").read_text()
    said = [line for line in log.splitlines() if line.startswith("Stopped")]
    assert len(said) == 1, log[-3000:]
    if victim == "the launcher":
        assert said[0].startswith(f"Stopped: the launcher (process {launcher.pid}) ended; "), said
    assert "checkpoints are complete" in said[0] and "--resume_from_checkpoint True" in said[0], said
    assert "Traceback" not in log, log[-3000:]
    assert len(assert_checkpoints_complete(out)) >= 1
    if victim != "rank 0":  # the lock of a killed main process stays behind (the next run takes it over)
        assert not (out / LOCK_NAME).exists()


def the_error_line(stderr):
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


@pytest.mark.heavy
@pytest.mark.timeout(600)  # 60 s measured on 2 shared cores; two processes on 2 cores suffer most from load
def test_accelerate_launch_two_processes(tmp_path, corpus):
    out = tmp_path / "ddp"
    result = launch(
        ["--train_file", corpus, "--output_dir", str(out), *TINY, "--num_train_epochs", "1", "--eval_steps", "10",
         "--save_steps", "10", "--logging_steps", "5", "--log_level", "info"],
        tmp_path,
        timeout=480,
        accelerate=["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                    "--dynamo_backend", "no"],
    )
    assert result.returncode == 0, result.stderr[-4000:]
    logs = result.stdout + result.stderr
    # 2 processes x 8 blocks: the batches are sharded across the ranks, not duplicated
    assert re.search(r"Total train batch size \(w\. parallel, distributed & accumulation\) = 16", logs), logs[-3000:]
    train_text = shakespeare_like(8000)
    blocks = int(len(train_text) * 0.95 - 1) // 32
    state = json.loads((out / "trainer_state.json").read_text())
    assert abs(state["global_step"] - blocks / 16) <= 1
    # only rank 0 prints samples and writes the outputs
    assert logs.count("----- sample at step 10 -----") == 1
    assert (out / "model.safetensors").exists() and (out / "README.md").exists()
    # the saved folder loads with the Auto classes and generates
    # (without char_lstm: tests/scripts/test_push_to_hub_script.py)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    generated = tokenizer.decode(model.generate(**tokenizer(["ROMEO:"], return_tensors="pt"), max_new_tokens=10)[0])
    assert generated.startswith("ROMEO:") and len(generated) > len("ROMEO:")


def test_a_bad_flag_under_two_processes_is_said_once(tmp_path, corpus):
    """Both processes parse the command line; the first one alone prints what is wrong with it."""
    result = launch(["--train_file", corpus, "--output_dir", str(tmp_path / "o"), *TINY, "--learning_rat", "1e-3"],
                    tmp_path, accelerate=["--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                                          "--mixed_precision", "no", "--dynamo_backend", "no"])
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: Unknown argument(s) --learning_rat 1e-3 (did you mean --learning_rate?): write flags in "
                      "full, without abbreviation (train.py --help lists them)."], result.stderr[-3000:]


def test_accelerate_cpu_flag_with_several_processes_is_refused(tmp_path, corpus):
    """accelerate's --cpu starts one process whatever --num_processes says: say so instead of training alone."""
    result = launch(["--train_file", corpus, "--output_dir", str(tmp_path / "o"), *TINY], tmp_path,
                    accelerate=["--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                                "--dynamo_backend", "no"])
    assert result.returncode != 0
    assert "error: accelerate launch --cpu --num_processes N starts only one process" in result.stderr
    assert "accelerate launch --multi_gpu --num_processes N" in result.stderr


@pytest.mark.heavy
@pytest.mark.timeout(900)  # two 2-process runs, 84 s together measured on 2 shared cores
def test_stateful_two_processes_own_their_streams_and_resume_exactly(tmp_path, corpus):
    """--stateful under 2 real processes: each saves the state of its own streams with the checkpoint, and a run
    resumed from that checkpoint ends with the weights of the uninterrupted run."""
    import shutil

    import torch

    two = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no"]
    args = [*TINY, "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "2", "--stateful", "true",
            "--max_steps", "6", "--eval_steps", "3", "--save_steps", "3", "--sample_every_evals", "0",
            "--load_best_model_at_end", "false"]
    full = tmp_path / "full"
    result = launch(["--train_file", corpus, "--output_dir", str(full), *args], tmp_path, timeout=420, accelerate=two)
    assert result.returncode == 0, result.stderr[-4000:]
    states = [torch.load(full / "checkpoint-3" / f"stream_state_{rank}.pt")["states"] for rank in (0, 1)]
    assert all(state[0][0].shape[0] == 4 for state in states)  # 4 streams per process
    assert not torch.allclose(states[0][0][0], states[1][0][0])  # different text, different states

    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "checkpoint-3", part / "checkpoint-3")
    result = launch(["--train_file", corpus, "--output_dir", str(part), *args, "--resume_from_checkpoint", "True"],
                    tmp_path, timeout=420, accelerate=two)
    assert result.returncode == 0, result.stderr[-4000:]
    expected, got = load_file(full / "model.safetensors"), load_file(part / "model.safetensors")
    assert all(torch.allclose(expected[k], got[k], atol=1e-6) for k in expected)
