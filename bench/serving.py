"""Benchmark: `mlflow models serve` over loopback against the same model in process.

    python bench/serving.py [--requests 300] [--batches 60] [--clients 50] [--workers 1 2] [--lenet-only]

Builds two registered models in a temporary clone of the repository: the default pipeline's LeNet on
digits, and the fast CIFAR net (`fastnet`, one epoch) on the CIFAR-10 JPEG slice from the shared datasets
folder (on digits as RGB when that is absent); their accuracy does not matter here, their compute does.
For each it starts a real `mlflow models serve` process and measures, in one run:
  single-image latency  sequential requests of one 32x32 PNG (after a warm-up): p50 and p99, ms
  HTTP throughput       requests of 64 PNGs from 4 concurrent clients (keep-alive): images/s
  in process            the loaded model decoding and classifying the same 64 PNGs: images/s
and prints the ratio of HTTP to in-process throughput. Then, under load, for each `--workers` setting of
`mlflow models serve`: `--clients` concurrent clients (50), each sending single-image requests on its
own keep-alive connection: requests/s, p50 and p99 latency, ms. Servers run as the README starts them,
with the connection guard (UVICORN_HTTP=imgclf.connection:GuardedH11Protocol).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MINI = Path(os.environ.get("IMGCLF_DATASETS", REPO.parent / "shared" / "datasets")) / "cifar10-jpg-mini.tar.gz"


def sh(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    return subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_models(root: Path, env: dict[str, str], fastnet: bool = True) -> list[tuple[str, str]]:
    sh(["git", "clone", "--quiet", str(REPO), str(root)], REPO, env)
    sh(["dvc", "repro"], root, env)
    models = [("LeNet (digits)", "digits-lenet")]
    if not fastnet:
        return models
    if MINI.is_file():
        data = ["-S", "data.dataset=imagefolder", "-S", f"data.path={MINI}", "-S", "data.image_size=32"]
        name = "cifar10-jpg-mini-fastnet"
    else:
        data = ["-S", "data.channels=3"]
        name = "digits-fastnet"
    sh(
        [
            "dvc",
            "exp",
            "run",
            "-S",
            "train.model=fastnet",
            "-S",
            "train.epochs=1",
            "-S",
            "train.batch_size=256",
            "-S",
            "train.optimizer=sgd",
            "-S",
            "train.lr=0.1",
            *data,
        ],
        root,
        env,
    )
    models.append(("fastnet (32x32 RGB)", name))
    return models


def serve(root: Path, name: str, env: dict[str, str], workers: int = 1) -> tuple[subprocess.Popen, int]:
    port = free_port()
    command = ["mlflow", "models", "serve", "-m", f"models:/{name}@champion", "--env-manager", "local"]
    proc = subprocess.Popen(
        [*command, "-p", str(port), "--workers", str(workers)],
        cwd=root,
        env={
            **env,
            "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
            "UVICORN_HTTP": "imgclf.connection:GuardedH11Protocol",
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while True:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/ping")
            if connection.getresponse().status == 200:
                return proc, port
        except OSError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"mlflow models serve for {name} did not start")
        time.sleep(0.5)


def pngs(n: int, channels: int) -> list[bytes]:
    from imgclf.images import encode_png

    rng = np.random.default_rng(0)
    return [encode_png(rng.integers(0, 256, (32, 32, channels), dtype=np.uint8)) for _ in range(n)]


def body(files: list[bytes]) -> bytes:
    return json.dumps({"inputs": [base64.b64encode(f).decode() for f in files]}).encode()


def post(connection: http.client.HTTPConnection, payload: bytes) -> None:
    connection.request("POST", "/invocations", payload, {"Content-Type": "application/json"})
    response = connection.getresponse()
    data = response.read()
    if response.status != 200:
        raise SystemExit(f"HTTP {response.status}: {data[:200]!r}")


def latency(port: int, payload: bytes, n: int) -> tuple[float, float]:
    connection = http.client.HTTPConnection("127.0.0.1", port)
    for _ in range(20):
        post(connection, payload)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        post(connection, payload)
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return statistics.median(times), times[int(0.99 * (len(times) - 1))]


def throughput(port: int, payload: bytes, images: int, batches: int, clients: int = 4) -> float:
    per_client = batches // clients

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port)
        for _ in range(per_client):
            post(connection, payload)

    post(http.client.HTTPConnection("127.0.0.1", port), payload)  # warm-up
    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return images * per_client * clients / (time.perf_counter() - start)


def under_load(port: int, payload: bytes, clients: int, per_client: int) -> tuple[float, float, float]:
    """`clients` threads, each `per_client` sequential requests on its own connection: requests/s over
    the whole run, and p50 and p99 latency (ms) over every request."""
    times: list[float] = []
    barrier = threading.Barrier(clients + 1)

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        post(connection, payload)  # connected and warm before the clock starts
        barrier.wait()
        mine = []
        for _ in range(per_client):
            start = time.perf_counter()
            post(connection, payload)
            mine.append((time.perf_counter() - start) * 1000)
        times.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    times.sort()
    return len(times) / elapsed, statistics.median(times), times[int(0.99 * (len(times) - 1))]


def in_process(root: Path, name: str, files: list[bytes], batches: int, env: dict[str, str]) -> float:
    code = f"""
import time, base64, json, sys, mlflow
from imgclf.tracking import use_store
use_store()
model = mlflow.pyfunc.load_model("models:/{name}@champion").unwrap_python_model()
files = [base64.b64decode(s) for s in json.load(sys.stdin)]
model.classify(model.decode_all(files))
start = time.perf_counter()
for _ in range({batches}):
    model.classify(model.decode_all(files))
print(len(files) * {batches} / (time.perf_counter() - start))
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        env=env,
        check=True,
        capture_output=True,
        text=True,
        input=json.dumps([base64.b64encode(f).decode() for f in files]),
    ).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300, help="single-image requests timed")
    parser.add_argument("--batches", type=int, default=60, help="64-image requests timed (over 4 clients)")
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients of the load test")
    parser.add_argument("--per-client", type=int, default=20, help="single-image requests per client")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="`--workers` settings to load")
    parser.add_argument("--lenet-only", action="store_true", help="skip the fastnet model (no CIFAR training)")
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "project"
        models = build_models(root, env, fastnet=not args.lenet_only)
        loads = []
        print(f"{'model':<22} {'p50 ms':>7} {'p99 ms':>7} {'HTTP img/s':>11} {'in-process img/s':>17} {'ratio':>6}")
        for label, name in models:
            channels = 1 if "digits" in name and "fastnet" not in name else 3
            one, batch = pngs(1, channels), pngs(64, channels)
            proc, port = serve(root, name, env)
            try:
                p50, p99 = latency(port, body(one), args.requests)
                http_rate = throughput(port, body(batch), 64, args.batches)
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
            local = in_process(root, name, batch, args.batches, env)
            print(f"{label:<22} {p50:>7.2f} {p99:>7.2f} {http_rate:>11.0f} {local:>17.0f} {http_rate / local:>6.2f}")
            for workers in args.workers:
                proc, port = serve(root, name, env, workers)
                try:
                    loads.append((label, workers, *under_load(port, body(one), args.clients, args.per_client)))
                finally:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=30)
        print(f"\n{args.clients} concurrent clients, {args.per_client} single-image requests each (keep-alive)")
        print(f"{'model':<22} {'workers':>7} {'requests/s':>11} {'p50 ms':>8} {'p99 ms':>8}")
        for label, workers, rate, p50, p99 in loads:
            print(f"{label:<22} {workers:>7} {rate:>11.0f} {p50:>8.1f} {p99:>8.1f}")


if __name__ == "__main__":
    main()
