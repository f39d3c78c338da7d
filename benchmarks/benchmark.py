#!/usr/bin/env python
"""Benchmarks of char_lstm against the reference PyTorch loop and the bare kernels: a table on stdout, JSON on disk.

    python benchmarks/benchmark.py                          # a few minutes, on the tiny Shakespeare char_lstm bundles
    python benchmarks/benchmark.py --corpus my_text.txt     # the same, on a text file of yours
    python benchmarks/benchmark.py --quick                  # about a minute, generated text
    python benchmarks/benchmark.py --smoke                  # seconds: checks that it runs (no targets judged)
    python benchmarks/benchmark.py --sections training,decode --device cuda        # some sections, on a GPU

Every comparison runs side by side in one process (same machine state, same threads, same weights); the ratios are
what matter, absolute times drift with the machine. Results and what they say: docs/benchmarks.md. Sections:

* `training`: characters/s of our Trainer pipeline vs the reference PyTorch loop (`reference_loop.py`: its per-item
  dataset, a shuffled `DataLoader`, the manual zero_grad/forward/backward/clip/step) vs a bare `nn.LSTM`
  forward+backward of the same shapes (the kernel bound); the reference model's size (2x512, embedding 128), block
  100, batch 64. In fp32, and in bf16 where the device runs it natively (autocast, `--bf16` in training). The
  reference loop runs first with the process as the course's script leaves it, then once more after the malloc
  settings `scripts/train.py` applies (`keep_freed_memory`), under which our pipeline and the kernel are timed. Every
  other section runs under those settings.
* `decode`: `generate()` time per character at batch 1 (sampling, temperature 0.8) vs the reference generate loop
  with the same weights, and after 100 vs 2000 new characters (a step must not get dearer).
* `batch`: generation throughput at batch 64 vs the reference loop run on 64 rows.
* `encoding`: `encode_corpus` MB/s against the per-character tokenizer.
* `memory`: peak RSS of the real training pipeline preparing a 100 MB corpus (made by repeating and perturbing text).

It uses char_lstm's public API only; `scripts/benchmark.py` runs this file.
"""

import json
import lzma
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from transformers import Trainer, TrainerCallback

from char_lstm import CharLSTMConfig, CharLSTMForCausalLM, CharLSTMTokenizer
from char_lstm.cli import run_command
from char_lstm.data import BUNDLED_CORPUS, read_text_file
from char_lstm.encoding import collate_blocks, encode_blocks
from char_lstm.errors import UsageError
from char_lstm.loading import pick_device
from char_lstm.training import CharLSTMTrainingArguments, keep_freed_memory, native_bf16

from reference_loop import ReferenceCharDataset, ReferenceCharLSTM, reference_generate, reference_training_intervals


REFERENCE_SHAPES = {"embedding_size": 128, "hidden_size": 512, "num_hidden_layers": 2, "dropout": 0.5}
BLOCK, BATCH = 100, 64
SCALE = 1.0  # of the text sizes (generated text, encoded text, the memory section's corpus); --smoke makes it 0.05


def use_smoke_sizes() -> None:
    """--smoke: a 2x32 model on 8x32 batches and 1/20 of the quick mode's text, so that every section runs in
    seconds (what the test suite checks); the numbers then mean nothing."""
    global REFERENCE_SHAPES, BLOCK, BATCH, SCALE
    REFERENCE_SHAPES = {"embedding_size": 16, "hidden_size": 32, "num_hidden_layers": 2, "dropout": 0.5}
    BLOCK, BATCH, SCALE = 32, 8, 0.05


@dataclass
class BenchmarkArguments:
    corpus: str | None = field(default=None, metadata={
        "help": "Text file to measure on (default: the tiny Shakespeare bundled with char_lstm; with --quick or "
                "--smoke, generated text)."})
    sections: str = field(
        default="training,decode,batch,encoding,memory", metadata={"help": "Comma-separated sections to run."}
    )
    quick: bool = field(default=False, metadata={"help": "Fewer steps and smaller sizes: about a minute in all."})
    smoke: bool = field(default=False, metadata={"help": "--quick with a 2x32 model and little text: checks that "
                                                         "every section runs, in seconds; the numbers mean nothing."})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, mps, or auto (cuda, then mps, then cpu)."})
    output_json: str = field(default="benchmark.json", metadata={"help": "Where to write the results."})


# ---------------------------------------------------------------------------------------------------------------------
# Helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def cpu_name() -> str:
    """The CPU's model name with its family and model numbers: a virtual machine may report only "AMD EPYC" for CPUs
    generations apart (family 25 is Zen 3/4, 26 is Zen 5)."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
                if not line.strip():  # the first processor is enough
                    break
    except OSError:
        pass
    if "model name" not in info:
        return platform.processor() or platform.machine()
    if "cpu family" not in info or "model" not in info:
        return info["model name"]
    return f"{info['model name']} (family {info['cpu family']}, model {info['model']})"


def cpu_isa() -> str:
    """The CPU's widest vector instructions that matter to torch's kernels here: AVX2, AVX-512 (with BF16), AMX."""
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    if not flags:  # not Linux: torch's own view of the CPU
        return torch.backends.cpu.get_cpu_capability()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE/NEON"
    if "avx512_bf16" in flags:
        isa += " + AVX512-BF16"
    if "amx_tile" in flags:
        isa += " + AMX"
    return isa


def environment(device: torch.device) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "isa": cpu_isa(),
        "torch_cpu_kernels": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "onednn": torch.backends.mkldnn.is_available(),
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def benchmark_text(path: str | None, quick: bool) -> str:
    """The text of --corpus `path`; without one, the tiny Shakespeare bundled with char_lstm, or generated words for
    --quick (and --smoke)."""
    if path is not None:
        if not os.path.isfile(path):
            raise UsageError(f"--corpus {path} is not a file: give a text file, or leave --corpus out to measure on "
                             "the tiny Shakespeare bundled with char_lstm.")
        return read_text_file(path)
    if not quick:
        with lzma.open(BUNDLED_CORPUS, "rt", encoding="utf-8", newline="") as f:
            return f.read()
    rng = np.random.default_rng(0)
    words = ["the", "king", "and", "queen", "ROMEO:", "speak", "hear", "me", "\n", "thou", "art", "fair"]
    return " ".join(rng.choice(words, size=int((40_000 if quick else 200_000) * SCALE)))


def reference_sized_model(tokenizer: CharLSTMTokenizer, device: torch.device) -> CharLSTMForCausalLM:
    torch.manual_seed(0)
    config = CharLSTMConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                            unk_token_id=tokenizer.unk_token_id, **REFERENCE_SHAPES)
    return CharLSTMForCausalLM(config).to(device)


def row(name: str, value: float, unit: str, target: str = "", **extra) -> dict:
    return {"benchmark": name, "value": value, "unit": unit, "target": target, **extra}


# ---------------------------------------------------------------------------------------------------------------------
# Training throughput


class _StepTimes(TrainerCallback):
    """Wall time between the ends of consecutive optimizer steps (data loading included)."""

    def __init__(self, device):
        self.device, self.last, self.intervals = device, None, []

    def on_step_end(self, args, state, control, **kwargs):
        sync(self.device)
        now = time.perf_counter()
        if self.last is not None:
            self.intervals.append(now - self.last)
        self.last = now


def _median_after_warmup(intervals: list[float], warmup: int) -> float:
    return statistics.median(intervals[warmup:] or intervals)


def time_trainer(text: str, tokenizer, device, steps: int, warmup: int, bf16: bool) -> float:
    """Seconds per step of `Trainer` on our model and data pipeline (blocks from `encode_blocks`, `collate_blocks`)."""
    blocks = encode_blocks(Dataset.from_dict({"text": [text]}), tokenizer, "text", BLOCK)
    model = reference_sized_model(tokenizer, device)
    with tempfile.TemporaryDirectory() as output_dir:
        args = CharLSTMTrainingArguments(
            output_dir=output_dir, per_device_train_batch_size=BATCH, max_steps=steps + warmup + 1, eval_strategy="no",
            save_strategy="no", load_best_model_at_end=False, lr_scheduler_type="constant", report_to="none",
            logging_strategy="no", disable_tqdm=True, bf16=bf16, use_cpu=device.type == "cpu",
            dataloader_pin_memory=device.type == "cuda",
        )
        timer = _StepTimes(device)
        Trainer(model=model, args=args, train_dataset=blocks, data_collator=collate_blocks, callbacks=[timer]).train()
    return _median_after_warmup(timer.intervals, warmup)


def time_reference_loop(text: str, tokenizer, device, steps: int, warmup: int) -> float:
    """Seconds per step of the reference PyTorch loop, on the same model shapes."""
    char_to_idx = {char: index for char, index in tokenizer.get_vocab().items() if len(char) == 1}
    dataset = ReferenceCharDataset(text, BLOCK, char_to_idx)
    model = ReferenceCharLSTM.from_char_lstm(reference_sized_model(tokenizer, device))
    return _median_after_warmup(reference_training_intervals(model, dataset, BATCH, steps + warmup, device), warmup)


def time_kernel(device, steps: int, warmup: int, bf16: bool) -> float:
    """Seconds per forward+backward of a bare 2-layer `nn.LSTM` on (64, 100, 128) inputs (gradients of the weights
    and of the input): the floor of a training step of the reference model."""
    torch.manual_seed(0)
    shapes = REFERENCE_SHAPES
    lstm = nn.LSTM(shapes["embedding_size"], shapes["hidden_size"], shapes["num_hidden_layers"], batch_first=True,
                   dropout=shapes["dropout"]).to(device).train()
    # The input needs its gradient too, as the output of an embedding does.
    x = torch.randn(BATCH, BLOCK, shapes["embedding_size"], device=device, requires_grad=True)
    intervals = []
    for _ in range(steps + warmup):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            output, _ = lstm(x)
        output.float().sum().backward()
        sync(device)
        intervals.append(time.perf_counter() - start)
    return _median_after_warmup(intervals, warmup)


def bench_training(text: str, device, quick: bool) -> list[dict]:
    """The reference loop runs first, in the process as the course's script runs it; then the process takes the malloc
    settings `scripts/train.py` applies (`keep_freed_memory`), and the reference loop runs again under them so that the
    table shows what they do for it, before our pipeline and the bare kernel are timed."""
    steps, warmup = (6, 2) if quick else (30, 3)
    tokenizer = CharLSTMTokenizer.from_corpus(text)
    chars = BATCH * BLOCK
    reference = chars / time_reference_loop(text, tokenizer, device, steps, warmup)
    rows = [row("reference loop (fp32)", reference, "chars/s")]
    reference_kept = None
    if keep_freed_memory():
        reference_kept = chars / time_reference_loop(text, tokenizer, device, steps, warmup)
        rows.append(row("reference loop (fp32), our malloc settings", reference_kept, "chars/s"))
    for bf16 in (False, True) if native_bf16(device.type) else (False,):
        name = "bf16" if bf16 else "fp32"
        ours = chars / time_trainer(text, tokenizer, device, steps, warmup, bf16)
        kernel = chars / time_kernel(device, steps, warmup, bf16)
        rows += [
            row(f"Trainer pipeline ({name})", ours, "chars/s"),
            row(f"bare nn.LSTM fwd+bwd ({name})", kernel, "chars/s"),
            row(f"Trainer ({name}) vs reference loop (fp32)", ours / reference, "ratio", ">= 1.1"),
        ]
        if reference_kept is not None:  # like for like: the reference loop under the same malloc settings
            rows.append(row(f"Trainer ({name}) vs reference loop, both our malloc", ours / reference_kept, "ratio"))
        rows.append(row(f"Trainer ({name}) vs kernel bound ({name})", ours / kernel, "ratio", ">= 0.9"))
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Generation


def _prompts(text: str, tokenizer, batch: int, length: int, device) -> torch.Tensor:
    starts = np.linspace(0, max(len(text) - length - 1, 0), batch).astype(int)
    return tokenizer([text[s : s + length] for s in starts], return_tensors="pt")["input_ids"].to(device)


def _seconds(device, generate, *args) -> float:
    """Wall time of one call, the device's queued work included."""
    sync(device)
    start = time.perf_counter()
    generate(*args)
    sync(device)
    return time.perf_counter() - start


def _model_generate(model, prompts: torch.Tensor, n: int) -> torch.Tensor:
    """Sampling at temperature 0.8 from the whole distribution, as the reference loop samples (and as trained models'
    generation_config.json asks; transformers' own default would add a top-50 filter)."""
    return model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n,
                          min_new_tokens=n, do_sample=True, temperature=0.8, top_k=0)


def _same_weights_check(model, reference, prompts: torch.Tensor) -> None:
    """Greedy text of generate() and of the reference loop must agree: the comparison is between equal models."""
    ours = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=30,
                          do_sample=False)
    theirs = reference_generate(reference, prompts, 30, temperature=0)
    if not torch.equal(ours, theirs):
        raise RuntimeError("generate() and the reference loop disagree on greedy text: the benchmark compares unequal "
                           "models.")


def decoding_weight_bytes(model: CharLSTMForCausalLM) -> int:
    """Bytes of weights one decoding step reads: every parameter but the embedding table, of which it reads one row."""
    embeddings = model.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not embeddings) + (
        embeddings.shape[1] * embeddings.element_size()
    )


def streaming_bandwidth(nbytes: int, device, repeats: int = 50) -> float:
    """Bytes/s of reading a buffer of `nbytes` again and again (as decoding reads its weights at every token: from
    the cache where they fit), best of `repeats` reductions over it with the process's threads."""
    buffer = torch.ones(max(nbytes // 4, 1), dtype=torch.float32, device=device)
    buffer.sum()  # warm-up: pages touched, caches filled
    best = float("inf")
    for _ in range(repeats):
        best = min(best, _seconds(device, torch.sum, buffer))
    return buffer.numel() * 4 / best


def bench_decode(text: str, device, quick: bool) -> list[dict]:
    """generate() at batch 1 against the reference loop, and against the floor of a decoding step: the bytes of
    weights a step reads divided by the bandwidth measured reading a buffer of that size."""
    tokenizer = CharLSTMTokenizer.from_corpus(text)
    model = reference_sized_model(tokenizer, device).eval()
    reference = ReferenceCharLSTM.from_char_lstm(model).eval()
    prompt = _prompts(text, tokenizer, 1, 20, device)
    _same_weights_check(model, reference, prompt)
    short, long = (50, 500) if quick else (100, 2000)
    _seconds(device, _model_generate, model, prompt, 10)  # warm-up
    per_char = {n: _seconds(device, _model_generate, model, prompt, n) / n * 1e3 for n in (short, long)}
    reference_seconds = min(_seconds(device, reference_generate, reference, prompt, short) for _ in range(2))
    reference_per_char = reference_seconds / short * 1e3
    weight_bytes = decoding_weight_bytes(model)
    bandwidth = streaming_bandwidth(weight_bytes, device)
    floor_per_char = weight_bytes / bandwidth * 1e3
    return [
        row("weights read per character", weight_bytes / 1e6, "MB"),
        row("bandwidth reading them", bandwidth / 1e9, "GB/s"),
        row("decoding floor (weights / bandwidth)", floor_per_char, "ms/char"),
        row("generate() vs decoding floor, time per char", per_char[short] / floor_per_char, "ratio", "<= 2.5"),
        row(f"generate(), {short} new chars", per_char[short], "ms/char"),
        row(f"generate(), {long} new chars", per_char[long], "ms/char"),
        row(f"reference generate loop, {short} chars", reference_per_char, "ms/char"),
        row("generate() vs reference loop, time per char", per_char[short] / reference_per_char, "ratio", "<= 0.5"),
        row(f"time per char, {long} vs {short}", per_char[long] / per_char[short], "ratio", "<= 1.1"),
    ]


def bench_batch(text: str, device, quick: bool) -> list[dict]:
    """Characters/s generating for 64 prompts at once, fp32 and (where the device runs it) bf16 weights, against the
    reference loop on the same 64 prompts in fp32 (as the course runs it)."""
    tokenizer = CharLSTMTokenizer.from_corpus(text)
    model = reference_sized_model(tokenizer, device).eval()
    reference = ReferenceCharLSTM.from_char_lstm(model).eval()
    prompts = _prompts(text, tokenizer, BATCH, 20, device)
    _same_weights_check(model, reference, prompts)
    n = 50 if quick else 300
    _seconds(device, reference_generate, reference, prompts, 5)  # warm-up
    theirs = BATCH * n / min(_seconds(device, reference_generate, reference, prompts, n) for _ in range(2))
    rows = [row(f"reference loop, batch {BATCH} (fp32)", theirs, "chars/s")]
    for dtype in (torch.float32, torch.bfloat16) if native_bf16(device.type) else (torch.float32,):
        name = "bf16" if dtype == torch.bfloat16 else "fp32"
        model = model.to(dtype)
        _seconds(device, _model_generate, model, prompts, 5)  # warm-up
        ours = BATCH * n / min(_seconds(device, _model_generate, model, prompts, n) for _ in range(2))
        rows += [
            row(f"generate(), batch {BATCH} ({name})", ours, "chars/s"),
            row(f"generate() ({name}) vs reference loop, batch {BATCH}", ours / theirs, "ratio", ">= 1.5"),
        ]
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Data


def bench_encoding(text: str, device, quick: bool) -> list[dict]:
    """MB/s of `encode_corpus` on ~50 MB (5 MB quick), first call (cold memory) and best of 3, against the
    per-character tokenizer on 1 MB."""
    tokenizer = CharLSTMTokenizer.from_corpus(text)
    target = (5e6 if quick else 5e7) * SCALE
    big = text * max(1, int(target // max(len(text), 1)))
    megabytes = len(big.encode("utf-8")) / 1e6
    times = []
    for _ in range(3):
        start = time.perf_counter()
        ids = tokenizer.encode_corpus(big)
        times.append(time.perf_counter() - start)
        del ids
    sample = big[:1_000_000]
    start = time.perf_counter()
    slow = tokenizer(sample, add_special_tokens=False)["input_ids"]
    slow_time = time.perf_counter() - start
    if slow != tokenizer.encode_corpus(sample).tolist():
        raise RuntimeError("encode_corpus must give the tokenizer's ids")
    return [
        row("encode_corpus, first call", megabytes / times[0], "MB/s", ">= 50"),
        row("encode_corpus, best of 3", megabytes / min(times), "MB/s", ">= 50"),
        row("tokenizer __call__", len(sample.encode("utf-8")) / 1e6 / slow_time, "MB/s"),
        row("encoded text size", megabytes, "MB"),
    ]


def write_perturbed_corpus(text: str, path: str, megabytes: float, seed: int = 0) -> int:
    """Write ~`megabytes` of text made of copies of `text`, each with 1% of its characters replaced by other
    characters of the text (so no two copies are equal); returns the number of characters written."""
    rng = np.random.default_rng(seed)
    codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    alphabet = np.unique(codes)
    written = 0
    with open(path, "w", encoding="utf-8", newline="") as f:
        while written < megabytes * 1e6:
            copy = codes.copy()
            where = rng.random(len(copy)) < 0.01
            copy[where] = rng.choice(alphabet, size=int(where.sum()))
            f.write(copy.tobytes().decode("utf-32-le"))
            written += len(copy)
    return written


_PREPARE = (  # what scripts/train.py runs
    "import sys\n"
    "from char_lstm.training import keep_freed_memory, parse_arguments, train\n"
    "keep_freed_memory()\n"
    "train(*parse_arguments(sys.argv[1:]))\n"
)


def bench_memory(text: str, device, quick: bool) -> list[dict]:
    """Peak RSS of the training pipeline (`char_lstm.training.train`: load, vocabulary, validation split, encoding,
    then one step of a tiny model) on a generated corpus of 100 MB (20 MB quick), in a subprocess."""
    megabytes = (20 if quick else 100) * SCALE
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        chars = write_perturbed_corpus(text, corpus, megabytes)
        size = os.path.getsize(corpus) / 1e6
        argv = [
            "--train_file", corpus, "--output_dir", os.path.join(tmp, "out"), "--embedding_size", "8",
            "--hidden_size", "8", "--max_steps", "1", "--eval_steps", "1", "--save_steps", "1",
            "--max_eval_samples", "64",
            "--report_to", "none", "--sample_every_evals", "0", "--use_cpu", "true", "--disable_tqdm", "true",
        ]
        env = {**os.environ, "HF_DATASETS_CACHE": os.path.join(tmp, "cache"), "HF_HUB_OFFLINE": "1"}
        log_path = os.path.join(tmp, "log.txt")
        start = time.perf_counter()
        with open(log_path, "w") as log:
            process = subprocess.Popen([sys.executable, "-c", _PREPARE, *argv], env=env, stdout=log, stderr=log)
            # os.wait4 gives this child's own peak RSS (ru_maxrss, in KiB on Linux)
            _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        elapsed = time.perf_counter() - start
        if process.returncode != 0:
            with open(log_path) as log:
                raise RuntimeError(f"the training pipeline failed on the {size:.0f} MB corpus:\n{log.read()[-2000:]}")
    return [
        row("corpus prepared", size, "MB", characters=chars),
        row("pipeline wall time (prepare + 1 step)", elapsed, "s"),
        row("peak RSS preparing it", usage.ru_maxrss / 1024, "MB", "< 2000"),
    ]


def meets(value: float, target: str) -> bool:
    """Whether `value` meets a target written as ">= 1.1", "<= 0.5" or "< 2000"."""
    operator, bound = target.split()
    return {">=": value >= float(bound), "<=": value <= float(bound), "<": value < float(bound),
            ">": value > float(bound)}[operator]


def verdict(result: dict, smoke: bool) -> str:
    """The table's target column: the target and whether the value meets it ("ok" or "MISSED"); under --smoke, whose
    numbers mean nothing, the target only, marked "n/a (smoke)"."""
    if not result["target"]:
        return ""
    if smoke:
        return f"{result['target']} n/a (smoke)"
    return f"{result['target']} {'ok' if meets(result['value'], result['target']) else 'MISSED'}"


SECTIONS = {
    "training": bench_training,
    "decode": bench_decode,
    "batch": bench_batch,
    "encoding": bench_encoding,
    "memory": bench_memory,
}


def run(args: BenchmarkArguments) -> dict:
    names = [name for name in args.sections.split(",") if name]
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        raise ValueError(f"Unknown --sections {unknown}; choose from {sorted(SECTIONS)}.")
    device = pick_device(args.device)
    if args.smoke:
        use_smoke_sizes()
        args.quick = True
    text = benchmark_text(args.corpus, args.quick)
    if "training" not in names:  # the training section applies them itself, after timing the reference loop without
        keep_freed_memory()  # every other section runs under the malloc settings of scripts/train.py
    corpus = args.corpus or ("generated text" if args.quick else "tiny_shakespeare (bundled)")
    results = {"environment": environment(device), "quick": args.quick, "smoke": args.smoke, "corpus": corpus,
               "results": []}
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results["results"] += [{"section": name, **r} for r in SECTIONS[name](text, device, args.quick)]

    env = results["environment"]
    print(f"torch {env['torch']}, {env['threads']} threads, {env['cores']} cores, {env['cpu']} ({env['isa']}; torch's "
          f"CPU kernels: {env['torch_cpu_kernels']}), device {env['device']}"
          + (f" ({env['gpu']})" if "gpu" in env else "") + f", Python {env['python']}")
    print(f"{'section':<9} {'benchmark':<44} {'value':>12}  {'unit':<8} target")
    for r in results["results"]:
        print(f"{r['section']:<9} {r['benchmark']:<44} {r['value']:>12.3f}  {r['unit']:<8} {verdict(r, args.smoke)}")
    with open(args.output_json, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.output_json}")
    return results


if __name__ == "__main__":
    sys.exit(run_command(BenchmarkArguments, run))
