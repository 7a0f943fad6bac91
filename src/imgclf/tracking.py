"""Where MLflow records go, and the one MLflow run that train, evaluate and register share.

The default store is `mlflow.db` (SQLite) at the repository root, with artifacts in `mlruns/` beside it.
The root is `DVC_ROOT` when DVC runs the stage: experiments queued with `dvc exp run --queue` run in
temporary copies under `.dvc/tmp/exps`, and must still land in the one store. `MLFLOW_TRACKING_URI`
overrides the store: a team's shared `mlflow server`, whose basic-auth app reads the account from
`MLFLOW_TRACKING_USERNAME` and `MLFLOW_TRACKING_PASSWORD` (a server that does not answer, or refuses them,
stops a stage before any work; the password is never printed). A local SQLite store that existed and is
now missing, empty or damaged stops the stage instead of being re-created (imgclf.store). Nothing here runs
at import time.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import yaml
from mlflow.data.dataset_source_registry import get_registered_sources, resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from imgclf import store

STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlruns"
# The experiment's kind, as MLflow records it (its UI's GenAI/model-training switch wins over it in 3.17).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# The run that trained a model is found by the hash of its weights (the model files stay free of run ids,
# so that the same code, params and data give the same DVC outputs).
WEIGHTS_TAG = "imgclf.weights_sha256"
# The hash of the weights evaluate scored, set with the test metrics: register admits only weights whose
# own evaluation the run holds.
EVALUATED_TAG = "imgclf.evaluated_weights_sha256"
# Per-epoch metrics under the names the MLflow UI groups by their prefix ("train/", "val/").
EPOCH_METRICS = {
    "train_loss": "train/loss",
    "train_accuracy": "train/accuracy",
    "val_loss": "val/loss",
    "val_accuracy": "val/accuracy",
    "lr": "train/lr",
    "images_per_s": "train/images_per_s",
    "epoch_s": "train/epoch_s",
    "dp_epsilon": "dp/epsilon",  # the privacy accountant's epsilon after the epoch (DP-SGD)
}


def project_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def default_tracking_uri() -> str:
    return f"sqlite:///{project_root() / STORE_FILE}"


class StoreUnavailable(RuntimeError):
    """The tracking store cannot be reached: raised before any work is done."""


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, with a clear message, when a tracking server does not answer (MLflow's own client
    would retry for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            pass
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StoreUnavailable(
            f"the MLflow tracking server at {uri} (MLFLOW_TRACKING_URI) does not answer "
            f"({reason}): start it, or unset MLFLOW_TRACKING_URI to use the local store "
            f"{STORE_FILE}"
        ) from None


def refused(uri: str, exc: MlflowException, doing: str) -> StoreUnavailable | None:
    """The error for a server that refused a request while `doing` something: HTTP 401 (no account, or
    the wrong password, under MLflow's basic-auth app) or 403 (no permission). None for any other error.
    It names the account, never the password."""
    status = exc.get_http_status_code()
    if status not in (401, 403):
        return None
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if status == 403:
        why = f"does not permit {user or 'anonymous users'!r} {doing} (HTTP 403): its admin can grant EDIT permission"
    elif not user:
        why = (
            f"requires an account {doing} (HTTP 401): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
            "(they are not set)"
        )
    elif not os.environ.get("MLFLOW_TRACKING_PASSWORD"):
        why = f"refused {user!r} without a password {doing} (HTTP 401): MLFLOW_TRACKING_PASSWORD is not set"
    else:
        why = (
            f"refused the credentials of {user!r} {doing} (HTTP 401): a wrong username or password in "
            "MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD"
        )
    return StoreUnavailable(f"the MLflow tracking server at {uri} (MLFLOW_TRACKING_URI) {why}")


def check_access(uri: str) -> None:
    """Fail fast when a tracking server refuses us (missing or wrong credentials), before any work is
    done: /health answers everyone."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except MlflowException as exc:
        if (error := refused(uri, exc, "to read experiments")) is None:
            raise
        raise error from None


def use_store() -> str | None:
    """Point MLflow at the store (MLFLOW_TRACKING_URI, else the default); returns the user's URI."""
    user_uri = os.environ.get("MLFLOW_TRACKING_URI")
    check_reachable(user_uri or "")
    check_access(user_uri or "")
    # (mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI, so read it before.)
    mlflow.set_tracking_uri(user_uri or default_tracking_uri())
    try:
        store.check(mlflow.get_tracking_uri())  # a local store that existed is never re-created
    except store.StoreDamaged as exc:
        raise StoreUnavailable(str(exc)) from None
    return user_uri


def configure(experiment_name: str) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns its id."""
    user_uri = use_store()
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(experiment_name)
    store.mark(mlflow.get_tracking_uri())  # it exists now (MLflow creates a missing one)
    if experiment is not None:
        for key, value in EXPERIMENT_KIND.items():
            if experiment.tags.get(key) != value:  # an experiment made before this tag was set
                client.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id
    # Artifacts of the default store live beside it, whichever folder DVC runs the stage in.
    location = None if user_uri else (project_root() / ARTIFACTS_DIR).as_uri()
    try:
        return client.create_experiment(experiment_name, artifact_location=location, tags=EXPERIMENT_KIND)
    except MlflowException:
        # Another process created it between the lookup and the create.
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is None:
            raise
        return experiment.experiment_id


def git_state(cwd: str | Path | None = None) -> dict[str, str]:
    """The commit the code came from, and whether tracked files differ from it. The pipeline's own
    records (dvc.lock, .gitignore files, stage outputs kept in git such as metrics) do not count:
    `dvc repro` rewrites them as it runs."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    except (OSError, subprocess.CalledProcessError):
        return {}
    outputs = set(dvc_outputs(Path(cwd or ".") / "dvc.lock"))
    changed = [
        path for path in changed if path != "dvc.lock" and Path(path).name != ".gitignore" and path not in outputs
    ]
    tags = {"mlflow.source.git.commit": commit, "git_dirty": str(bool(changed)).lower()}
    if changed:
        tags["git_dirty_files"] = ", ".join(changed)[:4000]
    return tags


def start_pipeline_run(experiment_name: str, resume_run_id: str | None = None):
    """Start the run of this pipeline execution (train stage). Named after the DVC experiment when
    there is one; `MLFLOW_RUN_ID` (set by `mlflow run`) makes the pipeline continue that run instead,
    and `resume_run_id` (training resumed from a checkpoint) the run that checkpoint belongs to."""
    run_id = resume_run_id or os.environ.get("MLFLOW_RUN_ID")
    # CPU and memory (and GPU, with nvidia-ml-py) sampled in the background while training runs, every
    # second: at MLflow's default of 10 s, a training shorter than that (digits: about 2 s) logs none.
    mlflow.set_system_metrics_sampling_interval(1)
    try:
        experiment_id = configure(experiment_name)  # an account denied the experiment is refused here
        if run_id:
            run = mlflow.start_run(run_id=run_id, log_system_metrics=True)
        else:
            run = mlflow.start_run(
                experiment_id=experiment_id, run_name=os.environ.get("DVC_EXP_NAME"), log_system_metrics=True
            )
    except MlflowException as exc:  # an account denied the experiment, or without EDIT on it
        if (error := refused(mlflow.get_tracking_uri(), exc, f"to log runs into {experiment_name!r}")) is None:
            raise
        raise error from None
    tags = git_state()
    if os.environ.get("MLFLOW_TRACKING_USERNAME"):  # on a shared server: who signed in, not the OS account
        tags["mlflow.user"] = os.environ["MLFLOW_TRACKING_USERNAME"]
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    mlflow.set_tags(tags)
    return run


def tag_weights(weights: str | Path) -> str:
    """Tag the active run as the one that trained these weights; returns their hash."""
    digest = sha256_file(weights)
    mlflow.set_tag(WEIGHTS_TAG, digest)
    return digest


def resume_pipeline_run(experiment_name: str, weights: str | Path):
    """Continue the run of the train stage that wrote `weights` (evaluate and register log into it): the
    latest run tagged with their hash, in the same DVC experiment when DVC runs one, else (an experiment
    whose train stage DVC skipped, say `dvc exp run -S compress.method=int8`) the latest run that
    trained them."""
    try:
        experiment_id = configure(experiment_name)
    except StoreUnavailable as exc:
        raise SystemExit(f"error: {exc}") from None
    digest = sha256_file(weights)
    query = f"tags.`{WEIGHTS_TAG}` = '{digest}'"
    queries = [query]
    if os.environ.get("DVC_EXP_NAME"):
        queries.insert(0, f"{query} and tags.dvc_exp_name = '{os.environ['DVC_EXP_NAME']}'")
    runs = []
    for query in queries:
        runs = mlflow.MlflowClient().search_runs(
            [experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1
        )
        if runs:
            break
    if not runs:
        raise SystemExit(
            f"error: no MLflow run in the tracking store {mlflow.get_tracking_uri()} (experiment "
            f"{experiment_name!r}) trained {weights} (sha256 {digest[:12]}...): re-run the train stage against "
            "this store (dvc repro -f train)"
        )
    return mlflow.start_run(run_id=runs[0].info.run_id)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def dvc_outputs(lock_file: str | Path = "dvc.lock") -> dict[str, dict]:
    """Every stage output recorded in dvc.lock: path -> {"md5", "size", "nfiles"?}."""
    try:
        lock = yaml.safe_load(Path(lock_file).read_text()) or {}
    except FileNotFoundError:
        return {}
    return {out["path"]: out for stage in lock.get("stages", {}).values() for out in stage.get("outs", [])}


def _matches(path: Path, entry: dict) -> bool:
    """Cheap check that a dvc.lock entry describes what is on disk (same size and file count)."""
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path] if path.exists() else []
    if entry.get("nfiles") is not None and entry["nfiles"] != len(files):
        return False
    return entry.get("size") is None or entry["size"] == sum(p.stat().st_size for p in files)


def log_dvc_hashes(paths: dict[str, str]) -> dict[str, str]:
    """Tag the active run with the DVC hash (from dvc.lock) of each path, as `dvc.<key>.md5`, when
    dvc.lock describes what is on disk. Returns the tags set."""
    outputs = dvc_outputs()
    tags = {}
    for key, path in paths.items():
        entry = outputs.get(Path(path).as_posix())
        if entry and _matches(Path(path), entry):
            tags[f"dvc.{key}.md5"] = entry["md5"]
    if tags:
        mlflow.set_tags(tags)
    return tags


def log_data_lineage(name: str, raw_dir: str, prepared_dir: str) -> dict[str, str]:
    """Record which data version the run saw: the DVC hashes of the raw and prepared data (from
    dvc.lock, which `dvc repro` updates after each stage) as tags, and the raw data as an MLflow
    dataset input whose digest is its DVC hash. Returns the tags."""
    tags = log_dvc_hashes({"raw": raw_dir, "prepared": prepared_dir})
    mlflow.set_tag("dvc.data_version_known", str("dvc.raw.md5" in tags).lower())
    # MLflow registers its local-file source twice; name one to avoid its "multiple ways" warning.
    local = [s for s in get_registered_sources() if s.__name__ == "LocalArtifactDatasetSource"][:1]
    source = resolve_dataset_source(Path(raw_dir).resolve().as_uri(), candidate_sources=local or None)
    mlflow.log_input(MetaDataset(source=source, name=name, digest=tags.get("dvc.raw.md5")), context="training")
    return tags


class EpochLogger:
    """Per-epoch metrics into an MLflow run, exactly once each, surviving a store that goes away.

    Every epoch's metrics are kept (the caller also writes them locally and into checkpoints); a
    failed log is retried at the next epoch, and `flush(final=True)` keeps retrying for a while. On
    a resumed run, steps MLflow already holds are not logged again.

    A failed request may still have reached the store (a server that dies after committing, before
    answering), so a retry must not add a second copy: each epoch's metrics are stamped once, when
    the epoch ends, and re-sent identical (MLflow's SQL store keeps one row per key, timestamp, step
    and value), and after a failure the steps the store holds are read again before re-sending."""

    # Every epoch logs the training loss (the validation metrics only on the epochs train.val_every names).
    def __init__(self, run_id: str, key: str = EPOCH_METRICS["train_loss"]) -> None:

        self.client = mlflow.MlflowClient()
        self.run_id = run_id
        self.key = key
        self.pending: list[tuple[int, list]] = []
        self.logged = self._steps_in_store()
        self.failed = False
        self.warned = False

    def _steps_in_store(self) -> set[int]:
        return {m.step for m in self.client.get_metric_history(self.run_id, self.key)}

    def add(self, epoch: int, metrics: dict[str, float]) -> None:
        """One epoch's metrics, named as train_history.csv names them (logged as EPOCH_METRICS names)."""
        if epoch not in self.logged:
            now = int(time.time() * 1000)
            batch = [Metric(EPOCH_METRICS.get(k, k), v, now, epoch) for k, v in metrics.items()]
            self.pending.append((epoch, batch))
        self.flush()

    def _send(self) -> None:
        if self.failed:  # what did the failed request leave in the store?
            self.logged = self._steps_in_store()
            self.pending = [(epoch, batch) for epoch, batch in self.pending if epoch not in self.logged]
            self.failed = False
        while self.pending:
            epoch, batch = self.pending[0]
            self.client.log_batch(self.run_id, metrics=batch)
            self.logged.add(epoch)
            self.pending.pop(0)

    def flush(self, final: bool = False, attempts: int = 12, wait: float = 5.0) -> None:

        for attempt in range(attempts if final else 1):
            try:
                self._send()
            except Exception as exc:  # the store is down or busy: keep the metrics, carry on training
                self.failed = True
                if not self.warned:
                    epoch = self.pending[0][0] if self.pending else "?"
                    print(
                        f"train: could not log epoch {epoch} to MLflow ({type(exc).__name__}); "
                        "will retry (metrics are kept in the checkpoint and train_history.csv)"
                    )
                    self.warned = True
            if not self.pending:
                return
            if final and attempt + 1 < attempts:
                time.sleep(wait)
        if final:
            raise StoreUnavailable(
                f"{len(self.pending)} epoch(s) of metrics could not be logged to MLflow run "
                f"{self.run_id}; the checkpoint keeps them: re-run to log them"
            )
