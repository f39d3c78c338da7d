"""The plain PyTorch track -> HF: a freshly built plain-PyTorch char LSTM (the course's module) converted and
compared."""

import json

import pytest
import torch
import torch.nn as nn

from char_lstm import load_model_and_tokenizer
from helpers import call_script, run_script, write_text


class CharLSTM(nn.Module):
    """The plain PyTorch track's model, as written there."""

    def __init__(self, vocab_size, embed_size, hidden_size, num_layers, dropout=0.5):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.embedding = nn.Embedding(vocab_size, embed_size)
        self.lstm = nn.LSTM(embed_size, hidden_size, num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden_size, vocab_size)

    def forward(self, x, hidden=None):
        output, hidden = self.lstm(self.embedding(x), hidden)
        return self.fc(self.dropout(output)), hidden


TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"


@pytest.fixture
def original(tmp_path):
    torch.manual_seed(0)
    chars = sorted(set(TEXT))
    module = CharLSTM(len(chars), 16, 32, 2, dropout=0.3).eval()
    torch.save(module.state_dict(), tmp_path / "model.pt")
    (tmp_path / "chars.json").write_text(json.dumps(chars), encoding="utf-8")
    return module, chars


def greedy_original(module, chars, prompt, length):
    """The course's generate() loop, with argmax instead of sampling."""
    index = {c: i for i, c in enumerate(chars)}
    hidden = None
    with torch.no_grad():
        for c in prompt[:-1]:
            _, hidden = module(torch.tensor([[index[c]]]), hidden)
        x, out = torch.tensor([[index[prompt[-1]]]]), list(prompt)
        for _ in range(length):
            logits, hidden = module(x, hidden)
            nxt = int(logits[0, 0].argmax())
            out.append(chars[nxt])
            x = torch.tensor([[nxt]])
    return "".join(out)


def test_chars_from_a_text_with_windows_newlines(tmp_path):
    """CharDataset reads its text with open(path, 'r'): \r\n becomes \n, so '\r' is not in its vocabulary."""
    from char_lstm.convert import load_chars

    (tmp_path / "crlf.txt").write_bytes(b"ab\r\ncd\r\n")
    assert load_chars(str(tmp_path / "crlf.txt")) == ["\n", "a", "b", "c", "d"]


@pytest.mark.parametrize("chars_from", ["json", "text"])
def test_converted_model_equals_the_original(original, tmp_path, chars_from):
    module, chars = original
    chars_file = tmp_path / "chars.json" if chars_from == "json" else write_text(tmp_path / "train.txt", TEXT)
    out = tmp_path / "converted"
    runner = run_script if chars_from == "json" else call_script  # one real process; the script's code in this one
    result = runner("convert_pytorch_checkpoint.py", ["--checkpoint", str(tmp_path / "model.pt"), "--chars",
                                                      str(chars_file), "--output_dir", str(out), "--dropout", "0.3"],
                    tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2x32 lstm, embedding 16" in result.stdout
    model, tokenizer = load_model_and_tokenizer(str(out))
    assert model.config.dropout == 0.3 and len(tokenizer) == len(chars) + 2
    ids = tokenizer([TEXT], return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == [chars.index(c) for c in TEXT]  # the original ids are kept
    with torch.no_grad():
        ours = model(input_ids=ids).logits[0, :, : len(chars)]
        theirs = module(ids)[0][0]
    assert (ours - theirs).abs().max() <= 1e-6
    prompt = "All:\n"
    generated = model.generate(**tokenizer([prompt], return_tensors="pt"), max_new_tokens=40, do_sample=False)
    assert tokenizer.decode(generated[0]) == greedy_original(module, chars, prompt, 40)


def test_refusals_are_precise(original, tmp_path):
    module, chars = original
    base = ["--chars", str(tmp_path / "chars.json"), "--output_dir", str(tmp_path / "out")]

    torch.save(module, tmp_path / "whole_module.pt")  # pickles the class: needs arbitrary unpickling
    refused = call_script("convert_pytorch_checkpoint.py", ["--checkpoint", str(tmp_path / "whole_module.pt"), *base],
                         tmp_path)
    assert refused.returncode == 2 and "Refused to load" in refused.stderr and "state_dict()" in refused.stderr

    state = module.state_dict()
    broken = {k: v for k, v in state.items() if k != "lstm.bias_hh_l1"}
    torch.save(broken, tmp_path / "missing.pt")
    missing = call_script(
        "convert_pytorch_checkpoint.py", ["--checkpoint", str(tmp_path / "missing.pt"), *base], tmp_path
    )
    assert missing.returncode == 2 and "missing ['lstm.bias_hh_l1']" in missing.stderr

    reshaped = dict(state, **{"fc.weight": torch.zeros(len(chars), 31)})
    torch.save(reshaped, tmp_path / "shape.pt")
    shape = call_script("convert_pytorch_checkpoint.py", ["--checkpoint", str(tmp_path / "shape.pt"), *base], tmp_path)
    assert (
        shape.returncode == 2
        and f"fc.weight has shape ({len(chars)}, 31), expected ({len(chars)}, 32)" in shape.stderr
    )

    (tmp_path / "few.json").write_text(json.dumps(chars[:-1]))
    few = call_script("convert_pytorch_checkpoint.py", ["--checkpoint", str(tmp_path / "model.pt"), "--chars",
                                                       str(tmp_path / "few.json"), "--output_dir",
                                                       str(tmp_path / "out")], tmp_path)
    assert few.returncode == 2
    assert f"The model has {len(chars)} characters (embedding.weight) but --chars gives {len(chars) - 1}" in few.stderr
    assert not (tmp_path / "out").exists()
