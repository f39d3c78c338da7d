"""The page of `scripts/export.py --format web` as a visitor meets it: its folder served on 127.0.0.1 by Python's
http.server, opened in a headless Chromium driven by Selenium. The tests of the page (tests/scripts/test_web_page.py)
and its benchmark (benchmarks/web.py) drive it with this; so can you, to try a page before you publish it.

    with serve_folder("outputs/sh-web") as url, headless_chromium() as driver:
        page = Page(driver, url)
        text = page.generate(prompt="ROMEO:", length=200, greedy=True)

Needs selenium (the dev extra) and a Chromium with its chromedriver (Debian: apt-get install chromium
chromium-driver); `browser_unavailable()` says what is missing.
"""

import contextlib
import functools
import http.server
import importlib.util
import shutil
import threading
import time


BROWSERS = ("chromium", "chromium-browser", "google-chrome")
STATES = ("loading", "ready", "generating", "done", "error")  # the page's body[data-state]


def _browser() -> str | None:
    return next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)


def browser_unavailable() -> str | None:
    """Why the page cannot be driven here (None: it can)."""
    if importlib.util.find_spec("selenium") is None:
        return "driving the page needs selenium: pip install -e '.[dev]'"
    if _browser() is None or shutil.which("chromedriver") is None:
        return "no Chromium and chromedriver on PATH (Debian: apt-get install -y chromium chromium-driver)"
    return None


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # no line per request on stderr
        pass


@contextlib.contextmanager
def serve_folder(folder: str):
    """Serve `folder` on 127.0.0.1 (a free port) in a thread, as `python -m http.server` does; yields its URL."""
    handler = functools.partial(_QuietHandler, directory=folder)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextlib.contextmanager
def headless_chromium(width: int = 1200, height: int = 1000):
    """A headless Chromium driven by Selenium (its console kept for `Page.console_errors`); yields the driver."""
    reason = browser_unavailable()
    if reason is not None:
        raise RuntimeError(reason)
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = _browser()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # the driver given, so that Selenium does not try to download one
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """The page at `url`, loaded in `driver`: its controls set, its Generate button pressed, its text read."""

    def __init__(self, driver, url: str, timeout: float = 60):
        self.driver, self.timeout = driver, timeout
        driver.get(url)
        self.wait_for("ready", "error")
        if self.state == "error":
            raise RuntimeError(f"the page at {url} did not load: {self.status}")

    def element(self, element_id: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.ID, element_id)

    @property
    def state(self) -> str:
        return self.driver.find_element("tag name", "body").get_attribute("data-state")

    @property
    def status(self) -> str:
        return self.element("status").text

    @property
    def text(self) -> str:
        """The generated text as the page shows it (the prompt first; control characters as escapes)."""
        return self.element("output").get_attribute("textContent")

    @property
    def characters_per_second(self) -> float:
        return float(self.element("rate").get_attribute("data-characters-per-second"))

    def wait_for(self, *states: str, timeout: float | None = None) -> None:
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(self.driver, timeout or self.timeout, poll_frequency=0.05).until(
            lambda _: self.state in states)

    def set(self, prompt: str | None = None, greedy: bool | None = None, **numbers) -> None:
        """Type into the controls: the prompt, greedy, and `length`, `temperature`, `top_p`, `seed`."""
        if prompt is not None:  # typed as a visitor would, through the page's own input event
            self.driver.execute_script("const p = document.getElementById('prompt'); p.value = arguments[0];"
                                       "p.dispatchEvent(new Event('input'));", prompt)
        if greedy is not None and self.element("greedy").is_selected() != greedy:
            self.element("greedy").click()
        for name, value in numbers.items():
            self.element(name).clear()
            self.element(name).send_keys(str(value))

    def generate(self, timeout: float | None = None, **controls) -> str:
        """Set the controls, press Generate, wait for the end; the page's text, or a RuntimeError with its status."""
        self.set(**controls)
        # the last run's end state cleared first, so that it is not taken for this run's
        self.driver.execute_script("document.body.dataset.state = 'submitted';")
        self.element("generate").click()
        self.wait_for("done", "error", timeout=timeout)
        if self.state == "error":
            raise RuntimeError(self.status)
        return self.text

    def requested_urls(self) -> list[str]:
        """Every URL the page has loaded: the document, its scripts, the model, the runtime's files."""
        return self.driver.execute_script("return [location.href, ...performance.getEntriesByType('resource')"
                                          ".map((entry) => entry.name)];")

    def console_errors(self) -> list[str]:
        """The console's errors (and failed requests) since the last call."""
        return [entry["message"] for entry in self.driver.get_log("browser") if entry["level"] == "SEVERE"]

    def memory(self) -> dict[str, int]:
        """After a garbage collection: the page's JavaScript heap in use, its DOM nodes, and the resident memory of
        Chromium's renderer processes (which holds the WebAssembly memory of the runtime), in bytes."""
        import psutil

        self.driver.execute_cdp_cmd("HeapProfiler.collectGarbage", {})
        self.driver.execute_cdp_cmd("Performance.enable", {})
        metrics = {m["name"]: m["value"] for m in self.driver.execute_cdp_cmd("Performance.getMetrics", {})["metrics"]}
        time.sleep(0.2)
        renderers = [process for process in psutil.Process(self.driver.service.process.pid).children(recursive=True)
                     if "--type=renderer" in " ".join(_cmdline(process))]
        return {"js_heap": int(metrics["JSHeapUsedSize"]), "dom_nodes": int(metrics["Nodes"]),
                "renderer_rss": sum(_rss(process) for process in renderers)}


def _cmdline(process) -> list[str]:
    try:
        return process.cmdline()
    except Exception:  # gone, or not ours to read
        return []


def _rss(process) -> int:
    try:
        return process.memory_info().rss
    except Exception:
        return 0
