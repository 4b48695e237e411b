"""The MLflow UI as a user sees it, in a real headless Chromium: a real 2-trial sweep (models
saved, the best one registered), `mlflow server` on its store, and the page the run summary links
to. It lists the training runs (not MLflow's GenAI overview) with readable names; the parent
expands into its trials, whose Dataset and Models columns are filled; the registered model has
its `best` alias.

Needs Chromium and its driver (`apt-get install chromium chromium-driver`, as .ci/run does) and
selenium (in the test extra); skipped, saying why, without them. With $DPO_SWEEP_UI_SCREENSHOTS set
to a folder, the pages are saved there as PNG (experiments/mlflow_ui/ holds the README's).
"""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from conftest import FAST, free_port
from test_sweep import env, wait_for_http

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):
        pytest.skip("no Chromium or chromedriver on the PATH: apt-get install chromium chromium-driver (.ci/run does)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is missing: pip install -e '.[test]'")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def served_sweep(tmp_path_factory):
    """A 2-trial sweep logged to a SQLite store, and `mlflow server` on that store."""
    tmp = tmp_path_factory.mktemp("ui")
    store = f"sqlite:///{tmp}/mlflow.db"
    proc = subprocess.run([sys.executable, "-m", "dpo_sweep", *FAST, "train.max_steps=3", "train.progress=false",
                           "dataset.builtin_size=60", "dataset.eval_size=12", "train.save_model=true",
                           f"tracking.uri={store}", "tracking.experiment=ui", "tracking.register_best=dpo-best",
                           f"hydra.sweep.dir={tmp}/sweep", "beta=0.1,0.3", "-m"],
                          cwd=tmp, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    port = free_port()
    log = open(tmp / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1", "--backend-store-uri", store], cwd=tmp, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", server, tmp / "server.log")
        client = MlflowClient(tracking_uri=store)
        yield url, client, client.get_experiment_by_name("ui").experiment_id
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=10)
        log.close()


def wait_for_text(driver, *texts, timeout=60):
    deadline = time.time() + timeout
    body = ""
    while time.time() < deadline:
        body = driver.find_element("tag name", "body").text
        if all(t in body for t in texts):
            return body
        time.sleep(0.5)
    raise AssertionError(f"{texts} not on the page after {timeout}s; it shows:\n{body[:2000]}")


def screenshot(driver, name):
    folder = os.environ.get("DPO_SWEEP_UI_SCREENSHOTS")
    if folder:
        os.makedirs(folder, exist_ok=True)
        driver.save_screenshot(os.path.join(folder, name))


def test_the_ui_lists_the_sweep_and_its_trials_with_data_sets_and_models(browser, served_sweep):
    from selenium.webdriver.common.by import By

    url, client, experiment_id = served_sweep
    runs = client.search_runs([experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    trials = sorted(r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id)
    assert trials == ["t0 beta=0.1", "t1 beta=0.3"]

    # The link the run summary prints: the experiment, in MLflow's model-training view.
    browser.get(f"{url}/#/experiments/{experiment_id}?workflowType=machine_learning")
    body = wait_for_text(browser, parent.info.run_name)
    assert "/runs" in browser.current_url and "Dataset" in body and "Models" in body
    assert "t0 beta=0.1" not in body  # the trials are folded under their sweep
    name_cell = browser.find_element(By.PARTIAL_LINK_TEXT, parent.info.run_name)
    row = name_cell.find_element(By.XPATH, "./ancestor::div[contains(@class,'ag-cell')][1]")
    row.find_element(By.CSS_SELECTOR, "button").click()  # the parent's expander
    body = wait_for_text(browser, "t0 beta=0.1", "t1 beta=0.3", "builtin-v3 (train)", "dpo-policy")
    screenshot(browser, "runs.png")

    best = parent.data.tags["best.trial_number"]
    browser.get(f"{url}/#/models/dpo-best")
    body = wait_for_text(browser, "dpo-best", "Version 1")
    assert "best" in body  # the alias
    version = client.get_model_version_by_alias("dpo-best", "best")
    best_run = client.get_run(version.run_id)
    assert best_run.data.tags["sweep.trial_number"] == best
    screenshot(browser, "model.png")
