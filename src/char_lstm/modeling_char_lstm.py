"""CharLSTM: a character-level recurrent language model (LSTM, GRU or RNN) for transformers.

This file is shipped to the Hub next to the weights (``trust_remote_code``): it imports only the standard library,
torch, transformers and ``.configuration_char_lstm``.

Shapes used in the docstrings: ``B`` batch, ``T`` sequence length (new tokens of this call), ``E`` embedding size,
``H`` hidden size, ``V`` vocabulary size, ``L`` number of recurrent layers.

How the recurrent state travels: every layer has a `LinearAttentionLayer` in transformers' `DynamicCache` (built by
`DynamicCache(config=model.config)`, which `generate()` does on its own), holding ``(h, c)`` for an LSTM or ``h`` for a
GRU/RNN, each of shape ``(B, H)``. A forward call with a cache starts from that state and writes the final state back,
so `generate()` feeds one new token per step and beam search reorders the states with the beams.

How padding works: positions where ``attention_mask == 0`` never enter the recurrence. The real tokens of each row are
gathered to the front, run as a `PackedSequence`, and scattered back; pad positions get a zero hidden state. So a
left-padded batch gives exactly what each prompt gives alone, and a right-padded row ends in the state of its last
real token.
"""

import functools
import inspect
import math
import os
import platform
import warnings
import weakref

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence
from transformers import GenerationMixin, PreTrainedModel
from transformers import __version__ as transformers_version
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import (
    CONFIG_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)

from .configuration_char_lstm import CharLSTMConfig


# Private parts of transformers this file leans on (docs/design.md, "transformers' internals"). A release without them
# still imports this file: the code that uses them checks for them and steps aside.
try:  # the base class of the recurrent-state cache layers (transformers 5.24 on)
    from transformers.cache_utils import LinearAttentionCacheLayerMixin
except ImportError:
    LinearAttentionCacheLayerMixin = None
try:  # generate()'s length criterion, which the lean decoding loop reads as a comparison of lengths
    from transformers.generation.stopping_criteria import MaxLengthCriteria
except ImportError:
    MaxLengthCriteria = None
try:  # the temperature warper, the one logits processor the adaptive softmax's hierarchical draw carries out itself
    from transformers.generation.logits_process import TemperatureLogitsWarper
except ImportError:
    TemperatureLogitsWarper = None


@functools.cache
def _parameters(function) -> tuple | None:
    """The (name, kind) of each parameter of `function`, or None when it is missing or has no signature. What the
    checks of transformers' internals compare with the signatures verified here (cheap after the first call: cached
    per function object, and a changed or patched transformers brings other function objects)."""
    if function is None:
        return None
    try:
        return tuple((parameter.name, parameter.kind) for parameter in inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return None


# Every Auto class a saved folder can be loaded with (`trust_remote_code=True` where the package is not installed).
# transformers writes only the saved class's own entry; AutoTokenizer names the tokenizer file that travels with
# the tokenizer (whose tokenizer.json also loads with no code at all).
AUTO_MAP = {
    "AutoConfig": "configuration_char_lstm.CharLSTMConfig",
    "AutoModel": "modeling_char_lstm.CharLSTMModel",
    "AutoModelForCausalLM": "modeling_char_lstm.CharLSTMForCausalLM",
    "AutoTokenizer": ["tokenization_char_lstm.CharLSTMTokenizer", None],
}


# ---------------------------------------------------------------------------------------------------------------------
# Cache plumbing: each layer's recurrent state in transformers' cache


# Attribute on the cache that counts the input columns (tokens, padding included) its states have consumed. It lets
# `generate(full_sequence, cache=previous_cache)` feed only the new columns, as transformers does for key/value caches.
_SEEN_TOKENS_ATTR = "char_lstm_seen_tokens"
# Attribute set on a cache that `generate()` got with consumed tokens in it: its first forward in that call feeds
# only the columns the state has not consumed (`_columns_to_feed`); any prompt chunk after it is fed whole.
_RESUME_PENDING_ATTR = "char_lstm_resume_pending"


def _check_cache(cache: Cache, num_layers: int, num_states: int) -> None:
    """Refuse, in one line, a cache that cannot hold this model's states: one that is not a recurrent-state cache of
    this model's layers (the user's), or whose layers lack what this file reads and writes (transformers' own:
    `_cache_layout_problem`)."""
    layers = getattr(cache, "layers", None)
    if (
        layers is None
        or len(layers) != num_layers
        or (
            LinearAttentionCacheLayerMixin is not None
            and not all(isinstance(layer, LinearAttentionCacheLayerMixin) for layer in layers)
        )
        or any(getattr(layer, "number_of_states", num_states) < num_states for layer in layers)
    ):
        raise ValueError(
            "CharLSTM needs a cache with one recurrent-state layer per recurrent layer: pass "
            "`cache=DynamicCache(config=model.config)` (or let the model create it with `use_cache=True`)."
        )
    problem = _cache_layout_problem(cache, num_states)
    if problem is not None:
        raise ValueError(
            f"The recurrent-state cache of this transformers ({transformers_version}) {problem}, which CharLSTM "
            "reads and writes (as in transformers 5.24-5.25): run the model without a cache (use_cache=False); "
            "generate() does so by itself."
        )


# The parameters of `Cache.update_recurrent_state` that `_write_state` calls it with, as in transformers 5.24-5.25.
def _verified_update_recurrent_state(self, recurrent_states, layer_idx, state_idx=0, **kwargs): ...


def _cache_layout_problem(cache: Cache, num_states: int) -> str | None:
    """What the layers of `cache` lack of what this file reads and writes, in a few words, or None: a
    `LinearAttentionCacheLayerMixin` per layer with its `recurrent_states` and `has_previous_state` dicts (the states
    and their flags, by state index), and the cache's `update_recurrent_state(states, layer_idx, state_idx=)`.
    transformers 5.24-5.25 have all of it; a release that changed it gets generate() without a cache (the same
    sequences, computed again from the start at every token) rather than an error deep in the model."""
    if LinearAttentionCacheLayerMixin is None:
        return "has no LinearAttentionCacheLayerMixin layers"
    if _parameters(getattr(type(cache), "update_recurrent_state", None)) != _parameters(
        _verified_update_recurrent_state
    ):
        return "has no update_recurrent_state(recurrent_states, layer_idx, state_idx=...)"
    for layer in cache.layers:
        for name in ("recurrent_states", "has_previous_state"):
            states = getattr(layer, name, None)
            if not isinstance(states, dict) or not all(index in states for index in range(num_states)):
                return f"keeps no `{name}` dict of {num_states} state(s) per layer"
    return None


def _new_cache(config: CharLSTMConfig) -> tuple[DynamicCache | None, str | None]:
    """(`DynamicCache(config=config)`, None), or (None, what keeps it from holding this model's states) where this
    transformers builds no cache of the layout this file reads and writes (`_cache_layout_problem`)."""
    try:
        cache = DynamicCache(config=config)
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        return None, f"cannot be built for this model ({type(error).__name__}: {error})"
    if len(getattr(cache, "layers", ())) != config.num_hidden_layers:
        return None, f"has {len(getattr(cache, 'layers', ()))} layers for {config.num_hidden_layers} recurrent layers"
    problem = _cache_layout_problem(cache, config.number_of_conv_states)
    return (None, problem) if problem is not None else (cache, None)


def _cache_for_forward(cache: Cache | None, use_cache: bool, config: CharLSTMConfig, num_layers: int) -> Cache | None:
    """The cache a forward call reads and writes: `cache` (checked by `_check_cache`), or a new one where `use_cache`
    asks for it and this transformers builds one that can hold the states (else none, with a warning)."""
    if use_cache and cache is None:
        cache, problem = _new_cache(config)
        if problem is not None:
            warnings.warn(
                f"The recurrent-state cache of this transformers ({transformers_version}) {problem}: the model "
                "returns no cache (use_cache=False).", stacklevel=3)
    if cache is not None:
        _check_cache(cache, num_layers, config.number_of_conv_states)
    return cache


def _counts_tokens(cache: Cache) -> bool:
    """Whether `cache.get_seq_length()` answers for this model's cache (transformers 5.25: the count its layers keep,
    which `_set_seen_tokens` sets; 5.24 refuses a cache of recurrent-state layers only)."""
    try:
        cache.get_seq_length()
    except (ValueError, TypeError, AttributeError, NotImplementedError):
        return False
    return True


def _read_state(cache: Cache, layer_idx: int, num_states: int) -> tuple[torch.Tensor, ...] | None:
    """The state tuple ``((B, H),) * num_states`` stored for `layer_idx`, or None when the cache holds none yet (new or
    `reset()`: both mean the zero initial state)."""
    layer = cache.layers[layer_idx]
    if not all(layer.has_previous_state[i] for i in range(num_states)):
        return None
    return tuple(layer.recurrent_states[i] for i in range(num_states))


def _write_state(cache: Cache, layer_idx: int, states: tuple[torch.Tensor, ...]) -> None:
    layer = cache.layers[layer_idx]
    for state_idx, state in enumerate(states):
        cache.update_recurrent_state(state, layer_idx, state_idx=state_idx)
        # transformers flags a state as present only when a conv state is written; this model has recurrent states
        # only, so it flags them itself (`reset()` clears the flags again).
        layer.has_previous_state[state_idx] = True
    # `reorder_cache` (beam search) moves the beam indices to `layer.device`, which is otherwise set by conv states.
    layer.device = states[0].device


def _seen_tokens(cache: Cache | None) -> int:
    if cache is None or len(getattr(cache, "layers", ())) == 0:
        return 0
    layer = cache.layers[0]
    flags = getattr(layer, "has_previous_state", None)
    if not isinstance(flags, dict) or not any(flags.values()):
        return 0
    return getattr(cache, _SEEN_TOKENS_ATTR, 0)


def _set_seen_tokens(cache: Cache, count: int) -> None:
    """Record that the states of `cache` have consumed `count` input columns. Since transformers 5.25 a recurrent
    layer also counts its tokens (`cumulative_length_linear`, which `cache.get_seq_length()` reports and `generate()`
    slices a continued sequence by); that count follows this one where the layer has it, in place (its address may be
    marked static for CUDA graphs). Older layers have no such count: the attribute alone is used there."""
    setattr(cache, _SEEN_TOKENS_ATTR, count)
    for layer in cache.layers:
        counter = getattr(layer, "cumulative_length_linear", None)
        if isinstance(counter, torch.Tensor) and counter.numel() == 1 and not counter.is_floating_point():
            counter.fill_(count)


def detach_cache(cache: Cache) -> Cache:
    """Cut the autograd history of the states in `cache`, in place, and return it.

    A cache used while training keeps the graph of the calls that filled it, so that one `backward()` through several
    calls gives full backpropagation through time. For truncated BPTT (char-rnn style: each chunk starts from the
    previous chunk's final state, gradients stop at the boundary), detach it between chunks."""
    for layer in cache.layers:
        for index, state in getattr(layer, "recurrent_states", {}).items():
            if state is not None:
                layer.recurrent_states[index] = state.detach()
    return cache


def reset_cache_rows(cache: Cache, rows: torch.Tensor) -> Cache:
    """Set the states of the batch rows where `rows` (bool, (B,)) is True back to zero, in place, and return `cache`.

    Stateful truncated BPTT uses it where a stream starts over (at a new epoch, or a new evaluation)."""
    for layer in cache.layers:
        for index, state in getattr(layer, "recurrent_states", {}).items():
            if state is not None:
                layer.recurrent_states[index] = state.masked_fill(rows.to(state.device).view(-1, 1), 0.0)
    return cache


def cache_states(cache: Cache) -> list[tuple[torch.Tensor, ...]] | None:
    """The states of `cache`, one tuple ``((B, H), ...)`` per layer (for saving), or None when it holds none yet."""
    states = []
    for layer in cache.layers:
        present = [i for i, flag in sorted(getattr(layer, "has_previous_state", {}).items()) if flag]
        if not present:
            return None
        states.append(tuple(layer.recurrent_states[i].detach() for i in present))
    return states


def cache_from_states(config: CharLSTMConfig, states: list[tuple[torch.Tensor, ...]]) -> DynamicCache:
    """A `DynamicCache` holding `states` (as returned by `cache_states`), to continue from them."""
    cache = DynamicCache(config=config)
    if len(states) != config.num_hidden_layers:
        raise ValueError(f"Expected states for {config.num_hidden_layers} layers, got {len(states)}.")
    for layer_idx, state in enumerate(states):
        _write_state(cache, layer_idx, tuple(state))
    return cache


# ---------------------------------------------------------------------------------------------------------------------
# Keyword arguments of forward: the old cache names, and nothing ignored silently


# Keyword arguments `CharLSTMForCausalLM.forward` hands to transformers' causal-LM loss (Trainer passes
# `num_items_in_batch`; stateful training passes `shift_labels`). Any other unknown keyword is an error.
_LOSS_KWARGS = frozenset({"num_items_in_batch", "ignore_index", "shift_labels"})
# Keyword arguments of generate() that transformers 5.24 passes on to the decoding loop with the model's own
# (`stop_strings=` needs `tokenizer=`); the model never reads them.
_GENERATE_ONLY_KWARGS = ("tokenizer", "assistant_tokenizer")


# The names transformers used for a recurrent state before `cache=` (Mamba's `cache_params`, attention models'
# `past_key_values`): mapped to `cache` with a deprecation warning, as transformers' own models do.
_OLD_CACHE_NAMES = ("past_key_values", "cache_params")


def _check_kwargs(kwargs: dict, allowed: frozenset, where: str, cache: Cache | None) -> Cache | None:
    """Map the old cache names to `cache` (FutureWarning) and refuse keyword arguments this model would otherwise
    ignore silently; returns the cache to use. `output_attentions` is accepted when not True (transformers passes it
    around; a recurrent model has no attention weights), and `position_ids` is dropped (an RNN has no positions; not a
    parameter, or generate() would build them every step and the exporters trace them as an input). Called only when
    there are extra keywords (no cost on the decoding step)."""
    kwargs.pop("position_ids", None)
    for name in _OLD_CACHE_NAMES:
        if name in kwargs:
            old = kwargs.pop(name)
            if cache is not None and old is not None and old is not cache:
                raise ValueError(f"{where}.forward() got both `cache` and `{name}`; pass the state once, as `cache=`.")
            warnings.warn(
                f"`{name}` is deprecated for `{where}.forward`: the recurrent state is passed as `cache=`.",
                FutureWarning,
                stacklevel=3,
            )
            cache = cache if cache is not None else old
    unknown = sorted(k for k in kwargs if k not in allowed and not (k == "output_attentions" and not kwargs[k]))
    if unknown:
        hint = (
            "a recurrent model has no attention weights" if "output_attentions" in unknown
            else "the recurrent state is passed as `cache=`; the other inputs are input_ids/inputs_embeds, "
            "attention_mask, labels, use_cache, output_hidden_states, return_dict, logits_to_keep, logits_at_targets"
        )
        raise TypeError(f"{where}.forward() got unsupported keyword argument(s) {unknown}: {hint}.")
    return cache


# ---------------------------------------------------------------------------------------------------------------------
# The decoding step: one token without autograd, without the sequence kernel


# The weights of the one-token decoding step, per recurrent layer: rebuilt when a weight changes (its version counter
# or storage moves) and, because edits through `.data` change neither, forgotten whenever a sequence (a prompt, a
# training batch) goes through the layer and at the start of every `generate()`. Kept beside the model, not on it, so
# that `copy.deepcopy(model)` and pickling never meet oneDNN's packed (storage-less) tensors.
_STEP_WEIGHTS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()

# The first layer's input projection of every character, ``embedding @ W_ih.T + b``, is precomputed for decoding when
# the table ``(V, gates * H)`` stays at most this many elements (16 MB in float32; a char vocabulary is far below).
_INPUT_TABLE_MAX_ELEMENTS = 1 << 22


@functools.cache
def _onednn_linear_usable() -> bool:
    """Whether oneDNN's linear with prepacked weights can be called and computes what `nn.functional.linear` computes:
    a CPU build of torch with oneDNN whose private ops `torch.ops.mkldnn._reorder_linear_weight` and
    `_linear_pointwise` (plain, with a fused sigmoid, and its `binary` overload with a fused addition) take the
    arguments they take in torch 2.6-2.13 and give the plain product's values on a small probe. Checked once per
    process; where it fails the decoding step uses torch's own products."""
    if not (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    ):
        return False
    generator = torch.Generator().manual_seed(0)
    weight, bias, x, add = (torch.randn(*shape, generator=generator) for shape in ((8, 16), (8,), (3, 16), (3, 8)))
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 64)
        plain = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        sigmoid = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "sigmoid", [], "")
        added = torch.ops.mkldnn._linear_pointwise.binary(x, add, packed, bias, "add")
    except (RuntimeError, TypeError, AttributeError):  # another schema, or an op this build does not run
        return False
    with torch.autocast("cpu", enabled=False):  # checked once, maybe first inside a bf16 run's autocast
        expected = nn.functional.linear(x, weight, bias)
    return all(
        torch.allclose(got, want, rtol=1e-4, atol=1e-5)
        for got, want in ((plain, expected), (sigmoid, expected.sigmoid()), (added, expected + add))
    )


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


def _step_weights(rnn: nn.RNNBase, cell_type: str, embeddings: nn.Embedding | None):
    """The layer's weights laid out for the decoding step, rebuilt when a weight changes (in place, as an optimizer
    does, or by moving the model). With `embeddings` (first layer, small vocabulary) the input projection is a table
    of rows per character id instead of a product.

    Returns ``(input_table, input_linear, hidden_linear)``:
    - LSTM/RNN: input_table ``(V, G*H)`` = embedding @ W_ih.T + b_ih + b_hh and hidden_linear = (W_hh, None); without a
      table, input_linear is None and hidden_linear = ([W_ih | W_hh], b_ih + b_hh), one product of ``[x | h]``.
    - GRU (whose candidate gate needs the hidden part apart): input = (W_ih, b_ih) or the table embedding @ W_ih.T +
      b_ih; hidden_linear = (W_hh, b_hh)."""
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
    if cell_type == "lstm":
        # The cell gate's rows times -2, exactly (a power of two): one sigmoid over all the gates then gives
        # sigmoid(-2 g), from which `_cell_step` gets tanh(g) = 1 - 2 sigmoid(-2 g) (docs/design.md).
        scale = torch.ones(w_ih.shape[0], 1, dtype=w_ih.dtype, device=w_ih.device)
        scale[2 * rnn.hidden_size : 3 * rnn.hidden_size] = -2
        w_ih, w_hh, b_ih, b_hh = w_ih * scale, w_hh * scale, b_ih * scale[:, 0], b_hh * scale[:, 0]
    table = input_linear = None
    if embeddings is not None:
        # GRU keeps b_hh with the hidden product (its candidate gate scales it by r); LSTM/RNN fold it in here.
        input_bias = b_ih.float() if cell_type == "gru" else b_ih.float() + b_hh.float()
        table = nn.functional.linear(embeddings.weight.detach().float(), w_ih.float(), input_bias).to(w_ih.dtype)
    if cell_type == "gru":
        if table is None:
            input_linear = _StepLinear(w_ih, b_ih)
        hidden_linear = _StepLinear(w_hh, b_hh)
    elif table is not None:
        hidden_linear = _StepLinear(w_hh, None)
    else:
        hidden_linear = _StepLinear(torch.cat([w_ih, w_hh], dim=1).contiguous(), b_ih + b_hh)
    fused = (table, input_linear, hidden_linear)
    _STEP_WEIGHTS[rnn] = (key, fused)
    return fused


def _tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh; for larger float32 tensors on a CPU computed as ``2 * sigmoid(2x) - 1``, the same function (within 2e-7)
    at a fraction of the cost, torch's CPU sigmoid being much faster than its tanh (docs/benchmarks.md). Small tensors
    keep the one call, cheaper than four."""
    if x.dtype == torch.float32 and x.device.type == "cpu" and x.numel() >= 4096:
        return torch.sigmoid(x * 2).mul_(2).sub_(1)
    return torch.tanh(x)


def _single_step(
    rnn: nn.RNNBase,
    cell_type: str,
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
        state = (zeros, zeros) if cell_type == "lstm" else (zeros,)
    weights = _step_weights(rnn, cell_type, embeddings)
    h, state = _cell_step(weights, cell_type, x, state, input_ids[:, 0] if weights[0] is not None else None)
    return h.unsqueeze(1), state


def _cell_step(weights: tuple, cell_type: str, x: torch.Tensor | None, state: tuple[torch.Tensor, ...], ids):
    """The cell's arithmetic for one step, from the weights `_step_weights` laid out: x (B, in) (None when the input
    projection is looked up by `ids` (B,) in the table), state ((B, H), ...). Returns (h (B, H), new state)."""
    table, input_linear, hidden_linear = weights
    h = state[0]
    if table is not None:
        gi = table.index_select(0, ids)  # (B, G*H): the input projection, bias included
    elif input_linear is not None:
        gi = input_linear(x)
    if cell_type == "gru":
        gh = hidden_linear(h)  # (B, 3H): reset, update, new
        i_r, i_z, i_n = gi.chunk(3, dim=1)
        h_r, h_z, h_n = gh.chunk(3, dim=1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        n = _tanh(i_n + r * h_n)
        h = n + z * (h - n)
        return h, (h,)
    # LSTM: the product with its addition and sigmoid fused (`_StepLinear`), over gates laid out as (input, forget,
    # -2 x cell, output) by `_step_weights`; with tanh(x) = 1 - 2 sigmoid(-2x) the rest is five ops:
    # c' = f c + i tanh(g) = (i - 2 i sigmoid(-2g)) + f c, and h = o tanh(c') = o - 2 o sigmoid(-2c').
    lstm = cell_type == "lstm"
    if table is not None:
        gates = hidden_linear(h, add=gi, sigmoid=lstm)
    else:
        gates = hidden_linear(torch.cat([x, h], dim=1), sigmoid=lstm)
    if lstm:
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.addcmul(i, i, g, value=-2)
        # in place unless the state has the wider dtype (bf16 gates under autocast, a float32 state)
        c = c.addcmul_(f, state[1]) if c.dtype == state[1].dtype else torch.addcmul(c, f, state[1])
        h = torch.addcmul(o, o, torch.mul(c, -2).sigmoid_(), value=-2)
        return h, (h, c)
    h = _tanh(gates)
    return h, (h,)


# ---------------------------------------------------------------------------------------------------------------------
# Layers


class _RecurrentLayer(GradientCheckpointingLayer):
    """A torch recurrent layer (`nn.LSTM`/`nn.GRU`/`nn.RNN`, same parameters and state-dict keys) whose forward takes
    and returns tensors only, which is what activation checkpointing needs (transformers' `GradientCheckpointingLayer`
    recomputes it in the backward pass when `model.gradient_checkpointing_enable()` was called).

    forward(x, *hx, packed_meta=None): `x` is the input ``(B, T, in)``, or the data of a `PackedSequence` whose other
    fields are `packed_meta`; `hx` the initial state tensors ``(1, B, H)`` (none: zeros). Returns (output, or the
    packed output's data, *final states ``(1, B, H)``)."""

    def forward(self, x: torch.Tensor, *hx: torch.Tensor, packed_meta: tuple | None = None):
        inputs = PackedSequence(x, *packed_meta) if packed_meta is not None else x
        initial = None if not hx else (hx if isinstance(self, nn.LSTM) else hx[0])
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


_RNN_CLASSES = {"lstm": CharLSTMLSTMLayer, "gru": CharLSTMGRULayer, "rnn": CharLSTMRNNLayer}
# The layer classes whose forward the decoding step reproduces (exactly these: `CharLSTMModel._weights_in_place`).
_LAYER_CLASSES = frozenset(_RNN_CLASSES.values())


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


# ---------------------------------------------------------------------------------------------------------------------
# Models


class CharLSTMPreTrainedModel(PreTrainedModel):
    config_class = CharLSTMConfig
    config: CharLSTMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    # Activation checkpointing recomputes each recurrent layer's sequence kernel in the backward pass.
    supports_gradient_checkpointing = True
    # The recurrent state cannot be rolled back to an earlier token (no assisted generation).
    _is_stateful = True
    _no_split_modules = ["CharLSTMModel"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, with one-line errors for a local folder that is not a saved model and
        for a corrupted weights file."""
        path = os.fspath(pretrained_model_name_or_path) if pretrained_model_name_or_path is not None else None
        if path is not None and os.path.isdir(path):
            subfolder = kwargs.get("subfolder")
            folder = os.path.join(path, subfolder) if subfolder else path
            if not os.path.isfile(os.path.join(folder, CONFIG_NAME)) and kwargs.get("config") is None:
                raise OSError(
                    f"{folder} has no {CONFIG_NAME}: it is not a saved CharLSTM model "
                    "(save one with model.save_pretrained(folder))."
                )
            weights = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
            if not any(os.path.isfile(os.path.join(folder, name)) for name in weights):
                raise OSError(
                    f"{folder} has a config but no weights ({SAFE_WEIGHTS_NAME}): the save was incomplete; "
                    "save the model again with model.save_pretrained(folder)."
                )
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        except Exception as error:
            # safetensors' own error type, matched by name to keep this file's imports to torch and transformers
            if type(error).__name__ != "SafetensorError":
                raise
            raise OSError(
                f"The weights of {path} are corrupted or truncated ({error}); save or download the model again."
            ) from error

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`; config.json's `auto_map` lists every Auto class (`AUTO_MAP`)."""
        if getattr(self, "_auto_class", None) is not None:
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **AUTO_MAP}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        """Initialization, chosen by measurement: of the schemes tried, this one trained fastest in short runs
        (the validation losses: docs/design.md, "Weight init"):

        * recurrent layers: each gate's hidden-to-hidden block orthogonal (the state keeps its norm through time at
          the start, so gradients neither vanish nor explode across a window), input-to-hidden blocks Xavier-uniform,
          biases zero. `config.forget_bias` adds a constant to the LSTM forget gate (0 by default: +1.0 trained
          slower here);
        * embeddings N(0, `initializer_range`), 1.0 by default as in PyTorch;
        * output head U(-1/sqrt(H), 1/sqrt(H)) as in PyTorch, zero bias: the first predictions are close to uniform.
          A head tied to the embeddings gets this init too.
        """
        config = self.config
        if isinstance(module, nn.Embedding) and not config.tie_word_embeddings:
            init.normal_(module.weight, mean=0.0, std=config.initializer_range)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            bound = 1.0 / math.sqrt(config.hidden_size)
            init.uniform_(module.weight, -bound, bound)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.RNNBase):
            gates = config.num_gates
            hidden = module.hidden_size
            for name, param in module.named_parameters():
                if getattr(param, "_is_hf_initialized", False):
                    continue
                with torch.no_grad():
                    if name.startswith("weight_hh"):
                        for g in range(gates):
                            init.orthogonal_(param[g * hidden : (g + 1) * hidden])
                    elif name.startswith("weight_ih"):
                        for g in range(gates):
                            init.xavier_uniform_(param[g * hidden : (g + 1) * hidden])
                    elif name.startswith("bias"):
                        init.zeros_(param)
                        # PyTorch's LSTM gate order is (input, forget, cell, output); the forget bias goes in bias_ih.
                        if config.cell_type == "lstm" and name.startswith("bias_ih") and config.forget_bias:
                            param[hidden : 2 * hidden].fill_(config.forget_bias)


class CharLSTMModel(CharLSTMPreTrainedModel):
    """Embedding + stacked recurrent layers. Returns the last layer's outputs ``(B, T, H)`` (before dropout)."""

    def __init__(self, config: CharLSTMConfig):
        super().__init__(config)
        rnn_class = _RNN_CLASSES[config.cell_type]
        self.embeddings = nn.Embedding(config.vocab_size, config.embedding_size)
        self.layers = nn.ModuleList(
            rnn_class(
                config.embedding_size if idx == 0 else config.hidden_size,
                config.hidden_size,
                num_layers=1,
                batch_first=True,
            )
            for idx in range(config.num_hidden_layers)
        )
        self.dropout = CharLSTMDropout(config.dropout)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.embeddings = new_embeddings

    def _weights_in_place(self) -> bool:
        """Whether the one-token decoding step, which reads the layers' weights itself instead of calling the layers,
        may stand in for them. It may not, and the layers' own forward runs, when:

        * a forward hook or pre-hook is registered on a layer, or on every module (`register_module_forward_hook`):
          the step would never call it (hooks on the embeddings: `_decoding_table_ids`);
        * a layer is not one of this file's layer classes as written: wrapped (peft's LoRA on a parameter,
          `target_parameters`, puts the layer in a `ParamWrapper` whose forward applies the adapter), subclassed, or
          with a parametrized weight (`torch.nn.utils.parametrize` swaps the module's class; the weight is recomputed
          at every read, which the step's cached weights would not follow);
        * accelerate hooks manage the modules (a `device_map`, offloading: weights on `meta` until a hook brings them
          in around the module's forward).

        It runs at every decoding step, so it reads dicts and types only (`hasattr` on a module costs an exception
        when the attribute is missing)."""
        if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
            return False
        for layer in self.layers:
            if (
                type(layer) not in _LAYER_CLASSES
                or layer._forward_hooks
                or layer._forward_pre_hooks
                or "_hf_hook" in layer.__dict__  # accelerate's `add_hook_to_module` sets it as a plain attribute
            ):
                return False
        return "_hf_hook" not in self.embeddings.__dict__ and not self.layers[0].weight_hh_l0.is_meta

    def forget_decoding_weights(self) -> None:
        """Drop the decoding step's prepared weights (rebuilt at the next one-token step). Forward does it whenever a
        sequence goes through, and `generate()` at its start; call it after editing weights through `.data`, which
        their version counters do not see, if you decode token by token yourself without a prompt in between."""
        for rnn in self.layers:
            _STEP_WEIGHTS.pop(rnn, None)

    def _check_input_ids(self, input_ids: torch.Tensor) -> None:
        # The config's size, not the embedding module's: an adapter's wrapper (peft's LoRA `Embedding`) has no
        # `num_embeddings`, and `resize_token_embeddings` keeps `config.vocab_size` equal to the embedding's rows.
        vocab_size = self.config.vocab_size
        if input_ids.numel() == 0:
            return
        low, high = torch.aminmax(input_ids)
        if int(low) < 0 or int(high) >= vocab_size:  # two reductions: cheap enough for every decoding step
            bad = input_ids[(input_ids < 0) | (input_ids >= vocab_size)]
            raise ValueError(
                f"input_ids holds id {int(bad[0])}, outside [0, {vocab_size - 1}] (vocab_size={vocab_size}): "
                "the tokenizer does not match this model; load the tokenizer saved with it."
            )

    def _embed(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """(B, T, E) from exactly one of `input_ids` (checked against the vocabulary) and `inputs_embeds`."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            if not torch.compiler.is_compiling() and (input_ids.shape[1] > 1 or input_ids.device.type == "cpu"):
                self._check_input_ids(input_ids)
            inputs_embeds = self.embeddings(input_ids)
        if inputs_embeds.shape[1] == 0:
            raise ValueError(
                "The input has no tokens: give at least one character (an empty prompt has nothing to start from)."
            )
        return inputs_embeds

    def _decoding_table_ids(self, input_ids: torch.Tensor | None) -> torch.Tensor | None:
        """`input_ids` when the first layer can look its input projection up per character id (plain embeddings and a
        small enough ``(V, gates * H)`` table), else None. The table stands in for the embedding's output, so it is
        not used when that output may differ from a row of `embeddings.weight`: a wrapped embedding (peft's LoRA),
        a subclass, a parametrized weight (its class is swapped), `max_norm`, or a hook that may change the ids or
        the output (the embedding module still runs, in `_embed`, and its hooks with it)."""
        embeddings = self.embeddings
        if (
            input_ids is None
            or type(embeddings) is not nn.Embedding
            or embeddings.max_norm is not None
            or embeddings._forward_hooks
            or embeddings._forward_pre_hooks
        ):
            return None
        gates_width = self.config.num_gates * self.config.hidden_size
        return input_ids if embeddings.num_embeddings * gates_width <= _INPUT_TABLE_MAX_ELEMENTS else None

    def _decoding_step(self, layer_idx: int, x: torch.Tensor, initial: tuple | None, table_ids: torch.Tensor | None):
        """One token through layer `layer_idx` by the hand-written step: x (B, 1, in) -> ((B, 1, H), final states)."""
        first = layer_idx == 0 and table_ids is not None
        return _single_step(
            self.layers[layer_idx],
            self.config.cell_type,
            x,
            initial,
            input_ids=table_ids if first else None,
            embeddings=self.embeddings if first else None,
        )

    def _sequence_layer(self, layer_idx: int, x, initial: tuple | None, packing: "_Packing | None"):
        """Layer `layer_idx` over a sequence by the fused kernel: x (B, T, in), or a `PackedSequence` with `packing`,
        from `initial` ((B, H) each; None: zeros). Returns (output like x, final states ((B, H), ...)); a row without
        any real token keeps its initial state."""
        hx = ()
        if initial is not None:
            # (1, B, H) each. With autograd on, read a copy: the cache buffer is overwritten in place afterwards.
            hx = tuple((s.clone() if torch.is_grad_enabled() else s).unsqueeze(0) for s in initial)
        packed_meta = tuple(x)[1:] if packing is not None else None
        out, *final = self.layers[layer_idx](x.data if packed_meta else x, *hx, packed_meta=packed_meta)
        x = PackedSequence(out, *packed_meta) if packed_meta is not None else out
        final = tuple(s.squeeze(0) for s in final)  # (B, H) each
        if packing is not None and bool(packing.empty_rows.any()):
            start = initial if initial is not None else tuple(torch.zeros_like(s) for s in final)
            keep = packing.empty_rows.unsqueeze(-1)
            final = tuple(torch.where(keep, s0, s) for s0, s in zip(start, final))
        return x, final

    def _layers_forward(self, x, batch_size, cache, packing, fast_step, table_ids, all_hidden_states):
        """The layers over `x` (`(B, T, E)`, or packed when `packing`), each starting from its state in `cache` and
        writing its final state back, with dropout between layers. Returns the last layer's output and
        `all_hidden_states` with each layer's output added (when it is not None)."""
        for layer_idx in range(len(self.layers)):
            initial = _read_state(cache, layer_idx, self.config.number_of_conv_states) if cache is not None else None
            if initial is not None and initial[0].shape[0] != batch_size:
                raise ValueError(
                    f"The cache holds states for a batch of {initial[0].shape[0]} but the inputs have batch size "
                    f"{batch_size}; use a new `DynamicCache(config=model.config)` for a new batch."
                )
            if fast_step:
                x, final = self._decoding_step(layer_idx, x, initial, table_ids)
            else:
                x, final = self._sequence_layer(layer_idx, x, initial, packing)
            if cache is not None:
                _write_state(cache, layer_idx, final)
            if all_hidden_states is not None:
                all_hidden_states += (packing.unpack(x) if packing is not None else x,)
            if layer_idx < len(self.layers) - 1:
                if packing is not None:
                    x = PackedSequence(self.dropout(x.data), x.batch_sizes, x.sorted_indices, x.unsorted_indices)
                else:
                    x = self.dropout(x)
        return x, all_hidden_states

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> tuple | BaseModelOutputWithPast:
        r"""
        input_ids (`torch.LongTensor` of shape `(B, T)`): character ids (the new ones only when a cache is passed).
        attention_mask (`torch.Tensor` of shape `(B, T)` or `(B, past + T)`): 1 for real tokens, 0 for padding; only
            its last `T` columns are used (the cached state already absorbed the past).
        cache (`Cache`, *optional*): recurrent state to start from, updated in place with the final state. The old
            names `past_key_values=` and `cache_params=` are mapped to it with a deprecation warning.
        inputs_embeds (`torch.Tensor` of shape `(B, T, E)`): instead of `input_ids`.
        position_ids (keyword): ignored, as transformers' helpers pass them: an RNN has no positions (`_check_kwargs`).
        """
        if kwargs:
            cache = _check_kwargs(kwargs, frozenset(), type(self).__name__, cache)
        config = self.config
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else (config.use_cache and not self.training)
        return_dict = return_dict if return_dict is not None else config.return_dict

        inputs_embeds = self._embed(input_ids, inputs_embeds)
        batch_size, seq_len = inputs_embeds.shape[:2]

        cache = _cache_for_forward(cache, use_cache, config, len(self.layers))
        seen_before = _seen_tokens(cache)
        mask = attention_mask[:, -seq_len:] if attention_mask is not None else None
        packing = _Packing(mask) if mask is not None and not bool(mask.bool().all()) else None

        # Decoding one token without autograd (generation): a hand-fused step instead of the sequence kernel, whose
        # per-call cost dominates a single step (docs/benchmarks.md). Training and prompts keep the fused cuDNN/oneDNN
        # sequence kernels.
        fast_step = seq_len == 1 and packing is None and not torch.is_grad_enabled() and self._weights_in_place()
        if not fast_step:
            self.forget_decoding_weights()
        table_ids = self._decoding_table_ids(input_ids) if fast_step else None
        all_hidden_states = (inputs_embeds,) if output_hidden_states else None
        x = packing.pack(inputs_embeds) if packing is not None else inputs_embeds
        x, all_hidden_states = self._layers_forward(x, batch_size, cache, packing, fast_step, table_ids,
                                                    all_hidden_states)

        last_hidden_state = packing.unpack(x) if packing is not None else x
        if cache is not None:
            _set_seen_tokens(cache, seen_before + seq_len)
        if not return_dict:
            outputs = (last_hidden_state, cache if use_cache else None, all_hidden_states)
            return tuple(v for v in outputs if v is not None)
        return BaseModelOutputWithPast(
            last_hidden_state=last_hidden_state,
            cache=cache if use_cache else None,
            hidden_states=all_hidden_states,
        )


def _columns_to_feed(seen: int, input_ids, inputs_embeds, attention_mask) -> int:
    """How many of the last input columns a `generate()` continuing from a cache that has consumed `seen` columns
    must feed. As with key/value caches, the inputs are either the full sequence (the old columns, then the new ones)
    or only the new columns with an attention mask over the full sequence."""
    total = inputs_embeds.shape[1] if inputs_embeds is not None else input_ids.shape[1]
    mask_length = attention_mask.shape[1] if attention_mask is not None else total
    if mask_length > total:  # the new columns only: the mask covers the old ones too
        if mask_length != seen + total:
            raise ValueError(
                f"The cache has consumed {seen} tokens and {total} new ones were passed, but the attention mask has "
                f"{mask_length} columns (expected {seen + total}): pass the mask of the full sequence."
            )
        return total
    if total <= seen:
        raise ValueError(
            f"The cache has already consumed {seen} tokens but the input has {total}: pass the full sequence "
            "(the tokens generated so far followed by the new ones) together with the cache."
        )
    return total - seen


def _lean_plan(model: "CharLSTMForCausalLM", input_ids: torch.Tensor) -> tuple:
    """What `_lean_layers` and `_lean_head` need, read once per generate(): each layer's step weights, the cell type,
    the embedding module (None when the first layer looks its input projection up by id), the head's weight and
    bias."""
    use_table = model.model._decoding_table_ids(input_ids) is not None
    cell_type = model.config.cell_type
    weights = [
        _step_weights(rnn, cell_type, model.model.embeddings if idx == 0 and use_table else None)
        for idx, rnn in enumerate(model.model.layers)
    ]
    embeddings = None if use_table else model.model.embeddings
    if isinstance(model.lm_head, nn.AdaptiveLogSoftmaxWithLoss):
        return weights, cell_type, embeddings, model.lm_head.log_prob, None
    return weights, cell_type, embeddings, model.lm_head.weight, model.lm_head.bias


def _lean_layers(plan: tuple, tokens: torch.Tensor, states: list) -> torch.Tensor:
    """One token through the layers as forward computes it for a (B, 1) input in eval mode (dropout is the identity
    then): tokens (B,); `states` (one tuple per layer) updated in the list. Returns the last layer's output (B, H)."""
    weights, cell_type, embeddings, _, _ = plan
    x = embeddings(tokens) if embeddings is not None else None
    for layer_idx, layer_weights in enumerate(weights):
        ids = tokens if layer_idx == 0 and embeddings is None else None
        x, states[layer_idx] = _cell_step(layer_weights, cell_type, x, states[layer_idx], ids)
    return x


def _lean_head(plan: tuple, hidden: torch.Tensor) -> torch.Tensor:
    """The head's logits (B, V) in float32 from the last layer's output (B, H)."""
    _, _, _, head_weight, head_bias = plan
    # the adaptive softmax's full log-probabilities, or the linear head
    logits = head_weight(hidden) if callable(head_weight) else nn.functional.linear(hidden, head_weight, head_bias)
    return logits if logits.dtype == torch.float32 else logits.float()


def _lean_next_tokens(logits_processor, input_ids: torch.Tensor, logits: torch.Tensor, do_sample: bool):
    """The next token of each row (B,) as transformers' loop picks it from the logits (B, V) of sequences input_ids
    (B, T): the logits processors in turn, then a multinomial draw from the softmax, or the argmax."""
    scores = logits
    for processor in logits_processor:
        scores = processor(input_ids, scores)
    if do_sample:
        return torch.multinomial(nn.functional.softmax(scores, dim=-1), num_samples=1).squeeze(1)
    return torch.argmax(scores, dim=-1)


# The adaptive softmax's next token without its full distribution. Its log-probabilities are a head over the
# shortlist and one entry per cluster, plus each cluster's own log-softmax: log p(x) = head[c] + cluster_c[x] for a
# character x of cluster c. The full distribution (`log_prob`) and a draw over all of it (`torch.multinomial` draws
# one exponential variate per class) cost more than the recurrent step at 6k characters; a draw from the head and
# then, when it names a cluster, from that cluster alone costs a fraction of it.

_REJECTION_ROUNDS = 4  # of the draw below for temperatures <= 1; rows still without a token are drawn exactly


def _hierarchical_temperature(head: nn.Module, logits_processor, do_sample: bool) -> float | None:
    """How `_adaptive_next_tokens` may choose for an adaptive softmax `head`: 0.0 greedy (no logits processor), the
    temperature of sampling whose only processor is transformers' `TemperatureLogitsWarper` (1.0 with none), or None:
    the full distribution through the processors (any other processor, a linear head, or an adaptive one without the
    attributes read)."""
    if not isinstance(head, nn.AdaptiveLogSoftmaxWithLoss) or not all(
        hasattr(head, name) for name in ("head", "tail", "cutoffs", "shortlist_size")
    ):
        return None
    if not do_sample:
        return 0.0 if len(logits_processor) == 0 else None
    if len(logits_processor) == 0:
        return 1.0
    if len(logits_processor) > 1 or TemperatureLogitsWarper is None:
        return None
    processor = logits_processor[0]
    temperature = getattr(processor, "temperature", None)
    if type(processor) is not TemperatureLogitsWarper or not isinstance(temperature, (int, float)) or temperature <= 0:
        return None
    return float(temperature)


def _adaptive_argmax(head: nn.AdaptiveLogSoftmaxWithLoss, hidden: torch.Tensor) -> torch.Tensor:
    """The argmax of `head.log_prob(hidden)` (B, H) -> (B,), bit for bit (the same operations on the same rows), with a
    cluster computed only when its head entry beats the best shortlist character of some row: a character of cluster c
    scores head[c] + cluster_c[x] <= head[c]. Ties go to the lower id, as `torch.argmax` does."""
    head_log_prob = nn.functional.log_softmax(head.head(hidden), dim=1)
    shortlist = head.shortlist_size
    best = head_log_prob[:, :shortlist].argmax(dim=1)
    best_value = head_log_prob.gather(1, best.unsqueeze(1))
    if not bool((head_log_prob[:, shortlist:] > best_value).any()):
        return best
    best_value = best_value.squeeze(1)
    for cluster, (start, _) in enumerate(zip(head.cutoffs, head.cutoffs[1:])):
        bound = head_log_prob[:, shortlist + cluster]
        if not bool((bound > best_value).any()):
            continue
        log_prob = nn.functional.log_softmax(head.tail[cluster](hidden), dim=1) + bound.unsqueeze(1)
        index = log_prob.argmax(dim=1)
        value = log_prob.gather(1, index.unsqueeze(1)).squeeze(1)
        better = value > best_value
        best = torch.where(better, index + start, best)
        best_value = torch.where(better, value, best_value)
    return best


def _tempered_cluster(head: nn.AdaptiveLogSoftmaxWithLoss, hidden: torch.Tensor, cluster: int, temperature: float):
    """p(x|c)^(1/T) for the characters x of cluster c (rows, size of the cluster), in float32: their sum, the cluster's
    tempered mass, is <= 1 at temperatures <= 1."""
    log_prob = nn.functional.log_softmax(head.tail[cluster](hidden).float(), dim=1)
    return (log_prob / temperature).exp()


def _draw(weights: torch.Tensor) -> torch.Tensor:
    """One draw per row (R, n) -> (R,) with probabilities proportional to `weights` (>= 0, not normalized): the first
    cumulative weight above a uniform draw times the row's total (one random number per row)."""
    cumulative = weights.cumsum(dim=1)
    threshold = torch.rand(len(weights), 1, device=weights.device) * cumulative[:, -1:]
    return torch.searchsorted(cumulative, threshold, right=True).squeeze(1).clamp_(max=weights.shape[1] - 1)


def _draw_in_clusters(head, hidden, entries, rows, tokens, temperature, clusters=None) -> torch.Tensor:
    """For the rows (R,) whose head entry (R,) is a cluster: a character of that cluster into `tokens`. `clusters`:
    each cluster's `_tempered_cluster` for all rows of `hidden`, which are then kept; without them, each is computed
    for its rows, and a row keeps its character with probability the cluster's tempered mass (<= 1 at temperatures
    <= 1). Returns the rows that did not keep one."""
    rejected = []
    for cluster, (start, _) in enumerate(zip(head.cutoffs, head.cutoffs[1:])):
        picked = entries == head.shortlist_size + cluster
        if not bool(picked.any()):
            continue
        cluster_rows = rows[picked]
        if clusters is not None:
            tokens[cluster_rows] = _draw(clusters[cluster][cluster_rows]) + start
            continue
        weights = _tempered_cluster(head, hidden[cluster_rows], cluster, temperature)
        kept = torch.rand(len(cluster_rows), device=weights.device) < weights.sum(dim=1)
        rejected.append(cluster_rows[~kept])
        if bool(kept.any()):
            tokens[cluster_rows[kept]] = _draw(weights[kept]) + start
    return torch.cat(rejected) if rejected else rows[:0]


def _adaptive_sample(head: nn.AdaptiveLogSoftmaxWithLoss, hidden: torch.Tensor, temperature: float) -> torch.Tensor:
    """One draw per row (B, H) -> (B,) from softmax(head.log_prob(hidden) / temperature), exactly in distribution (not
    the draws of transformers' loop, which go through every class). A shortlist character or a cluster is drawn from
    the head's tempered probabilities, then a character from the cluster's tempered distribution. At temperatures <= 1
    that proposal is kept with probability the cluster's tempered mass sum_x p(x|c)^(1/T) (<= 1), which makes the draw
    exact; a rejected row draws again, and after a few rounds exactly from all clusters (what higher temperatures do
    at once: each cluster's head entry then carries the cluster's tempered mass)."""
    head_weights = nn.functional.softmax(head.head(hidden).float() / temperature, dim=1)
    shortlist = head.shortlist_size
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    tokens = None
    for _ in range(_REJECTION_ROUNDS if temperature <= 1 else 0):
        entries = _draw(head_weights if tokens is None else head_weights[rows])
        if tokens is None:  # the first round: every row drew, most often a shortlist character
            if not bool((entries >= shortlist).any()):
                return entries
            tokens = entries.clone()
        else:
            tokens[rows] = entries  # the shortlist's characters; the clusters' are drawn next
        rows = _draw_in_clusters(head, hidden, entries, rows, tokens, temperature)
        if not len(rows):
            return tokens
    if tokens is None:
        tokens = torch.empty(hidden.shape[0], dtype=torch.long, device=hidden.device)
    hidden, head_weights = hidden[rows], head_weights[rows]
    clusters = [_tempered_cluster(head, hidden, cluster, temperature) for cluster in range(len(head.tail))]
    masses = torch.stack([weights.sum(dim=1) for weights in clusters], dim=1)
    entries = _draw(torch.cat([head_weights[:, :shortlist], head_weights[:, shortlist:] * masses], dim=1))
    drawn = entries.clone()
    _draw_in_clusters(head, hidden, entries, torch.arange(len(rows), device=rows.device), drawn, temperature, clusters)
    tokens[rows] = drawn
    return tokens


def _adaptive_next_tokens(head: nn.AdaptiveLogSoftmaxWithLoss, hidden: torch.Tensor, temperature: float):
    """The next token of each row (B,) from the last layer's output (B, H): temperature 0.0 is greedy
    (`_hierarchical_temperature`)."""
    return _adaptive_argmax(head, hidden) if temperature == 0.0 else _adaptive_sample(head, hidden, temperature)


# ---------------------------------------------------------------------------------------------------------------------
# transformers' private generation internals as verified (transformers 5.24-5.25). The lean decoding loop and the
# one-token preparation use them only where they are so; elsewhere transformers' own code runs (docs/design.md).

_MISSING = object()


def _verified_sample(self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                     streamer=None, **model_kwargs):
    """The parameters of `GenerationMixin._sample` as verified; called with `_sample`'s arguments, it names them."""
    return input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus, streamer, model_kwargs


def _verified_prefill(self, input_ids, generation_config, model_kwargs, is_first_iteration=True):
    """The parameters of `GenerationMixin._prefill` as verified: the lean loop calls it so, for the prompt."""


def _verified_prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, cache=None,
                                            attention_mask=None, inputs_embeds=None, is_first_iteration=False,
                                            **kwargs):
    """The parameters of `GenerationMixin.prepare_inputs_for_generation` as verified."""


def _verified_max_length_criteria(self, max_length, max_position_embeddings=None):
    """The parameters of `MaxLengthCriteria.__init__` as verified (it keeps both as attributes)."""


def _verified_max_length_call(self, input_ids, scores, **kwargs):
    """The parameters of `MaxLengthCriteria.__call__` as verified."""


def _with_parameters_of(function):
    """A decorator: `inspect.signature` of the decorated function shows the parameters of `function` (its
    `__wrapped__`; name and docstring kept), where `function` exists."""
    return functools.wraps(function, assigned=()) if function is not None else (lambda decorated: decorated)


def _lean_internals_verified(transformers_sample, prefill) -> bool:
    """Whether transformers' `_sample` (the loop the lean one stands in for: generate() calls `_sample` with its
    arguments) and `_prefill` take the parameters verified here. Cached per function object (`_parameters`)."""
    return _parameters(transformers_sample) == _parameters(_verified_sample) and _parameters(prefill) == _parameters(
        _verified_prefill
    )


def _plain_max_length(criteria) -> int | None:
    """The length at which `criteria` stops every row, when it is a plain `MaxLengthCriteria` as verified (exactly
    that class, its methods' parameters, `max_length` an int and `max_position_embeddings` None: its call is then
    `input_ids.shape[1] >= max_length` for every row); else None, and the lean loop calls it as transformers does."""
    if MaxLengthCriteria is None or type(criteria) is not MaxLengthCriteria:
        return None
    if _parameters(MaxLengthCriteria.__init__) != _parameters(_verified_max_length_criteria) or _parameters(
        MaxLengthCriteria.__call__
    ) != _parameters(_verified_max_length_call):
        return None
    attributes = vars(criteria)
    max_length = attributes.get("max_length")
    if attributes.get("max_position_embeddings", _MISSING) is not None or type(max_length) is not int:
        return None
    return max_length


def _split_stopping_criteria(stopping_criteria) -> tuple[int | None, list]:
    """(the smallest length of the plain length criteria among `stopping_criteria`, or None; the other criteria)."""
    max_length, others = None, []
    for criteria in stopping_criteria:
        length = _plain_max_length(criteria)
        if length is None:
            others.append(criteria)
        else:
            max_length = length if max_length is None else min(max_length, length)
    return max_length, others


def _is_token_id(value, vocab_size: int) -> bool:
    """Whether `value` is an integer tensor of one id in [0, vocab_size), as transformers' `_pad_token_tensor` is."""
    return (
        isinstance(value, torch.Tensor)
        and value.numel() == 1
        and not value.is_floating_point()
        and not value.is_complex()
        and 0 <= int(value) < vocab_size
    )


def _causal_lm_loss(nll: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """The loss from the negative log-likelihoods of the scored positions, reduced as transformers' causal-LM loss: a
    sum over `num_items_in_batch` when Trainer passes it, else the mean."""
    if num_items_in_batch is not None:
        return nll.sum() / torch.as_tensor(num_items_in_batch, device=nll.device)
    return nll.mean()


class CharLSTMForCausalLM(CharLSTMPreTrainedModel, GenerationMixin):
    """CharLSTMModel + dropout + a linear head over the vocabulary."""

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: CharLSTMConfig):
        super().__init__(config)
        self.model = CharLSTMModel(config)
        self.dropout = CharLSTMDropout(config.dropout)
        if getattr(config, "adaptive_softmax_cutoffs", None):
            # the most frequent ids get the full layer, each cluster of rarer ones a narrower projection
            self.lm_head = nn.AdaptiveLogSoftmaxWithLoss(
                config.hidden_size, config.vocab_size, config.adaptive_softmax_cutoffs,
                div_value=config.adaptive_softmax_div_value, head_bias=True,
            )
        else:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embeddings

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.model.embeddings = new_embeddings

    def get_output_embeddings(self) -> nn.Linear | None:
        # an adaptive softmax has no one matrix over the vocabulary to tie or resize
        return self.lm_head if isinstance(self.lm_head, nn.Linear) else None

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    @functools.wraps(GenerationMixin.generate)
    def generate(self, *args, **kwargs):
        # A cache that has consumed tokens continues a generation: marked for `prepare_inputs_for_generation`.
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if isinstance(cache, Cache):
            setattr(cache, _RESUME_PENDING_ATTR, bool(_seen_tokens(cache)))
        kwargs.update(self._settings_transformers_cannot_carry_out(args, kwargs, cache))
        return super().generate(*args, **kwargs)

    def _settings_transformers_cannot_carry_out(self, args: tuple, kwargs: dict, cache) -> dict:
        """The generate() settings that the installed transformers cannot carry out for this model, each replaced by
        one that gives the same sequences (said in a warning); {} on transformers 5.25:

        * its cache layers lack what this file reads and writes (`_cache_layout_problem`): `use_cache=False`, every
          token computed from the start (a cache the user passed gets forward's error instead);
        * `prefill_chunk_size` where its cache cannot count a recurrent state's tokens (5.24: `get_seq_length()`
          refuses a cache of recurrent-state layers only, and its chunked prefill calls it): the prompt in one piece.
        """
        changes = {}
        fresh, problem = _new_cache(self.config)
        if problem is not None and cache is None and kwargs.get("use_cache") is not False:
            changes["use_cache"] = False
            warnings.warn(
                f"The recurrent-state cache of this transformers ({transformers_version}) {problem}: generate() runs "
                "without a cache, each token from the start (the same sequences, slower).", stacklevel=3)
        config = kwargs.get("generation_config") or (args[1] if len(args) > 1 else None) or self.generation_config
        chunk = kwargs["prefill_chunk_size"] if "prefill_chunk_size" in kwargs else getattr(
            config, "prefill_chunk_size", None)
        if chunk is not None and fresh is not None and not _counts_tokens(fresh):
            changes["prefill_chunk_size"] = None
            warnings.warn(
                f"transformers {transformers_version} cannot cut the prompt into chunks for a recurrent-state cache "
                "(its get_seq_length() refuses one): prefill_chunk_size is ignored, the prompt goes in whole (the "
                "same sequences).", stacklevel=3)
        return changes

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ):
        for name in _GENERATE_ONLY_KWARGS:  # generate() passes them on to here; they are not the model's inputs
            kwargs.pop(name, None)
        transformers_prepare = super().prepare_inputs_for_generation
        verified = _parameters(getattr(transformers_prepare, "__func__", None)) == _parameters(
            _verified_prepare_inputs_for_generation
        )
        if verified and not is_first_iteration and cache is not None and next_sequence_length is not None:
            # Every step after the prompt needs only the new token(s) and the state: no mask (padding is already
            # absorbed in the state), no positions. Building them here skips transformers' generic preparation, which
            # costs about half a model step per token on a CPU (for a model registered with the Auto classes it
            # inspects `forward`'s signature on every call; docs/benchmarks.md).
            new_ids = input_ids[:, -next_sequence_length:]
            # the embeddings read the ids (the head may hold no `weight`: a quantized or adapted Linear)
            device = self.model.embeddings.weight.device
            if device.type != "meta" and new_ids.device != device:  # as transformers does (meta: offloaded weights)
                new_ids = new_ids.to(device)
            model_inputs = {"input_ids": new_ids, "cache": cache}
            model_inputs.update((k, v) for k, v in kwargs.items() if k != "labels" and v is not None)
            model_inputs["attention_mask"] = None
            return model_inputs
        if is_first_iteration and getattr(cache, _RESUME_PENDING_ATTR, False):
            # Continuing from a returned cache, decided here whatever transformers passed (5.24: None for a recurrent
            # cache; 5.25: from `cache.get_seq_length()`, right only through `_set_seen_tokens`). Once per call: the
            # prompt chunks of `prefill_chunk_size` after the first come already cut, with no mask when it is all ones.
            setattr(cache, _RESUME_PENDING_ATTR, False)
            next_sequence_length = _columns_to_feed(_seen_tokens(cache), input_ids, inputs_embeds, attention_mask)
        if is_first_iteration:
            self.model.forget_decoding_weights()  # a new generate(): weights may have been edited in between
        # Only what was given: where transformers renamed a parameter, a default passed under the old name would
        # reach forward as an unknown input.
        given = dict(next_sequence_length=next_sequence_length, cache=cache, attention_mask=attention_mask,
                     inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration)
        given = {name: value for name, value in given.items() if value is not None and value is not False}
        return transformers_prepare(input_ids, **given, **kwargs)

    # -----------------------------------------------------------------------------------------------------------------
    # generate()'s sampling and greedy loop, lean on a CPU

    def _lean_decoding_possible(self, logits_processor, generation_config, synced_gpus: bool, model_kwargs) -> bool:
        """Whether `_sample` may run its lean loop: plain sampling or greedy search on a CPU in eval mode, returning
        only the sequences, every module in eval mode, a plain embedding and head, no hooks, `forward` neither wrapped
        nor compiled, no autocast, a pad id as verified (`_pad_token_tensor`: None or one id of the vocabulary), and
        logits processors that take no extra arguments. Anything else (scores or a cache to return, several devices,
        a GPU, dropout on, a model prepared by accelerate for mixed precision) runs transformers' own loop."""
        if (
            synced_gpus
            or torch.is_grad_enabled()
            or torch.is_autocast_enabled("cpu")  # a user's autocast: the cache keeps bf16 states between steps
            # a subclass, an adapter: its forward runs in forward
            or type(self.lm_head) not in (nn.Linear, nn.AdaptiveLogSoftmaxWithLoss)
            or type(self.model.embeddings) is not nn.Embedding
            or getattr(self, "_compiled_call_impl", None) is not None  # model.compile(): the compiled forward
            or generation_config.return_dict_in_generate
            or getattr(generation_config, "is_assistant", False)
            or not model_kwargs.get("use_cache", True)
            or self.model.embeddings.weight.device.type != "cpu"
            or not self.model._weights_in_place()
            or "forward" in self.__dict__  # wrapped on the instance (accelerate's autocast for mixed precision...)
            or nn.modules.module._global_forward_hooks
            or nn.modules.module._global_forward_pre_hooks
            # dropout on in any module (MC dropout sampling), or a hook that expects to see the calls
            or any(module.training or module._forward_hooks or module._forward_pre_hooks for module in self.modules())
        ):
            return False
        # transformers' pad id for finished rows (set by generate(); absent: another transformers' layout)
        pad = getattr(generation_config, "_pad_token_tensor", _MISSING)
        if pad is not None and not _is_token_id(pad, self.config.vocab_size):
            return False  # not as verified, or a pad id the model cannot read: forward's own error, in that loop
        # LogitsProcessorList passes no keyword arguments here: it would refuse a processor that needs some.
        return all(len(inspect.signature(processor.__call__).parameters) <= 2 for processor in logits_processor)

    @_with_parameters_of(getattr(GenerationMixin, "_sample", None))
    def _sample(self, *args, **kwargs):
        """generate()'s loop for sampling and greedy search. On a CPU, per token, transformers' own loop costs about
        as much as this model's step (it inspects every logits processor's signature, builds the stopping criteria's
        tensors and the model's output objects, goes through the cache); the lean loop (`_lean_sample`) does the same
        arithmetic, in the same order, with the same random draws, so its sequences are those of transformers' loop
        (tested), except where an adaptive softmax samples with a temperature alone: it then draws a cluster and a
        character of it (`_adaptive_sample`: the same distribution, other draws) instead of going through every
        class. It runs where the transformers internals it leans on are as verified (`_lean_internals_verified`:
        this method's parameters and `_prefill`'s) and it covers the call (`_lean_decoding_possible`); anything else
        goes to transformers' loop with the arguments as they came (`__wrapped__` shows generate() the installed
        `_sample`'s parameters, so it passes what that loop takes)."""
        transformers_sample = super()._sample
        prefill = getattr(type(self), "_prefill", None)
        if _lean_internals_verified(getattr(transformers_sample, "__func__", None), prefill):
            arguments = _verified_sample(self, *args, **kwargs)
            input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus, streamer, model_kwargs = (
                arguments
            )
            if self._lean_decoding_possible(logits_processor, generation_config, synced_gpus, model_kwargs):
                return self._lean_sample(input_ids, logits_processor, stopping_criteria, generation_config, streamer,
                                         model_kwargs)
        return transformers_sample(*args, **kwargs)

    def _lean_sample(self, input_ids, logits_processor, stopping_criteria, generation_config, streamer, model_kwargs):
        """The lean loop: the prompt through `forward` (transformers' `_prefill`, which also cuts a continued
        sequence), then per token the logits processors and the draw (`_lean_next_tokens`, or `_adaptive_next_tokens`),
        the stopping criteria and the streamer in transformers' order, and the model's step (`_lean_layers`,
        `_lean_head`). input_ids (B, T) -> the sequences (B, T + new tokens)."""
        pad_token_id = generation_config._pad_token_tensor  # as verified in `_lean_decoding_possible`
        if pad_token_id is not None:
            pad_token_id = pad_token_id.to(input_ids.device)
        has_eos_stopping_criteria = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
        max_length, other_criteria = _split_stopping_criteria(stopping_criteria)
        unfinished_sequences = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)

        outputs = self._prefill(input_ids, generation_config, model_kwargs, is_first_iteration=True)
        logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=input_ids.device)
        cache = outputs.cache  # the cache transformers' loop goes on with (its model_kwargs["cache"])
        del outputs
        num_states = self.config.number_of_conv_states
        states = [_read_state(cache, layer_idx, num_states) for layer_idx in range(len(self.model.layers))]
        seen, steps = _seen_tokens(cache), 0
        plan = _lean_plan(self, input_ids)
        temperature = _hierarchical_temperature(self.lm_head, logits_processor, generation_config.do_sample)
        hidden = None  # the first token comes from the prompt's logits, the next from hidden where temperature allows
        # The sequences grow in one buffer (a view of its first columns is input_ids), not by a copy per token.
        length = input_ids.shape[1]
        buffer = input_ids.new_empty(input_ids.shape[0], max(max_length or 0, length + 64))
        buffer[:, :length] = input_ids
        try:
            while True:
                if hidden is not None and temperature is not None:
                    next_tokens = _adaptive_next_tokens(self.lm_head, hidden, temperature)
                else:
                    next_tokens = _lean_next_tokens(logits_processor, input_ids, logits, generation_config.do_sample)
                if has_eos_stopping_criteria:
                    next_tokens = next_tokens * unfinished_sequences + pad_token_id * (1 - unfinished_sequences)
                if length == buffer.shape[1]:  # no max_length: twice the room
                    buffer = torch.cat([buffer, torch.empty_like(buffer)], dim=1)
                buffer[:, length] = next_tokens
                length += 1
                input_ids = buffer[:, :length]
                # As transformers' loop: every criterion at every step, then the streamer, then the stop test.
                for criteria in other_criteria:
                    unfinished_sequences = unfinished_sequences & ~criteria(input_ids, None)
                if streamer is not None:
                    streamer.put(next_tokens.cpu())
                if max_length is not None and length >= max_length:
                    break
                if other_criteria and bool(unfinished_sequences.max() == 0):
                    break
                hidden = _lean_layers(plan, next_tokens, states)
                steps += 1  # the states now hold this token, as the cache's count does in forward
                if temperature is None:
                    logits = _lean_head(plan, hidden)
        finally:
            # The cache holds what transformers' loop leaves in it: the state after the last token fed to the model.
            for layer_idx, state in enumerate(states):
                _write_state(cache, layer_idx, state)
            _set_seen_tokens(cache, seen + steps)
        if streamer is not None:
            streamer.end()
        return input_ids.contiguous()

    def _adaptive_head(self, hidden: torch.Tensor, labels: torch.Tensor | None, shift_labels=None,
                       num_items_in_batch=None, ignore_index: int = -100):
        """(logits, loss) of the adaptive softmax head from the last hidden states (B, T, H). Training with labels:
        only the clusters of the targets are computed (the head's own loss path) and no logits are returned (None);
        otherwise the logits are the full log-probabilities (B, T, V) and the loss, when asked for, their negative at
        the targets. The loss is reduced as transformers' causal-LM loss (a sum over `num_items_in_batch` when
        Trainer passes it, else the mean)."""
        if labels is not None and self.training and torch.is_grad_enabled():
            if shift_labels is None:
                hidden, shift_labels = hidden[:, :-1], labels[:, 1:]
            targets = shift_labels.reshape(-1).to(hidden.device)
            keep = targets != ignore_index
            nll = -self.lm_head(hidden.reshape(-1, hidden.shape[-1])[keep], targets[keep]).output
            return None, _causal_lm_loss(nll, num_items_in_batch)
        batch, length = hidden.shape[:2]
        logits = self.lm_head.log_prob(hidden.reshape(batch * length, -1)).view(batch, length, -1)
        loss = None
        if labels is not None:  # the log-probabilities at the targets: no second log-softmax over the vocabulary
            if shift_labels is None:
                shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[:, 1:]
            targets = shift_labels.to(logits.device)
            keep = targets != ignore_index
            nll = -logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)[keep]
            loss = _causal_lm_loss(nll, num_items_in_batch)
        return logits, loss

    def _target_log_probs(self, hidden: torch.Tensor, labels: torch.Tensor | None, shift_labels=None,
                         num_items_in_batch=None, ignore_index: int = -100):
        """(log-probabilities of the labels (B, T) in float32, loss) from the last hidden states (B, T, H), for
        `logits_at_targets=True`: an adaptive softmax computes its head and the labels' clusters only (the head's own
        target path), a linear head its logits. Positions without a label get 0. The loss is reduced as
        transformers' causal-LM loss."""
        if shift_labels is None:
            if labels is None:
                raise ValueError("logits_at_targets=True needs labels (or shift_labels): it returns the "
                                 "log-probabilities of the labels.")
            shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[:, 1:]
        targets = shift_labels.to(hidden.device)
        keep = targets != ignore_index
        if isinstance(self.lm_head, nn.AdaptiveLogSoftmaxWithLoss):
            log_probs = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
            if labels is not None and bool(keep[:, :-1].all()):  # every position but the last: no gather
                log_probs[:, :-1] = self.lm_head(hidden[:, :-1].reshape(-1, hidden.shape[-1]),
                                                 targets[:, :-1].reshape(-1)).output.view(-1, targets.shape[1] - 1)
            else:
                log_probs[keep] = self.lm_head(hidden[keep], targets[keep]).output.float()
        else:
            log_probs = -nn.functional.cross_entropy(self.lm_head(hidden).float().transpose(1, 2), targets,
                                                     ignore_index=ignore_index, reduction="none")
        return log_probs, _causal_lm_loss(-log_probs[keep], num_items_in_batch)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        logits_at_targets: bool = False,
        **kwargs,
    ) -> tuple | CausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(B, T)`, *optional*): targets for the loss. As everywhere in transformers
            they are shifted inside the model: pass `labels=input_ids`. Positions set to -100 are ignored.
        logits_to_keep (`int` or `torch.Tensor`): compute logits only for the last `logits_to_keep` positions (0: all).
        logits_at_targets (`bool`, *optional*): return as `logits` only each position's log-probability of its target
            (the next label), of shape `(B, T)` (0 where there is none: the last position, -100), not the `(B, T, V)`
            scores: an adaptive softmax then computes only the targets' clusters (what evaluation needs). Needs
            `labels` (or `shift_labels`). (Not named with "label": Trainer takes such parameters for label columns.)
        position_ids (keyword): accepted and ignored, as in `CharLSTMModel.forward`.

        Returns `CausalLMOutputWithPast` with `logits` of shape `(B, T, V)` and `cache` holding the final state.
        Keyword arguments of transformers' loss (`num_items_in_batch`, `shift_labels`, `ignore_index`) are passed to
        it; any other is an error.
        """
        if kwargs:
            cache = _check_kwargs(kwargs, _LOSS_KWARGS, type(self).__name__, cache)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        if logits_at_targets:
            logits, loss = self._target_log_probs(self.dropout(hidden_states), labels, **kwargs)
        elif isinstance(self.lm_head, nn.AdaptiveLogSoftmaxWithLoss):
            logits, loss = self._adaptive_head(self.dropout(hidden_states), labels, **kwargs)
        else:
            logits = self.lm_head(self.dropout(hidden_states))
            loss = None
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        if not return_dict:
            output = tuple(v for v in (logits, outputs.cache, outputs.hidden_states) if v is not None)
            return (loss,) + output if loss is not None else output
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
        )


__all__ = [
    "CharLSTMForCausalLM",
    "CharLSTMModel",
    "CharLSTMPreTrainedModel",
    "cache_from_states",
    "cache_states",
    "detach_cache",
    "reset_cache_rows",
]
