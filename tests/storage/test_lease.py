"""The lease on a run prefix: one writer at a time, against both real S3 servers.

SeaweedFS honours conditional writes (If-None-Match: *, If-Match), rclone serve s3 (1.75) ignores
them; the lease falls back to write, wait, read back and compare the owner there.
"""

from __future__ import annotations

import json
import time

import pytest

from finetune_engine.storage import join, make_client, read_bytes
from finetune_engine.storage.lease import LEASE_NAME, LeaseHeldError, LeaseLostError, PrefixLease

pytestmark = pytest.mark.s3

CONDITIONAL = {"seaweedfs": True, "rclone": False}  # measured: does the server honour If-None-Match?


def test_a_second_writer_is_refused_until_the_first_releases(s3_env):
    prefix = join(s3_env["uri"], "experiments", "e", "run")
    first = PrefixLease(prefix, ttl=2, owner="pod-a/1/x", settle=0).acquire()
    try:
        stored = json.loads(read_bytes(join(prefix, LEASE_NAME)))
        assert stored["owner"] == "pod-a/1/x" and stored["expires"] > time.time() + 1
        with pytest.raises(LeaseHeldError) as err:
            PrefixLease(prefix, ttl=60, owner="pod-b/2/y", settle=0).acquire()
        message = str(err.value)
        assert prefix in message and "'pod-a/1/x'" in message and " UTC" in message
        assert "another name" in message
        assert json.loads(read_bytes(join(prefix, LEASE_NAME)))["owner"] == "pod-a/1/x"  # untouched
    finally:
        first.release()
    assert read_bytes(join(prefix, LEASE_NAME)) is None  # released: deleted
    with PrefixLease(prefix, ttl=60, owner="pod-b/2/y", settle=0) as second:
        assert json.loads(read_bytes(join(prefix, LEASE_NAME)))["owner"] == second.owner


def test_a_lease_is_renewed_while_it_is_held_and_taken_over_once_expired(s3_env, caplog):
    prefix = join(s3_env["uri"], "experiments", "e", "renewed")
    holder = PrefixLease(prefix, ttl=1, owner="pod-a", settle=0).acquire()
    time.sleep(1.6)  # longer than its lifetime: only the renewals keep it live
    with pytest.raises(LeaseHeldError):
        PrefixLease(prefix, ttl=1, owner="pod-b", settle=0).acquire()
    # the holder is killed: no renewal, no release
    holder._stop.set()
    holder._thread.join()
    time.sleep(1.2)
    with caplog.at_level("WARNING"), PrefixLease(prefix, ttl=30, owner="pod-b", settle=0):
        assert json.loads(read_bytes(join(prefix, LEASE_NAME)))["owner"] == "pod-b"
        assert "taking over the expired lease of 'pod-a'" in caplog.text
        holder.release()  # a late release of the old holder leaves the new lease alone
        assert json.loads(read_bytes(join(prefix, LEASE_NAME)))["owner"] == "pod-b"
        with pytest.raises(LeaseLostError, match="now held by 'pod-b'"):
            holder.lost = None
            holder.renew()


def test_an_unexpired_lease_no_one_renews_is_taken_over(s3_env, caplog):
    """A killed writer's retry need not wait for the expiry: the lease is watched for 2.5 of the
    holder's renewal intervals and, not renewed, taken over."""
    prefix = join(s3_env["uri"], "experiments", "e", "killed")
    holder = PrefixLease(prefix, ttl=2, owner="pod-a", settle=0).acquire()
    holder._stop.set()
    holder._thread.join()  # killed: stops renewing; its lease has more than a second left
    with caplog.at_level("WARNING"):
        retry = PrefixLease(prefix, ttl=30, owner="pod-a-retry", settle=0).acquire()
    try:
        assert "taking over the lease of 'pod-a': not renewed for 1 s" in caplog.text
        assert json.loads(read_bytes(join(prefix, LEASE_NAME)))["owner"] == "pod-a-retry"
    finally:
        retry.release()


def test_two_writers_that_both_saw_no_lease(s3_env, monkeypatch):
    """Both read 'no lease' and create it. With conditional writes the second create gets 412 and is
    refused; without them the second write wins and the first holder finds out at its next renewal."""
    prefix = join(s3_env["uri"], "experiments", "e", "race")
    first = PrefixLease(prefix, ttl=60, owner="pod-a", settle=0).acquire()
    first._stop.set()  # renew by hand below
    second = PrefixLease(prefix, ttl=60, owner="pod-b", settle=0)
    reads = iter([(None, None)])
    real_read = second.read
    monkeypatch.setattr(second, "read", lambda: next(reads, None) or real_read())
    try:
        if CONDITIONAL[s3_env["kind"]]:
            with pytest.raises(LeaseHeldError, match="'pod-a'"):
                second.acquire()
            first.renew()  # still ours
        else:
            second.acquire()
            with pytest.raises(LeaseLostError, match="now held by 'pod-b'"):
                first.renew()
            with pytest.raises(LeaseLostError):
                first.check()
    finally:
        second.release()
        first.release()


def test_a_write_during_the_settle_time_is_seen(s3_env, monkeypatch):
    """The best effort every server gets: write, wait, read back. Another owner's write in between
    (a server that ignored our condition, or a writer without one) refuses this one."""
    prefix = join(s3_env["uri"], "experiments", "e", "settle")
    lease = PrefixLease(prefix, ttl=60, owner="pod-a", settle=0.01)
    real_put = lease._put

    def put_then_overwritten(**condition):
        etag = real_put(**condition)
        body = {"owner": "pod-c", "expires": time.time() + 60}
        make_client().put_object(Bucket=s3_env["bucket"], Key=lease.key, Body=json.dumps(body).encode())
        return etag

    monkeypatch.setattr(lease, "_put", put_then_overwritten)
    with pytest.raises(LeaseHeldError, match="'pod-c'"):
        lease.acquire()
    assert lease._thread is None  # nothing renewed
    assert json.loads(read_bytes(join(prefix, LEASE_NAME)))["owner"] == "pod-c"


def test_a_retry_of_the_same_job_takes_over_at_once_and_another_job_still_waits(s3_env, monkeypatch):
    """FINETUNE_WRITER (set by the operators to dag/run/task/map index): the next try of a killed job
    takes over its lease without waiting for it to lapse (300 s here); a different job is refused."""
    prefix = join(s3_env["uri"], "experiments", "e", "retry")
    monkeypatch.setenv("FINETUNE_WRITER", "dag/run-1/sweep/0")
    killed = PrefixLease(prefix, ttl=300, owner="pod-try1/1/x", settle=0).acquire()
    killed._stop.set()  # its pod dies: no renewal, no release
    killed._thread.join()
    assert json.loads(read_bytes(join(prefix, LEASE_NAME)))["writer"] == "dag/run-1/sweep/0"
    started = time.monotonic()
    retry = PrefixLease(prefix, ttl=2, owner="pod-try2/1/y", settle=0).acquire()  # renews every 0.4 s
    try:
        assert time.monotonic() - started < 10, "the retry waited for the killed try's lease"
        assert json.loads(read_bytes(join(prefix, LEASE_NAME)))["owner"] == "pod-try2/1/y"
        monkeypatch.setenv("FINETUNE_WRITER", "dag/run-2/sweep/0")  # another DAG run, same run_name
        with pytest.raises(LeaseHeldError, match="pod-try2/1/y"):
            PrefixLease(prefix, ttl=300, owner="pod-other/1/z", settle=0).acquire()
    finally:
        retry.release()
