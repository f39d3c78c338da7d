"""Auto classes, save/load, trust_remote_code in a clean process, pipeline, and loading errors."""

import ast
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, pipeline

from char_lstm import (
    CharLSTMConfig,
    CharLSTMForCausalLM,
    CharLSTMModel,
    CharLSTMTokenizer,
    check_vocab_match,
    load_model_and_tokenizer,
)
from char_lstm.model_card import write_model_card
from helpers import CORPUS, ROOT, SHIPPED_CODE, make_model


@pytest.fixture
def saved(tmp_path, tokenizer):
    model = make_model(tokenizer, "lstm", hidden_size=32, dropout=0.1)
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model


def test_import_registers_the_auto_classes(tokenizer, tmp_path):
    config = AutoConfig.for_model("char_lstm", vocab_size=len(tokenizer), hidden_size=16, embedding_size=8)
    assert isinstance(config, CharLSTMConfig)
    assert type(AutoModel.from_config(config)) is CharLSTMModel
    assert type(AutoModelForCausalLM.from_config(config)) is CharLSTMForCausalLM
    tokenizer.save_pretrained(tmp_path)
    assert type(AutoTokenizer.from_pretrained(tmp_path)) is CharLSTMTokenizer


def test_save_writes_safetensors_auto_map_and_code(saved):
    folder, _ = saved
    files = set(os.listdir(folder))
    expected = {"model.safetensors", "config.json", "generation_config.json", "vocab.json", "tokenizer_config.json"}
    assert expected <= files
    # the model's parts (the siblings modeling_char_lstm.py imports) and the tokenizer's code, all of them
    assert {"configuration_char_lstm.py", "modeling_char_lstm.py", "tokenization_char_lstm.py"} <= files
    assert SHIPPED_CODE == {name for name in files if name.endswith(".py")}
    assert not {"pytorch_model.bin"} & files
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_char_lstm.CharLSTMConfig",
        "AutoModel": "modeling_char_lstm.CharLSTMModel",
        "AutoModelForCausalLM": "modeling_char_lstm.CharLSTMForCausalLM",
        "AutoTokenizer": ["tokenization_char_lstm.CharLSTMTokenizer", None],
    }
    # no auto_map here: with one, transformers would refuse the tokenizer without trust_remote_code
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert "auto_map" not in tok_config and "tokenizer.json" in files


@pytest.mark.parametrize("name", sorted(SHIPPED_CODE))
def test_shipped_code_imports_only_torch_transformers_and_its_siblings(saved, name):
    folder, _ = saved
    tree = ast.parse((folder / name).read_text())
    modules = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    siblings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            modules.append(node.module if node.level == 0 else "")
            if node.level:
                siblings.add(f"{node.module}.py")
    # the standard library, torch, transformers and the relative imports of siblings (""), each of them saved too;
    # the tokenizer also uses two of transformers' own dependencies
    allowed = {"torch", "transformers", ""} | ({"numpy", "tokenizers"} if name.startswith("tokenization") else set())
    assert {module.split(".")[0] for module in modules} - allowed <= sys.stdlib_module_names, modules
    assert siblings <= SHIPPED_CODE and siblings <= set(os.listdir(folder)), siblings


def test_save_load_round_trip_is_bit_exact(saved, tokenizer):
    folder, model = saved
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    on_disk = load_file(folder / "model.safetensors")
    assert all(torch.equal(on_disk[k], state[k]) for k in on_disk)
    ids = tokenizer(["ROMEO:\nBut"], return_tensors="pt")["input_ids"]
    assert torch.equal(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


# A folder saved by char_lstm before its model was split into parts (modeling_char_lstm.py alone), with the greedy
# continuation that code generated
FOLDER_BEFORE_PARTS = ROOT / "tests" / "fixtures" / "saved_at_652c081"

BLOCK_CHAR_LSTM = """
import sys

class BlockCharLSTM:
    def find_spec(self, name, path=None, target=None):
        if name == "char_lstm" or name.startswith("char_lstm."):
            raise ImportError("char_lstm is blocked in this test")

sys.meta_path.insert(0, BlockCharLSTM())
try:
    import char_lstm
except ImportError:
    pass
else:
    raise SystemExit("char_lstm should not be importable here")
"""


def run_without_char_lstm(script: str, tmp_path) -> str:
    """Run `script` in a new Python where char_lstm cannot be imported (an empty HF cache, offline); its stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), PYTHONPATH="")
    result = subprocess.run([sys.executable, "-c", BLOCK_CHAR_LSTM + textwrap.dedent(script)], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_trust_remote_code_load_in_a_clean_process(saved, tokenizer, tmp_path):
    """The saved folder alone is enough: char_lstm cannot be imported, and the text generated is the same."""
    folder, model = saved
    model.eval()
    prompt = "ROMEO:\n"
    torch.manual_seed(1234)
    expected = tokenizer.decode(
        model.generate(**tokenizer([prompt], return_tensors="pt"), max_new_tokens=40, do_sample=True, top_k=10)[0]
    )
    stdout = run_without_char_lstm(
        f"""
        import torch
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

        folder = {str(folder)!r}
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        assert type(AutoConfig.from_pretrained(folder, trust_remote_code=True)).__name__ == "CharLSTMConfig"
        base = AutoModel.from_pretrained(folder, trust_remote_code=True)
        assert type(base).__name__ == "CharLSTMModel", type(base)
        assert torch.equal(base.embeddings.weight, model.model.embeddings.weight)
        assert "char_lstm" not in sys.modules
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        torch.manual_seed(1234)
        inputs = tokenizer([{prompt!r}], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=40, do_sample=True, top_k=10)
        sys.stdout.write("TEXT:" + repr(tokenizer.decode(out[0])))
        """, tmp_path)
    assert stdout.split("TEXT:")[-1] == repr(expected)


def test_a_folder_saved_before_the_model_was_in_parts_loads_and_generates_as_it_did(tmp_path):
    """A folder saved with the model in one file loads with the installed package (its classes are registered) and,
    with trust_remote_code where char_lstm is not installed, with its own code; both continue the prompt as the code
    that saved it did."""
    expected = json.loads((FOLDER_BEFORE_PARTS / "expected.json").read_text())
    code = {name for name in os.listdir(FOLDER_BEFORE_PARTS) if name.endswith(".py")}
    assert code == {"configuration_char_lstm.py", "modeling_char_lstm.py", "tokenization_char_lstm.py"}
    tokenizer = AutoTokenizer.from_pretrained(FOLDER_BEFORE_PARTS)
    model = AutoModelForCausalLM.from_pretrained(FOLDER_BEFORE_PARTS).eval()
    assert type(model) is CharLSTMForCausalLM
    ids = tokenizer(expected["prompt"], return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=20, do_sample=False)[0].tolist() == expected["greedy_20"]
    stdout = run_without_char_lstm(
        f"""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = {str(FOLDER_BEFORE_PARTS)!r}
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        ids = tokenizer({expected["prompt"]!r}, return_tensors="pt").input_ids
        sys.stdout.write("IDS:" + repr(model.generate(ids, max_new_tokens=20, do_sample=False)[0].tolist()))
        """, tmp_path)
    assert stdout.split("IDS:")[-1] == repr(expected["greedy_20"])


def test_pipeline_text_generation(saved, tokenizer):
    folder, model = saved
    generator = pipeline("text-generation", model=str(folder))
    result = generator("ROMEO:", max_new_tokens=20, do_sample=False)
    expected = tokenizer.decode(
        model.eval().generate(**tokenizer(["ROMEO:"], return_tensors="pt"), max_new_tokens=20, do_sample=False)[0]
    )
    assert result[0]["generated_text"] == expected


def card_snippet(card: str) -> str:
    return card.split("```python\n")[1].split("```")[0]


def test_a_local_folders_card_lists_the_tokenizers_special_tokens_and_loads_the_folder(tmp_path, monkeypatch):
    """The card written for a folder that is not on the Hub (a training run without --hub_model_id): its vocabulary
    sentence names the tokenizer's own special tokens (`<eos>` too, for a tokenizer with document boundaries), and
    its snippet, run as written from where the folder was given, loads that folder and generates."""
    tokenizer = CharLSTMTokenizer.from_corpus(CORPUS, document_boundary=True)
    model = make_model(tokenizer, hidden_size=8, embedding_size=4, num_layers=1)
    monkeypatch.chdir(tmp_path)
    folder = os.path.join("outputs", "shakespeare")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    card = open(write_model_card(folder, model, run={}, results={}, repo_id="shakespeare", model_path=folder)).read()
    assert f"a vocabulary of\n{len(tokenizer)} tokens (one per character, plus `<pad>`, `<unk>` and `<eos>`)." in card
    assert "# shakespeare\n" in card and "The folder carries its own code" in card
    snippet = card_snippet(card).replace("max_new_tokens=300", "max_new_tokens=5")
    assert f'from_pretrained("{folder}", trust_remote_code=True)' in snippet
    scope = {}
    exec(snippet, scope)  # noqa: S102  (the card's own code, as a reader pastes it)
    assert scope["out"].shape[1] == scope["inputs"]["input_ids"].shape[1] + 5
    # no repo id at all: the folder itself; a plain tokenizer: no <eos> claimed
    plain = CharLSTMTokenizer.from_corpus(CORPUS)
    plain.save_pretrained(folder)
    card = open(write_model_card(folder, make_model(plain), run={}, results={})).read()
    assert "tokens (one per character, plus `<pad>` and `<unk>`)." in card and "<eos>" not in card
    assert f'from_pretrained("{folder}", trust_remote_code=True)' in card_snippet(card)


def test_a_hub_cards_snippet_loads_the_repo_id(saved, tmp_path):
    folder, model = saved
    card = open(write_model_card(str(folder), model, run={}, results={}, repo_id="you/char-tiny")).read()
    assert 'from_pretrained("you/char-tiny", trust_remote_code=True)' in card_snippet(card)
    assert "The repository carries its own code" in card


def test_the_cards_training_data_says_which_files_were_read(saved):
    """A run on a glob or folder: the card's training data gives the files read, their bytes, the patterns (quoted as
    typed in a shell) and the files skipped; a record without `data_files` (an older run, a Hub dataset) adds none."""
    folder, model = saved
    files = {"kind": "glob", "include": ["*.c", "*.h"], "exclude": ["test dir/*"], "files": 1234,
             "skipped_not_text": 12, "skipped_empty": 3, "bytes": 45_678_901, "encoding": "latin-1"}
    run = {"dataset": "*.[ch]", "training_data": "`*.[ch]`: 9 training blocks.", "data_files": files}
    card = open(write_model_card(str(folder), model, run=run, results={}, repo_id="you/char-tiny")).read()
    assert ("## Training data\n\n`*.[ch]`: 9 training blocks.\n\nData files: 1,234 files, 45,678,901 bytes, read "
            "from a glob with `--include '*.c' '*.h' --exclude 'test dir/*'`; skipped: 12 not latin-1 text and 3 "
            "empty.\n\n## Training procedure") in card
    card = open(write_model_card(str(folder), model, run={**run, "data_files": None}, results={})).read()
    assert "## Training data\n\n`*.[ch]`: 9 training blocks.\n\n## Training procedure" in card


def test_load_model_and_tokenizer_gives_the_saved_weights_in_eval_mode_with_dtype_and_device(saved, tokenizer):
    folder, model = saved
    loaded, loaded_tokenizer = load_model_and_tokenizer(str(folder), dtype=torch.bfloat16)
    assert not loaded.training and loaded.dtype == torch.bfloat16
    state = model.state_dict()
    assert loaded.state_dict().keys() == state.keys()
    # the saved weights, not new ones
    assert all(torch.equal(loaded.state_dict()[k], state[k].bfloat16()) for k in state)
    assert isinstance(loaded_tokenizer, CharLSTMTokenizer) and loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    on_meta, _ = load_model_and_tokenizer(str(folder), device="meta")  # the one device other than the CPU here
    assert {p.device.type for p in on_meta.parameters()} == {"meta"} and on_meta.dtype == torch.float32


def test_vocab_mismatch_is_a_clear_error(saved, tmp_path):
    folder, model = saved
    other = CharLSTMTokenizer.from_corpus(CORPUS + "xyz0123")
    with pytest.raises(ValueError, match=r"tokenizer has \d+ tokens but the model's vocab_size is \d+"):
        check_vocab_match(model.config, other)
    other.save_pretrained(folder)  # overwrite the folder's tokenizer with a wrong one
    with pytest.raises(ValueError, match="not saved together"):
        load_model_and_tokenizer(str(folder))


def test_folder_without_config_or_weights_and_corrupted_weights(saved, tmp_path):
    folder, _ = saved
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OSError, match="has no config.json: it is not a saved CharLSTM model"):
        CharLSTMForCausalLM.from_pretrained(empty)

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(OSError, match="has a config but no weights"):
        AutoModelForCausalLM.from_pretrained(no_weights)

    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(OSError, match="corrupted or truncated"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_mistyped_folder_and_checkpoint_only_folder_are_named(saved, tmp_path, monkeypatch):
    """Before anything is loaded, and without asking the Hub: the closest existing folder, or the latest checkpoint."""
    import shutil

    folder, _ = saved
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    shutil.copytree(folder, tmp_path / "outputs" / "shakespeare")
    with pytest.raises(OSError, match=r"^--model_name_or_path outputs/shakespear does not exist; did you mean "
                                      r"outputs/shakespeare\?$"):
        load_model_and_tokenizer("outputs/shakespear")
    with pytest.raises(OSError, match=r"^--model_name_or_path ./nothing/here does not exist \(nor does the folder "):
        load_model_and_tokenizer("./nothing/here")
    run = tmp_path / "outputs" / "stopped"
    for step in (2, 10):
        shutil.copytree(folder, run / f"checkpoint-{step}")
    with pytest.raises(OSError, match=r"outputs/stopped holds checkpoints but no final model .* use the latest "
                                      r"checkpoint, --model_name_or_path outputs/stopped/checkpoint-10, or resume"):
        load_model_and_tokenizer("outputs/stopped")
    model, tokenizer = load_model_and_tokenizer("outputs/stopped/checkpoint-10")  # what the message says works
    assert model.config.vocab_size == len(tokenizer)


def test_a_hub_id_without_the_hub_is_refused_at_once_or_loaded_from_the_cache(saved, tmp_path, monkeypatch, caplog):
    """Offline mode not set and the Hub unreachable (here: a local port nothing listens on). A Hub-shaped name that is
    in no cache (a typo, `nothere/x`) is one line from our check, not transformers' minute of retries; a model in the
    Hugging Face cache loads from it, with one line saying so."""
    import shutil

    from huggingface_hub import constants

    folder, _ = saved
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(OSError, match=r"^--model_name_or_path nothere/x is no folder here, and it cannot be "
                                      r"downloaded from the Hub \(.+\) nor found in the Hugging Face cache: check the "
                                      r"name"):
        load_model_and_tokenizer("nothere/x")

    snapshot = tmp_path / "hub" / "models--someorg--cached" / "snapshots" / ("0" * 40)
    shutil.copytree(folder, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    with caplog.at_level("INFO", logger="char_lstm"):
        model, tokenizer = load_model_and_tokenizer("someorg/cached")
    [said] = [record.getMessage() for record in caplog.records if record.name.startswith("char_lstm")]
    assert said.startswith("The Hub cannot be reached (ConnectError")
    assert said.endswith("): loading someorg/cached from the Hugging Face cache.")
    saved_weights = load_file(folder / "model.safetensors")
    assert all(torch.equal(saved_weights[name], tensor) for name, tensor in model.state_dict().items())
