#!/usr/bin/env python
"""A demo page for a char_lstm model: type a prompt, set the length, temperature, top-p and seed, and watch the
characters stream in (Gradio).

    pip install -e ".[demo]"
    python demo/app.py --model outputs/shakespeare          # a model folder, or a Hub id: you/char-shakespeare
    # then open http://127.0.0.1:7860

The same file is the app of a Hugging Face Space (`scripts/push_to_hub.py --space NAME` builds the Space's folder,
with MODEL_ID set to the model's repository). With char_lstm installed, its classes load the model; without it (in a
Space: torch, transformers and gradio only) the model's own code does, which runs only with --trust_remote_code (the
Space's app.py turns it on: TRUST_REMOTE_CODE, the Space's owner having chosen the model). Control characters of the
generated text (terminal escape codes, bidirectional overrides) are shown as escapes, such as \\x1b.
"""

import argparse
import os
import sys
from threading import Thread

import gradio as gr
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer
from transformers.hf_argparser import string_to_bool


try:  # installed: its classes load a char_lstm model, and no code from the model's folder or repository runs
    import char_lstm  # noqa: F401  (registers the char_lstm model type with the Auto classes)
    from char_lstm.facts import card_facts, display_name
    from char_lstm.terminal import visible_controls
except ImportError:  # a Space, without char_lstm: scripts/push_to_hub.py --space puts these next to app.py
    from facts import card_facts, display_name
    from terminal import visible_controls

MODEL_ID = None  # the model a Space shows (set by scripts/push_to_hub.py --space); --model wins
TRUST_REMOTE_CODE = False  # True in a Space (set by scripts/push_to_hub.py --space): its owner chose MODEL_ID
# No web fonts: the page looks the same offline (a local model, a test browser without network)
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


class CharStreamer(TextIteratorStreamer):
    """TextIteratorStreamer, one character at a time: the base class holds text back to the next space (a token can
    be a piece of a word there), but each token of a char_lstm model is a whole character."""

    def put(self, value: torch.Tensor) -> None:
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.on_finalized_text(self.tokenizer.decode(value.reshape(-1).tolist(), **self.decode_kwargs))


def stream_generation(network, tokenizer, prompt: str, length: float, temperature: float, top_p: float,
                      seed: float):
    """Yields the prompt and the characters generated so far, as they come, control characters shown as escapes
    (`visible_controls`: the page would hide an ESC, and a bidirectional override would reorder the text)."""
    ids = tokenizer([prompt], return_tensors="pt")
    if not prompt or (ids["input_ids"] == tokenizer.unk_token_id).all():
        raise gr.Error("Type a prompt with characters of the model's training text.")
    streamer = CharStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    failed = []

    def run():  # generate() in a thread, feeding the streamer; an error ends the stream instead of hanging it
        try:
            torch.manual_seed(int(seed))
            network.generate(**ids, max_new_tokens=int(length), do_sample=True, temperature=float(temperature),
                             top_p=float(top_p), top_k=0, streamer=streamer)
        except Exception as error:
            failed.append(error)
            streamer.end()

    thread = Thread(target=run)
    thread.start()
    text = prompt
    for piece in streamer:
        text += piece
        yield visible_controls(text)
    thread.join()
    if failed:
        raise gr.Error(str(failed[0]))


def build_demo(model: str, trust_remote_code: bool = False) -> gr.Blocks:
    """The page for `model` (a folder or a Hub id), loaded once; `trust_remote_code`: run the model's own code (as
    `from_pretrained` does)."""
    network = AutoModelForCausalLM.from_pretrained(model, trust_remote_code=trust_remote_code).eval()
    tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    name = display_name(model)

    def generate(prompt: str, length: float, temperature: float, top_p: float, seed: float):
        yield from stream_generation(network, tokenizer, prompt, length, temperature, top_p, seed)

    with gr.Blocks(title=f"{name}: char_lstm demo", analytics_enabled=False) as demo:
        gr.Markdown(f"# {name}\nA character-level language model (char_lstm): it writes one character at a time, in "
                    f"the style of its training text.\n\n{card_facts(model, network)}")
        prompt = gr.Textbox(label="Prompt", value="ROMEO:", lines=2, elem_id="prompt")
        with gr.Row():
            length = gr.Slider(1, 2000, value=300, step=1, label="Characters to generate", elem_id="length")
            temperature = gr.Slider(0.05, 2.0, value=0.8, step=0.05, label="Temperature")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
            seed = gr.Number(value=0, precision=0, label="Seed")
        button = gr.Button("Generate", variant="primary", elem_id="generate")
        output = gr.Textbox(label="Generated text", lines=14, elem_id="output", interactive=False)
        button.click(generate, [prompt, length, temperature, top_p, seed], output)
    return demo


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()), allow_abbrev=False)
    parser.add_argument("--model", default=MODEL_ID, required=MODEL_ID is None,
                        help="a model folder (the --output_dir of scripts/train.py) or a Hub id")
    parser.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1; 0.0.0.0: everyone)")
    parser.add_argument("--port", type=int, default=None, help="port (default 7860, or the next free one)")
    parser.add_argument("--trust_remote_code", type=string_to_bool, nargs="?", const=True, default=TRUST_REMOTE_CODE,
                        help="run the model's own code (the .py files of its folder or Hub repository) to load it; "
                        f"needed without char_lstm installed (default {TRUST_REMOTE_CODE})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar for one small model
    try:
        demo = build_demo(args.model, args.trust_remote_code)
    except ValueError as error:  # transformers' refusal to run the model's code without trust_remote_code
        if "trust_remote_code" not in str(error):
            raise
        print(f"error: --model {args.model} needs its own code to load (the .py files of its folder or repository): "
              "pass --trust_remote_code if you trust that code, or install char_lstm (pip install -e . in its "
              "checkout) to load it with the installed classes.", file=sys.stderr)
        sys.exit(2)
    except OSError as error:  # a mistyped folder is first of all not a folder (not "cannot connect to the Hub")
        where = "" if os.path.isdir(args.model) else "no such folder, and no Hub model loaded either: "
        print(f"error: --model {args.model}: {where}{str(error).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    demo.launch(server_name=args.host, server_port=args.port, theme=THEME)


if __name__ == "__main__":
    main()
