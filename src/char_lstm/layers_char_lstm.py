"""The layers of CharLSTM over whole sequences (prompts, training): torch's recurrent layers, whose fused kernels
(cuDNN, oneDNN) do the work, dropout between them, and padding kept out of the recurrence.

This file is shipped to the Hub with `modeling_char_lstm.py` (``trust_remote_code``) and imports only torch and
transformers. Which layer a cell type uses is its registry entry's `layer` (`cells_char_lstm.CELLS`).

How padding works: positions where ``attention_mask == 0`` never enter the recurrence. The real tokens of each row are
gathered to the front, run as a `PackedSequence`, and scattered back; pad positions get a zero hidden state. So a
left-padded batch gives exactly what each prompt gives alone, and a right-padded row ends in the state of its last
real token.

Shapes: ``B`` batch, ``T`` sequence length, ``H`` hidden size.
"""

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence
from transformers.modeling_layers import GradientCheckpointingLayer


class _RecurrentLayer(GradientCheckpointingLayer):
    """A torch recurrent layer (`nn.LSTM`/`nn.GRU`/`nn.RNN`, same parameters and state-dict keys) whose forward takes
    and returns tensors only, which is what activation checkpointing needs (transformers' `GradientCheckpointingLayer`
    recomputes it in the backward pass when `model.gradient_checkpointing_enable()` was called).

    forward(x, *hx, packed_meta=None): `x` is the input ``(B, T, in)``, or the data of a `PackedSequence` whose other
    fields are `packed_meta`; `hx` the initial state tensors ``(1, B, H)`` (none: zeros). Returns (output, or the
    packed output's data, *final states ``(1, B, H)``)."""

    def forward(self, x: torch.Tensor, *hx: torch.Tensor, packed_meta: tuple | None = None):
        inputs = PackedSequence(x, *packed_meta) if packed_meta is not None else x
        initial = None if not hx else (hx if len(hx) > 1 else hx[0])
        out, final = self._sequence_forward(inputs, initial)
        final = final if isinstance(final, tuple) else (final,)
        return (out.data if packed_meta is not None else out, *final)


def _cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


class CharLSTMLSTMLayer(_RecurrentLayer, nn.LSTM):
    def _sequence_forward(self, inputs, initial):
        # CPU autocast runs the LSTM in bf16, but oneDNN has no bf16 LSTM kernel on CPUs without AVX512-BF16 or AMX
        # (an AVX2-only CPU raises "could not create a primitive descriptor"): there it runs in float32, as it
        # would without autocast (bf16 would be emulated, and slower, anyway).
        if (
            torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and self.weight_ih_l0.device.type == "cpu"
            and not _cpu_has_native_bf16()
        ):
            with torch.autocast("cpu", enabled=False):
                initial = None if initial is None else tuple(state.float() for state in initial)
                return nn.LSTM.forward(self, inputs.to(torch.float32), initial)
        return nn.LSTM.forward(self, inputs, initial)


class CharLSTMGRULayer(_RecurrentLayer, nn.GRU):
    _sequence_forward = nn.GRU.forward


class CharLSTMRNNLayer(_RecurrentLayer, nn.RNN):
    _sequence_forward = nn.RNN.forward


class CharLSTMDropout(nn.Dropout):
    """`nn.Dropout` with the same distribution (each element kept with probability ``1 - p``, kept ones scaled by
    ``1 / (1 - p)``), drawn faster on CPU, where `F.dropout` draws a Bernoulli per element: a uniform draw compared
    with ``p`` in place takes about a quarter of the time (docs/benchmarks.md), and the char-rnn model has two per
    training step. Other devices use `F.dropout`, whose fused kernels are fast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return super().forward(x)
        if self.p == 1.0:
            return torch.zeros_like(x)
        # In place on the fresh uniforms (float32, whatever x's dtype: a bf16 uniform would round p): 1 where kept.
        scale = torch.rand(x.shape, device=x.device, dtype=torch.float32).ge_(self.p).mul_(1.0 / (1.0 - self.p))
        return x * (scale if x.dtype == torch.float32 else scale.to(x.dtype))


class _Packing:
    """Where the real tokens of a padded batch are, and how to move them to and from a `PackedSequence`.

    ``mask``: (B, T) with 1 for real tokens. Any pattern works (left, right or interior padding); the real tokens of a
    row are processed in their order.
    """

    def __init__(self, mask: torch.Tensor):
        mask = mask.bool()
        self.mask = mask
        self.lengths = mask.sum(dim=1)  # (B,)
        # Stable sort puts each row's real positions first, in order: order[b, j] = position of the j-th real token.
        self.order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices  # (B, T)
        self.empty_rows = self.lengths == 0  # (B,) rows with no real token keep their initial state
        self.total_length = mask.shape[1]

    def pack(self, x: torch.Tensor) -> PackedSequence:
        """(B, T, D) -> PackedSequence of the real tokens."""
        compact = x.gather(1, self.order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        # pack_padded_sequence rejects empty rows: give them one step, whose output and state are discarded.
        lengths = self.lengths.clamp(min=1).cpu()
        return pack_padded_sequence(compact, lengths, batch_first=True, enforce_sorted=False)

    def unpack(self, packed: PackedSequence) -> torch.Tensor:
        """PackedSequence -> (B, T, D) at the original positions, zeros at pad positions."""
        compact, _ = pad_packed_sequence(packed, batch_first=True, total_length=self.total_length)
        index = self.order.unsqueeze(-1).expand(-1, -1, compact.shape[-1])
        full = torch.zeros_like(compact).scatter(1, index, compact)
        return full * self.mask.unsqueeze(-1).to(full.dtype)


def _sequence_layer(layer: nn.Module, x, initial: tuple | None, packing: "_Packing | None"):
    """`layer` (a `_RecurrentLayer`) over a sequence by the fused kernel: x (B, T, in), or a `PackedSequence` with
    `packing`, from `initial` ((B, H) each; None: zeros). Returns (output like x, final states ((B, H), ...)); a row
    without any real token keeps its initial state."""
    hx = ()
    if initial is not None:
        # (1, B, H) each. With autograd on, read a copy: the cache buffer is overwritten in place afterwards.
        hx = tuple((s.clone() if torch.is_grad_enabled() else s).unsqueeze(0) for s in initial)
    packed_meta = tuple(x)[1:] if packing is not None else None
    out, *final = layer(x.data if packed_meta else x, *hx, packed_meta=packed_meta)
    x = PackedSequence(out, *packed_meta) if packed_meta is not None else out
    final = tuple(s.squeeze(0) for s in final)  # (B, H) each
    if packing is not None and bool(packing.empty_rows.any()):
        start = initial if initial is not None else tuple(torch.zeros_like(s) for s in final)
        keep = packing.empty_rows.unsqueeze(-1)
        final = tuple(torch.where(keep, s0, s) for s0, s in zip(start, final))
    return x, final
