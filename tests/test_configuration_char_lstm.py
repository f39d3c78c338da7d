import pytest
from transformers import AutoConfig, DynamicCache

from char_lstm import CharLSTMConfig


def test_defaults_follow_the_char_rnn_recipe():
    config = CharLSTMConfig()
    assert config.model_type == "char_lstm"
    assert (config.embedding_size, config.hidden_size, config.num_hidden_layers) == (128, 512, 2)
    assert config.dropout == 0.5
    assert config.cell_type == "lstm"
    assert config.tie_word_embeddings is False
    assert config.use_cache is True


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"vocab_size": 0}, "vocab_size"),
        ({"embedding_size": -3}, "embedding_size"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"hidden_size": 2.5}, "hidden_size"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"cell_type": "transformer"}, "cell_type"),
        ({"initializer_range": 0}, "initializer_range"),
        ({"vocab_size": 10, "pad_token_id": 10}, "pad_token_id"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"CharLSTMConfig.{field} must be"):
        CharLSTMConfig(**kwargs)


def test_invalid_message_gives_allowed_range():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        CharLSTMConfig(dropout=1.5)
    with pytest.raises(ValueError, match="lstm.*gru.*rnn"):
        CharLSTMConfig(cell_type="lstmx")


def test_tied_embeddings_need_equal_sizes():
    with pytest.raises(ValueError, match="tie_word_embeddings=True needs embedding_size == hidden_size"):
        CharLSTMConfig(tie_word_embeddings=True, embedding_size=128, hidden_size=512)
    config = CharLSTMConfig(tie_word_embeddings=True, embedding_size=64, hidden_size=64)
    assert config.tie_word_embeddings


def test_save_load_round_trip_and_auto_config(tmp_path):
    config = CharLSTMConfig(vocab_size=70, hidden_size=64, cell_type="gru", dropout=0.2)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, CharLSTMConfig)
    ignored = ("_name_or_path", "auto_map", "transformers_version")
    assert {k: v for k, v in loaded.to_dict().items() if k not in ignored} == {
        k: v for k, v in config.to_dict().items() if k not in ignored
    }
    # invalid values are refused on load too
    (tmp_path / "config.json").write_text((tmp_path / "config.json").read_text().replace('"gru"', '"lsmt"'))
    with pytest.raises(ValueError, match="cell_type"):
        AutoConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("cell_type, states", [("lstm", 2), ("gru", 1), ("rnn", 1)])
def test_dynamic_cache_builds_recurrent_state_layers(cell_type, states):
    config = CharLSTMConfig(num_hidden_layers=3, cell_type=cell_type)
    cache = DynamicCache(config=config)
    assert len(cache.layers) == 3
    assert all(cache.is_linear)
    assert [layer.number_of_states for layer in cache.layers] == [states] * 3
