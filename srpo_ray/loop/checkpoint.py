"""Atomic checkpoints: a checkpoint is written into `step_NNNNNN.tmp/`, every file is
flushed to disk, then the folder is renamed to `step_NNNNNN/` and `latest` is replaced
atomically. A run killed mid-write leaves only a `.tmp` folder, which is ignored and
cleaned up; the previous checkpoint stays intact.

Layout of one checkpoint:
    hf/               model weights in Hugging Face format (+ tokenizer): transformers
                      and vLLM load it directly
    learner/          optimizer and sharded model state of every learner rank
    trainer_state.pt  step, policy version, ledger, stage schedule, RNG states
    config.yaml       the run's full config
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from srpo_ray.fileio import fsync_dir, fsync_file, fsync_tree


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep: int = 2):
        self.root = Path(run_dir).expanduser().resolve() / "checkpoints"
        self.keep = max(1, keep)
        self.root.mkdir(parents=True, exist_ok=True)

    def begin(self, step: int) -> Path:
        """A fresh temp folder to write the checkpoint of `step` into."""
        tmp = self.root / f"step_{step:06d}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, tmp: Path, step: int) -> Path:
        """Make the checkpoint in `tmp` the latest one, atomically."""
        fsync_tree(tmp)
        final = self.root / f"step_{step:06d}"
        if final.exists():  # re-saving the same step (e.g. final save after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(self.root)
        pointer = self.root / "latest.tmp"
        pointer.write_text(final.name + "\n")
        fsync_file(pointer)
        os.replace(pointer, self.root / "latest")
        fsync_dir(self.root)
        self._prune(final)
        return final

    def latest(self) -> Path | None:
        """The newest committed checkpoint, or None."""
        return latest_checkpoint(self.root)

    def clean_partial(self) -> list[Path]:
        """Remove `.tmp` folders left by a run killed while saving."""
        partial = sorted(self.root.glob("step_*.tmp"))
        for p in partial:
            shutil.rmtree(p, ignore_errors=True)
        return partial

    def _committed(self) -> list[Path]:
        return _committed(self.root)

    def _prune(self, newest: Path) -> None:
        old = [p for p in self._committed() if p != newest]
        for p in old[: max(0, len(old) - (self.keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest committed checkpoint in `root` (a run's checkpoints/ folder), or None:
    the one `latest` names, else the highest step_N/."""
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if candidate.is_dir():
            return candidate
    committed = _committed(root)
    return committed[-1] if committed else None


def _committed(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
