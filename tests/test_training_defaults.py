"""char_lstm's defaults that need evaluations (the best checkpoint, the plateau schedule) follow the flags a user
gives, from the command line, a preset or a config file, with one info line; a flag given against them is one error
line."""

import json
import logging
import re

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from char_lstm.errors import UsageError
from char_lstm.training import parse_arguments, train
from helpers import run_script, shakespeare_like, write_text


TINY = [
    "--embedding_size", "16", "--hidden_size", "32", "--dropout", "0.0", "--block_size", "32",
    "--per_device_train_batch_size", "8", "--report_to", "none", "--dataloader_pin_memory", "false",
    "--sample_every_evals", "0",
]
EVAL_OFF = ("--eval_strategy no: char_lstm's defaults that need evaluations are off: the final model is the last one, "
            "not the best (--load_best_model_at_end false), and the learning rate decays linearly to 0 "
            "(--lr_scheduler_type linear, transformers' default) instead of at eval-loss plateaus.")
BEST_OFF = "the final model is the last one, not the best (--load_best_model_at_end false)"


def parse(flags, caplog):
    """The training arguments `flags` give, and the info lines said while parsing them."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="char_lstm.training.arguments"):
        training_args = parse_arguments(["--output_dir", "unused", *flags])[2]
    return training_args, [record.getMessage() for record in caplog.records]


@pytest.mark.slow
def test_eval_strategy_no_alone_trains_says_so_once_and_the_model_loads(tmp_path):
    text = write_text(tmp_path / "train.txt", shakespeare_like(6000))
    out = tmp_path / "out"
    result = run_script("train.py", ["--train_file", str(text), "--output_dir", str(out), *TINY, "--max_steps", "8",
                                     "--save_steps", "4", "--logging_steps", "1", "--eval_strategy", "no"], tmp_path,
                        OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("INFO char_lstm.training.arguments: ") == 1
    assert f"INFO char_lstm.training.arguments: {EVAL_OFF}\n" in result.stderr
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "eval_loss" in entry] == [8]  # only the final model's evaluation
    rates = [entry["learning_rate"] for entry in history if "learning_rate" in entry]
    assert len(rates) == 8 and all(later < earlier for earlier, later in zip(rates, rates[1:]))  # linear, to 0
    assert rates[-1] == pytest.approx(2e-3 / 8)
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(tokenizer)
    inputs = tokenizer(["To be"], return_tensors="pt")
    assert model(**inputs).logits.shape == (1, inputs["input_ids"].shape[1], len(tokenizer))


@pytest.mark.parametrize(
    "flags, best, scheduler, said",
    [
        ((), True, "reduce_lr_on_plateau", None),
        (("--eval_strategy", "no"), False, "linear", EVAL_OFF),
        # what the user gave stays; only the defaults follow
        (("--eval_strategy", "no", "--load_best_model_at_end", "false"), False, "linear",
         "--eval_strategy no: char_lstm's default that needs evaluations is off: the learning rate decays linearly"),
        (("--eval_strategy", "no", "--no_load_best_model_at_end"), False, "linear", "--eval_strategy no: "),
        (("--eval_strategy", "no", "--lr_scheduler_type", "cosine"), False, "cosine",
         f"--eval_strategy no: char_lstm's default that needs evaluations is off: {BEST_OFF}."),
        (("--eval_strategy=no", "--lr_scheduler_type=constant"), False, "constant", "--eval_strategy no: "),
        # a preset's values are defaults too: cpu-small's cosine schedule needs no evaluations
        (("--preset", "cpu-small", "--eval_strategy", "no"), False, "cosine",
         f"--eval_strategy no: char_lstm's default that needs evaluations is off: {BEST_OFF}."),
        (("--save_strategy", "no"), False, "reduce_lr_on_plateau",
         f"--save_strategy no: char_lstm's default that needs checkpoints is off: {BEST_OFF}."),
        (("--save_strategy", "epoch"), False, "reduce_lr_on_plateau",
         f"--save_strategy epoch with --eval_strategy steps: char_lstm's default that needs every checkpoint "
         f"evaluated is off: {BEST_OFF}; pass --eval_strategy epoch too to keep the best."),
        (("--eval_strategy", "epoch"), False, "reduce_lr_on_plateau",
         re.compile(r"--eval_strategy epoch with --save_strategy steps: .*; pass --save_strategy epoch too to keep "
                    r"the best\.$")),
        (("--eval_strategy", "epoch", "--save_strategy", "epoch"), True, "reduce_lr_on_plateau", None),
        (("--save_strategy", "best"), True, "reduce_lr_on_plateau", None),
        (("--eval_steps", "20"), False, "reduce_lr_on_plateau",
         re.compile(r"--eval_steps 20 with checkpoints every 250 steps: .*; pass --save_steps 20 \(or a multiple\) "
                    r"to keep")),
        (("--save_steps", "100"), False, "reduce_lr_on_plateau",
         re.compile(r"--save_steps 100 with evaluations every 250 steps: .*; pass --eval_steps 100 \(or a divisor "
                    r"of it\)")),
        (("--eval_steps", "50"), True, "reduce_lr_on_plateau", None),  # 250 is a multiple of 50
        (("--preset", "cpu-small", "--eval_steps", "100"), True, "cosine", None),  # its checkpoints: every 1000
        (("--preset", "cpu-small", "--eval_steps", "300"), False, "cosine", "--eval_steps 300 with checkpoints every "
                                                                            "1000 steps: "),
        (("--eval_steps", "0.1", "--save_steps", "0.25"), False, "reduce_lr_on_plateau",
         "--eval_steps 0.1 with checkpoints every 0.25 of the run: "),
    ],
)
def test_defaults_follow_the_flags_given_with_one_info_line(caplog, flags, best, scheduler, said):
    training_args, lines = parse(flags, caplog)
    assert training_args.load_best_model_at_end is best
    assert str(training_args.lr_scheduler_type.value) == scheduler
    assert training_args.lr_scheduler_kwargs == ({"factor": 0.5, "patience": 3} if "plateau" in scheduler else {})
    if said is None:
        assert lines == []
    else:
        assert len(lines) == 1 and "\n" not in lines[0]
        assert said.match(lines[0]) if isinstance(said, re.Pattern) else lines[0].startswith(said), lines[0]
    if str(training_args.eval_strategy.value) == "no":
        assert training_args.metric_for_best_model is None  # nothing to measure it


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--eval_strategy", "no", "--load_best_model_at_end", "true"),
         r"--eval_strategy no with --load_best_model_at_end true: keeping the best checkpoint needs evaluations; drop "
         r"it or --eval_strategy no\."),
        (("--eval_strategy", "no", "--load_best_model_at_end"), r"--eval_strategy no with --load_best_model_at_end "),
        (("--eval_strategy", "no", "--lr_scheduler_type", "reduce_lr_on_plateau"),
         r"--eval_strategy no with --lr_scheduler_type reduce_lr_on_plateau: the plateau schedule needs evaluations; "
         r"drop it or --eval_strategy no\."),
        (("--eval_strategy", "no", "--lr_scheduler_type", "greedy"), r"--eval_strategy no with --lr_scheduler_type "
                                                                     r"greedy: the greedy schedule needs evaluations"),
        # kwargs given for the default schedule keep it: refused, not dropped
        (("--eval_strategy", "no", "--lr_scheduler_kwargs", '{"factor": 0.2}'),
         r"--eval_strategy no with --lr_scheduler_type reduce_lr_on_plateau: "),
        (("--eval_strategy", "no", "--metric_for_best_model", "bits_per_char"),
         r"--eval_strategy no with --metric_for_best_model bits_per_char: a metric for the best checkpoint needs "),
        (("--eval_strategy", "no", "--save_strategy", "best"), r"--eval_strategy no with --save_strategy best: "),
        (("--eval_strategy", "no", "--load_best_model_at_end", "true", "--lr_scheduler_type", "reduce_lr_on_plateau"),
         r"--eval_strategy no with --load_best_model_at_end true and --lr_scheduler_type reduce_lr_on_plateau: "
         r"keeping the best checkpoint and the plateau schedule need evaluations; drop them or --eval_strategy no\."),
        (("--save_strategy", "no", "--load_best_model_at_end", "true"),
         r"--save_strategy no with --load_best_model_at_end true: keeping the best checkpoint needs checkpoints; drop "
         r"one of the two\."),
        (("--save_strategy", "epoch", "--load_best_model_at_end", "true"),
         r"--save_strategy epoch with --eval_strategy steps and --load_best_model_at_end true: keeping the best "
         r"checkpoint needs every checkpoint evaluated; evaluate and save alike \(--eval_strategy epoch or "
         r"--save_strategy steps\), or drop --load_best_model_at_end\."),
        (("--eval_steps", "20", "--load_best_model_at_end", "true"),
         r"--save_steps 250 is not a multiple of --eval_steps 20 and --load_best_model_at_end true: .*pass "
         r"--save_steps 20 \(or a multiple\), or drop --load_best_model_at_end\."),
        (("--preset", "cpu-small", "--eval_steps", "300", "--load_best_model_at_end", "true"),
         r"--save_steps 1000 is not a multiple of --eval_steps 300 "),
    ],
)
def test_a_flag_given_against_the_others_is_one_error_line(caplog, flags, message):
    with pytest.raises(UsageError, match=f"^{message}") as error:
        parse(flags, caplog)
    assert "\n" not in str(error.value)
    assert caplog.records == []  # refused before anything is said to follow


def test_early_stopping_without_evaluations_is_one_error_line_and_nothing_else(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="char_lstm")
    args = parse_arguments(["--output_dir", str(tmp_path / "out"), "--eval_strategy", "no",
                            "--early_stopping_patience", "2"])
    with pytest.raises(UsageError, match=r"^--early_stopping_patience needs evaluations: drop --eval_strategy no\.$"):
        train(*args)
    assert caplog.records == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_config_files_follow_as_the_command_line(tmp_path, caplog, suffix):
    def config(values):
        path = tmp_path / f"config{suffix}"
        path.write_text(json.dumps({"output_dir": "unused", **values}))  # JSON is YAML too
        return str(path)

    caplog.set_level(logging.INFO, logger="char_lstm.training.arguments")
    training_args = parse_arguments([config({"eval_strategy": "no"})])[2]
    assert training_args.load_best_model_at_end is False and training_args.lr_scheduler_type.value == "linear"
    assert [record.getMessage() for record in caplog.records] == [EVAL_OFF]
    training_args = parse_arguments([config({"preset": "cpu-small", "save_strategy": "epoch"})])[2]
    assert training_args.load_best_model_at_end is False and training_args.lr_scheduler_type.value == "cosine"
    with pytest.raises(UsageError, match=r"^--eval_strategy no with --load_best_model_at_end true: "):
        parse_arguments([config({"eval_strategy": "no", "load_best_model_at_end": True})])


def test_the_main_process_alone_says_what_followed(caplog, monkeypatch):
    """Every process of a multi-process run parses the same flags: the line is said once, by rank 0."""
    monkeypatch.setenv("RANK", "1")
    training_args, lines = parse(["--eval_strategy", "no"], caplog)
    assert training_args.load_best_model_at_end is False and lines == []
    monkeypatch.setenv("RANK", "0")
    assert parse(["--eval_strategy", "no"], caplog)[1] == [EVAL_OFF]


def test_a_refused_combination_is_one_error_line_from_the_script(tmp_path):
    result = run_script("train.py", ["--output_dir", str(tmp_path / "out"), "--eval_strategy", "no",
                                     "--lr_scheduler_type", "reduce_lr_on_plateau"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: --eval_strategy no with --lr_scheduler_type reduce_lr_on_plateau: "
                                          "the plateau schedule needs evaluations; drop it or --eval_strategy no."]
    assert not (tmp_path / "out").exists()
