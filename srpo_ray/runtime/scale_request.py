"""Scale requests: how `python -m srpo_ray.scale` asks a running job to resize its rollout fleet.

    python -m srpo_ray.scale --run-dir runs/my-run --rollout-workers 4

writes `<run_dir>/scale_request.json` (atomically: a reader never sees half a file).
The driver's rollout fleet reads it at its next generate() call and starts or retires
generation workers until it has that many: new ones get the current weights before
they serve; a retired one finishes the chunk it is working on first. The file stays,
so a run resumed from a checkpoint comes back at the requested size; write a new
request to change it. Pure Python: no Ray.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

REQUEST_FILE = "scale_request.json"


class ScaleRequestError(ValueError):
    """A scale request (command line or file) is malformed; the message says how to fix it."""


@dataclass(frozen=True)
class ScaleRequest:
    rollout_workers: int
    request_id: str  # a fresh id per request: the fleet applies each one once
    requested_at: float  # time.time() when written


def write_scale_request(run_dir: str | Path, rollout_workers: int) -> ScaleRequest:
    """Ask the run in `run_dir` to run `rollout_workers` generation workers."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ScaleRequestError(f"--run-dir {run_dir}: no such directory; pass the run's trainer.run_dir "
                                "(where its metrics.jsonl is written)")
    if isinstance(rollout_workers, bool) or not isinstance(rollout_workers, int) or rollout_workers < 1:
        raise ScaleRequestError(f"--rollout-workers {rollout_workers!r}: must be a whole number >= 1")
    request = ScaleRequest(rollout_workers, uuid.uuid4().hex, time.time())
    fd, tmp = tempfile.mkstemp(prefix=f".{REQUEST_FILE}.", dir=run_dir)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(request), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, run_dir / REQUEST_FILE)  # atomic: the old or the new request, never half
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return request


def read_scale_request(run_dir: str | Path) -> ScaleRequest | None:
    """The request in `run_dir`, None if there is none; ScaleRequestError if malformed."""
    path = Path(run_dir) / REQUEST_FILE
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
        request = ScaleRequest(int(data["rollout_workers"]), str(data["request_id"]), float(data["requested_at"]))
    except (ValueError, KeyError, TypeError) as e:
        raise ScaleRequestError(f"{path} is not a scale request ({e}); write it with "
                                "`python -m srpo_ray.scale --run-dir ... --rollout-workers N`") from None
    if request.rollout_workers < 1:
        raise ScaleRequestError(f"{path}: rollout_workers={request.rollout_workers}, must be >= 1")
    return request
