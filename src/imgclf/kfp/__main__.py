"""Compile the pipeline to a KFP v2 spec, or run that spec here with kfp.local.

    python -m imgclf.kfp compile --out pipeline.yaml [--image IMAGE] [--tracking-uri URI] [--secret NAME]
    python -m imgclf.kfp run [--set train.epochs=3 ...]

Both read dvc.yaml, params.yaml and presets/ in the current folder (the repository root). `run` compiles
to <root>/pipeline.yaml, runs every task as a local process (kfp.local's SubprocessRunner: no Docker, no
cluster, no network) with its artifacts under --root, and prints what register did. The MLflow store is
MLFLOW_TRACKING_URI, else the repository's mlflow.db, as for `dvc repro`. Exit codes: 2 for a usage error
(the kfp extra missing, a bad --set), 1 for a failed run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import yaml

from imgclf.config import ConfigError, load_params, parse_value
from imgclf.kfp.pipeline import (
    DEFAULT_IMAGE,
    Options,
    Project,
    argument,
    compile_to,
    flat,
    load_project,
    parameter_name,
)

INSTALL = 'pip install -e ".[kfp]"'


class UsageError(Exception):
    """A command line that cannot run: exit code 2."""


def require_kfp() -> None:
    try:
        import kfp  # noqa: F401
        import kfp.kubernetes  # noqa: F401
    except ImportError as exc:
        raise UsageError(
            f"the kfp extra is not installed ({exc}): python -m imgclf.kfp needs the Kubeflow Pipelines SDK; "
            f"install it with {INSTALL}"
        ) from None


def overrides(sets: list[str], project: Project) -> dict[str, Any]:
    """`--set key=value` pairs, values read as params.yaml would read them, keys checked against it; the
    params they make are validated as a stage would validate them."""
    known = flat(project.params)
    result = {}
    for item in sets:
        key, sep, text = item.partition("=")
        if not sep:
            raise UsageError(f"--set {item!r}: expected key=value, e.g. --set train.epochs=3")
        if key not in known:
            section = key.split(".")[0]
            keys = [k for k in known if k.startswith(f"{section}.")] or [f"{s}.*" for s in project.params]
            raise UsageError(f"--set {item}: params.yaml has no key {key!r} (known: {', '.join(keys)})")
        value = parse_value(text)
        if value is None and known[key] is not None:  # (a KFP parameter cannot be null)
            raise UsageError(f"--set {item}: {key} cannot be null in a KFP run (params.yaml gives it {known[key]!r})")
        result[key] = value
    params = {section: dict(keys) for section, keys in project.params.items()}
    for key, value in result.items():
        section, name = key.split(".", 1)
        params[section][name] = value
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in project.files.items():
            (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / name).write_text(text)
        (Path(tmp) / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        try:
            load_params(Path(tmp) / "params.yaml")
        except ConfigError as exc:
            raise UsageError(f"--set: {str(exc).split(': ', 1)[-1]}") from None
    return result


def arguments(values: dict[str, Any], project: Project) -> dict[str, Any]:
    """Every pipeline argument: the defaults, with `values` over them."""
    defaults = flat(project.params)
    return {parameter_name(k): argument(k, {**defaults, **values}[k], d) for k, d in defaults.items()}


def run(project: Project, values: dict[str, Any], root: Path) -> dict:
    """Compile, run every task here, return register's receipt."""
    from kfp import components, local

    spec = compile_to(project, root / "pipeline.yaml")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    pipeline = components.load_component_from_file(str(spec))
    with warnings.catch_warnings():
        # The runner warns of any image without "python" in its name; here the tasks run in this venv.
        warnings.filterwarnings("ignore", message="You may be attemping to run a task")
        receipt = pipeline(**arguments(values, project))
    return json.loads(receipt.output)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    compiling = commands.add_parser("compile", help="write the KFP v2 pipeline spec")
    compiling.add_argument("--out", default="pipeline.yaml", help="spec file (default: %(default)s)")
    compiling.add_argument("--image", default=DEFAULT_IMAGE, help="image of every task (default: %(default)s)")
    compiling.add_argument("--tracking-uri", help="MLFLOW_TRACKING_URI of every task (an MLflow server)")
    compiling.add_argument("--secret", help="Kubernetes secret whose MLflow/S3 credential keys become task env vars")
    compiling.add_argument("--pvc", help="PersistentVolumeClaim with the raw data, mounted at /mnt/data in download")
    compiling.add_argument("--gpus", type=int, default=0, help="GPUs for the train task (default: %(default)s)")
    compiling.add_argument("--train-cpu", default=Options.train_cpu, help="train's CPU limit (default: %(default)s)")
    compiling.add_argument("--train-memory", default=Options.train_memory, help="train's memory (default: %(default)s)")
    running = commands.add_parser("run", help="run the pipeline here with kfp.local")
    running.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a params.yaml key")
    running.add_argument("--root", default=".kfp", help="where the tasks' artifacts go (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        require_kfp()
        project = load_project(Path.cwd())
        if args.command == "compile":
            options = Options(
                image=args.image,
                tracking_uri=args.tracking_uri,
                secret=args.secret,
                pvc=args.pvc,
                gpus=args.gpus,
                train_cpu=args.train_cpu,
                train_memory=args.train_memory,
            )
            out = compile_to(project, Path(args.out), options)
            print(f"kfp: wrote {out} (image {options.image})")
            return
        values = overrides(args.set, project)
    except (UsageError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    root = Path(args.root).resolve()
    try:
        receipt = run(project, values, root)
    except RuntimeError as exc:
        print(f"error: the pipeline failed: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    verdict = "champion" if receipt["champion"] else f"champion stays version {receipt['previous_champion']}"
    print(
        f"kfp run: {receipt['model_name']} version {receipt['version']} "
        f"(val_accuracy {receipt['val_accuracy']:.4f}): {verdict}; MLflow run {receipt['run_id']}; "
        f"artifacts under {root}"
    )


if __name__ == "__main__":
    main()
