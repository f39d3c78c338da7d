"""The facts a demo page shows about a model: its cell and size, its training data and its bits per character; its
name.

Read from the config, the card's metadata (README.md) and the training run's record (training_run.json, in a folder
written by training). The Gradio demo (demo/app.py) shows them, and so does the page of `scripts/export.py --format
web` (char_lstm.web_export). This module needs only the standard library and huggingface_hub:
scripts/push_to_hub.py --space copies it next to the demo's app.py, in a Space where char_lstm is not installed.
"""

import json
import os

from huggingface_hub import hf_hub_download, metadata_load


def model_file(model: str, name: str) -> str | None:
    """The path of `name` in a model folder, or downloaded from the Hub repository `model`; None where it has none."""
    if os.path.isdir(model):
        path = os.path.join(model, name)
        return path if os.path.isfile(path) else None
    try:
        return hf_hub_download(model, name)
    except Exception:  # not in the repository, or the Hub unreachable: the page shows what it has
        return None


def display_name(model: str) -> str:
    """How a page titles the model `model`: a folder's name, or the Hub id."""
    return os.path.basename(os.path.normpath(model)) if os.path.isdir(model) else model


def card_facts(model: str, network) -> str:
    """Markdown about the model `network` loaded from `model` (a folder or a Hub id): "**LSTM**, 2 layers of 512
    units, ...; trained on **tiny_shakespeare** (5000 steps); **1.95 bits/char** (test)."."""
    config = network.config
    facts = [f"**{config.cell_type.upper()}**, {config.num_hidden_layers} layers of {config.hidden_size} units, "
             f"{network.num_parameters():,} parameters, a vocabulary of {config.vocab_size} tokens"]
    card = model_file(model, "README.md")
    metadata = metadata_load(card) if card else None
    run_path = model_file(model, "training_run.json")
    run = {}
    if run_path:
        with open(run_path, encoding="utf-8") as f:
            run = json.load(f)
    results = ((metadata or {}).get("model-index") or [{}])[0].get("results") or [{}]
    dataset = run.get("dataset") or results[0].get("dataset", {}).get("name")
    if dataset:
        steps = f" ({run['global_step']} steps)" if run.get("global_step") else ""
        facts.append(f"trained on **{dataset}**{steps}")
    bits = [metric for metric in results[0].get("metrics", []) if metric.get("type") == "bits_per_character"]
    if bits:
        facts.append(f"**{bits[0]['value']:.3f} bits/char** ({bits[0]['name'].split('(')[-1].rstrip(')')})")
    return "; ".join(facts) + "."
