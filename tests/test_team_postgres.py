"""Team mode with the store in PostgreSQL, as the README documents it for more than a few users: a real
PostgreSQL server from Debian's packages (initdb, postgres; .ci/run installs them), started here on
loopback with a password, under the README's `mlflow server` command with its PostgreSQL store URI. One
user's pipeline runs into it; the run, the model version and `champion` are rows in PostgreSQL."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pytest

from conftest import REPO, free_port, fresh_copy, readme_block, start_mlflow, stop, wait_for
from test_team import EXPERIMENT, MODEL, PASSWORDS, Server, receipt, server_command, train_settings

pytestmark = pytest.mark.integration

DB_PASSWORD = secrets.token_urlsafe(18)


def postgres_bin() -> Path | None:
    """Debian's PostgreSQL programs (/usr/lib/postgresql/<version>/bin), the newest version."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


def as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as Debian's `postgres` account."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture(scope="module")
def database():
    """A PostgreSQL server on a free loopback port, its data in a folder of its own; the database
    `mlflow` owned by the account `mlflow`, whose password is DB_PASSWORD."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL's server programs are absent (Debian's postgresql package: .ci/run installs it)")
    # Not under pytest's temporary folder: its parents are closed to the postgres account.
    data = Path(tempfile.mkdtemp(prefix="imgclf-postgres-"))
    password_file = data / "password"
    password_file.write_text(DB_PASSWORD + "\n")
    if os.geteuid() == 0:
        shutil.chown(data, "postgres")
        shutil.chown(password_file, "postgres")
    cluster = data / "cluster"
    init = [str(bin_dir / "initdb"), "-D", str(cluster), "-U", "mlflow", "--pwfile", str(password_file)]
    subprocess.run(as_postgres([*init, "--auth", "scram-sha-256", "-E", "UTF8"]), check=True, capture_output=True)
    port = free_port()
    server = subprocess.Popen(
        as_postgres(
            [str(bin_dir / "postgres"), "-D", str(cluster), "-p", str(port), "-k", str(data)]
            + ["-c", "listen_addresses=127.0.0.1"]
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    env = {**os.environ, "PGPASSWORD": DB_PASSWORD}
    address = ["-h", "127.0.0.1", "-p", str(port), "-U", "mlflow"]
    ready = [str(bin_dir / "pg_isready"), *address, "-d", "postgres"]
    wait_for(lambda: subprocess.run(ready, capture_output=True, env=env).returncode == 0, 60, "PostgreSQL")
    subprocess.run([str(bin_dir / "createdb"), *address, "mlflow"], check=True, capture_output=True, env=env)
    yield port
    os.killpg(server.pid, signal.SIGINT)  # PostgreSQL's fast shutdown
    server.wait(timeout=60)
    shutil.rmtree(data, ignore_errors=True)


def readme_postgres_uri(port: int) -> str:
    """The README's PostgreSQL store URI, pointed at the test's server."""
    text = re.sub(r"\s+", " ", (REPO / "README.md").read_text())
    uri = re.search(r"--backend-store-uri (postgresql://\S+)`", text).group(1)
    assert "<password>" in uri and "@db.example.org/" in uri, uri
    return uri.replace("<password>", DB_PASSWORD).replace("@db.example.org/", f"@127.0.0.1:{port}/")


@pytest.fixture(scope="module")
def server(database, tmp_path_factory):
    """The README's server command with the PostgreSQL store, and the account alice."""
    root = tmp_path_factory.mktemp("team-postgres")
    port = free_port()
    command = server_command(port)
    command[command.index("--backend-store-uri") + 1] = readme_postgres_uri(database)
    env = {
        "MLFLOW_AUTH_CONFIG_PATH": str(REPO / "team" / "mlflow_auth.ini"),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORDS["admin"],
    }
    process = start_mlflow(command, root, port, **env)
    url = f"http://127.0.0.1:{port}"
    code = readme_block("python", "create_user").replace("http://mlflow.example.org:5000", url)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        mp.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORDS["admin"])
        mp.setattr("getpass.getpass", lambda prompt: PASSWORDS["alice"])
        exec(code, {})
    yield Server(root, url)
    stop(process)


def rows(port: int, query: str) -> list[tuple]:
    import psycopg  # the server extra's driver, which the server itself uses

    with psycopg.connect(host="127.0.0.1", port=port, user="mlflow", password=DB_PASSWORD, dbname="mlflow") as db:
        return db.execute(query).fetchall()


def test_the_pipeline_runs_into_a_postgresql_store(database, server, tmp_path, monkeypatch):
    clone = fresh_copy(tmp_path / "alice")
    train_settings(clone, epochs="2")
    server.repro(clone, "alice")
    registered = receipt(clone)
    assert registered["champion"] and registered["version"] == "1"

    client = server.as_admin(monkeypatch)
    (only,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert only.data.tags["mlflow.user"] == "alice" and "test/accuracy" in only.data.metrics
    assert client.get_model_version_by_alias(MODEL, "champion").run_id == only.info.run_id
    # The store is PostgreSQL's: the run, the version and the alias are its rows.
    assert rows(database, "SELECT run_uuid, status FROM runs") == [(only.info.run_id, "FINISHED")]
    assert rows(database, "SELECT name, alias, version FROM registered_model_aliases") == [(MODEL, "champion", 1)]
    assert sorted(p.name for p in server.root.glob("*.db")) == ["basic_auth.db"]  # the accounts; no SQLite store

    images = np.load(clone / "data/prepared/test_images.npy")[:8]
    served = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion").predict(list(images))
    assert len(served) == 8 and all(0 <= p["index"] < 10 for p in served)
    assert not any(DB_PASSWORD in text for text in server.outputs)
