"""The final evaluation: a seeded sample of the validation split that grows until the eval loss is precise to
--final_eval_stderr (or the whole split), with its standard error reported; what --max_eval_samples bounds."""

import json
import math

import numpy as np
import pytest

from char_lstm.training import train
from char_lstm.training.arguments import parse_arguments
from char_lstm.training.final import FINAL_EVAL_FIRST_CHARACTERS
from char_lstm.training.metrics import loss_stderr, metrics_from_rows
from helpers import shakespeare_like, write_text


TINY = ["--embedding_size", "16", "--hidden_size", "32", "--dropout", "0.0", "--block_size", "32",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "64", "--report_to", "none",
        "--dataloader_pin_memory", "false", "--sample_every_evals", "0", "--seed", "3", "--disable_tqdm", "true",
        "--learning_rate", "1e-2"]
# The validation text: 600k characters, 18,750 blocks of 33 ids (32 targets each, <eos> first); the first stage reads
# 250k characters of them.
VALIDATION_CHARACTERS = 600_000


def test_loss_stderr_is_the_standard_error_of_the_mean_over_blocks():
    rng = np.random.default_rng(0)
    counts = np.full(400, 64.0)
    totals = counts * rng.normal(1.5, 0.3, size=400)  # blocks of 64 characters, mean loss 1.5, spread 0.3
    means = totals / counts
    assert math.isclose(loss_stderr(totals, counts), means.std(ddof=1) / math.sqrt(400), rel_tol=1e-9)
    # sampled from 1,000 blocks: the finite-population correction; all of them read: exact
    assert math.isclose(loss_stderr(totals, counts, population=1000), means.std(ddof=1) / 20 * math.sqrt(0.6))
    assert loss_stderr(totals, counts, population=400) == 0.0
    assert math.isnan(loss_stderr(totals[:1], counts[:1]))
    # blocks with fewer characters (-100 labels) weigh less: the mean is per character
    metrics = metrics_from_rows(np.array([10.0, 2.0]), np.array([10.0, 1.0]))
    assert math.isclose(metrics["bits_per_char"], 12 / 11 / math.log(2))


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("texts")
    write_text(folder / "train.txt", shakespeare_like(20000))
    write_text(folder / "validation.txt", shakespeare_like(VALIDATION_CHARACTERS))
    return folder


def run(texts, out, *extra):
    argv = ["--train_file", str(texts / "train.txt"), "--validation_file", str(texts / "validation.txt"),
            "--output_dir", str(out), "--max_steps", "30", "--eval_steps", "15", "--save_steps", "15", *TINY, *extra]
    return train(*parse_arguments(argv))


@pytest.mark.heavy
def test_the_final_evaluation_reads_a_sample_precise_to_its_stderr_and_zero_reads_all(texts, tmp_path, capsys):
    """The default reads a sample (one stage here) with a standard error under 0.005 nats/char; its loss lies within
    4 standard errors of the whole split's, which --final_eval_stderr 0 reads (the same model: the same seed). A
    tighter target reads more, in stages, logged as one evaluation."""
    alone = ("--load_best_model_at_end", "false", "--eval_strategy", "no")  # no periodic evaluation to start from
    whole = run(texts, tmp_path / "whole", "--final_eval_stderr", "0", *alone)
    assert whole["eval_loss_stderr"] == 0 and whole["eval_characters"] == VALIDATION_CHARACTERS
    assert "eval loss " in capsys.readouterr().out

    sample = run(texts, tmp_path / "sample", *alone)
    read = sample["eval_characters"]
    assert read == (FINAL_EVAL_FIRST_CHARACTERS // 32) * 32 < whole["eval_characters"]  # one stage was enough
    assert 0 < sample["eval_loss_stderr"] <= 0.005
    assert abs(sample["eval_loss"] - whole["eval_loss"]) <= 4 * sample["eval_loss_stderr"]
    assert math.isclose(sample["eval_bits_per_char"], sample["eval_loss"] / math.log(2))
    summary = capsys.readouterr().out
    assert f"± {sample['eval_loss_stderr']:.2g} nats/char (standard error; a sample of {read:,} validation" in summary
    results = json.loads((tmp_path / "sample" / "all_results.json").read_text())
    assert results["eval_loss_stderr"] == sample["eval_loss_stderr"] and results["eval_characters"] == read
    card = (tmp_path / "sample" / "README.md").read_text()
    assert f"the final model (a sample of {read:,} characters) | {sample['eval_loss']:.4f} ± " in card
    whole_card = (tmp_path / "whole" / "README.md").read_text()
    assert f"the final model (all {VALIDATION_CHARACTERS:,} characters) | {whole['eval_loss']:.4f} | " in whole_card

    target = sample["eval_loss_stderr"] * 0.6  # about 2.8x the blocks: a second stage
    tight = run(texts, tmp_path / "tight", "--final_eval_stderr", f"{target:.6f}", *alone)
    assert read < tight["eval_characters"] < whole["eval_characters"]
    assert tight["eval_loss_stderr"] <= target
    history = json.loads((tmp_path / "tight" / "trainer_state.json").read_text())["log_history"]
    finals = [entry for entry in history if "eval_characters" in entry]
    assert len(finals) == 1 and finals[0]["eval_loss"] == tight["eval_loss"]


def test_the_last_periodic_evaluation_of_the_final_model_is_not_read_again(texts, tmp_path):
    """The periodic evaluations read the first blocks of the final evaluation's order: when the last one scored the
    final model (the last step, the best one), the final evaluation starts from its blocks and reads only what its
    precision needs beyond them; here nothing (8,000 blocks: more than the least it reads, 250k characters, and a
    standard error under 0.005)."""
    metrics = run(texts, tmp_path / "out", "--max_eval_samples", "8000", "--save_steps", "30", "--eval_steps", "30")
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    last = [entry for entry in history if "eval_loss" in entry and "eval_characters" not in entry][-1]
    assert last["step"] == 30 and metrics["eval_characters"] == 8000 * 32
    assert metrics["eval_loss"] == pytest.approx(last["eval_loss"], rel=1e-5)
    assert metrics["eval_runtime"] < last["eval_runtime"] / 10  # no block read again
    # 64 blocks of the last evaluation are precise enough (an untrained model's losses spread little), but fewer
    # than the least the final evaluation reads: it reads on to 250k characters
    few = run(texts, tmp_path / "few", "--max_eval_samples", "64", "--save_steps", "30", "--eval_steps", "30")
    assert few["eval_characters"] == (FINAL_EVAL_FIRST_CHARACTERS // 32) * 32


def test_max_eval_samples_bounds_the_evaluations_while_training_only(texts, tmp_path):
    metrics = run(texts, tmp_path / "out", "--max_eval_samples", "50", "--final_eval_stderr", "0")
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    periodic = [entry for entry in history if "eval_loss" in entry and "eval_characters" not in entry]
    assert len(periodic) == 2 and all(entry["eval_samples_per_second"] > 0 for entry in periodic)
    assert all(entry["eval_runtime"] < metrics["eval_runtime"] for entry in periodic)
    assert metrics["eval_characters"] == VALIDATION_CHARACTERS


def test_stateful_stages_carry_the_streams_state_and_read_what_one_pass_reads(texts, tmp_path):
    """--stateful: the sample is the first windows of every stream, and a later stage continues each stream from the
    state the earlier one left; read to the end in stages (a target no sample meets), it is the one-pass evaluation
    of the whole split."""
    whole = run(texts, tmp_path / "whole", "--stateful", "true", "--final_eval_stderr", "0")
    staged = run(texts, tmp_path / "staged", "--stateful", "true", "--final_eval_stderr", "0.00001")
    assert staged["eval_characters"] == whole["eval_characters"] and staged["eval_loss_stderr"] == 0
    assert staged["eval_loss"] == pytest.approx(whole["eval_loss"], abs=1e-6)
    sample = run(texts, tmp_path / "sample", "--stateful", "true")
    assert 0 < sample["eval_characters"] < whole["eval_characters"] and sample["eval_characters"] % (64 * 32) == 0
