"""The page of `scripts/export.py --format web` in a real browser: the folder is served on 127.0.0.1 by Python's
http.server and opened in Debian's Chromium, headless, driven by Selenium (char_lstm.web_browser). The model runs in
the page (ONNX Runtime Web's WebAssembly, from the pinned npm dependency): its greedy text is generate()'s, for every
cell type and an adaptive softmax; a seed gives the same sampled text twice; the console stays free of errors."""

import pytest
import torch

from char_lstm import CharLSTMTokenizer, UsageError
from char_lstm.cells_char_lstm import CELL_TYPES
from char_lstm.export import exporters_unavailable, generate_greedily
from char_lstm.export_command import ExportArguments, run_export
from char_lstm.terminal import visible_controls
from char_lstm.web_browser import Page, browser_unavailable, headless_chromium, serve_folder
from char_lstm.web_export import RUNTIME_FILES, find_runtime, write_web_folder
from helpers import CORPUS, call_script, make_model, run_script


def _unavailable() -> str | None:
    reason = exporters_unavailable() or browser_unavailable()
    if reason is None:
        try:
            find_runtime()
        except UsageError as error:
            reason = str(error)
    return reason


pytestmark = pytest.mark.skipif(_unavailable() is not None, reason=str(_unavailable()))
PROMPT = "ROMEO:"


@pytest.fixture(scope="module")
def browser():
    with headless_chromium() as driver:
        yield driver


def export_web(model, tokenizer, folder) -> str:
    """`model` saved into folder/model and exported for the web into folder/web (the check through the written files
    on: ONNX Runtime's Python package), returning the web folder."""
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    run_export(ExportArguments(model_name_or_path=str(folder / "model"), output_dir=str(folder / "web"),
                               format="web", prompt=PROMPT, max_new_tokens=50))
    return str(folder / "web")


def shown_greedy_text(model, tokenizer, prompt: str, length: int) -> str:
    ids = tokenizer([prompt], return_tensors="pt")["input_ids"]
    return visible_controls(prompt + tokenizer.decode(generate_greedily(model, ids, length)[0, ids.shape[1]:],
                                                      skip_special_tokens=True))


def wide_tokenizer():
    """A vocabulary of 260 characters (tiny Shakespeare's and 200 Greek, Cyrillic and CJK ones): room for the
    clusters of an adaptive softmax."""
    extra = "".join(chr(code) for code in (*range(0x391, 0x3C9), *range(0x410, 0x44F), *range(0x4E00, 0x4E60)))
    return CharLSTMTokenizer.from_corpus(CORPUS + extra)


@pytest.mark.parametrize("kind", [*CELL_TYPES, "adaptive"])
def test_the_page_writes_generates_greedy_text_for_every_cell_type(kind, tokenizer, browser, tmp_path):
    if kind == "adaptive":
        tokenizer = wide_tokenizer()
        model = make_model(tokenizer, hidden_size=48, embedding_size=16, adaptive_softmax_cutoffs=[20, 100], seed=1)
    else:
        model = make_model(tokenizer, cell_type=kind, hidden_size=48, embedding_size=16, seed=1)
    with torch.no_grad():  # weights with some spread, so that the text is not one character repeated
        for parameter in model.parameters():
            parameter.mul_(3.0)
    with serve_folder(export_web(model, tokenizer, tmp_path)) as url:
        page = Page(browser, url)
        text = page.generate(prompt=PROMPT, length=200, greedy=True)
        assert page.console_errors() == []
    expected = shown_greedy_text(model, tokenizer, PROMPT, 200)
    assert text == expected
    assert len(set(expected[len(PROMPT):])) > 5, expected  # a text, not a character repeated


def test_the_trained_models_page_samples_by_seed_and_shows_its_facts(trained_model, browser, tmp_path):
    out = tmp_path / "web"
    result = run_script("export.py", ["--model_name_or_path", trained_model, "--format", "web", "--output_dir", out,
                                      "--prompt", "JULIET:"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"exported {trained_model} (2x32 LSTM) as web in ") and "decode.onnx" in lines[0]
    assert lines[1].startswith(f"check: 100 characters of greedy text through the files in {out} equal")
    assert lines[-1] == f"serve the page: cd {out} && python -m http.server 8000, then open http://127.0.0.1:8000/"
    assert result.stderr.strip().splitlines() in ([], [result.stderr.strip()]) and "Traceback" not in result.stderr
    with serve_folder(str(out)) as url:
        page = Page(browser, url)
        facts = page.element("facts").text
        assert "LSTM, 2 layers of 32 units" in facts and "trained on train.txt (40 steps)" in facts
        assert page.element("prompt").get_attribute("value") == "JULIET:"
        first = page.generate(length=300, greedy=False, temperature=1.0, top_p=0.9, seed=7)
        assert page.generate(seed=7) == first  # the same seed: the same text
        other = page.generate(seed=8)
        assert other != first and other.startswith("JULIET:") and first.startswith("JULIET:")
        assert 0 < page.characters_per_second and page.status.startswith("Generated ")
        assert int(page.element("rate").get_attribute("data-characters")) <= 300
        browser.save_screenshot(str(tmp_path / "page.png"))
        assert page.console_errors() == []
        # everything from the folder (no CDN): the page, its scripts, the model and the runtime
        loaded = {requested.removeprefix(url) for requested in page.requested_urls()}
        assert {"", "app.js", "decoding.js", "model.json", "decode.onnx", "ort/ort.wasm.min.js",
                "ort/ort-wasm-simd-threaded.js", "ort/ort-wasm-simd-threaded.wasm"} == loaded, loaded
    assert (tmp_path / "page.png").stat().st_size > 10_000


def test_the_page_names_unknown_characters_shows_controls_and_refuses_bad_settings(tokenizer, browser, tmp_path):
    with serve_folder(export_web(make_model(tokenizer), tokenizer, tmp_path)) as url:
        page = Page(browser, url)
        page.set(prompt="ROMEO: \u20ac\x1b")  # the euro sign and ESC are not in the vocabulary
        assert page.element("unknown").text == "Not in the model's vocabulary, read as <unk>: \"\u20ac\" \"\\x1b\""
        text = page.generate(length=20, greedy=True)
        assert text.startswith("ROMEO: \u20ac\\x1b")  # ESC shown as its escape, not obeyed
        page.set(prompt="ROMEO:")
        assert page.element("unknown").text == ""
        for controls, message in [({"prompt": "\u20ac\u20ac"}, "Type a prompt with characters of the model's"),
                                  ({"prompt": "ROMEO:", "greedy": False, "temperature": 0}, "Temperature must be a"),
                                  ({"temperature": 1, "length": 2.5}, "Characters to generate must be a whole")]:
            with pytest.raises(RuntimeError, match=message):
                page.generate(**controls)
        assert page.generate(length=10).startswith("ROMEO:")  # the page works on after a refusal
        page.set(length=1_000_000)  # a long run, stopped
        page.element("generate").click()
        page.wait_for("generating")
        page.element("stop").click()
        page.wait_for("done")
        assert page.status.startswith("Generated ") and page.status.endswith(" (stopped).")
        assert int(page.element("rate").get_attribute("data-characters")) < 1_000_000
        assert page.console_errors() == []


def test_the_page_reads_typed_special_tokens_and_stops_at_the_end_of_text(browser, tmp_path):
    """A model trained with document boundaries: "<eos>" typed in the prompt is its token (a new document), a
    character beyond the BMP is one token, and the end-of-text token ends the text as it ends generate()'s."""
    tokenizer = CharLSTMTokenizer.from_corpus(CORPUS + "\U0001f642", document_boundary=True)
    model = make_model(tokenizer, eos_token_id=tokenizer.eos_token_id, hidden_size=48, seed=2)
    with torch.no_grad():
        model.lm_head.bias[tokenizer.eos_token_id] += 4.0  # likely enough to end the text within 200 characters
    prompt = "<eos>ROMEO: \U0001f642"
    ids = tokenizer([prompt], return_tensors="pt")["input_ids"]
    generated = generate_greedily(model, ids, 200)[0, ids.shape[1]:]
    assert ids[0, 0] == tokenizer.eos_token_id and 0 < len(generated) < 200 and generated[-1] == tokenizer.eos_token_id
    with serve_folder(export_web(model, tokenizer, tmp_path)) as url:
        page = Page(browser, url)
        text = page.generate(prompt=prompt, length=200, greedy=True)
        assert page.status.endswith("(the model ended the text).")
        assert page.element("rate").get_attribute("data-characters") == str(len(generated))
        assert page.element("unknown").text == ""
        assert page.console_errors() == []
    assert text == shown_greedy_text(model, tokenizer, prompt, 200)


def test_a_failed_web_export_leaves_the_folder_there_as_it_was(tokenizer, tmp_path):
    """The folder is written beside --output_dir and takes its place once complete: a failure on the way (here the
    runtime's .wasm cannot be copied) leaves the old folder, and no half-written one."""
    from char_lstm.export import export_for_generation

    model = make_model(tokenizer)
    old = tmp_path / "web"
    old.mkdir()
    (old / "index.html").write_text("the page published before")
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    for name in RUNTIME_FILES:
        (runtime / name).write_text("a runtime file")
    (runtime / "ort-wasm-simd-threaded.wasm").unlink()
    (runtime / "ort-wasm-simd-threaded.wasm").mkdir()  # a folder where the .wasm should be: the copy fails
    exported = export_for_generation(model, tokenizer([PROMPT], return_tensors="pt")["input_ids"], "onnx")
    with pytest.raises(IsADirectoryError):
        write_web_folder(exported, model, tokenizer, str(old), "model", PROMPT, str(runtime))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["runtime", "web"]
    assert [path.name for path in old.iterdir()] == ["index.html"]
    assert (old / "index.html").read_text() == "the page published before"
    # a folder that another run wrote while this one exported is not replaced without overwrite: both pages stay
    written_meanwhile = (r"was written by another run while this one exported; this export's page is in .*/\.web-\w+: "
                         r"choose another --output_dir, or pass --overwrite_output_dir")
    with pytest.raises(UsageError, match=written_meanwhile):
        write_web_folder(exported, model, tokenizer, str(old), "model", PROMPT, find_runtime())
    (scratch,) = [path for path in tmp_path.iterdir() if path.name.startswith(".web-")]
    assert (scratch / "index.html").is_file() and (old / "index.html").read_text() == "the page published before"
    files = write_web_folder(exported, model, tokenizer, str(old), "model", PROMPT, find_runtime(), overwrite=True)
    assert "decode.onnx" in files and "<html" in (old / "index.html").read_text()
    empty = tmp_path / "empty"  # an empty folder is free, as --output_dir's check has it
    empty.mkdir()
    assert "decode.onnx" in write_web_folder(exported, model, tokenizer, str(empty), "model", PROMPT, find_runtime())


def test_the_page_opened_from_the_disk_says_how_to_serve_it(tokenizer, browser, tmp_path):
    folder = export_web(make_model(tokenizer), tokenizer, tmp_path)
    browser.get(f"file://{folder}/index.html")
    status = browser.find_element("id", "status").text
    assert "must be served over HTTP" in status and "python -m http.server 8000" in status
    browser.get_log("browser")  # the module the browser refused to load from the disk is logged there


def test_ten_thousand_characters_leave_the_pages_memory_as_it_was(tokenizer, browser, tmp_path):
    with serve_folder(export_web(make_model(tokenizer), tokenizer, tmp_path)) as url:
        page = Page(browser, url, timeout=120)
        page.generate(length=2000, greedy=False)  # warm-up
        before = page.memory()
        for _ in range(2):
            page.generate(length=10_000)
            assert page.element("rate").get_attribute("data-characters") == "10000"  # (a few are special tokens)
        after = page.memory()
        assert page.console_errors() == []
    assert after["js_heap"] - before["js_heap"] < 1_000_000, (before, after)
    # (Selenium's typing of the length leaves a node in Chromium's undo history each time: not the page's own)
    assert after["dom_nodes"] - before["dom_nodes"] < 10, (before, after)


def test_the_web_export_needs_its_runtime_and_says_how_to_get_it(trained_model, tmp_path):
    missing = tmp_path / "no-runtime"
    missing.mkdir()
    argv = ["--model_name_or_path", trained_model, "--output_dir", tmp_path / "web"]
    result = call_script("export.py", [*argv, "--format", "web", "--web_runtime", missing], cwd=tmp_path)
    assert result.returncode == 2 and not (tmp_path / "web").exists()
    assert result.stderr.strip().splitlines()[-1] == (  # after a note on the cores, when they are busy
        f"error: --format web needs onnxruntime-web's files, and --web_runtime {missing} has no ort.wasm.min.mjs, "
        "ort-wasm-simd-threaded.mjs, ort-wasm-simd-threaded.wasm: run `npm ci` in the char_lstm checkout "
        "(package.json pins onnxruntime-web), or pass --web_runtime with the dist folder of an installed "
        "onnxruntime-web.")
    result = call_script("export.py", [*argv, "--format", "onnx", "--web_runtime", missing], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: --web_runtime is for --format web, not --format onnx."
