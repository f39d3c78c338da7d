"""The demo page (demo/app.py) in a real browser: the app serves a tiny trained model on 127.0.0.1, a headless
Chromium driven by Selenium types a prompt, presses Generate and reads the streamed text."""

import importlib.util
import os
import runpy
import shutil
import subprocess
import sys
import textwrap

import pytest

from helpers import ROOT, SUBPROCESS_TIMEOUT, make_model


BROWSER = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                if shutil.which(name)), None)
DRIVER = shutil.which("chromedriver")


@pytest.fixture
def browser():
    """A headless Chromium driven by Selenium; the test is skipped, saying what is missing, before any other work."""
    for module, extra in (("gradio", "demo"), ("selenium", "dev")):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"the browser test of the demo page needs {module} (pip install -e '.[{extra}]')")
    if BROWSER is None or DRIVER is None:
        pytest.skip("no Chromium and chromedriver on PATH (Debian: apt-get install -y chromium chromium-driver)")
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1000"):
        options.add_argument(argument)
    # the driver given, so that Selenium does not try to download one
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    yield driver
    driver.quit()


def test_the_demo_page_streams_a_generation_that_starts_with_the_prompt(browser, trained_model, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    app = runpy.run_path(str(ROOT / "demo" / "app.py"), run_name="demo_app")
    demo = app["build_demo"](str(trained_model))
    _, url, _ = demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, theme=app["THEME"])
    try:
        browser.get(url)
        wait = WebDriverWait(browser, 60)
        prompt = wait.until(lambda page: page.find_element(By.CSS_SELECTOR, "#prompt textarea"))
        # the card's facts: size, data, bits/char of the training run
        facts = browser.find_element(By.TAG_NAME, "body").text
        assert "2 layers of 32 units" in facts and "trained on train.txt (40 steps)" in facts and "bits/char" in facts
        prompt.clear()
        prompt.send_keys("JULIET:")
        length = browser.find_element(By.CSS_SELECTOR, "#length input[type=number]")
        length.clear()
        length.send_keys("20")
        browser.find_element(By.CSS_SELECTOR, "#generate").click()
        output = browser.find_element(By.CSS_SELECTOR, "#output textarea")
        wait.until(lambda page: len(output.get_attribute("value")) >= len("JULIET:") + 20)
        browser.save_screenshot(str(tmp_path / "demo.png"))
        text = output.get_attribute("value")
    finally:
        demo.close()
    assert text.startswith("JULIET:") and len(text) == len("JULIET:") + 20, text
    assert (tmp_path / "demo.png").stat().st_size > 10_000


def test_the_spaces_app_loads_the_model_without_char_lstm_and_shows_control_characters(tokenizer, tmp_path):
    """The Space that scripts/push_to_hub.py --space builds runs where char_lstm is not installed: its app.py turns
    trust_remote_code on (the Space's owner chose the model) and shows control characters with the terminal.py put
    next to it; --trust_remote_code false refuses the model's code in one line."""
    if importlib.util.find_spec("gradio") is None:
        pytest.skip("the demo needs gradio (pip install -e '.[demo]')")
    from char_lstm.hub import build_space_folder

    folder, space = tmp_path / "model", tmp_path / "space"
    make_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    build_space_folder(str(space), "you/char-demo", "you/char-model")
    assert sorted(os.listdir(space)) == ["README.md", "app.py", "facts.py", "requirements.txt", "terminal.py"]
    app = (space / "app.py").read_text()
    assert "\nMODEL_ID = 'you/char-model'" in app and "\nTRUST_REMOTE_CODE = True" in app
    script = textwrap.dedent(
        """
        import runpy
        import sys

        class BlockCharLSTM:
            def find_spec(self, name, path=None, target=None):
                if name == "char_lstm" or name.startswith("char_lstm."):
                    raise ImportError("char_lstm is blocked in this test")

        sys.meta_path.insert(0, BlockCharLSTM())
        space, folder = sys.argv[1:]
        sys.path.insert(0, space)  # as `python app.py` in the Space's folder
        app = runpy.run_path(space + "/app.py", run_name="space_app")
        print("trust:", app["parse_arguments"]([]).trust_remote_code)
        print("shown:", app["visible_controls"]("\\x1b[2J\\u202e"), app["visible_controls"].__module__)
        print("built:", type(app["build_demo"](folder, True)).__name__)
        print("char_lstm imported:", "char_lstm" in sys.modules)
        app["main"](["--model", folder, "--trust_remote_code", "false"])
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), PYTHONPATH="", GRADIO_ANALYTICS_ENABLED="False")
    result = subprocess.run([sys.executable, "-c", script, str(space), str(folder)], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stdout.splitlines() == ["trust: True", "shown: \\x1b[2J\\u202e terminal", "built: Blocks",
                                          "char_lstm imported: False"], result.stdout
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: --model {folder} needs its own code to load") and "--trust_remote_code" in error
