"""Stateful truncated BPTT (--stateful, char_lstm.training.stateful): the state carried from batch to batch, the
evaluation beside it, and the streams' state in checkpoints and resumes."""

import json
import logging
import math
import os
import shutil

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import TrainerCallback

from char_lstm.errors import UsageError
from char_lstm.streams import collate_stream_blocks, encode_streams
from char_lstm.tokenization_char_lstm import CharLSTMTokenizer
from char_lstm.training.arguments import CharLSTMTrainingArguments
from char_lstm.training.stateful import StatefulTrainer
from helpers import checkpoints, make_model, run, shakespeare_like


# ---------------------------------------------------------------------------------------------------------------------
# The state carried from batch to batch, and the evaluation beside it


STATEFUL = ("--stateful", "true", "--sample_every_evals", "0", "--learning_rate", "1e-2", "--logging_steps", "1",
            "--per_device_eval_batch_size", "2")


def final_weights(out):
    return load_file(out / "model.safetensors")


def test_stateful_trainer_carries_the_state_and_resets_it_where_streams_start(tmp_path):
    """Trainer's own loss on consecutive batches equals the loss of one long read of each stream, and a batch that
    starts the streams again (the next epoch) starts from zero."""
    text = shakespeare_like(3000)
    tokenizer = CharLSTMTokenizer.from_corpus(text)
    streams = encode_streams(Dataset.from_dict({"text": [text]}), tokenizer, "text", block_size=20, num_streams=4)
    args = CharLSTMTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to="none",
                                     train_sampling_strategy="sequential", label_names=["shift_labels"], use_cpu=True,
                                     eval_strategy="no", load_best_model_at_end=False, lr_scheduler_type="constant")
    model = make_model(tokenizer)
    trainer = StatefulTrainer(model=model, args=args, train_dataset=streams, data_collator=collate_stream_blocks)
    batches = list(trainer.get_train_dataloader())
    windows = len(streams) // 4
    assert len(batches) == windows and [int(b["window"][0]) for b in batches] == list(range(windows))

    model.train()  # dropout is 0: train mode, the state of the "train" streams
    with torch.no_grad():
        losses = [trainer.compute_loss(model, batch).item() for batch in batches[:3]]
        restart = trainer.compute_loss(model, batches[0]).item()  # window 0 again: a new epoch
        inputs = torch.cat([b["input_ids"] for b in batches[:3]], dim=1)
        targets = torch.cat([b["shift_labels"] for b in batches[:3]], dim=1)
        logits = model(input_ids=inputs, use_cache=False).logits
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    expected = [nll[:, k * 20 : (k + 1) * 20].mean().item() for k in range(3)]
    assert losses == pytest.approx(expected, abs=1e-5)
    assert restart == pytest.approx(losses[0], abs=1e-6)
    zero_state_loss = torch.nn.functional.cross_entropy(
        model(input_ids=batches[2]["input_ids"], use_cache=False).logits.transpose(1, 2), batches[2]["shift_labels"]
    ).item()
    assert abs(zero_state_loss - losses[2]) > 1e-3  # the carried state does make a difference


def test_stateful_evaluation_leaves_the_training_streams_alone(tmp_path):
    _, quiet = run(tmp_path, "--max_steps", "6", "--eval_steps", "100", "--save_steps", "100", *STATEFUL, out="quiet")
    metrics, busy = run(tmp_path, "--max_steps", "6", "--eval_steps", "1", "--save_steps", "100", *STATEFUL,
                        "--load_best_model_at_end", "false", out="busy")
    a, b = final_weights(quiet), final_weights(busy)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert math.isclose(metrics["eval_bits_per_char"], metrics["eval_loss"] / math.log(2), rel_tol=1e-3)
    run_info = json.loads((busy / "training_run.json").read_text())
    assert run_info["stateful"] and "Stateful truncated BPTT" in (busy / "README.md").read_text()


def test_stateful_refuses_streaming_and_stride(tmp_path):
    with pytest.raises(UsageError, match="--stateful .* drop --streaming"):
        run(tmp_path, "--stateful", "true", "--streaming", "true", "--max_steps", "2")
    with pytest.raises(UsageError, match="drop --stride"):
        run(tmp_path, "--stateful", "true", "--stride", "7", "--max_steps", "2")


# ---------------------------------------------------------------------------------------------------------------------
# The streams' state in checkpoints: saved, restored on resume, refused for another layout of streams; the
# checkpoints staged, published and rotated on the Trainer directly (a second each: the mutation run uses them)


@pytest.mark.parametrize("accumulation", ["1", "2"])
def test_stateful_resume_continues_the_streams_exactly(tmp_path, accumulation):
    args = ("--max_steps", "8", "--eval_steps", "4", "--save_steps", "4",
            "--gradient_accumulation_steps", accumulation, "--load_best_model_at_end", "false", *STATEFUL)
    _, full = run(tmp_path, *args, out="full")
    _, part = run(tmp_path, *args, "--max_steps", "4", out="part")
    assert (part / "checkpoint-4" / "stream_state_0.pt").exists()
    _, resumed = run(tmp_path, *args, "--resume_from_checkpoint", "True", out="part")
    expected, got = final_weights(full), final_weights(resumed)
    assert all(torch.allclose(expected[k], got[k], atol=1e-6) for k in expected)

    # Without its saved state the resumed run reads on from zero states, and ends elsewhere.
    if accumulation == "1":
        with pytest.raises(UsageError, match="trained with 8 streams per process and 1 process.*this run has 4 and 1"):
            run(tmp_path, *args, "--resume_from_checkpoint", str(part / "checkpoint-4"),
                "--per_device_train_batch_size", "4", out="part")
        (part / "checkpoint-4" / "stream_state_0.pt").unlink()
        for name in os.listdir(part):
            if name.startswith("checkpoint-") and name != "checkpoint-4":
                shutil.rmtree(part / name)
        _, cold = run(tmp_path, *args, "--resume_from_checkpoint", str(part / "checkpoint-4"), out="part")
        got = final_weights(cold)
        assert not all(torch.allclose(expected[k], got[k], atol=1e-6) for k in expected)


def stateful_trainer(out, streams, tokenizer, **overrides):
    """A StatefulTrainer of a tiny GRU (one state per layer; the LSTM's two are in the end-to-end test above) on 4
    streams: 4 steps, evaluation and a checkpoint every 2 steps. Dropout draws from the RNG, so a resume is exact only
    with the RNG state restored too."""
    settings = dict(output_dir=str(out), per_device_train_batch_size=4, per_device_eval_batch_size=4, report_to="none",
                    train_sampling_strategy="sequential", label_names=["shift_labels"], use_cpu=True, max_steps=4,
                    eval_strategy="steps", eval_steps=2, save_steps=2, save_total_limit=None, logging_strategy="no",
                    lr_scheduler_type="constant", learning_rate=1e-2, seed=3, disable_tqdm=True)
    args = CharLSTMTrainingArguments(**{**settings, **overrides})
    model = make_model(tokenizer, cell_type="gru", hidden_size=16, embedding_size=8, dropout=0.1)
    return StatefulTrainer(model=model, args=args,
                           train_dataset=streams, eval_dataset=streams.select(range(8)),
                           data_collator=collate_stream_blocks)


class CopyCheckpoint(TrainerCallback):
    """Copies checkpoint-`step` of the run to `to` once it is saved (before checkpoint rotation can delete it)."""

    def __init__(self, step, to):
        self.step, self.to, self.saved = step, to, {}

    def on_save(self, args, state, control, **kwargs):
        self.saved[state.global_step] = sorted(os.listdir(args.output_dir))  # what a kill at this point would leave
        if state.global_step == self.step:
            name = f"checkpoint-{self.step}"
            shutil.copytree(os.path.join(args.output_dir, name), self.to / name)


def test_stateful_checkpoint_saves_and_restores_the_training_streams(tmp_path, monkeypatch, caplog):
    """A run resumed from the step-2 checkpoint ends with the weights of the uninterrupted run (at step 4). The
    checkpoints are staged inside output_dir (nothing written elsewhere, nothing left in the staging folder),
    published as output_dir/checkpoint-N, rotated at each save (save_total_limit=1: the best, here the last, stays),
    and the best one is named by its final place. Without the saved stream state the resumed run reads on from zero
    states (a warning) and ends elsewhere; with another number of streams it is refused."""
    monkeypatch.chdir(tmp_path)
    text = shakespeare_like(3000)
    tokenizer = CharLSTMTokenizer.from_corpus(text)
    streams = encode_streams(Dataset.from_dict({"text": [text]}), tokenizer, "text", block_size=20, num_streams=4)

    step2 = tmp_path / "step2"  # a run stopped at step 2 has this checkpoint-2 (same data, seed and steps up to there)
    full = stateful_trainer(tmp_path / "full", streams, tokenizer, save_total_limit=1)
    copy = CopyCheckpoint(2, step2)
    full.add_callback(copy)
    full.train()
    assert copy.saved == {2: ["checkpoint-2"], 4: ["checkpoint-4"]}  # rotated at each save, not only at the end
    assert full.state.best_model_checkpoint == str(tmp_path / "full" / "checkpoint-4")  # the eval loss went down
    assert checkpoints(tmp_path / "full") == ["checkpoint-4"]
    assert sorted(os.listdir(tmp_path / "full")) == ["checkpoint-4"]  # the staging folder is gone
    saved_state = json.loads((tmp_path / "full" / "checkpoint-4" / "trainer_state.json").read_text())
    assert saved_state["best_model_checkpoint"] == full.state.best_model_checkpoint
    expected = load_file(tmp_path / "full" / "checkpoint-4" / "model.safetensors")

    saved = torch.load(step2 / "checkpoint-2" / "stream_state_0.pt", weights_only=True)
    assert saved["world_size"] == 1 and len(saved["states"]) == 2  # 2 layers of (h,), 4 streams of 16 units
    assert all(len(layer) == 1 and layer[0].shape == (4, 16) and layer[0].abs().sum() > 0
               for layer in saved["states"])
    stateful_trainer(tmp_path / "resumed", streams, tokenizer).train(
        resume_from_checkpoint=str(step2 / "checkpoint-2")
    )
    got = load_file(tmp_path / "resumed" / "checkpoint-4" / "model.safetensors")
    assert expected.keys() == got.keys() and all(torch.allclose(expected[k], got[k], atol=1e-6) for k in expected)

    with pytest.raises(
        UsageError,
        match=r"trained with 4 streams per process and 1 process\(es\), this run has 2 and 1: resume a --stateful "
        r"run with the same --per_device_train_batch_size and number of processes \(the streams are laid out for "
        r"them\)\.$",
    ):
        stateful_trainer(tmp_path / "other", streams, tokenizer, per_device_train_batch_size=2).train(
            resume_from_checkpoint=str(step2 / "checkpoint-2"))
    (step2 / "checkpoint-2" / "stream_state_0.pt").unlink()
    # a staging folder another writer still uses (not empty): left alone
    (tmp_path / "cold" / "_tmp-checkpoints" / "checkpoint-9").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="char_lstm.training"):
        stateful_trainer(tmp_path / "cold", streams, tokenizer).train(
            resume_from_checkpoint=str(step2 / "checkpoint-2")
        )
    assert "checkpoint-2 has no stream state for process 0: the streams continue from a zero state." in caplog.text
    cold = load_file(tmp_path / "cold" / "checkpoint-4" / "model.safetensors")
    assert not all(torch.allclose(expected[k], cold[k], atol=1e-6) for k in expected)
    assert os.listdir(tmp_path / "cold" / "_tmp-checkpoints") == ["checkpoint-9"]
    assert sorted(os.listdir(tmp_path)) == ["cold", "full", "other", "resumed", "step2"]  # nothing staged in the cwd
