#!/usr/bin/env python
"""Print what this machine offers for training and the launch command to use.

    python scripts/doctor.py

torch build and version, CUDA/MPS, native bf16, threads, accelerate's config, the libraries' versions, whether the Hub
can be reached (one request, none under HF_HUB_OFFLINE=1), and the recommended `accelerate launch` command. What each
failure mode of a training run looks like and which flags fix it: docs/troubleshooting.md.
"""

import sys

from char_lstm.cli import run_command
from char_lstm.doctor import DoctorArguments, run_doctor


if __name__ == "__main__":
    sys.exit(run_command(DoctorArguments, run_doctor))
