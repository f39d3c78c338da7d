"""The demo page (demo/app.py) in a real browser: the app serves a tiny trained model on 127.0.0.1, a headless
Chromium driven by Selenium types a prompt, presses Generate and reads the streamed text."""

import importlib.util
import runpy
import shutil

import pytest

from helpers import ROOT


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
