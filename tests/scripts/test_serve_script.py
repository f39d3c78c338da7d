"""scripts/serve.py as a real server process on 127.0.0.1, driven by the official `openai` client (and raw HTTP where
the client would hide what is checked): concurrency and exactness, streaming, errors, back-pressure, a client that
leaves, the API key, SIGTERM."""

import asyncio
import random
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from helpers import ROOT, run_script, script_env, shakespeare_like


openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")


class Server:
    """scripts/serve.py in a process of its own, on a free port; its output is kept for the assertions' messages."""

    def __init__(self, folder, *flags, timeout=120):
        command = [sys.executable, str(ROOT / "scripts" / "serve.py"), "--model_name_or_path", str(folder),
                   "--port", "0", "--served_model_name", "tiny", *flags]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=script_env(OMP_NUM_THREADS="1"))
        self.lines, self.url = [], None
        started = threading.Event()

        def read():
            for line in self.process.stdout:
                self.lines.append(line)
                found = re.search(r"Serving .* at (http://\S+)/v1", line)
                if found:
                    self.url = found.group(1)
                    started.set()
            started.set()

        threading.Thread(target=read, daemon=True).start()
        started.wait(timeout)
        assert self.url, "the server did not start:\n" + "".join(self.lines)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def client(self, **kwargs):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0,
                             **kwargs)

    def async_client(self, **kwargs):
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, **kwargs)

    def health(self) -> dict:
        return httpx.get(self.url + "/health").json()

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(30)


@pytest.fixture(scope="module")
def server(trained_model):
    running = Server(trained_model)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def endless_model(tmp_path_factory):
    """A model whose vocabulary has no `<eos>`: its texts end only at max_tokens (the trained model's may end early,
    at an `<eos>` it learned to write)."""
    from char_lstm import CharLSTMTokenizer
    from helpers import make_model

    tokenizer = CharLSTMTokenizer.from_corpus(shakespeare_like(2000))
    folder = tmp_path_factory.mktemp("endless")
    make_model(tokenizer, hidden_size=16, embedding_size=8).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference(trained_model):
    """Greedy continuations computed in this process with `generate()`, one prompt at a time."""
    from char_lstm import load_model_and_tokenizer, step_char_lstm

    model, tokenizer = load_model_and_tokenizer(str(trained_model))

    def greedy(prompt: str, max_tokens: int) -> str:
        # one row through oneDNN as the server's rows (an Intel CPU would take MKL's product for one row here)
        mkl_rows, step_char_lstm._MKL_MAX_ROWS = step_char_lstm._MKL_MAX_ROWS, 0
        try:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
        finally:
            step_char_lstm._MKL_MAX_ROWS = mkl_rows
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    return greedy


def prompts(count: int, seed: int = 0) -> list[tuple[str, int]]:
    """(prompt, max_tokens) of mixed lengths: slices of the training text, 1 to 200 characters."""
    text, rng = shakespeare_like(6000), random.Random(seed)
    cases = []
    for _ in range(count):
        start, length = rng.randrange(0, 5000), rng.choice([1, 3, 20, 80, 200])
        cases.append((text[start : start + length], rng.randint(1, 120)))
    return cases


# ---------------------------------------------------------------------------------------------------------------------
# Concurrency and exactness


@pytest.mark.heavy
def test_concurrent_greedy_requests_get_what_generate_gives_each_prompt_alone(server, reference):
    """40 requests of mixed prompts and lengths, streaming or not, arriving at random moments: each greedy one
    returns exactly `generate(do_sample=False)`'s text for its prompt alone; seeded sampled ones return, in that
    crowd, the text they return alone."""
    cases, rng = prompts(40), random.Random(1)

    async def one(client, prompt, max_tokens, stream, **settings):
        await asyncio.sleep(rng.random() * 0.5)
        if not stream:
            response = await client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, **settings)
            return response.choices[0].text
        chunks = await client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, stream=True,
                                                 **settings)
        return "".join([chunk.choices[0].text async for chunk in chunks])

    async def crowd():
        async with server.async_client() as client:
            greedy = [one(client, p, n, i % 2 == 0, temperature=0) for i, (p, n) in enumerate(cases)]
            seeded = [one(client, p, 60, i % 2 == 1, temperature=0.9, seed=i) for i, (p, _) in enumerate(cases[:8])]
            return await asyncio.gather(*greedy, *seeded)

    results = asyncio.run(crowd())
    for (prompt, max_tokens), text in zip(cases, results[:40]):
        assert text == reference(prompt, max_tokens), (prompt, max_tokens)
    client = server.client()
    for i, ((prompt, _), text) in enumerate(zip(cases[:8], results[40:])):
        alone = client.completions.create(model="tiny", prompt=prompt, max_tokens=60, temperature=0.9, seed=i)
        assert alone.choices[0].text == text
    assert server.health()["slots_in_use"] == 0


def test_streaming_with_usage_logprobs_and_stop_strings(server, reference):
    client = server.client()
    prompt = "ROMEO:\n"
    full = reference(prompt, 60)
    chunks = list(client.completions.create(model="tiny", prompt=[prompt, prompt], max_tokens=60, temperature=0,
                                            stream=True, stream_options={"include_usage": True}, logprobs=2))
    texts = {0: "", 1: ""}
    for chunk in chunks[:-1]:
        choice = chunk.choices[0]
        texts[choice.index] += choice.text
        assert len(choice.logprobs.tokens) == len(choice.text)
        assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
        assert all(len(top) == 2 for top in choice.logprobs.top_logprobs)
    assert texts == {0: full, 1: full}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 120
    assert chunks[-1].usage.prompt_tokens == 2 * len(prompt)
    stop = full[10:12]
    response = client.completions.create(model="tiny", prompt=prompt, max_tokens=60, temperature=0, stop=[stop])
    assert response.choices[0].text == full[: full.index(stop)] and response.choices[0].finish_reason == "stop"
    assert client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0,
                                     echo=True).choices[0].text == prompt + full[:5]


def test_models_health_metrics_and_the_chat_endpoints_error(server):
    client = server.client()
    assert [model.id for model in client.models.list()] == ["tiny"]
    assert server.health()["status"] == "ok"
    client.completions.create(model="tiny", prompt="All:", max_tokens=3)
    metrics = httpx.get(server.url + "/metrics").text
    for name in ("char_lstm_requests_total", "char_lstm_generated_characters_total", "char_lstm_batch_slots_in_use",
                 "char_lstm_queue_length", "char_lstm_request_duration_seconds_bucket",
                 "char_lstm_time_to_first_character_seconds_bucket"):
        assert name in metrics, name
    with pytest.raises(openai.BadRequestError, match="/v1/completions") as error:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}])
    assert error.value.body["code"] == "chat_not_supported"


# ---------------------------------------------------------------------------------------------------------------------
# Bad input, back-pressure, a client that leaves, the API key, SIGTERM


@pytest.mark.parametrize("body, param, fragment", [
    ('{"model": "tiny", "prompt": "A"', None, "not JSON"),
    ('{"model": "other", "prompt": "A"}', "model", "does not exist"),
    ('{"model": "tiny", "prompt": "A", "max_tokens": 0}', "max_tokens", "max_tokens must be in [1, 4096]"),
    ('{"model": "tiny", "prompt": "A", "max_tokens": 100000}', "max_tokens", "this server's limit"),
    ('{"model": "tiny", "prompt": "A", "temperature": -1}', "temperature", "temperature must be in [0, 2]"),
    ('{"model": "tiny", "prompt": "A\\u20ac\\u00e9"}', "prompt", "never seen: ['é', '€']"),
    ('{"model": "tiny", "prompt": ""}', "prompt", "empty"),
    ('{"model": "tiny"}', "prompt", "Field required"),
    ('{"model": "tiny", "prompt": [1, 2, 3]}', "prompt", "token ids are not taken"),
    ('{"model": "tiny", "prompt": "A", "n": 0}', "n", "n must be in [1, 16]"),
    ('{"model": "tiny", "prompt": "A", "seed": 99999999999999999999}', "seed", "seed must be in [0, "),
    ('[1, 2]', None, "must be a JSON object"),
    ('{"model": "tiny", "prompt": "A", "max_tokens": "5"}', "max_tokens", "valid integer"),
    ('{"model": "tiny", "prompt": "A", "logprobs": true}', "logprobs", "valid integer"),
])
def test_bad_requests_get_openais_error_body(server, body, param, fragment):
    response = httpx.post(server.url + "/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and fragment in error["message"], error


def test_scoring_a_text_with_echo_and_logprobs(server, trained_model):
    """What evaluation tools send to score a text: echo, logprobs, max_tokens 0. Each character's log-probability
    is the model's given the characters before it (the first has none); offsets count from the prompt's start."""
    import torch

    from char_lstm import load_model_and_tokenizer

    text = "ROMEO:\nBut soft"
    response = server.client().completions.create(model="tiny", prompt=text, max_tokens=0, echo=True, logprobs=1)
    choice = response.choices[0]
    assert choice.text == text and choice.logprobs.tokens == list(text)
    assert choice.logprobs.text_offset == list(range(len(text))) and choice.logprobs.token_logprobs[0] is None
    model, tokenizer = load_model_and_tokenizer(str(trained_model))
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = torch.log_softmax(model(ids).logits[0, :-1], dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(expected.tolist(), abs=1e-5)
    assert response.usage.completion_tokens == 0
    generated = server.client().completions.create(model="tiny", prompt=text, max_tokens=3, logprobs=0,
                                                   temperature=0)
    assert generated.choices[0].logprobs.text_offset == [len(text), len(text) + 1, len(text) + 2]


def test_the_model_route_the_key_scheme_and_wrong_methods(server):
    client = server.client()
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    response = httpx.get(server.url + "/v1/completions")
    assert response.status_code == 405 and "POST" in response.headers["Allow"]
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_a_client_that_leaves_mid_stream_frees_its_row(endless_model):
    running = Server(endless_model, "--max_tokens_limit", "1000000")
    try:
        body = {"model": "tiny", "prompt": "All:", "max_tokens": 1000000, "stream": True}
        with httpx.stream("POST", running.url + "/v1/completions", json=body) as response:
            lines = response.iter_lines()  # kept: a line iterator collected as garbage closes the stream
            assert next(line for line in lines if line.startswith("data:"))
            assert running.health()["slots_in_use"] == 1
        deadline = time.monotonic() + 10
        while running.health()["slots_in_use"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running.health()["slots_in_use"] == 0
    finally:
        running.stop()


@pytest.mark.heavy
def test_limits_key_and_sigterm(endless_model):
    """With one row and one waiting place, a third request gets 429 with Retry-After; without the key, 401; SIGTERM
    ends the streams in flight cleanly (finish reason "abort", then [DONE]) and the process exits 0 in seconds."""
    running = Server(endless_model, "--max_batch_size", "1", "--max_waiting", "1", "--api_key", "s3cret",
                     "--max_tokens_limit", "1000000")  # the streams below last until SIGTERM ends them
    try:
        with pytest.raises(openai.AuthenticationError):
            running.client(api_key="wrong").models.list()
        lowercase = httpx.get(running.url + "/v1/models", headers={"Authorization": "bearer s3cret"})
        assert lowercase.status_code == 200  # the scheme's case does not matter
        refused = httpx.get(running.url + "/v1/models")
        assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
        client = running.client(api_key="s3cret")
        streams = [client.completions.create(model="tiny", prompt="All:", max_tokens=1000000, stream=True)]
        assert next(iter(streams[0])).choices[0].finish_reason is None  # the first holds the row ...
        streams.append(client.completions.create(model="tiny", prompt="All:", max_tokens=1000000, stream=True))
        assert running.health()["queue_length"] == 1  # ... the second waits
        response = httpx.post(running.url + "/v1/completions", json={"model": "tiny", "prompt": "A"},
                              headers={"Authorization": "Bearer s3cret"})
        assert response.status_code == 429 and response.headers["Retry-After"] == "1"
        assert response.json()["error"]["code"] == "rate_limit_exceeded"
        started = time.monotonic()
        running.process.send_signal(signal.SIGTERM)
        finishes = [[chunk.choices[0].finish_reason for chunk in stream][-1] for stream in streams]
        assert finishes == ["abort", "abort"]
        assert running.process.wait(15) == 0 and time.monotonic() - started < 10, running.output
    finally:
        running.stop()
    assert "Traceback" not in running.output, running.output


def test_a_port_in_use_is_one_line(trained_model, tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = str(sock.getsockname()[1])
        result = run_script("serve.py", ["--model_name_or_path", str(trained_model), "--port", port], tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(
        f"error: Cannot listen on 127.0.0.1:{port}"), result.stderr
    assert "Traceback" not in result.stderr and "Uvicorn" not in result.stdout + result.stderr
