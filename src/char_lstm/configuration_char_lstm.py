"""CharLSTM model configuration.

This file is shipped to the Hub next to the weights (``trust_remote_code``), so it imports only ``transformers`` and
its sibling ``cells_char_lstm`` (the registry of cell types, which says what each `cell_type` is; it imports torch).
"""

from transformers import PretrainedConfig

from .cells_char_lstm import CELL_TYPES, cell_type_of


class CharLSTMConfig(PretrainedConfig):
    r"""
    Configuration of a character-level recurrent language model: an embedding, a stack of recurrent layers (LSTM, GRU
    or tanh RNN) and a linear head over the vocabulary. The defaults are the classic char-rnn recipe: a 2-layer LSTM
    of 512 units over 128-dimensional character embeddings with dropout 0.5.

    Args:
        vocab_size (`int`, defaults to 128):
            Number of tokens (characters plus special tokens). Normally taken from the tokenizer: `len(tokenizer)`.
        embedding_size (`int`, defaults to 128):
            Dimension of the character embeddings fed to the first recurrent layer.
        hidden_size (`int`, defaults to 512):
            Number of units of every recurrent layer.
        num_hidden_layers (`int`, defaults to 2):
            Number of stacked recurrent layers.
        dropout (`float`, defaults to 0.5):
            Dropout probability applied to the output of every recurrent layer: between layers and before the head.
            Must be in [0, 1).
        cell_type (`str`, defaults to `"lstm"`):
            A name in the registry of cell types (`cells_char_lstm.CELLS`): `"lstm"`, `"gru"` or `"rnn"` (Elman RNN
            with tanh).
        tie_word_embeddings (`bool`, defaults to `False`):
            Share the embedding matrix with the output head. Only possible when `embedding_size == hidden_size`.
        initializer_range (`float`, defaults to 1.0):
            Standard deviation of the normal init of the (untied) character embeddings, see
            `CharLSTMPreTrainedModel._init_weights` for the whole scheme.
        forget_bias (`float`, defaults to 0.0):
            Initial bias of the LSTM forget gate (ignored by GRU/RNN). 1.0 is a classic choice for long dependencies;
            it trained slower in our short CPU runs, hence 0.
        adaptive_softmax_cutoffs (`list[int]`, *optional*):
            With it, the output layer is an adaptive softmax (`torch.nn.AdaptiveLogSoftmaxWithLoss`, Grave et al.,
            2017) instead of one linear layer over the whole vocabulary: the ids below the first cutoff (the most
            frequent characters: the tokenizer must number them by frequency) get the full layer, and each range
            between cutoffs a cluster behind a smaller projection. For vocabularies of thousands of characters
            (Chinese, Japanese), where the full layer costs more than the recurrent layers. `logits` are then the
            log-probabilities, whose softmax is the model's distribution, as with any logits.
        adaptive_softmax_div_value (`float`, defaults to 4.0):
            Each cluster's projection is this many times narrower than the previous one's.
        pad_token_id / unk_token_id / bos_token_id / eos_token_id (`int`, *optional*):
            Ids of the special tokens, normally taken from the tokenizer.
        use_cache (`bool`, defaults to `True`):
            Whether the model returns its recurrent state (as a `Cache`) so that generation feeds one token per step.

    Example:

    ```python
    >>> from char_lstm import CharLSTMConfig, CharLSTMForCausalLM
    >>> config = CharLSTMConfig(vocab_size=67)
    >>> model = CharLSTMForCausalLM(config)
    ```
    """

    model_type = "char_lstm"

    def __init__(
        self,
        vocab_size: int = 128,
        embedding_size: int = 128,
        hidden_size: int = 512,
        num_hidden_layers: int = 2,
        dropout: float = 0.5,
        cell_type: str = "lstm",
        tie_word_embeddings: bool = False,
        initializer_range: float = 1.0,
        forget_bias: float = 0.0,
        pad_token_id: int | None = 0,
        unk_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        use_cache: bool = True,
        adaptive_softmax_cutoffs: list[int] | None = None,
        adaptive_softmax_div_value: float = 4.0,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.dropout = dropout
        self.cell_type = cell_type
        self.tie_word_embeddings = tie_word_embeddings
        self.initializer_range = initializer_range
        self.forget_bias = forget_bias
        self.pad_token_id = pad_token_id
        self.unk_token_id = unk_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.use_cache = use_cache
        self.adaptive_softmax_cutoffs = list(adaptive_softmax_cutoffs) if adaptive_softmax_cutoffs else None
        self.adaptive_softmax_div_value = adaptive_softmax_div_value
        self._check_values()
        super().__init__(**kwargs)

    def _check_values(self):
        for name in ("vocab_size", "embedding_size", "hidden_size", "num_hidden_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"CharLSTMConfig.{name} must be a positive integer (>= 1), got {value!r}.")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"CharLSTMConfig.dropout must be a number in [0, 1), got {self.dropout!r}.")
        if self.cell_type not in CELL_TYPES:
            raise ValueError(f"CharLSTMConfig.cell_type must be one of {CELL_TYPES}, got {self.cell_type!r}.")
        if not isinstance(self.initializer_range, (int, float)) or self.initializer_range <= 0:
            raise ValueError(
                f"CharLSTMConfig.initializer_range must be a positive number (> 0), got {self.initializer_range!r}."
            )
        if self.tie_word_embeddings and self.embedding_size != self.hidden_size:
            raise ValueError(
                "CharLSTMConfig.tie_word_embeddings=True needs embedding_size == hidden_size "
                f"(got {self.embedding_size} and {self.hidden_size}); set tie_word_embeddings=False or make them "
                "equal."
            )
        cutoffs = self.adaptive_softmax_cutoffs
        if cutoffs is not None:
            if (not all(isinstance(c, int) and not isinstance(c, bool) for c in cutoffs)
                    or cutoffs != sorted(set(cutoffs)) or cutoffs[0] <= 0 or cutoffs[-1] >= self.vocab_size - 1):
                raise ValueError(
                    "CharLSTMConfig.adaptive_softmax_cutoffs must be increasing ids in [1, vocab_size - 2] "
                    f"(vocab_size={self.vocab_size}), e.g. [256, 2048], got {cutoffs!r}."
                )
            if self.tie_word_embeddings:
                raise ValueError("CharLSTMConfig.tie_word_embeddings=True needs the linear output layer: drop "
                                 "adaptive_softmax_cutoffs or set tie_word_embeddings=False.")
            if not isinstance(self.adaptive_softmax_div_value, (int, float)) or self.adaptive_softmax_div_value < 1:
                raise ValueError(f"CharLSTMConfig.adaptive_softmax_div_value must be a number >= 1, got "
                                 f"{self.adaptive_softmax_div_value!r}.")
        for name in ("pad_token_id", "unk_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not 0 <= value < self.vocab_size):
                raise ValueError(
                    f"CharLSTMConfig.{name} must be None or an id in [0, {self.vocab_size - 1}] "
                    f"(vocab_size={self.vocab_size}), got {value!r}."
                )

    @property
    def layer_types(self) -> list[str]:
        """Every layer keeps a recurrent state and no keys/values: transformers' `DynamicCache(config=...)` builds a
        `LinearAttentionLayer` (recurrent-state cache layer) for each of them."""
        return ["linear_attention"] * self.num_hidden_layers

    @property
    def num_gates(self) -> int:
        """Gates of the cell (its entry in `cells_char_lstm.CELLS`): the recurrent weights stack this many blocks of
        hidden_size rows."""
        return cell_type_of(self.cell_type).num_gates

    @property
    def number_of_conv_states(self) -> int:
        """Number of state tensors per layer in the cache: h and c for an LSTM, h for a GRU or an RNN. (transformers
        reads this attribute, named after Mamba's conv states, to size each `LinearAttentionLayer`.)"""
        return cell_type_of(self.cell_type).num_states


__all__ = ["CharLSTMConfig"]
