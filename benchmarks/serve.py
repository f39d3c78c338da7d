#!/usr/bin/env python
"""The OpenAI-compatible server under load: N concurrent streaming clients (the official async `openai` client)
against scripts/serve.py with a batch of --max_batch_size rows, and the same clients against the same server with a
batch of 1, side by side in one run. Prints the aggregate characters per second of each and their ratio (target:
>= 8 at 64 clients), the time to the first character and the time per character (p50, p99), and the CPU.

    python benchmarks/serve.py                                   # a 2x256 LSTM (cpu-small's shape), 64 clients
    python benchmarks/serve.py --hidden_size 512 --embedding_size 128   # the char-rnn recipe's 2x512
    python benchmarks/serve.py --model_name_or_path outputs/shakespeare --clients 32 --max_tokens 300
    python benchmarks/serve.py --memory_requests 10000           # also: the server's RSS over 10,000 requests

The server runs in a process of its own on 127.0.0.1; the clients share the machine with it (on 2 cores they take
part of the CPU the server would have). Without --model_name_or_path a model of the default config is saved with
random weights (the speed does not depend on training).
"""

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_server(folder: str, *flags: str) -> tuple[subprocess.Popen, str]:
    """scripts/serve.py on a free port; (the process, its base URL) once it listens."""
    command = [sys.executable, os.path.join(ROOT, "scripts", "serve.py"), "--model_name_or_path", folder,
               "--port", "0", "--served_model_name", "bench", "--log_level", "warning", *flags]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url, ready = [], threading.Event()

    def read():
        for line in process.stdout:
            found = re.search(r"Serving .* at (http://\S+/v1)", line)
            if found:
                url.append(found.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    ready.wait(180)
    if not url:
        raise SystemExit(f"the server did not start (exit code {process.poll()})")
    return process, url[0]


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(30)


async def stream_one(client, prompt: str, max_tokens: int, temperature: float) -> dict:
    started = time.perf_counter()
    stream = await client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens,
                                             temperature=temperature, stream=True)
    first = last = None
    characters = 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            last = time.perf_counter()
            first = first or last
            characters += len(chunk.choices[0].text)
    return {"characters": characters, "first": first - started if first else None,
            "per_character": (last - first) / (characters - 1) if characters > 1 and first else None}


async def load(url: str, clients: int, max_tokens: int, temperature: float) -> dict:
    """`clients` streams at once; the aggregate characters per second and the latencies."""
    import openai

    prompts = ["ROMEO:", "First Citizen:\n", "All:", "JULIET:\nO"]
    async with openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600) as client:
        # a first round of short requests: the client's connections are open and the server has run its first steps
        # (what is measured is the server's steady state, not the client's TCP handshakes)
        await asyncio.gather(*[stream_one(client, "A", 2, temperature) for _ in range(clients)])
        started = time.perf_counter()
        results = await asyncio.gather(*[stream_one(client, prompts[i % len(prompts)], max_tokens, temperature)
                                         for i in range(clients)])
        wall = time.perf_counter() - started
    firsts = sorted(r["first"] for r in results if r["first"] is not None)
    per_char = sorted(r["per_character"] for r in results if r["per_character"] is not None)
    characters = sum(r["characters"] for r in results)

    def quantile(values, q):
        return values[min(len(values) - 1, int(q * len(values)))] if values else None

    return {"characters": characters, "wall_s": wall, "chars_per_s": characters / wall,
            "first_p50_ms": 1000 * statistics.median(firsts), "first_p99_ms": 1000 * quantile(firsts, 0.99),
            "per_char_p50_ms": 1000 * statistics.median(per_char), "per_char_p99_ms": 1000 * quantile(per_char, 0.99)}


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def memory(url: str, pid: int, requests: int, clients: int) -> list[tuple[int, float]]:
    """The server's RSS after every tenth of `requests` short completions, `clients` at a time."""
    import openai

    samples, done = [(0, rss_mb(pid))], 0
    async with openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600) as client:
        while done < requests:
            batch = min(clients, requests - done)
            await asyncio.gather(*[client.completions.create(model="bench", prompt="ROMEO:", max_tokens=20,
                                                             temperature=0.8) for _ in range(batch)])
            done += batch
            if done % max(1, requests // 10) < batch:
                samples.append((done, rss_mb(pid)))
    return samples


def default_model(folder: str, hidden_size: int = 256, embedding_size: int = 64) -> str:
    """An LSTM of 2 layers (by default the shape of scripts/train.py's cpu-small preset) with random weights and a
    vocabulary of English text's characters (about tiny Shakespeare's 65)."""
    import string

    import torch

    from char_lstm import CharLSTMConfig, CharLSTMForCausalLM, CharLSTMTokenizer

    tokenizer = CharLSTMTokenizer.from_corpus(string.ascii_letters + " \n.,;:!?'-&$3")
    torch.manual_seed(0)
    model = CharLSTMForCausalLM(CharLSTMConfig(vocab_size=len(tokenizer), hidden_size=hidden_size,
                                               embedding_size=embedding_size, pad_token_id=tokenizer.pad_token_id,
                                               unk_token_id=tokenizer.unk_token_id))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", default=None)
    parser.add_argument("--hidden_size", type=int, default=256, help="without a model: 256 as cpu-small, 512 as "
                        "char-rnn (--embedding_size 128)")
    parser.add_argument("--embedding_size", type=int, default=64)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--max_tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--memory_requests", type=int, default=0, help="also measure RSS over this many requests")
    parser.add_argument("--output_json", default="serve_benchmark.json")
    args = parser.parse_args()
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from benchmark import cpu_isa, cpu_name

    with tempfile.TemporaryDirectory() as work:
        folder = args.model_name_or_path or default_model(os.path.join(work, "model"), args.hidden_size,
                                                          args.embedding_size)
        result = {"cpu": cpu_name(), "isa": cpu_isa(), "cores": len(os.sched_getaffinity(0)),
                  "model": args.model_name_or_path or f"2x{args.hidden_size} LSTM, random weights",
                  "clients": args.clients, "max_tokens": args.max_tokens, "load_before": os.getloadavg()[0]}
        for name, batch in (("batched", str(args.clients)), ("batch_1", "1")):
            process, url = start_server(folder, "--max_batch_size", batch)
            try:
                result[name] = asyncio.run(load(url, args.clients, args.max_tokens, args.temperature))
                if name == "batched" and args.memory_requests:
                    result["rss_mb"] = asyncio.run(memory(url, process.pid, args.memory_requests, args.clients))
            finally:
                stop_server(process)
    result["ratio"] = result["batched"]["chars_per_s"] / result["batch_1"]["chars_per_s"]
    print(f"{result['cpu']} ({result['isa']}), {result['cores']} cores, load {result['load_before']:.1f} before; "
          f"{result['model']}, {args.clients} clients x {args.max_tokens} characters")
    for name in ("batched", "batch_1"):
        row = result[name]
        print(f"{name:8s} {row['chars_per_s']:9.0f} chars/s ({row['characters']} in {row['wall_s']:.1f} s); first "
              f"character p50 {row['first_p50_ms']:.0f} ms, p99 {row['first_p99_ms']:.0f} ms; per character p50 "
              f"{row['per_char_p50_ms']:.2f} ms, p99 {row['per_char_p99_ms']:.2f} ms")
    print(f"{args.clients} clients, batched vs batch of 1: {result['ratio']:.1f}x (target >= 8)")
    if "rss_mb" in result:
        print("server RSS (requests: MB): " + ", ".join(f"{n}: {mb:.0f}" for n, mb in result["rss_mb"]))
    with open(args.output_json, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
