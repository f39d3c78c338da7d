"""An OpenAI-compatible server for a trained CharLSTM model (`scripts/serve.py`): continuous batching of recurrent
states (`engine`), each request's sampling settings on its own row (`sampling`), the OpenAI protocol (`protocol`)
and the ASGI app (`app`); `server` runs it. Needs the `serve` extra: pip install "char-lstm[serve]"."""
