"""Screenshots of the MLflow UI on a sweep's store, in headless Chromium (the Debian packages
`chromium` and `chromium-driver`, and selenium from the test extra).

    python -m dpo_sweep beta=0.1,0.3 'optimizer.lr=1e-4,3e-4' hydra.sweep.dir=outputs/sweeps/ui -m
    python experiments/mlflow_ui/shoot.py --store outputs/mlflow.db --experiment dpo-sweep --out experiments/mlflow_ui

Starts `mlflow server` on the store, opens the experiment's runs page as the end-of-run summary
links it (`?workflowType=machine_learning`), expands the newest sweep into its trials and saves
`runs.png`; then the newest sweep's parent run page, `parent.png`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="outputs/mlflow.db", help="the SQLite store (default outputs/mlflow.db)")
    p.add_argument("--experiment", default="dpo-sweep")
    p.add_argument("--out", default="experiments/mlflow_ui")
    args = p.parse_args()
    from mlflow.tracking import MlflowClient
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    store = "sqlite:///" + os.path.abspath(args.store)
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name(args.experiment)
    parents = client.search_runs([experiment.experiment_id], "tags.`sweep.role` = 'parent'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1", "--backend-store-uri", store], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,700"):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(f"{url}/health")
        driver.get(f"{url}/#/experiments/{experiment.experiment_id}?workflowType=machine_learning")
        time.sleep(6)
        for button in driver.find_elements(By.XPATH, "//button[contains(@aria-label, 'Close')]"):
            if button.is_displayed():
                button.click()  # the assistant's side panel
        if parents:
            name = parents[0].info.run_name
            cell = driver.find_element(By.PARTIAL_LINK_TEXT, name)
            cell.find_element(By.XPATH, "./ancestor::div[contains(@class,'ag-cell')][1]").find_element(
                By.CSS_SELECTOR, "button").click()
            time.sleep(3)
        os.makedirs(args.out, exist_ok=True)
        driver.save_screenshot(os.path.join(args.out, "runs.png"))
        if parents:
            driver.get(f"{url}/#/experiments/{experiment.experiment_id}/runs/{parents[0].info.run_id}"
                       "?workflowType=machine_learning")
            time.sleep(6)
            driver.save_screenshot(os.path.join(args.out, "parent.png"))
        print("written:", ", ".join(os.path.join(args.out, f) for f in ("runs.png", "parent.png")))
    finally:
        driver.quit()
        os.killpg(server.pid, signal.SIGTERM)
    return 0


if __name__ == "__main__":
    sys.exit(main())
