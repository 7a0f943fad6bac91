"""Data-parallel training (DDP, imgclf.distributed): two gloo processes on the CPU train as one process does,
into one MLflow run; a killed rank fails the stage clearly; a killed stage resumes under `dvc repro`.

The integration tests run the real train stage (train.processes, which launches through
torch.distributed.run) and the README's torchrun command on the digits data."""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import (
    default_config,
    free_port,
    fresh_copy,
    prepare_once,
    project_env,
    readme_command,
    run,
    stage,
    wait_for,
)
from imgclf.config import ConfigError
from imgclf.distributed import World, from_environment
from test_reproducibility import set_params
from test_robustness import configure, history, md5, repro_until_epoch, sigkill, torch_epoch

# ---- unit: how a batch is shared out -----------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 2, 7, 32])
@pytest.mark.parametrize("size", [1, 2, 3])
def test_every_row_of_a_batch_is_trained_once_at_its_share(rows, size):
    images = torch.arange(rows * 3).view(rows, 3)
    labels = torch.arange(rows)
    parts = [World(rank=r, size=size).shard(images, labels, labels) for r in range(size)]
    counted = torch.cat([p[2][p[2] >= 0] for p in parts])
    assert counted.equal(labels)  # each row on exactly one rank, in order (the others count nothing)
    assert sum(p[4] for p in parts) == pytest.approx(1.0)  # the shares make up the batch's mean loss
    assert sum(p[3] for p in parts) == pytest.approx(size)  # DDP divides the gradients' sum by size
    for part_images, _, part_labels, weight, share in parts:
        assert len(part_images) >= 1  # every rank makes a backward pass, as DDP needs
        if share:
            assert weight == pytest.approx(size * len(part_images) / rows)
        else:  # the one image of a rank left without rows weighs and counts nothing
            assert weight == 0 and part_labels.tolist() == [-1]


def test_the_rank_comes_from_torchruns_environment():
    assert from_environment({}) == World()
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert from_environment(env) == World(rank=3, size=4, local_rank=1, local_size=2)
    assert not from_environment(env).main and from_environment({}).main
    assert World(local_size=2).threads(0) >= 1 and World(local_size=2).threads(3) == 3


def test_more_processes_than_images_in_a_batch_is_a_config_error():
    with pytest.raises(ConfigError, match="train.processes: 4 processes cannot share batches of train.batch_size 2"):
        default_config(processes=4, batch_size=2)


# ---- integration: real processes ---------------------------------------------------------------------

# LeNet (no BatchNorm: see imgclf.distributed) with augmentation drawn at random, and micro-batches, so
# that the test covers the augmented batch being shared out and DDP's accumulation across micro-batches.
# One epoch (39 Adam steps): training LeNet on digits is chaotic, float32 rounding grows. Measured here:
# 1 against 2 processes, 5e-6 after one epoch, 0.05 after three; 1 process on 1 thread against 2 threads
# (another order of summing too), 0.016 after three.
RECIPE = dict(epochs=1, flip=True, translate=2, cutout=4, micro_batch=8)
WEIGHTS_ATOL = 1e-4  # the largest difference of any weight
LOSS_ATOL = 1e-4
ACCURACY_TOLERANCE = 0.005  # one validation image of digits' 216


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def runs(root: Path) -> list:
    client = mlflow.MlflowClient(f"sqlite:///{root / 'store.db'}")
    return client.search_runs([client.get_experiment_by_name("image-classifier").experiment_id])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return prepare_once(tmp_path_factory)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prepared) -> dict[int, tuple[Path, subprocess.CompletedProcess]]:
    """The train stage with train.processes 1 and 2, each on its own copy of the prepared data."""
    done = {}
    for processes in (1, 2):
        root = tmp_path_factory.mktemp(f"processes{processes}")
        shutil.copytree(prepared, root / "data")
        set_params(root, processes=processes, **RECIPE)
        proc = stage(root, "train")
        assert proc.returncode == 0, proc.stderr
        done[processes] = root, proc
    return done


@pytest.mark.integration
def test_two_processes_train_as_one_does(trained):
    (one, _), (two, _) = trained[1], trained[2]
    a, b = load_file(one / "models/model.safetensors"), load_file(two / "models/model.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"largest weight difference, 1 process against 2: {worst:.2e}")
    assert worst <= WEIGHTS_ATOL
    assert any(not a[k].equal(b[k]) for k in a) or worst == 0
    rows = [(one / "metrics/train_history.csv").read_text().splitlines()[1:] for one in (one, two)]
    assert len(rows[0]) == len(rows[1]) == RECIPE["epochs"]  # as many epochs, as many steps
    for x, y in zip(*rows):
        x, y = x.split(","), y.split(",")
        header = (one / "metrics/train_history.csv").read_text().splitlines()[0].split(",")
        for name, u, v in zip(header, x, y):
            tolerance = ACCURACY_TOLERANCE if "accuracy" in name else LOSS_ATOL if "loss" in name else 1e-9
            assert abs(float(u) - float(v)) <= tolerance, (name, u, v)


@pytest.mark.integration
def test_two_processes_make_one_mlflow_run(trained):
    root, proc = trained[2]
    (only,) = runs(root)
    assert only.data.params["train.processes"] == "2"
    assert history(f"sqlite:///{root / 'store.db'}", only.info.run_id) == [1]
    assert only.data.tags["imgclf.weights_sha256"] == sha(root / "models/model.safetensors")
    assert proc.stdout.count("train: lenet, 1 epochs on cpu") == 1  # rank 0 alone reports
    assert proc.stdout.count("Overriding: train.epochs = 1") == 1


@pytest.mark.integration
def test_torchrun_as_the_readme_shows_trains_as_train_processes_does(tmp_path, prepared, trained):
    shutil.copytree(prepared, tmp_path / "data")
    set_params(tmp_path, **RECIPE)  # train.processes: 1, which torchrun's processes override
    command = readme_command("torchrun --standalone")
    assert "--nproc_per_node=2" in command
    run(
        command.replace("torchrun", f"{sys.executable} -m torch.distributed.run", 1),
        tmp_path,
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'store.db'}",
    )
    reference, _ = trained[2]
    assert sha(tmp_path / "models/model.safetensors") == sha(reference / "models/model.safetensors")
    (only,) = runs(tmp_path)
    assert only.data.params["train.processes"] == "2"


@pytest.mark.integration
def test_two_machines_as_the_readme_shows_train_as_two_processes_do(tmp_path, prepared, trained):
    """Two torchrun agents on this host stand for two machines: one rendezvous, one DDP job, one run."""
    shutil.copytree(prepared, tmp_path / "data")
    set_params(tmp_path, threads=1, **RECIPE)  # one thread each, as train.processes 2 takes on 2 cores
    command = readme_command("torchrun --nnodes=2")
    command = command.replace("HOST:29400", f"127.0.0.1:{free_port()}")
    command = command.replace("torchrun", f"{sys.executable} -m torch.distributed.run", 1)
    env = project_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'store.db'}")
    nodes = [
        subprocess.Popen(
            command, shell=True, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert sum(output.count("train: lenet, 1 epochs on cpu") for output in outputs) == 1
    reference, _ = trained[2]
    a, b = load_file(reference / "models/model.safetensors"), load_file(tmp_path / "models/model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= WEIGHTS_ATOL
    (only,) = runs(tmp_path)
    assert only.data.params["train.processes"] == "2"


def ranks(parent: psutil.Process) -> dict[int, psutil.Process]:
    """The training processes torchrun started under `parent`, by rank."""
    found = {}
    for p in parent.children(recursive=True):
        try:
            if "RANK" in (env := p.environ()):
                found[int(env["RANK"])] = p
        except psutil.Error:
            pass
    return found


@pytest.mark.integration
def test_a_killed_rank_fails_the_stage_saying_which_and_keeps_the_checkpoint(tmp_path, prepared):
    shutil.copytree(prepared, tmp_path / "data")
    set_params(tmp_path, processes=2, epochs=20)
    train = subprocess.Popen(
        [sys.executable, "-m", "imgclf.train", "--params", "params.yaml"],
        cwd=tmp_path,
        env=project_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'store.db'}"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    checkpoint = tmp_path / "models/checkpoint/last.pt"
    wait_for(lambda: checkpoint.exists() or train.poll() is not None, 300, "the first epoch")
    ranks(psutil.Process(train.pid))[1].send_signal(signal.SIGKILL)
    _, stderr = train.communicate(timeout=120)
    assert train.returncode == 1
    assert "error: train: training process 1 of 2 was killed by SIGKILL" in stderr
    assert 1 <= torch.load(checkpoint, weights_only=True)["epoch"] < 20
    assert not (tmp_path / "models/model.safetensors").exists()


@pytest.mark.integration
def test_sigkill_of_ddp_training_then_dvc_repro_resumes_to_identical_weights(tmp_path):
    reference = fresh_copy(tmp_path / "reference")
    configure(reference)
    command = readme_command("dvc exp run -S train.processes=2")
    run(f"{command} train", reference)  # the README's experiment, up to the train stage

    root = fresh_copy(tmp_path / "killed")
    configure(root, processes="2")
    repro = repro_until_epoch(root, 3, 300, "train")
    workers = list(ranks(psutil.Process(repro.pid)).values())
    assert len(workers) == 2, "the train stage was not running in two ranks"
    # The stage's own process, which launched the two ranks: their parent. (DVC runs the stage's command
    # through $SHELL, and a shell such as dash stays between DVC and the command instead of exec'ing it.)
    (launcher,) = {p.parent() for p in workers}
    assert "imgclf.train" in " ".join(launcher.cmdline())
    sigkill(repro, [launcher])
    # The ranks die with it (they would otherwise train on, in sessions of their own).
    wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers), 30, "ranks")
    killed_at = torch_epoch(root)
    assert 3 <= killed_at < 10

    proc = run(["dvc", "repro", "train"], root)
    assert f"resuming from the checkpoint of epoch {killed_at} of 10" in proc.stdout
    assert md5(root / "models/model.safetensors") == md5(reference / "models/model.safetensors")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    (only,) = client.search_runs([client.get_experiment_by_name("image-classifier").experiment_id])
    assert history(uri, only.info.run_id) == list(range(1, 11))  # one run, continued, each epoch once
