"""The difficulty pre-pass's output and the training filter it drives: the pass-rate
file (written whole or not at all), its reader's errors, data.pass_rate_band in config
validation. The start-up checks' filter and the pre-pass on real workers are in
tests/ray/test_difficulty_run.py."""
from __future__ import annotations

from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from srpo_ray.config.load import ConfigError, load_config
from srpo_ray.data.pass_rates import keep_in_band, read_pass_rates
from srpo_ray.data.verl_rows import DataError
from srpo_ray.difficulty import histogram, pass_rate_table, write_pass_rates


def problem(pid, source, correct):
    return SimpleNamespace(prompt_id=pid, source=source, correct=correct)


def rates_file(path, rates):
    table = pass_rate_table(SimpleNamespace(problems=[problem(pid, "s", [True] * round(r * 4) + [False] * (4 - round(r * 4)))
                                                      for pid, r in rates.items()]))
    write_pass_rates(table, path)
    return path


def test_the_pass_rate_table_counts_each_prompts_correct_samples(tmp_path):
    table = pass_rate_table(SimpleNamespace(problems=[problem("a", "math", [True, False, True, True]),
                                                      problem("b", "code", [False] * 4)]))
    assert table.column_names == ["prompt_id", "data_source", "k", "correct", "pass_rate"]
    assert table.to_pylist() == [{"prompt_id": "a", "data_source": "math", "k": 4, "correct": 3, "pass_rate": 0.75},
                                 {"prompt_id": "b", "data_source": "code", "k": 4, "correct": 0, "pass_rate": 0.0}]
    out = tmp_path / "sub" / "rates.parquet"
    write_pass_rates(table, out)
    assert pq.read_table(out).equals(table) and list(out.parent.iterdir()) == [out]  # no temporary left
    assert read_pass_rates(out) == {"a": 0.75, "b": 0.0}


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    def broken(table, where):
        open(where, "wb").write(b"half")
        raise OSError("disk full")
    monkeypatch.setattr(pq, "write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        write_pass_rates(pa.table({"prompt_id": ["a"], "pass_rate": [0.5]}), tmp_path / "rates.parquet")
    assert list(tmp_path.iterdir()) == []


def test_the_histogram_bins_never_always_and_the_quarters_between():
    text = histogram([0.0, 0.0, 0.5, 1.0, 0.9375, 0.0625], 16)
    lines = text.splitlines()
    assert lines[0] == "pass rate at k=16 | prompts"
    assert [int(line.split("|")[1].split()[0]) for line in lines[1:]] == [2, 1, 1, 0, 1, 1]


def test_bad_pass_rate_files_are_named(tmp_path):
    with pytest.raises(DataError, match="no such file.*srpo_ray.difficulty"):
        read_pass_rates(tmp_path / "none.parquet")
    (tmp_path / "text.parquet").write_text("prompt_id,pass_rate\n")
    with pytest.raises(DataError, match="not a parquet file"):
        read_pass_rates(tmp_path / "text.parquet")
    pq.write_table(pa.table({"id": ["a"], "rate": [0.5]}), tmp_path / "cols.parquet")
    with pytest.raises(DataError, match=r"no column \['prompt_id', 'pass_rate'\]"):
        read_pass_rates(tmp_path / "cols.parquet")
    pq.write_table(pa.table({"prompt_id": ["a"], "pass_rate": [1.5]}), tmp_path / "range.parquet")
    with pytest.raises(DataError, match="'a' has pass rate 1.5"):
        read_pass_rates(tmp_path / "range.parquet")
    pq.write_table(pa.table({"prompt_id": ["a", "a"], "pass_rate": [0.5, 0.5]}), tmp_path / "twice.parquet")
    with pytest.raises(DataError, match="'a' appears twice"):
        read_pass_rates(tmp_path / "twice.parquet")


def test_the_band_keeps_its_ends_and_names_prompts_without_a_rate():
    prompts = [SimpleNamespace(prompt_id=pid) for pid in "abcd"]
    rates = {"a": 0.0, "b": 0.25, "c": 1.0, "d": 0.99}
    assert [p.prompt_id for p in keep_in_band(prompts, rates, [0.01, 0.99])] == ["b", "d"]
    assert [p.prompt_id for p in keep_in_band(prompts, rates, [0.0, 1.0])] == ["a", "b", "c", "d"]
    with pytest.raises(DataError, match=r"1 of 4 training prompts have no pass rate \(e.g. \['d'\]\)"):
        keep_in_band(prompts, {"a": 0.0, "b": 0.25, "c": 1.0}, [0, 1])
    with pytest.raises(DataError, match="keeps none of the 4"):
        keep_in_band(prompts, rates, [0.5, 0.6])


def test_config_needs_a_band_of_two_rates_and_a_file():
    with pytest.raises(ConfigError, match=r"data.pass_rate_band: is \[0.9, 0.1\]"):
        load_config(None, ["data.pass_rate_band=[0.9,0.1]", "data.pass_rates=x.parquet"])
    with pytest.raises(ConfigError, match=r"data.pass_rate_band: is \[0.5\]"):
        load_config(None, ["data.pass_rate_band=[0.5]", "data.pass_rates=x.parquet"])
    with pytest.raises(ConfigError, match="data.pass_rates, which is not set"):
        load_config(None, ["data.pass_rate_band=[0.01,0.99]"])
    assert load_config(None, ["data.pass_rate_band=[0.01,0.99]", "data.pass_rates=x.parquet"]).data.pass_rate_band \
        == [0.01, 0.99]


def test_pass_rate_files_in_a_config_file_are_found_from_its_folder(tmp_path, monkeypatch):
    folder = tmp_path / "exp"
    folder.mkdir()
    (folder / "run.yaml").write_text("data:\n  pass_rates: rates.parquet\n  pass_rate_band: [0.01, 0.99]\n"
                                     "resample:\n  seed_from: ../shared/rates.parquet\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(folder / "run.yaml")
    assert cfg.data.pass_rates == "exp/rates.parquet" and cfg.resample.seed_from == "shared/rates.parquet"
