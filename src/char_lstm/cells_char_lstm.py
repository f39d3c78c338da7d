"""The cell types of CharLSTM in one registry (`CELLS`): what each cell is, and each part of it.

This file is shipped to the Hub with `modeling_char_lstm.py` (``trust_remote_code``) and imports only torch and its
sibling `layers_char_lstm` (the layer classes). Everything else reads the cell types from `CELLS`: the config's check
and its number of gates and states, the model's layers and decoding step, the weight init's forget gate, the NumPy
oracle (`oracle` names its class in `char_lstm.numpy_reference`), the conversion of course checkpoints, the training
diagnostics, `--help`, and the tests (their list of cell types is `CELL_TYPES`). A name that is not in `CELLS` is an
error everywhere (`cell_type_of`), never a fallback to another cell.

Adding a cell type (docs/design.md, "Adding a cell type"): its torch layer class, its weight layout and one-token
step below, its NumPy class in `char_lstm.numpy_reference`, and one `CellType` entry in `CELLS`.

Shapes: ``B`` batch, ``E`` input size, ``H`` hidden size, ``G`` gates, ``V`` vocabulary size.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .layers_char_lstm import CharLSTMGRULayer, CharLSTMLSTMLayer, CharLSTMRNNLayer


# ---------------------------------------------------------------------------------------------------------------------
# The one-token step of each cell, from its weights as laid out for decoding (`step_char_lstm._step_weights` caches
# the layout and makes each (weight, bias) pair a `_StepLinear`: ``x @ weight.T + bias (+ add)``, optionally fused
# with a sigmoid)


def _tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh; for float32 rows of 256 values or more (a multiple of 64) on a CPU computed as ``2 * sigmoid(2x) - 1``,
    the same function (within 2e-7) at a fraction of the cost, torch's CPU sigmoid being much faster than its tanh
    (docs/benchmarks.md). Chosen by the width of a row, not the size of the batch, so that a row's values do not depend
    on the rows beside it (serving batches requests: docs/serving.md); narrower rows keep the one call."""
    width = x.shape[-1]
    if x.dtype == torch.float32 and x.device.type == "cpu" and width >= 256 and width % 64 == 0:
        return torch.sigmoid(x * 2).mul_(2).sub_(1)
    return torch.tanh(x)


def _joint_layout(w_ih, w_hh, b_ih, b_hh, embeddings: torch.Tensor | None) -> tuple:
    """LSTM and RNN, whose input and hidden products are summed before the nonlinearity: with `embeddings` (V, E) (the
    first layer, a small vocabulary) the table (V, G*H) of every character's input projection with both biases, and
    the hidden product alone; without, one product of ``[x | h]`` with ``[W_ih | W_hh]``."""
    if embeddings is not None:
        table = nn.functional.linear(embeddings.float(), w_ih.float(), b_ih.float() + b_hh.float()).to(w_ih.dtype)
        return table, None, (w_hh, None)
    return None, None, (torch.cat([w_ih, w_hh], dim=1).contiguous(), b_ih + b_hh)


def _lstm_layout(w_ih, w_hh, b_ih, b_hh, embeddings: torch.Tensor | None) -> tuple:
    """`_joint_layout` with the cell gate's rows times -2, exactly (a power of two): one sigmoid over all four gates
    then gives sigmoid(-2 g), from which `_lstm_step` gets tanh(g) = 1 - 2 sigmoid(-2 g) (docs/design.md)."""
    hidden = w_hh.shape[1]
    scale = torch.ones(w_ih.shape[0], 1, dtype=w_ih.dtype, device=w_ih.device)
    scale[2 * hidden : 3 * hidden] = -2
    return _joint_layout(w_ih * scale, w_hh * scale, b_ih * scale[:, 0], b_hh * scale[:, 0], embeddings)


def _gru_layout(w_ih, w_hh, b_ih, b_hh, embeddings: torch.Tensor | None) -> tuple:
    """GRU, whose candidate gate needs the hidden product apart (scaled by the reset gate, b_hh with it): the input
    projection as a table (V, 3H) or a product of its own, and the hidden product."""
    if embeddings is not None:
        table = nn.functional.linear(embeddings.float(), w_ih.float(), b_ih.float()).to(w_ih.dtype)
        return table, None, (w_hh, b_hh)
    return None, (w_ih, b_ih), (w_hh, b_hh)


def _joint_gates(weights: tuple, x: torch.Tensor | None, h: torch.Tensor, ids, sigmoid: bool) -> torch.Tensor:
    """(B, G*H): the gates of a joint layout, the table's row added inside the product (fused)."""
    table, _, hidden_linear = weights
    if table is not None:
        return hidden_linear(h, add=table.index_select(0, ids), sigmoid=sigmoid)
    return hidden_linear(torch.cat([x, h], dim=1), sigmoid=sigmoid)


def _lstm_step(weights: tuple, x: torch.Tensor | None, state: tuple, ids) -> tuple:
    """One LSTM step: x (B, E) (None when the table is read at `ids` (B,)), state (h, c) -> (h, (h, c)). The gates are
    (input, forget, -2 x cell, output) after one fused sigmoid (`_lstm_layout`); with tanh(x) = 1 - 2 sigmoid(-2x) the
    rest is five ops: c' = f c + i tanh(g) = (i - 2 i sigmoid(-2g)) + f c, and h = o - 2 o sigmoid(-2c')."""
    i, f, g, o = _joint_gates(weights, x, state[0], ids, sigmoid=True).chunk(4, dim=1)
    c = torch.addcmul(i, i, g, value=-2)
    # in place unless the state has the wider dtype (bf16 gates under autocast, a float32 state)
    c = c.addcmul_(f, state[1]) if c.dtype == state[1].dtype else torch.addcmul(c, f, state[1])
    h = torch.addcmul(o, o, torch.mul(c, -2).sigmoid_(), value=-2)
    return h, (h, c)


def _gru_step(weights: tuple, x: torch.Tensor | None, state: tuple, ids) -> tuple:
    """One GRU step, as `nn.GRU` computes it: state (h,) -> (h, (h,))."""
    table, input_linear, hidden_linear = weights
    h = state[0]
    gi = table.index_select(0, ids) if table is not None else input_linear(x)  # (B, 3H): reset, update, new
    gh = hidden_linear(h)
    i_r, i_z, i_n = gi.chunk(3, dim=1)
    h_r, h_z, h_n = gh.chunk(3, dim=1)
    r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
    n = _tanh(i_n + r * h_n)
    h = n + z * (h - n)
    return h, (h,)


def _rnn_step(weights: tuple, x: torch.Tensor | None, state: tuple, ids) -> tuple:
    """One step of the Elman RNN with tanh: state (h,) -> (h, (h,))."""
    h = _tanh(_joint_gates(weights, x, state[0], ids, sigmoid=False))
    return h, (h,)


# ---------------------------------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class CellType:
    """What a cell type is, and where each of its parts lives."""

    name: str  # the config's `cell_type`
    description: str  # a few words for --help and the docs
    num_gates: int  # blocks of hidden_size rows stacked in weight_ih/weight_hh (torch's layout, course checkpoints')
    num_states: int  # state tensors per layer in the cache: (h, c) for an LSTM, (h,) otherwise
    layer: type[nn.RNNBase]  # the layer: its sequence kernel, parameters and state-dict keys
    step_layout: Callable  # (w_ih, w_hh, b_ih, b_hh, embeddings or None) -> (table, input pair, hidden pair)
    step: Callable  # (laid-out weights, x (B, E) or None, state, ids (B,) or None) -> (h (B, H), new state)
    oracle: str  # its class in char_lstm.numpy_reference: forward and backward by hand, in NumPy
    gated: bool  # gates keep its gradient alive over long blocks (the training diagnostics warn about others)
    forget_gate: int | None = None  # the gate block `config.forget_bias` is added to (LSTM: 1), None: no such gate


CELLS: dict[str, CellType] = {
    cell.name: cell
    for cell in (
        CellType("lstm", "long short-term memory", 4, 2, CharLSTMLSTMLayer, _lstm_layout, _lstm_step,
                 oracle="NumpyLSTMCell", gated=True, forget_gate=1),
        CellType("gru", "gated recurrent unit", 3, 1, CharLSTMGRULayer, _gru_layout, _gru_step,
                 oracle="NumpyGRUCell", gated=True),
        CellType("rnn", "Elman RNN with tanh", 1, 1, CharLSTMRNNLayer, _joint_layout, _rnn_step,
                 oracle="NumpyRNNCell", gated=False),
    )
}
CELL_TYPES = tuple(CELLS)
# The layer classes whose forward the decoding step reproduces (exactly these: `step_char_lstm._weights_in_place`).
LAYER_CLASSES = frozenset(cell.layer for cell in CELLS.values())


def cell_type_of(name: str) -> CellType:
    """The registry's entry for `name`; a one-line ValueError for any other name."""
    cell = CELLS.get(name) if isinstance(name, str) else None
    if cell is None:
        raise ValueError(f"Unknown cell type {name!r}: choose one of {', '.join(CELL_TYPES)} (the registry CELLS in "
                         "cells_char_lstm.py).")
    return cell


__all__ = ["CELLS", "CELL_TYPES", "CellType", "cell_type_of"]
