"""`scripts/serve.py`: load a saved model, build the engine and the app, and serve them with uvicorn until SIGTERM or
Ctrl-C (in-flight requests end at once with finish reason "abort", their streams closed cleanly; exit code 0)."""

import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass, field

from ..errors import UsageError
from ..loading import load_model_and_tokenizer, pick_device, resolve_dtype


logger = logging.getLogger(__name__)

API_KEY_VARIABLE = "CHAR_LSTM_API_KEY"


@dataclass
class ServeArguments:
    model_name_or_path: str = field(metadata={"help": "A trained model: a local folder or a Hub id."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on (0.0.0.0: every interface)."})
    port: int = field(default=8000, metadata={"help": "Port to listen on (0: any free port, printed at start)."})
    served_model_name: str | None = field(
        default=None, metadata={"help": "The model's name in the API (default: the folder's or Hub id's last part)."})
    max_batch_size: int = field(default=64, metadata={"help": "Requests decoded together (rows of the batch)."})
    max_waiting: int = field(
        default=1024, metadata={"help": "Requests that may wait for a row; beyond it, HTTP 429 with Retry-After."})
    max_tokens_limit: int = field(default=4096, metadata={"help": "The largest max_tokens a request may ask for."})
    max_prompt_characters: int = field(default=65536, metadata={"help": "The longest prompt accepted."})
    stream_interval_ms: float = field(
        default=20, metadata={"help": "The longest a generated character waits to be streamed with the next ones "
                                      "(fewer, longer chunks under load; 0: a chunk per character)."})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, mps or auto."})
    dtype: str = field(default="float32", metadata={"help": "float32 or bfloat16 (smaller, faster on CPUs with "
                                                             "AVX512-BF16 or AMX; not exact: docs/serving.md)."})
    api_key: str | None = field(
        default=None, metadata={"help": f"Require `Authorization: Bearer KEY` (or set {API_KEY_VARIABLE})."})
    cors_allow_origins: list[str] = field(
        default_factory=list, metadata={"help": "Origins of web pages allowed to call the API from a browser (CORS), "
                                                "e.g. https://example.org; none by default."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Load a model whose code is in its folder."})
    log_level: str = field(default="info", metadata={"help": "uvicorn's log level: warning, info, debug..."})


def check_serve_arguments(args: ServeArguments) -> None:
    for name in ("max_batch_size", "max_waiting", "max_tokens_limit", "max_prompt_characters"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}.")
    if args.stream_interval_ms < 0:
        raise UsageError(f"--stream_interval_ms must be >= 0, got {args.stream_interval_ms}.")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}.")
    if args.dtype not in ("float32", "bfloat16"):
        raise UsageError(f"--dtype must be float32 or bfloat16, got {args.dtype!r}.")


def check_can_listen(host: str, port: int) -> None:
    """A one-line UsageError where this machine cannot listen on `host`:`port` (in use, not its address), before the
    model is loaded and uvicorn prints its start-up lines."""
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise UsageError(f"--host {host} is not an address of this machine ({error.strerror}); use 127.0.0.1 (this "
                         "machine only) or 0.0.0.0 (every interface).") from None
    with socket.socket(family, kind, protocol) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind(address)
        except OSError as error:
            raise UsageError(f"Cannot listen on {host}:{port} ({error.strerror}): choose another --port, or stop the "
                             "program that uses it.") from None


def _uvicorn_server(config, engine, name: str):
    """uvicorn's server, which on SIGTERM or Ctrl-C ends the engine's requests first (their streams close with
    `data: [DONE]`, so uvicorn's graceful shutdown has nothing left to wait for) and prints where it listens."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            engine.stop()
            super().handle_exit(sig, frame)

        async def startup(self, sockets=None):
            await super().startup(sockets)
            for server in self.servers:
                for sock in server.sockets:
                    host, port = sock.getsockname()[:2]
                    print(f"Serving {name} at http://{host}:{port}/v1 (Ctrl-C stops)", flush=True)

    return Server(config)


def run_serve(args: ServeArguments) -> None:
    try:
        import uvicorn

        from .app import build_app
        from .engine import Engine
    except ImportError as error:
        raise UsageError(f"Serving needs {error.name}: pip install \"char-lstm[serve]\".") from None
    check_serve_arguments(args)
    check_can_listen(args.host, args.port)
    # Two threads share the GIL here, the decoding loop and the event loop; one that waits for it gets it after the
    # switch interval at most (5 ms by default, longer than a decoding step): measured, 0.5 ms made a step under load
    # docs/serving.md's figure
    sys.setswitchinterval(0.0005)
    device = pick_device(args.device)
    model, tokenizer = load_model_and_tokenizer(args.model_name_or_path, device=device,
                                                dtype=resolve_dtype(args.dtype),
                                                trust_remote_code=args.trust_remote_code)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model_name_or_path))
    engine = Engine(model, tokenizer, max_batch_size=args.max_batch_size, max_waiting=args.max_waiting)
    api_key = args.api_key or os.environ.get(API_KEY_VARIABLE) or None
    app = build_app(engine, tokenizer, name, api_key=api_key, max_tokens=args.max_tokens_limit,
                    max_prompt_characters=args.max_prompt_characters,
                    stream_interval=args.stream_interval_ms / 1000, cors_origins=args.cors_allow_origins)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=5, access_log=args.log_level == "debug")
    server = _uvicorn_server(config, engine, name)
    # uvicorn shuts down gracefully on SIGTERM or Ctrl-C, then raises the signal again for the handler it found (the
    # default: killed by SIGTERM, a KeyboardInterrupt traceback for Ctrl-C); a server that shut down cleanly exits 0
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, lambda number, frame: None)
    server.run()
    if not server.started:
        raise UsageError(f"Could not listen on {args.host}:{args.port} (in use? see the line above); choose another "
                         "--port.")
    sys.stdout.flush()
