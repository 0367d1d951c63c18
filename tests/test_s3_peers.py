"""Smoke tests of the S3 and Redis peers for scale-out: Ceph's radosgw does what the S3 storage relies on
(ranges, listing, multipart with copied parts, conditional create), redis-server stops and comes back on its
port, and the reference Distribution registry keeps an image in a bucket of the gateway."""
from __future__ import annotations

import os

import pytest
import redis
from botocore.exceptions import ClientError

from tests.images import build_index
from tests.peers import DistributionRegistry

MIB = 1024 * 1024


@pytest.mark.peer("radosgw")
def test_rgw_puts_gets_ranges_and_lists(ceph_rgw):
    s3, bucket = ceph_rgw.client(), ceph_rgw.bucket("smoke-basics")
    data = os.urandom(100_000)
    for key in ("blobs/a", "blobs/b", "blobs/c", "uploads/x"):
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    assert s3.get_object(Bucket=bucket, Key="blobs/b")["Body"].read() == data
    ranged = s3.get_object(Bucket=bucket, Key="blobs/b", Range="bytes=10-19")
    assert ranged["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert ranged["ContentRange"] == f"bytes 10-19/{len(data)}"
    assert ranged["Body"].read() == data[10:20]
    listed = s3.list_objects_v2(Bucket=bucket, Delimiter="/")
    assert [prefix["Prefix"] for prefix in listed["CommonPrefixes"]] == ["blobs/", "uploads/"]
    first = s3.list_objects_v2(Bucket=bucket, Prefix="blobs/", MaxKeys=2)
    assert [item["Key"] for item in first["Contents"]] == ["blobs/a", "blobs/b"] and first["IsTruncated"]
    rest = s3.list_objects_v2(Bucket=bucket, Prefix="blobs/", ContinuationToken=first["NextContinuationToken"])
    assert [(item["Key"], item["Size"]) for item in rest["Contents"]] == [("blobs/c", len(data))]
    assert not rest["IsTruncated"]
    with pytest.raises(ClientError) as missing:
        s3.get_object(Bucket=bucket, Key="blobs/none")
    assert missing.value.response["Error"]["Code"] == "NoSuchKey"


@pytest.mark.peer("radosgw")
def test_rgw_assembles_a_multipart_upload_from_a_copied_part_and_an_uploaded_one(ceph_rgw):
    s3, bucket = ceph_rgw.client(), ceph_rgw.bucket("smoke-multipart")
    source, tail = os.urandom(6 * MIB), os.urandom(1000)
    s3.put_object(Bucket=bucket, Key="source", Body=source)
    upload = s3.create_multipart_upload(Bucket=bucket, Key="assembled")["UploadId"]
    copied = s3.upload_part_copy(Bucket=bucket, Key="assembled", UploadId=upload, PartNumber=1,
                                 CopySource={"Bucket": bucket, "Key": "source"},
                                 CopySourceRange=f"bytes=0-{5 * MIB - 1}")
    uploaded = s3.upload_part(Bucket=bucket, Key="assembled", UploadId=upload, PartNumber=2, Body=tail)
    s3.complete_multipart_upload(Bucket=bucket, Key="assembled", UploadId=upload, MultipartUpload={"Parts": [
        {"PartNumber": 1, "ETag": copied["CopyPartResult"]["ETag"]},
        {"PartNumber": 2, "ETag": uploaded["ETag"]}]})
    assembled = s3.get_object(Bucket=bucket, Key="assembled")
    assert assembled["ETag"].strip('"').endswith("-2")
    assert assembled["Body"].read() == source[:5 * MIB] + tail
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


@pytest.mark.peer("radosgw")
def test_rgw_refuses_a_create_only_put_of_an_existing_key(ceph_rgw):
    s3, bucket = ceph_rgw.client(), ceph_rgw.bucket("smoke-conditional")
    s3.put_object(Bucket=bucket, Key="claim", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as refused:
        s3.put_object(Bucket=bucket, Key="claim", Body=b"second", IfNoneMatch="*")
    assert refused.value.response["Error"]["Code"] == "PreconditionFailed"
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert s3.get_object(Bucket=bucket, Key="claim")["Body"].read() == b"first"


@pytest.mark.peer("redis-server")
def test_redis_stops_and_restarts_empty_on_the_same_port(redis_server):
    url = redis_server.url
    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    assert client.ping()
    client.set("key", "value")
    assert client.get("key") == b"value"
    redis_server.stop()
    assert not redis_server.ping()
    with pytest.raises(redis.ConnectionError):
        client.ping()
    redis_server.start()
    assert redis_server.url == url
    assert client.ping()  # the same client reconnects
    assert client.get("key") is None  # nothing was persisted
    restarted = redis_server.restart()
    assert restarted.url == url and client.ping()


@pytest.mark.peer("radosgw")
@pytest.mark.peer("docker-registry")
def test_distribution_keeps_an_image_in_an_rgw_bucket(ceph_rgw, skopeo, tmp_path):
    bucket = ceph_rgw.bucket("smoke-distribution")
    with DistributionRegistry(tmp_path / "registry", s3=ceph_rgw.storage(bucket)) as registry:
        assert "filesystem" not in registry.config()["storage"]
        assert not (tmp_path / "registry" / "data").exists()
        index = build_index(seed="s3-distribution", oci=True, layer_size=4096)
        skopeo.round_trip(index, f"docker://{registry.host}/s3/smoke:v1", tmp_path)
    keys = [item["Key"] for page in ceph_rgw.client().get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix="docker/registry/v2/") for item in page.get("Contents", [])]
    for blob in (*index.blobs, index.manifest):
        assert f"docker/registry/v2/blobs/sha256/{blob.digest[7:9]}/{blob.digest[7:]}/data" in keys
    assert any(key.startswith("docker/registry/v2/repositories/s3/smoke/_manifests/tags/v1/") for key in keys)
