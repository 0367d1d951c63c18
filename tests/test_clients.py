"""Real clients against the mirror as a hosted registry: skopeo pushes and copies back, dockerd pushes and
pulls, podman pulls."""
from __future__ import annotations

import json

from tests.images import build_image, build_index, push


def test_skopeo_pushes_and_copies_back_with_the_same_digest(hosted_mirror, skopeo, tmp_path):
    index = build_index(seed="skopeo-mirror", oci=True)
    back = skopeo.round_trip(index, f"docker://{hosted_mirror.host}/clients/skopeo:v1", tmp_path)
    for image in index.images:
        assert (back / "blobs" / "sha256" / image.layers[0].digest[7:]).read_bytes() == image.layers[0].data


def test_dockerd_pushes_and_pulls(hosted_mirror, dockerd):
    host = hosted_mirror.host
    dockerd.configure({"insecure-registries": [host]})
    image = build_image(seed="dockerd-mirror")
    push(hosted_mirror.url, "clients/source", "v1", image)
    dockerd.docker("pull", f"{host}/clients/source:v1")
    dockerd.docker("tag", f"{host}/clients/source:v1", f"{host}/clients/pushed:v2")
    dockerd.docker("push", f"{host}/clients/pushed:v2")
    dockerd.remove_all_images()
    dockerd.docker("pull", f"{host}/clients/pushed:v2")
    inspected = json.loads(dockerd.docker("image", "inspect", f"{host}/clients/pushed:v2").stdout)[0]
    assert inspected["RootFS"]["Layers"] == json.loads(image.config.data)["rootfs"]["diff_ids"]
    assert "PUT /v2/clients/pushed/manifests/v2" in hosted_mirror.log()


def test_podman_pulls(hosted_mirror, podman):
    image = build_image(seed="podman-mirror")
    push(hosted_mirror.url, "clients/podman", "v1", image)
    podman.pull(f"{hosted_mirror.host}/clients/podman:v1")
    listed = podman.podman("images", "--format", "{{.Repository}}:{{.Tag}}").stdout
    assert f"{hosted_mirror.host}/clients/podman:v1" in listed
