import io

import torch

from char_lstm import load_model_and_tokenizer
from char_lstm.sampling import CharacterStreamer, generate_texts
from helpers import call_script, run_script


def test_seeded_sampling_is_reproducible(trained_model, tmp_path):
    args = ["--model_name_or_path", str(trained_model), "--prompt", "ROMEO:", "--max_new_tokens", "60"]
    a = call_script("generate.py", [*args, "--seed", "5"], tmp_path)
    b = call_script("generate.py", [*args, "--seed", "5"], tmp_path)
    c = call_script("generate.py", [*args, "--seed", "6"], tmp_path)
    assert a.returncode == 0, a.stderr[-2000:]
    assert a.stdout == b.stdout and a.stdout != c.stdout
    assert a.stdout.startswith("ROMEO:") and len(a.stdout.rstrip("\n")) >= 6 + 50


def test_streamed_characters_arrive_one_by_one_in_order(trained_model):
    model, tokenizer = load_model_and_tokenizer(str(trained_model))
    writes = []

    class Recorder(io.StringIO):
        def write(self, text):
            writes.append(text)
            return super().write(text)

    sink = Recorder()
    torch.manual_seed(0)
    [text] = generate_texts(model, tokenizer, ["ROMEO:"], streamer=CharacterStreamer(tokenizer, file=sink),
                            max_new_tokens=30, do_sample=True, pad_token_id=tokenizer.pad_token_id)
    pieces = [w for w in writes if w]
    # the prompt first, then one write per generated character, in order, then the closing newline
    assert pieces[0] == "ROMEO:" and pieces[-1] == "\n"
    assert len(pieces) == 1 + 30 + 1
    assert "".join(pieces[:-1]) == text


def test_every_prompt_of_a_batch_is_generated_in_order_and_equals_its_prompt_alone(trained_model, tmp_path):
    base = ["--model_name_or_path", str(trained_model), "--max_new_tokens", "40", "--greedy"]
    prompts = ["ROMEO:", "All:\n"]
    both = call_script("generate.py", [*base, "--prompt", *prompts], tmp_path)
    assert both.returncode == 0, both.stderr[-2000:]
    blocks = [b for b in both.stdout.split("===== sample ") if b]
    assert [b.split("=====\n", 1)[0] for b in blocks] == ["1 of 2 ", "2 of 2 "]  # one sample per prompt, none dropped
    texts = [b.split("=====\n", 1)[1].rstrip("\n") for b in blocks]
    assert len(texts) == len(prompts)
    for prompt, text in zip(prompts, texts, strict=True):
        alone = call_script("generate.py", [*base, "--prompt", prompt], tmp_path)
        assert alone.returncode == 0, alone.stderr[-2000:]
        assert text.startswith(prompt) and len(text) == len(prompt) + 40
        assert alone.stdout.rstrip("\n") == text


def test_stdin_prompt_and_num_return_sequences(trained_model, tmp_path):
    """A real `python scripts/generate.py` (the other tests call the script's code in this process)."""
    result = run_script("generate.py", ["--model_name_or_path", str(trained_model), "--max_new_tokens", "20",
                                        "--num_return_sequences", "3", "--seed", "1"], tmp_path, stdin="JULIET:")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("===== sample ") == 3
    assert result.stdout.count("JULIET:") == 3
    assert "Traceback" not in result.stderr and "arning" not in result.stderr, result.stderr[-2000:]


def test_unknown_prompt_characters(trained_model, tmp_path):
    base = ["--model_name_or_path", str(trained_model), "--max_new_tokens", "5", "--greedy"]
    refused = call_script("generate.py", [*base, "--prompt", "ROMEO ☃ é"], tmp_path)
    assert refused.returncode == 2
    assert "error: The prompt has characters the model has never seen: ['é', '☃']" in refused.stderr
    mapped = call_script("generate.py", [*base, "--prompt", "ROMEO ☃", "--unknown_to_unk"], tmp_path)
    assert mapped.returncode == 0 and mapped.stdout.startswith("ROMEO ☃")
    only_unknown = call_script("generate.py", [*base, "--prompt", "☃☃", "--unknown_to_unk"], tmp_path)
    assert only_unknown.returncode == 2 and "only unknown characters" in only_unknown.stderr
