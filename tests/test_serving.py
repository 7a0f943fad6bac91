"""A real `mlflow models serve` process on the registered champion, driven over HTTP on loopback: the float
model, and its int8 copy (compress.method int8, registered as <name>-int8), with the same tests."""

from __future__ import annotations

import base64
import csv
import json
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from conftest import free_port, project_env, readme_block, readme_command, run, start_model_server, stop_model_server
from imgclf.images import encode_png

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=["float", "int8"])
def server(request):
    """The README's serve command, on a free port, from the built project's root; for int8, on the
    project built with compress.method int8, serving models:/digits-lenet-int8@champion."""
    root, _ = request.getfixturevalue("built_project" if request.param == "float" else "built_int8_project")
    port = free_port()
    guarded = "UVICORN_HTTP=imgclf.connection:GuardedH11Protocol mlflow models serve"
    prefix = guarded if request.param == "float" else f'{guarded} -m "models:/digits-lenet-int8'
    command = readme_command(prefix).replace("-p 5001", f"-p {port}")
    assert f"-p {port}" in command
    log = request.getfixturevalue("tmp_path_factory").mktemp(f"serve-{request.param}") / "server.log"
    proc = start_model_server(command, root, port, project_env(MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false"), log)
    yield root, f"http://127.0.0.1:{port}", port
    stop_model_server(proc)


def post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def images_request(images: list[bytes]) -> bytes:
    return json.dumps({"inputs": [base64.b64encode(b).decode() for b in images]}).encode()


def expected_predictions(root) -> list[dict]:
    """What evaluate wrote for the float model; for an int8 project, its graph under onnxruntime here."""
    with open(root / "metrics/predictions.csv") as f:
        expected = list(csv.DictReader(f))
    graph = root / "models/compressed/model.onnx"
    if graph.exists():
        from imgclf.onnx_model import OnnxClassifier

        classes = json.loads((root / "models/model.json").read_text())["classes"]
        probs = OnnxClassifier(graph, len(classes)).predict_proba(np.load(root / "data/prepared/test_images.npy"))
        expected = [{"predicted": classes[p.argmax()], "probability": p.max()} for p in probs]
    return expected


def test_http_predictions_equal_evaluate_predictions(server):
    root, url, _ = server
    images = np.load(root / "data/prepared/test_images.npy")
    expected = expected_predictions(root)
    got = []
    for start in range(0, len(images), 120):  # under serve.max_images per request
        status, body = post(url, images_request([encode_png(image) for image in images[start : start + 120]]))
        assert status == 200, body
        got += body["predictions"]
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
    assert set(prediction) >= {"class", "index", "probability", "top_k"} and 0 <= prediction["probability"] <= 1
    assert [t["class"] for t in prediction["top_k"]][0] == prediction["class"] and len(prediction["top_k"]) == 3


def test_undecodable_image_is_a_400_naming_it_and_the_server_stays_up(server):
    root, url, _ = server
    good = encode_png(np.load(root / "data/prepared/test_images.npy")[0])
    status, body = post(url, images_request([good, b"this is not an image"]))
    assert status == 400, body
    assert "input 1" in body["message"]
    status, body = post(url, images_request([good]))
    assert status == 200 and len(body["predictions"]) == 1


def test_raw_arrays_give_the_same_predictions_as_image_files(server):
    root, url, _ = server
    images = np.load(root / "data/prepared/test_images.npy")[:16]
    status, from_files = post(url, images_request([encode_png(image) for image in images]))
    assert status == 200
    array = {"array": base64.b64encode(images.tobytes()).decode(), "shape": list(images.shape), "dtype": "uint8"}
    status, from_arrays = post(url, json.dumps({"inputs": array}).encode())
    assert status == 200, from_arrays
    assert from_arrays == from_files


def _png_claiming(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _bad_requests(good: bytes) -> dict[str, tuple[bytes, str, int, str]]:
    """name -> (body, content type, expected status, text the message must hold)."""
    import io

    from PIL import Image

    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(jpeg, format="JPEG")
    array = {"array": _b64(bytes(8 * 8)), "shape": [1, 8, 8, 1], "dtype": "uint8"}
    as_json = lambda value: json.dumps(value).encode()  # noqa: E731
    return {
        "truncated JPEG": (
            as_json({"inputs": [_b64(good), _b64(jpeg.getvalue()[:400])]}),
            "application/json",
            400,
            "input 1: cannot decode the image",
        ),
        "random bytes": (
            as_json({"inputs": [_b64(np.random.default_rng(0).bytes(500))]}),
            "application/json",
            400,
            "input 0: not an image file",
        ),
        "invalid base64": (
            as_json({"inputs": [_b64(good), "!!!not base64"]}),
            "application/json",
            400,
            "input 1: not valid base64",
        ),
        "empty list": (as_json({"inputs": []}), "application/json", 400, "inputs is empty"),
        "wrong JSON shape": (as_json({"instances": [_b64(good)]}), "application/json", 400, 'expected {"inputs"'),
        "inputs not a list": (as_json({"inputs": 5}), "application/json", 400, "inputs must be a list"),
        "a number for an image": (
            as_json({"inputs": [7]}),
            "application/json",
            400,
            "input 0: expected a base64 string",
        ),
        "not JSON": (b"{inputs: nope", "application/json", 400, "not valid JSON"),
        "wrong array shape": (
            as_json({"inputs": {**array, "shape": [1, 8, 8]}}),
            "application/json",
            400,
            "array shape must be [N, H, W, C]",
        ),
        "wrong array dtype": (
            as_json({"inputs": {**array, "dtype": "float32"}}),
            "application/json",
            400,
            "array dtype must be uint8",
        ),
        "array of the wrong size": (
            as_json({"inputs": {**array, "shape": [2, 8, 8, 1]}}),
            "application/json",
            400,
            "array holds 64 bytes, but shape [2, 8, 8, 1] needs 128",
        ),
        "too many images": (
            as_json({"inputs": [_b64(good)] * 257}),
            "application/json",
            413,
            "257 images in one request, over the limit of 256",
        ),
        "decompression bomb": (
            as_json({"inputs": [_b64(_png_claiming(20_000, 20_000))]}),
            "application/json",
            413,
            "input 0: more than 178,956,970 pixels, over the limit of 40,000,000",
        ),
        "JSON nested 100,000 levels deep": (
            b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            "application/json",
            400,
            "nested too deeply",
        ),
        "a number of 5,000 digits": (
            b'{"inputs": {"array": "AA==", "shape": [' + b"9" * 5000 + b', 1, 1, 1], "dtype": "uint8"}}',
            "application/json",
            400,
            "5,000 digits, more than 18",
        ),
        "a number of 4,000 digits": (
            as_json({"inputs": {**array, "shape": [int("9" * 4000), 8, 8, 1]}}),
            "application/json",
            400,
            "4,000 digits, more than 18",
        ),
        "booleans in shape": (
            as_json({"inputs": {**array, "shape": [True, 8, 8, True]}}),
            "application/json",
            400,
            "array shape must be [N, H, W, C] of positive integers, got [True, 8, 8, True]",
        ),
        "a 10,000-character dtype": (
            as_json({"inputs": {**array, "dtype": "x" * 10_000}}),
            "application/json",
            400,
            "array dtype must be uint8, got 'xxxxxxxxx...",
        ),
        "pixels over the request budget": (
            as_json({"inputs": [_b64(_png_claiming(6000, 6000)), _b64(_png_claiming(6000, 6000))]}),
            "application/json",
            413,
            "inputs 0-1: 72,000,000 pixels, over the limit of 50,000,000 per request",
        ),
        "wrong content type": (b"inputs=1", "text/plain", 415, "Content-Type: application/json"),
    }


@pytest.mark.parametrize("case", list(_bad_requests(b"")))
def test_bad_input_gets_a_short_4xx_and_the_server_keeps_serving(server, case):
    root, url, _ = server
    good = encode_png(np.load(root / "data/prepared/test_images.npy")[0])
    body, content_type, status, text = _bad_requests(good)[case]
    start = time.monotonic()
    got_status, got = post(url, body, content_type)
    elapsed = time.monotonic() - start
    assert got_status == status, got
    assert text in got["message"], got["message"]
    raw = json.dumps(got)
    assert len(raw) < 500 and "Traceback" not in raw and "stack_trace" not in got  # no echo, no trace
    if case in ("decompression bomb", "pixels over the request budget"):
        assert elapsed < 1.0  # refused from the headers, nothing allocated
    status, after = post(url, images_request([good]))
    assert status == 200 and len(after["predictions"]) == 1


def test_readme_array_request_is_served(server):
    root, _, port = server
    build = readme_command('python -c "import base64,json,numpy as np')
    curl = readme_command("curl -s localhost:5001/invocations -H 'Content-Type: application/json' -d @request.json")
    run(build, root)
    body = json.loads(run(curl.replace("localhost:5001", f"localhost:{port}"), root).stdout)
    (prediction,) = body["predictions"]
    assert prediction["class"] in json.loads((root / "models/model.json").read_text())["classes"]


def test_readme_curl_classifies_the_example_image(server):
    root, _, port = server
    command = readme_command("curl").replace("localhost:5001", f"localhost:{port}")
    assert f"localhost:{port}" in command
    body = json.loads(run(command, root).stdout)
    (prediction,) = body["predictions"]
    assert prediction["class"] == "3"  # examples/digit-3.png


def test_readme_python_client_classifies_the_example_image(server):
    root, _, port = server
    code = readme_block("python", "/invocations").replace("localhost:5001", f"localhost:{port}")
    assert f"localhost:{port}" in code
    printed = run(["python", "-c", code], root).stdout
    assert "'class': '3'" in printed  # examples/digit-3.png
