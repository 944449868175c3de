"""The bottom of the data package: the error every data problem raises, and rows in the
column layout verl users already have (built in code, written to parquet)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq


class DataError(ValueError):
    """A data file or row is unusable; the message names the file, the row and the fix."""


def verl_row(source: str, ability: str, question: str, truth: str, row_id: str, split: str = "train",
             **extra_info: str) -> dict:
    """One row in verl layout: a single user message, a rule-based ground truth."""
    return {
        "data_source": source,
        "prompt": [{"role": "user", "content": question}],
        "ability": ability,
        "reward_model": {"style": "rule", "ground_truth": truth},
        "extra_info": {"id": row_id, "split": split, **extra_info},
    }


def write_verl_parquet(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Write rows in verl layout (used by the builtin set and by tests). Atomic."""
    import pyarrow as pa

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    tmp.replace(path)
