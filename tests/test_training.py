"""char_lstm.training's `train()` with a real Trainer: the end-to-end run, the arguments (files, presets, the
flags Trainer would refuse in several lines or ignore), the Trainer flags a run honours, the data it reads, and a run
that starts from a saved model. Elsewhere: checkpoints and resuming (test_checkpoints.py), the output folder
(test_output_dir.py), the callbacks (test_callbacks.py), --stateful (test_stateful.py), the summary lines and the
card's results table (test_summary.py)."""

import dataclasses
import json
import logging
import math
import os
import platform

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from transformers.generation.utils import logger as generation_logger
from transformers.testing_utils import CaptureLogger

from char_lstm.errors import UsageError
from char_lstm.tokenization_char_lstm import CharLSTMTokenizer
from char_lstm.training import train
from char_lstm.training.arguments import PRESETS, CharLSTMTrainingArguments, parse_arguments
from char_lstm.training.checkpoints import CharLSTMTrainer
from char_lstm.training.runtime import keep_freed_memory, native_bf16
from helpers import TINY, log_history, make_model, run, shakespeare_like, write_text


# ---------------------------------------------------------------------------------------------------------------------
# The end-to-end run: the eval loss falls, the outputs load, the card and the lines the run ends with


def test_end_to_end_eval_loss_falls_and_outputs_load(tmp_path, capsys):
    metrics, out = run(tmp_path, "--max_steps", "60", "--eval_steps", "20", "--save_steps", "20",
                       "--logging_steps", "10", "--learning_rate", "1e-2")
    evals = [entry["eval_loss"] for entry in log_history(out) if "eval_loss" in entry]
    assert len(evals) >= 3 and evals[-1] < evals[0] - 0.3
    assert math.isclose(metrics["eval_bits_per_char"], metrics["eval_loss"] / math.log(2), rel_tol=1e-9)
    assert math.isclose(metrics["eval_perplexity"], math.exp(metrics["eval_loss"]), rel_tol=1e-9)
    for entry in log_history(out):  # the evaluations while training: one loss, whichever way it is shown
        if "eval_loss" in entry:
            assert math.isclose(entry["eval_bits_per_char"], entry["eval_loss"] / math.log(2), rel_tol=1e-9)
    out_text = capsys.readouterr().out
    # no --sample_prompt, not tiny Shakespeare: the samples start from a line start of the validation text
    assert "----- sample at step 20 -----\nFirst Citizen:" in out_text
    # the last step's sample once (the final evaluation does not print another), then the summary
    assert out_text.count("----- sample at step 60 -----") == 1
    assert out_text.rstrip().splitlines()[-3:] == [
        "Training finished: 60 steps in " + out_text.split("Training finished: 60 steps in ")[1].split()[0] + " s.",
        f"Model: {out} (eval loss {metrics['eval_loss']:#.4g} nats/char (all {metrics['eval_characters']:,} "
        "validation characters), "
        f"{metrics['eval_bits_per_char']:#.4g} bits/char, "
        f"{metrics['unigram_bits_per_char'] - metrics['eval_bits_per_char']:.2f} bits/char better than the data's "
        "unigram baseline).",
        f"Sample from it: python scripts/generate.py --model_name_or_path {out} --prompt 'First Citizen:' "
        "--max_new_tokens 300",
    ]
    for name in ("model.safetensors", "config.json", "generation_config.json", "vocab.json", "README.md"):
        assert (out / name).exists(), name
    assert (out / "training_curves.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    card = (out / "README.md").read_text()
    assert "### Training results\n\n![Training curves](training_curves.png)\n" in card
    assert f"value: {round(metrics['eval_loss'], 4)}" in card and "| block (sequence) length | 32 |" in card
    # the card tells what this run did: procedure, a training-results table, the data by name (no local path)
    assert "Trained with `transformers.Trainer` for 60 steps" in card
    assert "Adam (AdamW with weight decay 0)" in card and "multiplied by 0.5 after 3 evaluations without" in card
    assert "halved" not in card and "cosine" not in card
    history = log_history(out)
    for step in (20, 40, 60):
        evaluation = next(e for e in history if e.get("step") == step and "eval_loss" in e)
        loss = next(e["loss"] for e in history if e.get("step") == step and "loss" in e)
        assert (f"| {step} | {loss:.4f} | {evaluation['eval_loss']:.4f} | "
                f"{evaluation['eval_bits_per_char']:.4f} |") in card
    assert "`train.txt`" in card and str(tmp_path / "train.txt") not in card
    assert f"# {out.name}\n" in card and f'from_pretrained("{out}"' in card  # the folder, not its staging copy
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    # the model's use_cache, not Trainer's training-time False: a forward in eval mode returns its cache
    assert json.loads((out / "config.json").read_text())["use_cache"] is True
    assert json.loads((out / "checkpoint-60" / "config.json").read_text())["use_cache"] is True
    assert model(**tokenizer(["ROMEO:"], return_tensors="pt")).cache is not None
    assert model.generation_config.do_sample and model.generation_config.temperature == 0.8
    assert model.generation_config.top_k == 0  # sampling from every character, not transformers' top 50
    text = tokenizer.decode(model.generate(**tokenizer(["ROMEO:"], return_tensors="pt"), max_new_tokens=20)[0])
    assert text.startswith("ROMEO:") and len(text) == 26
    # no saved length overrides the caller's (a saved max_new_tokens would win over max_length), and a caller's
    # max_new_tokens draws no "Both max_new_tokens and max_length" warning (which a saved max_length causes)
    saved = json.loads((out / "generation_config.json").read_text())
    assert "max_new_tokens" not in saved and "max_length" not in saved
    prompt = tokenizer(["ROMEO:"], return_tensors="pt")
    assert model.generate(**prompt, max_length=16).shape == (1, 16)
    with CaptureLogger(generation_logger) as captured:
        assert model.generate(**prompt, max_new_tokens=4).shape == (1, 10)
    assert "max_length" not in captured.out


# ---------------------------------------------------------------------------------------------------------------------
# Arguments: config files, presets and the reference recipe's defaults


def test_arguments_from_json_and_yaml_files_and_presets(tmp_path):
    values = {"train_file": "x.txt", "hidden_size": 48, "learning_rate": 0.01, "output_dir": str(tmp_path / "o")}
    (tmp_path / "c.json").write_text(json.dumps(values))
    model_args, data_args, training_args = parse_arguments([str(tmp_path / "c.json")])
    assert (model_args.hidden_size, data_args.train_file, training_args.learning_rate) == (48, "x.txt", 0.01)
    (tmp_path / "c.yaml").write_text("train_file: y.txt\npreset: cpu-small\nembedding_size: 24\n")
    model_args, data_args, training_args = parse_arguments([str(tmp_path / "c.yaml")])
    assert (model_args.embedding_size, model_args.hidden_size) == (24, PRESETS["cpu-small"]["hidden_size"])
    assert training_args.max_steps == PRESETS["cpu-small"]["max_steps"]
    # command line: the preset fills in, explicit flags win
    model_args, _, training_args = parse_arguments(["--preset", "cpu-small", "--hidden_size", "100"])
    assert model_args.hidden_size == 100 and model_args.dropout == PRESETS["cpu-small"]["dropout"]
    # the char-rnn recipe's defaults without a preset (the same as --preset char-rnn)
    model_args, data_args, training_args = parse_arguments([])
    assert (model_args.embedding_size, model_args.hidden_size, model_args.num_hidden_layers) == (128, 512, 2)
    assert (model_args.dropout, data_args.block_size, training_args.per_device_train_batch_size) == (0.5, 100, 64)
    assert (training_args.learning_rate, training_args.max_grad_norm) == (2e-3, 1.0)
    assert training_args.lr_scheduler_kwargs == {"factor": 0.5, "patience": 3}
    assert data_args.dataset_name == "karpathy/tiny_shakespeare"
    _, _, cosine = parse_arguments(["--lr_scheduler_type", "cosine"])
    assert cosine.lr_scheduler_kwargs == {}


def test_the_old_preset_name_seed_still_works_and_says_once_it_is_deprecated(caplog, monkeypatch):
    """`--preset seed` (renamed `char-rnn`) gives the same values, with one deprecation line per process."""
    from char_lstm.training import arguments

    monkeypatch.setattr(arguments, "_renames_said", set())  # as in a fresh process
    renamed = [parse_arguments(["--preset", "char-rnn", "--output_dir", "x"])]
    with caplog.at_level(logging.WARNING, logger="char_lstm"):
        renamed += [parse_arguments(["--preset", "seed", "--output_dir", "x"]) for _ in range(2)]
    for model_args, *rest in renamed[1:]:
        assert model_args.preset == "seed"
        assert (dataclasses.replace(model_args, preset="char-rnn"), *rest) == renamed[0]
    said = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert said == ["--preset seed is deprecated: it is now called 'char-rnn' (same values)."]


@pytest.mark.skipif(torch.cuda.is_available() or not os.path.isfile("/proc/cpuinfo"), reason="reads the CPU's flags")
def test_preset_bf16_is_on_exactly_where_the_cpu_flags_say_bf16_is_native():
    # an oracle apart from torch's own checks: the kernel's list of the CPU's features
    flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":")[1].split())
    native = bool({"avx512_bf16", "amx_bf16", "amx_tile"} & flags)
    assert native_bf16("cpu") == native
    model_args, data_args, training_args = parse_arguments(["--preset", "cpu-small", "--output_dir", "x"])
    assert training_args.bf16 == native and training_args.use_cpu == native
    model_args, data_args, training_args = parse_arguments(
        ["--preset", "cpu-small", "--output_dir", "x", "--bf16", "false"]
    )
    assert not training_args.bf16


# ---------------------------------------------------------------------------------------------------------------------
# Trainer's flags, checked when parsed: one line naming the flags, or a value that works


def test_eval_steps_that_do_not_divide_save_steps_name_both_flags():
    """--eval_steps 20 with --load_best_model_at_end true (checkpoints every 250 steps by default) was refused by
    Trainer naming neither flag. (--eval_steps 20 alone: tests/test_training_defaults.py.)"""
    message = (r"^--save_steps 250 is not a multiple of --eval_steps 20 and --load_best_model_at_end true: "
               r".*--save_steps 20 ")
    with pytest.raises(ValueError, match=message):
        parse_arguments(["--eval_steps", "20", "--load_best_model_at_end", "true", "--output_dir", "unused"])
    parse_arguments(["--eval_steps", "20", "--load_best_model_at_end", "false", "--output_dir", "unused"])
    parse_arguments(["--eval_steps", "125", "--output_dir", "unused"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--save_strategy", "epoch", "--load_best_model_at_end", "true"),
         r"^--save_strategy epoch with --eval_strategy steps and --load_best_model_at_end true: .*\(--eval_strategy "
         r"epoch or --save_strategy steps\), or drop --load_best_model_at_end\.$"),
        (("--fp16",), r"^--fp16 needs a GPU \(on a CPU the run would be float32\): drop it, or pass --bf16"),
        (("--save_safetensors", "False"), r"^--save_safetensors is removed in transformers v5, which always saves "),
        (("--evaluation_strategy", "epoch", "--save_strategy", "epoch"),  # a v4 command line: the rename is said
         r"^--evaluation_strategy is renamed --eval_strategy in transformers v5\.$"),
        (("--save_strategy", "no", "--load_best_model_at_end", "true"), r"needs checkpoints; drop one of the two\.$"),
    ],
)
def test_flags_trainer_refuses_in_several_lines_or_ignores_on_a_cpu_are_one_line(flags, message):
    if flags == ("--fp16",) and (torch.cuda.is_available() or torch.backends.mps.is_available()):
        pytest.skip("fp16 runs on the GPU")
    with pytest.raises(UsageError, match=message):
        parse_arguments(["--output_dir", "unused", *flags])


def test_lower_is_better_for_bits_per_char_and_perplexity():
    """Trainer takes a metric whose name does not end in "loss" as higher-is-better: the best checkpoint by
    bits/char was the worst one."""
    def greater(*flags):
        return parse_arguments(["--output_dir", "unused", *flags])[2].greater_is_better

    assert greater("--metric_for_best_model", "bits_per_char") is False
    assert greater("--metric_for_best_model", "eval_perplexity") is False
    assert greater("--metric_for_best_model", "bits_per_char", "--greater_is_better", "true") is True


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, bf16 runs there")
def test_bf16_on_a_machine_without_gpu_trains_on_the_cpu():
    assert parse_arguments(["--output_dir", "unused", "--bf16"])[2].use_cpu is True  # Trainer refused it without


# ---------------------------------------------------------------------------------------------------------------------
# Trainer's flags in a run: label smoothing, the best checkpoint's metric, gradient clipping, bf16 and gradient
# accumulation, DDP's unused-parameter search, TensorBoard


@pytest.mark.parametrize("targets", ["labels", "shift_labels"])
def test_label_smoothing_smooths_the_next_character_in_training_and_evaluation_measures_the_text(tmp_path, tokenizer,
                                                                                               targets):
    """Trainer shifts labels for its smoother only for transformers' own causal LMs: it smoothed towards each
    position's own character here (a model that learns to copy its input), and stateful training's `shift_labels`
    were not smoothed at all."""
    from torch.nn.functional import cross_entropy

    model = make_model(tokenizer)
    args = CharLSTMTrainingArguments(output_dir=str(tmp_path), label_smoothing_factor=0.1, report_to="none",
                                     eval_strategy="no", load_best_model_at_end=False, lr_scheduler_type="constant")
    trainer = CharLSTMTrainer(model=model, args=args)
    ids = torch.randint(0, len(tokenizer), (4, 17))
    if targets == "labels":
        inputs, given = {"input_ids": ids[:, :-1], "labels": ids[:, :-1]}, ids[:, 1:-1]
    else:  # stateful training: the targets of every position, the window's next character too
        given = ids[:, 1:].contiguous()
        inputs = {"input_ids": ids[:, :-1], "labels": ids[:, :-1], "shift_labels": given}

    def expected(smoothing):
        with torch.no_grad():
            logits = model(input_ids=ids[:, :-1]).logits[:, : given.shape[1]]
        return cross_entropy(logits.reshape(-1, logits.shape[-1]), given.reshape(-1), label_smoothing=smoothing)

    model.train()  # dropout 0: train and eval mode compute the same logits
    with torch.no_grad():
        assert torch.allclose(trainer.compute_loss(model, dict(inputs)), expected(0.1), atol=1e-6)
        # normalised by the targets of the whole accumulated batch when Trainer counts them (here: twice these)
        halved = trainer.compute_loss(model, dict(inputs), num_items_in_batch=torch.tensor(2 * given.numel()))
        assert torch.allclose(halved, expected(0.1) / 2, atol=1e-6)
        model.eval()
        assert torch.allclose(trainer.compute_loss(model, dict(inputs)), expected(0.0), atol=1e-6)
    assert trainer.label_smoother is not None  # still on for the next training step


def test_best_checkpoint_by_bits_per_char_and_no_clipping_are_recorded_as_such(tmp_path):
    _, out = run(tmp_path, "--max_steps", "6", "--eval_steps", "2", "--save_steps", "2", "--logging_steps", "2",
                 "--learning_rate", "1e-2", "--metric_for_best_model", "bits_per_char", "--max_grad_norm", "0",
                 "--sample_every_evals", "0")
    state = json.loads((out / "trainer_state.json").read_text())
    evals = {h["step"]: h["eval_bits_per_char"] for h in state["log_history"] if "eval_bits_per_char" in h}
    best = min(evals, key=evals.get)
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{best}") and evals[best] < max(evals.values())
    run_record = json.loads((out / "training_run.json").read_text())
    assert run_record["procedure"].endswith("no gradient clipping.")
    assert "| gradient clipping (max norm) | none |" in (out / "README.md").read_text()


class RecordTrainingForwards(TrainerCallback):
    """Records, for every forward of the model in training mode, the batch size and the dtype the output layer
    computes the logits in (accelerate hands the model's outputs back in float32 on some CPUs, so the model's own
    output dtype says nothing about autocast). Its hook is on the head from the start of each optimizer step to its
    end only, so evaluation and the samples printed at evaluations see the model as a run without it does (a hook
    sends generate() to transformers' own loop)."""

    def __init__(self):
        self.calls, self.handle = [], None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        def hook(module, inputs, output):
            if module.training:
                self.calls.append((output.shape[0], output.dtype))

        self.handle = model.lm_head.register_forward_hook(hook)

    def on_step_end(self, args, state, control, **kwargs):
        self.handle.remove()


def test_bf16_autocast_computes_the_training_forward_in_bf16_and_accumulation_runs_two_batches_per_step(tmp_path):
    recorder = RecordTrainingForwards()
    metrics, out = run(tmp_path, "--max_steps", "6", "--eval_steps", "3", "--save_steps", "3", "--bf16", "true",
                       "--use_cpu", "true", "--gradient_accumulation_steps", "2", "--sample_every_evals", "1",
                       "--sample_length", "20", callbacks=[recorder])
    assert math.isfinite(metrics["eval_loss"]) and metrics["global_step"] == 6  # sampling under bf16 autocast too
    # 6 optimizer steps x 2 accumulated batches of 8 blocks, each forward under bf16 autocast
    assert recorder.calls == [(8, torch.bfloat16)] * 12
    state = json.loads((out / "trainer_state.json").read_text())
    blocks = int(len(shakespeare_like(8000)) * 0.95 - 1) // 32  # blocks of 33 ids, one every 32 characters
    assert state["global_step"] == 6 and state["epoch"] == pytest.approx(6 * 2 * 8 / blocks, rel=0.05)


def test_every_parameter_gets_a_gradient_so_ddp_needs_no_unused_parameter_search(cell_type, tokenizer):
    """Why `ddp_find_unused_parameters` defaults to False (DDP warns when it searches and finds nothing)."""
    model = make_model(tokenizer, cell_type=cell_type, dropout=0.1).train()
    ids = torch.tensor([tokenizer.encode("ROMEO: But soft")])
    model(input_ids=ids, labels=ids).loss.backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []
    assert CharLSTMTrainingArguments(output_dir="x").ddp_find_unused_parameters is False


def test_tensorboard_gets_metrics_and_samples(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(tmp_path, "--max_steps", "4", "--eval_steps", "2", "--save_steps", "2", "--report_to", "tensorboard")
    event_dirs = {os.path.dirname(p) for p in map(str, (tmp_path).rglob("events.out.tfevents*"))}
    assert event_dirs
    tags = {"tensors": set(), "scalars": set()}
    for folder in event_dirs:
        acc = EventAccumulator(folder)
        acc.Reload()
        tags["tensors"] |= set(acc.Tags()["tensors"])
        tags["scalars"] |= set(acc.Tags()["scalars"])
    assert any("sample" in tag for tag in tags["tensors"]), tags
    assert "eval/bits_per_char" in tags["scalars"] and "eval/loss" in tags["scalars"]


# ---------------------------------------------------------------------------------------------------------------------
# The data a run reads: bad input in one line, streaming, a validation file, characters outside the vocabulary


@pytest.mark.parametrize(
    "extra, text, message",
    [
        (("--block_size", "0"), None, "--block_size must be a positive"),
        ((), "too short", r"training text is shorter than one block \(33 characters\)"),
        (("--validation_split_percentage", "1"), "x" * 40, r"validation text is shorter than one block"),
        (("--preset", "huge"), None, r"Unknown --preset 'huge'; choose from \['char-rnn', 'cpu-small'\]"),
        (("--sample_prompt", "Zebra~"), None, "has characters outside the vocabulary"),
    ],
)
def test_bad_input_errors(tmp_path, extra, text, message):
    with pytest.raises(UsageError, match=message):  # DataError (a UsageError) for the data, UsageError for arguments
        run(tmp_path, "--max_steps", "2", *extra, text=text)


def test_streaming_with_a_validation_file_trains_and_reports_its_characters_outside_the_vocabulary(tmp_path, caplog):
    write_text(tmp_path / "valid.txt", shakespeare_like(2000) + "\u00a7\u00a7 \u00b6")
    metrics, out = run(tmp_path, "--max_steps", "5", "--eval_steps", "5", "--save_steps", "5", "--streaming", "true",
                       "--validation_file", str(tmp_path / "valid.txt"), "--sample_every_evals", "0")
    assert math.isfinite(metrics["eval_loss"]) and metrics["global_step"] == 5
    # the final evaluation read the stream to its end (fewer characters than its least sample): all of it, exactly
    assert metrics["eval_loss_stderr"] == 0 and 1900 < metrics["eval_characters"] <= 2003
    assert "3 characters of the validation text (0.1" in caplog.text and "are not in the vocabulary" in caplog.text
    assert "'\u00a7\u00b6'" in caplog.text
    with pytest.raises(UsageError, match="--streaming needs --max_steps"):
        run(tmp_path, "--streaming", "true", "--output_dir", str(tmp_path / "o2"))


def test_validation_characters_outside_the_vocabulary_are_reported(tmp_path, caplog):
    write_text(tmp_path / "valid.txt", shakespeare_like(2000) + "\u00a7\u00a7 \u00b6")
    run(tmp_path, "--max_steps", "2", "--eval_steps", "2", "--save_steps", "2", "--sample_every_evals", "0",
        "--validation_file", str(tmp_path / "valid.txt"))
    assert "3 characters of the validation text (0.1" in caplog.text and "are not in the vocabulary" in caplog.text
    assert "'\u00a7\u00b6'" in caplog.text


# ---------------------------------------------------------------------------------------------------------------------
# A run that starts from a saved model: --model_name_or_path, --tokenizer_name


def test_mistyped_model_folder_is_reported_before_the_data_are_loaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "shakespeare").mkdir(parents=True)
    with pytest.raises(OSError, match="outputs/shakespear does not exist; did you mean outputs/shakespeare"):
        # the training file does not exist either: the model path is checked first
        train(*parse_arguments(["--model_name_or_path", "outputs/shakespear", "--train_file", "missing.txt",
                                "--output_dir", "out", *TINY]))


def test_tokenizer_that_does_not_match_the_model(tmp_path):
    _, out = run(tmp_path, "--max_steps", "2", "--eval_steps", "2", "--save_steps", "2", "--sample_every_evals", "0")
    other = tmp_path / "other"
    (tmp_path / "other.txt").write_text("completely different characters: 0123456789", encoding="utf-8")
    CharLSTMTokenizer.from_corpus((tmp_path / "other.txt").read_text()).save_pretrained(other)
    with pytest.raises(ValueError, match="tokenizer has \\d+ tokens but the model's vocab_size is \\d+"):
        run(tmp_path, "--max_steps", "2", "--model_name_or_path", str(out), "--tokenizer_name", str(other),
            "--output_dir", str(tmp_path / "out2"))


def test_model_name_or_path_continues_from_the_saved_weights_architecture_and_tokenizer(tmp_path):
    _, out = run(tmp_path, "--max_steps", "4", "--eval_steps", "2", "--save_steps", "2", "--sample_every_evals", "0",
                 "--learning_rate", "1e-2")
    first = load_file(out / "model.safetensors")
    # learning rate 0 (and no weight decay): the continued run's weights are exactly those it started from
    argv = ["--train_file", str(tmp_path / "train.txt"), "--output_dir", str(tmp_path / "more"), *TINY,
            "--model_name_or_path", str(out), "--max_steps", "2", "--eval_steps", "2", "--sample_every_evals", "0",
            "--learning_rate", "0", "--hidden_size", "64"]  # ignored: the saved model's architecture is used
    train(*parse_arguments(argv))
    second = load_file(tmp_path / "more" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert json.loads((tmp_path / "more" / "vocab.json").read_text()) == json.loads((out / "vocab.json").read_text())


# ---------------------------------------------------------------------------------------------------------------------
# The process's memory: glibc's allocator keeps what is freed


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the malloc settings are glibc's")
def test_keep_freed_memory_takes_on_glibc():
    # in a forked child: the settings hold for the whole process, and this one should keep its defaults
    child = os.fork()
    if child == 0:
        os._exit(0 if keep_freed_memory() is True else 1)
    assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 0
