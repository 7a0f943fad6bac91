"""CIFAR-10/100 archives: built tiny, in the official python format, as torchvision's own tests do."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import pickle
import shutil
import tarfile
import threading
from functools import partial

import numpy as np
import pytest

from imgclf.data import cifar
from imgclf.data.types import DataError, RawData
from imgclf.evaluate import report


def _pickled(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)


def build_archive(tmp_path, dataset: str, per_batch: int = 6, classes: int = 10):
    """A tiny archive in the CIFAR python format and the spec that accepts it."""
    official = cifar.spec(dataset)
    rng = np.random.default_rng(0)
    files, expected = {}, {"train": [], "test": []}
    for split, names in (("train", official.train), ("test", official.test)):
        for k, (name, _) in enumerate(names):
            data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
            labels = [(i + k) % classes for i in range(per_batch)]  # every class present
            batch = {"data": data}
            if dataset == "cifar10":
                batch["labels"] = labels
            else:
                batch["fine_labels"] = labels
                batch["coarse_labels"] = [label % 4 for label in labels]
            files[name] = _pickled(batch)
            expected[split].append((data, labels))
    if dataset == "cifar10":
        files[official.meta_file] = _pickled({"label_names": [f"c{i}" for i in range(classes)]})
    else:
        files[official.meta_file] = _pickled(
            {"fine_label_names": [f"f{i}" for i in range(classes)], "coarse_label_names": [f"k{i}" for i in range(4)]}
        )
    path = tmp_path / official.filename
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(f"{official.folder}/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    md5 = lambda b: hashlib.md5(b).hexdigest()  # noqa: E731
    spec = dataclasses.replace(
        official,
        md5=cifar.md5_of(path),
        train=[(n, md5(files[n])) for n, _ in official.train],
        test=[(n, md5(files[n])) for n, _ in official.test],
    )
    return path, spec, expected


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_read_gives_hwc_images_labels_and_classes(tmp_path, dataset):
    path, spec, expected = build_archive(tmp_path, dataset)
    raw = cifar.read(spec, path)
    images, labels = raw.splits["train"]
    assert images.shape == (6 * len(spec.train), 32, 32, 3) and images.dtype == np.uint8
    first_data, first_labels = expected["train"][0]
    # CIFAR stores each image as 1024 red, then 1024 green, then 1024 blue values, row-major.
    np.testing.assert_array_equal(images[0, :, :, 0].ravel(), first_data[0, :1024])
    np.testing.assert_array_equal(images[0, :, :, 2].ravel(), first_data[0, 2048:])
    assert labels[:6].tolist() == first_labels
    assert raw.splits["test"][0].shape == (6, 32, 32, 3)
    assert raw.classes[0] == ("c0" if dataset == "cifar10" else "f0")


def test_cifar100_coarse_labels(tmp_path):
    path, spec, expected = build_archive(tmp_path, "cifar100")
    raw = cifar.read(spec, path, labels="coarse")
    assert raw.classes == ["k0", "k1", "k2", "k3"]
    assert raw.splits["train"][1].tolist() == [label % 4 for label in expected["train"][0][1]]


def test_archive_is_verified_then_copied(tmp_path):
    path, spec, _ = build_archive(tmp_path, "cifar10")
    dest = tmp_path / "staging"
    dest.mkdir()
    assert cifar.fetch(spec, dest, str(path)).read_bytes() == path.read_bytes()


def test_wrong_checksum_is_refused_before_anything_is_copied(tmp_path):
    path, _, _ = build_archive(tmp_path, "cifar10")
    dest = tmp_path / "staging"
    dest.mkdir()
    with pytest.raises(DataError, match="MD5.*must have MD5 c58f30108f718f92721af3b95e74349a"):
        cifar.fetch(cifar.spec("cifar10"), dest, str(path))  # the official checksum
    assert list(dest.iterdir()) == []


def test_truncated_archive_is_refused(tmp_path):
    path, spec, _ = build_archive(tmp_path, "cifar10")
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    dest = tmp_path / "staging"
    dest.mkdir()
    with pytest.raises(DataError, match="truncated, corrupt or not the official archive"):
        cifar.fetch(spec, dest, str(truncated))
    with pytest.raises(DataError, match="MD5"):
        cifar.read(spec, truncated)  # prepare checks again before unpacking anything
    assert list(dest.iterdir()) == []


def test_missing_archive_names_the_key(tmp_path):
    with pytest.raises(DataError, match="data.archive: no such file"):
        cifar.fetch(cifar.spec("cifar10"), tmp_path, str(tmp_path / "nope.tar.gz"))


def test_pickled_code_in_a_batch_is_refused(tmp_path):
    official = cifar.spec("cifar10")
    payload = pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [0], "x": print}, protocol=2)
    path = tmp_path / official.filename
    with tarfile.open(path, "w:gz") as tar:
        for name in [n for n, _ in official.train + official.test] + [official.meta_file]:
            info = tarfile.TarInfo(f"{official.folder}/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    spec = dataclasses.replace(
        official,
        md5=cifar.md5_of(path),
        train=[(n, None) for n, _ in official.train],
        test=[(n, None) for n, _ in official.test],
    )
    with pytest.raises(DataError, match=r"refusing to load (__builtin__|builtins)\.print"):
        cifar.read(spec, path)


@pytest.fixture
def http_server(tmp_path):
    """A real HTTP server on loopback serving files from tmp_path/www."""
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_verifies_and_keeps_the_archive(tmp_path, http_server):
    root, url = http_server
    path, spec, _ = build_archive(tmp_path, "cifar10")
    (root / spec.filename).write_bytes(path.read_bytes())
    dest = tmp_path / "staging"
    dest.mkdir()
    got = cifar.fetch(dataclasses.replace(spec, url=f"{url}/{spec.filename}"), dest, None)
    assert got.read_bytes() == path.read_bytes()


def test_partial_download_leaves_no_file_and_says_what_to_do(tmp_path, http_server):
    root, url = http_server
    path, spec, _ = build_archive(tmp_path, "cifar10")
    (root / spec.filename).write_bytes(path.read_bytes()[:1000])  # the connection "dropped" mid-file
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(DataError, match="set data.archive"):
        cifar.fetch(dataclasses.replace(spec, url=f"{url}/{spec.filename}"), staging, None)


def test_no_network_gives_a_clear_error(tmp_path):
    import socket

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = dataclasses.replace(cifar.spec("cifar10"), url=f"http://127.0.0.1:{port}/cifar-10-python.tar.gz")
    with pytest.raises(DataError, match=r"could not download .*set data.archive to its path .*c58f3010"):
        cifar.fetch(spec, tmp_path, None, timeout=5)
    assert list(tmp_path.iterdir()) == []


def test_download_stage_leaves_nothing_at_raw_dir_on_failure(tmp_path, monkeypatch):
    from imgclf.config import DataConfig
    from imgclf.download import download

    monkeypatch.chdir(tmp_path)
    cfg = DataConfig(
        dataset="cifar10",
        path=None,
        archive=str(tmp_path / "missing.tar.gz"),
        cifar100_labels="fine",
        image_size=None,
        channels=None,
        on_bad_image="fail",
        max_pixels=10**8,
        max_archive_bytes=10**9,
        raw_dir="data/raw",
    )
    with pytest.raises(DataError):
        download(cfg)
    assert not (tmp_path / "data/raw").exists()
    assert list((tmp_path / "data").iterdir()) == []  # no staging folder left either


def test_top5_accuracy_joins_the_metrics_over_10_classes():
    rng = np.random.default_rng(0)
    probs = rng.random((50, 20))
    labels = rng.integers(0, 20, 50)
    metrics = report(labels, probs, [str(i) for i in range(20)]).metrics
    top5 = np.mean([label in np.argsort(row)[-5:] for label, row in zip(labels, probs)])
    assert metrics["top5_accuracy"] == pytest.approx(top5, abs=1e-6)
    assert "top5_accuracy" not in report(labels % 10, probs[:, :10], [str(i) for i in range(10)]).metrics


def test_prepare_keeps_the_official_test_split(tmp_path):
    from conftest import default_params, write_params
    from imgclf.config import load_params
    from imgclf.prepare import prepare_arrays

    path, spec, _ = build_archive(tmp_path, "cifar10", per_batch=20)
    params = default_params()
    params["data"].update(dataset="cifar10", image_size=None)
    params_file = write_params(tmp_path, params)
    raw: RawData = cifar.read(spec, path)
    out = tmp_path / "prepared"
    out.mkdir()
    meta = prepare_arrays(raw, load_params(params_file), out)
    assert meta["image_size"] == 32 and meta["channels"] == 3
    np.testing.assert_array_equal(np.load(out / "test_images.npy"), raw.splits["test"][0])
    assert sum(meta["counts"]["train"].values()) + sum(meta["counts"]["val"].values()) == 100
    assert sum(meta["counts"]["val"].values()) == 15  # prepare.val_fraction of the training images


@pytest.mark.integration
def test_readme_cifar_command_refuses_a_wrong_archive_and_keeps_nothing(tmp_path):
    """The README's CIFAR-10 line, with a file that is not the official archive at that path."""
    from conftest import fresh_copy, readme_command, run

    root = fresh_copy(tmp_path / "project")
    path, _, _ = build_archive(tmp_path, "cifar10")
    (root / "downloads").mkdir()
    shutil.copy(path, root / "downloads" / "cifar-10-python.tar.gz")
    command = readme_command("dvc exp run -S data.dataset=cifar10")
    proc = run(command, root, check=False)
    assert proc.returncode != 0
    assert "must have MD5 c58f30108f718f92721af3b95e74349a" in proc.stdout + proc.stderr
    assert not (root / "data" / "raw").exists()
