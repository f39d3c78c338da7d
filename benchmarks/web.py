#!/usr/bin/env python
"""The page of `scripts/export.py --format web` against Python: characters/s of greedy generation in a headless
Chromium (ONNX Runtime Web, WebAssembly, one thread) and of `model.generate()` at batch 1 (torch with one thread), for
models of the `cpu-small` and `char-rnn` presets' sizes; then the page's memory over several texts of 10,000
characters. Target (issue 35): the page >= 0.25x Python for `cpu-small`, and no memory growth.

    python benchmarks/web.py                    # both sizes, 2000 characters, 3 texts of 10,000: ~40 s
    python benchmarks/web.py --quick            # ~25 s: checks that it runs (no target judged)
    python benchmarks/web.py --sizes cpu-small --characters 5000

Each size is a freshly initialized model (random weights: the speed does not depend on training) over tiny
Shakespeare's vocabulary, saved to a temporary folder and exported with `--format web` (`char_lstm.export_command`).
Python's rate is the best of `--repeats` calls of `generate(do_sample=False, max_new_tokens=N)` after a warm-up; the
page's is the best of as many presses of Generate (greedy, N characters) after a warm-up, as the page measures it
(characters over the time from the first generated character's step to the end, its own painting included). The
greedy texts of the two must agree over their first 200 characters at least (the table shows the share). Memory: in
one page, after a warm-up, `--memory_runs` sampled texts of `--memory_characters`, with the JavaScript heap, the DOM
nodes and the renderer processes' resident memory (which holds the WebAssembly memory) after a garbage collection
before and after each. Results: docs/benchmarks.md ("In the browser"). Needs selenium, Chromium and chromedriver,
and `npm ci` (onnxruntime-web); without them: one line, exit 2.
"""

import contextlib
import json
import lzma
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch
from benchmark import cpu_isa, cpu_name, meets, row

from char_lstm import CharLSTMConfig, CharLSTMForCausalLM, CharLSTMTokenizer
from char_lstm.cli import run_command
from char_lstm.data import BUNDLED_CORPUS
from char_lstm.errors import UsageError
from char_lstm.export_command import ExportArguments, run_export
from char_lstm.training.arguments import PRESETS
from char_lstm.web_browser import Page, browser_unavailable, headless_chromium, serve_folder
from char_lstm.web_export import find_runtime


SHAPE_KEYS = ("embedding_size", "hidden_size", "num_hidden_layers")
TARGET = ">= 0.25"  # the page's characters/s over Python's, cpu-small
PROMPT = "ROMEO:"
# no growth from one text to the next: the DOM holds the same nodes, the JavaScript heap the same objects (give or
# take the garbage collector's timing); the renderer's resident memory moves by a few MB either way, shown only
MEMORY_TARGETS = {"js_heap": "< 1", "dom_nodes": "<= 0"}


@dataclass
class WebBenchmarkArguments:
    sizes: str = field(default="cpu-small,char-rnn", metadata={"help": "Comma-separated presets whose model sizes "
                                                                       "to measure."})
    characters: int = field(default=2000, metadata={"help": "Characters each timed generation makes (page and "
                                                            "Python alike)."})
    repeats: int = field(default=3, metadata={"help": "Timed generations per side and size (the best counts)."})
    memory_characters: int = field(default=10_000, metadata={"help": "Characters of each text of the memory part."})
    memory_runs: int = field(default=3, metadata={"help": "Texts generated in one page for the memory part (0: "
                                                          "none)."})
    quick: bool = field(default=False, metadata={"help": "300 characters, one repeat, 2 texts of 1000: checks that it "
                                                         "runs, in seconds; no target judged."})
    web_runtime: str | None = field(default=None, metadata={"help": "The dist folder of onnxruntime-web (default: "
                                                                    "the checkout's node_modules, after `npm ci`)."})
    output_json: str = field(default="web_benchmark.json", metadata={"help": "Where to write the results."})


# ---------------------------------------------------------------------------------------------------------------------
# The models


def tiny_shakespeare_tokenizer() -> CharLSTMTokenizer:
    with lzma.open(BUNDLED_CORPUS, "rt", encoding="utf-8", newline="") as f:
        return CharLSTMTokenizer.from_corpus(f.read())


def preset_model(preset: str, tokenizer: CharLSTMTokenizer) -> CharLSTMForCausalLM:
    """A freshly initialized model of the preset's size (its embedding, hidden size and layers)."""
    if preset not in PRESETS:
        raise UsageError(f"--sizes {preset}: no such preset; choose from {', '.join(PRESETS)}.")
    torch.manual_seed(0)
    config = CharLSTMConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                            unk_token_id=tokenizer.unk_token_id, **{k: PRESETS[preset][k] for k in SHAPE_KEYS})
    return CharLSTMForCausalLM(config).eval()


def export_page(model, tokenizer, work: str, preset: str, runtime: str) -> str:
    """Save the model and export it with --format web; the page's folder (its name: the preset)."""
    saved = os.path.join(work, "models", preset)
    model.save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    folder = os.path.join(work, "pages", preset)
    # no check: the benchmark compares the page's own greedy text with generate()'s; its report line on stderr
    with contextlib.redirect_stdout(sys.stderr):
        run_export(ExportArguments(model_name_or_path=saved, output_dir=folder, format="web", prompt=PROMPT,
                                   check=False, web_runtime=runtime))
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# Speed


def python_rate(model, tokenizer, n: int, repeats: int) -> tuple[float, str]:
    """Best characters/s of greedy `generate()` at batch 1 after a warm-up, and its text (the prompt left out)."""
    ids = tokenizer([PROMPT], return_tensors="pt")["input_ids"]
    mask = torch.ones_like(ids)
    best, out = 0.0, None
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=50, do_sample=False)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False)
            best = max(best, n / (time.perf_counter() - start))
    if out.shape[1] != ids.shape[1] + n:
        raise RuntimeError(f"generate() stopped after {out.shape[1] - ids.shape[1]} of {n} characters.")
    return best, tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def page_rate(page: Page, n: int, repeats: int) -> tuple[float, str]:
    """Best characters/s of the page's greedy generation of `n` characters after a warm-up, and its text."""
    page.generate(prompt=PROMPT, length=50, greedy=True)  # warm-up: the runtime's first runs, the page's first paint
    best, text = 0.0, ""
    for _ in range(repeats):
        text = page.generate(prompt=PROMPT, length=n, greedy=True, timeout=600)
        made = int(page.element("rate").get_attribute("data-characters"))
        if made != n:
            raise RuntimeError(f"the page generated {made} of {n} characters: {page.status}")
        best = max(best, page.characters_per_second)
    return best, text[len(PROMPT):]


def agreeing(a: str, b: str) -> int:
    """How many leading characters `a` and `b` share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def bench_size(preset: str, model, tokenizer, driver, url: str, args) -> list[dict]:
    """generate() and the page (served at `url`/`preset`/) side by side: characters/s, their ratio, equal texts."""
    python, python_text = python_rate(model, tokenizer, args.characters, args.repeats)
    page = Page(driver, f"{url}{preset}/")
    web, web_text = page_rate(page, args.characters, args.repeats)
    errors = page.console_errors()
    if errors:
        raise RuntimeError(f"the page's console has errors: {errors[:3]}")
    if agreeing(python_text, web_text) < min(len(python_text), 200):
        raise RuntimeError(f"the page's greedy text differs from generate()'s: {web_text[:80]!r} against "
                           f"{python_text[:80]!r}")
    shape = f"{model.config.num_hidden_layers}x{model.config.hidden_size} LSTM"
    return [
        row(f"{preset} ({shape}): generate(), 1 thread", python, "chars/s", size=preset),
        row(f"{preset}: page, WebAssembly, 1 thread", web, "chars/s", size=preset),
        row(f"{preset}: page / generate()", web / python, "ratio", TARGET if preset == "cpu-small" else "",
            size=preset),
        row(f"{preset}: greedy text equal to generate()'s, share", agreeing(python_text, web_text) / len(python_text),
            "ratio", size=preset),
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Memory


def set_controls(driver, **values) -> None:
    """Set the page's inputs as a script does (`Page.set` types into them, as a visitor would: every typed value
    leaves its text nodes in the browser's undo history, 2 DOM nodes a text, which the memory part must not count)."""
    for element_id, value in values.items():
        driver.execute_script("document.getElementById(arguments[0]).value = arguments[1];", element_id, str(value))


def page_memory(driver, url: str, runs: int, characters: int) -> list[dict]:
    """memory() before and after each of `runs` sampled texts of `characters` in one page, after a warm-up."""
    page = Page(driver, url)
    page.set(greedy=False)
    set_controls(driver, length=characters, temperature=0.8, top_p=1.0, seed=0)
    page.generate(timeout=600)  # warm-up: a text of the same length
    samples = []
    for run in range(runs):
        set_controls(driver, seed=run + 1)
        before = page.memory()
        page.generate(timeout=600)
        made = int(page.element("rate").get_attribute("data-characters"))
        samples.append({"run": run + 1, "characters": made, "before": before, "after": page.memory()})
    errors = page.console_errors()
    if errors:
        raise RuntimeError(f"the page's console has errors: {errors[:3]}")
    return samples


def memory_rows(samples: list[dict]) -> list[dict]:
    """Growth from the first text's end to the last one's (what stays), and from before the first (the text shown)."""
    first, last = samples[0], samples[-1]
    rows = []
    for key, unit, scale, target in (("js_heap", "MB", 1e6, MEMORY_TARGETS["js_heap"]),
                                     ("dom_nodes", "nodes", 1, MEMORY_TARGETS["dom_nodes"]),
                                     ("renderer_rss", "MB", 1e6, "")):
        rows += [
            row(f"{key} growth, after text 1 to after text {last['run']}",
                (last["after"][key] - first["after"][key]) / scale, unit, target),
            row(f"{key} growth, before text 1 to after text {last['run']}",
                (last["after"][key] - first["before"][key]) / scale, unit),
        ]
    return rows


def print_memory(samples: list[dict]) -> None:
    print(f"{'text':>4} {'chars':>6}  {'JS heap MB':>17}  {'DOM nodes':>11}  {'renderer RSS MB':>17}")
    for s in samples:
        b, a = s["before"], s["after"]
        print(f"{s['run']:>4} {s['characters']:>6}  {b['js_heap'] / 1e6:>7.2f} -> {a['js_heap'] / 1e6:>6.2f}  "
              f"{b['dom_nodes']:>4} -> {a['dom_nodes']:>4}  {b['renderer_rss'] / 1e6:>7.1f} -> "
              f"{a['renderer_rss'] / 1e6:>6.1f}")


# ---------------------------------------------------------------------------------------------------------------------
# The run


def use_quick_sizes(args: WebBenchmarkArguments) -> None:
    args.characters, args.repeats = min(args.characters, 300), 1
    args.memory_characters, args.memory_runs = min(args.memory_characters, 1000), min(args.memory_runs, 2)


def verdict(result: dict, quick: bool) -> str:
    if not result["target"]:
        return ""
    if quick:
        return f"{result['target']} n/a (quick)"
    return f"{result['target']} {'ok' if meets(result['value'], result['target']) else 'MISSED'}"


def environment(driver, page_folder: str) -> dict:
    """The CPU, the load, and the versions: torch, Chromium, onnxruntime-web (as the page's model.json records it)."""
    with open(os.path.join(page_folder, "model.json"), encoding="utf-8") as f:
        version = json.load(f)["runtime"]["version"]
    return {"cpu": cpu_name(), "isa": cpu_isa(), "cores": len(os.sched_getaffinity(0)), "load": os.getloadavg()[0],
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "chromium": driver.capabilities.get("browserVersion"), "onnxruntime_web": version}


def measure(args: WebBenchmarkArguments, presets: list[str]) -> dict:
    """Export a page per size; the memory part first (in a browser that has opened no other page yet), then the
    speed of each size."""
    tokenizer = tiny_shakespeare_tokenizer()
    results = {"quick": args.quick, "characters": args.characters, "repeats": args.repeats, "results": []}
    with tempfile.TemporaryDirectory() as work:
        models = {preset: preset_model(preset, tokenizer) for preset in presets}
        folders = [export_page(model, tokenizer, work, preset, args.web_runtime) for preset, model in models.items()]
        with serve_folder(os.path.join(work, "pages")) as url, headless_chromium() as driver:
            results["environment"] = environment(driver, folders[0])
            if args.memory_runs > 0:
                print(f"memory: {args.memory_runs} texts of {args.memory_characters} ...", file=sys.stderr, flush=True)
                results["memory_size"] = "cpu-small" if "cpu-small" in presets else presets[0]
                results["memory"] = page_memory(driver, f"{url}{results['memory_size']}/", args.memory_runs,
                                                args.memory_characters)
            for preset, model in models.items():
                print(f"measuring {preset} ...", file=sys.stderr, flush=True)
                results["results"] += bench_size(preset, model, tokenizer, driver, url, args)
    if "memory" in results:
        results["results"] += memory_rows(results["memory"])
    return results


def run(args: WebBenchmarkArguments) -> dict:
    presets = [name for name in args.sizes.split(",") if name]
    if not presets or args.characters < 1 or args.repeats < 1:
        raise UsageError("--sizes, --characters and --repeats need at least one each.")
    reason = browser_unavailable()
    if reason is not None:
        raise UsageError(f"the web benchmark cannot run: {reason}")
    try:
        args.web_runtime = find_runtime(args.web_runtime)
    except UsageError as error:
        raise UsageError(f"the web benchmark cannot run: {error}") from None
    if args.quick:
        use_quick_sizes(args)
    torch.set_num_threads(1)
    results = measure(args, presets)
    env = results["environment"]
    print(f"{env['cpu']} ({env['isa']}), {env['cores']} cores, load {env['load']:.1f}; torch {env['torch']} with "
          f"{env['torch_threads']} thread, Chromium {env['chromium']} with onnxruntime-web {env['onnxruntime_web']} "
          f"(WebAssembly, 1 thread), Python {env['python']}; greedy, {args.characters} characters, best of "
          f"{args.repeats}")
    print(f"{'benchmark':<56} {'value':>10}  {'unit':<8} target")
    for r in results["results"]:
        print(f"{r['benchmark']:<56} {r['value']:>10.2f}  {r['unit']:<8} {verdict(r, args.quick)}")
    if "memory" in results:
        print(f"memory of one {results['memory_size']} page (after a garbage collection), sampled texts of "
              f"{args.memory_characters} characters:")
        print_memory(results["memory"])
    with open(args.output_json, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.output_json}")
    missed = [r for r in results["results"] if r["target"] and not args.quick and not meets(r["value"], r["target"])]
    if missed:
        raise SystemExit(f"target missed: {missed[0]['benchmark']} is {missed[0]['value']:.2f}, target "
                         f"{missed[0]['target']}")
    return results


if __name__ == "__main__":
    sys.exit(run_command(WebBenchmarkArguments, run))
