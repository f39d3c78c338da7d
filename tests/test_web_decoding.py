"""The web page's arithmetic (web/decoding.js), run in Node against what it stands for in Python: its tokenizer
against CharLSTMTokenizer (special tokens typed as written, characters beyond the BMP, unknown characters, <bos>
added), its sampling against transformers' temperature and top-p (TopPLogitsWarper), its greedy choice against
torch.argmax's ties, and its shown text against char_lstm.terminal.visible_controls."""

import json
import shutil
import subprocess

import pytest
import torch
from transformers import TopPLogitsWarper

from char_lstm import CharLSTMTokenizer
from char_lstm.terminal import visible_controls
from char_lstm.web_export import tokenizer_info
from helpers import CORPUS, ROOT, chi_square


NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="the page's script runs in Node here (apt install nodejs)")
MODULE = (ROOT / "web" / "decoding.js").as_uri()
RUN = f"import * as decoding from {MODULE!r};" + """
let input = "";
for await (const chunk of process.stdin) input += chunk;
const { code, data } = JSON.parse(input);
process.stdout.write(JSON.stringify(new Function("decoding", "data", code)(decoding, data)));
"""


def in_node(code: str, data):
    """`code` (a function body given `decoding`, the module, and `data`) run in Node; its JSON return value."""
    done = subprocess.run([NODE, "--input-type=module", "-e", RUN], input=json.dumps({"code": code, "data": data}),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


TEXTS = ["ROMEO: hello", "a<eos>b", "<eos>", "", "caf\u00e9 \u20ac \U0001f642\U0001f642!", "<unk><pad>x",
         "\U0001f642\u200d\U0001f642", "<eo", "\r\n\t\x1b[2J"]


@pytest.mark.parametrize("add_bos", [False, True])
def test_the_pages_tokenizer_encodes_and_decodes_as_char_lstm_tokenizer(add_bos):
    tokenizer = CharLSTMTokenizer.from_corpus(CORPUS + "\U0001f642\u00e9\r", document_boundary=not add_bos,
                                              add_bos_token=add_bos)
    info = tokenizer_info(tokenizer, len(tokenizer))
    got = in_node("const t = new decoding.Tokenizer(data.info); return {encoded: data.texts.map((x) => t.encode(x)),"
                  " decoded: data.info.tokens.map((_, id) => t.decode(id))};", {"info": info, "texts": TEXTS})
    specials = sorted((str(token) for token in tokenizer.added_tokens_decoder.values()), key=len, reverse=True)
    for text, encoded in zip(TEXTS, got["encoded"]):
        assert encoded["ids"] == tokenizer(text)["input_ids"], text
        for special in specials:  # typed special tokens are one token each, none of their characters unknown
            text = text.replace(special, "")
        assert sorted(encoded["unknown"]) == sorted(set(tokenizer.oov_characters(text))), text
    assert got["decoded"] == [tokenizer.decode([i], skip_special_tokens=True) for i in range(len(tokenizer))]


def test_the_pages_shown_text_is_visible_controls_even_in_pieces():
    text = "a\x1b[31mred\x1b[0m\r\nline\rover\u202egnp.exe\x85\x7f\t\U0001f642\r"
    pieces = ["a\x1b[31mred\x1b[0m\r", "\nline\r", "over\u202e", "gnp.exe\x85\x7f\t\U0001f642\r"]
    got = in_node("const shown = new decoding.VisibleText(); const out = data.pieces.map((p) => shown.push(p));"
                  " return {whole: decoding.visible(data.text), pieces: out.join('') + shown.end()};",
                  {"text": text, "pieces": pieces})
    assert got == {"whole": visible_controls(text), "pieces": visible_controls(text)}


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.8), (1.5, 0.3)])
def test_the_pages_sampling_draws_from_transformers_distribution(temperature, top_p):
    torch.manual_seed(0)
    logits = torch.randn(40) * 2
    draws = 100_000
    counts = in_node("const random = decoding.seededRandom(7); const counts = new Array(data.logits.length).fill(0);"
                     " const logits = Float32Array.from(data.logits);"
                     " for (let i = 0; i < data.draws; i++) counts[decoding.sample(logits, data.t, data.p, random)]++;"
                     " return counts;", {"logits": logits.tolist(), "draws": draws, "t": temperature, "p": top_p})
    warped = TopPLogitsWarper(top_p)(None, (logits / temperature)[None]) if top_p < 1 else (logits / temperature)[None]
    expected = torch.softmax(warped[0], dim=0)
    counts = torch.tensor(counts)
    assert counts.sum() == draws and bool((counts[expected == 0] == 0).all())  # nothing outside the nucleus
    statistic, freedom = chi_square(counts, expected)
    assert statistic < freedom + 6 * (2 * freedom) ** 0.5, (statistic, freedom)  # chi-square: mean k, sd sqrt(2k)


def test_the_pages_seeded_draws_repeat_and_greedy_takes_the_first_of_equal_logits():
    got = in_node("const draw = (seed) => { const r = decoding.seededRandom(seed); return [r(), r(), r()]; };"
                  " return {a: draw(5), b: draw(5), c: draw(6), ties: decoding.argmax(Float32Array.of(1, 3, 3, 2))};",
                  None)
    assert got["a"] == got["b"] != got["c"] and all(0 <= x < 1 for x in got["a"])
    assert got["ties"] == int(torch.tensor([1.0, 3.0, 3.0, 2.0]).argmax()) == 1
