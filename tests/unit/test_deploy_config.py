"""The container's config.properties, the probe's reading of it, and the Containerfile's targets (pure, fast)."""

from __future__ import annotations

import importlib.util
import re

import pytest

from serve_config.control import read_properties
from serve_config.cluster import bundle as bd
from serve_config.cluster import image as im


def properties(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("probe", im.OPT_SERVE["probe.py"])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_container_config_listens_where_the_pod_needs_and_keeps_the_rest_of_the_template():
    template, config = read_properties(bd.TEMPLATE), properties(bd.container_config(im.STORE_IN_IMAGE))
    assert config["inference_address"] == "http://0.0.0.0:8080" and config["metrics_address"] == "http://0.0.0.0:8082"
    assert config["management_address"] == "http://127.0.0.1:8081"  # only the probes, inside the pod
    assert config["grpc_management_address"] == "127.0.0.1" and config["grpc_inference_address"] == "0.0.0.0"
    assert config["disable_token_authorization"] == "true" and config["enable_model_api"] == "false"
    assert config["enable_envvars_config"] == "true" and config["load_models"] == "all"
    assert "model_snapshot" not in config and config["model_store"] == str(im.STORE_IN_IMAGE)
    changed = {k for k in template if template[k] != config[k]}
    assert changed <= {"inference_address", "management_address", "metrics_address", "grpc_inference_address",
                       "grpc_management_address", "grpc_inference_port", "grpc_management_port", "model_store",
                       "allowed_urls", "plugins_path", *bd.CONTAINER}
    # the frontend's OIP plugin as the image lays it out, and its agent (handlers/frontend)
    assert config["plugins_path"] == str(bd.IMAGE_DIR / "plugins")
    assert config["vmargs"].endswith(f"-javaagent:{bd.IMAGE_DIR / 'plugins' / 'oip-endpoint.jar'}")


def test_the_probe_follows_the_environment_only_where_the_server_does(probe, tmp_path, monkeypatch):
    config = tmp_path / "config.properties"
    config.write_text("management_address=http://0.0.0.0:9081\ndisable_token_authorization=true\n")
    monkeypatch.setenv("TS_MANAGEMENT_ADDRESS", "http://127.0.0.1:7777")
    monkeypatch.setenv("TS_DISABLE_TOKEN_AUTHORIZATION", "false")
    values = probe.settings(config)
    assert probe.local(values["management_address"]) == "http://127.0.0.1:9081" and probe.key(values, "management") is None
    config.write_text(config.read_text() + "enable_envvars_config=true\n")
    values = probe.settings(config)
    assert values["management_address"] == "http://127.0.0.1:7777"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(probe.ProbeError, match="token authorization is on"):
        probe.key(values, "management")
    (tmp_path / "key_file.json").write_text('{"management": {"key": "m-key"}, "inference": {"key": "i-key"}}')
    assert probe.key(values, "management") == "m-key"


def test_a_probe_against_nothing_fails_with_one_line(probe, tmp_path, capsys):
    config = tmp_path / "config.properties"
    config.write_text("inference_address=http://127.0.0.1:9\nmanagement_address=http://127.0.0.1:9\n"
                      "disable_token_authorization=true\n")
    for check in ("live", "ready"):
        assert probe.main([check, "--config", str(config), "--timeout", "2"]) == 1
        assert capsys.readouterr().out.startswith(f"not {check}: ")


def test_the_containerfile_builds_cpu_by_default_and_cuda_on_request():
    text = (im.HERE / "Containerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\w+)$", text, re.M)
    assert stages[-1] == "cpu" and "cuda" in stages
    cuda = text[text.index("AS cuda"):text.index("AS cpu")]
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in cuda
    assert re.search(r"^USER 1000:1000$", text, re.M) and "ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim" in text
    env = im.containerfile_env()
    assert env["PATH"].startswith("/opt/venv/bin:") and env["TS_CONFIG_FILE"] == "/opt/serve/config.properties"


def test_package_indexes_reach_the_image_build_as_a_secret_never_as_an_argument(tmp_path, monkeypatch):
    """An index URL may carry credentials: it goes to `podman build` in a mode-600 secret file, which the
    Containerfile mounts for one RUN, not as a --build-arg (kept in the image's history)."""
    mirror = "https://builder:s3cret@mirror.example/simple"
    settings = {"global.extra-index-url": [mirror, "file:///srv/pypi/simple"], "global.find-links": ["/srv/wheels"]}
    monkeypatch.setattr(im, "pip_setting", lambda key: settings.get(key, []))
    args, volumes = im.build_arguments(tmp_path / "secrets")
    assert not [a for a in args + volumes if "s3cret" in a or "mirror.example" in a], args
    secret = tmp_path / "secrets" / "pip_indexes"
    assert args[args.index("--secret") + 1] == f"id=pip_indexes,src={secret}"
    assert secret.stat().st_mode & 0o777 == 0o600
    assert secret.read_text().splitlines() == [f"index {mirror}", "index file:///srv/pypi/simple", "links /srv/wheels"]
    containerfile = (im.HERE / "Containerfile").read_text()
    assert "RUN --mount=type=secret,id=pip_indexes" in containerfile and "PIP_EXTRA_INDEX_URL" not in containerfile
