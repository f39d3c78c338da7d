#!/usr/bin/env python
"""Sample text from a trained char_lstm model with `model.generate()`.

    python scripts/generate.py --model_name_or_path outputs/shakespeare --prompt "ROMEO:" --max_new_tokens 300
    python scripts/generate.py --model_name_or_path outputs/shakespeare --prompt "ROMEO:" "JULIET:" --seed 0
    echo "First Citizen:" | python scripts/generate.py --model_name_or_path you/char-model --trust_remote_code
    python scripts/generate.py --model_name_or_path outputs/shakespeare --prompt "All:" --greedy

One prompt and one sample stream to stdout character by character; several are generated as one batch.
"""

import sys

from char_lstm.cli import run_command
from char_lstm.sampling import GenerateArguments, run_generate


if __name__ == "__main__":
    sys.exit(run_command(GenerateArguments, run_generate, compute=True))
