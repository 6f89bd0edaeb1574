"""`tunesmith ui` in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium):
a bad field shows the CLI's message and starts nothing; the Train form is filled for a tiny run, which
starts, shows its progress and a growing loss curve, finishes; it is opened in Runs and compared, the
Evaluate tab answers, the run chats beside its base, and Export shows a refusal with its reason and
then writes the vLLM adapter. Each tab is saved as a PNG (to $TUNESMITH_UI_SCREENSHOTS, e.g. docs/ui,
when set: that is how the docs' screenshots are made)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

webdriver = pytest.importorskip("selenium.webdriver", reason="the browser tests drive Chromium with selenium (dev extra)")
pytest.importorskip("fastapi", reason="tunesmith ui needs the serve extra (FastAPI, uvicorn)")
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from helpers import alpaca_rows, write_jsonl

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
DRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,   # a UI process, a training process and a browser: about a minute here
    pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                       reason="needs Chromium and its driver: apt-get install -y chromium chromium-driver"),
]
SRC = str(Path(__file__).resolve().parents[2] / "src")
MODEL = os.environ.get("TUNESMITH_UI_MODEL", "random:llama")   # docs screenshots: smollm2-135m
SLOW = 1 if MODEL.startswith("random:") else 5                  # a real model: longer waits


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui")
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith.cli", "ui", "--port", "0", "--runs-dir", "runs"],
                            cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    line = proc.stdout.readline()
    assert line.startswith("tunesmith ui: http://"), line + proc.stdout.read()
    url = line.split()[2]
    yield url, tmp
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1050"):
        opts.add_argument(a)
    opts.binary_location = CHROMIUM
    d = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield d
    d.quit()


def shot(d, name, tmp):
    out = Path(os.environ.get("TUNESMITH_UI_SCREENSHOTS") or tmp)
    out.mkdir(parents=True, exist_ok=True)
    d.execute_script("window.scrollTo(0, 0)")
    d.save_screenshot(str(out / f"{name}.png"))


def typed(d, key, text):
    box = d.find_element(By.ID, f"f-{key}")
    box.clear()
    box.send_keys(text)


def wait(d, cond, timeout=30, what=""):
    return WebDriverWait(d, timeout * SLOW, poll_frequency=0.2).until(lambda _: cond(), what)


def click(d, css):
    """Click through the page's own DOM (a table redrawn by its refresh leaves no stale handle)."""
    assert d.execute_script("const e = document.querySelector(arguments[0]); if (e) e.click(); return !!e", css), css


def text(d, id_):
    return d.find_element(By.ID, id_).text


def test_train_watch_runs_chat_export(ui, browser):
    url, tmp = ui
    d = browser
    data = write_jsonl(tmp / "add.jsonl", alpaca_rows(48))
    d.get(url)
    wait(d, lambda: d.execute_script("return document.body.dataset.ready") == "1", 60, "the page loads the schema")

    # a bad field: the CLI's message, and Start starts nothing
    typed(d, "data.train", str(data))
    typed(d, "train.lr", "-1")
    msg = "error: form.yaml: train.lr: Input should be greater than 0 (got -1)"
    wait(d, lambda: text(d, "form-error") == msg, what="the CLI's message for train.lr")
    d.find_element(By.ID, "start-btn").click()
    time.sleep(1)
    assert json.load(urllib.request.urlopen(url + "api/runs")) == []
    assert d.find_element(By.ID, "progress").get_attribute("hidden")

    # the form for a tiny run; the preview shows the rows and the detected format
    typed(d, "train.lr", "0.002")
    typed(d, "model.name_or_path", MODEL)
    Select(d.find_element(By.ID, "f-method.use_rslora")).select_by_value("true")
    typed(d, "train.max_steps", "16")
    typed(d, "train.save_every", "8")
    typed(d, "train.max_seq_len", "64")
    typed(d, "train.batch_size", "2")
    d.find_element(By.ID, "preview-btn").click()
    wait(d, lambda: text(d, "preview-format") == "format: alpaca", what="the detected format")
    assert "Add " in d.find_element(By.ID, "preview-table").text
    wait(d, lambda: "max_steps: 16" in text(d, "yaml") and not d.find_element(By.ID, "form-error").is_displayed(),
         what="the YAML follows the form")
    shown = text(d, "yaml")   # fields left at their default are not written (smollm2-135m is model's default)
    assert (MODEL == "smollm2-135m" or f"name_or_path: {MODEL}" in shown) and "use_rslora: true" in shown

    d.find_element(By.ID, "start-btn").click()
    wait(d, lambda: text(d, "run-status") == "running", 30, "the run starts")
    curve = lambda: d.execute_script(  # noqa: E731
        "const p = document.querySelector('#train-chart path.curve'); return p ? p.getAttribute('d') : ''")
    wait(d, lambda: curve().count("L") >= 1, 180, "the first steps' loss curve")
    assert text(d, "prog-step").endswith("/ 16") and text(d, "prog-loss") != "-"
    # the curve follows the progress line (a tiny run may finish between two of the page's polls)
    assert curve().count("L") + 1 <= int(text(d, "prog-step").split("/")[0])
    wait(d, lambda: text(d, "run-status") not in ("running", "stopping"), 240, "the run finishes")
    shot(d, "train", tmp)
    assert text(d, "run-status") == "completed", text(d, "log-tail")
    wait(d, lambda: curve().count("L") == 15, 10, "the curve reaches all 16 steps")
    assert text(d, "prog-toks") != "-"
    assert text(d, "prog-step") == "16 / 16"

    # Runs: the run is listed as completed; its curves; selected and compared
    d.find_element(By.ID, "tab-runs").click()
    row = "#runs-table tr[data-run='run']"
    row_text = lambda: d.execute_script("const r = document.querySelector(arguments[0]); return r ? r.innerText : ''", row)  # noqa: E731
    wait(d, lambda: "completed" in row_text(), what="the run is listed")
    assert "lora" in row_text() and MODEL in row_text()
    click(d, "a.run-link[data-run='run']")
    wait(d, lambda: d.find_elements(By.CSS_SELECTOR, "#detail-chart path.curve"), what="the run's curves")
    click(d, "#runs-table input.pick[value='run']")
    click(d, "#compare-btn")
    wait(d, lambda: d.find_elements(By.CSS_SELECTOR, "#compare-chart path.curve"), what="the comparison")
    wait(d, lambda: "| `run (lora)` |" in text(d, "compare-tool"), what="tunesmith compare's table of the run")
    shot(d, "runs", tmp)

    # Evaluate: `tunesmith eval` on the run, or this build's clear answer that it has no eval yet
    d.find_element(By.ID, "tab-eval").click()
    wait(d, lambda: Select(d.find_element(By.ID, "eval-run")).options, what="runs to evaluate")
    d.find_element(By.ID, "eval-data").send_keys(str(data))
    d.find_element(By.ID, "eval-max").send_keys("4")
    d.find_element(By.ID, "eval-btn").click()
    wait(d, lambda: text(d, "eval-out") not in ("", "evaluating…"), 300, "the evaluation answers")
    assert "tunesmith eval" in text(d, "eval-out") or "error" not in d.find_element(By.ID, "eval-out").get_attribute("class")
    shot(d, "eval", tmp)

    # Chat: the base and the run side by side, streamed through the engine
    d.find_element(By.ID, "tab-chat").click()
    Select(d.find_element(By.ID, "chat-left-model")).select_by_value(f"base:{MODEL}")
    Select(d.find_element(By.ID, "chat-right-model")).select_by_value("run:run")
    d.find_element(By.ID, "chat-input").send_keys("Add 2 and 3.")
    d.find_element(By.ID, "chat-send").click()
    done = lambda: d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")  # noqa: E731
    wait(d, lambda: len(done()) == 2, 180, "both answers stream in")
    assert all(m.text for m in done()) and not d.find_elements(By.CSS_SELECTOR, ".msg.error")
    shot(d, "chat", tmp)

    # Export: llama.cpp refuses rsLoRA with the reason; vLLM takes it
    d.find_element(By.ID, "tab-export").click()
    Select(d.find_element(By.ID, "export-run")).select_by_value("run")
    Select(d.find_element(By.ID, "export-target")).select_by_value("llama.cpp")
    d.find_element(By.ID, "export-btn").click()
    out = d.find_element(By.ID, "export-out")
    wait(d, lambda: "rsLoRA" in out.text, 60, "the refusal and its reason")
    assert "error" in out.get_attribute("class") and "--fold-rslora" in out.text
    shot(d, "export", tmp)
    Select(d.find_element(By.ID, "export-target")).select_by_value("vllm")
    d.find_element(By.ID, "export-btn").click()
    wait(d, lambda: "vllm adapter written" in out.text, 60, "the vLLM export")
    assert (tmp / "runs/run/export-vllm/adapter_config.json").is_file()
