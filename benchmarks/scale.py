#!/usr/bin/env python
"""The training pipeline on corpora of real size: preparation speed, time to the first step (cold and warm cache),
peak memory, training and evaluation speed; and a large vocabulary against a small one.

    python benchmarks/scale.py --corpus c10=/data/c10.txt --corpus c1g=/data/c1000.txt \\
        --corpus tree=/data/linux-source-6.1 --include '*.c' '*.h' --many zh=/data/zh.txt --small shakespeare

Each corpus is trained on twice by `scripts/train.py`'s `train()` in a fresh process: first with an empty `datasets`
cache (cold: reading, counting, encoding, caching), then again (warm: the cache hit). Each run is the `cpu-small`
preset's model for `--steps` steps with one periodic evaluation in the middle, samples off and a validation split of
`--validation_split_percentage` (the final evaluation reads a sample: `--final_eval_stderr`). The child reports:

* preparation MB/s: the text's size over the time from the start of `train()` to the first training step;
* time to the first step, from the process's start (imports included), cold and warm;
* peak RSS of the process (`ru_maxrss`: resident pages, memory-mapped cache files included);
* training characters/s (steps after the first, evaluation excluded) and evaluation characters/s (forward only),
  and the periodic evaluation's time as a share of the training time between two evaluations.

`--many NAME=PATH` (a text of thousands of distinct characters) and `--small NAME` (a corpus of the same kind with a
small vocabulary; `shakespeare` is the bundled tiny Shakespeare) are then compared: training characters/s and
`generate()` time per character at batch 1 of the two trained models, greedy and sampling as `scripts/generate.py`
samples (targets: >= 0.5x and <= 1.5x).
Results: docs/benchmarks.md ("Corpora of real size"). Timings vary with the machine's load: compare within a run.
"""

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time


STARTED = time.monotonic()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(spec: dict) -> None:
    """Train once as the spec says and print one JSON line of measurements."""
    from transformers import TrainerCallback

    from char_lstm.training import keep_freed_memory, parse_arguments, train

    keep_freed_memory()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")  # as scripts/train.py

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks, self.evals = {}, []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks["train_begin"] = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.setdefault("first_step", time.monotonic())
            self.marks["step_end"] = time.monotonic()
            self.marks.setdefault("steps", []).append(time.monotonic())

        def on_evaluate(self, args, state, control, **kwargs):
            metrics = kwargs.get("metrics") or {}  # Trainer's speed metrics give the number of blocks read
            samples = round(metrics["eval_samples_per_second"] * metrics["eval_runtime"]) if metrics else None
            self.evals.append((state.global_step, time.monotonic() - self.marks["step_end"], samples))

    clock = Clock()
    began = time.monotonic()
    model_args, data_args, training_args = parse_arguments(spec["argv"])
    chars_per_step = data_args.block_size * training_args.per_device_train_batch_size * training_args.world_size
    eval_steps = training_args.eval_steps
    metrics = train(model_args, data_args, training_args, callbacks=[clock])
    steps = clock.marks["steps"]
    periodic = [seconds for step, seconds, _ in clock.evals if step < len(steps)]
    blocks = [samples for step, _, samples in clock.evals if step < len(steps)]
    eval_seconds = periodic[0] if periodic else float("nan")
    train_seconds = steps[-1] - steps[0] - sum(periodic)
    print(json.dumps({
        "prep_seconds": clock.marks["train_begin"] - began,
        "first_step_from_start": clock.marks["first_step"] - STARTED,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "train_chars_per_s": (len(steps) - 1) * chars_per_step / train_seconds,
        "eval_seconds": eval_seconds,
        "train_seconds_between_evals": train_seconds / (len(steps) - 1) * eval_steps,
        "block_size": data_args.block_size,
        "eval_blocks": blocks[0] if blocks else None,
        "eval_loss": metrics.get("eval_loss"),
    }), flush=True)


def size_of(path: str, include: list[str] | None) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    from char_lstm.data import expand_files
    return sum(os.path.getsize(p) for p in expand_files(path, "--train_file", include))


def run_child(argv: list[str], cache: str, spec: dict) -> dict:
    env = {**os.environ, "HF_DATASETS_CACHE": cache, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.path.join(ROOT, "src")}
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps({**spec, "argv": argv})], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the run failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # eval characters/s: the periodic evaluation's blocks (a sample, or the whole validation split when smaller)
    if result["eval_blocks"]:
        result["eval_chars_per_s"] = result["eval_blocks"] * result["block_size"] / result["eval_seconds"]
    return result


def corpus_runs(name: str, path: str, args, out_root: str) -> dict:
    spec = {"eval_steps": args.steps // 2}
    cache = tempfile.mkdtemp(prefix=f"scale-{name}-", dir=args.work_dir)
    argv = ["--preset", "cpu-small", "--max_train_seconds", "0", "--max_steps", str(args.steps),
            "--eval_steps", str(spec["eval_steps"]), "--save_steps", str(spec["eval_steps"]),
            "--sample_every_evals", "0", "--report_to", "none", "--logging_steps", "1000",
            "--validation_split_percentage", str(args.validation_split_percentage), "--overwrite_output_dir", "true"]
    if path == "shakespeare":
        argv += ["--dataset_name", "karpathy/tiny_shakespeare"]
    else:
        argv += ["--train_file", path] + (["--include", *args.include] if args.include and os.path.isdir(path) else [])
    output = os.path.join(out_root, name)
    runs = {}
    for kind in ("cold", "warm"):
        runs[kind] = run_child(argv + ["--output_dir", output], cache, spec)
    shutil.rmtree(cache, ignore_errors=True)
    megabytes = (size_of(path, args.include) if path != "shakespeare" else 1_115_394) / 1e6
    cold, warm = runs["cold"], runs["warm"]
    return {
        "corpus": name, "MB": megabytes, "prep_MB_per_s": megabytes / cold["prep_seconds"],
        "first_step_cold_s": cold["first_step_from_start"], "first_step_warm_s": warm["first_step_from_start"],
        "peak_rss_gb": max(cold["peak_rss_gb"], warm["peak_rss_gb"]),
        "train_chars_per_s": warm["train_chars_per_s"], "eval_chars_per_s": warm.get("eval_chars_per_s"),
        "eval_share": warm["eval_seconds"] / warm["train_seconds_between_evals"], "model": output,
    }


def generate_seconds_per_char(model_dir: str, do_sample: bool, new_chars: int = 400, repeats: int = 5) -> float:
    """`generate()` at batch 1 as `scripts/generate.py` calls it (sampling: temperature 0.8, top_k 0; or greedy),
    seconds per new character (a sample that ends at <eos> counts the characters it has), best of `repeats`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import char_lstm  # noqa: F401  (registers the Auto classes)

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = tokenizer([json.load(open(os.path.join(model_dir, "training_run.json")))["sample_prompt"]],
                       return_tensors="pt")
    settings = dict(do_sample=True, temperature=0.8, top_k=0) if do_sample else dict(do_sample=False)
    best = float("inf")
    for repeat in range(repeats):
        torch.manual_seed(repeat)
        began = time.perf_counter()
        out = model.generate(**prompt, max_new_tokens=new_chars, **settings)
        best = min(best, (time.perf_counter() - began) / (out.shape[1] - prompt["input_ids"].shape[1]))
    return best


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", action="append", default=[], help="NAME=PATH (a file, folder or glob)")
    parser.add_argument("--include", nargs="+", help="patterns for the folders, as --include of train.py")
    parser.add_argument("--many", help="NAME=PATH of a text with thousands of distinct characters")
    parser.add_argument("--small", default="shakespeare", help="NAME=PATH (or shakespeare) to compare --many with")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--validation_split_percentage", type=float, default=0.5)
    parser.add_argument("--work_dir", default=None, help="where the caches and models go (default: a temp folder)")
    parser.add_argument("--output_json", default="scale.json")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.child:
        return child(json.loads(args.child))
    from benchmark import cpu_name

    out_root = tempfile.mkdtemp(prefix="scale-models-", dir=args.work_dir)
    rows = []
    corpora = [c.split("=", 1) for c in args.corpus]
    if args.many:
        corpora += [args.many.split("=", 1), args.small.split("=", 1) if "=" in args.small else [args.small] * 2]
    for name, path in corpora:
        rows.append(corpus_runs(name, path, args, out_root))
        print(json.dumps(rows[-1]), flush=True)
    result = {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)), "rows": rows}
    if args.many:
        many, small = rows[-2], rows[-1]
        result["large_vocabulary"] = {
            "train_throughput_ratio": many["train_chars_per_s"] / small["train_chars_per_s"],
            "generate_time_ratio": {
                way: generate_seconds_per_char(many["model"], way == "sampling")
                / generate_seconds_per_char(small["model"], way == "sampling")
                for way in ("greedy", "sampling")
            },
        }
    print(f"\n{result['cpu']}, {result['cores']} cores")
    print(f"{'corpus':<12} {'MB':>7} {'prep MB/s':>9} {'1st step cold':>13} {'warm':>6} {'peak RSS':>9} "
          f"{'train ch/s':>10} {'eval ch/s':>10} {'eval share':>10}")
    for r in rows:
        print(f"{r['corpus']:<12} {r['MB']:>7.1f} {r['prep_MB_per_s']:>9.1f} {r['first_step_cold_s']:>12.1f}s "
              f"{r['first_step_warm_s']:>5.1f}s {r['peak_rss_gb']:>7.2f}GB {r['train_chars_per_s']:>10.0f} "
              f"{(r['eval_chars_per_s'] or float('nan')):>10.0f} {r['eval_share']:>10.1%}")
    if "large_vocabulary" in result:
        lv = result["large_vocabulary"]
        print(f"large vocabulary vs small: training throughput {lv['train_throughput_ratio']:.2f}x (target >= 0.5), "
              f"generate() time per character {lv['generate_time_ratio']['greedy']:.2f}x greedy, "
              f"{lv['generate_time_ratio']['sampling']:.2f}x sampling (target <= 1.5)")
    with open(args.output_json, "w") as f:
        json.dump(result, f, indent=2)
    shutil.rmtree(out_root, ignore_errors=True)


if __name__ == "__main__":
    main()
