"""The process a run lives in: the launch environment (CPU DDP over gloo), the console, glibc's allocator, native
bf16 detection, the main process's say over the others, and Ctrl-C / SIGTERM. The functions that change the whole
process are called by `scripts/train.py`, never by `train()`."""

import ctypes
import logging
import os
import re
import signal
import sys
import threading
import time
from contextlib import contextmanager

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from ..data import quiet_progress_bars
from ..errors import UsageError, first_sentence
from ..layers_char_lstm import _cpu_has_native_bf16


def prepare_launch_environment() -> None:
    """Make multi-process launches on machines without GPU run real DDP over gloo.

    * `accelerate launch --multi_gpu --num_processes N` (or `torchrun`) on a CPU-only machine starts N processes, but
      accelerate only sets up CPU DDP when told to use the CPU: tell it.
    * `accelerate launch --cpu --num_processes N` starts a single process (accelerate runs several CPU processes only
      through mpirun), which would silently train alone: refuse it with the command that works.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true")
    if world_size > 1 and not torch.cuda.is_available():
        os.environ["ACCELERATE_USE_CPU"] = "true"
        return
    launched_by_mpi = any(name in os.environ for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"))
    if use_cpu and "MASTER_ADDR" in os.environ and not launched_by_mpi and "LOCAL_RANK" not in os.environ:
        raise UsageError(
            "accelerate launch --cpu --num_processes N starts only one process; for N processes on CPU run "
            "`accelerate launch --multi_gpu --num_processes N scripts/train.py ...` (char_lstm uses gloo when there "
            "is no GPU)."
        )


@contextmanager
def training_console():
    """The console of `scripts/train.py`: log lines go through tqdm (each on its own line, never glued to a progress
    bar), and the quick steps (loading one-row datasets, splitting, writing one weights file) draw no bar of their
    own, so a run shows one bar for training and one for each evaluation."""
    with logging_redirect_tqdm(loggers=[logging.getLogger("char_lstm")]), quiet_progress_bars():
        yield


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed memory for the next training step instead of handing it back to the kernel.

    With glibc's defaults, large blocks are mmap-ed and unmapped again when freed, and the top of the heap is trimmed,
    so each step's activations and gradients come back as fresh pages that the kernel faults in and zeroes: a quarter
    of a `--preset cpu-small` step on 2 CPU cores (measured: docs/benchmarks.md, "The memory allocator"). After this
    call blocks up to 32 MB come from the heap and up to 1 GB of freed memory stays there. It changes the whole
    process, so the training and benchmark scripts call it, not the library functions. Linux with glibc only;
    elsewhere nothing changes. Returns whether both settings took."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library (musl): leave it as it is
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def native_bf16(device_type: str | None = None) -> bool:
    """Whether `device_type` ("cuda" or "cpu"; default: cuda when available) computes bf16 natively: a GPU with bf16,
    or a CPU with AVX512-BF16 or AMX (elsewhere bf16 on CPU is emulated and slower than float32)."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return _cpu_has_native_bf16()



# ---------------------------------------------------------------------------------------------------------------------
# The main process decides


class ReportedByMainProcess(UsageError):
    """An error of the main process, seen by another process (which exits without printing it again)."""


def on_main_process(args, function):
    """`function()` run by the main process only (`args`: the run's TrainingArguments); its result, or its
    UsageError, reaches every process. The other processes raise `ReportedByMainProcess` (the main process prints the
    error)."""
    result, error = None, None
    if args.process_index == 0:
        try:
            result = function()
        except UsageError as exc:
            error = exc
    if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [(result, None if error is None else str(error))]
        torch.distributed.broadcast_object_list(box, src=0)
        result, message = box[0]
        if args.process_index != 0 and message is not None:
            raise ReportedByMainProcess(message)
    if error is not None:
        raise error
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM


STOP_SIGNALS = {signal.SIGINT: ("Ctrl-C (SIGINT)", 130), signal.SIGTERM: ("SIGTERM", 143)}  # name, exit code
_stop_signal: int | None = None
_launcher_gone: int | None = None  # the launcher's process id, once `stop_when_the_launcher_ends` saw it end


class RunInterrupted(BaseException):
    """SIGINT or SIGTERM reached the run (a BaseException, like KeyboardInterrupt: no `except Exception` keeps it)."""


def stop_on_signals() -> None:
    """Make SIGINT (Ctrl-C) and SIGTERM stop the run at once with `RunInterrupted`, wherever it is: checkpoints and
    the final model are written complete or not at all, so stopping anywhere leaves them consistent. Signals that come
    while it stops are ignored. For the training script (it changes the whole process)."""

    def handler(signum, frame):
        global _stop_signal
        if _stop_signal is None:
            _stop_signal = signum
            raise RunInterrupted(signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)


def launcher_gone() -> int | None:
    """The process id of the launcher whose end stopped the run (`stop_when_the_launcher_ends`), or None."""
    return _launcher_gone


def received_stop_signal() -> int | None:
    """The signal that stopped the run, if one did (what was raised after it is a consequence: a collective whose
    peer left, an interrupted write...)."""
    return _stop_signal



def ignore_stop_signals() -> None:
    """Once the run's work is done (or its error said): a Ctrl-C or SIGTERM that comes now (a launcher stopping its
    processes as one of them fails, a user who pressed Ctrl-C as the run ended) changes nothing, so it is ignored
    rather than reported as a stop, or raised as a traceback while the interpreter exits."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def stop_when_the_launcher_ends(poll_seconds: float = 1.0) -> threading.Thread | None:
    """In a process started by a launcher (torch elastic: `accelerate launch` with several processes, torchrun),
    stop with SIGTERM, as if the launcher had sent it, once the launcher is gone (killed with SIGKILL, its terminal
    closed): a process whose launcher died would otherwise go on training alone, holding the output folder, until it
    hangs in a collective. Watches the parent process id from a daemon thread (the parent death signal of Linux is
    tied to the parent's thread, not its process). Returns the thread, or None outside a launcher."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    launcher = os.getppid()

    def watch():
        global _launcher_gone
        while os.getppid() == launcher:
            time.sleep(poll_seconds)
        _launcher_gone = launcher
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="char_lstm-launcher-watch", daemon=True)
    thread.start()
    return thread


# A collective that fails because another process of the run is gone (killed, crashed): gloo's and NCCL's words
_PEER_LOST = re.compile(r"connection (reset|closed) by peer|broken pipe|gloo|nccl|remote process exited", re.I)


def lost_peer(error: BaseException) -> str | None:
    """When `error` is a collective failing because another process of the run ended: its first line (for the
    one-line message), else None."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    if torch.distributed.get_world_size() < 2:
        return None
    text = str(error)
    if isinstance(error, torch.distributed.DistError) or (isinstance(error, RuntimeError) and _PEER_LOST.search(text)):
        return first_sentence(error) or type(error).__name__
    return None
