"""The MLflow UI in a real browser: headless Chromium, driven through chromedriver by selenium, on a store
that two pipeline runs filled (two DVC experiments of a fresh copy of the project).

It checks what a user looks at: the experiment's runs page lists both runs and, once the `test/accuracy`
column is picked under "Columns", their test accuracy; the compare view opens from the two selected runs
and shows it too; a run's artifacts list the confusion matrices and the Grad-CAM images. A screenshot of
every step is saved in the folder the test prints (under $IMGCLF_TEST_ARTIFACTS when that is set, for CI
to keep). Skipped only where no Chromium or chromedriver is installed (.ci/run installs Debian's).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import mlflow
import pytest

from conftest import free_port, fresh_copy, run, start_ui, stop

pytestmark = pytest.mark.integration

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
RUNS = {"short": 3, "longer": 6}  # DVC experiment (and so MLflow run) name -> train.epochs
WAIT = 30  # seconds selenium waits for an element to show: the UI renders after its API calls answer


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A project whose store holds two pipeline runs, and their MLflow runs by name."""
    root = fresh_copy(tmp_path_factory.mktemp("ui") / "project")
    for name, epochs in RUNS.items():
        run(["dvc", "exp", "run", "-n", name, "-S", f"train.epochs={epochs}"], root)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("image-classifier")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == set(RUNS)
    return root, experiment.experiment_id, runs


@pytest.fixture
def ui(two_runs):
    """`mlflow ui` as the README starts it (from the root, no flags), on a free port."""
    port = free_port()
    server = start_ui(two_runs[0], port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(server)


@pytest.fixture
def browser():
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("no Chromium or chromedriver on PATH (Debian: apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1800,1100"):
        options.add_argument(argument)
    # The installed driver, named: selenium would otherwise look for (and try to download) one of its own.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def screenshots(request, tmp_path):
    base = os.environ.get("IMGCLF_TEST_ARTIFACTS")
    folder = Path(base) / "mlflow-ui" if base else tmp_path / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    print(f"screenshots of the MLflow UI: {folder}")
    return folder


def test_the_mlflow_ui_shows_both_runs_their_accuracy_and_the_explanations(two_runs, ui, browser, screenshots):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    _, experiment_id, runs = two_runs
    accuracy = {name: r.data.metrics["test/accuracy"] for name, r in runs.items()}

    def shot(name: str) -> None:
        time.sleep(1)  # let the last request's data paint
        browser.save_screenshot(str(screenshots / f"{name}.png"))

    # The runs page, in the model-training view (MLflow 3.17 opens a new browser in its GenAI view).
    browser.get(f"{ui}/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
    for name in RUNS:
        browser.find_element(By.XPATH, f"//*[@role='row']//*[text()='{name}']")
    for close in browser.find_elements(By.XPATH, "//button[@aria-label='Close']"):  # the assistant's side panel
        close.click()
    shot("1-runs")
    # Its table shows no metric until picked: add test/accuracy as a user does, under "Columns".
    browser.find_element(By.XPATH, "//button[normalize-space(.)='Columns']").click()
    browser.find_element(By.XPATH, "//input[@placeholder='Search columns']").send_keys("test/accuracy")
    browser.find_element(By.XPATH, "//*[normalize-space(text())='test/accuracy']").click()
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    browser.find_element(By.XPATH, "//*[@role='columnheader']//*[contains(., 'test/accuracy')]")
    shot("2-runs-with-test-accuracy")
    # The grid draws each row twice (pinned name column, scrolled columns): match them by row index.
    for name, value in accuracy.items():
        index = browser.find_element(By.XPATH, f"//*[@role='row'][.//*[text()='{name}']]").get_attribute("row-index")
        cells = [r.text for r in browser.find_elements(By.XPATH, f"//*[@role='row'][@row-index='{index}']")]
        assert any(f"{value:g}" in text.split() for text in cells), (name, value, cells)

    # The compare view, from the two runs selected in the table.
    for name in RUNS:
        row = browser.find_element(By.XPATH, f"//*[@role='row'][.//*[text()='{name}']]")
        browser.execute_script("arguments[0].click()", row.find_element(By.XPATH, ".//input[@type='checkbox']"))
    browser.find_element(By.XPATH, "//button[normalize-space(.)='Compare']").click()
    browser.find_element(By.XPATH, "//*[contains(text(), 'Comparing 2 Runs')]")
    assert "compare-runs" in browser.current_url
    shot("3-compare")
    metric = browser.find_element(By.XPATH, "//a[normalize-space(text())='test/accuracy']")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", metric)
    shot("4-compare-metrics")
    text = browser.find_element(By.TAG_NAME, "body").text
    for name, value in accuracy.items():
        assert name in text and f"{value:.3f}".rstrip("0") in text, (name, value)  # shown to 3 digits

    # A run's artifacts: the error analysis and the Grad-CAM pictures, in their folders.
    run_id = runs["longer"].info.run_id
    browser.get(f"{ui}/#/experiments/{experiment_id}/runs/{run_id}/artifacts")
    open_folder(browser, "evaluation", "confusion.png")
    open_folder(browser, "gradcam", "gradcam_correct.png")
    for name in ("confusion.png", "confusion_normalized.png", "per_class.png", "gradcam_correct.png"):
        browser.find_element(By.XPATH, f"//*[text()='{name}']")
    browser.find_element(By.XPATH, "//*[text()='gradcam_wrong.png']").click()
    browser.find_element(By.XPATH, "//*[contains(text(), 'gradcam/gradcam_wrong.png')]")
    shot("5-artifacts-gradcam")
    assert sorted(p.name for p in screenshots.iterdir()) == [
        "1-runs.png",
        "2-runs-with-test-accuracy.png",
        "3-compare.png",
        "4-compare-metrics.png",
        "5-artifacts-gradcam.png",
    ]


def open_folder(browser, folder: str, first: str, tries: int = 3) -> None:
    """Expand a folder of the artifact tree, one at a time, until its file `first` shows. A click that
    lands while the tree redraws (another folder's listing arriving) is lost, so it is clicked again
    while the file has not shown within 10 s; a slow listing that then shows ends the wait."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    node = "//*[@data-testid='artifact-tree-node'][@artifact-name='{}']"
    browser.implicitly_wait(0)  # the waits below poll; the implicit one would hold each empty poll WAIT s
    try:
        for _ in range(tries):
            WebDriverWait(browser, WAIT).until(lambda b: b.find_elements(By.XPATH, node.format(folder)))[0].click()
            try:
                WebDriverWait(browser, 10).until(lambda b: b.find_elements(By.XPATH, node.format(first)))
                return
            except TimeoutException:
                continue
        raise AssertionError(f"the artifact folder {folder!r} did not show {first!r} after {tries} clicks")
    finally:
        browser.implicitly_wait(WAIT)


def test_dvc_exp_show_compares_the_two_runs(two_runs):
    """The same two runs side by side in DVC: their params and test metrics, ECE and ROC AUC included."""
    import csv
    import io

    root, _, runs = two_runs
    table = list(csv.DictReader(io.StringIO(run(["dvc", "exp", "show", "--csv"], root).stdout)))
    rows = {row["Experiment"]: row for row in table if row["Experiment"] in RUNS}
    assert set(rows) == set(RUNS)
    for name, row in rows.items():
        assert row["train.epochs"] == str(RUNS[name])
        for metric in ("accuracy", "f1_macro", "roc_auc_macro", "ece"):
            assert float(row[metric]) == pytest.approx(runs[name].data.metrics[f"test/{metric}"]), (name, metric)
