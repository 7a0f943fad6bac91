"""Which data and code produced a registered model: one command from a model URI to its origins.

    python -m imgclf.lineage "models:/digits-lenet@champion"      # or models:/<name>/<version>
    python -m imgclf.lineage "models:/digits-lenet@champion" --json

Follows the model version to the MLflow run that trained it and prints the git commit (and whether the
tree had uncommitted changes), the DVC experiment, the DVC hashes of the raw and prepared data and of
the model (as dvc.lock recorded them), the data's name, the resolved params and the metrics. Reads the
same store as the pipeline (MLFLOW_TRACKING_URI, else mlflow.db at the repository root).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from imgclf.tracking import StoreUnavailable, use_store

PARAM_SECTIONS = ("data.", "prepare.", "train.")


def lineage(model_uri: str) -> dict[str, Any]:
    match = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))", model_uri)
    if not match:
        raise ValueError(f"{model_uri!r} is not a models:/<name>@<alias> or models:/<name>/<version> URI")
    name, alias, number = match.groups()
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
    run = client.get_run(version.run_id)
    tags, params = run.data.tags, run.data.params
    experiment = client.get_experiment(run.info.experiment_id)
    return {
        "model": {
            "name": name,
            "version": str(version.version),
            "aliases": list(version.aliases),
            "source": version.source,
        },
        "run": {
            "id": run.info.run_id,
            "name": run.info.run_name,
            "experiment": experiment.name,
            "status": run.info.status,
        },
        "code": {"git_commit": tags.get("mlflow.source.git.commit"), "git_dirty": tags.get("git_dirty")},
        "dvc_experiment": tags.get("dvc_exp_name"),
        "data": {
            "inputs": [
                {"name": i.dataset.name, "digest": i.dataset.digest, "source": i.dataset.source}
                for i in run.inputs.dataset_inputs
            ],
            **{key: value for key, value in sorted(tags.items()) if key.startswith("dvc.")},
        },
        "params": {k: v for k, v in sorted(params.items()) if k.startswith(PARAM_SECTIONS)},
        "metrics": dict(sorted(run.data.metrics.items())),
    }


def _experiment(name: str | None, commit: str | None) -> str:
    """The experiment's name, and where `dvc exp list` shows it: among the experiments of its baseline
    commit, which is not HEAD once anything was committed after it."""
    if not name:
        return "-"
    return f"{name} (dvc exp list --rev {commit[:7]})" if commit else name


def render(info: dict[str, Any]) -> str:
    model, run, code = info["model"], info["run"], info["code"]
    dirty = {"true": "with uncommitted changes", "false": "clean"}.get(code["git_dirty"], "state unknown")
    lines = [
        f"model      {model['name']} version {model['version']} (aliases: {', '.join(model['aliases']) or 'none'})",
        f"run        {run['id']} ({run['name']}, experiment {run['experiment']}, {run['status']})",
        f"code       git commit {code['git_commit'] or 'unknown'} ({dirty})",
        f"DVC exp    {_experiment(info['dvc_experiment'], code['git_commit'])}",
    ]
    for item in info["data"]["inputs"]:
        lines.append(f"data       {item['name']} (digest {item['digest']})")
    for key, value in info["data"].items():
        if key != "inputs":
            lines.append(f"           {key} = {value}")
    lines.append("params     " + ", ".join(f"{k}={v}" for k, v in info["params"].items()))
    lines.append(
        "metrics    "
        + ", ".join(
            f"{k}={v:.4g}"
            for k, v in info["metrics"].items()
            if k in ("test/accuracy", "val/accuracy", "test/f1_macro")
        )
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_uri", help='e.g. "models:/digits-lenet@champion"')
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    try:
        use_store()
        info = lineage(args.model_uri)
    except (ValueError, MlflowException, StoreUnavailable) as exc:
        print(f"error: {getattr(exc, 'message', exc)}", file=sys.stderr)
        raise SystemExit(1) from None
    print(json.dumps(info, indent=2) if args.json else render(info))


if __name__ == "__main__":
    main()
