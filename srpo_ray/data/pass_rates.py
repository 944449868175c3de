"""Pass rates from the difficulty pre-pass (`python -m srpo_ray.difficulty`), and the
training data filter they drive (data.pass_rates + data.pass_rate_band)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from srpo_ray.data.verl_rows import DataError
from srpo_ray.records import Prompt

if TYPE_CHECKING:
    import pyarrow as pa

NEEDED = ("prompt_id", "pass_rate")


def read_pass_rates(path: str | Path, key: str = "data.pass_rates") -> dict[str, float]:
    """prompt_id -> pass rate, from a pre-pass file. DataError (naming `key`) when the file
    is missing, unreadable, lacks a column, or holds a rate outside [0, 1] or an id twice."""
    table = _read(path, key, NEEDED)
    ids, rates = table.column("prompt_id").to_pylist(), table.column("pass_rate").to_pylist()
    out: dict[str, float] = {}
    for pid, rate in zip(ids, rates):
        if rate is None or not 0 <= rate <= 1:
            raise DataError(f"{key}={path}: prompt {pid!r} has pass rate {rate!r}, not in [0, 1]")
        if str(pid) in out:
            raise DataError(f"{key}={path}: prompt {pid!r} appears twice")
        out[str(pid)] = float(rate)
    return out


def read_outcomes(path: str | Path, key: str = "resample.seed_from") -> dict[str, tuple[int, int]]:
    """prompt_id -> (correct, k) from a pre-pass file (what seeds the ledger)."""
    table = _read(path, key, ("prompt_id", "correct", "k"))
    out: dict[str, tuple[int, int]] = {}
    for pid, correct, k in zip(*(table.column(c).to_pylist() for c in ("prompt_id", "correct", "k"))):
        if k is None or correct is None or not 0 <= correct <= k or k < 1:
            raise DataError(f"{key}={path}: prompt {pid!r} has {correct!r} correct of k={k!r} samples")
        if str(pid) in out:
            raise DataError(f"{key}={path}: prompt {pid!r} appears twice")
        out[str(pid)] = (int(correct), int(k))
    return out


def _read(path: str | Path, key: str, columns: Sequence[str]) -> "pa.Table":
    import pyarrow.parquet as pq

    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"{key}={path}: no such file; write it with "
                        "`python -m srpo_ray.difficulty --data <the training data> --out FILE`")
    try:
        table = pq.read_table(file)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear error
        raise DataError(f"{key}={path}: not a parquet file ({e})") from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(f"{key}={path}: no column {missing} (has {table.column_names}); "
                        "write it with `python -m srpo_ray.difficulty`")
    return table


def outcomes_for(prompts: list[Prompt], outcomes: dict[str, tuple[int, int]],
                 source: str = "resample.seed_from") -> dict[str, tuple[int, int]]:
    """The outcomes of the training prompts; DataError when none of the file's ids is a
    training prompt's (the pre-pass ran on other data)."""
    ids = {p.prompt_id for p in prompts}
    kept = {pid: o for pid, o in outcomes.items() if pid in ids}
    if not kept:
        raise DataError(f"{source}: none of its {len(outcomes)} prompt ids is a training prompt's (e.g. "
                        f"{list(outcomes)[:3]}): run `python -m srpo_ray.difficulty` on data.train_files")
    return kept


def keep_in_band(prompts: list[Prompt], rates: dict[str, float], band: Sequence[float],
                 source: str = "data.pass_rates") -> list[Prompt]:
    """The prompts whose pass rate lies in [low, high]. Every prompt needs a rate: ids the
    file lacks are a DataError naming a few (the pre-pass ran on other data)."""
    low, high = float(band[0]), float(band[1])
    unknown = [p.prompt_id for p in prompts if p.prompt_id not in rates]
    if unknown:
        raise DataError(f"{source}: {len(unknown)} of {len(prompts)} training prompts have no pass rate "
                        f"(e.g. {unknown[:3]}): run `python -m srpo_ray.difficulty` on data.train_files")
    kept = [p for p in prompts if low <= rates[p.prompt_id] <= high]
    if not kept:
        raise DataError(f"data.pass_rate_band=[{low}, {high}] keeps none of the {len(prompts)} training "
                        "prompts: widen the band (the pre-pass printed their histogram)")
    return kept
