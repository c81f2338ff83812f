"""Stores in a bucket: cached, resumed, verified, inspected, streamed and claimed through real HTTP
against an S3 server on a loopback port (moto's, started here; tests/support/s3.py).

    .venv/bin/pytest tests/test_object_store.py -q

The bucket store must be the local store object by object: each test caches (or copies) the same
store both ways and compares every object's bytes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("moto.server", reason="the S3 tests need moto's server (pip install 'kdcache[s3,dev]')")
pytest.importorskip("s3fs", reason="the S3 tests need s3fs (pip install 'kdcache[s3]')")

from pipeline.cache import CacheConfig, cache_teacher, write_cache  # noqa: E402
from pipeline.cache.claims import Claims, claims_dir  # noqa: E402
from pipeline.cli import cli  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.store import schema  # noqa: E402
from pipeline.store.location import create_exclusive, store_path  # noqa: E402
from pipeline.store.reader import StoreGroup  # noqa: E402
from pipeline.store.verify import verify_store  # noqa: E402
from pipeline.store.writer import CREATING, _wanted_attrs, open_or_create  # noqa: E402
from pipeline.train.loader import DistillLoader  # noqa: E402
from tests.support.cli import one_error_line  # noqa: E402
from tests.support.s3 import (bucket_objects, bucket_session, forget_clients, local_objects, make_bucket,  # noqa: E402
                              s3_endpoint, s3_env)
from tests.support.stores import (FakeFactory, Recording, fake_labels, fake_provenance, store_files,  # noqa: E402
                                  two_jobs_on_one_store)

RPB, MB, VIEWS = 64, 32, 2              # the train split's 150 rows: 3 blocks x 2 views
BUCKET = "kdcache-test"


@pytest.fixture(scope="module")
def env():
    """The AWS_* variables a user sets, for this module's tests (and their subprocesses)."""
    with bucket_session(BUCKET) as variables:
        yield variables


@pytest.fixture(scope="module")
def work(env, synthetic_teacher, tmp_path_factory):
    """(folder the stores' recorded paths are relative to, manifest, teacher, local store, bucket store):
    the same cache written to the folder and to the bucket, from that folder."""
    root = tmp_path_factory.mktemp("object_store")
    manifest, ckpt = synthetic_teacher
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for out in ("caches/t.zarr", f"s3://{BUCKET}/caches/t.zarr"):
            result = cache_teacher(_config(manifest, ckpt, out))
            assert result.complete and result.computed == 3 * VIEWS
    return root, manifest, ckpt, root / "caches" / "t.zarr", f"s3://{BUCKET}/caches/t.zarr"


def _config(manifest, ckpt, out) -> CacheConfig:
    return CacheConfig(teacher=ckpt, manifest=manifest, split="train", views=VIEWS, out=out, rows_per_block=RPB,
                       micro_batch=MB, threads=1, progress=False, device="cpu")


def _cli(manifest, ckpt, out, *extra) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "cache", "--teacher", str(ckpt), "--manifest", str(manifest),
            "--split", "train", "--views", str(VIEWS), "--out", out, "--rows-per-block", str(RPB), "--micro-batch",
            str(MB), "--threads", "1", "--device", "cpu", "--no-progress", *extra]


def test_a_store_cached_to_a_bucket_is_the_local_store_object_by_object(work):
    _, _, _, local, bucket = work
    objects = bucket_objects(bucket)
    assert objects == local_objects(local)
    assert not any(key.endswith(".partial") or key.startswith((".claims", CREATING)) for key in objects)
    report = verify_store(bucket)
    assert report.ok and report.chunks_checked == 3 * VIEWS * 4, str(report)


def test_a_killed_bucket_job_resumes_to_the_same_objects(work):
    root, manifest, ckpt, local, _ = work
    out = f"s3://{BUCKET}/caches/killed.zarr"
    cmd = _cli(manifest, ckpt, out)
    killed = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root,
                            env={**os.environ, "KDCACHE_FAULT": "block:2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not verify_store(out).ok
    with pytest.raises(UserError, match="status.complete"):
        StoreGroup([out])
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f": complete ({3 * VIEWS - 2} blocks computed by this run)" in rerun.stdout
    assert bucket_objects(out) == local_objects(local)


def test_verify_and_every_read_name_a_corrupted_object(work):
    _, _, _, local, bucket = work
    out = f"s3://{BUCKET}/caches/corrupt.zarr"
    assert CliRunner().invoke(cli, ["store", "copy", str(local), out]).exit_code == 0
    chunk = store_path(out) / schema.chunk_key("logits", 3, 1, 2)
    data = bytearray(chunk.read_bytes())
    data[5] ^= 0x40
    chunk.write_bytes(bytes(data))
    result = CliRunner().invoke(cli, ["verify", out])
    assert result.exit_code == 1 and "checksum: logits view 1 block 2" in result.output, result.output
    with pytest.raises(UserError, match=r"logits.*view 1 block 2"):
        StoreGroup([out], mode="memory")


def test_inspect_reads_a_bucket_store(work):
    _, _, _, local, bucket = work
    result = CliRunner().invoke(cli, ["inspect", bucket, "--json"])
    assert result.exit_code == 0, result.output
    assert CliRunner().invoke(cli, ["inspect", str(local), "--json"]).output == result.output.replace(bucket, str(local))


def test_distill_streams_from_the_bucket_as_from_disk(work, tmp_path):
    _, manifest, _, local, bucket = work
    outs = {}
    for name, store in (("local", str(local)), ("bucket", bucket)):
        outs[name] = tmp_path / f"{name}.pt"
        result = CliRunner().invoke(cli, ["distill", "--method", "kd", "--mentors", store, "--manifest", str(manifest),
                                          "--student", "mlp", "--epochs", "2", "--batch-size", "32", "--no-progress",
                                          "--device", "cpu", "--cache-mode", "stream", "--out", str(outs[name])])
        assert result.exit_code == 0, result.output
    a, b = (torch.load(outs[n], map_location="cpu", weights_only=False)["model"] for n in ("local", "bucket"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_loader_streams_windows_of_a_bucket_store(work):
    _, manifest, _, local, bucket = work
    with DistillLoader([bucket], manifest, batch_size=32, cache_mode="stream") as remote, \
            DistillLoader([str(local)], manifest, batch_size=32, cache_mode="stream") as disk:
        assert remote.cached.group.mode == "stream"
        for (x, y, t), (x2, y2, t2) in zip(remote.epoch(1), disk.epoch(1)):
            assert torch.equal(x, x2) and torch.equal(y, y2)
            assert all(torch.equal(t[name], t2[name]) for name in t)


def _fake_cache(store, factory):
    layout = schema.Layout(num_samples=1000, num_classes=10, num_views=2, rows_per_block=256, micro_batch=64)
    return write_cache(store, factory=factory, provenance=fake_provenance(1000, 10, 2), layout=layout,
                       sample_id=np.arange(1000, dtype=np.int64) * 3 + 7, label=fake_labels(1000, 10), progress=False)


def test_two_jobs_on_one_bucket_store_compute_each_block_once(env, tmp_path):
    store = f"s3://{BUCKET}/fake/two.zarr"
    a_calls, b_calls, results = two_jobs_on_one_store(
        lambda factory: _fake_cache(store, factory),
        lambda calls, first: Recording(calls, first, num_classes=10, rows_per_block=256), wait=120)
    assert a_calls[0] == (0, 0) and b_calls[0] == (0, 1)          # B skipped the block A held
    assert sorted(a_calls + b_calls) == [(v, b) for v in range(2) for b in range(4)]
    assert results["a"].complete or results["b"].complete
    _fake_cache(tmp_path / "ref.zarr", FakeFactory(10))
    objects = bucket_objects(store)
    assert {k: v for k, v in objects.items() if k != "zarr.json"} == store_files(tmp_path / "ref.zarr")
    assert not claims_dir(store).exists()


def test_two_jobs_given_one_block_where_the_condition_is_ignored_leave_it_whole(env, monkeypatch, tmp_path):
    """The race a server ignoring If-None-Match allows: both jobs find a block unclaimed and both
    claim it; each computes and PUTs the block whole, so the store is still the reference."""
    from pipeline.cache import claims
    from pipeline.store import location
    store = f"s3://{BUCKET}/fake/raced.zarr"
    _fake_cache(tmp_path / "ref.zarr", FakeFactory(10))
    monkeypatch.setitem(location._EXCLUSIVE, ("s3", BUCKET), False)
    monkeypatch.setattr(claims.Claims, "current", lambda self, view, block: None)

    def unconditional(path, data, *, tmp=None):         # both writes of the claim succeed
        path.write_bytes(data)
        return True

    monkeypatch.setattr(claims, "create_exclusive", unconditional)
    a_calls, b_calls, results = two_jobs_on_one_store(
        lambda factory: _fake_cache(store, factory),
        lambda calls, first: Recording(calls, first, num_classes=10, rows_per_block=256), wait=120)
    assert a_calls[0] == b_calls[0] == (0, 0)                       # one block computed by both
    assert results["a"].complete or results["b"].complete
    assert {k: v for k, v in bucket_objects(store).items() if k != "zarr.json"} == store_files(tmp_path / "ref.zarr")
    assert verify_store(store).ok


def test_a_claim_in_a_bucket_has_one_owner_and_a_dead_jobs_claim_is_taken_over(env):
    store = f"s3://{BUCKET}/fake/claims.zarr"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    first, second = Claims(store, job="dead", pid=dead.pid), Claims(store, job="live")
    try:
        assert first.acquire(0, 1)
        assert second.acquire(0, 1)                           # its job is gone: taken over as generation 1
        assert second.current(0, 1).generation == 1 and second.holds(0, 1) and not first.holds(0, 1)
        assert not Claims(store, job="third").acquire(0, 1)   # a live job's claim is not taken
        second.abandon(0, 1)                                  # given up unwritten: anyone may take it now
        fourth = Claims(store, job="fourth")
        assert fourth.acquire(0, 1) and fourth.current(0, 1).generation == 2
        fourth.release(0, 1)
        assert second.current(0, 1) is None
    finally:
        first.close()
        second.close()


# --- what a user gets wrong: one error line naming the URL, exit 2, nothing written ------------------

@pytest.fixture
def user_env(env, monkeypatch):
    """The module's variables, changed by the test; the S3 clients read them afresh before and after."""
    forget_clients()
    yield monkeypatch
    monkeypatch.undo()
    forget_clients()


def _cache_args(work, out: str) -> list[str]:
    _, manifest, ckpt, _, _ = work
    return _cli(manifest, ckpt, out)[3:]


def test_missing_credentials_are_one_line(work, user_env):
    user_env.delenv("AWS_ACCESS_KEY_ID")
    user_env.delenv("AWS_SECRET_ACCESS_KEY")
    url = f"s3://{BUCKET}/caches/nocreds.zarr"
    line = one_error_line(CliRunner().invoke(cli, _cache_args(work, url)), url, "credentials", "AWS_ACCESS_KEY_ID")
    assert "\n" not in line
    one_error_line(CliRunner().invoke(cli, ["verify", url]), url, "credentials")


def test_an_unreachable_endpoint_is_one_line(work, user_env):
    from tests.support.s3 import free_port
    user_env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    user_env.setenv("AWS_MAX_ATTEMPTS", "1")
    url = f"s3://{BUCKET}/caches/t.zarr"
    one_error_line(CliRunner().invoke(cli, ["inspect", url]), url, "reachable endpoint", "127.0.0.1")


def test_a_missing_bucket_is_one_line_and_nothing_is_written(work, user_env, tmp_path):
    url = "s3://no-such-bucket/caches/t.zarr"
    one_error_line(CliRunner().invoke(cli, _cache_args(work, url)), url, "no bucket 'no-such-bucket'")
    one_error_line(CliRunner().invoke(cli, ["distill", "--method", "kd", "--mentors", url, "--manifest", str(work[1]),
                                            "--student", "mlp",
                                            "--out", str(tmp_path / "s.pt")]), url, "no bucket")


def test_a_denied_write_is_one_line_and_leaves_no_object(work):
    """A server enforcing IAM (its first 4 requests unauthenticated: the setup), a user allowed to read only."""
    import json

    import boto3
    with s3_endpoint(env={"INITIAL_NO_AUTH_ACTION_COUNT": "4"}) as endpoint, pytest.MonkeyPatch.context() as mp:
        for key, value in s3_env(endpoint).items():
            mp.setenv(key, value)
        make_bucket("guarded")
        iam = boto3.session.Session().client("iam")
        iam.create_user(UserName="reader")
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": ["s3:ListBucket", "s3:GetObject"], "Resource": "*"}]}))
        mp.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        mp.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        forget_clients()
        try:
            url = "s3://guarded/caches/t.zarr"
            one_error_line(CliRunner().invoke(cli, _cache_args(work, url)), url, "denied")
            assert bucket_objects("s3://guarded") == {}
        finally:
            forget_clients()


def test_without_s3fs_a_url_says_which_extra_to_install(tmp_path):
    code = ("import sys; sys.modules['s3fs'] = None; from pipeline.cli import main; "
            "sys.argv = ['kdcache', 'verify', 's3://bucket/t.zarr']; main()")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "s3://bucket/t.zarr" in lines[0] and "pip install 'kdcache[s3]'" in lines[0], run.stderr


# --- kdcache store copy --------------------------------------------------------------------------------

def test_store_copy_to_a_bucket_and_back_is_byte_identical_and_resumes(work, tmp_path):
    _, _, _, local, _ = work
    url = f"s3://{BUCKET}/copies/t.zarr"
    out = CliRunner().invoke(cli, ["store", "copy", str(local), url])
    assert out.exit_code == 0 and "every chunk's checksum checked" in out.output, out.output
    assert bucket_objects(url) == local_objects(local)
    back = tmp_path / "back" / "t.zarr"
    assert CliRunner().invoke(cli, ["store", "copy", url, str(back)]).exit_code == 0
    assert local_objects(back) == local_objects(local) and verify_store(back).ok
    # as if killed part-way: the group's zarr.json (written last) and two chunks not there yet
    for key in ("zarr.json", schema.chunk_key("logits", 3, 1, 1), schema.chunk_key("done", 2, 1, 1)):
        (back / key).unlink()
    with pytest.raises(UserError, match="no zarr.json"):
        StoreGroup([back])
    again = CliRunner().invoke(cli, ["store", "copy", url, str(back)])
    assert again.exit_code == 0 and "(3 objects, " in again.output and f"{len(local_objects(local)) - 3} already there" \
        in again.output, again.output
    assert local_objects(back) == local_objects(local)


def test_store_copy_refuses_a_corrupted_chunk_and_another_store(work, tmp_path):
    _, _, _, local, _ = work
    src = tmp_path / "src.zarr"
    assert CliRunner().invoke(cli, ["store", "copy", str(local), str(src)]).exit_code == 0
    chunk = src / schema.chunk_key("entropy", 2, 0, 1)
    data = bytearray(chunk.read_bytes())
    data[0] ^= 1
    chunk.write_bytes(bytes(data))
    url = f"s3://{BUCKET}/copies/corrupt.zarr"
    one_error_line(CliRunner().invoke(cli, ["store", "copy", str(src), url]), "entropy view 0 block 1", "crc32")
    assert "zarr.json" not in bucket_objects(url)                 # no store there until a copy is whole
    other = tmp_path / "other.zarr"
    _fake_cache(other, FakeFactory(10))
    one_error_line(CliRunner().invoke(cli, ["store", "copy", str(other), f"s3://{BUCKET}/caches/t.zarr"]),
                   f"s3://{BUCKET}/caches/t.zarr", "expected")


def test_a_server_ignoring_conditional_writes_is_said_in_one_line(env, monkeypatch, caplog, tmp_path):
    from pipeline.store import location
    store = f"s3://{BUCKET}/fake/unconditional.zarr"
    assert location.exclusive_writes(store_path(store))             # moto honours If-None-Match
    monkeypatch.setitem(location._EXCLUSIVE, ("s3", BUCKET), False)
    with caplog.at_level("WARNING"):
        result = _fake_cache(store, FakeFactory(10))
    assert result.complete
    assert [r.getMessage() for r in caplog.records if "If-None-Match" in r.getMessage()] == \
        [f"{store}: {location.CONDITIONAL_WRITES}"]
    _fake_cache(tmp_path / "ref.zarr", FakeFactory(10))
    assert {k: v for k, v in bucket_objects(store).items() if k != "zarr.json"} == store_files(tmp_path / "ref.zarr")


def test_verify_spot_checks_a_bucket_store_against_its_teacher(work, monkeypatch):
    root, _, ckpt, _, bucket = work
    monkeypatch.chdir(root)                # the store's manifest path is relative to its key's folder here
    result = CliRunner().invoke(cli, ["verify", bucket, "--teacher", str(ckpt), "--rows", "16", "--device", "cpu"])
    assert result.exit_code == 0 and "teacher spot-check ok" in result.output, result.output


@pytest.mark.distributed
def test_local_dask_workers_cache_to_a_bucket(work):
    root, manifest, ckpt, local, _ = work
    out = f"s3://{BUCKET}/caches/dask.zarr"
    run = subprocess.run(_cli(manifest, ckpt, out, "--local-workers", "2"), capture_output=True, text=True,
                         timeout=300, cwd=root)
    assert run.returncode == 0, run.stderr[-2000:]
    assert bucket_objects(out) == local_objects(local)


def test_a_bucket_store_of_other_provenance_is_refused_and_overwrite_replaces_it(env, tmp_path):
    from tests.support.stores import make_fake_store
    url = f"s3://{BUCKET}/fake/provenance.zarr"
    make_fake_store(url, num_samples=300, views=1)
    with pytest.raises(UserError, match=r"teacher\.checkpoint_sha256"):
        make_fake_store(url, num_samples=300, views=1, teacher_sha="u" * 64, seed=1)
    assert make_fake_store(url, num_samples=300, views=1, teacher_sha="u" * 64, seed=1, overwrite=True).complete
    make_fake_store(tmp_path / "ref.zarr", num_samples=300, views=1, teacher_sha="u" * 64, seed=1)
    assert {k: v for k, v in bucket_objects(url).items() if k != "zarr.json"} == store_files(tmp_path / "ref.zarr")


def _fake_target(teacher_sha: str = "t" * 64) -> dict:
    """What ``make_fake_store(url, num_samples=300, views=1, teacher_sha=...)`` creates its store with."""
    layout = schema.Layout(num_samples=300, num_classes=10, num_views=1, rows_per_block=256, micro_batch=64)
    return dict(provenance=fake_provenance(300, 10, 1, teacher_sha=teacher_sha), layout=layout,
                sample_id=np.arange(300, dtype=np.int64) * 3 + 7, label=fake_labels(300, 10))


def _claim_creation(url: str, teacher_sha: str = "t" * 64) -> None:
    """The creation claim a job of that store writes before any other object, as if it stopped right after."""
    out = store_path(url)
    t = _fake_target(teacher_sha)
    attrs = _wanted_attrs(out, t["provenance"], t["layout"], t["sample_id"], t["label"])
    assert create_exclusive(out / CREATING, json.dumps(attrs, sort_keys=True).encode())


def test_a_job_of_other_provenance_is_refused_before_writing_into_a_bucket_store_being_created(env, tmp_path):
    from tests.support.stores import make_fake_store
    url = f"s3://{BUCKET}/fake/creating.zarr"
    _claim_creation(url)                                          # job A, paused right after its claim
    refused = r"teacher\.checkpoint_sha256: .*another job creating the store.*if no job is creating it, --overwrite"
    with pytest.raises(UserError, match=refused) as err:          # job B: its checks, then its creation
        make_fake_store(url, num_samples=300, views=1, teacher_sha="u" * 64, seed=1)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=refused):
        open_or_create(url, **_fake_target("u" * 64))
    assert list(bucket_objects(url)) == [CREATING]                # nothing of B's
    assert make_fake_store(url, num_samples=300, views=1).complete            # A goes on
    make_fake_store(tmp_path / "ref.zarr", num_samples=300, views=1)
    assert bucket_objects(url) == local_objects(tmp_path / "ref.zarr")


def test_a_killed_creators_claim_does_not_block_a_rerun_and_is_gone_after_it(env, tmp_path):
    from tests.support.stores import make_fake_store
    url = f"s3://{BUCKET}/fake/leftover.zarr"
    _claim_creation(url)
    assert make_fake_store(url, num_samples=300, views=1).complete
    make_fake_store(tmp_path / "ref.zarr", num_samples=300, views=1)
    assert bucket_objects(url) == local_objects(tmp_path / "ref.zarr")


def test_overwrite_replaces_a_creation_claim_of_other_provenance(env, tmp_path):
    from tests.support.stores import make_fake_store
    url = f"s3://{BUCKET}/fake/overclaimed.zarr"
    _claim_creation(url)
    assert make_fake_store(url, num_samples=300, views=1, teacher_sha="u" * 64, seed=1, overwrite=True).complete
    make_fake_store(tmp_path / "ref.zarr", num_samples=300, views=1, teacher_sha="u" * 64, seed=1)
    assert bucket_objects(url) == local_objects(tmp_path / "ref.zarr")


def test_store_copy_refuses_a_bucket_store_being_created_with_other_provenance(env, tmp_path):
    from tests.support.stores import make_fake_store
    url = f"s3://{BUCKET}/fake/copied_into.zarr"
    _claim_creation(url)                                          # a caching job of teacher "t" creating it
    make_fake_store(tmp_path / "other.zarr", num_samples=300, views=1, teacher_sha="u" * 64, seed=1)
    result = CliRunner().invoke(cli, ["store", "copy", str(tmp_path / "other.zarr"), url])
    one_error_line(result, url, "teacher.checkpoint_sha256", "another job creating the store")
    assert list(bucket_objects(url)) == [CREATING]
    make_fake_store(tmp_path / "same.zarr", num_samples=300, views=1)
    assert CliRunner().invoke(cli, ["store", "copy", str(tmp_path / "same.zarr"), url]).exit_code == 0
    assert bucket_objects(url) == local_objects(tmp_path / "same.zarr")       # the claim gone with it
