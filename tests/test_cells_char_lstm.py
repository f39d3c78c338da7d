"""The registry of cell types (`cells_char_lstm.CELLS`): every entry complete and consistent with its parts, and a
name outside it refused, in one line, wherever a cell type is read."""

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from char_lstm import CharLSTMConfig, CharLSTMForCausalLM
from char_lstm.cells_char_lstm import CELL_TYPES, CELLS, cell_type_of
from char_lstm.convert import ConversionError, convert
from char_lstm.numpy_reference import ORACLES, NumpyCharLSTM
from char_lstm.step_char_lstm import _single_step
from char_lstm.training.arguments import CharLSTMTrainingArguments, parse_arguments
from char_lstm.training.diagnostics import checklist_warnings


UNKNOWN = "lsmt"


def test_the_registry_lists_the_cell_types_the_config_and_the_tests_take():
    assert CELL_TYPES == tuple(CELLS) and {"lstm", "gru", "rnn"} <= set(CELL_TYPES)
    assert all(cell_type_of(name).name == name for name in CELL_TYPES)


def test_each_entry_describes_its_layer_state_and_oracle(cell_type):
    """The gates and states an entry declares are those of its layer (the weights' rows, the states the layer
    returns) and of its NumPy class, which `numpy_reference` finds by the entry's `oracle`."""
    cell = CELLS[cell_type]
    layer = cell.layer(6, 5, batch_first=True)
    assert isinstance(layer, nn.RNNBase) and layer.weight_ih_l0.shape == (cell.num_gates * 5, 6)
    outputs = layer(torch.randn(2, 3, 6))
    assert len(outputs[1:]) == cell.num_states
    assert type(ORACLES[cell_type]).__name__ == "type" and ORACLES[cell_type].__name__ == cell.oracle
    assert ORACLES[cell_type].num_states == cell.num_states
    assert CharLSTMConfig(cell_type=cell_type).number_of_conv_states == cell.num_states


def test_each_entrys_step_is_its_layer_on_one_token(cell_type):
    """The entry's step (through the shared layout and cache of weights) gives the layer's own output and state."""
    cell, layer = CELLS[cell_type], CELLS[cell_type].layer(6, 5, batch_first=True)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.uniform_(-0.5, 0.5)
        x, state = torch.randn(3, 1, 6), tuple(torch.randn(3, 5) for _ in range(cell.num_states))
        out, final = _single_step(layer, cell, x, state)
        expected_out, *expected_final = layer(x, *(s.unsqueeze(0) for s in state))
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(final, tuple(s.squeeze(0) for s in expected_final), rtol=1e-5, atol=1e-6)


def test_entries_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        CELLS["lstm"].num_states = 1


# ---------------------------------------------------------------------------------------------------------------------
# A name outside the registry: an error everywhere, never another cell's arithmetic


def test_an_unknown_cell_type_is_one_line_naming_the_choices():
    with pytest.raises(ValueError, match=f"'{UNKNOWN}'.*{', '.join(CELL_TYPES)}") as error:
        cell_type_of(UNKNOWN)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="cell_type must be one of"):
        CharLSTMConfig(cell_type=UNKNOWN)


def test_a_config_edited_to_an_unknown_cell_builds_no_model():
    config = CharLSTMConfig(vocab_size=10, hidden_size=8, embedding_size=4)
    config.cell_type = UNKNOWN
    with pytest.raises(ValueError, match=f"Unknown cell type '{UNKNOWN}'"):
        CharLSTMForCausalLM(config)


def test_a_model_whose_config_changed_cell_after_it_was_built_does_not_decode_as_another_cell():
    """The decoding step reads the cell from the config at every call: an unknown name stops it."""
    model = CharLSTMForCausalLM(CharLSTMConfig(vocab_size=10, hidden_size=8, embedding_size=4)).eval()
    model.config.cell_type = UNKNOWN
    with torch.no_grad(), pytest.raises(ValueError, match=f"Unknown cell type '{UNKNOWN}'"):
        model(torch.tensor([[1]]))


def test_the_numpy_reference_and_the_conversion_refuse_an_unknown_cell():
    with pytest.raises(ValueError, match=f"Unknown cell type '{UNKNOWN}'"):
        NumpyCharLSTM({}, UNKNOWN, num_layers=1, hidden_size=4, dtype=np.float32)
    state = {"embedding.weight": torch.zeros(3, 2), "fc.weight": torch.zeros(3, 4), "fc.bias": torch.zeros(3),
             "lstm.weight_ih_l0": torch.zeros(16, 2)}
    with pytest.raises(ConversionError, match=f"--cell_type must be one of {', '.join(CELL_TYPES)}, got '{UNKNOWN}'"):
        convert(state, ["a", "b", "c"], cell_type=UNKNOWN)


def test_the_training_checklist_names_the_gated_cells_of_the_registry():
    """A cell without gates on long blocks gets the checklist's warning, which names the registry's gated cells."""
    ungated = [name for name, cell in CELLS.items() if not cell.gated]
    gated = [name for name, cell in CELLS.items() if cell.gated]
    args = CharLSTMTrainingArguments(output_dir="unused", save_strategy="steps", eval_strategy="steps")
    for name in CELL_TYPES:
        said = [line for line in checklist_warnings(args, name, 100, True) if "without gates" in line]
        assert bool(said) == (name in ungated)
        assert all("--cell_type " in line and all(f" {g}" in line for g in gated) for line in said)


def test_the_training_flag_refuses_an_unknown_cell_before_reading_any_data(capsys):
    with pytest.raises(SystemExit):
        parse_arguments(["--output_dir", "unused", "--cell_type", UNKNOWN])
    choices = ", ".join(f"'{name}'" for name in CELL_TYPES)
    assert f"invalid choice: '{UNKNOWN}' (choose from {choices})" in capsys.readouterr().err
