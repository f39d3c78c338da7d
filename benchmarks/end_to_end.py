#!/usr/bin/env python
"""A whole training run as a user starts it, timed from start to exit: where the time goes, and evaluation's share.

    python benchmarks/end_to_end.py --train_file /data/c1g.txt                  # --preset cpu-small, nothing else
    python benchmarks/end_to_end.py --train_file big.txt -- --max_steps 40      # train.py flags after --

`scripts/train.py --preset cpu-small --train_file FILE` runs in a subprocess with an empty `datasets` cache (a first
run) and its own output folder. From its outputs (trainer_state.json, all_results.json) and the clock:

* wall seconds, start to exit; training (Trainer's train_runtime less the evaluations in it), the periodic evaluations,
  the final evaluation, and the rest (imports, preparing the data, saving);
* evaluation's share of the wall time, periodic and final together (target: <= 10%);
* the eval loss, its standard error and the characters the final evaluation read (target: standard error <= 0.01);
* the peak RSS of the run (the subprocess's `ru_maxrss`).
Results: docs/benchmarks.md ("The whole run"). Timings vary with the machine's load: the load average is printed.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(train_file: str, preset: str, extra: list[str], work_dir: str | None) -> dict:
    work = tempfile.mkdtemp(prefix="end-to-end-", dir=work_dir)
    out = os.path.join(work, "out")
    env = {**os.environ, "HF_DATASETS_CACHE": os.path.join(work, "cache"), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--preset", preset, "--train_file",
               train_file, "--output_dir", out, "--disable_tqdm", "true", *extra]
    began = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.monotonic() - began
    if done.returncode != 0:
        raise SystemExit(f"the run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    with open(os.path.join(out, "all_results.json")) as f:
        results = json.load(f)
    with open(os.path.join(out, "trainer_state.json")) as f:
        history = json.load(f)["log_history"]
    shutil.rmtree(work, ignore_errors=True)
    # the final evaluation is the last entry with a runtime (it alone has eval_characters since it reads a sample)
    periodic = sum(entry["eval_runtime"] for entry in history if "eval_runtime" in entry) - results["eval_runtime"]
    final = results["eval_runtime"]
    return {
        "wall_s": wall,
        "training_s": results["train_runtime"] - periodic,
        "periodic_eval_s": periodic,
        "final_eval_s": final,
        "rest_s": wall - results["train_runtime"] - final,
        "eval_share": (periodic + final) / wall,
        "steps": results["global_step"],
        "eval_loss": results["eval_loss"],
        "eval_loss_stderr": results.get("eval_loss_stderr"),
        "eval_characters": results.get("eval_characters"),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6,
        "summary": done.stdout.strip().splitlines()[-2],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train_file", required=True)
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--work_dir", default=None, help="where the cache and the model go (default: a temp folder)")
    parser.add_argument("--output_json", default="end_to_end.json")
    parser.add_argument("extra", nargs="*", help="more scripts/train.py flags, after --")
    args = parser.parse_args()
    from benchmark import cpu_name

    load = os.getloadavg()[0]
    result = {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)), "load_before": load,
              "train_file_MB": os.path.getsize(args.train_file) / 1e6 if os.path.isfile(args.train_file) else None,
              **run(args.train_file, args.preset, args.extra, args.work_dir), "load_after": os.getloadavg()[0]}
    print(f"{result['cpu']}, {result['cores']} cores, load {load:.1f} before / {result['load_after']:.1f} after")
    print(f"wall {result['wall_s']:.1f} s: training {result['training_s']:.1f} s ({result['steps']} steps), periodic "
          f"evaluations {result['periodic_eval_s']:.1f} s, final evaluation {result['final_eval_s']:.1f} s, the rest "
          f"(start-up, preparation, saving) {result['rest_s']:.1f} s; peak RSS {result['peak_rss_gb']:.2f} GB")
    if result["eval_characters"] is None:  # a version whose final evaluation read the whole split, unsaid
        precision = "the whole validation split"
    else:
        read = "the whole validation split" if result["eval_loss_stderr"] == 0 else "a sample"
        precision = (f"± {result['eval_loss_stderr']:.4f} over {result['eval_characters']:,} characters, {read} "
                     "(target: standard error <= 0.01)")
    print(f"evaluation's share of the wall time: {result['eval_share']:.1%} (target <= 10%); eval loss "
          f"{result['eval_loss']:.4f} nats/char, {precision}")
    with open(args.output_json, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
