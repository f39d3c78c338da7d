"""scripts/export.py: its arguments and its run. The exporting itself is `char_lstm.export`; the page of `--format
web` is `char_lstm.web_export`."""

import os
import sys
from dataclasses import dataclass, field

import torch

from .errors import UsageError
from .export import (
    GreedyCheck,
    _in_use,
    check_format,
    check_greedy,
    export_for_generation,
    load_export,
    save_export,
    timed,
)
from .loading import load_model_and_tokenizer
from .terminal import as_shown
from .web_export import check_page_greedy, find_runtime, write_web_folder


@dataclass
class ExportArguments:
    model_name_or_path: str = field(metadata={"help": "A trained model: a local folder or a Hub id."})
    output_dir: str = field(metadata={"help": "Where to write the exported programs, config and tokenizer."})
    format: str = field(default="dynamo", metadata={
        "help": "dynamo (torch.export, .pt2), onnx (ONNX Runtime: servers, phones; pip install "
                "\"char-lstm[export]\"), executorch (.pte, phones; pip install executorch) or web (a static page "
                "running the model in the browser: ONNX Runtime Web; needs the export extra and `npm ci`)."})
    prompt: str = field(default="\n", metadata={
        "help": "The prompt the prefill graph is traced with (it takes prompts of this length; any other goes "
                "through the decode graph) and the check samples from; the page's first prompt (--format web)."})
    max_new_tokens: int = field(default=100, metadata={"help": "Characters the check generates."})
    check: bool = field(default=True, metadata={
        "help": "Generate greedily through the written files and compare with model.generate(do_sample=False)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a non-empty --output_dir."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run the model code shipped with a Hub model."})
    web_runtime: str | None = field(default=None, metadata={
        "help": "--format web: the dist folder of onnxruntime-web (default: node_modules/onnxruntime-web/dist of "
                "the char_lstm checkout, after `npm ci`)."})


def check_export_arguments(args: ExportArguments) -> None:
    """One-line UsageErrors, before the model is loaded."""
    check_format(args.format)
    if args.format == "web":
        find_runtime(args.web_runtime)
    elif args.web_runtime is not None:
        raise UsageError(f"--web_runtime is for --format web, not --format {args.format}.")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}.")
    if not args.prompt:
        raise UsageError("--prompt is empty: the prefill graph is traced with at least one character.")
    target = os.path.realpath(args.output_dir)
    if os.path.isdir(args.model_name_or_path):
        source = os.path.realpath(args.model_name_or_path)
        if source == target or source.startswith(target + os.sep):
            raise UsageError(f"--output_dir {args.output_dir} would replace the model in --model_name_or_path "
                             f"{args.model_name_or_path}; choose another folder.")
    if os.path.isfile(args.output_dir):
        raise UsageError(f"--output_dir {args.output_dir} is a file; give a folder.")
    _in_use(args.output_dir, args.overwrite_output_dir)


def _size(count: int) -> str:
    return f"{count / 1e6:.1f} MB" if count >= 1e6 else f"{count / 1e3:.0f} kB"


def run_export(args: ExportArguments) -> GreedyCheck | None:
    """Check the arguments, load the model, export it, write the folder, check it; returns the check (None: off)."""
    check_export_arguments(args)
    model, tokenizer = load_model_and_tokenizer(args.model_name_or_path, device="cpu", dtype=torch.float32,
                                                trust_remote_code=args.trust_remote_code)
    unknown = tokenizer.oov_characters(args.prompt) if hasattr(tokenizer, "oov_characters") else []
    if unknown:
        raise UsageError(f"--prompt has characters the model has never seen: {unknown}; use characters of its "
                         "vocabulary.")
    web = args.format == "web"
    input_ids = tokenizer([args.prompt], return_tensors="pt")["input_ids"]
    exported, seconds = timed(export_for_generation, model, input_ids, "onnx" if web else args.format)
    if web:  # replaces a folder there only once the new one is complete
        files = write_web_folder(exported, model, tokenizer, args.output_dir, args.model_name_or_path, args.prompt,
                                 find_runtime(args.web_runtime), overwrite=args.overwrite_output_dir)
    else:
        files = save_export(exported, tokenizer, args.output_dir, args.overwrite_output_dir)
    config = model.config
    print(f"exported {args.model_name_or_path} ({config.num_hidden_layers}x{config.hidden_size} "
          f"{config.cell_type.upper()}) as {args.format} in {seconds:.1f} s to {args.output_dir}: "
          + ", ".join(f"{name} {_size(size)}" for name, size in files.items() if not name.startswith("ort/")))
    if not args.check:
        return None
    if web:  # as the page runs it: decode.onnx and model.json, in ONNX Runtime
        check = check_page_greedy(model, args.output_dir, input_ids, args.max_new_tokens)
    else:  # the folder this very process has just written: its programs are ours, trusted
        exported = load_export(args.output_dir, trust_remote_code=True)
        check = check_greedy(model, exported, input_ids, args.max_new_tokens)
    got = tokenizer.decode(check.got[0], skip_special_tokens=True)
    if not check.equal:
        expected = tokenizer.decode(check.expected[0], skip_special_tokens=True)
        raise ValueError(f"check failed: the exported programs' greedy text differs from generate()'s from token "
                         f"{check.first_difference} on: {got!r} against {expected!r} (the files are in "
                         f"{args.output_dir}).")
    print(f"check: {check.got.shape[1] - input_ids.shape[1]} characters of greedy text through the files in "
          f"{args.output_dir} equal model.generate(do_sample=False)'s:\n{as_shown(got, sys.stdout)}")
    if web:
        print(f"serve the page: cd {args.output_dir} && python -m http.server 8000, then open http://127.0.0.1:8000/")
    return check
