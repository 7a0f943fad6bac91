"""Pretrained weights as torchvision users name them: downloaded by torch.hub's own code (from a local
HTTP server this test starts) into torch's cache, hash-checked, used from the cache afterwards; and the
train stage stopping with exit code 2, before any work, on weights it cannot use."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import threading

import pytest
import torch
import yaml

from conftest import card_for, default_params, free_port, run, write_params
from imgclf.models import build, cached_weights_file


@pytest.fixture
def served(tmp_path):
    """A folder served over HTTP on 127.0.0.1, and the server (stop it to go offline)."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, server
    server.shutdown()
    server.server_close()


def state_bytes(model_name: str = "mobilenet_v3_small") -> tuple[torch.nn.Module, bytes]:
    from torchvision.models import get_model

    torch.manual_seed(1)
    net = get_model(model_name, weights=None)
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    return net, buffer.getvalue()


def test_weights_from_a_url_are_downloaded_once_into_torchs_cache_with_their_hash_checked(
    served, tmp_path, monkeypatch
):
    folder, server = served
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    source, data = state_bytes()
    name = f"small-{hashlib.sha256(data).hexdigest()[:8]}.pth"  # torch.hub's name-<sha256 prefix>.pth
    (folder / name).write_bytes(data)
    url = f"http://127.0.0.1:{server.server_address[1]}/{name}"
    model = build(card_for("torchvision:mobilenet_v3_small", classes=4), pretrained=url)
    torch.testing.assert_close(model.net.features[0][0].weight, source.features[0][0].weight)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / name
    assert cached_weights_file(url) == cached and cached.read_bytes() == data
    server.shutdown()  # offline from here: the cache serves it
    again = build(card_for("torchvision:mobilenet_v3_small", classes=4), pretrained=url)
    torch.testing.assert_close(again.net.features[0][0].weight, source.features[0][0].weight)


def test_a_download_whose_hash_does_not_match_is_refused_and_not_cached(served, tmp_path, monkeypatch):
    folder, server = served
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    _, data = state_bytes()
    (folder / "small-00000000.pth").write_bytes(data)
    url = f"http://127.0.0.1:{server.server_address[1]}/small-00000000.pth"
    with pytest.raises(ValueError, match=f"train.pretrained: {url}: the file downloaded from {url} is corrupt"):
        build(card_for("torchvision:mobilenet_v3_small"), pretrained=url)
    assert not cached_weights_file(url).exists()


# ---- the train stage, in a process of its own ----------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A folder with the digits prepared as 32x32 RGB, for a torchvision model."""
    root = tmp_path_factory.mktemp("pretrained")
    params = default_params()
    params["data"].update(channels=3)
    write_params(root, params)
    run(["python", "-m", "imgclf.download", "--params", "params.yaml"], root)
    run(["python", "-m", "imgclf.prepare", "--params", "params.yaml"], root)
    return root


def train_with(root, pretrained: str, **env: str):
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update(model="torchvision:mobilenet_v3_small", pretrained=pretrained, epochs=1)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return run(["python", "-m", "imgclf.train", "--params", "params.yaml"], root, check=False, **env)


def nothing_written(root) -> bool:
    return not (root / "models").exists() and not (root / "mlflow.db").exists()


def test_an_unknown_weights_name_exits_2_naming_key_model_and_the_names_there_are(prepared):
    proc = train_with(prepared, "IMAGENET1K_V9")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(
        "error: train.pretrained: torchvision has no weights 'IMAGENET1K_V9' for torchvision:mobilenet_v3_small "
        "(it has: DEFAULT, IMAGENET1K_V1)"
    )
    assert nothing_written(prepared)


def test_a_state_dict_that_does_not_fit_exits_2_naming_the_layers(prepared):
    from torchvision.models import get_model

    torch.save(get_model("resnet18", weights=None).state_dict(), prepared / "resnet18.pth")
    proc = train_with(prepared, "resnet18.pth")
    assert proc.returncode == 2, proc.stderr
    assert "error: train.pretrained: resnet18.pth does not fit torchvision:mobilenet_v3_small: " in proc.stderr
    assert "missing from the file: features.0.0, features.0.1" in proc.stderr
    assert "not in the model: conv1, bn1, layer1.0.conv1" in proc.stderr
    assert nothing_written(prepared)


def test_offline_a_weights_name_not_in_the_cache_says_which_file_to_put_where(prepared, tmp_path):
    from torchvision.models import MobileNet_V3_Small_Weights

    # No network: every HTTPS request goes to a proxy nothing listens on.
    dead = f"http://127.0.0.1:{free_port()}"
    proc = train_with(
        prepared, "DEFAULT", TORCH_HOME=str(tmp_path / "torch"), https_proxy=dead, HTTPS_PROXY=dead, no_proxy=""
    )
    assert proc.returncode == 2, proc.stderr
    url = MobileNet_V3_Small_Weights.DEFAULT.url
    cached = tmp_path / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    assert proc.stderr.startswith(
        "error: train.pretrained: DEFAULT (MobileNet_V3_Small_Weights.IMAGENET1K_V1) for "
        f"torchvision:mobilenet_v3_small is not in torch's cache and could not be downloaded from {url} ("
    )
    assert f"download that file elsewhere and put it at {cached} " in proc.stderr
    assert nothing_written(prepared) and not cached.exists()
