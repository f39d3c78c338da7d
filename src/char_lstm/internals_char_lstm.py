"""The private parts of transformers (and torch) the CharLSTM model leans on, as verified, in one place.

This file is shipped to the Hub with `modeling_char_lstm.py` (``trust_remote_code``) and imports only the standard
library, torch and transformers. The model's fast paths (the lean decoding loop, the one-token preparation, the cache
layout, oneDNN's prepacked products) use an internal only where it is exactly as described here: each is checked at
run time by the signatures and attributes read (`_parameters`), not by a version number, and where a check fails
transformers' or torch's own code runs, with the same sequences. The table in docs/design.md ("transformers'
internals") lists each one, what it is used for, and what happens when it changes.
"""

import functools
import inspect

import torch
from torch import nn


# The imports of private parts: a release without them still imports this file; the code that uses them checks for
# them and steps aside.
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




# ---------------------------------------------------------------------------------------------------------------------
# The cache's methods as verified (transformers 5.24-5.25): `cache_char_lstm` reads and writes the states through them


def _verified_update_recurrent_state(self, recurrent_states, layer_idx, state_idx=0, **kwargs):
    """The parameters of `Cache.update_recurrent_state` as verified: each state is written through it."""


def _verified_get_recurrent_state(self, layer_idx, state_idx=0):
    """The parameters of `Cache.get_recurrent_state` as verified: each state is read through it (None: no state)."""


def _verified_has_previous_state(self, layer_idx=None, state_idx=None):
    """The parameters of `Cache.has_previous_state` as verified: whether a layer's states were written."""


# ---------------------------------------------------------------------------------------------------------------------
# generate()'s internals as verified (transformers 5.24-5.25): the lean decoding loop and the one-token preparation
# use them only where they are so


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


# ---------------------------------------------------------------------------------------------------------------------
# torch's private oneDNN ops, for the decoding step's products on a CPU (`step_char_lstm._StepLinear`)


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
