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


# ---------------------------------------------------------------------------------------------------------------------
# --web_space: a static Space running the model in the visitor's browser (the page of scripts/export.py --format web)


def web_unavailable() -> str | None:
    """Why --web_space cannot build here (None: it can): the ONNX export's packages, onnxruntime-web's files."""
    from char_lstm.errors import UsageError
    from char_lstm.export import check_format
    from char_lstm.web_export import find_runtime

    try:
        check_format("web")
        find_runtime()
    except UsageError as error:
        return str(error)
    return None


WEB = pytest.mark.skipif(web_unavailable() is not None, reason=str(web_unavailable()))
RUNTIME_FILES = {"ort/ort.wasm.min.js", "ort/ort-wasm-simd-threaded.js", "ort/ort-wasm-simd-threaded.wasm",
                 "ort/package.json"}  # package.json: onnxruntime-web's version and license (MIT)
WEB_SPACE_FILES = {"README.md", "index.html", "app.js", "decoding.js", "decode.onnx", "model.json"} | RUNTIME_FILES


def files_in(folder) -> set[str]:
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()}


@WEB
def test_dry_run_builds_a_static_space_whose_page_generates_what_the_model_does(trained_model, tmp_path):
    """--web_space builds the page of scripts/export.py --format web, and nothing a static Space cannot serve or does
    not need (no Python, no requirements, no prefill graph, no weights beside decode.onnx), with README.md's Spaces
    header: sdk static, index.html, the model named. Its decode.onnx and model.json generate greedily what the model
    does."""
    from char_lstm import load_model_and_tokenizer
    from char_lstm.model_card import packaged_file
    from char_lstm.web_export import greedy_through_page_files

    web = tmp_path / "web-space"
    result = call_script("push_to_hub.py", ["--model_dir", trained_model, "--repo_id", "someone/char-tiny",
                                            "--output_dir", tmp_path / "repo", "--web_space", "someone/char-web",
                                            "--web_space_dir", web, "--dry_run"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"built {web}: README.md, app.js, decode.onnx, decoding.js, index.html, model.json, ort\n" in result.stdout
    assert files_in(web) == WEB_SPACE_FILES
    for name in ("index.html", "app.js"):
        assert (web / name).read_bytes() == open(packaged_file("web", name), "rb").read()
    card = (web / "README.md").read_text()
    meta = front_matter(card)
    assert meta["sdk"] == "static" and meta["app_file"] == "index.html" and meta["models"] == ["someone/char-tiny"]
    assert meta["title"] == "char-web" and {"emoji", "colorFrom", "colorTo"} <= set(meta)
    assert 0 < len(meta["short_description"]) <= 60  # the Hub's limit
    assert "[someone/char-tiny](https://huggingface.co/someone/char-tiny)" in card
    info = json.loads((web / "model.json").read_text())
    assert info["name"] == "someone/char-tiny" and info["prompt"] == "\n"
    model, tokenizer = load_model_and_tokenizer(trained_model)
    # the model's facts, as the Gradio demo shows them: read from the training run's folder
    assert info["facts"].startswith(f"**LSTM**, {model.config.num_hidden_layers} layers of 32 units, ")
    assert "trained on **train.txt** (40 steps)" in info["facts"]
    input_ids = tokenizer(["ROMEO:"], return_tensors="pt")["input_ids"]
    expected = model.generate(input_ids, max_new_tokens=30, do_sample=False, temperature=None, top_k=None,
                              top_p=None, pad_token_id=tokenizer.pad_token_id)
    assert greedy_through_page_files(str(web), input_ids, 30).tolist() == expected.tolist()


@WEB
def test_push_creates_a_static_space_with_the_built_page(trained_model, tmp_path, hub):
    """Through the stand-in Hub: the model repository and a Space created with the static SDK, whose one commit holds
    the built folder byte for byte, ONNX Runtime's 15 MB WebAssembly stored through LFS as the Hub stores a file over
    10 MB."""
    web = tmp_path / "web-space"
    result = run_script("push_to_hub.py", ["--model_dir", str(trained_model), "--repo_id", "someone/char-tiny",
                                           "--output_dir", str(tmp_path / "repo"), "--web_space", "someone/char-web",
                                           "--web_space_dir", str(web)], tmp_path, **hub.env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pushed to https://huggingface.co/spaces/someone/char-web (" in result.stdout
    assert hub.kinds == {"someone/char-tiny": ("model", None), "someone/char-web": ("space", "static")}
    uploaded = hub.repos["someone/char-web"]
    assert set(uploaded) == files_in(web) == WEB_SPACE_FILES
    assert all(uploaded[name] == (web / name).read_bytes() for name in uploaded)
    assert {path for repo, path in hub.lfs_paths if repo == "someone/char-web"} == {"ort/ort-wasm-simd-threaded.wasm"}
    assert hub.commits == [("someone/char-tiny", "Upload char_lstm model"), ("someone/char-web", "char_lstm in the "
                                                                                                   "browser")]


@pytest.mark.parametrize("argv, message", [
    (["--web_space", "not a valid//id"], "error: Invalid --web_space 'not a valid//id': "),
    (["--web_runtime", "{tmp}/dist"], "error: --web_runtime is for --web_space: add --web_space NAME, or leave "
                                      "--web_runtime out."),
    (["--web_space", "a/web", "--web_space_dir", "{model}", "--overwrite_output_dir"],
     "error: --web_space_dir {model} would replace the model in --model_dir {model}; choose another folder."),
    (["--web_space", "a/web", "--web_space_dir", "{tmp}/hub"],
     "error: --web_space_dir {tmp}/hub is also the --output_dir: choose another --web_space_dir."),
])
def test_web_space_arguments_that_cannot_work_are_one_line(trained_model, tmp_path, argv, message):
    argv = [a.format(tmp=tmp_path, model=trained_model) for a in argv]
    result = call_script("push_to_hub.py", ["--model_dir", trained_model, "--repo_id", "a/b", "--dry_run",
                                            "--output_dir", tmp_path / "hub", *argv], tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert errors[0].startswith(message.format(tmp=tmp_path, model=trained_model)), errors[0]
    assert not (tmp_path / "hub").exists() and (trained_model / "model.safetensors").is_file()


def test_web_space_without_the_onnx_packages_says_what_to_install(trained_model, tmp_path, monkeypatch):
    """Before any work: onnxscript missing (here: hidden from importlib, as an uninstalled package is)."""
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    result = call_script("push_to_hub.py", ["--model_dir", trained_model, "--repo_id", "a/b", "--dry_run",
                                            "--output_dir", tmp_path / "hub", "--web_space", "a/web"], tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert errors[0].startswith("error: --web_space ") and "pip install" in errors[0], errors[0]
    assert not (tmp_path / "hub").exists()


@WEB
def test_web_space_without_the_runtime_or_with_its_folder_in_use_is_one_line(trained_model, tmp_path):
    """onnxruntime-web's files missing, and a --web_space_dir holding files without --overwrite_output_dir: one line
    each, before any work; with --overwrite_output_dir the folder is built anew."""
    argv = ["--model_dir", trained_model, "--repo_id", "a/b", "--dry_run", "--output_dir", tmp_path / "hub",
            "--web_space", "a/web", "--web_space_dir", tmp_path / "web"]
    (tmp_path / "dist").mkdir()
    result = call_script("push_to_hub.py", [*argv, "--web_runtime", tmp_path / "dist"], tmp_path)
    assert result.returncode == 2 and "error: --web_space needs onnxruntime-web's files, and --web_runtime " \
        f"{tmp_path / 'dist'} has no ort.wasm.min.mjs, " in result.stderr and "run `npm ci`" in result.stderr
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "keep.txt").write_text("mine")
    result = call_script("push_to_hub.py", argv, tmp_path)
    assert result.returncode == 2 and (f"error: {tmp_path / 'web'} is not empty: choose another --web_space_dir or "
                                       "pass --overwrite_output_dir.") in result.stderr
    assert (tmp_path / "web" / "keep.txt").read_text() == "mine" and not (tmp_path / "hub").exists()
    result = call_script("push_to_hub.py", [*argv, "--overwrite_output_dir"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert files_in(tmp_path / "web") == WEB_SPACE_FILES
