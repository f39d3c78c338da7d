"""The clients a Hugging Face user brings, on a model trained by scripts/train.py: lm-evaluation-harness (HFLM) and
the `evaluate` perplexity metric."""

import json

import pytest
import torch
from torch.nn import CrossEntropyLoss

from char_lstm import load_model_and_tokenizer
from helpers import call_script, shakespeare_like, write_text


BLOCK = 32


@pytest.fixture(scope="module")
def harness(trained_model):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install lm_eval)")
    from lm_eval.models.huggingface import HFLM

    # out of the box: a folder path, nothing configured but the context length to compare with evaluate.py
    return HFLM(pretrained=str(trained_model), max_length=BLOCK, batch_size=4, device="cpu")


def requests(kind, *arguments):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(arguments)]


def test_harness_rolling_loglikelihood_equals_evaluate_py_on_the_same_windows(harness, trained_model, tmp_path):
    # lm-evaluation-harness reads [prefix=<eos>] + text in windows of BLOCK tokens from a fresh state; evaluate.py's
    # fixed windows read the document the way training does (<eos> first) in windows of BLOCK: the same windows when
    # the text is a whole number of windows long.
    text = shakespeare_like(4000)[1000 : 1000 + 5 * BLOCK]
    [rolling] = harness.loglikelihood_rolling(requests("loglikelihood_rolling", (text,)))
    out = tmp_path / "r.json"
    result = call_script("evaluate.py", ["--model_name_or_path", str(trained_model), "--validation_file",
                                        str(write_text(tmp_path / "t.txt", text)), "--block_size", str(BLOCK),
                                        "--modes", "fixed", "--output_json", str(out)], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    fixed = json.loads(out.read_text())["fixed"]
    assert fixed["characters"] == len(text)
    assert -rolling == pytest.approx(fixed["loss"] * fixed["characters"], rel=1e-5)


def test_harness_loglikelihood_equals_the_model(harness, trained_model):
    model, tokenizer = load_model_and_tokenizer(str(trained_model))
    pairs = [("ROMEO:", "\nBut, soft"), ("All:\nSpeak", ", speak."), ("", "JULIET:")]
    results = harness.loglikelihood(requests("loglikelihood", *pairs))
    for (context, continuation), (loglikelihood, _) in zip(pairs, results):
        # an empty context is conditioned on the document boundary token, as the model was trained
        prefix = tokenizer(context)["input_ids"] or [tokenizer.bos_token_id]
        target = tokenizer(continuation)["input_ids"]
        ids = torch.tensor([prefix + target])
        with torch.no_grad():
            logprobs = model(input_ids=ids).logits.log_softmax(-1)[0, len(prefix) - 1 : -1]
        expected = logprobs.gather(1, torch.tensor(target).unsqueeze(1)).sum().item()
        assert loglikelihood == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_harness_generate_until_stops_where_asked(harness, trained_model):
    model, tokenizer = load_model_and_tokenizer(str(trained_model))
    prompts = ["ROMEO:\n", "All:", "First Citizen:\nBefore"]
    asked = [{"until": ["\n"], "max_gen_toks": 25, "do_sample": False},
             {"until": ["§"], "max_gen_toks": 7, "do_sample": False},
             {"until": ["e"], "max_gen_toks": 30, "do_sample": False}]
    outputs = harness.generate_until(requests("generate_until", *zip(prompts, asked)))
    for prompt, kwargs, output in zip(prompts, asked, outputs):
        ids = tokenizer([prompt], return_tensors="pt")
        greedy = model.generate(**ids, max_new_tokens=kwargs["max_gen_toks"], do_sample=False)
        text = tokenizer.decode(greedy[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        expected = text.split(kwargs["until"][0])[0]
        assert output == expected
        assert kwargs["until"][0] not in output and len(output) <= kwargs["max_gen_toks"]
    assert len(outputs[1]) == 7 or tokenizer.eos_token in outputs[1]  # its own max_gen_toks, not a saved length


def perplexities(model, tokenizer, texts, batch_size, padding_side=None):
    """What `evaluate.load("perplexity")` computes (its code, with add_start_token=True), for a loaded model."""
    kwargs = {"padding_side": padding_side} if padding_side else {}
    encodings = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt", **kwargs)
    loss_fct = CrossEntropyLoss(reduction="none")
    results = []
    for start in range(0, len(texts), batch_size):
        batch = encodings["input_ids"][start : start + batch_size]
        mask = encodings["attention_mask"][start : start + batch_size]
        bos = torch.tensor([[tokenizer.bos_token_id]] * batch.size(0))
        batch = torch.cat([bos, batch], dim=1)
        mask = torch.cat([torch.ones(bos.size(), dtype=torch.int64), mask], dim=1)
        with torch.no_grad():
            logits = model(batch, attention_mask=mask).logits
        shift_logits, shift_labels, shift_mask = logits[..., :-1, :], batch[..., 1:], mask[..., 1:]
        nll = (loss_fct(shift_logits.transpose(1, 2), shift_labels) * shift_mask).sum(1) / shift_mask.sum(1)
        results += torch.exp(nll).tolist()
    return results


def test_perplexity_metric_batched_equals_one_text_at_a_time(trained_model):
    model, tokenizer = load_model_and_tokenizer(str(trained_model))
    texts = ["ROMEO:\nBut, soft! what light", "All:\nSpeak.", "JULIET:\nO Romeo, Romeo! wherefore art thou"]
    try:
        import evaluate

        metric = evaluate.load("perplexity", module_type="metric")
    except Exception:  # the metric's script lives on the Hub; offline, its computation above stands in for it
        metric = None
    if metric is not None:
        batched = metric.compute(model_id=str(trained_model), predictions=texts, batch_size=3, device="cpu")
        alone = metric.compute(model_id=str(trained_model), predictions=texts, batch_size=1, device="cpu")
        assert batched["perplexities"] == pytest.approx(alone["perplexities"], rel=1e-5)
    batched, alone = perplexities(model, tokenizer, texts, 3), perplexities(model, tokenizer, texts, 1)
    assert batched == pytest.approx(alone, rel=1e-5)
    # why the tokenizer pads on the right: left padding puts pads between the start token and the text
    assert perplexities(model, tokenizer, texts, 3, padding_side="left") != pytest.approx(alone, rel=1e-3)
