"""The training loop's airbench pieces, in process on random data: the whitening bias freezes on time,
lookahead resets the weights to their average every 5 steps, Muon's state survives a checkpoint; and the
precision `auto` picks for the hardware."""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import card_for, default_config
from imgclf import checkpoint, devices
from imgclf.devices import autocast_dtype, cpu_has_bf16
from imgclf.models import build
from imgclf.progress import epoch_line
from imgclf.train import Arrays, Training, history_csv


def random_split(n: int, seed: int) -> Arrays:
    rng = np.random.default_rng(seed)
    return Arrays(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n))


def make_training(n: int, **train) -> Training:
    cfg = dataclasses.replace(default_config().train, model="fastnet-s", **{"optimizer": "sgd", "lr": 0.05, **train})
    torch.manual_seed(0)
    model = build(card_for("fastnet-s"))
    return Training(model, random_split(n, 0), random_split(16, 1), cfg, torch.device("cpu"))


@pytest.mark.parametrize("val_every, scored", [(1, [1, 2, 3, 4, 5]), (2, [2, 4, 5]), (0, [5])])
def test_validation_is_scored_after_the_epochs_val_every_names_and_the_last(val_every, scored):
    run = make_training(64, batch_size=32, epochs=5, val_every=val_every)
    rows = [{"epoch": epoch, **run.run_epoch()} for epoch in range(1, 6)]
    assert [row["epoch"] for row in rows if "val_accuracy" in row] == scored
    assert all(("val_loss" in row) == ("val_accuracy" in row) for row in rows)
    assert all("train_loss" in row and "lr" in row for row in rows)
    table = list(csv.DictReader(io.StringIO(history_csv(rows).decode())))
    assert [row["epoch"] for row in table if row["val_accuracy"]] == [str(e) for e in scored]  # the rest empty
    assert all(row["train_loss"] for row in table)
    line = epoch_line(1, 5, rows[0], 100.0, 1.0, 4, 1.0)
    expected = "(train / val)" if 1 in scored else "(train), accuracy"
    assert expected in line and ("val" in line) == (1 in scored)


def test_skipping_validation_trains_the_same_weights():
    """Scoring the validation split reads the model only (eval mode, no random draws): val_every 0
    ends with the weights of val_every 1, to the bit, only faster."""
    runs = [make_training(64, batch_size=32, epochs=3, val_every=every, flip=True, translate=2) for every in (1, 0)]
    for run in runs:
        for _ in range(3):
            run.run_epoch()
    for a, b in zip(runs[0].model.state_dict().values(), runs[1].model.state_dict().values()):
        assert torch.equal(a, b)


def test_whitening_bias_learns_only_for_its_epochs():
    run = make_training(64, batch_size=32, epochs=3, whiten_bias_epochs=1, flip=True, alternate_flip=True, translate=2)
    model = run.model
    bias, head = model.net.whiten.bias, model.net.head.weight

    def snapshot():
        return bias.detach().clone(), head.detach().clone()

    before = snapshot()
    run.run_epoch()
    after_first = snapshot()
    assert not torch.equal(before[0], after_first[0]) and not torch.equal(before[1], after_first[1])
    run.run_epoch()
    after_second = snapshot()
    assert torch.equal(after_first[0], after_second[0])  # frozen from epoch 2 on
    assert not torch.equal(after_first[1], after_second[1])  # the rest still learns


def test_lookahead_resets_the_weights_to_their_average_every_five_steps():
    run = make_training(56, batch_size=8, epochs=2, ema_decay=0.95, lookahead=True)  # 7 steps an epoch
    initial = [p.detach().clone() for p in run.model.parameters()]
    seen = []

    def on_step():
        same = all(torch.equal(a, b) for a, b in zip(run.model.parameters(), run.ema.module.parameters()))
        seen.append(same)

    run.run_epoch(on_step)
    assert seen == [False, False, False, False, True, False, False]  # reset after step 5 only
    averaged = list(run.final_model.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(averaged, initial))  # the average has moved


def test_lookahead_in_a_run_shorter_than_five_steps_still_returns_trained_weights():
    run = make_training(16, batch_size=8, epochs=1, ema_decay=0.95, lookahead=True)  # 2 steps in all
    run.run_epoch()
    assert all(torch.equal(a, b) for a, b in zip(run.final_model.parameters(), run.model.parameters()))


def assert_resumed_like(whole, train: dict, tmp_path) -> None:
    """A run of 2 epochs stopped after the first, checkpointed and resumed ends with `whole`'s weights."""
    first = make_training(64, **train)
    first.run_epoch()
    checkpoint.save(first.state_dict(), tmp_path)
    resumed = make_training(64, **train)
    resumed.load_state_dict(checkpoint.load(tmp_path))
    resumed.run_epoch()
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_muon_training_resumed_from_a_checkpoint_ends_with_the_same_weights(tmp_path):
    """The optimizer's two kinds of state (SGD's and the filters' momentum) go through a checkpoint file."""
    train = dict(batch_size=32, epochs=2, optimizer="muon", muon_lr=0.1, nesterov=True, schedule="onecycle")
    whole = make_training(64, **train)
    losses = [whole.run_epoch()["train_loss"] for _ in range(2)]
    assert losses[1] < losses[0]
    assert_resumed_like(whole, train, tmp_path)


def precision(name: str):
    return dataclasses.replace(default_config().train, precision=name)


def test_auto_precision_is_bf16_exactly_where_the_cpu_reports_bf16_units():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo to read the CPU's features from")
    flags = set(cpuinfo.read_text().split())
    assert cpu_has_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})
    expected = torch.bfloat16 if cpu_has_bf16() else None
    assert autocast_dtype(precision("auto"), torch.device("cpu")) is expected
    assert autocast_dtype(precision("fp32"), torch.device("cpu")) is None


def test_bf16_and_fp16_on_a_cpu_that_cannot_run_them_fast_are_refused_by_name(monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)  # as on a CPU without bf16 units
    assert autocast_dtype(precision("auto"), torch.device("cpu")) is None
    with pytest.raises(ValueError, match="train.precision: bf16 on cpu: .*no bf16 units"):
        autocast_dtype(precision("bf16"), torch.device("cpu"))
    with pytest.raises(ValueError, match="train.precision: fp16 autocast is for CUDA"):
        autocast_dtype(precision("fp16"), torch.device("cpu"))
    with pytest.raises(ValueError, match="train.precision: bf16 autocast is for CUDA devices and CPUs.*not meta"):
        autocast_dtype(precision("bf16"), torch.device("meta"))  # a device type that is neither


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16 units")
def test_bf16_training_on_the_cpu_computes_in_bf16_and_keeps_fp32_weights():
    run = make_training(64, batch_size=32, epochs=2, precision="bf16", optimizer="muon", muon_lr=0.1)
    seen = []
    run.model.net.head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    losses = [run.run_epoch()["train_loss"] for _ in range(2)]
    assert losses[1] < losses[0] and all(np.isfinite(losses))
    assert seen[0] == torch.bfloat16  # the training passes ran under autocast
    assert seen[-1] == torch.float32  # the validation pass after them did not
    assert all(p.dtype == torch.float32 for p in run.model.parameters())


STRONG = dict(
    resized_crop=0.35,
    auto_augment="trivialaugment",
    random_erase=0.25,
    mixup_alpha=0.2,
    cutmix_alpha=1.0,
    flip=True,
)


def test_strong_augmentation_and_mixing_resume_from_a_checkpoint_to_the_same_weights(tmp_path):
    """The policies and MixUp/CutMix draw from torch's global generator inside a fork seeded from the
    checkpointed augmentation generator: a resumed run sees the same batches."""
    train = dict(batch_size=32, epochs=2, **STRONG)
    whole = make_training(64, **train)
    metrics = [whole.run_epoch() for _ in range(2)]
    assert all(np.isfinite(m["train_loss"]) and 0 <= m["train_accuracy"] <= 1 for m in metrics)
    assert_resumed_like(whole, train, tmp_path)


def test_mixed_batches_train_on_soft_targets_and_count_accuracy_against_the_labels():
    run = make_training(64, batch_size=32, epochs=1, mixup_alpha=1.0)
    images, target, labels = run.batch(torch.arange(32))
    assert target.shape == (32, 10) and labels.shape == (32,) and images.dtype == torch.float32
    torch.testing.assert_close(target.sum(1), torch.ones(32))
    loss, correct = run.gradients(images, target, labels)
    assert torch.isfinite(loss) and 0 <= int(correct) <= 32


def finetuning(tmp_path, **train) -> Training:
    """mobilenet_v3_small from a local weights file, fine-tuned on random 32x32 images."""
    from torchvision.models import get_model

    torch.manual_seed(0)
    torch.save(get_model("mobilenet_v3_small", weights=None).state_dict(), tmp_path / "weights.pth")
    model_name = "torchvision:mobilenet_v3_small"
    cfg = dataclasses.replace(
        default_config().train,
        model=model_name,
        pretrained=str(tmp_path / "weights.pth"),
        **{"optimizer": "adamw", "lr": 0.01, "batch_size": 16, "epochs": 2, **train},
    )
    model = build(card_for(model_name), pretrained=cfg.pretrained)
    return Training(model, random_split(32, 0), random_split(8, 1), cfg, torch.device("cpu"))


def test_a_frozen_backbone_keeps_its_weights_and_its_batchnorm_statistics(tmp_path):
    run = finetuning(tmp_path, freeze_epochs=1)
    net = run.model.net
    head = net.classifier[-1]
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]

    def backbone():
        return [t.clone() for name, t in net.state_dict().items() if not name.startswith("classifier.3.")]

    before, head_before = backbone(), head.weight.detach().clone()
    run.run_epoch()
    after_frozen = backbone()
    assert all(torch.equal(a, b) for a, b in zip(before, after_frozen))  # running statistics included
    assert not torch.equal(head.weight, head_before)
    run.run_epoch()
    assert all(m.training for m in norms)  # unfrozen: BatchNorm normalises by the batch again
    changed = [not torch.equal(a, b) for a, b in zip(after_frozen, backbone())]
    assert sum(changed) > len(changed) // 2
    assert not torch.equal(norms[0].running_mean, before[[*net.state_dict()].index("features.0.1.running_mean")])


def test_the_backbone_learns_at_backbone_lr_scale_times_the_heads_rate(tmp_path):
    run = finetuning(tmp_path, backbone_lr_scale=0.1, lr=0.002)
    head = {id(p) for p in run.model.net.classifier[-1].parameters()}
    groups = run.optimizer.param_groups
    rates = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert len(rates) == len(list(run.model.parameters()))
    assert {rates[i] for i in head} == {0.002}
    backbone = [r for i, r in rates.items() if i not in head]
    assert backbone and all(r == pytest.approx(0.0002) for r in backbone)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "mobilenet_v3_small"])
def test_the_finetune_preset_trains_any_torchvision_classifier(tmp_path, name):
    """presets/finetune.yaml with another model and a local weights file: a frozen epoch, then one of the
    whole net, with the backbone at its own learning rate."""
    from torchvision.models import get_model

    from imgclf.train import fit

    torch.save(get_model(name, weights=None).state_dict(), tmp_path / "weights.pth")
    params = default_config(preset="finetune", model=f"torchvision:{name}", pretrained=str(tmp_path / "weights.pth"))
    params = dataclasses.replace(params, train=dataclasses.replace(params.train, epochs=2, batch_size=8))
    scale = params.train.backbone_lr_scale
    assert params.train.freeze_epochs == 1 and 0 < scale < 1
    card = card_for(f"torchvision:{name}", train=dataclasses.asdict(params.train))
    result = fit(params, card, random_split(16, 0), random_split(8, 1), torch.device("cpu"))
    assert [row["epoch"] for row in result.history] == [1, 2]
    assert all(np.isfinite(row["train_loss"]) for row in result.history)
    rates = sorted(g["initial_lr"] for g in result.training.optimizer.param_groups)
    assert rates == pytest.approx([scale * params.train.lr, params.train.lr])  # the backbone, the head
