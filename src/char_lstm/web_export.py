"""The model in the visitor's browser: `scripts/export.py --format web` writes a static folder that runs a trained
model in a page, with no server (docs/export.md, "In the browser").

The folder holds:

- ``index.html``, ``app.js`` and ``decoding.js``: the page, its script and the script's arithmetic (tokenizer,
  sampling, the text as shown) (web/ in the checkout, packaged as char_lstm.web);
- ``decode.onnx``: the model's one-character step exported by transformers' ONNX exporter (`char_lstm.export`), its
  weights inside the file: one token and the recurrent state in, the logits and the next state out;
- ``model.json``: what the page needs besides: the vocabulary, the state's inputs, the generation settings, the
  model's facts (as the Gradio demo shows them: `char_lstm.facts`);
- ``ort/``: ONNX Runtime Web's WebAssembly build (its ES module, its loader and the .wasm), copied from the pinned npm
  dependency (package.json and package-lock.json, installed with `npm ci`): the page never fetches from a CDN.

`python -m http.server` in the folder serves a working page, as does any static host (a static Space:
`scripts/push_to_hub.py --web_space`).
"""

import errno
import json
import os
import shutil
import tempfile

import torch

from .errors import UsageError
from .export import GreedyCheck, generate_greedily
from .facts import card_facts, display_name
from .model_card import packaged_file


RUNTIME_PACKAGE = "onnxruntime-web"
# The ES module of the WebAssembly build, the loader it imports and the WebAssembly it runs (one build: SIMD, threads
# when the page is cross-origin isolated; the page asks for one thread), and their names in the page's ort/: the
# modules as .js, which every static host serves as JavaScript (browsers refuse a module of another type, and not
# every host knows .mjs); app.js tells the runtime where its loader and its .wasm are.
RUNTIME_FILES = {"ort.wasm.min.mjs": "ort.wasm.min.js", "ort-wasm-simd-threaded.mjs": "ort-wasm-simd-threaded.js",
                 "ort-wasm-simd-threaded.wasm": "ort-wasm-simd-threaded.wasm"}
PAGE_FILES = ("index.html", "app.js", "decoding.js")
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_RUNTIME = os.path.join(_CHECKOUT, "node_modules", RUNTIME_PACKAGE, "dist")
# A page's WebAssembly memory is 4 GB at most (32-bit addresses), for the weights, the runtime and its buffers.
MAX_WEIGHT_BYTES = 1 << 30
ONNX_FILE = "decode.onnx"
INFO_FILE = "model.json"
# The page's settings where the model's generation config has none: the Gradio demo's.
PAGE_DEFAULTS = {"max_new_tokens": 300, "temperature": 0.8, "top_p": 1.0}


def find_runtime(runtime_dir: str | None = None) -> str:
    """The folder holding onnxruntime-web's `RUNTIME_FILES` (default: the checkout's node_modules, after `npm ci`),
    or a one-line UsageError saying how to get them."""
    folder = runtime_dir or DEFAULT_RUNTIME
    missing = [name for name in RUNTIME_FILES if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        where = "--web_runtime " + folder if runtime_dir else folder
        raise UsageError(f"--format web needs {RUNTIME_PACKAGE}'s files, and {where} has no {', '.join(missing)}: "
                         f"run `npm ci` in the char_lstm checkout (package.json pins {RUNTIME_PACKAGE}), or pass "
                         f"--web_runtime with the dist folder of an installed {RUNTIME_PACKAGE}.")
    return folder


def _runtime_version(runtime_dir: str) -> str | None:
    try:
        with open(os.path.join(os.path.dirname(runtime_dir), "package.json"), encoding="utf-8") as f:
            return json.load(f).get("version")
    except (OSError, ValueError):
        return None


def _runtime_bytes(runtime_dir: str) -> int:
    return sum(os.path.getsize(os.path.join(runtime_dir, name)) for name in RUNTIME_FILES)


def _tokens(tokenizer, vocab_size: int) -> list[str]:
    """The text each id decodes to, as `tokenizer.decode(..., skip_special_tokens=True)` gives it: "" for the special
    tokens and for ids past the tokenizer's."""
    special = set(tokenizer.all_special_ids)
    return ["" if i in special or i >= len(tokenizer) else tokenizer.convert_ids_to_tokens(i)
            for i in range(vocab_size)]


def tokenizer_info(tokenizer, vocab_size: int) -> dict:
    """What the page's Tokenizer (web/decoding.js) reads: the text of every id, the special tokens (one token each
    where typed as written), the unknown token, and the ids encoding adds before and after a text."""
    return {
        "tokens": _tokens(tokenizer, vocab_size),
        "special_tokens": [{"id": i, "content": str(token)} for i, token in tokenizer.added_tokens_decoder.items()],
        "unk_token_id": tokenizer.unk_token_id, "unk_token": str(tokenizer.unk_token),
        "ids_before": [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) else [],
        "ids_after": [tokenizer.eos_token_id] if getattr(tokenizer, "add_eos_token", False) else [],
    }


def _state_inputs(onnx_model) -> list[dict]:
    """The decode graph's state inputs (all but `input_ids`): name, the output that gives the next one, dtype, dims."""
    import onnx

    outputs = {output.name for output in onnx_model.graph.output}
    inputs = []
    for graph_input in onnx_model.graph.input:
        if graph_input.name == "input_ids":
            continue
        tensor = graph_input.type.tensor_type
        output = graph_input.name.replace("input.", "output.", 1)
        if output not in outputs:
            raise ValueError(f"{ONNX_FILE} has no output {output!r} for its state input {graph_input.name!r}.")
        inputs.append({"name": graph_input.name, "output": output,
                       "type": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
                       "dims": [dim.dim_value or 1 for dim in tensor.shape.dim]})  # a named axis: batch 1
    return inputs


def page_generation_settings(model) -> dict:
    """The page's first settings: sampling (greedy is a checkbox), with the model's temperature and top-p where its
    generation config samples, else the demo's. The page samples with these two alone, as the Gradio demo does (a
    config's top-k or repetition penalty is not applied)."""
    config = model.generation_config
    sampling = bool(config.do_sample)
    temperature = config.temperature if sampling and config.temperature else PAGE_DEFAULTS["temperature"]
    top_p = config.top_p if sampling and config.top_p else PAGE_DEFAULTS["top_p"]
    return {"max_new_tokens": PAGE_DEFAULTS["max_new_tokens"],  # within the page's ranges:
            "temperature": min(max(temperature, 0.01), 100.0), "top_p": min(max(top_p, 0.01), 1.0)}


def page_info(model, tokenizer, name_or_path: str, prompt: str, onnx_model, name: str | None = None) -> dict:
    """model.json: what the page reads besides decode.onnx. `name`, the page's title, defaults to the model's folder
    name or Hub id."""
    config = model.config
    eos = model.generation_config.eos_token_id
    return {
        "name": display_name(name_or_path) if name is None else name,
        "facts": card_facts(name_or_path, model),
        "cell_type": config.cell_type, "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size, "vocab_size": config.vocab_size,
        "onnx_file": ONNX_FILE, "state_inputs": _state_inputs(onnx_model),
        **tokenizer_info(tokenizer, config.vocab_size),
        "eos_token_ids": [] if eos is None else [eos] if isinstance(eos, int) else list(eos),
        "prompt": prompt, "generation": page_generation_settings(model),
    }


def _decode_graph(exported):
    """The exported decode graph as one ONNX model, its weights inside (the exporter writes them beside it)."""
    import onnx

    with tempfile.TemporaryDirectory() as scratch:
        exported.save_pretrained(scratch)
        onnx_model = onnx.load(os.path.join(scratch, ONNX_FILE))  # the external weights read in
    weights = sum(len(tensor.raw_data) for tensor in onnx_model.graph.initializer)
    if weights > MAX_WEIGHT_BYTES:
        raise UsageError(f"The model's decode graph holds {weights / 1e9:.1f} GB of weights: a page's WebAssembly "
                         f"memory holds 4 GB at most; export a smaller model for the browser (under 1 GB).")
    return onnx_model


def first_prompt(tokenizer, prompt: str = "\n") -> str:
    """`prompt` where the vocabulary has all its characters, else the vocabulary's first character (a page's first
    prompt, which a visitor replaces)."""
    if not (hasattr(tokenizer, "oov_characters") and tokenizer.oov_characters(prompt)):
        return prompt
    special = set(tokenizer.all_special_ids)
    return next(token for i, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
                if i not in special)


def _write_page(scratch: str, exported, model, tokenizer, name_or_path: str, prompt: str, runtime_dir: str,
                name: str | None) -> None:
    """The page's files (the module docstring), written into the empty folder `scratch`."""
    import onnx

    onnx_model = _decode_graph(exported)
    info = page_info(model, tokenizer, name_or_path, prompt, onnx_model, name)
    info["runtime"] = {"package": RUNTIME_PACKAGE, "version": _runtime_version(runtime_dir)}
    os.makedirs(os.path.join(scratch, "ort"))
    onnx.save(onnx_model, os.path.join(scratch, ONNX_FILE))
    with open(os.path.join(scratch, INFO_FILE), "w", encoding="utf-8") as f:
        json.dump(info, f, ensure_ascii=False, indent=1)
    for page_file in PAGE_FILES:
        shutil.copyfile(packaged_file("web", page_file), os.path.join(scratch, page_file))
    for runtime_file, copy in RUNTIME_FILES.items():
        shutil.copyfile(os.path.join(runtime_dir, runtime_file), os.path.join(scratch, "ort", copy))
    package = os.path.join(os.path.dirname(runtime_dir), "package.json")  # its version and license (MIT)
    if os.path.isfile(package):
        shutil.copyfile(package, os.path.join(scratch, "ort", "package.json"))
    os.chmod(scratch, 0o755)  # mkdtemp's folder is the owner's alone: a served folder is readable


def write_web_folder(exported, model, tokenizer, output_dir: str, name_or_path: str, prompt: str,
                     runtime_dir: str, name: str | None = None, overwrite: bool = False,
                     flag: str = "--output_dir") -> dict[str, int]:
    """Write the page's folder (the module docstring) for the model loaded from `name_or_path` into `output_dir`;
    `name` is the page's title (default: `name_or_path`'s). The folder is written beside `output_dir` first and takes
    its place only when complete: a folder there before stays until then (replaced only with `overwrite`), and a
    failed export leaves it as it was. `flag` names `output_dir` in errors. Returns the files and their sizes in
    bytes."""
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(output_dir))}-", dir=parent)
    try:
        _write_page(scratch, exported, model, tokenizer, name_or_path, prompt, runtime_dir, name)
    except BaseException as error:
        shutil.rmtree(scratch, ignore_errors=True)
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            raise UsageError(f"No space left on the device of {parent} for the page (the runtime alone is "
                             f"{_runtime_bytes(runtime_dir) / 1e6:.0f} MB, then the model's weights): free some, or "
                             f"choose another {flag}.") from None
        raise
    free = os.path.isdir(output_dir) and (overwrite or not os.listdir(output_dir))
    if os.path.exists(output_dir) and not free:
        # written by another run while this one exported (the caller found it free): theirs stays, and so does ours
        raise UsageError(f"{output_dir} was written by another run while this one exported; this export's page is "
                         f"in {scratch}: choose another {flag}, or pass --overwrite_output_dir to replace it.")
    if os.path.isdir(output_dir):
        shutil.rmtree(output_dir)
    os.replace(scratch, output_dir)
    return {os.path.relpath(os.path.join(root, file), output_dir): os.path.getsize(os.path.join(root, file))
            for root, _, files in os.walk(output_dir) for file in sorted(files)}


def check_page_greedy(model, folder: str, input_ids: torch.LongTensor, max_new_tokens: int) -> GreedyCheck:
    """Greedy decoding of `input_ids (1, T)` by `model.generate(do_sample=False)` and through the page's files."""
    return GreedyCheck(expected=generate_greedily(model, input_ids, max_new_tokens),
                       got=greedy_through_page_files(folder, input_ids, max_new_tokens))


def greedy_through_page_files(folder: str, input_ids: torch.LongTensor, max_new_tokens: int) -> torch.LongTensor:
    """Greedy decoding as the page does it, through the folder's decode.onnx and model.json, in ONNX Runtime's
    Python package: `input_ids (1, T)` -> ``(1, T + new)``, stopping after an end-of-text token."""
    import numpy as np
    import onnxruntime

    with open(os.path.join(folder, INFO_FILE), encoding="utf-8") as f:
        info = json.load(f)
    session = onnxruntime.InferenceSession(os.path.join(folder, info["onnx_file"]),
                                           providers=["CPUExecutionProvider"])
    state = {i["name"]: np.zeros(i["dims"], dtype=i["type"]) for i in info["state_inputs"]}
    outputs = ["logits"] + [i["output"] for i in info["state_inputs"]]
    tokens, new = input_ids[0].tolist(), []
    for step in range(len(tokens) + max_new_tokens - 1):
        token = tokens[step] if step < len(tokens) else new[-1]
        logits, *cache = session.run(outputs, {"input_ids": np.array([[token]], np.int64), **state})
        state = {i["name"]: value for i, value in zip(info["state_inputs"], cache)}
        if step >= len(tokens) - 1:
            new.append(int(logits[0, -1].argmax()))
            if new[-1] in info["eos_token_ids"] or len(new) == max_new_tokens:
                break
    return torch.cat([input_ids, torch.tensor([new], dtype=input_ids.dtype)], dim=1)
