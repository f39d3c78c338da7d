"""The troubleshooting table, live: each failure mode forced in a real (tiny) run is reported once, with the flags that
fix it; a healthy run reports none (char_lstm.training.diagnostics, char_lstm.sampling.repetition_loop)."""

import logging
import re

import pytest
import torch
from transformers import TrainerCallback

from char_lstm.doctor import recommended_launch
from char_lstm.errors import UsageError
from char_lstm.sampling import repetition_loop
from char_lstm.training import train
from char_lstm.training.arguments import parse_arguments
from char_lstm.training.callbacks import TrainingDiverged
from char_lstm.training.diagnostics import TrainingOutOfMemory
from helpers import ROOT, call_script, log_history, run, shakespeare_like, write_text


LINK = "docs/troubleshooting.md#"
QUIET = ("--sample_every_evals", "0", "--save_steps", "1000")


def reports(caplog) -> list[str]:
    """The diagnostics said in a run: every log line that links to the troubleshooting doc."""
    return [record.getMessage() for record in caplog.records if LINK in record.getMessage()]


def one_report(caplog, symptom: str) -> str:
    found = [message for message in reports(caplog) if message.startswith(symptom)]
    assert len(found) == 1, reports(caplog)
    return found[0]


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    """A healthy tiny run (its model, and the diagnostics it said: none expected)."""
    tmp = tmp_path_factory.mktemp("healthy")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("char_lstm")
    logger.addHandler(handler)
    try:
        _, out = run(tmp, "--max_steps", "60", "--eval_steps", "20", "--save_steps", "20", "--logging_steps", "10",
                     "--learning_rate", "1e-2", "--sample_length", "100")
    finally:
        logger.removeHandler(handler)
    return out, [record.getMessage() for record in records if LINK in record.getMessage()]


def test_a_healthy_run_reports_nothing(healthy):
    out, said = healthy
    assert said == []
    assert [e["eval_loss"] for e in log_history(out) if "eval_loss" in e][-1] < 2.0


def test_a_nan_or_exploding_loss_stops_with_the_gradient_norms_before_clipping(tmp_path):
    with pytest.raises(TrainingDiverged) as error:
        run(tmp_path, "--max_steps", "10", "--eval_steps", "100", "--logging_steps", "1", "--learning_rate", "1e3",
            *QUIET, "--load_best_model_at_end", "false")
    message = str(error.value)
    # the guard stops at the 3rd log far above the start: 4 logs, each with Trainer's gradient norm before clipping
    assert re.search(r"stayed above .* \(gradient norm before clipping over the last 4 logs: 0\.\d+(, [\d.e+]+){3} "
                     r"\(clipped to 1\)\)", message), message
    assert "--learning_rate 1e-4" in message and "--max_grad_norm" in message and "--fp16/--bf16" in message
    assert f"{LINK}loss-is-nan-or-explodes" in message


@pytest.mark.parametrize(
    "flags, cause, fixes",
    [
        (("--learning_rate", "1e-7"), "a learning rate too low (--learning_rate 1e-07", ["--learning_rate 2e-3"]),
        (("--hidden_size", "4", "--num_hidden_layers", "1", "--cell_type", "rnn"),
         "a cell without gates (--cell_type rnn) and a model too small (4 units)",
         ["--cell_type lstm or gru", "--hidden_size 128"]),
    ],
    ids=["lr-1e-7", "rnn-4-units"],
)
def test_a_loss_stuck_high_is_reported_once_with_its_cause(tmp_path, caplog, flags, cause, fixes):
    run(tmp_path, "--max_steps", "30", "--eval_steps", "5", "--logging_steps", "5", *QUIET, *flags)
    message = one_report(caplog, "Loss stuck high: after 4 evaluations")
    assert "no better than the unigram baseline of the data (3.32" in message
    assert "uniform over the vocabulary: 3.829)" in message
    assert f"Likely cause: {cause}" in message and all(fix in message for fix in fixes), message
    assert message.endswith(f"{LINK}loss-stuck-high.")


def test_a_resumed_run_counts_the_evaluations_before_it(tmp_path, caplog):
    """Stopped at step 10 after 2 evaluations and resumed: at step 20 the loss has been stuck for 4 evaluations, as
    in a run that was never stopped (not 2, which would say nothing)."""
    flags = ("--eval_steps", "5", "--logging_steps", "5", "--sample_every_evals", "0", "--save_steps", "10",
             "--learning_rate", "1e-7", "--load_best_model_at_end", "false")
    run(tmp_path, "--max_steps", "10", *flags)
    assert not [message for message in reports(caplog) if message.startswith("Loss stuck high")]
    run(tmp_path, "--max_steps", "20", *flags, "--resume_from_checkpoint", "True")
    one_report(caplog, "Loss stuck high: after 4 evaluations")


OVERFIT = [
    "--validation_file", "VALIDATION", "--hidden_size", "128", "--num_hidden_layers", "1", "--stride", "4",
    "--per_device_train_batch_size", "16", "--learning_rate", "1e-2", "--lr_scheduler_type", "constant",
    "--max_steps", "30", "--eval_steps", "5", "--save_steps", "10", "--logging_steps", "5",
    "--sample_every_evals", "0",
]
TRAIN_TEXT = ("ROMEO:\nBut, soft! what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
              "Arise, fair sun, and kill the envious moon,\nWho is already sick and pale with grief.\n")
VALIDATION_TEXT = ("JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\nDeny thy father and refuse thy name;\n"
                   "Or, if thou wilt not, be but sworn my love,\nAnd I'll no longer be a Capulet.\n")


def test_overfitting_is_reported_once_and_early_stopping_stops_it(tmp_path, caplog):
    """A 128-unit model on 4 lines: the eval loss rises from the 3rd evaluation while the training loss falls."""
    validation = write_text(tmp_path / "validation.txt", VALIDATION_TEXT)
    flags = [str(validation) if flag == "VALIDATION" else flag for flag in OVERFIT]
    _, out = run(tmp_path, *flags, text=TRAIN_TEXT)
    message = one_report(caplog, "Overfitting: the eval loss rose for 3 evaluations in a row")
    assert "while the training loss fell" in message and "The best checkpoint (step 10, eval loss" in message
    assert "--early_stopping_patience 3" in message and "--dropout" in message and "--weight_decay" in message
    assert max(e["step"] for e in log_history(out)) == 30
    caplog.clear()
    _, out = run(tmp_path, *flags, "--early_stopping_patience", "2", out="early")
    steps = [e["step"] for e in log_history(out) if "eval_loss" in e]
    assert steps[-1] == 20  # best at step 10, no better at 15 and 20: stopped
    assert "--early_stopping_patience" not in " ".join(reports(caplog))


def test_early_stopping_needs_evaluations(tmp_path):
    args = parse_arguments(["--output_dir", str(tmp_path / "out"), "--early_stopping_patience", "2",
                            "--eval_strategy", "no", "--load_best_model_at_end", "false",
                            "--lr_scheduler_type", "cosine"])
    with pytest.raises(UsageError, match="--early_stopping_patience needs evaluations: drop --eval_strategy no"):
        train(*args)


def test_an_undertrained_model_is_called_gibberish_and_its_cold_samples_loop(tmp_path, caplog, capsys):
    """10 steps: the final model barely beats the unigram baseline; sampled at temperature 0.05 it loops."""
    metrics, _ = run(tmp_path, "--max_steps", "10", "--eval_steps", "10", "--save_steps", "10", "--learning_rate",
                     "1e-2", "--sample_temperature", "0.05", "--sample_length", "100")
    message = one_report(caplog, "Generates gibberish: the final model")
    assert "the unigram baseline of the data (4.80 bits/char)" in message and "it has not converged" in message
    assert "--max_steps" in message and "--temperature (0.5-0.8)" in message
    assert message.endswith(f"{LINK}generates-gibberish.")
    assert metrics["unigram_bits_per_char"] == pytest.approx(4.796, abs=1e-3)
    gain = metrics["unigram_bits_per_char"] - metrics["eval_bits_per_char"]
    assert gain < 0.5 and f"{gain:.2f} bits/char better than the data's unigram baseline)." in capsys.readouterr().out
    loop = one_report(caplog, "Repeats the same phrase: the sample at step 10 repeats")
    assert "--sample_temperature" in loop and "--top_p" in loop and "--repetition_penalty" in loop
    assert "--dropout" in loop


def test_generate_reports_a_repetition_loop_at_a_low_temperature(healthy, tmp_path):
    out, _ = healthy
    args = ["--model_name_or_path", str(out), "--prompt", "ROMEO:", "--max_new_tokens", "200", "--seed", "0"]
    cold = call_script("generate.py", [*args, "--temperature", "0.05"], tmp_path)
    assert cold.returncode == 0, cold.stderr[-2000:]
    assert cold.stderr.count("Repeats the same phrase: the sample repeats") == 1, cold.stderr
    for flag in ("--temperature", "--top_p", "--repetition_penalty", "--dropout", f"{LINK}repeats-the-same-phrase"):
        assert flag in cold.stderr
    warm = call_script("generate.py", [*args, "--temperature", "1.0"], tmp_path)
    assert warm.returncode == 0 and LINK not in warm.stderr, warm.stderr


def test_repetition_loop_finds_loops_and_passes_prose():
    assert repetition_loop("the king " * 20) == ("the king ", 1.0)
    assert repetition_loop("ROMEO:\n" + "ab" * 30)[0] == "ab"
    unit, share = repetition_loop("So we begin: " + "wrer thero " * 4 + "and then " + "we wee weer uror " * 4)
    assert unit.strip() == "we wee weer uror" and 0.8 < share < 0.9  # two loops fill the text
    assert repetition_loop(shakespeare_like(2000)) is None  # its period (the 4 speeches) is no short loop
    assert repetition_loop("ha ha ha, said the king, and went to bed; the queen slept on.") is None
    assert repetition_loop("aaaa") is None  # too short to tell


def test_training_very_slow_names_the_batch_size(tmp_path, caplog):
    run(tmp_path, "--max_steps", "4", "--eval_steps", "100", "--logging_steps", "2", *QUIET,
        "--per_device_train_batch_size", "1", "--load_best_model_at_end", "false")
    message = one_report(caplog, "Training very slow: ")
    assert "characters/s over the first 2 steps" in message
    assert "batches of 1 block(s)" in message and "--per_device_train_batch_size" in message
    assert message.endswith(f"{LINK}training-very-slow.")


class AllocateTooMuch(TrainerCallback):
    """A real allocation failure in the middle of training: a petabyte asked of the CPU allocator at step 2."""

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 1:
            torch.empty(2**50, dtype=torch.uint8)


def test_out_of_memory_is_one_message_with_the_sizes_and_the_options(tmp_path):
    with pytest.raises(TrainingOutOfMemory) as error:
        run(tmp_path, "--max_steps", "4", *QUIET, callbacks=[AllocateTooMuch()])
    message = str(error.value)
    assert message.startswith("Out of memory on the CPU (can't allocate memory: you tried to allocate "), message
    assert "batches of 8 blocks of 32 characters per device (eval: 16), a model of 0.02M parameters" in message
    for option in ("--per_device_train_batch_size 4 --gradient_accumulation_steps 2", "--bf16",
                   "--auto_find_batch_size", "--block_size", f"{LINK}out-of-memory"):
        assert option in message


def test_the_checklist_warns_once_each(tmp_path, caplog):
    run(tmp_path, "--max_steps", "2", "--max_grad_norm", "0", "--cell_type", "rnn", "--block_size", "64",
        "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
        "--lr_scheduler_type", "cosine", "--sample_every_evals", "0")
    said = [message for message in reports(caplog) if message.endswith(f"{LINK}the-checklist.")]
    assert len(said) == 4, reports(caplog)
    assert said[0].startswith("Gradient clipping is off (--max_grad_norm 0)")
    assert said[1].startswith("A cell without gates (--cell_type rnn) on blocks of 64 characters")
    assert said[2].startswith("No validation loss during training (--eval_strategy no)")
    assert said[3].startswith("No checkpoints (--save_strategy no)")



def test_doctor_reports_the_environment_and_the_launch_command(tmp_path):
    result = call_script("doctor.py", [], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    assert lines["torch"].strip().startswith(torch.__version__)
    assert lines["threads"].strip().startswith(f"torch uses {torch.get_num_threads()} of ")
    assert "transformers " in lines["libraries"] and "datasets " in lines["libraries"]
    assert lines["Hub"].strip().startswith("not reachable (HF_HUB_OFFLINE is set)")  # no request made
    assert "scripts/train.py --preset" in lines["launch"]
    assert result.stdout.rstrip().endswith("docs/troubleshooting.md")


@pytest.mark.parametrize(
    "machine, command",
    [
        ((2, False, 16, True), "accelerate launch --multi_gpu --num_processes 2 scripts/train.py --preset char-rnn "),
        ((1, False, 16, True), "accelerate launch scripts/train.py --preset char-rnn --bf16 "),
        ((0, False, 2, False), "accelerate launch --config_file configs/accelerate-2processes.yaml scripts/train.py "),
        ((0, False, 8, False), "OMP_NUM_THREADS=4 accelerate launch --config_file configs/accelerate-2processes.yaml"),
        ((0, False, 1, False), "accelerate launch -q --config_file configs/accelerate-1process.yaml scripts/train"),
    ],
)
def test_doctor_recommends_the_launch_for_the_machine(machine, command):
    assert recommended_launch(*machine).startswith(command)


def test_doctor_on_two_cores_recommends_the_readmes_2_process_command():
    """Word for word, so that pasted after the Quickstart it writes its own folder (not the Quickstart's, refused)."""
    command = recommended_launch(0, False, 2).split("  #")[0]
    assert command.replace(" --preset", " \\\n    --preset") + "\n" in (ROOT / "README.md").read_text()


def test_every_message_links_to_a_section_of_the_troubleshooting_doc():
    doc = (ROOT / "docs" / "troubleshooting.md").read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-")
               for title in re.findall(r"^## (.+)$", doc, re.M)}
    code = "\n".join(path.read_text() for path in (ROOT / "src" / "char_lstm").rglob("*.py"))
    linked = set(re.findall(r"see_troubleshooting\(['\"]([a-z-]+)['\"]\)", code))
    assert len(linked) == 8 and linked <= anchors, linked - anchors
    readme = (ROOT / "README.md").read_text()
    assert all(f"docs/troubleshooting.md#{anchor}" in readme for anchor in linked - {"overfitting", "the-checklist"})
