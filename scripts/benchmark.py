#!/usr/bin/env python
"""Benchmarks of char_lstm, printed as a table and written as JSON.

    python scripts/benchmark.py --corpus ../shared/data/tinyshakespeare.txt
    python scripts/benchmark.py --quick            # about a minute; makes its own text when --corpus is missing

Sections (`--sections`): `encoding` (vectorized corpus encoder vs the tokenizer, MB/s), `decode` (generate() time
per character after 100 and 2000 new tokens at batch 1: the cost of a step must not grow with the length).
"""

import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import HfArgumentParser

from char_lstm import CharLSTMConfig, CharLSTMForCausalLM, CharLSTMTokenizer


@dataclass
class BenchmarkArguments:
    corpus: str | None = field(default=None, metadata={"help": "Text file to measure on (default: generated text)."})
    sections: str = field(default="encoding,decode", metadata={"help": "Comma-separated sections to run."})
    quick: bool = field(default=False, metadata={"help": "Smaller sizes, about a minute in all."})
    output_json: str = field(default="benchmark.json", metadata={"help": "Where to write the results."})


def load_text(path: str | None, quick: bool) -> str:
    if path is not None:
        with open(path, encoding="utf-8") as f:
            return f.read()
    rng = np.random.default_rng(0)
    words = ["the", "king", "and", "queen", "ROMEO:", "speak", "hear", "me", "\n", "thou", "art", "fair"]
    return " ".join(rng.choice(words, size=20_000 if quick else 200_000))


def environment() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }


def bench_encoding(text: str, quick: bool) -> list[dict]:
    """MB/s of `encode_corpus` on a corpus of ~50 MB (5 MB quick), first call (cold memory) and best of 3, against the
    per-character tokenizer on 1 MB."""
    tokenizer = CharLSTMTokenizer.from_corpus(text)
    target = 5e6 if quick else 5e7
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
    assert slow == tokenizer.encode_corpus(sample).tolist(), "encode_corpus must give the tokenizer's ids"
    return [
        {"benchmark": "encode_corpus, first call", "value": megabytes / times[0], "unit": "MB/s", "target": ">= 50"},
        {"benchmark": "encode_corpus, best of 3", "value": megabytes / min(times), "unit": "MB/s", "target": ">= 50"},
        {"benchmark": "tokenizer __call__", "value": len(sample.encode("utf-8")) / 1e6 / slow_time, "unit": "MB/s"},
        {"benchmark": "corpus size", "value": megabytes, "unit": "MB"},
    ]


def bench_decode(text: str, quick: bool) -> list[dict]:
    """generate() ms per new character at batch 1 (sampling, T=0.8) for a short and a long generation, seed-sized
    model (2x512 LSTM, embedding 128); the ratio long/short shows whether a step costs more later (target <= 1.1)."""
    tokenizer = CharLSTMTokenizer.from_corpus(text)
    torch.manual_seed(0)
    model = CharLSTMForCausalLM(CharLSTMConfig(vocab_size=len(tokenizer))).eval()
    prompt = tokenizer([text[:20]], return_tensors="pt")
    short, long = (50, 500) if quick else (100, 2000)
    per_char = {}
    model.generate(**prompt, max_new_tokens=10, do_sample=True, temperature=0.8)  # warm-up
    for n in (short, long):
        start = time.perf_counter()
        model.generate(**prompt, max_new_tokens=n, min_new_tokens=n, do_sample=True, temperature=0.8)
        per_char[n] = (time.perf_counter() - start) / n * 1e3
    return [
        {"benchmark": f"generate, {short} new chars", "value": per_char[short], "unit": "ms/char"},
        {"benchmark": f"generate, {long} new chars", "value": per_char[long], "unit": "ms/char"},
        {"benchmark": f"time per char, {long} vs {short}", "value": per_char[long] / per_char[short], "unit": "ratio",
         "target": "<= 1.1"},
    ]


SECTIONS = {"encoding": bench_encoding, "decode": bench_decode}


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses(args=argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"Unknown --sections {sorted(unknown)}; choose from {sorted(SECTIONS)}.")
    text = load_text(args.corpus, args.quick)
    results = {"environment": environment(), "quick": args.quick, "results": []}
    for name in args.sections.split(","):
        results["results"] += [{"section": name, **row} for row in SECTIONS[name](text, args.quick)]

    env = results["environment"]
    print(f"torch {env['torch']}, {env['threads']} threads, {env['cores']} cores, {env['cpu']}, Python {env['python']}")
    print(f"{'section':<10} {'benchmark':<38} {'value':>10}  {'unit':<8} target")
    for row in results["results"]:
        print(
            f"{row['section']:<10} {row['benchmark']:<38} {row['value']:>10.3f}  {row['unit']:<8} {row.get('target', '')}"
        )
    with open(args.output_json, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.output_json}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
