"""`scripts/doctor.py`: the environment a user would otherwise be asked about when training is slow or fails (torch
build and version, GPUs, native bf16, threads, accelerate's config, library versions, Hub access), and the launch
command this machine should use (docs/troubleshooting.md)."""

import os
import platform
import sys
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

import torch

from .data import DEFAULT_DATASET, hub_unreachable_reason
from .encoding import usable_cores
from .errors import TROUBLESHOOTING
from .layers_char_lstm import _cpu_has_native_bf16


@dataclass
class DoctorArguments:
    hub_timeout: float = field(
        default=3.0, metadata={"help": "Seconds to wait for the Hub (one request; none under HF_HUB_OFFLINE=1)."}
    )


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _torch_build() -> str:
    if torch.version.cuda:
        return f"CUDA {torch.version.cuda} build"
    if getattr(torch.version, "hip", None):
        return f"ROCm {torch.version.hip} build"
    return "CPU-only build"


def _accelerate_config() -> str:
    """accelerate's default config file (what `accelerate launch` without --config_file uses), in one line."""
    from accelerate.commands.config import default_config_file

    if not os.path.isfile(default_config_file):
        return (f"none ({default_config_file} does not exist: `accelerate launch` picks defaults and says so; "
                "`accelerate config` writes one, or pass --config_file configs/accelerate-*.yaml)")
    import yaml

    with open(default_config_file, encoding="utf-8") as f:
        config = yaml.safe_load(f) or {}
    keys = ("distributed_type", "num_processes", "mixed_precision", "use_cpu")
    return f"{default_config_file}: " + ", ".join(f"{key} {config[key]}" for key in keys if key in config)


def recommended_launch(cuda_devices: int, mps: bool, cores: int, gpu_bf16: bool = False) -> str:
    """The command to train tiny_shakespeare on a machine with `cuda_devices` GPUs (`gpu_bf16`: they compute bf16
    natively), an Apple GPU (`mps`) or `cores` CPU cores (README, docs/training.md, docs/results.md)."""
    if cuda_devices > 1:
        return (f"accelerate launch --multi_gpu --num_processes {cuda_devices} scripts/train.py --preset char-rnn "
                "--output_dir outputs/char-rnn")
    if cuda_devices == 1:
        bf16 = " --bf16" if gpu_bf16 else ""
        return f"accelerate launch scripts/train.py --preset char-rnn{bf16} --output_dir outputs/char-rnn"
    if mps:
        return "python scripts/train.py --preset cpu-small --output_dir outputs/shakespeare  # on the Apple GPU (mps)"
    if cores >= 2:
        threads = f"OMP_NUM_THREADS={cores // 2} " if cores > 2 else ""
        return (f"{threads}accelerate launch --config_file configs/accelerate-2processes.yaml scripts/train.py "
                "--preset cpu-small --output_dir outputs/shakespeare-2proc  # 2 processes"
                + (f" of {cores // 2} threads" if cores > 2 else " of one thread"))
    return ("accelerate launch -q --config_file configs/accelerate-1process.yaml scripts/train.py --preset cpu-small "
            "--output_dir outputs/shakespeare")


def diagnose(hub_timeout: float = 3.0) -> list[tuple[str, str]]:
    """(what, value) for each line of the report."""
    cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpu_bf16 = cuda_devices > 0 and torch.cuda.is_bf16_supported(including_emulation=False)
    mps = torch.backends.mps.is_available()
    cores = usable_cores()
    gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(cuda_devices))
    cpu_bf16 = _cpu_has_native_bf16()
    reason = hub_unreachable_reason(DEFAULT_DATASET, timeout=hub_timeout)
    return [
        ("python", f"{sys.version.split()[0]} on {platform.platform()}"),
        ("torch", f"{torch.__version__} ({_torch_build()}; CPU kernels: {torch.backends.cpu.get_cpu_capability()})"),
        ("CUDA", f"{cuda_devices} GPU(s): {gpus} (bf16: {'native' if gpu_bf16 else 'no'})" if cuda_devices else
         "no GPU" + (" (a CPU-only torch: for an NVIDIA GPU, the CUDA build from pytorch.org)"
                     if not torch.version.cuda else " visible")),
        ("MPS (Apple GPU)", "available" if mps else "not available"),
        ("CPU bf16", "native (AVX512-BF16 or AMX): --bf16 speeds up training" if cpu_bf16 else
         "emulated (no AVX512-BF16/AMX): train in float32, --bf16 would be slower"),
        ("threads", f"torch uses {torch.get_num_threads()} of {cores} usable cores"
         + (f" (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})" if "OMP_NUM_THREADS" in os.environ else "")),
        ("accelerate config", _accelerate_config()),
        ("libraries", ", ".join(f"{name} {_version(name)}" for name in
                                ("char-lstm", "transformers", "datasets", "accelerate", "huggingface-hub",
                                 "tokenizers", "safetensors"))),
        ("Hub", "reachable" if reason is None else
         f"not reachable ({reason}): tiny_shakespeare comes from the copy bundled with char_lstm"),
        ("launch", recommended_launch(cuda_devices, mps, cores, gpu_bf16)),
    ]


def run_doctor(args: DoctorArguments, stdout=None) -> list[tuple[str, str]]:
    """Print the report; returns its lines."""
    lines = diagnose(args.hub_timeout)
    width = max(len(what) for what, _ in lines)
    for what, value in lines:
        print(f"{what + ':':<{width + 1}} {value}", file=stdout or sys.stdout)
    print(f"When training goes wrong: {TROUBLESHOOTING}", file=stdout or sys.stdout)
    return lines
