"""char_lstm's defaults: the model's flags take theirs from CharLSTMConfig and build the config they name; those
that need evaluations (the best checkpoint, the plateau schedule) follow the flags a user gives, from the command
line, a preset or a config file, with one info line; a flag given against them is one error line."""

import dataclasses
import inspect
import json
import logging
import re
from collections import Counter

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

from char_lstm import CharLSTMConfig
from char_lstm.configuration_char_lstm import CELL_TYPES
from char_lstm.errors import UsageError
from char_lstm.training import CharLSTMTrainingArguments, DataArguments, ModelArguments, parse_arguments, train
from char_lstm.training.arguments import PRESETS
from char_lstm.training.preparation import load_tokenizer_and_model
from helpers import call_script, run_script, shakespeare_like, write_text


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


# The model's flags: train.py's arguments that CharLSTMConfig takes too.
MODEL_FLAGS = {"embedding_size", "hidden_size", "num_hidden_layers", "dropout", "cell_type"}


def shared_with_the_config() -> list[str]:
    """The ModelArguments fields that are CharLSTMConfig's attributes too (read on a config, not from its code)."""
    config = CharLSTMConfig()
    return [field.name for field in dataclasses.fields(ModelArguments) if hasattr(config, field.name)]


def test_the_model_flags_take_their_defaults_from_the_config():
    parameters = inspect.signature(CharLSTMConfig.__init__).parameters
    shared = {field.name: field.default for field in dataclasses.fields(ModelArguments) if field.name in parameters}
    assert set(shared) == MODEL_FLAGS == set(shared_with_the_config())
    assert shared == {name: parameters[name].default for name in shared}  # a literal that differs fails here
    model_args = parse_arguments(["--output_dir", "unused"])[0]
    config = CharLSTMConfig()
    assert {name: getattr(model_args, name) for name in shared} == {name: getattr(config, name) for name in shared}


def test_help_shows_each_model_default_and_the_cell_types(tmp_path):
    result = call_script("train.py", ["--help"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    shown = " ".join(result.stdout.split())  # argparse wraps the help at the terminal's width
    config = CharLSTMConfig()
    for name in MODEL_FLAGS:
        # the metavar: the choices where the flag has some (--cell_type {lstm,gru,rnn}), else the name
        metavar = re.escape("{" + ",".join(CELL_TYPES) + "}") if name == "cell_type" else name.upper()
        alias = "" if "_" not in name else rf", --{name.replace('_', '-')} {metavar}"
        pattern = rf"--{name} {metavar}{alias} [^(]*\(default: {re.escape(str(getattr(config, name)))}\)"
        assert re.search(pattern, shown), name
    assert f"The recurrent cell: {', '.join(CELL_TYPES)}. (default: {config.cell_type})" in shown


def test_the_char_rnn_preset_names_the_defaults():
    parser = HfArgumentParser((ModelArguments, DataArguments, CharLSTMTrainingArguments))
    assert {name: parser.get_default(name) for name in PRESETS["char-rnn"]} == PRESETS["char-rnn"]


@pytest.mark.parametrize(
    "flags, given, cutoffs",
    [
        ((), {}, None),
        (("--embedding_size", "8", "--hidden_size", "16", "--num_hidden_layers", "1", "--dropout", "0.1",
          "--cell_type", "gru"),
         {"embedding_size": 8, "hidden_size": 16, "num_hidden_layers": 1, "dropout": 0.1, "cell_type": "gru"}, None),
        (("--preset", "cpu-small", "--cell_type", "rnn", "--adaptive_softmax", "8,16"),
         {"embedding_size": 64, "hidden_size": 256, "dropout": 0.1, "cell_type": "rnn"}, [8, 16]),
    ],
)
def test_the_model_a_run_builds_is_the_config_of_its_flags(flags, given, cutoffs):
    model_args, data_args, training_args = parse_arguments(["--output_dir", "unused", *flags])
    counts = Counter(shakespeare_like(6000))
    tokenizer, model = load_tokenizer_and_model(model_args, data_args, counts, training_args)
    expected = CharLSTMConfig(
        **{name: getattr(model_args, name) for name in shared_with_the_config()},
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        unk_token_id=tokenizer.unk_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        adaptive_softmax_cutoffs=cutoffs,
    )
    assert model.config.to_dict() == expected.to_dict()
    defaults = CharLSTMConfig()
    for name in MODEL_FLAGS:
        assert getattr(model.config, name) == given.get(name, getattr(defaults, name)), name
    assert len(tokenizer) == len(set(shakespeare_like(6000))) + len(tokenizer.all_special_tokens)


def test_a_saved_model_keeps_its_config_whatever_the_model_flags(tmp_path):
    flags = ["--output_dir", "unused", "--embedding_size", "8", "--hidden_size", "16", "--cell_type", "gru"]
    model_args, data_args, training_args = parse_arguments(flags)
    tokenizer, model = load_tokenizer_and_model(model_args, data_args, Counter(shakespeare_like(6000)), training_args)
    model.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    model_args, data_args, training_args = parse_arguments(
        ["--output_dir", "unused", "--model_name_or_path", str(tmp_path / "saved"), "--hidden_size", "32"])
    _, loaded = load_tokenizer_and_model(model_args, data_args, Counter("other text"), training_args)
    assert loaded.config.to_dict() == {**model.config.to_dict(), "_name_or_path": str(tmp_path / "saved")}
