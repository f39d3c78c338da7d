"""The package as a wheel installs it, not as this checkout: a built wheel holds every module of src/char_lstm and the
card template of the top-level model_cards/, and renders a model card from a throwaway virtualenv.

Building and installing the wheel costs ~30 s of CPU, so that test runs on request (CHAR_LSTM_TEST_WHEEL=1, before a
release or after touching pyproject.toml's packaging); the check that pyproject.toml lists every package and maps
model_cards/ runs always."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from helpers import ROOT


RENDER = """
import char_lstm, os, sys
from char_lstm import CharLSTMConfig, CharLSTMForCausalLM
from char_lstm.model_card import render_model_card
assert char_lstm.__file__.startswith(sys.prefix), char_lstm.__file__  # the wheel's copy, not the checkout's
model = CharLSTMForCausalLM(CharLSTMConfig(vocab_size=10, embedding_size=4, hidden_size=4, num_hidden_layers=1))
print(render_model_card(model, run={}, results={}, repo_id="you/char-model"))
"""


def test_pyproject_packages_every_subpackage_and_the_card_template():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    inits = (ROOT / "src").rglob("__init__.py")
    subpackages = {".".join(path.parent.relative_to(ROOT / "src").parts) for path in inits}
    assert subpackages - set(setuptools["packages"]) == set()
    assert "char_lstm.model_cards" in setuptools["packages"]
    folder = ROOT / setuptools["package-dir"]["char_lstm.model_cards"]
    assert folder == ROOT / "model_cards" and (folder / "char_lstm.md").is_file()
    assert setuptools["package-data"]["char_lstm.model_cards"] == ["*.md"]
    # the demo app, which scripts/push_to_hub.py --space copies into a Space
    assert ROOT / setuptools["package-dir"]["char_lstm.demo"] / "app.py" == ROOT / "demo" / "app.py"
    assert setuptools["package-data"]["char_lstm.demo"] == ["app.py"]
    # the web page, which scripts/export.py --format web writes
    assert ROOT / setuptools["package-dir"]["char_lstm.web"] == ROOT / "web"
    assert all((ROOT / "web" / name).is_file() for name in setuptools["package-data"]["char_lstm.web"])


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("CHAR_LSTM_TEST_WHEEL"), reason="builds and installs a wheel (~30 s of CPU); "
                    "CHAR_LSTM_TEST_WHEEL=1 runs it")
@pytest.mark.timeout(300)
def test_built_wheel_holds_every_module_and_renders_a_model_card(tmp_path):
    source = tmp_path / "source"  # a copy, so that the build leaves nothing in the checkout
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("src", "model_cards", "demo", "web"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=240)
    (wheel,) = (tmp_path / "dist").glob("*.whl")

    packaged = set(zipfile.ZipFile(wheel).namelist())
    modules = {path.relative_to(ROOT / "src").as_posix() for path in (ROOT / "src").rglob("*.py")}
    assert modules - packaged == set()  # a subpackage missing from pyproject.toml's list shows here
    assert "char_lstm/model_cards/char_lstm.md" in packaged and "char_lstm/demo/app.py" in packaged
    assert {"char_lstm/web/index.html", "char_lstm/web/app.js", "char_lstm/web/decoding.js"} <= packaged

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = str(venv / "bin" / "python")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}  # no PYTHONPATH to the checkout
    # --ignore-installed: the checkout's editable install is visible through --system-site-packages; it stays as it is
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
                    "--ignore-installed", "-q", str(wheel)], check=True, capture_output=True, timeout=120)
    card = subprocess.run([python, "-c", RENDER], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert card.returncode == 0, card.stderr[-3000:]
    for line in ("# you/char-model", "## How to use", "## Limitations"):  # the template's sections, filled in
        assert line in card.stdout, card.stdout[:2000]
