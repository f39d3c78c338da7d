"""Import a checkpoint of the classic plain-PyTorch char LSTM (the course's plain PyTorch track) as a CharLSTM model.

That module is `embedding -> nn.LSTM(batch_first=True) -> dropout -> fc`, with state-dict keys `embedding.weight`,
`lstm.weight_ih_l{k}`, `lstm.weight_hh_l{k}`, `lstm.bias_ih_l{k}`, `lstm.bias_hh_l{k}`, `fc.weight`, `fc.bias`, and
its vocabulary is `sorted(set(text))` with character i at id i. The converted model keeps those ids (so data encoded
for the old model stays valid) and adds `<pad>` and `<unk>` after them, with zero embeddings and a head that never
predicts them; its logits over the characters are the original module's.
"""

import json
import os
import pickle
import zipfile
from dataclasses import dataclass, field

import torch

from .cells_char_lstm import CELL_TYPES, CELLS
from .configuration_char_lstm import CharLSTMConfig
from .errors import UsageError
from .modeling_char_lstm import CharLSTMForCausalLM
from .tokenization_char_lstm import PAD_TOKEN, UNK_TOKEN, CharLSTMTokenizer


NEVER = -1e4  # head bias of <pad> and <unk>: probability ~e^-10000, never sampled


class ConversionError(UsageError):
    """A checkpoint that cannot be converted, explained precisely."""


@dataclass
class ConvertArguments:
    checkpoint: str = field(metadata={"help": "The plain-PyTorch state dict (torch.save(model.state_dict(), path))."})
    chars: str = field(metadata={"help": "The character list: a JSON list, or the training text (sorted set)."})
    output_dir: str = field(metadata={"help": "Where to save the converted model and tokenizer."})
    dropout: float = field(default=0.5, metadata={"help": "Dropout of the original (not stored in a state dict)."})
    cell_type: str = field(
        default="lstm", metadata={"help": f"One of {', '.join(CELL_TYPES)} (lstm: the course's model).",
                                  "choices": CELL_TYPES})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a non-empty --output_dir."})


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint, loaded with `weights_only=True` (no arbitrary code from the file)."""
    if not os.path.isfile(path):
        raise ConversionError(f"--checkpoint {path} does not exist.")
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (PK\x03\x04); the legacy format (before torch 1.6) a pickle (protocol 2+: 0x80)
    if not (zipfile.is_zipfile(path) or head[:1] == b"\x80"):
        raise ConversionError(f"--checkpoint {path} is not a PyTorch checkpoint (torch.save writes a zip archive); "
                              "give the file written by torch.save(model.state_dict(), path).")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ConversionError(
            f"Refused to load {path}: it needs to unpickle arbitrary Python objects, which can run code "
            f"({str(error).splitlines()[0][:160]}). Re-save only the weights: torch.save(model.state_dict(), path)."
        ) from None
    except Exception as error:
        raise ConversionError(f"{path} is not a PyTorch checkpoint ({type(error).__name__}: {error}).") from None
    for key in ("state_dict", "model_state_dict", "model"):  # common wrappers around a state dict
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ConversionError(f"{path} does not hold a state dict (a dict of tensors); got {type(loaded).__name__}.")
    return loaded


def load_chars(path: str) -> list[str]:
    """A JSON list of characters, or a text file whose sorted set of characters is the vocabulary (as
    `CharDataset` builds it)."""
    if not os.path.isfile(path):
        raise ConversionError(f"--chars {path} does not exist.")
    with open(path, encoding="utf-8") as f:  # default newline handling, as CharDataset's open(path, 'r') reads
        text = f.read()
    if path.endswith(".json"):
        try:
            chars = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConversionError(f"--chars {path} is not valid JSON ({error}); give a JSON list of single characters "
                                  'such as ["\\n", " ", "a"], or the training text as a .txt file.') from None
        if not isinstance(chars, list) or not all(isinstance(c, str) and len(c) == 1 for c in chars):
            raise ConversionError(f"{path} must hold a JSON list of single characters.")
        if len(set(chars)) != len(chars):
            raise ConversionError(f"{path} lists some characters twice.")
        return chars
    return sorted(set(text))


def _check_keys(state: dict[str, torch.Tensor], cell_type: str) -> int:
    """The number of layers of the state dict; a ConversionError naming the keys that do not fit."""
    if cell_type not in CELLS:
        raise ConversionError(f"--cell_type must be one of {', '.join(CELL_TYPES)}, got {cell_type!r}.")
    required = ["embedding.weight", "fc.weight", "fc.bias", "lstm.weight_ih_l0"]
    missing = [key for key in required if key not in state]
    if missing:
        raise ConversionError(f"The checkpoint lacks {missing}; its keys are {sorted(state)[:12]}.")
    num_layers = 0
    while f"lstm.weight_ih_l{num_layers}" in state:
        num_layers += 1
    expected = {"embedding.weight", "fc.weight", "fc.bias"} | {
        f"lstm.{kind}_l{k}" for k in range(num_layers) for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    }
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ConversionError(f"State dict keys do not fit the char LSTM: missing {missing}, unexpected {unexpected}.")
    return num_layers


def _check_shapes(state: dict[str, torch.Tensor], chars: list[str], cell_type: str, num_layers: int):
    """(vocabulary, embedding size, hidden size) of the state dict; a ConversionError naming the shape that does not
    fit."""
    vocab, embedding_size = state["embedding.weight"].shape
    gates_hidden = state["lstm.weight_ih_l0"].shape[0]
    if gates_hidden % CELLS[cell_type].num_gates:
        raise ConversionError(
            f"lstm.weight_ih_l0 has {gates_hidden} rows, not a multiple of {CELLS[cell_type].num_gates} gates."
        )
    hidden = gates_hidden // CELLS[cell_type].num_gates
    shapes = {"fc.weight": (vocab, hidden), "fc.bias": (vocab,)}
    for k in range(num_layers):
        shapes |= {
            f"lstm.weight_ih_l{k}": (gates_hidden, embedding_size if k == 0 else hidden),
            f"lstm.weight_hh_l{k}": (gates_hidden, hidden),
            f"lstm.bias_ih_l{k}": (gates_hidden,),
            f"lstm.bias_hh_l{k}": (gates_hidden,),
        }
    for key, shape in shapes.items():
        if tuple(state[key].shape) != shape:
            raise ConversionError(f"{key} has shape {tuple(state[key].shape)}, expected {shape} "
                                  f"(embedding {vocab}x{embedding_size}, hidden {hidden}, {cell_type}).")
    if vocab != len(chars):
        raise ConversionError(
            f"The model has {vocab} characters (embedding.weight) but --chars gives {len(chars)}: use the character "
            "list (or training text) the model was trained with."
        )
    return vocab, embedding_size, hidden


def convert(state: dict[str, torch.Tensor], chars: list[str], dropout: float = 0.5, cell_type: str = "lstm"):
    """(CharLSTMForCausalLM, CharLSTMTokenizer) with the weights of the plain module; raises ConversionError with
    the exact key or shape that does not fit."""
    num_layers = _check_keys(state, cell_type)
    vocab, embedding_size, hidden = _check_shapes(state, chars, cell_type, num_layers)
    ids = {c: i for i, c in enumerate(chars)}
    tokenizer = CharLSTMTokenizer(vocab={**ids, PAD_TOKEN: vocab, UNK_TOKEN: vocab + 1})
    config = CharLSTMConfig(
        vocab_size=vocab + 2, embedding_size=embedding_size, hidden_size=hidden, num_hidden_layers=num_layers,
        dropout=dropout, cell_type=cell_type, pad_token_id=vocab, unk_token_id=vocab + 1,
    )
    model = CharLSTMForCausalLM(config)
    with torch.no_grad():
        model.model.embeddings.weight.zero_()
        model.model.embeddings.weight[:vocab] = state["embedding.weight"]
        for k, rnn in enumerate(model.model.layers):
            for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(rnn, f"{kind}_l0").copy_(state[f"lstm.{kind}_l{k}"])
        model.lm_head.weight.zero_()
        model.lm_head.weight[:vocab] = state["fc.weight"]
        model.lm_head.bias.fill_(NEVER)
        model.lm_head.bias[:vocab] = state["fc.bias"]
    return model.eval(), tokenizer


def run_convert(args: ConvertArguments) -> str:
    if os.path.isdir(args.output_dir) and os.listdir(args.output_dir) and not args.overwrite_output_dir:
        raise ConversionError(
            f"{args.output_dir} is not empty: choose another --output_dir or pass --overwrite_output_dir."
        )
    model, tokenizer = convert(load_state_dict(args.checkpoint), load_chars(args.chars), args.dropout, args.cell_type)
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    config = model.config
    print(f"converted {args.checkpoint}: {config.num_hidden_layers}x{config.hidden_size} {config.cell_type}, "
          f"embedding {config.embedding_size}, {config.vocab_size - 2} characters (+ <pad>, <unk>) -> "
          f"{args.output_dir}")
    return args.output_dir
