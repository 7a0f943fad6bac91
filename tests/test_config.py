"""params.yaml validation: every problem names its key, and stages stop with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from conftest import REPO, project_env
from imgclf.config import ConfigError, Params, as_flat_dict, load_params


def write_params(tmp_path, edit) -> str:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    edit(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return str(path)


def test_the_shipped_params_load():
    params = load_params(REPO / "params.yaml")
    assert isinstance(params, Params)
    assert params.data.dataset == "digits"
    assert as_flat_dict(params)["train.lr"] == params.train.lr
    assert params.data.name == "digits"


@pytest.mark.parametrize("path, name", [("../data/cifar10-jpg.tar.gz", "cifar10-jpg"), ("photos/", "photos"),
                                        ("/x/Pets.ZIP", "Pets"), ("a/b.tgz", "b")])
def test_image_folder_data_is_named_after_its_file(tmp_path, path, name):
    params_path = write_params(tmp_path, lambda p: p["data"].update(dataset="imagefolder", path=path))
    assert load_params(params_path).data.name == name


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["train"].update(lrr=0.1), "train.lrr: unknown key"),
    (lambda p: p.update(trian={}), "trian: unknown key"),
    (lambda p: p["train"].pop("epochs"), "train.epochs: missing key"),
    (lambda p: p.pop("register"), "register: missing key"),
    (lambda p: p["train"].update(lr="fast"), "train.lr: expected a number"),
    (lambda p: p["train"].update(epochs=2.5), "train.epochs: expected an integer"),
    (lambda p: p["train"].update(epochs=True), "train.epochs: expected an integer"),
    (lambda p: p["train"].update(lr=-0.1), "train.lr: must be > 0"),
    (lambda p: p["train"].update(momentum=1.0), "train.momentum: must be < 1"),
    (lambda p: p["train"].update(batch_size=0), "train.batch_size: must be >= 1"),
    (lambda p: p["train"].update(optimizer="lbfgs"), "train.optimizer: must be one of"),
    (lambda p: p["train"].update(device="tpu"), "train.device: 'tpu' does not match"),
    (lambda p: p["train"].update(lookahead=True, ema_decay=0.0), "train.lookahead: needs train.ema_decay"),
    (lambda p: p["train"].update(alternate_flip=True, flip=False), "train.alternate_flip: needs train.flip"),
    (lambda p: p["train"].update(tta_translate=9), "train.tta_translate"),
    (lambda p: p["train"].update(whiten_bias_epochs=3), "train.whiten_bias_epochs: only fastnet models"),
    (lambda p: p["train"].update(norm_bias_lr_scale=0), "train.norm_bias_lr_scale: must be > 0"),
    (lambda p: p["train"].update(preset="nope"), "train.preset: no preset 'nope'"),
    (lambda p: p["train"].update(model="resnet999"), "train.model: 'resnet999' does not match"),
    (lambda p: p["data"].update(dataset="mnist"), "data.dataset: must be one of"),
    (lambda p: p["data"].update(channels=2), "data.channels: must be one of"),
    (lambda p: p["data"].update(image_size=4), "data.image_size: must be >= 8"),
    (lambda p: p["prepare"].update(val_fraction=1.0), "prepare.val_fraction: must be < 1"),
    (lambda p: p["prepare"].update(workers=-1), "prepare.workers: must be >= 0"),
    (lambda p: p["data"].update(dataset="imagefolder", path=None), "data.path: required"),
    (lambda p: p["data"].update(dataset="imagefolder", path="x.tar", image_size=None),
     "data.image_size: required"),
    (lambda p: p["data"].update(on_bad_image="ignore"), "data.on_bad_image: must be one of"),
    (lambda p: p["data"].update(max_pixels=0), "data.max_pixels: must be >= 1"),
    (lambda p: p["data"].update(cifar100_labels="medium"), "data.cifar100_labels: must be one of"),
    (lambda p: p["register"].update(model_name="bad name/with@"), "register.model_name"),
    (lambda p: p.update(train=[1, 2]), "train: expected a mapping"),
])
def test_bad_params_name_the_key(tmp_path, edit, message):
    path = write_params(tmp_path, edit)
    with pytest.raises(ConfigError) as error:
        load_params(path)
    assert message in str(error.value)
    assert path in str(error.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no such params file"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


@pytest.mark.parametrize("stage", ["download", "prepare", "train", "evaluate", "register"])
def test_every_stage_exits_2_before_any_work(tmp_path, stage):
    path = write_params(tmp_path, lambda p: p["train"].update(lr=0))
    before = sorted(tmp_path.rglob("*"))
    proc = subprocess.run([sys.executable, "-m", f"imgclf.{stage}", "--params", path], cwd=tmp_path,
                          env=project_env(), capture_output=True, text=True)
    assert proc.returncode == 2
    assert "train.lr: must be > 0" in proc.stderr
    assert sorted(tmp_path.rglob("*")) == before  # nothing written: no data, no mlflow.db


def test_a_preset_replaces_train_keys(tmp_path):
    import shutil

    shutil.copytree(REPO / "presets", tmp_path / "presets")
    preset = yaml.safe_load((REPO / "presets" / "fast-cifar.yaml").read_text())
    params = load_params(write_params(tmp_path, lambda p: p["train"].update(preset="fast-cifar")))
    for key, value in preset.items():
        assert getattr(params.train, key) == value, key
    assert params.train.preset == "fast-cifar"


def test_a_preset_with_a_bad_key_names_the_file(tmp_path):
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "mine.yaml").write_text("lr: 0.1\nlearning_rate: 0.2\n")
    with pytest.raises(ConfigError, match=r"mine.yaml: learning_rate: unknown train key"):
        load_params(write_params(tmp_path, lambda p: p["train"].update(preset="mine")))
    (tmp_path / "presets" / "mine.yaml").write_text("lr: -1\n")
    with pytest.raises(ConfigError, match=r"with .*mine.yaml: train.lr: must be > 0"):
        load_params(write_params(tmp_path, lambda p: p["train"].update(preset="mine")))


@pytest.mark.parametrize("written, value", [("1e-04", 1e-4), ("1e+30", 1e30), ("2.5e-3", 2.5e-3), ("0.1", 0.1)])
def test_floats_as_dvc_writes_them_are_numbers(tmp_path, written, value):
    """`dvc exp run -S train.lr=1e-4` writes `lr: 1e-04`, which YAML 1.1 would read as a string."""
    path = write_params(tmp_path, lambda p: None)
    text = open(path).read().replace("lr: 0.002", f"lr: {written}")
    open(path, "w").write(text)
    assert load_params(path).train.lr == value


def test_every_registered_model_is_accepted_by_params(tmp_path):
    from imgclf.models import MODELS

    for name in MODELS:
        assert load_params(write_params(tmp_path, lambda p: p["train"].update(model=name))).train.model == name
