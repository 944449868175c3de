"""What happens to responses cut at the length limit (config `algo.overlong`).

truncate: scored as they are (a cut response usually has no final answer: reward 0).
filter:   excluded from the gradient: their reward is replaced by their group's mean
          over the uncut samples, so their advantage is 0 and the rest keep theirs.
penalty:  a soft length penalty (DAPO-style) over the last `overlong_buffer_frac` of the
          allowed length, growing linearly from 0 to -1 at the cap.
"""
from __future__ import annotations

OVERLONG_BUFFER_FRAC = 0.25  # share of max_new_tokens over which the soft penalty grows


def apply_overlong_policy(scored: list, mode: str, max_new_tokens: int) -> tuple[list[list[float]], dict]:
    """ScoredGroups -> rewards [G][n] to compute advantages from, and metrics."""
    rewards: list[list[float]] = []
    cut_count = total = 0
    buffer = max(1, int(max_new_tokens * OVERLONG_BUFFER_FRAC))
    for sg in scored:
        row = list(sg.rewards)
        cut = [s.finish_reason == "length" for s in sg.group.samples]
        cut_count += sum(cut)
        total += len(cut)
        if mode == "filter" and any(cut):
            kept = [r for r, c in zip(row, cut) if not c]
            fill = sum(kept) / len(kept) if kept else 0.0
            row = [fill if c else r for r, c in zip(row, cut)]
        elif mode == "penalty":
            start = max_new_tokens - buffer
            row = [r - min(1.0, max(0.0, (s.num_tokens - start) / buffer))
                   for r, s in zip(row, sg.group.samples)]
        rewards.append(row)
    return rewards, {"overlong/frac": cut_count / max(1, total)}
