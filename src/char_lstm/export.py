"""Exporting a trained model with transformers' exporters (`transformers.exporters`, what `scripts/export.py` runs):
torch.export (`DynamoExporter`, a `.pt2` program), ONNX (`OnnxExporter`, run by ONNX Runtime) and ExecuTorch
(`ExecutorchExporter`, a `.pte` program for phones), and greedy decoding through the exported programs, checked
against `model.generate()`.

`export_for_generation` writes two graphs, as the exporters decompose every generative model:

- ``prefill``: the prompt ``input_ids (1, T)`` and a fresh cache in; logits ``(1, T, V)`` and the cache holding the
  state after the prompt out. ``T`` is the length of the prompt it was traced with: torch's LSTM decomposition
  unrolls the time loop, so the sequence axis cannot stay dynamic (docs/export.md);
- ``decode``: one token ``(1, 1)`` and the cache in; logits ``(1, 1, V)`` and the next cache out. Any prompt goes
  through it one character at a time from the zero state, and every generated character after it.

The cache is transformers' `DynamicCache`, flattened by the exporter into its tensors: per layer the recurrent states
``(1, H)`` each (``h, c`` for an LSTM, ``h`` for a GRU/RNN) and the layer's token count (a 0-d int64, which the model
does not read). `greedy_generate` carries them from one call to the next in that layout.
"""

import contextlib
import importlib.metadata
import importlib.util
import io
import logging
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass

import torch
from packaging import version
from torch.utils._pytree import tree_flatten, tree_unflatten

from .cache_char_lstm import cache_from_states
from .errors import UsageError


# The packages each format needs beyond torch and transformers, and how to install them.
FORMATS = {
    "dynamo": ((), None),
    "onnx": (("onnx", "onnxscript", "onnxruntime"), 'pip install "char-lstm[export]"'),
    "executorch": (("executorch",), "pip install executorch"),
    "web": (("onnx", "onnxscript", "onnxruntime"), 'pip install "char-lstm[export]"'),  # ONNX, in a page
}


def exporters_unavailable() -> str | None:
    """Why transformers' exporters cannot run here (None: they can): they need torch 2.11 or newer."""
    if importlib.util.find_spec("transformers.exporters") is None:
        return "this transformers has no transformers.exporters: pip install -U transformers"
    if version.parse(torch.__version__.split("+")[0]) < version.parse("2.11"):
        return f"transformers' exporters need torch 2.11 or newer, this is {torch.__version__}: pip install -U torch"
    return None


def check_format(export_format: str) -> None:
    """A one-line UsageError for an unknown format, or one that cannot export here (old torch, missing packages)."""
    if export_format not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {export_format!r}.")
    reason = exporters_unavailable()
    if reason is not None:
        raise UsageError(f"--format {export_format} cannot export here: {reason}.")
    packages, install = FORMATS[export_format]
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"--format {export_format} needs {', '.join(missing)}, which this Python does not have: "
                         f"{install}.")


def _check_known_issues(model, export_format: str) -> None:
    """A one-line UsageError where the installed packages are known to export this model wrongly: onnxscript before
    0.7.2 lowers PyTorch's GRU without ONNX's `linear_before_reset=1` (another equation: logits off by ~0.4)."""
    if export_format == "onnx" and model.config.cell_type == "gru":
        installed = importlib.metadata.version("onnxscript")
        if version.parse(installed) < version.parse("0.7.2"):
            raise UsageError(f"onnxscript {installed} exports a GRU wrongly (fixed in 0.7.2): "
                             f'pip install "onnxscript>=0.7.2", or pip install "char-lstm[export]".')


@contextlib.contextmanager
def _layers_own_kernel(model, export_format: str):
    """For ExecuTorch, the decoding step traced through the layers' own kernel (`aten.lstm`/`gru`/`rnn` over one
    step) instead of the model's hand-written step, which prepares its weights in every call (the first layer's
    ``(V, gates * H)`` input table, the LSTM's cell-gate rows times -2). ONNX's optimizer folds that preparation into
    constants; ExecuTorch's pipeline does not, and runs it outside XNNPACK: 131 ms a character for a 2x512 LSTM,
    against 0.8 ms through the kernel (docs/export.md). The torch.export program keeps the hand-written step, faster
    there (6.4 against 12.8 ms). A forward pre-hook on every layer is what makes the model run the layers' own
    forward (`step_char_lstm._weights_in_place`); the hooks do nothing and are removed after the export."""
    if export_format != "executorch":
        yield
        return
    hooks = [layer.register_forward_pre_hook(lambda module, args: None) for layer in model.model.layers]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


@contextlib.contextmanager
def _quiet():
    """Silence what the exporters say that is no news to a user: torch.onnx's progress lines on stdout ("[torch.onnx]
    Run decompositions... ✅", six per graph) and its list of torchlib functions it could not inspect, onnx_ir's notes
    on initializers it kept ("Skipped deduplication of initializer 'fill_2'"), transformers' warning that the
    installed torch and onnxscript differ from those it tested (the export's check compares the programs with
    generate(), and the extra pins the onnxscript that exports a GRU right), torch.export's note that `nn.LSTM`
    reassigned its `_flat_weights` while traced (the eager model is unchanged: tested), torch's deserializer falling
    back to pickle for the cache in a .pt2's example inputs (its message fails to format in torch 2.13), and
    deprecation warnings of torch's pytree raised inside transformers' exporters (their calls, not ours). When the
    export fails, what it printed goes to stderr before the error."""
    names = ("torch.onnx", "torch._export.serde.serialize", "onnx_ir", "transformers.exporters.utils")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    printed = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(printed):
            warnings.filterwarnings("ignore", message="The tensor attributes .*_flat_weights")
            warnings.filterwarnings("ignore", message="`treespec.children_specs` is deprecated")
            warnings.filterwarnings("ignore", message="`isinstance\\(treespec, LeafSpec\\)` is deprecated")
            yield
    except BaseException:  # a failed export: what the exporter printed is the diagnosis
        sys.stderr.write(printed.getvalue())
        raise
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _exporter_and_config(export_format: str):
    """The transformers exporter of `export_format` and its config (static shapes: see the module docstring)."""
    check_format(export_format)
    from transformers.exporters import (
        DynamoConfig,
        DynamoExporter,
        ExecutorchConfig,
        ExecutorchExporter,
        OnnxConfig,
        OnnxExporter,
    )

    exporter, config = {
        "dynamo": (DynamoExporter, DynamoConfig),
        "onnx": (OnnxExporter, OnnxConfig),
        "executorch": (ExecutorchExporter, ExecutorchConfig),
    }[export_format]
    return exporter(), config()


def _export(model, method: str, export_format: str, inputs: dict, **kwargs):
    """`exporter.<method>(model, inputs, config)`, the model in eval mode, the random state left as it was.

    The exporters put a bound `forward` on the model while they trace (transformers 5.25: `_capture_forward` and
    `patch_forward_signature` restore it as an instance attribute), which would send every later `generate()` to
    transformers' slower loop (`CharLSTMForCausalLM._lean_decoding_possible`): it is taken off again here."""
    model.eval()  # dropout off: the exported graphs are for inference
    with _quiet():  # the exporter warns of version drift when it is made
        exporter, config = _exporter_and_config(export_format)
    _check_known_issues(model, export_format)
    had_forward = "forward" in model.__dict__
    try:
        # export_for_generation runs generate() (sampling, when the generation config says so): the RNG is kept
        with torch.random.fork_rng(devices=[]), _quiet(), _layers_own_kernel(model, export_format):
            return getattr(exporter, method)(model, inputs, config, **kwargs)
    finally:
        if not had_forward:
            model.__dict__.pop("forward", None)


def export_model(model, input_ids: torch.LongTensor, export_format: str):
    """The whole model as one graph (`HfExporter.export`): `input_ids (B, T)` in, logits ``(B, T, V)`` and the cache
    of the final state out, for inputs of the traced shape. Returns a transformers `ExportedModel`."""
    return _export(model, "export", export_format, {"input_ids": input_ids})


def export_for_generation(model, input_ids: torch.LongTensor, export_format: str):
    """The ``prefill`` and ``decode`` graphs (`HfExporter.export_for_generation`), traced with the prompt
    `input_ids (1, T)`; the model's generation config is saved with them. Returns a transformers `ExportedModel`."""
    if input_ids.shape[0] != 1:
        raise UsageError(f"Export with one prompt (batch 1), got a batch of {input_ids.shape[0]}.")
    return _export(model, "export_for_generation", export_format, {"input_ids": input_ids},
                   generation_config=model.generation_config)


# ---------------------------------------------------------------------------------------------------------------------
# Greedy decoding through the exported graphs


class _Graph:
    """One exported graph, called with `input_ids` and a cache made of `cache_leaves` (the cache's tensors in the
    exporter's order), laid out exactly as its export traced it: the cache is rebuilt from the graph's input spec,
    which torch.export checks call by call (the cache's Python attributes included), and the kwargs it was traced
    with as constants (``attention_mask=None``) are passed again. Calls return the model's output (``logits``,
    ``cache``)."""

    def __init__(self, runner):
        from transformers.exporters.metadata import load_treespec

        kwargs_spec = load_treespec(runner.metadata.in_spec).child(1)  # (args, kwargs): the kwargs dict
        self.runner = runner
        self.cache_spec = kwargs_spec.child(kwargs_spec.context.index("cache"))
        self.constants = dict(runner.metadata.in_constants)

    def __call__(self, input_ids: torch.LongTensor, cache_leaves: list[torch.Tensor]):
        if len(cache_leaves) != self.cache_spec.num_leaves:
            raise ValueError(f"The exported graph takes a cache of {self.cache_spec.num_leaves} tensors, got "
                             f"{len(cache_leaves)}: the state comes from another model.")
        cache = tree_unflatten(cache_leaves, self.cache_spec)
        return self.runner(**self.constants, input_ids=input_ids, cache=cache)


def _zero_state_leaves(exported) -> list[torch.Tensor]:
    """The cache's tensors for the zero initial state of one sequence, in the exporter's order."""
    config = exported.config
    zeros = torch.zeros(1, config.hidden_size, dtype=exported.dtype)
    states = [(zeros,) * config.number_of_conv_states for _ in range(config.num_hidden_layers)]
    return tree_flatten(cache_from_states(config, states))[0]


def _traced_prompt_length(exported) -> int:
    return exported.components["prefill"].metadata.kwargs["input_ids"]["shape"][1]


def greedy_generate(exported, input_ids: torch.LongTensor, max_new_tokens: int,
                    eos_token_id: int | list[int] | None = None) -> torch.LongTensor:
    """Greedy decoding through an `export_for_generation` export: `input_ids (1, T)` -> ``(1, T + new)``, as
    `model.generate(do_sample=False)` gives it (the argmax at every step; stops after an `eos_token_id`).

    A prompt of the traced length goes through ``prefill`` in one call; any other through ``decode``, one character
    at a time from the zero state. Each new character is fed to ``decode`` with the cache it returned last."""
    from transformers import DynamicCache

    if input_ids.shape[0] != 1:
        raise ValueError(f"greedy_generate takes one prompt (batch 1), got a batch of {input_ids.shape[0]}.")
    stop = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    decode = _Graph(exported.runners["decode"])
    if input_ids.shape[1] == _traced_prompt_length(exported):
        fresh = tree_flatten(DynamicCache(config=exported.config))[0]
        out = _Graph(exported.runners["prefill"])(input_ids, fresh)
    else:
        out, leaves = None, _zero_state_leaves(exported)
        for column in range(input_ids.shape[1]):
            out = decode(input_ids[:, column : column + 1], leaves)
            leaves = tree_flatten(out.cache)[0]
    tokens = []
    while len(tokens) < max_new_tokens:
        token = out.logits[:, -1].argmax(dim=-1, keepdim=True)  # (1, 1)
        tokens.append(token)
        if len(tokens) == max_new_tokens or int(token) in stop:
            break
        out = decode(token, tree_flatten(out.cache)[0])
    return torch.cat([input_ids, *tokens], dim=1)


@dataclass
class GreedyCheck:
    """`greedy_generate` through an export against `model.generate(do_sample=False)`, token by token."""

    expected: torch.LongTensor  # (1, T + new) from generate()
    got: torch.LongTensor  # (1, T + new') through the export

    @property
    def equal(self) -> bool:
        return torch.equal(self.expected, self.got)

    @property
    def first_difference(self) -> int | None:
        """The first position (prompt included) where the two sequences differ, None when they are equal."""
        if self.equal:
            return None
        length = min(self.expected.shape[1], self.got.shape[1])
        differ = (self.expected[0, :length] != self.got[0, :length]).nonzero()
        return int(differ[0]) if len(differ) else length


def generate_greedily(model, input_ids: torch.LongTensor, max_new_tokens: int) -> torch.LongTensor:
    """`model.generate(do_sample=False)` of `input_ids (1, T)`, stopping at the model's end-of-text token."""
    return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                          do_sample=False, temperature=None, top_k=None, top_p=None,
                          eos_token_id=model.generation_config.eos_token_id, pad_token_id=model.config.pad_token_id)


def check_greedy(model, exported, input_ids: torch.LongTensor, max_new_tokens: int) -> GreedyCheck:
    """Greedy decoding of `input_ids (1, T)` by `model.generate(do_sample=False)` and through `exported`."""
    return GreedyCheck(expected=generate_greedily(model, input_ids, max_new_tokens),
                       got=greedy_generate(exported, input_ids, max_new_tokens, model.generation_config.eos_token_id))


def timed(function, *args, **kwargs):
    """`(function(*args, **kwargs), seconds it took)`."""
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------------------------
# Writing and loading an export


def _in_use(folder: str, overwrite: bool) -> bool:
    """Whether `folder` holds files (to be replaced); without `overwrite`, a one-line UsageError."""
    if not (os.path.isdir(folder) and os.listdir(folder)):
        return False
    if not overwrite:
        raise UsageError(f"{folder} is not empty: choose another --output_dir or pass --overwrite_output_dir.")
    return True


def save_export(exported, tokenizer, output_dir: str, overwrite: bool = False) -> dict[str, int]:
    """Write the programs (`ExportedModel.save_pretrained`: one file per graph, `export.json`, `config.json`,
    `generation_config.json`) and the tokenizer into `output_dir`, replacing it when `overwrite`. Returns the
    programs' files and their sizes in bytes."""
    if _in_use(output_dir, overwrite):
        shutil.rmtree(output_dir)
    exported.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    programs = [name for name in sorted(os.listdir(output_dir)) if name.startswith(("prefill.", "decode."))]
    return {name: os.path.getsize(os.path.join(output_dir, name)) for name in programs}


def load_export(folder: str, trust_remote_code: bool = False):
    """An export written by `save_export`, loaded on its runtime. ONNX and ExecuTorch programs load as they are; a
    torch.export program (.pt2) is unpickled, which runs code from the file, so transformers loads it only with
    `trust_remote_code=True`: pass it for an export you trust (one you wrote). Without it, a one-line UsageError."""
    from transformers.exporters import ExportedModel

    try:
        with _quiet():
            return ExportedModel.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except ValueError as error:  # transformers' refusal: several lines, about a Hub repository
        if trust_remote_code or "trust_remote_code=True" not in str(error):
            raise
        what = "its torch.export programs (.pt2) are unpickled" if "pickled" in str(error) else "it holds code"
        raise UsageError(f"{folder}: loading it runs code from its files ({what}); for an export you trust (one you "
                         f"wrote), pass load_export({folder!r}, trust_remote_code=True).") from None
