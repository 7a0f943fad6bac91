"""Data and models in a DVC remote, with the README's commands: `dvc push` from a clone whose pipeline ran,
`dvc pull` into a fresh `git clone` of it, whose `dvc repro` then has nothing to do, and whose pulled model
is the one the shared tracking server serves. A local-folder remote, an S3 one (moto's S3 server, a real
process on loopback), experiments shared with `dvc exp push`/`dvc exp pull`, and a remote without the data."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import mlflow
import numpy as np
import pytest
from dvc.repo import Repo

from conftest import free_port, fresh_copy, project_env, readme_command, run, start_server, stop, wait_for
from imgclf.config import load_params
from imgclf.models import CARD_FILE, WEIGHTS_FILE, load_checkpoint_dir, predict_proba
from imgclf.register import CONTENT_TAG, PACKAGE_DIR, content_key
from test_variants import set_param

pytestmark = pytest.mark.integration

MODEL = "digits-lenet"
UP_TO_DATE = "Data and pipelines are up to date."
# The placeholders in the README's commands, replaced by what the tests start.
README_FOLDER = "/mnt/team/imgclf-dvc"
README_BUCKET = "s3://my-bucket/imgclf"
README_ENDPOINT = "https://s3.example.org"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cached_outputs(root: Path) -> dict[str, str]:
    """Every stage output DVC caches (and so pushes), as dvc.lock records it: path -> md5 (".dir" for folders)."""
    with Repo(str(root)) as repo:
        return {str(o.def_path): o.hash_info.value for s in repo.index.stages for o in s.outs if o.use_cache}


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    """The team's MLflow server (no accounts here: tests/test_team.py covers them)."""
    root = tmp_path_factory.mktemp("tracking")
    port = free_port()
    server = start_server(root, port)
    yield f"http://127.0.0.1:{port}"
    stop(server)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tracking):
    """A clone whose pipeline ran (2 epochs) into the shared server, its results committed."""
    root = fresh_copy(tmp_path_factory.mktemp("trained") / "project")
    set_param(root, "train", "epochs", "2")
    run(["dvc", "repro"], root, MLFLOW_TRACKING_URI=tracking)
    run("git add -A && git commit -qm trained", root)
    return root


@pytest.fixture
def origin(trained, tmp_path):
    """A copy of `trained` (its DVC cache included) for one test to add its remote to."""
    return Path(shutil.copytree(trained, tmp_path / "alice", symlinks=True))


def add_remote(root: Path, *commands: str) -> None:
    for command in commands:
        run(command, root)
    run("git commit -qam 'the DVC remote'", root)


def pull_into_fresh_clone(origin: Path, dest: Path, tracking: str, **env: str) -> Path:
    """A `git clone` of `origin` (no DVC cache), `dvc pull`ed; its `dvc repro` must run nothing."""
    run(["git", "clone", "-q", str(origin), str(dest)], origin.parent)
    run(readme_command("dvc pull"), dest, **env)
    repro = run(["dvc", "repro"], dest, MLFLOW_TRACKING_URI=tracking, **env)
    assert UP_TO_DATE in repro.stdout and "Running stage" not in repro.stdout, repro.stdout
    status = run(["dvc", "status", "--json"], dest, **env)
    assert json.loads(status.stdout) == {}
    for path in cached_outputs(origin):
        for file in (p for p in [origin / path, *(origin / path).rglob("*")] if p.is_file()):
            assert sha256(dest / file.relative_to(origin)) == sha256(file), file
    return dest


def check_the_pulled_model_serves(clone: Path, tracking: str, monkeypatch) -> None:
    """The champion the server serves is the pulled model: the same content, the same predictions."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    limits = default_limits(clone)
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias(MODEL, "champion")
    versions = {v.version: v.tags.get(CONTENT_TAG) for v in client.search_model_versions(f"name = '{MODEL}'")}
    recorded = json.loads((clone / "models/registered.json").read_text())[CONTENT_TAG]
    assert recorded == champion.tags[CONTENT_TAG], (champion.version, versions)
    assert recorded == content_key(clone / "models", limits), key_parts(clone / "models", limits)
    images = np.load(clone / "data/prepared/test_images.npy")[:16]
    model, card = load_checkpoint_dir(clone / "models")
    local = predict_proba(model, images)
    served = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion").predict(list(images))
    assert [p["index"] for p in served] == local.argmax(1).tolist()
    assert [p["probability"] for p in served] == pytest.approx(local.max(1).tolist(), abs=1e-5)


def key_parts(model_dir: Path, limits: dict) -> dict:
    """What content_key hashes, one digest each: where a recorded key and a recomputed one part ways."""
    code = sorted(PACKAGE_DIR.rglob("*.py"))
    files = [model_dir / WEIGHTS_FILE, model_dir / CARD_FILE, *code]
    return {"package": str(PACKAGE_DIR), "limits": limits} | {
        str(f.relative_to(PACKAGE_DIR) if f in code else f.name): sha256(f)[:12] for f in files
    }


def default_limits(root: Path) -> dict:
    """The serving limits as register stores them: validated and typed (header_timeout_s: 10 is 10.0)."""
    return asdict(load_params(root / "params.yaml").serve)


def test_a_local_folder_remote_round_trip(origin, tracking, tmp_path, monkeypatch):
    storage = tmp_path / "storage"
    add_remote(origin, readme_command("dvc remote add -d storage").replace(README_FOLDER, str(storage)))
    pushed = run(readme_command("dvc push"), origin)
    outputs = cached_outputs(origin)
    # Raw data, prepared arrays, the model, the last checkpoint (and evaluate's predictions, register's record).
    assert {"data/raw", "data/prepared", "models/model.safetensors", "models/checkpoint"} <= set(outputs)
    for path, md5 in outputs.items():  # DVC 3's layout: files/md5/<first two hex digits>/<the rest>
        assert (storage / "files" / "md5" / md5[:2] / md5[2:]).is_file(), path
    assert "pushed" in pushed.stdout
    clone = pull_into_fresh_clone(origin, tmp_path / "bob", tracking)
    check_the_pulled_model_serves(clone, tracking, monkeypatch)


def test_a_remote_without_the_data_is_a_clear_error(trained, tmp_path):
    clone = tmp_path / "bob"
    run(["git", "clone", "-q", str(trained), str(clone)], tmp_path)
    (tmp_path / "empty").mkdir()
    run(["dvc", "remote", "add", "-d", "storage", str(tmp_path / "empty")], clone)
    kept = {p: sha256(p) for p in (clone / "metrics").rglob("*") if p.is_file()}
    pull = run(readme_command("dvc pull"), clone, check=False)
    assert pull.returncode != 0
    said = pull.stdout + pull.stderr
    assert "failed to pull data from the cloud" in said
    assert "Missing cache files" in said  # and which: the model, the data
    for path in ("models/model.safetensors", "data/raw", "data/prepared"):
        assert path in said, said
    assert {p: sha256(p) for p in kept} == kept  # nothing lost


@pytest.fixture
def s3(tmp_path):
    """moto's standalone S3 server on loopback, with an empty bucket (the README's, renamed)."""
    pytest.importorskip("dvc_s3", reason='the s3 extra (pip install -e ".[s3]")')
    boto3 = pytest.importorskip("boto3")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        cwd=tmp_path,
        env=project_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    credentials = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    client = boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )

    def up() -> bool:
        assert server.poll() is None, "moto's server exited"
        try:
            client.list_buckets()
            return True
        except Exception:
            return False

    wait_for(up, 60, "moto's S3 server")
    client.create_bucket(Bucket="imgclf-test")
    yield url, client, credentials
    stop(server)


def test_an_s3_remote_round_trip(origin, tracking, s3, tmp_path, monkeypatch):
    url, client, credentials = s3
    bucket = "s3://imgclf-test/dvc"
    add_remote(
        origin,
        readme_command("dvc remote add -d storage s3://").replace(README_BUCKET, bucket),
        readme_command("dvc remote modify storage endpointurl").replace(README_ENDPOINT, url),
    )
    run(readme_command("dvc push"), origin, **credentials)
    stored = {o["Key"] for o in client.list_objects_v2(Bucket="imgclf-test")["Contents"]}
    for path, md5 in cached_outputs(origin).items():
        assert f"dvc/files/md5/{md5[:2]}/{md5[2:]}" in stored, path
    clone = pull_into_fresh_clone(origin, tmp_path / "bob", tracking, **credentials)
    check_the_pulled_model_serves(clone, tracking, monkeypatch)


def test_experiments_travel_with_dvc_exp_push_and_pull(origin, tracking, tmp_path):
    """An experiment pushed (its git commit to the git remote, its outputs to the DVC remote) and pulled
    into another clone: applied there, its outputs are in place and its pipeline up to date."""
    add_remote(origin, f"dvc remote add -d storage {tmp_path / 'storage'}")
    run(["git", "clone", "-q", "--bare", str(origin), str(tmp_path / "origin.git")], tmp_path)
    run(["git", "remote", "add", "origin", str(tmp_path / "origin.git")], origin)
    # (A model name of its own: the other tests' champion stays theirs.)
    experiment = ["-n", "one-epoch", "-S", "train.epochs=1", "-S", "register.model_name=digits-lenet-exp"]
    run(["dvc", "exp", "run", *experiment], origin, MLFLOW_TRACKING_URI=tracking)
    weights = sha256(origin / "models/model.safetensors")
    run(readme_command("dvc exp push origin").replace("my-experiment", "one-epoch"), origin)
    bob = tmp_path / "bob"
    run(["git", "clone", "-q", str(tmp_path / "origin.git"), str(bob)], tmp_path)
    assert "one-epoch" in run(["dvc", "exp", "list", "origin", "--name-only"], bob).stdout
    run(readme_command("dvc exp pull origin").replace("my-experiment", "one-epoch"), bob)
    assert "one-epoch" in run(["dvc", "exp", "list", "--name-only"], bob).stdout
    run(["dvc", "exp", "apply", "one-epoch"], bob)
    assert sha256(bob / "models/model.safetensors") == weights
    assert "epochs: 1" in (bob / "params.yaml").read_text()
    repro = run(["dvc", "repro"], bob, MLFLOW_TRACKING_URI=tracking)
    assert UP_TO_DATE in repro.stdout and "Running stage" not in repro.stdout, repro.stdout
