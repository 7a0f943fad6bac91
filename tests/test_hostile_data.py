"""Archives, params files and kills that attack the data stages, against the real stage processes:
refused in seconds within bounded memory, with a message naming the entry or the line, nothing left behind."""

from __future__ import annotations

import io
import json
import os
import resource
import signal
import stat
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import psutil
import pytest

from bombs import GiB, tar_gz_bomb, zip_bomb
from conftest import (
    default_params,
    default_text,
    fresh_copy,
    project_env,
    readme_command,
    run,
    wait_for,
    write_params,
)
from imgclf.config import ConfigError, load_params
from imgclf.data import archives
from test_imagefolder import image_bytes, make_folder

# Address space of each stage process in these tests: an entry of 2 GiB read whole cannot fit in it.
MEMORY_CAP = 2 * GiB


def _cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def stage(root: Path, name: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m imgclf.<name> --params params.yaml` in `root`, its memory capped."""
    return subprocess.run(
        [sys.executable, "-m", f"imgclf.{name}", "--params", "params.yaml"],
        cwd=root,
        env=project_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=_cap_memory,
    )


def imagefolder_project(root: Path, source: Path, **data) -> Path:
    params = default_params()
    params["data"].update(dataset="imagefolder", path=str(source), image_size=16, **data)
    params["prepare"].update(workers=2)
    write_params(root, params)
    return root


def leftovers(root: Path) -> list[str]:
    """What prepare left under data/ besides the raw data."""
    return sorted(p.name for p in (root / "data").iterdir() if p.name != "raw")


PETS = {f"pets/train/{c}/{i}.png": image_bytes(seed=i + 10 * k) for k, c in enumerate(("cat", "dog")) for i in range(6)}


# ---- decompression bombs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, message",
    [
        ("zip", "pets/train/cat/bomb.png expands to 2,147,483,648 bytes, over data.max_archive_bytes"),
        ("tar.gz", "pets/train/cat/bomb.png expands to 2,147,483,648 bytes, over data.max_archive_bytes"),
        # A GNU long-name header that tarfile itself would read whole into memory.
        ("tar.gz-longname", "a tar metadata header (././@LongLink) of 2,147,483,648 bytes"),
    ],
)
def test_a_2_gib_bomb_is_refused_in_seconds_naming_its_entry(tmp_path, kind, message):
    if kind == "zip":
        bomb = zip_bomb(tmp_path / "pets.zip", "pets/train/cat/bomb.png", 2 * GiB, PETS)
    elif kind == "tar.gz":
        bomb = tar_gz_bomb(tmp_path / "pets.tar.gz", "pets/train/cat/bomb.png", 2 * GiB, PETS)
    else:
        bomb = tar_gz_bomb(tmp_path / "pets.tar.gz", "././@LongLink", 2 * GiB, PETS, kind=tarfile.GNUTYPE_LONGNAME)
    assert bomb.stat().st_size < 3 * 2**20  # 2 MB on disk
    root = imagefolder_project(tmp_path / "project", bomb)
    assert stage(root, "download").returncode == 0  # a copy of the archive: nothing is inflated
    start = time.monotonic()
    proc = stage(root, "prepare")
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert leftovers(root) == []  # no output, no staging folder
    assert elapsed < 120  # the process's start-up (imports) included; the refusal itself takes milliseconds


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_the_limit_counts_every_file_of_the_archive(tmp_path, kind):
    path = tmp_path / f"pets.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(path, "w") as z:
            for name, data in PETS.items():
                z.writestr(name, data)
    else:
        with tarfile.open(path, "w") as tar:
            for name, data in PETS.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    total = sum(len(data) for data in PETS.values())
    exact = archives.Archive(path, total)
    assert sorted(exact.listing().files) == sorted(PETS)
    assert dict(exact.read(set(PETS))) == PETS
    last = list(PETS)[-1]
    with pytest.raises(archives.ArchiveTooLarge, match=f"{last} expands to .* archive's files to {total:,}"):
        archives.Archive(path, total - 1).listing()
    # Reading counts the bytes too (an archive read without listing it first).
    with pytest.raises(archives.ArchiveTooLarge, match=last):
        list(archives.Archive(path, total - 1).read(set(PETS)))


def test_the_limit_is_a_params_key(tmp_path):
    params = default_params()
    params["data"]["max_archive_bytes"] = 0
    with pytest.raises(ConfigError, match=r"data.max_archive_bytes: must be >= 1"):
        load_params(write_params(tmp_path, params))
    params["data"].pop("max_archive_bytes")
    with pytest.raises(ConfigError, match=r"data.max_archive_bytes: missing key"):
        load_params(write_params(tmp_path, params))


def test_batch_prediction_refuses_a_bomb_too(tmp_path):
    from imgclf.predict import iter_files

    bomb = zip_bomb(tmp_path / "photos.zip", "photos/big.png", 2 * GiB, {"photos/a.png": image_bytes()})
    files = iter_files(bomb)
    with pytest.raises(archives.ArchiveTooLarge, match=r"photos/big.png expands to .* over --max-archive-bytes"):
        next(files)
    raised = iter_files(bomb, max_archive_bytes=3 * GiB)
    assert next(raised)[0] == "photos/a.png"  # only the first file read: the limit decides, nothing else
    raised.close()


# ---- entries that are never read, and are listed ------------------------------------------------


def test_links_devices_and_dotdot_paths_are_skipped_and_listed_in_the_report(tmp_path):
    source = make_folder(tmp_path / "pets", {"train": {"cat": 8, "dog": 8}, "test": {"cat": 2, "dog": 2}})
    archive = tmp_path / "pets.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(source, arcname="pets")

        def special(name: str, kind: bytes, linkname: str = "", data: bytes = b"") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.size = kind, linkname, len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)

        special("pets/train/cat/link.png", tarfile.SYMTYPE, "../../../../etc/passwd")
        special("pets/train/dog/hard.png", tarfile.LNKTYPE, "pets/train/dog/000.png")
        special("pets/train/cat/tty.png", tarfile.CHRTYPE)
        special("pets/train/dog/pipe.png", tarfile.FIFOTYPE)
        special("pets/train/cat/../../../evil.png", tarfile.REGTYPE, data=image_bytes())
    root = imagefolder_project(tmp_path / "project", archive)  # on_bad_image: fail, as shipped
    assert stage(root, "download").returncode == 0
    proc = stage(root, "prepare")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((root / "data/prepared/report.json").read_text())
    reasons = {entry["file"]: entry["reason"] for entry in report["skipped"]}
    assert reasons == {
        "pets/train/cat/link.png": "a symbolic link (to ../../../../etc/passwd): links are not followed",
        "pets/train/dog/hard.png": "a hard link (to pets/train/dog/000.png): links are not followed",
        "pets/train/cat/tty.png": "a device file, not a regular file",
        "pets/train/dog/pipe.png": "a FIFO, not a regular file",
        "pets/train/cat/../../../evil.png": "its path climbs out of the archive (..)",
    }
    meta = json.loads((root / "data/prepared/meta.json").read_text())
    assert sum(meta["counts"]["train"].values()) + sum(meta["counts"]["val"].values()) == 16  # the real images


def test_zip_links_and_dotdot_paths_are_skipped_and_listed(tmp_path):
    path = tmp_path / "pets.zip"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in PETS.items():
            z.writestr(name, data)
        link = zipfile.ZipInfo("pets/train/cat/link.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(link, "/etc/passwd")
        z.writestr("pets/../evil.png", image_bytes())
    contents = archives.Archive(path, 10**9).listing()
    assert sorted(contents.files) == sorted(PETS)
    assert dict(contents.skipped) == {
        "pets/train/cat/link.png": "a symbolic link: links are not followed",
        "pets/../evil.png": "its path climbs out of the archive (..)",
    }


# ---- YAML aliases ------------------------------------------------------------------------------


def billion_laughs(levels: int = 9, width: int = 9) -> str:
    """One flow list whose last item is width**levels strings, built from `levels` anchors (a few hundred bytes)."""
    items = [f"&l0 [{', '.join(['lol'] * width)}]"]
    items += [f"&l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return f"[{', '.join(items)}]"


def aliased_params(root: Path, levels: int = 9) -> Path:
    write_params(root)
    text = default_text("params.yaml")
    assert "\n  path: null" in text
    (root / "params.yaml").write_text(text.replace("\n  path: null", f"\n  path: {billion_laughs(levels)}", 1))
    return root


def test_a_billion_laughs_in_params_exits_2_in_seconds(tmp_path):
    root = aliased_params(tmp_path)
    assert len((root / "params.yaml").read_bytes()) < 10_000
    start = time.monotonic()
    proc = stage(root, "prepare", timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = next(i for i, text in enumerate((root / "params.yaml").read_text().splitlines(), 1) if "&l0" in text)
    assert (
        f"params.yaml: line {line}: YAML anchor &l0: anchors and aliases are not allowed in params files" in proc.stderr
    )
    assert elapsed < 120  # start-up included


def test_the_readme_check_refuses_aliases_before_dvc_reads_the_file(tmp_path):
    """DVC expands aliases in params.yaml itself before any stage runs (9**6 strings: minutes and 400 MB);
    the README's check, which `make run` runs before `dvc repro`, refuses them in seconds."""
    check = readme_command("python -m imgclf.config").split()
    root = write_params(tmp_path / "shipped").parent
    assert run(check, root).returncode == 0
    aliased = aliased_params(tmp_path / "aliased")
    proc = run(check, aliased, check=False, timeout=120)
    assert proc.returncode == 2 and "YAML anchor &l0" in proc.stderr


@pytest.mark.integration
def test_make_run_stops_at_aliased_params_before_dvc(tmp_path):
    venv = Path(sys.prefix)
    if not (venv / ".installed").is_file():
        pytest.skip(f"{venv} was not made by `make` (no .installed marker), so `make run` would rebuild it")
    root = aliased_params(fresh_copy(tmp_path / "project"))
    installed = (venv / ".installed").stat().st_mtime
    for name in ("requirements.txt", "pyproject.toml"):  # as in test_pipeline: make must not reinstall
        os.utime(root / name, (installed - 1, installed - 1))
    proc = run(["make", "run", f"VENV={venv}"], root, check=False, timeout=120)
    assert proc.returncode != 0 and "YAML anchor &l0" in proc.stderr
    assert "dvc repro" not in proc.stdout  # make stopped before it


def test_a_lone_alias_is_refused_too(tmp_path):
    write_params(tmp_path)
    text = default_text("params.yaml").replace("  seed: 0\n  workers", "  seed: &s 0\n  workers", 1)
    text = text.replace("  seed: 0\n  device", "  seed: *s\n  device", 1)
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"YAML anchor &s"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text(text.replace("&s 0", "0"))
    with pytest.raises(ConfigError, match=r"line \d+: YAML alias \*s"):
        load_params(tmp_path / "params.yaml")


# ---- killed mid-decoding -----------------------------------------------------------------------


def slow_images(root: Path, per_class: int = 300) -> Path:
    """An image folder that takes seconds to decode: 2,000 x 2,000 blank PNGs of a few kB each."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (2000, 2000), (90, 120, 200)).save(buffer, format="PNG")
    for name in ("a", "b"):
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            (folder / f"{i:04d}.png").write_bytes(buffer.getvalue())
    return root


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killing_prepare_mid_decoding_leaves_no_worker_and_no_staging_folder(tmp_path, sig):
    root = imagefolder_project(tmp_path / "project", slow_images(tmp_path / "slow"))
    assert stage(root, "download").returncode == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgclf.prepare", "--params", "params.yaml"],
        cwd=root,
        env=project_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    workers: list[int] = []
    try:
        parent = psutil.Process(proc.pid)
        wait_for(lambda: len(parent.children()) >= 2 or proc.poll() is not None, 120, "the decoding workers")
        workers = [child.pid for child in parent.children()]
        time.sleep(1.0)  # decoding under way
        assert proc.poll() is None, "prepare ended before it could be killed: give it more images"
        assert [p.name for p in (root / "data").glob(".prepared-*")], "no staging folder while decoding"
        os.kill(proc.pid, sig)
        proc.wait(timeout=30)
        wait_for(lambda: not any(alive(pid) for pid in workers), 10, "the workers to die with prepare")
    finally:
        for pid in [proc.pid, *workers]:  # whatever happened, leave nothing running
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == (-sig if sig == signal.SIGKILL else 128 + sig)
    stale = [p.name for p in (root / "data").glob(".prepared-*")]
    if sig == signal.SIGTERM:
        assert stale == []  # cleaned up at once, as on Ctrl-C
    else:
        assert len(stale) == 1  # a killed process cannot clean up: the next run does
    # The next run (of a small folder, to be quick) removes what the killed one left.
    imagefolder_project(root, make_folder(tmp_path / "small", {"train": {"a": 5, "b": 5}}))
    assert stage(root, "download").returncode == 0
    rerun = stage(root, "prepare")
    assert rerun.returncode == 0, rerun.stderr
    assert leftovers(root) == ["prepared"]
    if stale:
        assert f"removed data/.prepared-{stale[0].split('-', 1)[1]}, left by an interrupted run" in rerun.stderr
