"""CharLSTM: a character-level recurrent language model (LSTM, GRU or RNN) for transformers.

This file holds the models: the pretrained base class, `CharLSTMModel`, `CharLSTMForCausalLM`. It is shipped to the
Hub next to the weights (``trust_remote_code``) with the siblings it imports, one concern each, which transformers'
loader saves and fetches with it: `configuration_char_lstm` (the config), `cells_char_lstm` (the registry of cell
types and their one-token steps), `layers_char_lstm` (the layers over sequences, dropout, padding), `cache_char_lstm`
(the recurrent state in transformers' cache), `step_char_lstm` (the one-token decoding step), `heads_char_lstm` (the
losses and the adaptive softmax), `generation_char_lstm` (generate() and the lean decoding loop) and
`internals_char_lstm` (the private parts of transformers and torch leaned on, as verified). All of them import only
the standard library, torch and transformers.

Shapes used in the docstrings: ``B`` batch, ``T`` sequence length (new tokens of this call), ``E`` embedding size,
``H`` hidden size, ``V`` vocabulary size, ``L`` number of recurrent layers.
"""

import math
import os

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import (
    CONFIG_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)

from .cache_char_lstm import (
    _LOSS_KWARGS,
    _cache_for_forward,
    _check_kwargs,
    _read_state,
    _seen_tokens,
    _set_seen_tokens,
    _write_state,
    cache_from_states,
    cache_states,
    detach_cache,
    reset_cache_rows,
)
from .cells_char_lstm import cell_type_of
from .configuration_char_lstm import CharLSTMConfig
from .generation_char_lstm import CharLSTMGenerationMixin
from .heads_char_lstm import _adaptive_logits_and_loss, _target_log_probs
from .layers_char_lstm import CharLSTMDropout, _Packing, _sequence_layer
from .step_char_lstm import _STEP_WEIGHTS, _decoding_table_ids, _single_step, _weights_in_place


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
                raise OSError(f"{folder} has no {CONFIG_NAME}: it is not a saved CharLSTM model (save one with "
                              "model.save_pretrained(folder)).")
            weights = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
            if not any(os.path.isfile(os.path.join(folder, name)) for name in weights):
                raise OSError(f"{folder} has a config but no weights ({SAFE_WEIGHTS_NAME}): the save was incomplete; "
                              "save the model again with model.save_pretrained(folder).")
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        except Exception as error:
            # safetensors' own error type, matched by name to keep this file's imports to torch and transformers
            if type(error).__name__ != "SafetensorError":
                raise
            raise OSError(f"The weights of {path} are corrupted or truncated ({error}); save or download the model "
                          "again.") from error

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`; config.json's `auto_map` lists every Auto class (`AUTO_MAP`)."""
        if getattr(self, "_auto_class", None) is not None:
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **AUTO_MAP}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        """Initialization, chosen by measurement (docs/design.md, "Weight init"): each gate's hidden-to-hidden block
        orthogonal (the state keeps its norm through time at the start), input-to-hidden blocks Xavier-uniform, zero
        biases (`config.forget_bias` added to a forget gate); embeddings N(0, `initializer_range`); the head (tied or
        not) U(-1/sqrt(H), 1/sqrt(H)) with zero bias: the first predictions are close to uniform."""
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
                        # the forget gate's block of bias_ih (LSTM: the second of input, forget, cell, output)
                        forget = cell_type_of(config.cell_type).forget_gate
                        if forget is not None and name.startswith("bias_ih") and config.forget_bias:
                            param[forget * hidden : (forget + 1) * hidden].fill_(config.forget_bias)


class CharLSTMModel(CharLSTMPreTrainedModel):
    """Embedding + stacked recurrent layers. Returns the last layer's outputs ``(B, T, H)`` (before dropout)."""

    def __init__(self, config: CharLSTMConfig):
        super().__init__(config)
        rnn_class = cell_type_of(config.cell_type).layer
        self.embeddings = nn.Embedding(config.vocab_size, config.embedding_size)
        self.layers = nn.ModuleList(
            rnn_class(config.embedding_size if idx == 0 else config.hidden_size, config.hidden_size, batch_first=True)
            for idx in range(config.num_hidden_layers)
        )
        self.dropout = CharLSTMDropout(config.dropout)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.embeddings = new_embeddings

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

    def _layers_forward(self, x, batch_size, cache, packing, fast_step, table_ids, all_hidden_states):
        """The layers over `x` (`(B, T, E)`, or packed when `packing`), each starting from its state in `cache` and
        writing its final state back, with dropout between layers; one token by the hand-written step where
        `fast_step` (reading the first layer's input projection from its table at `table_ids`, when given). Returns the
        last layer's output and `all_hidden_states` with each layer's output added (when it is not None)."""
        cell = cell_type_of(self.config.cell_type)
        for layer_idx, layer in enumerate(self.layers):
            initial = _read_state(cache, layer_idx, self.config.number_of_conv_states) if cache is not None else None
            if initial is not None and initial[0].shape[0] != batch_size:
                raise ValueError(
                    f"The cache holds states for a batch of {initial[0].shape[0]} but the inputs have batch size "
                    f"{batch_size}; use a new `DynamicCache(config=model.config)` for a new batch."
                )
            if fast_step:
                lookup = layer_idx == 0 and table_ids is not None
                x, final = _single_step(layer, cell, x, initial, table_ids if lookup else None,
                                        self.embeddings if lookup else None)
            else:
                x, final = _sequence_layer(layer, x, initial, packing)
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
        fast_step = seq_len == 1 and packing is None and not torch.is_grad_enabled() and _weights_in_place(self)
        if not fast_step:
            self.forget_decoding_weights()
        table_ids = _decoding_table_ids(self, input_ids) if fast_step else None
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


class CharLSTMForCausalLM(CharLSTMPreTrainedModel, CharLSTMGenerationMixin):
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
        hidden_states = self.dropout(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        if logits_at_targets:
            logits, loss = _target_log_probs(self.lm_head, hidden_states, labels, **kwargs)
        elif isinstance(self.lm_head, nn.AdaptiveLogSoftmaxWithLoss):
            logits, loss = _adaptive_logits_and_loss(self.lm_head, hidden_states, labels, self.training, **kwargs)
        else:
            logits = self.lm_head(hidden_states)
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
