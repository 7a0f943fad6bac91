"""Per-epoch metrics reach a real MLflow server exactly once when requests fail on the way.

A small HTTP relay sits between the client and a real `mlflow server` and loses one log-batch
request: either before it reaches the server (the epoch must still arrive later) or after the server
has stored it, with the answer lost (a server killed mid-request: the retry must not add a copy)."""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import mlflow
import pytest

from conftest import free_port, start_server, stop

pytestmark = pytest.mark.integration


class Relay(ThreadingHTTPServer):
    """Forwards HTTP to the server on `upstream`; `lose` = "before" or "after" drops the next
    log-batch request before forwarding it or after the server has answered it."""

    daemon_threads = True

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.lose: str | None = None
        self.lost = 0
        super().__init__(("127.0.0.1", 0), _Forward)


class _Forward(BaseHTTPRequestHandler):
    server: Relay

    def log_message(self, *args) -> None:
        pass

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        lose = self.server.lose if self.path.endswith("/runs/log-batch") else None
        if lose:
            self.server.lose = None
            self.server.lost += 1
            self.close_connection = True
        if lose == "before":
            return
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        upstream.request(self.command, self.path, body=body, headers=headers)
        response = upstream.getresponse()
        data = response.read()
        upstream.close()
        if lose == "after":
            return  # stored upstream; the client never hears of it
        self.send_response(response.status)
        for k, v in response.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _forward


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    store = tmp_path_factory.mktemp("server")
    port = free_port()
    server = start_server(store, port)
    relay = Relay(port)
    threading.Thread(target=relay.serve_forever, daemon=True).start()
    yield relay
    relay.shutdown()
    stop(server)


@pytest.mark.parametrize("lose", ["before", "after"])
def test_a_lost_request_logs_each_epoch_exactly_once(relay, lose, monkeypatch, capsys):
    from imgclf.tracking import EpochLogger

    uri = f"http://127.0.0.1:{relay.server_address[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the failure reaches our own retry
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment(f"lost-{lose}")).info.run_id

    logger = EpochLogger(run_id)
    relay.lose, relay.lost = lose, 0
    logger.add(1, {"val_accuracy": 0.5, "train_loss": 1.0})
    assert relay.lost == 1
    assert "could not log epoch 1 to MLflow" in capsys.readouterr().out
    assert len(logger.pending) == 1  # kept for the next epoch
    logger.add(2, {"val_accuracy": 0.6, "train_loss": 0.8})
    logger.flush(final=True)

    for key, values in {"val/accuracy": [0.5, 0.6], "train/loss": [1.0, 0.8]}.items():
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert history == [(1, values[0]), (2, values[1])], key


def test_a_resumed_run_logs_an_epoch_without_validation_once(relay, monkeypatch):
    """With train.val_every an epoch may log no validation metrics: a resumed run, re-adding the
    checkpoint's history, must still find that epoch in the store and leave it alone."""
    from imgclf.tracking import EpochLogger

    uri = f"http://127.0.0.1:{relay.server_address[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("resumed-without-validation")).info.run_id
    relay.lose = None
    history = [{"train_loss": 1.0}, {"train_loss": 0.8, "val_accuracy": 0.6}]  # epoch 1 not validated
    first = EpochLogger(run_id)
    first.add(1, history[0])
    first.flush(final=True)

    resumed = EpochLogger(run_id)  # as train_and_log does on resuming: the history, then the next epoch
    resumed.add(1, history[0])
    resumed.add(2, history[1])
    resumed.flush(final=True)

    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [(1, 1.0), (2, 0.8)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val/accuracy")] == [(2, 0.6)]
