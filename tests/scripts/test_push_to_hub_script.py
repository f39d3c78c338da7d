import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from helpers import SHIPPED_CODE, call_script, run_script, script_env, shakespeare_like, write_text


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


BLOCK_CHAR_LSTM = """
import sys

class BlockCharLSTM:
    def find_spec(self, name, path=None, target=None):
        if name == "char_lstm" or name.startswith("char_lstm."):
            raise ImportError("char_lstm is blocked in this process")

sys.meta_path.insert(0, BlockCharLSTM())
"""


def place_in_hub_cache(folder, repo_id, hub_cache):
    """`folder` where huggingface_hub caches the main revision of the model `repo_id`."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)


@pytest.mark.heavy
def test_dry_run_builds_the_complete_repository_whose_card_snippet_runs_from_the_hub_cache(trained_model, tmp_path):
    """The built folder holds the model, its code and a card true to the run; placed where huggingface_hub caches
    someone/char-tiny, the card's code snippet, as written, runs offline in a process where char_lstm cannot be
    imported, and writes the same text as in this process for the same seed."""
    eval_json = tmp_path / "eval.json"
    evaluation = call_script("evaluate.py", ["--model_name_or_path", str(trained_model), "--validation_file",
                                            str(trained_model.parent / "train.txt"), "--block_size", "32",
                                            "--output_json", str(eval_json)], tmp_path)
    assert evaluation.returncode == 0, evaluation.stderr[-2000:]
    folder = tmp_path / "repo"
    result = call_script("push_to_hub.py", ["--model_dir", str(trained_model), "--repo_id", "someone/char-tiny",
                                            "--output_dir", str(folder), "--eval_results", str(eval_json),
                                            "--dry_run"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    files = set(os.listdir(folder))
    assert files == {"model.safetensors", "config.json", "generation_config.json", "vocab.json",
                     "tokenizer_config.json", "tokenizer.json", "README.md", "training_curves.png"} | SHIPPED_CODE
    assert (folder / "training_curves.png").read_bytes() == (trained_model / "training_curves.png").read_bytes()
    assert json.loads((folder / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == (
        "modeling_char_lstm.CharLSTMForCausalLM"
    )
    card = (folder / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0" and "char_lstm" in meta["tags"]
    metrics = {m["name"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    measured = json.loads(eval_json.read_text())
    assert metrics["Loss, nats/char (fixed windows)"] == round(measured["fixed"]["loss"], 4)
    assert metrics["Bits per character (streaming)"] == round(measured["streaming"]["bits_per_character"], 4)
    for section in ("## How to use", "## Training data", "## Training procedure", "## Evaluation", "## Limitations"):
        assert section in card
    assert "![Training curves](training_curves.png)" in card
    assert 'from_pretrained("someone/char-tiny", trust_remote_code=True)' in card
    assert "| block (sequence) length | 32 |" in card and "| training steps | 40 |" in card

    # the card's snippet, seeded just before it samples
    snippet = card.split("```python\n")[1].split("```")[0]
    assert snippet.count("out = model.generate(") == 1
    sampling = "out = model.generate("
    seeded = "import torch\n" + snippet.replace(sampling, "torch.manual_seed(77)\n" + sampling)
    hub_cache = tmp_path / "hf_home" / "hub"
    place_in_hub_cache(folder, "someone/char-tiny", hub_cache)
    env = script_env(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_CACHE=str(hub_cache), PYTHONPATH="")
    ran = subprocess.run([sys.executable, "-c", BLOCK_CHAR_LSTM + seeded + "\nassert 'char_lstm' not in sys.modules"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)
    assert ran.returncode == 0, ran.stderr[-3000:]
    here = io.StringIO()
    with contextlib.redirect_stdout(here):
        exec(seeded.replace("someone/char-tiny", str(folder)), {})
    assert len(here.getvalue()) > 20 and ran.stdout == here.getvalue()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model_dir", "{tmp}/missing", "--repo_id", "a/b", "--dry_run"], "does not exist"),
        (["--model_dir", "{model}", "--repo_id", "not a valid//id", "--dry_run"], "Invalid --repo_id"),
        (["--model_dir", "{model}", "--repo_id", "a/b"], "No Hugging Face token: log in with `hf auth login`"),
    ],
)
def test_push_errors(trained_model, tmp_path, args, message, monkeypatch):
    from huggingface_hub import constants

    args = [a.format(tmp=tmp_path, model=trained_model) for a in args]
    monkeypatch.delenv("HF_TOKEN", raising=False)  # no token anywhere: not in the environment, no saved login
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "empty_home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "empty_home" / "stored_tokens"))
    result = call_script("push_to_hub.py", args, tmp_path)
    assert result.returncode == 2
    assert message in result.stderr


def test_incomplete_model_dir_and_existing_output(trained_model, tmp_path):
    incomplete = tmp_path / "incomplete"
    shutil.copytree(trained_model, incomplete, ignore=shutil.ignore_patterns("model.safetensors", "checkpoint-*"))
    result = call_script("push_to_hub.py", ["--model_dir", str(incomplete), "--repo_id", "a/b", "--dry_run"], tmp_path)
    assert result.returncode == 2 and "is incomplete: model.safetensors missing" in result.stderr
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = call_script("push_to_hub.py", ["--model_dir", str(trained_model), "--repo_id", "a/b", "--dry_run",
                                            "--output_dir", str(out)], tmp_path)
    assert result.returncode == 2 and "is not empty" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_output_dir_cannot_replace_the_model(trained_model, tmp_path):
    import shutil as sh

    model_dir = tmp_path / "model"
    sh.copytree(trained_model, model_dir, ignore=sh.ignore_patterns("checkpoint-*"))
    for target in (model_dir, tmp_path):
        result = call_script("push_to_hub.py", ["--model_dir", str(model_dir), "--repo_id", "a/b", "--dry_run",
                                                "--output_dir", str(target), "--overwrite_output_dir"], tmp_path)
        assert result.returncode == 2 and "would replace the model" in result.stderr
    assert (model_dir / "model.safetensors").exists()


@pytest.fixture
def hub():
    from hub_standin import HubStandIn

    with HubStandIn() as stand_in:
        yield stand_in


def test_push_uploads_the_built_folder_to_the_hub(trained_model, tmp_path, hub):
    """push_to_hub.py against a local stand-in of the Hub API (HF_ENDPOINT): the repository is created and one
    commit holds exactly the built folder, byte for byte, sent with the token."""
    folder = tmp_path / "repo"
    result = run_script("push_to_hub.py", ["--model_dir", str(trained_model), "--repo_id", "someone/char-tiny",
                                           "--output_dir", str(folder)], tmp_path, **hub.env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("POST", "/api/repos/create", "Bearer hf_standin_token") in hub.requests
    uploaded = hub.repos["someone/char-tiny"]
    assert set(uploaded) == set(os.listdir(folder)) and "model.safetensors" in uploaded
    assert all(uploaded[name] == (folder / name).read_bytes() for name in uploaded)
    assert [repo for repo, _ in hub.commits] == ["someone/char-tiny"]


def test_train_push_to_hub_uploads_the_final_model_and_the_runs_card(tmp_path, hub):
    data = write_text(tmp_path / "train.txt", shakespeare_like(4000))
    out = tmp_path / "out"
    result = run_script("train.py", ["--train_file", str(data), "--output_dir", str(out), "--embedding_size", "8",
                                     "--hidden_size", "16", "--block_size", "32", "--per_device_train_batch_size", "8",
                                     "--max_steps", "4", "--eval_steps", "2", "--save_steps", "2",
                                     "--sample_every_evals", "0", "--report_to", "none", "--push_to_hub", "true",
                                     "--hub_model_id", "someone/pushed"], tmp_path, **hub.env())
    assert result.returncode == 0, result.stderr[-3000:]
    uploaded = hub.repos["someone/pushed"]
    assert uploaded["model.safetensors"] == (out / "model.safetensors").read_bytes()  # the final (best) model
    assert uploaded["README.md"] == (out / "README.md").read_bytes()  # the run's own card, not Trainer's
    assert "config.json" in uploaded and "modeling_char_lstm.py" in uploaded
    assert ("someone/pushed", "char_lstm training run") in hub.commits
