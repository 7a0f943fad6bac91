"""Image folders: layouts, archives, every kind of bad data, and nothing written on failure."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import default_params, write_params
from imgclf.data import archives, imagefolder
from imgclf.images import ImageError, decode


def image_bytes(fmt: str = "PNG", size=(40, 30), mode: str = "RGB", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def make_folder(root: Path, layout: dict[str, dict[str, int]], fmt: str = "PNG") -> Path:
    """layout: split -> class -> number of images (mixed sizes and modes)."""
    modes = ["RGB", "L", "RGBA"]
    for split, classes in layout.items():
        for name, count in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                mode = modes[i % 3] if fmt == "PNG" else "RGB"
                (folder / f"{i:03d}.{fmt.lower()}").write_bytes(
                    image_bytes(fmt, (20 + i, 30 + 2 * i), mode, seed=hash((split, name, i)) % 2**32)
                )
    return root


def png_with_header_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height: a decompression bomb's calling card."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def run_stages(tmp_path: Path, path: Path | str, monkeypatch, **data) -> int:
    """download + prepare in tmp_path for an image folder; returns the exit code (0 on success)."""
    from imgclf import download, prepare

    params = default_params()
    params["data"].update(dataset="imagefolder", path=str(path), image_size=16, **data)
    params["prepare"].update(workers=2)
    write_params(tmp_path, params)
    monkeypatch.chdir(tmp_path)
    try:
        download.main(["--params", "params.yaml"])
        prepare.main(["--params", "params.yaml"])
    except SystemExit as exit:
        return exit.code
    return 0


BALANCED = {"train": {"cat": 12, "dog": 12, "eel": 6}, "test": {"cat": 3, "dog": 3, "eel": 2}}


@pytest.mark.parametrize("kind", ["folder", "tar", "tar.gz", "zip"])
def test_folder_and_archives_give_the_same_arrays(tmp_path, monkeypatch, kind):
    source = make_folder(tmp_path / "src" / "pets", BALANCED)
    if kind != "folder":
        archive = tmp_path / f"pets.{kind}"
        if kind == "zip":
            with zipfile.ZipFile(archive, "w") as z:
                for p in sorted(source.rglob("*")):
                    z.write(p, f"pets/{p.relative_to(source).as_posix()}")  # wrapped in a top folder
        else:
            with tarfile.open(archive, "w:gz" if kind == "tar.gz" else "w") as tar:
                tar.add(source, arcname="pets")
        source = archive
    work = tmp_path / "work"
    work.mkdir()
    assert run_stages(work, source, monkeypatch) == 0
    prepared = work / "data/prepared"
    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["classes"] == ["cat", "dog", "eel"] and meta["channels"] == 3 and meta["image_size"] == 16
    assert meta["counts"]["test"] == {"cat": 3, "dog": 3, "eel": 2}  # the held-out folder, as it is
    total = sum(meta["counts"]["train"].values()) + sum(meta["counts"]["val"].values())
    assert total == 30
    train = np.load(prepared / "train_images.npy", mmap_mode="r")
    assert train.shape == (sum(meta["counts"]["train"].values()), 16, 16, 3) and train.dtype == np.uint8
    # One archive under data/raw, not thousands of files.
    assert [p.name for p in (work / "data/raw").iterdir()] == [f"images.{'tar' if kind == 'folder' else kind}"]


def test_same_images_whatever_the_container(tmp_path, monkeypatch):
    source = make_folder(tmp_path / "pets", BALANCED)
    results = []
    for kind in ("folder", "zip"):
        work = tmp_path / kind
        work.mkdir()
        path = source
        if kind == "zip":
            path = tmp_path / "pets.zip"
            with zipfile.ZipFile(path, "w") as z:
                for p in sorted(source.rglob("*"), reverse=True):  # another member order
                    z.write(p, p.relative_to(source).as_posix())
        assert run_stages(work, path, monkeypatch) == 0
        results.append({s: np.load(work / f"data/prepared/{s}_images.npy") for s in ("train", "val", "test")})
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(results[0][split], results[1][split])


def test_each_image_is_decoded_like_serving_decodes_it(tmp_path, monkeypatch):
    source = make_folder(tmp_path / "pets", BALANCED)
    assert run_stages(tmp_path, source, monkeypatch) == 0
    test_images = np.load(tmp_path / "data/prepared/test_images.npy")
    files = sorted((source / "test").rglob("*.png"))
    for array, path in zip(test_images, files):
        np.testing.assert_array_equal(array, decode(path.read_bytes(), 16, 3))


def test_without_a_test_folder_a_stratified_test_split_is_carved(tmp_path, monkeypatch):
    source = make_folder(tmp_path / "pets", {"train": {"cat": 20, "dog": 10}})
    assert run_stages(tmp_path, source, monkeypatch) == 0
    meta = json.loads((tmp_path / "data/prepared/meta.json").read_text())
    assert meta["counts"]["test"] == {"cat": 4, "dog": 2}  # prepare.test_fraction 0.2, per class
    report = json.loads((tmp_path / "data/prepared/report.json").read_text())
    assert report["imbalance_max_over_min"]["train"] == pytest.approx(2.0, abs=0.2)  # kept and reported


def test_val_folder_is_the_test_split_when_there_is_no_test(tmp_path, monkeypatch):
    source = make_folder(tmp_path / "pets", {"train": {"a": 10, "b": 10}, "validation": {"a": 2, "b": 1}})
    assert run_stages(tmp_path, source, monkeypatch) == 0
    meta = json.loads((tmp_path / "data/prepared/meta.json").read_text())
    assert meta["counts"]["test"] == {"a": 2, "b": 1}


def test_listing_rules():
    files = [
        "top/train/b/1.png",
        "top/train/a/1.png",
        "top/train/a/2.png",
        "top/test/a/3.png",
        "top/val/b/4.png",
        "top/train/.DS_Store",
        "top/__MACOSX/train/a/._1.png",
        "top/README.txt",
        "top/train/loose.png",
    ]
    listing = imagefolder.list_entries(files, ["top", "top/train", "top/train/a", "top/train/b"])
    assert listing.classes == ["a", "b"]
    assert {(e.name, e.split, e.label) for e in listing.entries} == {
        ("top/train/a/1.png", "train", "a"),
        ("top/train/a/2.png", "train", "a"),
        ("top/train/b/1.png", "train", "b"),
        ("top/test/a/3.png", "test", "a"),
        ("top/val/b/4.png", "val", "b"),
    }
    assert listing.has_test and listing.has_val
    assert {name for name, _ in listing.ignored} == {"top/README.txt", "top/train/loose.png"}
    assert not listing.problems


def test_dot_prefixed_tar_names_work(tmp_path, monkeypatch):
    """`tar czf pets.tar.gz -C pets .` names members ./train/...: the same files."""
    source = make_folder(tmp_path / "pets", BALANCED)
    archive = tmp_path / "pets.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname=".")
    work = tmp_path / "work"
    work.mkdir()
    assert run_stages(work, archive, monkeypatch) == 0
    meta = json.loads((work / "data/prepared/meta.json").read_text())
    assert meta["counts"]["test"] == {"cat": 3, "dog": 3, "eel": 2}


def test_no_train_folder_is_an_error():
    with pytest.raises(imagefolder.DataError, match="no train/ folder"):
        imagefolder.list_entries(["photos/cat/1.jpg", "photos/dog/2.jpg"], [])


# ---- bad data ---------------------------------------------------------------------------------


def bad_folder(root: Path) -> tuple[Path, set[str]]:
    """A usable folder plus one of each kind of bad file; returns it and the bad paths."""
    make_folder(root, {"train": {"cat": 10, "dog": 10}, "test": {"cat": 2, "dog": 2}})
    bad = {
        "train/cat/corrupt.jpg": b"\xff\xd8\xff\xe0 this is not really a JPEG",
        "train/cat/truncated.jpg": image_bytes("JPEG", (64, 64))[:300],
        "train/dog/notes.txt": b"a text file where an image should be",
        "train/dog/bomb.png": png_with_header_size(100_000, 100_000),
        "test/unicorn/u.png": image_bytes(),
    }
    for name, data in bad.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "train" / "empty").mkdir()
    return root, set(bad) | {"train/empty/"}


def test_bad_data_fails_listing_every_bad_file_and_writes_nothing(tmp_path, monkeypatch, capsys):
    source, bad = bad_folder(tmp_path / "pets")
    work = tmp_path / "work"
    work.mkdir()
    assert run_stages(work, source, monkeypatch) == 1
    err = capsys.readouterr().err
    for name in bad:
        assert name in err, name
    assert "empty class folder" in err and "class 'unicorn' is not in train/" in err
    assert "over the limit" in err and "data.on_bad_image: skip" in err
    assert not (work / "data/prepared").exists()
    assert sorted(p.name for p in (work / "data").iterdir()) == ["raw"]  # no staging folder left


def test_bad_data_skipped_and_reported(tmp_path, monkeypatch):
    source, bad = bad_folder(tmp_path / "pets")
    assert run_stages(tmp_path, source, monkeypatch, on_bad_image="skip") == 0
    prepared = tmp_path / "data/prepared"
    report = json.loads((prepared / "report.json").read_text())
    assert {entry["file"] for entry in report["skipped"]} == bad
    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["classes"] == ["cat", "dog"]
    assert sum(meta["counts"][s][c] for s in ("train", "val") for c in ("cat", "dog")) == 20
    n_train = sum(meta["counts"]["train"].values())
    assert np.load(prepared / "train_images.npy").shape[0] == n_train == len(np.load(prepared / "train_labels.npy"))


def test_fewer_than_two_classes_is_an_error_even_when_skipping(tmp_path, monkeypatch, capsys):
    source = make_folder(tmp_path / "pets", {"train": {"cat": 5}})
    (source / "train" / "dog").mkdir()
    assert run_stages(tmp_path, source, monkeypatch, on_bad_image="skip") == 1
    assert "at least 2" in capsys.readouterr().err
    assert not (tmp_path / "data/prepared").exists()


def test_missing_path_is_a_clear_error(tmp_path, monkeypatch, capsys):
    assert run_stages(tmp_path, tmp_path / "nowhere", monkeypatch) == 1
    assert "data.path: no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "data/raw").exists()


def test_truncated_archive_is_a_clear_error(tmp_path, monkeypatch, capsys):
    source = make_folder(tmp_path / "pets", BALANCED)
    archive = tmp_path / "pets.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname=".")
    archive.write_bytes(archive.read_bytes()[:2000])
    work = tmp_path / "work"
    work.mkdir()
    assert run_stages(work, archive, monkeypatch) == 1
    assert "archive" in capsys.readouterr().err
    assert not (work / "data/prepared").exists()


@pytest.mark.parametrize(
    "side, message",
    [
        (10_000, "10000x10000 is 100,000,000 pixels, over the limit of 40,000,000"),  # our limit
        # Beyond Pillow's own backstop as well: the message still names our limit, not Pillow's.
        (20_000, "more than 178,956,970 pixels, over the limit of 40,000,000"),
    ],
)
def test_a_decompression_bomb_is_refused_from_its_header_in_milliseconds(side, message):
    bomb = png_with_header_size(side, side)
    assert len(bomb) < 200
    start = time.perf_counter()
    with pytest.raises(ImageError, match=message):
        decode(bomb, 32, 3, max_pixels=40_000_000)
    assert time.perf_counter() - start < 0.5  # nothing was allocated for the pixels


def test_every_file_is_decoded_exactly_once(tmp_path):
    source = make_folder(tmp_path / "pets", BALANCED)
    archive_path = tmp_path / "pets.tar"
    archives.pack_folder(source, archive_path)
    archive = archives.Archive(archive_path, 10**9)
    listing = imagefolder.list_entries(*archive.listing())
    plan = {e.name: ("all", row) for row, e in enumerate(listing.entries)}
    arrays = {"all": np.zeros((len(plan), 8, 8, 3), np.uint8)}
    progress = []
    errors = imagefolder.decode_into(
        archive, plan, arrays, 8, 3, 10**6, workers=2, chunk_size=4, on_progress=progress.append
    )
    assert errors == [] and sum(progress) == len(plan) == 38
    assert (arrays["all"].reshape(len(plan), -1).max(axis=1) > 0).all()  # every row written


def test_packing_a_folder_is_reproducible(tmp_path):
    source = make_folder(tmp_path / "pets", BALANCED)
    archives.pack_folder(source, tmp_path / "a.tar")
    time.sleep(1.1)
    (source / "train" / "cat" / "000.png").touch()  # a new mtime changes nothing
    archives.pack_folder(source, tmp_path / "b.tar")
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
