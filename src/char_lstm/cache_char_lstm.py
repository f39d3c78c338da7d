"""The recurrent state of every CharLSTM layer in transformers' cache: reading, writing, checking, saving.

This file is shipped to the Hub with `modeling_char_lstm.py` (``trust_remote_code``) and imports only the standard
library, torch, transformers and its siblings.

Every recurrent layer has a `LinearAttentionLayer` in transformers' `DynamicCache` (built by
`DynamicCache(config=model.config)`, which `generate()` does on its own), holding ``(h, c)`` for an LSTM or ``h`` for a
GRU/RNN, each of shape ``(B, H)``. The states are read and written through the cache's public methods
(`get_recurrent_state`, `update_recurrent_state`, `has_previous_state`); what no public method does (flagging a state
as present, the layer's device for beam search, detaching or zeroing rows in place) writes the layer's fields, which
`_cache_layout_problem` checks first.
"""

import warnings

import torch
from transformers import __version__ as transformers_version
from transformers.cache_utils import Cache, DynamicCache

from .configuration_char_lstm import CharLSTMConfig
from .internals_char_lstm import (
    LinearAttentionCacheLayerMixin,
    _parameters,
    _verified_get_recurrent_state,
    _verified_has_previous_state,
    _verified_update_recurrent_state,
)


# The cache's public methods this file calls, and their parameters as verified (for the one-line problem)
_VERIFIED_METHODS = {
    "get_recurrent_state": _verified_get_recurrent_state,
    "update_recurrent_state": _verified_update_recurrent_state,
    "has_previous_state": _verified_has_previous_state,
}
_SIGNATURES = {
    "get_recurrent_state": "(layer_idx, state_idx=...)",
    "update_recurrent_state": "(recurrent_states, layer_idx, state_idx=...)",
    "has_previous_state": "(layer_idx=..., state_idx=...)",
}

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


def _cache_layout_problem(cache: Cache, num_states: int) -> str | None:
    """What `cache` lacks of what this file reads and writes, in a few words, or None: a
    `LinearAttentionCacheLayerMixin` per layer with its `recurrent_states` and `has_previous_state` dicts (the states
    and their flags, by state index), and the cache's public `get_recurrent_state(layer_idx, state_idx=)`,
    `update_recurrent_state(states, layer_idx, state_idx=)` and `has_previous_state(layer_idx=, state_idx=)`.
    transformers 5.24-5.25 have all of it; a release that changed it gets generate() without a cache (the same
    sequences, computed again from the start at every token) rather than an error deep in the model."""
    if LinearAttentionCacheLayerMixin is None:
        return "has no LinearAttentionCacheLayerMixin layers"
    for name, verified in _VERIFIED_METHODS.items():
        if _parameters(getattr(type(cache), name, None)) != _parameters(verified):
            return f"has no {name}{_SIGNATURES[name]}"
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
    states = tuple(cache.get_recurrent_state(layer_idx, state_idx) for state_idx in range(num_states))
    return None if any(state is None for state in states) else states


def _write_state(cache: Cache, layer_idx: int, states: tuple[torch.Tensor, ...]) -> None:
    """Store `states` ``((B, H), ...)`` as the state of layer `layer_idx` (through `update_recurrent_state`)."""
    layer = cache.layers[layer_idx]
    for state_idx, state in enumerate(states):
        cache.update_recurrent_state(state, layer_idx, state_idx=state_idx)
        # The two fields written by hand, for want of a public method. transformers flags a state as present only
        # when a conv state is written; this model has recurrent states only, so it flags them itself (`reset()`
        # clears the flags again).
        layer.has_previous_state[state_idx] = True
    # `reorder_cache` (beam search) moves the beam indices to `layer.device`, which is otherwise set by conv states.
    layer.device = states[0].device


def _seen_tokens(cache: Cache | None) -> int:
    """How many input columns the states of `cache` have consumed (0 for a new or reset cache)."""
    if cache is None or len(getattr(cache, "layers", ())) == 0:
        return 0
    try:
        written = any(cache.has_previous_state(0, i) for i in getattr(cache.layers[0], "recurrent_states", {}))
    except (ValueError, TypeError, AttributeError, KeyError):  # not a recurrent-state cache: forward says so
        return 0
    return getattr(cache, _SEEN_TOKENS_ATTR, 0) if written else 0


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
    for layer_idx, layer in enumerate(cache.layers):
        indices = sorted(getattr(layer, "recurrent_states", {}))  # the written ones: (h, c), (h,), ...
        state = [cache.get_recurrent_state(layer_idx, i) for i in indices if cache.has_previous_state(layer_idx, i)]
        if not state:
            return None
        states.append(tuple(s.detach() for s in state))
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
# The cache a forward call is given: `cache=`, or one of its old names; no keyword argument ignored silently


# Keyword arguments `CharLSTMForCausalLM.forward` hands to transformers' causal-LM loss (Trainer passes
# `num_items_in_batch`; stateful training passes `shift_labels`). Any other unknown keyword is an error.
_LOSS_KWARGS = frozenset({"num_items_in_batch", "ignore_index", "shift_labels"})
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


__all__ = ["cache_from_states", "cache_states", "detach_cache", "reset_cache_rows"]
