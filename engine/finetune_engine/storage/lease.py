"""A lease on a bucket prefix: one writer at a time per run prefix.

Two train jobs given the same run name would write one prefix at once: checkpoints of two runs
interleaved, each deleting the other's in its rotation, a final output of one with the result of the
other. The job that writes a prefix first takes its lease: the small object ``<prefix>/_finetune_lease.json``
holding an owner id (host, pid, random part), when it was taken and when it expires. The holder renews
it in a background thread (every ``min(ttl / 5, 30)`` seconds) and deletes it at the end. A second job
that finds another owner's unexpired lease watches it for 2.5 renewal intervals: renewed meanwhile, its
writer is alive and this job stops before it writes anything, naming the prefix, the owner and when
the lease expires; not renewed, its writer is gone (a killed pod, whose retry this may be) and the
lease is taken over, as is any expired lease.

How safe that is depends on the server:

- Servers with conditional writes (AWS S3, MinIO, SeaweedFS; Ceph RGW): the lease is created with
  ``If-None-Match: *`` and renewed, taken over or deleted with ``If-Match: <its ETag>``; of two jobs
  racing for it exactly one wins, the other gets 412 and is refused.
- Servers that ignore the conditions (``rclone serve s3``, the embedded local server, as of rclone
  1.75): best effort. The job writes the lease, waits ``FINETUNE_LEASE_SETTLE_SECONDS`` (default 1 s)
  and reads it back; only if the owner is still its own does it go on. Two jobs that start within
  that window of each other can both go on; jobs further apart are told apart.

``FINETUNE_LEASE_SECONDS`` sets the lease's lifetime (default 300 s): how long a killed job's lease
blocks the prefix, and how long a job may go without reaching the bucket before it loses its lease.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from datetime import UTC, datetime
from typing import Any

from finetune_engine.storage import s3
from finetune_engine.storage.uri import join, parse_uri

log = logging.getLogger(__name__)

LEASE_NAME = "_finetune_lease.json"
LEASE_SECONDS_ENV = "FINETUNE_LEASE_SECONDS"
# Who the writing job is across its retries (the Airflow operators set dag/run/task/map index): a
# retry of the same task takes over its killed try's lease at once instead of waiting for it to lapse.
WRITER_ENV = "FINETUNE_WRITER"
SETTLE_SECONDS_ENV = "FINETUNE_LEASE_SETTLE_SECONDS"
_CONDITION_CODES = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


class LeaseHeldError(s3.StorageError):
    """Another live writer holds the prefix's lease."""


class LeaseLostError(s3.StorageError):
    """This writer's lease expired or was taken over while it ran: it must not write on."""


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _condition_failed(err: Exception) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(err, ClientError):
        return False
    code = str(err.response.get("Error", {}).get("Code", ""))
    status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in _CONDITION_CODES or status in (409, 412)


def new_owner_id() -> str:
    """host/pid/random: the host of a pod is its name, so the refusal says which pod writes."""
    return f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"


class PrefixLease:
    """The lease on ``prefix_uri``; ``with PrefixLease(uri):`` acquires, renews and releases it."""

    def __init__(
        self,
        prefix_uri: str,
        ttl: float | None = None,
        owner: str | None = None,
        settle: float | None = None,
        *,
        client=None,
    ):
        self.prefix_uri = prefix_uri.rstrip("/")
        self.uri = join(self.prefix_uri, LEASE_NAME)
        self.bucket, self.key = parse_uri(self.uri)
        self.ttl = float(ttl if ttl is not None else os.environ.get(LEASE_SECONDS_ENV, "300"))
        self.settle = float(settle if settle is not None else os.environ.get(SETTLE_SECONDS_ENV, "1"))
        self.owner = owner or new_owner_id()
        self.writer = os.environ.get(WRITER_ENV) or None
        self._client = client
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None  # why the lease is no longer ours, once it is not

    # -- the object ------------------------------------------------------------------------------

    def _s3(self):
        return s3._use(self._client)

    def read(self) -> tuple[dict[str, Any] | None, str | None]:
        """(the lease, its ETag), or (None, None) when there is none. A lease that does not parse
        counts as expired (owner unknown)."""
        try:
            response = self._s3().get_object(Bucket=self.bucket, Key=self.key)
            body = response["Body"].read()
        except Exception as err:
            if s3._not_found(err):
                return None, None
            raise s3.wrap_error(err, self.uri, "read the lease") from None
        try:
            data = json.loads(body)
            if not isinstance(data, dict):
                raise ValueError
            data["expires"] = float(data["expires"])
        except (ValueError, KeyError, TypeError):
            data = {"owner": "(unreadable lease)", "expires": 0.0}
        return data, response.get("ETag")

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps(
            {
                "owner": self.owner,
                "writer": self.writer,
                "acquired": _when(now),
                "expires": now + self.ttl,
                "ttl": self.ttl,
            },
            sort_keys=True,
        ).encode()

    def _put(self, **condition) -> str | None:
        response = self._s3().put_object(
            Bucket=self.bucket, Key=self.key, Body=self._body(), ContentType="application/json", **condition
        )
        return response.get("ETag")

    def _held_error(self, other: dict[str, Any]) -> LeaseHeldError:
        return LeaseHeldError(
            f"{self.prefix_uri} is being written by another run: its lease {LEASE_NAME} is held by "
            f"{other.get('owner')!r} until {_when(other['expires'])} (renewed while that run writes). "
            "Two runs with one run name would mix their checkpoints and outputs; give this run "
            "another name (run_name / --checkpoint-uri), or wait for the other run to finish (the "
            "lease of a run that was killed is taken over once it is no longer renewed)."
        )

    # -- acquire, renew, release -----------------------------------------------------------------

    def acquire(self) -> PrefixLease:
        """Take the lease, or LeaseHeldError when another owner's lease is live."""
        from botocore.exceptions import BotoCoreError, ClientError

        current, etag = self.read()
        if current is not None and current.get("owner") != self.owner:
            if self.writer and current.get("writer") == self.writer:
                log.warning(
                    "%s: taking over the lease of %r: an earlier try of this job (%s)",
                    self.prefix_uri,
                    current.get("owner"),
                    self.writer,
                )
            elif current["expires"] > time.time():
                current, etag = self._watch(current, etag)
            else:
                log.warning(
                    "%s: taking over the expired lease of %r (expired %s)",
                    self.prefix_uri,
                    current.get("owner"),
                    _when(current["expires"]),
                )
        condition = {"IfMatch": etag} if current is not None and etag else {"IfNoneMatch": "*"}
        try:
            self._put(**condition)
        except (BotoCoreError, ClientError) as err:
            if _condition_failed(err):  # someone else created or took it in between
                other, _ = self.read()
                raise self._held_error(other or {"owner": "(another run)", "expires": time.time()}) from None
            raise s3.wrap_error(err, self.uri, "take the lease") from None
        # Servers that ignore the conditions accept every write: read back after a moment and go on
        # only if the lease is still ours (best effort; see the module docstring).
        if self.settle > 0:
            time.sleep(self.settle)
        again, self._etag = self.read()
        if again is None or again.get("owner") != self.owner:
            raise self._held_error(again or {"owner": "(another run)", "expires": time.time()})
        log.info("%s: lease taken by %s until %s", self.prefix_uri, self.owner, _when(again["expires"]))
        self._thread = threading.Thread(target=self._renew_loop, name="prefix-lease", daemon=True)
        self._thread.start()
        return self

    @property
    def interval(self) -> float:
        """Seconds between renewals."""
        return max(min(self.ttl / 5, 30.0), 0.05)

    def _watch(self, current: dict[str, Any], etag: str | None) -> tuple[dict[str, Any] | None, str | None]:
        """Another owner's unexpired lease: LeaseHeldError if it is renewed (or replaced) within 2.5
        renewal intervals, else (its writer stopped renewing it) the lease as read, to take over."""
        try:  # the holder renews at the interval of its own lifetime, recorded in the lease
            interval = max(min(float(current.get("ttl", self.ttl)) / 5, 30.0), 0.05)
        except (TypeError, ValueError):
            interval = self.interval
        deadline = time.monotonic() + 2.5 * interval
        log.info(
            "%s: lease held by %r until %s; checking whether its writer still renews it",
            self.prefix_uri,
            current.get("owner"),
            _when(current["expires"]),
        )
        while time.monotonic() < deadline:
            time.sleep(min(interval / 2, max(deadline - time.monotonic(), 0)))
            now, now_etag = self.read()
            if now is None:  # released meanwhile: create it afresh
                return None, None
            if (
                now_etag != etag
                or now.get("owner") != current.get("owner")
                or now["expires"] != current["expires"]
            ):
                raise self._held_error(now)
        log.warning(
            "%s: taking over the lease of %r: not renewed for %.0f s (its writer stopped)",
            self.prefix_uri,
            current.get("owner"),
            2.5 * interval,
        )
        return current, etag

    def renew(self) -> None:
        """Extend the lease; LeaseLostError when it is no longer ours."""
        from botocore.exceptions import BotoCoreError, ClientError

        if self.lost:
            raise LeaseLostError(self.lost)
        current, etag = self.read()
        if current is None or current.get("owner") != self.owner:
            holder = current.get("owner") if current else "nobody (it was deleted)"
            self.lost = (
                f"{self.prefix_uri}: this run's lease is now held by {holder!r}; it stops writing there"
            )
            raise LeaseLostError(self.lost)
        try:
            self._etag = self._put(**({"IfMatch": etag} if etag else {})) or self._etag
        except (BotoCoreError, ClientError) as err:
            if _condition_failed(err):
                self.lost = f"{self.prefix_uri}: this run's lease was taken over while it was renewed"
                raise LeaseLostError(self.lost) from None
            raise s3.wrap_error(err, self.uri, "renew the lease") from None

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.renew()
            except LeaseLostError as err:
                log.error("%s", err)
                return
            except s3.StorageError as err:  # the bucket is unreachable for now: try again next time
                log.warning("%s: could not renew the lease (%s); trying again", self.prefix_uri, err)

    def check(self) -> None:
        """LeaseLostError when the lease stopped being ours (call before each write)."""
        if self.lost:
            raise LeaseLostError(self.lost)

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours (never another owner's)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            current, etag = self.read()
            if current is not None and current.get("owner") == self.owner:
                condition = {"IfMatch": etag} if etag else {}
                self._s3().delete_object(Bucket=self.bucket, Key=self.key, **condition)
                log.info("%s: lease released", self.prefix_uri)
        except Exception as err:  # it expires by itself; never hide the job's own outcome
            log.warning("%s: could not release the lease (%s); it expires by itself", self.prefix_uri, err)

    def __enter__(self) -> PrefixLease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = ["LEASE_NAME", "LeaseHeldError", "LeaseLostError", "PrefixLease", "new_owner_id"]
