#!/usr/bin/env python
"""Serve a trained char_lstm model over HTTP with OpenAI's API (completions, streaming, log-probabilities), its
requests decoded together as one batch of recurrent states (docs/serving.md). Needs: pip install "char-lstm[serve]".

    python scripts/serve.py --model_name_or_path outputs/shakespeare
    python scripts/serve.py --model_name_or_path you/char-model --port 8080 --max_batch_size 128 --api_key SECRET

Then, from any program: the `openai` client with base_url="http://127.0.0.1:8000/v1", or
    curl http://127.0.0.1:8000/v1/completions -H "Content-Type: application/json" \\
         -d '{"model": "shakespeare", "prompt": "ROMEO:", "max_tokens": 100, "temperature": 0.8}'
"""

import sys

from char_lstm.cli import run_command
from char_lstm.serving.server import ServeArguments, run_serve


if __name__ == "__main__":
    sys.exit(run_command(ServeArguments, run_serve, compute=True))
