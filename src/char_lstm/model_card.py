"""The model card of a CharLSTM model (README.md): rendered from `model_cards/char_lstm.md` with the model's
architecture, the training run's record and the measured results. (The Hub folder and the upload: `char_lstm.hub`.)"""

import json
import math
import os
import shlex

import yaml


RUN_INFO_NAME = "training_run.json"  # written by train(): what the model card says about the training
TRAINING_CURVES_NAME = "training_curves.png"  # drawn by train() (training/curves.py), shown on the model card
_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def packaged_file(folder: str, name: str) -> str:
    """A file of the checkout's top-level `folder` (model_cards/, demo/), which a built wheel packages as
    char_lstm/`folder`/ (pyproject.toml), so that installed copies find it too."""
    checkout = os.path.dirname(os.path.dirname(_PACKAGE))
    paths = (os.path.join(_PACKAGE, folder, name), os.path.join(checkout, folder, name))
    return next((path for path in paths if os.path.isfile(path)), paths[0])


MODEL_CARD_TEMPLATE = packaged_file("model_cards", "char_lstm.md")
TOKENIZER_FILES = ("vocab.json", "tokenizer_config.json")


def _metric_rows(results: dict) -> list[dict]:
    """model-index metrics from {mode: {"loss", "bits_per_character", "perplexity"}}."""
    rows = []
    for mode, values in results.items():
        label = {"eval": "validation", "fixed": "fixed windows", "streaming": "streaming"}.get(mode, mode)
        rows += [
            {"type": "loss", "name": f"Loss, nats/char ({label})", "value": round(float(values["loss"]), 4)},
            {"type": "bits_per_character", "name": f"Bits per character ({label})",
             "value": round(float(values["bits_per_character"]), 4)},
            {"type": "perplexity", "name": f"Perplexity ({label})", "value": round(float(values["perplexity"]), 4)},
        ]
    return rows


def vocabulary_note(tokenizer=None) -> str:
    """What the card says the vocabulary is: one token per character plus the tokenizer's own multi-character tokens
    (`<pad>`, `<unk>`, and `<eos>`/`<bos>` where it has them), in id order; without a tokenizer, "its special
    tokens"."""
    if tokenizer is None:
        return "one per character, plus its special tokens"
    vocab = tokenizer.get_vocab()
    specials = [f"`{token}`" for token in sorted(vocab, key=vocab.get) if len(token) != 1]
    if not specials:
        return "one per character"
    listed = specials[0] if len(specials) == 1 else ", ".join(specials[:-1]) + f" and {specials[-1]}"
    return f"one per character, plus {listed}"


def render_model_card(model, run: dict, results: dict, repo_id: str, license: str = "apache-2.0",
                      curves: bool = False, tokenizer=None, model_path: str | None = None) -> str:
    """The model card (README.md): YAML metadata (with the measured results as model-index) and the sections of
    `model_cards/char_lstm.md`, filled with the model's architecture and `run` (the training run's settings);
    `curves`: the folder holds training_curves.png, which the card shows; `tokenizer`: the model's, whose special
    tokens the card lists; `model_path`: a local folder that the card's snippet loads, instead of the Hub repository
    `repo_id` (a card written for a folder that is not on the Hub).

    `results`: {mode: {"loss", "bits_per_character", "perplexity"}} with mode "eval" (validation during training),
    "fixed" and/or "streaming" (scripts/evaluate.py).
    """
    config = model.config
    dataset = run.get("dataset") or "unknown"
    hub_dataset = run.get("hub_dataset")  # the Hub id of the data (the bundled copy's too), None for local files
    metadata = _card_metadata(config, dataset, hub_dataset, results, repo_id, license)
    with open(MODEL_CARD_TEMPLATE, encoding="utf-8") as f:
        template = f.read()
    hyperparameters = {
        "block (sequence) length": run.get("block_size"),
        "batch size (per device x devices x accumulation)": run.get("batch_size"),
        "optimizer": run.get("optimizer"),
        "learning rate": run.get("learning_rate"),
        "learning-rate schedule": run.get("lr_scheduler"),
        "gradient clipping (max norm)": run.get("max_grad_norm") or ("none" if "max_grad_norm" in run else None),
        "training steps": run.get("global_step"),
        "epochs": run.get("epochs"),
        "precision": run.get("precision"),
        "seed": run.get("seed"),
    }
    return template.format(
        metadata="---\n" + yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True) + "---",
        repo_id=repo_id,
        load_id=json.dumps(model_path or repo_id),  # a Python string literal, double-quoted
        carrier="folder" if model_path else "repository",
        vocabulary=vocabulary_note(tokenizer),
        cell_type=config.cell_type.upper(),
        num_hidden_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        embedding_size=config.embedding_size,
        dropout=config.dropout,
        vocab_size=config.vocab_size,
        num_parameters=f"{model.num_parameters():,}",
        dataset=dataset,
        training_data=(run.get("training_data") or f"`{dataset}`") + _data_files_note(run.get("data_files")),
        procedure=run.get("procedure") or "Trained with `transformers.Trainer` (no record of the run was found).",
        training_curves=f"![Training curves]({TRAINING_CURVES_NAME})\n\n" if curves else "",
        training_results=_training_results_table(run.get("training_results")),
        prompt=run.get("sample_prompt") or "\n",
        hyperparameters="\n".join(f"| {k} | {v} |" for k, v in hyperparameters.items() if v is not None),
        evaluation=_evaluation_table(run, results),
    )


def _card_metadata(config, dataset: str, hub_dataset: str | None, results: dict, repo_id: str, license: str) -> dict:
    """The card's YAML metadata: library, task, license, tags, the data's Hub id, and the results as model-index."""
    metadata = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "license": license,
        "tags": ["char_lstm", "character-level", config.cell_type, "text-generation", "custom_code"],
    }
    if hub_dataset:
        metadata["datasets"] = [hub_dataset]
    metadata["model-index"] = [
        {
            "name": repo_id,
            "results": [
                {
                    "task": {"type": "text-generation", "name": "Character-level language modeling"},
                    "dataset": {"name": dataset, "type": hub_dataset or dataset},
                    "metrics": _metric_rows(results),
                }
            ],
        }
    ]
    return metadata


def _data_files_note(files: dict | None) -> str:
    """The card's line on what --train_file read (the run record's `data_files`): the files, their bytes, the
    --include / --exclude patterns of a folder or glob, and the files skipped; "" without a record."""
    if not files:
        return ""
    count = files.get("files", 0)
    note = f"{count:,} file{'s' * (count != 1)}, {files.get('bytes', 0):,} bytes"
    if files.get("kind") in ("folder", "glob"):
        note += f", read from a {files['kind']}"
    patterns = [f"--{flag} {' '.join(shlex.quote(p) for p in files[flag])}" for flag in ("include", "exclude")
                if files.get(flag)]
    if patterns:
        note += f" with `{' '.join(patterns)}`"
    skipped = [f"{files[key]:,} {what}" for key, what in (
        ("skipped_not_text", f"not {files.get('encoding', 'the encoding')} text"), ("skipped_empty", "empty"))
        if files.get(key)]
    if skipped:
        note += f"; skipped: {' and '.join(skipped)}"
    return f"\n\nData files: {note}."


def _evaluation_table(run: dict, results: dict) -> str:
    """The rows of the card's evaluation table: what was measured, loss, bits per character, perplexity."""
    evaluation_lines = []
    for mode, values in results.items():
        what = {
            "eval": f"{run.get('evaluation_data', 'the validation text')}, the final model",
            "fixed": f"{values.get('data', 'held-out text')}, fixed windows of {values.get('block_size', '?')} "
            "characters from a zero state",
            "streaming": f"{values.get('data', 'held-out text')}, the whole text in one pass with the state carried",
        }.get(mode, mode)
        loss = f"{values['loss']:.4f}"
        if values.get("characters"):  # the final evaluation: a sample with its standard error, or all of the text
            sample = values.get("loss_stderr", 0) > 0
            loss += f" ± {values['loss_stderr']:.4f} (standard error)" if sample else ""
            what += f" ({'a sample of ' if sample else 'all '}{values['characters']:,} characters)"
        evaluation_lines.append(
            f"| {what} | {loss} | {values['bits_per_character']:.4f} | {values['perplexity']:.3f} |"
        )
    return "\n".join(evaluation_lines) or "| (no evaluation recorded) | | | |"


def _training_results_table(rows: list[dict] | None) -> str:
    """Markdown table of the evaluations during training (Trainer's cards have the same), or a line saying none."""
    if not rows:
        return "No evaluation was recorded during training."

    def number(value) -> str:
        return "no log" if value is None else f"{value:.4f}"

    lines = ["| step | training loss | validation loss | bits/char |", "|---|---|---|---|"]
    lines += [f"| {row['step']} | {number(row['training_loss'])} | {number(row['validation_loss'])} | "
              f"{number(row['bits_per_char'])} |" for row in rows]
    return "\n".join(lines)


def write_model_card(
    output_dir: str, model, run: dict, results: dict, repo_id: str | None = None, license: str = "apache-2.0",
    tokenizer=None, model_path: str | None = None,
) -> str:
    """Render the model card into `output_dir/README.md` (showing the folder's training_curves.png, if any); returns
    its path. `tokenizer`: default, the one saved in `output_dir` (its special tokens are listed). The snippet loads
    `model_path` if given, else the Hub repository `repo_id`, else (no `repo_id`) `output_dir` itself."""
    path = os.path.join(output_dir, "README.md")
    if tokenizer is None and all(os.path.isfile(os.path.join(output_dir, name)) for name in TOKENIZER_FILES):
        from .tokenization_char_lstm import CharLSTMTokenizer

        tokenizer = CharLSTMTokenizer.from_pretrained(output_dir)
    if repo_id is None and model_path is None:
        model_path = output_dir
    card = render_model_card(model, run, results, repo_id or os.path.basename(os.path.abspath(output_dir)), license,
                             curves=os.path.isfile(os.path.join(output_dir, TRAINING_CURVES_NAME)),
                             tokenizer=tokenizer, model_path=model_path)
    with open(path, "w", encoding="utf-8") as f:
        f.write(card)
    return path


def results_from_training(metrics: dict) -> dict:
    """The card's results from Trainer's final metrics (eval_loss, eval_bits_per_char, eval_perplexity)."""
    if "eval_loss" not in metrics:
        return {}
    return {
        "eval": {
            "loss": metrics["eval_loss"],
            "bits_per_character": metrics.get("eval_bits_per_char", metrics["eval_loss"] / math.log(2)),
            "perplexity": metrics.get("eval_perplexity", float("nan")),
            # how precise the loss is: the final evaluation's standard error and the characters it read
            **{key: metrics[f"eval_{key}"] for key in ("loss_stderr", "characters") if f"eval_{key}" in metrics},
        }
    }
