"""A real `mlflow models serve` process on the registered champion, driven over HTTP on loopback."""

from __future__ import annotations

import base64
import csv
import json
import subprocess
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from conftest import free_port, project_env, readme_command, run
from imgclf.images import encode_png

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(built_project):
    """The README's serve command, on a free port, from the built project's root."""
    root, _ = built_project
    port = free_port()
    command = readme_command("mlflow models serve").replace("-p 5001", f"-p {port}")
    assert f"-p {port}" in command
    proc = subprocess.Popen(command, shell=True, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=project_env(MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false"), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(f"{url}/ping", timeout=5)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"server did not start:\n{proc.stdout.read().decode()}")
            time.sleep(0.5)
    yield root, url, port
    import os
    import signal

    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def images_request(images: list[bytes]) -> bytes:
    return json.dumps({"inputs": [base64.b64encode(b).decode() for b in images]}).encode()


def test_http_predictions_equal_evaluate_predictions(server):
    root, url, _ = server
    images = np.load(root / "data/prepared/test_images.npy")
    with open(root / "metrics/predictions.csv") as f:
        expected = list(csv.DictReader(f))
    status, body = post(url, images_request([encode_png(image) for image in images]))
    assert status == 200, body
    got = body["predictions"]
    assert len(got) == len(expected) == len(images)
    classes = json.loads((root / "models/model.json").read_text())["classes"]
    for row, prediction in zip(expected, got):
        assert prediction["class"] == row["predicted"]
        assert classes[prediction["index"]] == row["predicted"]
        assert prediction["probability"] == pytest.approx(float(row["probability"]), abs=1e-4)


def test_any_size_and_mode_is_resized_like_evaluation(server):
    """A JPEG in RGB at another size goes through the same convert-and-resize path."""
    import io

    from PIL import Image

    _, url, _ = server
    buffer = io.BytesIO()
    Image.new("RGB", (100, 60), (200, 10, 10)).save(buffer, format="JPEG")
    status, body = post(url, images_request([buffer.getvalue()]))
    assert status == 200, body
    (prediction,) = body["predictions"]
    assert set(prediction) >= {"class", "index", "probability"} and 0 <= prediction["probability"] <= 1


def test_undecodable_image_is_a_400_naming_it_and_the_server_stays_up(server):
    root, url, _ = server
    good = encode_png(np.load(root / "data/prepared/test_images.npy")[0])
    status, body = post(url, images_request([good, b"this is not an image"]))
    assert status == 400, body
    assert "input 1" in body["message"]
    status, body = post(url, images_request([good]))
    assert status == 200 and len(body["predictions"]) == 1


def test_readme_curl_classifies_the_example_image(server):
    root, _, port = server
    command = readme_command("curl").replace("localhost:5001", f"localhost:{port}")
    assert f"localhost:{port}" in command
    body = json.loads(run(command, root).stdout)
    (prediction,) = body["predictions"]
    assert prediction["class"] == "3"  # examples/digit-3.png
