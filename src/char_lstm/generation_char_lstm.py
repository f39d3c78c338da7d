"""generate() for CharLSTM: continuing from a returned cache, the one-token inputs, and the lean decoding loop.

This file is shipped to the Hub with `modeling_char_lstm.py` (``trust_remote_code``) and imports only the standard
library, torch, transformers and its siblings. `CharLSTMGenerationMixin` is transformers' `GenerationMixin` with
methods of its own, which `CharLSTMForCausalLM` inherits:

* `generate`: marks a cache that has consumed tokens (a continued generation feeds only the new columns), and
  replaces the settings this transformers cannot carry out for a recurrent-state cache by equivalent ones;
* `prepare_inputs_for_generation`: every step after the prompt needs only the new token and the state;
* `_sample`: on a CPU, sampling and greedy search run the lean loop (`_lean_sample`: the same arithmetic, order and
  random draws as transformers' loop without its per-token overhead; docs/design.md, "The decoding loop") where the
  transformers internals it leans on are as verified (`internals_char_lstm`); anything else runs transformers' loop.

Shapes: ``B`` batch, ``T`` sequence length, ``H`` hidden size, ``V`` vocabulary size.
"""

import functools
import inspect
import warnings

import torch
from torch import nn
from transformers import GenerationMixin
from transformers import __version__ as transformers_version
from transformers.cache_utils import Cache

from .cache_char_lstm import (
    _RESUME_PENDING_ATTR,
    _counts_tokens,
    _new_cache,
    _read_state,
    _seen_tokens,
    _set_seen_tokens,
    _write_state,
)
from .cells_char_lstm import cell_type_of
from .heads_char_lstm import _adaptive_next_tokens, _hierarchical_temperature
from .internals_char_lstm import (
    _MISSING,
    _is_token_id,
    _lean_internals_verified,
    _parameters,
    _split_stopping_criteria,
    _verified_prepare_inputs_for_generation,
    _verified_sample,
    _with_parameters_of,
)
from .step_char_lstm import _decoding_table_ids, _step_weights, _StepLinear, _weights_in_place


# Keyword arguments of generate() that transformers 5.24 passes on to the decoding loop with the model's own
# (`stop_strings=` needs `tokenizer=`); the model never reads them.
_GENERATE_ONLY_KWARGS = ("tokenizer", "assistant_tokenizer")


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


# ---------------------------------------------------------------------------------------------------------------------
# The lean loop's model step: the layers' one-token steps and the head, their weights read once per generate()


def _lean_plan(model, input_ids: torch.Tensor) -> tuple:
    """What `_lean_layers` and `_lean_head` need, read once per generate(): each layer's step weights, the cell (its
    registry entry), the embedding module (None when the first layer looks its input projection up by id), and the
    head: a linear one's product as the layers' (`_StepLinear`: on a CPU, oneDNN's prepacked product, whose rows do not
    depend on the batch they are in, which serving needs: docs/serving.md), an adaptive one's `log_prob`."""
    use_table = _decoding_table_ids(model.model, input_ids) is not None
    cell = cell_type_of(model.config.cell_type)
    weights = [
        _step_weights(rnn, cell, model.model.embeddings if idx == 0 and use_table else None)
        for idx, rnn in enumerate(model.model.layers)
    ]
    embeddings = None if use_table else model.model.embeddings
    if isinstance(model.lm_head, nn.AdaptiveLogSoftmaxWithLoss):
        return weights, cell, embeddings, model.lm_head.log_prob
    return weights, cell, embeddings, _StepLinear(model.lm_head.weight.detach(), model.lm_head.bias.detach())


def _lean_layers(plan: tuple, tokens: torch.Tensor, states: list) -> torch.Tensor:
    """One token through the layers as forward computes it for a (B, 1) input in eval mode (dropout is the identity
    then): tokens (B,); `states` (one tuple per layer) updated in the list. Returns the last layer's output (B, H)."""
    weights, cell, embeddings, _ = plan
    x = embeddings(tokens) if embeddings is not None else None
    for layer_idx, layer_weights in enumerate(weights):
        ids = tokens if layer_idx == 0 and embeddings is None else None
        x, states[layer_idx] = cell.step(layer_weights, x, states[layer_idx], ids)
    return x


def _lean_head(plan: tuple, hidden: torch.Tensor) -> torch.Tensor:
    """The head's logits (B, V) in float32 from the last layer's output (B, H)."""
    logits = plan[3](hidden)  # the adaptive softmax's full log-probabilities, or the linear head
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


# ---------------------------------------------------------------------------------------------------------------------
# The mixin


class CharLSTMGenerationMixin(GenerationMixin):
    """transformers' `GenerationMixin` for a recurrent-state model (the module docstring says what it changes)."""

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

        * its cache layers lack what `cache_char_lstm` reads and writes (`_cache_layout_problem`): `use_cache=False`,
          every token computed from the start (a cache the user passed gets forward's error instead);
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
            or not _weights_in_place(self.model)
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
