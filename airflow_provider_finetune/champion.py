"""Champion/challenger bookkeeping for retraining DAGs.

The current champion of a model line is one JSON object in the bucket,
``s3://<bucket>/champions/<line>/champion.json``: its model URI, the experiment config it was
trained with (the next challenger starts from it), its held-out loss and where it came from, and the
held-out set the line is scored on (``heldout_data``): pinned by the line's first champion, so a
challenger scored on any other set is refused rather than compared with a loss it cannot be compared to.
Every decision, promoted or not, is kept beside it under ``decisions/<run id>.json``, so the history
of a line can be read back from the bucket alone. The record also keeps the sha256 of the training data
the champion was trained on (``train_data_sha256``): a scheduled run on unchanged data has nothing
new to learn and is skipped (:meth:`ChampionStore.unchanged_data`). Reads and writes go through the
bucket connection's :class:`~airflow_provider_finetune.hooks.BucketHook` and the engine's storage calls.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from airflow_provider_finetune.exceptions import FinetuneConfigError


@dataclass
class Decision:
    promoted: bool
    reason: str
    challenger_uri: str
    challenger_loss: float
    champion_uri: str | None = None
    champion_loss: float | None = None
    improvement: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(
    scores: list[dict[str, Any]], challenger_uri: str, champion_uri: str | None, min_improvement: float = 0.0
) -> Decision:
    """Promote the challenger only when its held-out loss beats the champion's by more than
    ``min_improvement`` (absolute). With no champion yet, the challenger is promoted. Both losses
    must come from the same evaluation (same held-out data, same code)."""
    by_uri = {s["model_uri"]: s for s in scores}
    if challenger_uri not in by_uri:
        raise ValueError(f"the evaluation has no score for the challenger {challenger_uri}")
    challenger = float(by_uri[challenger_uri]["eval_loss"])
    if challenger != challenger:  # NaN
        return Decision(
            False,
            "the challenger's held-out loss is NaN",
            challenger_uri,
            challenger,
            champion_uri,
            by_uri.get(champion_uri or "", {}).get("eval_loss"),
        )
    if not champion_uri:
        return Decision(
            True, "no champion yet: the first challenger becomes the champion", challenger_uri, challenger
        )
    if champion_uri not in by_uri:
        raise ValueError(f"the evaluation has no score for the champion {champion_uri}")
    champion = float(by_uri[champion_uri]["eval_loss"])
    gain = champion - challenger
    if gain > min_improvement:
        reason = (
            f"challenger loss {challenger:.4f} beats champion "
            f"{champion:.4f} by {gain:.4f} (> {min_improvement})"
        )
        return Decision(True, reason, challenger_uri, challenger, champion_uri, champion, gain)
    reason = (
        f"challenger loss {challenger:.4f} does not beat "
        f"champion {champion:.4f} by more than {min_improvement}"
    )
    return Decision(False, reason, challenger_uri, challenger, champion_uri, champion, gain)


class ChampionStore:
    """The champion record of one model line in the bucket."""

    def __init__(self, bucket: str, line: str, conn_id: str):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", line or ""):
            raise FinetuneConfigError(
                f"model line {line!r}: use letters, digits, '.', '_' and '-' (it names a bucket prefix)"
            )
        self.bucket = bucket
        self.line = line
        self.conn_id = conn_id
        self.prefix = f"champions/{line}"

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}/champion.json"

    def _client(self):
        from airflow_provider_finetune.hooks import BucketHook

        return BucketHook(self.conn_id).storage_client

    def read(self) -> dict[str, Any] | None:
        from finetune_engine.storage import read_bytes

        body = read_bytes(self.uri, client=self._client())
        if body is None:
            return None
        try:
            record = json.loads(body)
        except json.JSONDecodeError as err:
            raise FinetuneConfigError(
                f"{self.uri} is not valid JSON ({err}); fix or delete it to start the line over"
            ) from None
        for name in ("model_uri", "config"):
            if not record.get(name):
                raise FinetuneConfigError(
                    f"{self.uri} has no {name!r}; fix or delete it to start the line over"
                )
        return record

    def data_sha256(self, uri: str, chunk: int = 8 << 20) -> str:
        """The sha256 of one object's content (streamed; the object is never held in memory whole)."""
        import hashlib

        from finetune_engine.storage import parse_uri

        bucket, key = parse_uri(uri)
        try:
            body = self._client().get_object(Bucket=bucket, Key=key)["Body"]
        except Exception as err:  # noqa: BLE001 - named with the URI below
            raise FinetuneConfigError(f"cannot read {uri} to hash it: {str(err)[:300]}") from None
        digest = hashlib.sha256()
        for block in iter(lambda: body.read(chunk), b""):
            digest.update(block)
        return digest.hexdigest()

    def unchanged_data(self, champion: dict[str, Any] | None, train_data: str, sha256: str) -> str | None:
        """Why a challenger would learn nothing new (the champion was trained on exactly this content),
        or None when it would: no champion, a record without a data hash, or other content."""
        if not champion or not champion.get("train_data_sha256"):
            return None
        if champion["train_data_sha256"] != sha256:
            return None
        return (
            f"the training data {train_data} (sha256 {sha256[:12]}...) is the content the champion of line "
            f"{self.line!r} was trained on ({champion.get('model_uri')}, promoted "
            f"{champion.get('promoted_at')}): nothing new to learn, the run is skipped"
        )

    def check_heldout(self, champion: dict[str, Any] | None, heldout_data: str | None) -> None:
        """A challenger of this line is scored on the held-out set the champion record pins, or not at
        all: ``FinetuneConfigError`` names both sets and the fix otherwise. A new line (no champion)
        takes any set, which its first promotion pins."""
        if champion is None:
            return
        pinned = champion.get("heldout_data")
        if not pinned:
            raise FinetuneConfigError(
                f"{self.uri} pins no held-out set (no 'heldout_data'): a challenger cannot be compared with "
                f'its champion; add "heldout_data": "{heldout_data}" to it if the champion was scored on '
                "that set, or start a new line"
            )
        if pinned != heldout_data:
            raise FinetuneConfigError(
                f"model line {self.line!r} is scored on {pinned} (pinned in {self.uri}), but this challenger "
                f"is scored on {heldout_data}: losses on different held-out sets cannot be compared. Score "
                f"on {pinned} (the DAG's heldout_data setting), or start a new line for the new set"
            )

    def record(self, run_id: str, decision: Decision, record: dict[str, Any] | None) -> str:
        """Keep the decision; when promoted, replace the champion record (decision first, so the
        champion never points at an unrecorded promotion). A record scored on another held-out set
        than the current champion's is refused before anything is written."""
        from finetune_engine.storage import put_bytes

        current = self.read()
        if current is not None and current.get("heldout_data") and record is not None:
            self.check_heldout(current, record.get("heldout_data"))
        client = self._client()
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        safe_run = re.sub(r"[^A-Za-z0-9._-]+", "-", run_id).strip("-")
        where = f"s3://{self.bucket}/{self.prefix}/decisions/{safe_run}.json"
        decided = {**decision.as_dict(), "run_id": run_id, "decided_at": stamp}
        put_bytes(
            where, json.dumps(decided, indent=1, sort_keys=True).encode(), "application/json", client=client
        )
        if decision.promoted and record is not None:
            body = {**record, "promoted_at": stamp, "run_id": run_id, "eval_loss": decision.challenger_loss}
            put_bytes(
                self.uri,
                json.dumps(body, indent=1, sort_keys=True).encode(),
                "application/json",
                client=client,
            )
        return where


def tag_mlflow_run(
    tracking_uri: str | None, run_id: str | None, tags: dict[str, str], timeout: float = 10
) -> bool:
    """Set tags on an MLflow run through the tracking server's REST API. Returns False (never
    raises) when tracking is off or the server cannot be reached: the decision itself is already
    recorded in the bucket."""
    if not tracking_uri or not run_id or not tracking_uri.startswith(("http://", "https://")):
        return False
    import requests

    for key, value in tags.items():
        try:
            r = requests.post(
                f"{tracking_uri.rstrip('/')}/api/2.0/mlflow/runs/set-tag",
                json={"run_id": run_id, "key": key, "value": str(value)},
                timeout=timeout,
            )
        except requests.RequestException:
            return False
        if r.status_code != 200:
            return False
    return True
