"""Resize a running job's rollout fleet from the command line:

    python -m srpo_ray.scale --run-dir runs/my-run --rollout-workers 4

writes `<run_dir>/scale_request.json` (srpo_ray/runtime/scale_request.py), which the
driver's rollout fleet applies at its next generate() call. Pure Python: no Ray.
"""
from __future__ import annotations

import argparse
import sys

from srpo_ray.runtime.scale_request import REQUEST_FILE, ScaleRequestError, read_scale_request, write_scale_request

__all__ = ["REQUEST_FILE", "main", "read_scale_request", "write_scale_request"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m srpo_ray.scale",
                                 description="Resize the rollout fleet of a running srpo-ray job.")
    ap.add_argument("--run-dir", required=True, help="the run's trainer.run_dir")
    ap.add_argument("--rollout-workers", required=True, type=int, help="generation workers wanted (>= 1)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        request = write_scale_request(args.run_dir, args.rollout_workers)
    except ScaleRequestError as e:
        print(f"srpo_ray.scale: error: {e}", file=sys.stderr)
        return 2
    print(f"requested {request.rollout_workers} rollout workers (request {request.request_id[:8]}); the run "
          f"applies it at its next rollout round")
    return 0


if __name__ == "__main__":
    sys.exit(main())
