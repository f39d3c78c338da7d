"""The one-token decoding step of CharLSTM: one token through a layer without autograd and without the sequence
kernel, whose per-call cost dominates a single step on a CPU (docs/benchmarks.md).

This file is shipped to the Hub with `modeling_char_lstm.py` (``trust_remote_code``) and imports only the standard
library, torch, transformers and its siblings. Each cell's arithmetic is its `step` in `cells_char_lstm.CELLS`; here
is what every cell shares: its weights laid out once and kept while they do not change (`_step_weights`), the
products on a CPU through oneDNN with prepacked weights (`_StepLinear`), the first layer's input projection looked up
per character (`_decoding_table_ids`), and when the step may stand in for the layers at all (`_weights_in_place`).

Shapes: ``B`` batch, ``H`` hidden size, ``G`` gates, ``V`` vocabulary size.
"""

import functools
import platform
import weakref

import torch
from torch import nn

from .cells_char_lstm import LAYER_CLASSES, CellType
from .internals_char_lstm import _onednn_linear_usable


# The weights of the one-token decoding step, per recurrent layer: rebuilt when a weight changes (its version counter
# or storage moves) and, because edits through `.data` change neither, forgotten whenever a sequence (a prompt, a
# training batch) goes through the layer and at the start of every `generate()`. Kept beside the model, not on it, so
# that `copy.deepcopy(model)` and pickling never meet oneDNN's packed (storage-less) tensors.
_STEP_WEIGHTS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()

# The first layer's input projection of every character, ``embedding @ W_ih.T + b``, is precomputed for decoding when
# the table ``(V, gates * H)`` stays at most this many elements (16 MB in float32; a char vocabulary is far below).
_INPUT_TABLE_MAX_ELEMENTS = 1 << 22


@functools.cache
def _cpu_vendor() -> str:
    """The CPU's vendor string ("GenuineIntel", "AuthenticAMD", ...; "" when it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux: Windows names the vendor here ("Intel64 Family 6 ..., GenuineIntel")
        pass
    return platform.processor()


# Up to this many rows, the decoding step's float32 products go through torch's matmul (MKL) on Intel CPUs, where
# MKL takes its own fast paths: one row, 2x512 LSTM, Intel Xeon (AVX-512 + AMX): 0.45 ms per character against 0.59
# through oneDNN; at 4 rows and more oneDNN's prepacked product is faster (docs/benchmarks.md). On other CPUs MKL
# takes a generic AVX2 path, slower than oneDNN at every batch size (AMD EPYC: 0.10 against 0.06 ms for one row).
_MKL_MAX_ROWS = 2


class _StepLinear:
    """``x @ weight.T + bias (+ add)``, then optionally a sigmoid, for the decoding step: x ``(B, in)``, weight
    ``(out, in)``, bias ``(out,)`` or None, add ``(B, out)`` or None.

    For float32 on a CPU the weight is prepacked once for oneDNN and the product runs there, with the addition and the
    sigmoid fused into it: torch's float32 matmul goes through MKL, whose AVX2 path on non-Intel CPUs is several times
    slower (measured: docs/benchmarks.md). On an Intel CPU MKL is faster for one or two rows (`_MKL_MAX_ROWS`) and
    takes those. Any other dtype or device, or a torch without oneDNN, uses torch's own products."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias
        # packed on first use (None: not yet; False: oneDNN cannot take it), so that one-row decoding on an Intel CPU
        # never pays for it
        usable = weight.device.type == "cpu" and weight.dtype == torch.float32 and _onednn_linear_usable()
        self.packed = None if usable else False
        intel_mkl = torch.backends.mkl.is_available() and "Intel" in _cpu_vendor()
        self.mkl_rows = _MKL_MAX_ROWS if usable and intel_mkl else 0

    def _pack(self) -> None:
        weight, bias = self.weight, self.bias
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, 64)
            probe = weight.new_zeros(1, weight.shape[1])
            torch.ops.mkldnn._linear_pointwise(probe, packed, bias, "none", [], "")
            torch.ops.mkldnn._linear_pointwise.binary(probe, weight.new_zeros(1, weight.shape[0]), packed, bias, "add")
            self.packed = packed
        except (RuntimeError, TypeError):  # an older or partial oneDNN build: the plain product is always correct
            self.packed = False

    def __call__(self, x: torch.Tensor, add: torch.Tensor | None = None, sigmoid: bool = False) -> torch.Tensor:
        autocast = torch.is_autocast_enabled(x.device.type)
        onednn = (
            self.packed is not False
            and x.dtype == torch.float32
            and x.shape[0] > self.mkl_rows
            and not autocast
            and torch.backends.mkldnn.enabled  # `torch.backends.mkldnn.flags(enabled=False)` is honoured
        )
        if onednn and self.packed is None:
            self._pack()
        if onednn and self.packed is not False:
            if add is None:
                return torch.ops.mkldnn._linear_pointwise(
                    x, self.packed, self.bias, "sigmoid" if sigmoid else "none", [], "")
            y = torch.ops.mkldnn._linear_pointwise.binary(x, add, self.packed, self.bias, "add")
        elif add is None or autocast:
            # Under autocast (a bf16 training run sampling text) `linear` is the op that casts to the autocast dtype;
            # the addition then keeps the float32 of `add`.
            y = nn.functional.linear(x, self.weight, self.bias)
            if add is not None:
                y = add + y
        else:
            y = torch.addmm(add if self.bias is None else add + self.bias, x, self.weight.t())
        return y.sigmoid_() if sigmoid else y


def _step_weights(rnn: nn.RNNBase, cell: CellType, embeddings: nn.Embedding | None) -> tuple:
    """The layer's weights laid out for the decoding step by its cell (`cell.step_layout`), each (weight, bias) pair
    a `_StepLinear`; rebuilt when a weight changes (in place, as an optimizer does, or by moving the model). With
    `embeddings` (first layer, small vocabulary) the input projection is a table of rows per character id instead of
    a product. Returns ``(input_table (V, G*H) or None, input_linear or None, hidden_linear)``."""
    params = [rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0]
    if embeddings is not None:
        params.append(embeddings.weight)
    try:
        key = (params[0].dtype, params[0].device, *((p.data_ptr(), p._version) for p in params))
    except RuntimeError:  # parameters created under inference_mode have no version counter: never reuse
        key = None
    cached = _STEP_WEIGHTS.get(rnn)
    if key is not None and cached is not None and cached[0] == key:
        return cached[1]
    w_ih, w_hh, b_ih, b_hh = (p.detach() for p in params[:4])
    table, input_pair, hidden_pair = cell.step_layout(
        w_ih, w_hh, b_ih, b_hh, embeddings.weight.detach() if embeddings is not None else None)
    laid_out = (table, _StepLinear(*input_pair) if input_pair is not None else None, _StepLinear(*hidden_pair))
    _STEP_WEIGHTS[rnn] = (key, laid_out)
    return laid_out


def _single_step(
    rnn: nn.RNNBase,
    cell: CellType,
    x: torch.Tensor,
    state: tuple[torch.Tensor, ...] | None,
    input_ids: torch.Tensor | None = None,
    embeddings: nn.Embedding | None = None,
):
    """One time step of one layer, the same function as `rnn` on a length-1 sequence but without its per-call
    overhead (on a CPU, oneDNN's sequence kernel costs many times this step's work per call: docs/benchmarks.md).

    x: (B, 1, in); state: ((B, H), ...) or None for zeros; input_ids (B, 1) and the `embeddings` that made x (both or
    neither), for the first layer, to look its input projection up instead of computing it. Returns (output (B, 1, H),
    new state)."""
    x = x[:, 0]
    if state is None:
        zeros = x.new_zeros(x.shape[0], rnn.hidden_size)
        state = (zeros,) * cell.num_states
    weights = _step_weights(rnn, cell, embeddings)
    h, state = cell.step(weights, x, state, input_ids[:, 0] if weights[0] is not None else None)
    return h.unsqueeze(1), state


def _weights_in_place(model) -> bool:
    """Whether the one-token decoding step of `model` (a `CharLSTMModel`), which reads the layers' weights itself
    instead of calling the layers, may stand in for them. It may not, and the layers' own forward runs, when:

    * a forward hook or pre-hook is registered on a layer, or on every module (`register_module_forward_hook`):
      the step would never call it (hooks on the embeddings: `_decoding_table_ids`);
    * a layer is not one of the registry's layer classes as written: wrapped (peft's LoRA on a parameter,
      `target_parameters`, puts the layer in a `ParamWrapper` whose forward applies the adapter), subclassed, or
      with a parametrized weight (`torch.nn.utils.parametrize` swaps the module's class; the weight is recomputed
      at every read, which the step's cached weights would not follow);
    * accelerate hooks manage the modules (a `device_map`, offloading: weights on `meta` until a hook brings them
      in around the module's forward).

    It runs at every decoding step, so it reads dicts and types only (`hasattr` on a module costs an exception
    when the attribute is missing)."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    for layer in model.layers:
        if (
            type(layer) not in LAYER_CLASSES
            or layer._forward_hooks
            or layer._forward_pre_hooks
            or "_hf_hook" in layer.__dict__  # accelerate's `add_hook_to_module` sets it as a plain attribute
        ):
            return False
    return "_hf_hook" not in model.embeddings.__dict__ and not model.layers[0].weight_hh_l0.is_meta


def _decoding_table_ids(model, input_ids: torch.Tensor | None) -> torch.Tensor | None:
    """`input_ids` when the first layer can look its input projection up per character id (plain embeddings and a
    small enough ``(V, gates * H)`` table), else None. The table stands in for the embedding's output, so it is
    not used when that output may differ from a row of `embeddings.weight`: a wrapped embedding (peft's LoRA),
    a subclass, a parametrized weight (its class is swapped), `max_norm`, or a hook that may change the ids or
    the output (the embedding module still runs, in `_embed`, and its hooks with it)."""
    embeddings = model.embeddings
    if (
        input_ids is None
        or type(embeddings) is not nn.Embedding
        or embeddings.max_norm is not None
        or embeddings._forward_hooks
        or embeddings._forward_pre_hooks
    ):
        return None
    gates_width = model.config.num_gates * model.config.hidden_size
    return input_ids if embeddings.num_embeddings * gates_width <= _INPUT_TABLE_MAX_ELEMENTS else None
