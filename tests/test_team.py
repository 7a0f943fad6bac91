"""Team mode: two clones (two users) run the pipeline into one shared `mlflow server`, protected by
MLflow's basic-auth app, started here on loopback with the README's command (SQLite store, proxied
artifacts). Wrong or missing credentials stop the pipeline before training, and no password is ever
printed or logged."""

from __future__ import annotations

import base64
import json
import secrets
import shlex
import subprocess
import urllib.request
from pathlib import Path

import mlflow
import mlflow.server
import pytest

from conftest import (
    REPO,
    free_port,
    fresh_copy,
    project_env,
    readme_block,
    readme_command,
    run,
    start_mlflow,
    start_model_server,
    stop,
    stop_model_server,
)
from test_variants import set_param

pytestmark = pytest.mark.integration

EXPERIMENT = "image-classifier"
MODEL = "digits-lenet"
# Made fresh for each test session, so that finding one anywhere is a leak, never a coincidence.
PASSWORDS = {name: secrets.token_urlsafe(18) for name in ("admin", "alice", "bob")}
WRONG_PASSWORD = secrets.token_urlsafe(18)


class Server:
    def __init__(self, root: Path, url: str) -> None:
        self.root, self.url = root, url
        self.outputs: list[str] = []  # everything the pipeline printed in these tests

    def env(self, user: str | None, password: str | None = None) -> dict[str, str]:
        """The variables a user sets: the password is the user's own unless given ("" for none)."""
        env = {"MLFLOW_TRACKING_URI": self.url}
        if user:
            env["MLFLOW_TRACKING_USERNAME"] = user
        password = PASSWORDS.get(user or "") if password is None else password
        if password:
            env["MLFLOW_TRACKING_PASSWORD"] = password
        return env

    def repro(self, clone: Path, user: str | None, password: str | None = None, check: bool = True):
        proc = run(["dvc", "repro"], clone, check=check, **self.env(user, password))
        self.outputs += [proc.stdout, proc.stderr]
        return proc

    def readme_repro(self, clone: Path, user: str) -> None:
        """The README's commands for a user, the password typed on standard input."""
        script = readme_block("bash", "read -rs MLFLOW_TRACKING_PASSWORD")
        script = script.replace("http://mlflow.example.org:5000", self.url).replace("=alice", f"={user}")
        assert self.url in script and "dvc repro" in script
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=clone,
            env=project_env(),
            input=PASSWORDS[user] + "\n",
            capture_output=True,
            text=True,
            timeout=900,
        )
        self.outputs += [proc.stdout, proc.stderr]
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def client(self) -> mlflow.MlflowClient:
        """The admin's client (credentials from the environment: see `as_admin`)."""
        return mlflow.MlflowClient(self.url)

    def as_admin(self, monkeypatch) -> mlflow.MlflowClient:
        """The admin's client; `models:/` URIs in this process then resolve on the server too."""
        monkeypatch.setenv("MLFLOW_TRACKING_URI", self.url)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORDS["admin"])
        return self.client()

    def all_runs(self) -> list:
        client = self.client()
        ids = [e.experiment_id for e in client.search_experiments()]
        return client.search_runs(ids) if ids else []

    def versions(self) -> list:
        return self.client().search_model_versions()


def server_command(port: int) -> list[str]:
    """The README's `mlflow server` line, on loopback and `port`, without the leading `mlflow`."""
    command = readme_command("mlflow server --app-name basic-auth")
    for readme, here in {
        "--host 0.0.0.0": "--host 127.0.0.1",
        "--port 5000": f"--port {port}",
        "--allowed-hosts mlflow.example.org:5000": f"--allowed-hosts 127.0.0.1:{port}",
    }.items():
        assert readme in command
        command = command.replace(readme, here)
    return [*shlex.split(command)[1:], "--workers", "1"]  # one worker: quicker to start on a busy machine


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The README's server, in a folder of its own, with the users alice and bob made by the README's code."""
    root = tmp_path_factory.mktemp("team-server")
    port = free_port()
    env = {
        "MLFLOW_AUTH_CONFIG_PATH": str(REPO / "team" / "mlflow_auth.ini"),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORDS["admin"],
    }
    process = start_mlflow(server_command(port), root, port, **env)
    url = f"http://127.0.0.1:{port}"
    code = readme_block("python", "create_user").replace("http://mlflow.example.org:5000", url)
    assert url in code
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        mp.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORDS["admin"])
        for user in ("alice", "bob"):
            mp.setattr("getpass.getpass", lambda prompt, user=user: PASSWORDS[user])
            exec(code.replace('"alice"', f'"{user}"'), {})
    yield Server(root, url)
    stop(process)


def train_settings(clone: Path, **train: str) -> None:
    for key, value in train.items():
        set_param(clone, "train", key, value)


def receipt(clone: Path) -> dict:
    return json.loads((clone / "models/registration.json").read_text())


@pytest.fixture(scope="module")
def team(server, tmp_path_factory):
    """alice trains a weak model (the first version: champion), bob a better one (champion moves to it),
    then alice a weak one again (champion stays bob's)."""
    base = tmp_path_factory.mktemp("team")
    alice, bob = fresh_copy(base / "alice"), fresh_copy(base / "bob")
    weak = {"epochs": "1", "lr": "0.00001"}
    # alice's weak models score near chance, which register refuses by default (tests/test_integrity.py):
    # here they stand for any weaker model, so register takes them.
    for clone in (alice, bob):
        set_param(clone, "register", "refuse_chance", "false")
    train_settings(alice, **weak)
    server.readme_repro(alice, "alice")
    first = receipt(alice)
    train_settings(bob, epochs="2")
    server.repro(bob, "bob")
    second = receipt(bob)
    train_settings(alice, seed="1")
    server.repro(alice, "alice")
    third = receipt(alice)
    return alice, bob, [first, second, third]


def test_both_users_runs_land_in_one_experiment(server, team, monkeypatch):
    client = server.as_admin(monkeypatch)
    experiments = client.search_experiments()
    assert [e.name for e in experiments if e.name != "Default"] == [EXPERIMENT]
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert sorted(r.data.tags["mlflow.user"] for r in runs) == ["alice", "alice", "bob"]
    assert sorted(r.info.run_id for r in runs) == sorted(r["run_id"] for r in team[2])
    for r in runs:  # train, evaluate and register each logged into the run, artifacts through the server
        assert "test/accuracy" in r.data.metrics and "val/accuracy" in r.data.metrics
        assert r.data.tags["registered_model"].startswith(f"{MODEL}/")
    assert any((server.root / "artifacts").rglob("model.safetensors"))  # proxied: stored by the server


def test_champion_moves_only_on_improvement_across_users(server, team, monkeypatch):
    _, _, (first, second, third) = team
    assert [r["version"] for r in (first, second, third)] == ["1", "2", "3"]
    # The settings make the order plain: 2 epochs at the preset's lr against 1 epoch at lr 1e-5.
    # The champion rule compares evaluate's test accuracy of the registered weights.
    assert second["test_accuracy"] > first["test_accuracy"] and third["test_accuracy"] < second["test_accuracy"]
    assert first["champion"] and first["previous_champion"] is None
    assert second["champion"] and second["previous_champion"] == "1"  # bob's beat alice's
    assert not third["champion"] and third["previous_champion"] == "2"  # alice's did not beat bob's
    client = server.as_admin(monkeypatch)
    assert client.get_model_version_by_alias(MODEL, "champion").version == "2"


def test_the_champion_serves_from_the_server(server, team, monkeypatch, tmp_path):
    """`mlflow models serve -m models:/...@champion` run by bob, the model downloaded through the server."""
    _, bob, _ = team
    port = free_port()
    command = readme_command("UVICORN_HTTP=imgclf.connection:GuardedH11Protocol mlflow models serve").replace(
        "-p 5001", f"-p {port}"
    )
    proc = start_model_server(command, bob, port, project_env(**server.env("bob")), tmp_path / "server.log")
    try:
        image = (REPO / "examples/digit-3.png").read_bytes()
        body = json.dumps({"inputs": [base64.b64encode(image).decode()]}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
        )
        served = json.load(urllib.request.urlopen(request, timeout=120))["predictions"][0]
    finally:
        stop_model_server(proc)
    server.as_admin(monkeypatch)
    versions = {v: mlflow.pyfunc.load_model(f"models:/{MODEL}/{v}").predict([image])[0] for v in ("1", "2")}
    assert served["probability"] == pytest.approx(versions["2"]["probability"], abs=1e-6)
    assert served["probability"] != pytest.approx(versions["1"]["probability"], abs=1e-3)  # not alice's


@pytest.fixture(scope="module")
def prepared(server, tmp_path_factory):
    """A third clone whose data is prepared (download and prepare touch no MLflow store)."""
    clone = fresh_copy(tmp_path_factory.mktemp("refused") / "carol")
    train_settings(clone, epochs="2")
    run(["dvc", "repro", "prepare"], clone)
    return clone


@pytest.mark.parametrize(
    "user, password, says",
    [
        (
            None,
            None,
            "requires an account to read experiments (HTTP 401): set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (they are not set)",
        ),
        ("alice", WRONG_PASSWORD, "refused the credentials of 'alice' to read experiments (HTTP 401)"),
        ("mallory", WRONG_PASSWORD, "refused the credentials of 'mallory' to read experiments (HTTP 401)"),
        ("alice", "", "refused 'alice' without a password to read experiments (HTTP 401)"),
    ],
    ids=["no-credentials", "wrong-password", "unknown-user", "no-password"],
)
def test_refused_credentials_stop_before_training(server, prepared, monkeypatch, user, password, says):
    refused_before_training(server, prepared, monkeypatch, user, password, says)


def test_an_account_denied_the_experiment_stops_before_training(server, team, prepared, monkeypatch):
    """carol has an account, but the admin denied her the team's experiment. (Under the team's
    `default_permission = EDIT`, MLflow 3.17 adds a READ grant to the default instead of narrowing it:
    only DENY takes a signed-in account's EDIT away.)"""
    client = server.as_admin(monkeypatch)
    users = mlflow.server.get_app_client("basic-auth", tracking_uri=server.url)
    PASSWORDS["carol"] = secrets.token_urlsafe(18)
    users.create_user(username="carol", password=PASSWORDS["carol"])
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    users.grant_user_permission("carol", "experiment", experiment_id, "DENY")
    says = f"does not permit 'carol' to log runs into '{EXPERIMENT}' (HTTP 403): its admin can grant EDIT"
    refused_before_training(server, prepared, monkeypatch, "carol", None, says)


def refused_before_training(server, clone: Path, monkeypatch, user, password, says: str) -> None:
    """`dvc repro` as `user` fails with `says`, before training: no model, no checkpoint, no run, no version."""
    server.as_admin(monkeypatch)
    runs, versions = len(server.all_runs()), len(server.versions())
    proc = server.repro(clone, user, password, check=False)
    assert proc.returncode != 0
    assert f"error: the MLflow tracking server at {server.url} (MLFLOW_TRACKING_URI) {says}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (clone / "models/model.safetensors").exists()  # no training happened
    assert not (clone / "models/checkpoint/last.pt").exists()
    assert (len(server.all_runs()), len(server.versions())) == (runs, versions)  # no run, no registry entry


def test_no_password_is_printed_or_logged(server, team, prepared, monkeypatch):
    server.as_admin(monkeypatch)
    secret = [p for user, p in PASSWORDS.items() if user != "admin"] + [WRONG_PASSWORD]
    # What the pipeline printed: every run above, refused ones included (they run first when alone).
    assert server.outputs and not [s for s in secret if any(s in out for out in server.outputs)]
    for r in server.all_runs():  # every param, tag and metric name of every run
        recorded = json.dumps([r.data.params, r.data.tags, list(r.data.metrics)])
        assert not [s for s in secret if s in recorded]
    # Every file the pipeline wrote: the clones (DVC's cache and temp files included), the server's artifacts.
    for folder in (*team[:2], prepared, server.root / "artifacts"):
        for path in (p for p in folder.rglob("*") if p.is_file()):
            data = path.read_bytes()
            assert not [s for s in secret if s.encode() in data], path
