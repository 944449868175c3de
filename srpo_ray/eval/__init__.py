"""Held-out evaluation: scores (avg@k, pass@k, maj@k), the evaluator that runs on the
training roles, reports, and the `python -m srpo_ray.eval` command. Pure code: the
command alone reaches Ray, through srpo_ray/runtime/build.py."""
