"""char_lstm: a character-level LSTM language model as a first-class Hugging Face transformers model."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .configuration_char_lstm import CharLSTMConfig
from .errors import DataError, UsageError
from .loading import check_vocab_match, load_model_and_tokenizer
from .modeling_char_lstm import CharLSTMForCausalLM, CharLSTMModel, CharLSTMPreTrainedModel
from .tokenization_char_lstm import CharLSTMTokenizer


__version__ = "0.1.0"

# `import char_lstm` is all it takes for the Auto classes to know the model type "char_lstm".
AutoConfig.register(CharLSTMConfig.model_type, CharLSTMConfig, exist_ok=True)
AutoModel.register(CharLSTMConfig, CharLSTMModel, exist_ok=True)
AutoModelForCausalLM.register(CharLSTMConfig, CharLSTMForCausalLM, exist_ok=True)
AutoTokenizer.register(CharLSTMConfig, tokenizer_class=CharLSTMTokenizer, exist_ok=True)

# `save_pretrained` then writes `auto_map` and copies the code files, so a saved folder loads with
# `trust_remote_code=True` where this package is not installed (e.g. from the Hub). The tokenizer needs no code there:
# its tokenizer.json loads with `AutoTokenizer` alone (see `CharLSTMTokenizer._save_pretrained`).
CharLSTMConfig.register_for_auto_class()
CharLSTMModel.register_for_auto_class("AutoModel")
CharLSTMForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "CharLSTMConfig",
    "CharLSTMForCausalLM",
    "CharLSTMModel",
    "CharLSTMPreTrainedModel",
    "CharLSTMTokenizer",
    "DataError",
    "UsageError",
    "check_vocab_match",
    "load_model_and_tokenizer",
]
