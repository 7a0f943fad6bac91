"""params.yaml validation: every problem names its key, and stages stop with exit code 2."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import yaml

from conftest import default_params, project_env, write_params
from imgclf.architectures import list_models
from imgclf.config import ConfigError, Params, as_flat_dict, load_params


def edited_params(tmp_path, edit) -> str:
    params = default_params()
    edit(params)
    return str(write_params(tmp_path, params))


def test_the_shipped_params_load(tmp_path):
    params = load_params(write_params(tmp_path))
    assert isinstance(params, Params)
    assert params.train.preset == "default" and params.train.model == "lenet" and params.train.epochs == 20
    assert params.provenance.overrides == ()
    assert params.data.dataset == "digits"
    assert as_flat_dict(params)["train.lr"] == params.train.lr
    assert params.data.name == "digits"


@pytest.mark.parametrize(
    "path, name",
    [("../data/cifar10-jpg.tar.gz", "cifar10-jpg"), ("photos/", "photos"), ("/x/Pets.ZIP", "Pets"), ("a/b.tgz", "b")],
)
def test_image_folder_data_is_named_after_its_file(tmp_path, path, name):
    params_path = edited_params(tmp_path, lambda p: p["data"].update(dataset="imagefolder", path=path))
    assert load_params(params_path).data.name == name


@pytest.mark.parametrize(
    "edit, message",
    [
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
        (lambda p: p["train"].update(backbone_lr_scale=0.1), "train.backbone_lr_scale: needs train.pretrained"),
        (lambda p: p["train"].update(auto_augment="augmix"), "train.auto_augment: must be one of 'none'"),
        (lambda p: p["train"].update(ra_magnitude=31), "train.ra_magnitude: must be <= 30"),
        (lambda p: p["train"].update(random_erase=1.5), "train.random_erase: must be <= 1"),
        (lambda p: p["train"].update(resized_crop=1.0), "train.resized_crop: must be < 1"),
        (lambda p: p["train"].update(mixup_alpha=-1), "train.mixup_alpha: must be >= 0"),
        (lambda p: p["train"].update(preset="nope"), "train.preset: no preset 'nope'"),
        (lambda p: p["train"].update(model="resnet999"), "train.model: no model 'resnet999' (known: lenet,"),
        (lambda p: p["train"].update(preset="none"), "train.preset: no preset 'none'"),
        (lambda p: p["train"].update(seed=None), "train.seed: expected an integer, got null"),
        (lambda p: p["data"].update(dataset="mnist"), "data.dataset: must be one of"),
        (lambda p: p["data"].update(channels=2), "data.channels: must be one of"),
        (lambda p: p["data"].update(image_size=4), "data.image_size: must be >= 8"),
        (lambda p: p["prepare"].update(val_fraction=1.0), "prepare.val_fraction: must be < 1"),
        (lambda p: p["prepare"].update(workers=-1), "prepare.workers: must be >= 0"),
        (lambda p: p["data"].update(dataset="imagefolder", path=None), "data.path: required"),
        (lambda p: p["data"].update(dataset="imagefolder", path="x.tar", image_size=None), "data.image_size: required"),
        (lambda p: p["data"].update(on_bad_image="ignore"), "data.on_bad_image: must be one of"),
        (lambda p: p["data"].update(max_pixels=0), "data.max_pixels: must be >= 1"),
        # Pillow refuses larger images before any limit of ours is asked.
        (lambda p: p["serve"].update(max_image_pixels=200_000_000), "serve.max_image_pixels: must be <= 178,956,970"),
        (lambda p: p["data"].update(cifar100_labels="medium"), "data.cifar100_labels: must be one of"),
        (lambda p: p["register"].update(model_name="bad name/with@"), "register.model_name"),
        (lambda p: p["compress"].update(method="int4"), "compress.method: must be one of"),
        (lambda p: p["compress"].update(prune_amount=1.0), "compress.prune_amount: must be < 1"),
        (lambda p: p["compress"].update(calibration_images=0), "compress.calibration_images: must be >= 1"),
        (lambda p: p.update(train=[1, 2]), "train: expected a mapping"),
    ],
)
def test_bad_params_name_the_key(tmp_path, edit, message):
    path = edited_params(tmp_path, edit)
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


@pytest.mark.parametrize("stage", ["download", "prepare", "train", "evaluate", "compress", "register"])
def test_every_stage_exits_2_before_any_work(tmp_path, stage):
    path = edited_params(tmp_path, lambda p: p["train"].update(lr=0))
    before = sorted(tmp_path.rglob("*"))
    proc = subprocess.run(
        [sys.executable, "-m", f"imgclf.{stage}", "--params", path],
        cwd=tmp_path,
        env=project_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "train.lr: must be > 0" in proc.stderr
    assert sorted(tmp_path.rglob("*")) == before  # nothing written: no data, no mlflow.db


def test_a_preset_fills_the_keys_params_leaves_null(tmp_path):
    params = load_params(edited_params(tmp_path, lambda p: p["train"].update(preset="fast-cifar")))
    preset = yaml.safe_load((tmp_path / "presets" / "fast-cifar.yaml").read_text())
    for key, value in preset.items():
        if key != "base":
            assert getattr(params.train, key) == value, key
    # What fast-cifar does not set comes from its base, the default preset.
    assert params.train.cutout == 0 and params.train.grad_clip == 0.0
    assert params.train.preset == "fast-cifar"
    assert params.provenance.presets == (
        str(tmp_path / "presets/fast-cifar.yaml"),
        str(tmp_path / "presets/default.yaml"),
    )
    assert params.provenance.overrides == ()


def test_a_key_given_in_params_wins_over_the_preset_and_is_reported(tmp_path):
    """`dvc exp run -S train.preset=fast-cifar -S train.epochs=12` trains 12 epochs, and says so."""
    params = load_params(
        edited_params(tmp_path, lambda p: p["train"].update(preset="fast-cifar", epochs=12, model="fastnet", flip=True))
    )
    assert params.train.epochs == 12
    assert as_flat_dict(params)["train.epochs"] == 12  # what MLflow logs
    # Only the key that differs from the preset is an override; the same value given again is not.
    assert [str(o) for o in params.provenance.overrides] == ["Overriding: train.epochs = 12 (preset fast-cifar: 8)"]


def test_a_preset_builds_on_its_base(tmp_path):
    params = load_params(edited_params(tmp_path, lambda p: p["train"].update(preset="accurate-cifar")))
    fast = load_params(edited_params(tmp_path / "fast", lambda p: p["train"].update(preset="fast-cifar")))
    assert (params.train.model, params.train.epochs) == ("fastnet-l", 12) and fast.train.epochs == 8
    # Only the keys accurate-cifar names differ from its base; every other key comes from fast-cifar.
    same = dict(epochs=8, preset="fast-cifar", model="fastnet", lr=fast.train.lr, weight_decay=fast.train.weight_decay)
    assert params.train.lr < fast.train.lr
    assert dataclasses.replace(params.train, **same) == fast.train
    assert len(params.provenance.presets) == 3


def test_the_train_stage_prints_each_override_once(tmp_path):
    def train(**keys) -> subprocess.CompletedProcess:
        path = edited_params(tmp_path, lambda p: p["train"].update(preset="fast-cifar", **keys))
        return subprocess.run(
            [sys.executable, "-m", "imgclf.train", "--params", path],
            cwd=tmp_path,
            env=project_env(),
            capture_output=True,
            text=True,
        )

    proc = train(epochs=12, lr=-1.0)
    assert proc.returncode == 2 and "train.lr: must be > 0" in proc.stderr  # validated before anything else
    proc = train(epochs=12)
    assert proc.stdout.count("Overriding: train.epochs = 12 (preset fast-cifar: 8)") == 1
    assert proc.returncode != 0 and "meta.json" in proc.stderr  # then it stops: there is no prepared data


@pytest.mark.parametrize(
    "preset, message",
    [
        ("lr: 0.1\nlearning_rate: 0.2\n", r"mine.yaml: learning_rate: unknown train key"),
        ("lr: 0.1\ndevice: cuda\n", r"mine.yaml: device: set in params.yaml, not in a preset"),
        ("base: nope\n", r"base of .*mine.yaml: no preset 'nope'"),
        ("base: mine\n", r"mine.yaml: base 'mine' makes a cycle"),
        ("base: [1]\n", r"mine.yaml: base: expected the name of another preset"),
        ("- lr\n", r"mine.yaml must be a mapping of train keys"),
        ("lr: 0.1\n", r"train.model: null \(take the preset's value\), but no preset sets it"),
        ("base: default\nlr: -1\n", r"with .*mine.yaml: train.lr: must be > 0"),
    ],
)
def test_a_bad_preset_names_the_file_and_the_key(tmp_path, preset, message):
    path = edited_params(tmp_path, lambda p: p["train"].update(preset="mine"))
    (tmp_path / "presets" / "mine.yaml").write_text(preset)
    with pytest.raises(ConfigError, match=message):
        load_params(path)


@pytest.mark.parametrize("written, value", [("1e-04", 1e-4), ("1e+30", 1e30), ("2.5e-3", 2.5e-3), ("0.1", 0.1)])
def test_floats_as_dvc_writes_them_are_numbers(tmp_path, written, value):
    """`dvc exp run -S train.lr=1e-4` writes `lr: 1e-04`, which YAML 1.1 would read as a string."""
    path = edited_params(tmp_path, lambda p: None)
    text = open(path).read().replace("lr: null", f"lr: {written}")
    open(path, "w").write(text)
    assert load_params(path).train.lr == value


def test_the_pixel_ceiling_is_pillows():
    from PIL import Image

    from imgclf.config import PILLOW_MAX_PIXELS

    assert PILLOW_MAX_PIXELS == 2 * Image.MAX_IMAGE_PIXELS


def test_every_registered_model_is_accepted_by_params(tmp_path):
    for name in list_models():
        assert load_params(edited_params(tmp_path, lambda p: p["train"].update(model=name))).train.model == name
