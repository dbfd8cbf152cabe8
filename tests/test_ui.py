"""The MLflow UI on a real search: the script starts it, Chromium shows the trials and their metrics."""

from __future__ import annotations

import importlib.util
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest_plugins = ["search_fixture"]

REPO = Path(__file__).resolve().parent.parent
NO_CHROMIUM = ("chromium is not installed: apt-get install chromium, "
               "or run bash scripts/test.sh as root which installs it")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_loopback_hosts():
    from seg.tuning.ui import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.10") and not is_loopback("example.org")


def test_the_runs_link_opens_a_saved_view_of_the_trials(fake_search, tmp_path):
    """The runs page link names a view, saved as the UI's Share button saves one: the
    search's trials, best first by its own objective, with metrics and params as columns."""
    import json
    from urllib.parse import parse_qs, urlparse

    from mlflow.tracking import MlflowClient

    from seg.tuning.records import TAG_SHARED_VIEW_PREFIX as SHARED_VIEW_TAG
    from seg.tuning.ui import search_links

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = fake_search(uri, "by_loss", [[0.1, 0.3], [0.2, 0.25]], val_losses=[[0.9, 0.5], [0.8, 0.7]],
                         sampled={"optim.lr": [0.01, 0.1], "model.arch": ["fcn8s", "fcn32s"]},
                         budget={"metric": "val_loss", "mode": "min"})
    client = MlflowClient(uri)
    links = search_links(client, "http://127.0.0.1:5000", "by_loss")
    query = parse_qs(urlparse(links.runs).fragment.partition("?")[2])
    assert query["workflowType"] == ["machine_learning"]
    experiment = client.get_experiment(links.experiment_id)
    view = json.loads(experiment.tags[SHARED_VIEW_TAG + query["viewStateShareKey"][0]])
    assert view["searchFilter"] == f"tags.`mlflow.parentRunId` = '{parent}'"
    assert (view["orderByKey"], view["orderByAsc"]) == ("metrics.`val_loss`", True)
    assert view["selectedColumns"][0] == "metrics.`val_loss`"
    assert {"metrics.`val_miou`", "params.`optim.lr`", "params.`model.arch`"} <= set(view["selectedColumns"])
    # the same view again: the same key, no second tag
    assert search_links(client, "http://127.0.0.1:5000", "by_loss").runs == links.runs
    assert sum(key.startswith(SHARED_VIEW_TAG) for key in client.get_experiment(links.experiment_id).tags) == 1


def test_expected_errors_exit_2(small_search, run_script, tmp_path):
    result = run_script("ui", ["--tracking-uri", f"sqlite:///{tmp_path / 'missing.db'}"])
    assert result.code == 2 and result.error.startswith("error: no tracking store at")
    result = run_script("ui", ["--tracking-uri", small_search.tracking_uri, "--search", "nosuch", "--port", "0"])
    assert result.code == 2 and result.error.startswith("error: no search named 'nosuch'")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_script("ui", ["--tracking-uri", small_search.tracking_uri, "--port", str(port)])
    assert result.code == 2 and result.error.startswith(f"error: port {port} on 127.0.0.1 is in use")


@pytest.mark.browser
@pytest.mark.skipif(shutil.which("chromium") is None, reason=NO_CHROMIUM)  # checked before the search runs
@pytest.mark.skipif(importlib.util.find_spec("playwright") is None,
                    reason="the playwright package is not installed: pip install -r requirements.txt")
@pytest.mark.slow
def test_the_ui_shows_the_trials_and_their_metrics(small_search, tmp_path):
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")

    client = MlflowClient(small_search.tracking_uri)
    trials = {t.run_id: client.get_run(t.run_id) for t in small_search.result.trials}
    names = [run.info.run_name for run in trials.values()]
    best = trials[small_search.result.best.run_id]

    server = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "ui.py"), "--tracking-uri", small_search.tracking_uri,
         "--search", small_search.name, "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        links = _read_links(server, timeout=120)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1800, "height": 720})

            # the runs page: this search's trials, best val_miou first
            page.goto(links["search runs"])
            page.get_by_text(names[0], exact=True).first.wait_for(timeout=60_000)
            _close_assistant(page)
            page.locator('button[aria-label="Toggle sidebar"]').click()  # room for the metric and param columns
            # the link's saved view shows the objective and the sampled params as columns, no clicks needed
            page.get_by_text(str(best.data.metrics["val_miou"])[:6]).first.wait_for(timeout=30_000)
            text = page.inner_text("main")
            assert "val_miou" in text and "optim.lr" in text
            for key in ("optim.momentum", "optim.lr", "best_val_miou", "val_miou"):  # sorting shows the column
                page.locator('[data-testid="sort-select-dropdown"]').click()
                page.locator(f'[data-testid="sort-select-{key}"]').click()
            page.locator('[data-testid="sort-select-dropdown"]').click()
            page.locator('[data-testid="sort-select-desc"]').click()
            page.keyboard.press("Escape")
            page.get_by_text(str(best.data.metrics["val_miou"])[:6]).first.wait_for(timeout=30_000)
            text = page.inner_text("main")
            assert all(name in text for name in names)
            assert "val_miou" in text and "optim.lr" in text
            page.screenshot(path=str(tmp_path / "mlflow_runs.png"))
            if os.environ.get("SEG_SCREENSHOT_DIR"):  # for the README: SEG_SCREENSHOT_DIR=experiments/screenshots
                Path(os.environ["SEG_SCREENSHOT_DIR"]).mkdir(parents=True, exist_ok=True)
                shutil.copy(tmp_path / "mlflow_runs.png", Path(os.environ["SEG_SCREENSHOT_DIR"]) / "mlflow_runs.png")

            # the compare page: params and final metrics side by side
            page.goto(links["compare trials"])
            page.get_by_text("Run details").first.wait_for(timeout=60_000)
            text = page.inner_text("main")
            assert all(name in text for name in names)
            assert "val_miou" in text and "optim.momentum" in text
            page.screenshot(path=str(tmp_path / "mlflow_compare.png"))

            # the per-epoch curves of val_miou
            page.goto(links["val_miou curves"])
            page.get_by_text(f"{best.info.run_name} (val_miou)").first.wait_for(timeout=60_000)
            page.screenshot(path=str(tmp_path / "mlflow_curves.png"))
            browser.close()
    finally:
        server.send_signal(signal.SIGTERM)  # the script stops its server on SIGTERM
        code = server.wait(timeout=30)
    assert code == 0
    port = int(links["MLflow UI"].rsplit(":", 1)[1])
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0  # the server is gone too


def _read_links(process: subprocess.Popen, timeout: float) -> dict[str, str]:
    """``{"MLflow UI": url, "search runs": url, ...}`` from the script's output, once it serves."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    links, seen, deadline = {}, [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if process.poll() is not None:
                break
            continue
        seen.append(line)
        label, sep, rest = line.partition(": ")
        if sep and rest.strip().startswith("http"):
            links[label.strip()] = rest.split()[0]
        if line.startswith("Ctrl-C"):
            return links
    raise AssertionError("scripts/ui.py did not start serving:\n" + "".join(seen))


def _close_assistant(page) -> None:
    """MLflow 3.17 opens an assistant panel over part of the page on first visit."""
    close = page.locator('button[data-component-id="mlflow.assistant.chat_panel.close"]')
    if close.count():
        close.first.click()
