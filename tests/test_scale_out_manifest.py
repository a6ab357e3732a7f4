"""The KubeRay example deploys what `quadapt serve --ray` deploys: the manifest parses, names a Ray
image of the version the `ray` extra pins, an application builder that exists and accepts its
args, and the same ports in the Serve config and on the containers.

No Kubernetes and no Ray here: the file is read with PyYAML (a dependency of Ray, and of the
dev tools).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from quadapt.runtime.serving.ray import launch

yaml = pytest.importorskip("yaml", reason="reading the manifest needs PyYAML (installed with the ray extra)")

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "examples" / "kuberay-rayservice.yaml"


def test_the_rayservice_manifest_names_image_command_and_ports():
    service = yaml.safe_load(MANIFEST.read_text(encoding="utf-8"))
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    cluster = service["spec"]["rayClusterConfig"]
    containers = [cluster["headGroupSpec"]["template"]["spec"]["containers"][0]]
    containers += [g["template"]["spec"]["containers"][0] for g in cluster["workerGroupSpecs"]]

    # The image: Ray's, of the version the extra pins and the cluster declares.
    pinned = re.search(r'"ray\[serve\]>=([\d.]+),<(\d+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    for container in containers:
        version = re.fullmatch(r"rayproject/ray:([\d.]+)-py3\d+-cpu", container["image"]).group(1)
        assert version == cluster["rayVersion"] and version.startswith(pinned), (version, pinned)

    # The command: the application builder, importable, taking the manifest's args.
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (application,) = config["applications"]
    module, _, name = application["import_path"].partition(":")
    assert module == launch.__name__ and callable(getattr(launch, name))
    assert "quadapt[ray]" in application["runtime_env"]["pip"]
    served, replicas, autoscale = launch.config_from_args(application["args"])
    assert served.model == "/models/smollm2-int4" and served.adapter_dirs == ("/models/adapters",)
    assert replicas is None and autoscale == (1, 4)
    assert config["grpc_options"]["grpc_servicer_functions"] == launch.GRPC_SERVICERS

    # The ports: Serve's HTTP and gRPC proxies listen where the containers expose them.
    ports = {config["http_options"]["port"], config["grpc_options"]["port"]}
    for container in containers:
        assert ports <= {p["containerPort"] for p in container["ports"]}, container["name"]


def test_application_args_are_checked_by_name():
    with pytest.raises(Exception, match="unknown application arg"):
        launch.config_from_args({"model": "/m", "replica": 2})
    with pytest.raises(Exception, match="not both"):
        launch.config_from_args({"model": "/m", "replicas": 2, "autoscale": [1, 2]})
