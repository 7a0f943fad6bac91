"""Hostile clients against a real `mlflow models serve` process with the connection guard (connection.py):
bodies over the limit, requests abandoned mid-decoding, idle and slowloris connections.

The server serves a copy of the registered champion whose stored limits (serving.json) are small, so
that each case is cheap: an 8 MB body limit, a 2 s header deadline, a 1 s keep-alive, a 2 s request
timeout.
"""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import time
from pathlib import Path

import pytest

from conftest import free_port, project_env, readme_command, run, start_model_server, stop_model_server

pytestmark = pytest.mark.integration

BODY_LIMIT = 8_000_000
LIMITS = {"max_request_bytes": BODY_LIMIT, "max_request_pixels": 5_000_000_000, "header_timeout_s": 2}
# 4 gigapixels of all-zero PNGs (16 KB each, a 5.3 MB body): about 12 s of decoding on an idle 2-core
# machine, six times the 2 s request timeout (400 megapixels took 1.5 s there: too close to it).
HEAVY_IMAGES, HEAVY_SIDE = 250, 4000


@pytest.fixture(scope="module")
def strict_server(built_project, tmp_path_factory):
    """The README's serve command on a copy of the champion with LIMITS, its output in a log file."""
    root, _ = built_project
    tmp = tmp_path_factory.mktemp("strict")
    code = f"import mlflow; print(mlflow.artifacts.download_artifacts('models:/digits-lenet@champion', dst_path={str(tmp)!r}))"
    model = Path(run(["python", "-c", code], root).stdout.strip().splitlines()[-1])
    limits_file = next(model.rglob("serving.json"))
    limits_file.write_text(json.dumps({**json.loads(limits_file.read_text()), **LIMITS}))
    port = free_port()
    command = readme_command("UVICORN_HTTP=imgclf.connection:GuardedH11Protocol mlflow models serve")
    command = command.replace('"models:/digits-lenet@champion"', str(model)).replace("-p 5001", f"-p {port} -t 2")
    assert str(model) in command and "-t 2" in command
    log = tmp / "server.log"
    env = project_env(MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false", UVICORN_TIMEOUT_KEEP_ALIVE="1")
    proc = start_model_server(command, root, port, env, log)
    yield port, log
    stop_model_server(proc)


def connect(port: int, timeout: float = 10) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(timeout)
    return sock


def head(length: int | None = None, chunked: bool = False) -> bytes:
    lines = ["POST /invocations HTTP/1.1", "Host: localhost", "Content-Type: application/json"]
    lines += [f"Content-Length: {length}"] if length is not None else []
    lines += ["Transfer-Encoding: chunked"] if chunked else []
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def answer(sock: socket.socket) -> tuple[int, dict]:
    """The status and JSON body of one response (read until the server closes, or the body is in)."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < content_length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    body = rest.split(b"\r\n\r\n", 1)[1]
    try:
        return int(status_line.split()[1]), json.loads(body)
    except ValueError:  # MLflow's own 504 is plain text
        return int(status_line.split()[1]), {"message": body.decode(errors="replace")}


def content_length(data: bytes) -> int:
    found = re.search(rb"(?im)^content-length:\s*(\d+)", data.split(b"\r\n\r\n", 1)[0])
    return int(found.group(1)) if found else 1 << 60


def closed_after(sock: socket.socket, limit: float, trickle: bytes = b"") -> float | None:
    """Seconds until the server closes `sock` (None if still open after `limit`), sending `trickle`
    every 0.25 s meanwhile."""
    start = time.monotonic()
    sock.settimeout(0.25)
    while time.monotonic() - start < limit:
        try:
            if trickle:
                sock.sendall(trickle)
            if sock.recv(1024) == b"":
                return time.monotonic() - start
        except socket.timeout:
            pass
        except OSError:  # reset
            return time.monotonic() - start
    return None


def post(port: int, body: bytes, timeout: float = 60) -> tuple[int, dict, float]:
    sock = connect(port, timeout)
    start = time.monotonic()
    sock.sendall(head(len(body)) + body)
    status, got = answer(sock)
    sock.close()
    return status, got, time.monotonic() - start


def zeros_png(side: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (side, side), 0).save(buffer, format="PNG")
    return buffer.getvalue()


def images_body(files: list[bytes]) -> bytes:
    return json.dumps({"inputs": [base64.b64encode(f).decode() for f in files]}).encode()


def test_a_body_over_the_limit_is_refused_from_its_content_length_before_it_is_sent(strict_server):
    port, _ = strict_server
    sock = connect(port)
    sock.sendall(head(1_000_000_000))  # 1 GB announced, not a byte of it sent
    status, got = answer(sock)
    assert status == 413 and f"1,000,000,000 bytes, over the limit of {BODY_LIMIT:,}" in got["message"], got
    assert sock.recv(1) == b""  # and the connection is closed: the body is never read


def test_a_chunked_body_is_read_only_up_to_the_limit(strict_server):
    port, _ = strict_server
    sock = connect(port)
    sock.sendall(head(chunked=True))
    chunk = b" " * 100_000
    for _ in range(BODY_LIMIT // len(chunk) + 1):  # over the limit; the body's end is never sent
        sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    status, got = answer(sock)
    assert status == 413 and f"over the limit of {BODY_LIMIT:,} bytes" in got["message"], got
    status, got, _ = post(port, images_body([zeros_png(32)]))
    assert status == 200, got


def test_a_body_that_does_not_arrive_gets_408_after_the_request_timeout(strict_server):
    port, _ = strict_server
    sock = connect(port)
    sock.sendall(head(1000) + b'{"inputs": ')  # 11 of the 1,000 bytes announced
    start = time.monotonic()
    status, got = answer(sock)
    assert status == 408 and "did not arrive within 2 s" in got["message"], got
    assert 1.5 < time.monotonic() - start < 15


def test_abandoned_requests_stop_decoding_and_the_next_client_is_answered_promptly(strict_server):
    """Six requests of 4 gigapixels (inside every limit) whose clients leave after a second: before the
    guard, their decoding went on and held every worker thread for tens of seconds."""
    port, log = strict_server
    heavy = images_body([zeros_png(HEAVY_SIDE)] * HEAVY_IMAGES)
    small = images_body([zeros_png(32)])
    before = log.read_text().count("request abandoned")
    clients = [connect(port) for _ in range(6)]
    for sock in clients:
        sock.sendall(head(len(heavy)) + heavy)
    time.sleep(1.0)
    for sock in clients:
        sock.close()
    status, got, elapsed = post(port, small)
    assert status == 200, got
    assert elapsed < 8, f"answered in {elapsed:.1f} s after the abandoned requests"
    time.sleep(1.0)
    stopped = re.findall(r"request abandoned .*: stopped at input (\d+) of (\d+)", log.read_text())[before:]
    assert len(stopped) == 6, log.read_text()[-2000:]
    assert all(int(at) < int(of) == HEAVY_IMAGES for at, of in stopped)


def test_a_request_past_the_timeout_gets_504_and_its_decoding_stops(strict_server):
    port, log = strict_server
    heavy = images_body([zeros_png(HEAVY_SIDE)] * HEAVY_IMAGES)
    before = log.read_text().count("request abandoned")
    status, got, elapsed = post(port, heavy)
    assert status == 504 and elapsed < 10, (status, got, elapsed)
    time.sleep(1.0)
    assert log.read_text().count("request abandoned") == before + 1, log.read_text()[-2000:]


def test_an_idle_connection_is_closed_after_the_keep_alive_timeout(strict_server):
    port, _ = strict_server
    closed = closed_after(connect(port), limit=20)  # connected, nothing sent
    assert closed is not None and closed < 5, closed


def test_slowloris_headers_are_closed_at_the_header_deadline(strict_server):
    port, _ = strict_server
    sock = connect(port)
    sock.sendall(b"POST /invocations HTTP/1.1\r\n")
    closed = closed_after(sock, limit=20, trickle=b"X-Slow: 1\r\n")  # a header line every 0.25 s
    assert closed is not None and closed < 6, closed
    status, got, _ = post(port, images_body([zeros_png(32)]))  # others are served meanwhile
    assert status == 200, got
