"""Bring your own data and scorer (issue 24) through the real driver command, stopped by
its start-up checks before any actor starts (so each case takes seconds): a mapping
entry removed on the command line really is gone, and the example config's plug-in
path resolves from any working folder. (The eval command's use of a checkpoint's own
config: tests/ray/test_eval_run.py; per-source training metrics: tests/ray/test_integration.py.)"""
from __future__ import annotations

import runpy
from pathlib import Path

from srpo_ray.data.parquet import write_verl_parquet
from srpo_ray.driver import main

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "configs" / "plugin_example.yaml"


def _puzzles(path: Path) -> Path:
    rows = runpy.run_path(str(REPO / "configs/plugins/word_tasks.py"))["word_rows"]()
    write_verl_parquet(rows, path)
    return path


def test_the_example_runs_from_another_folder_and_its_plugin_entry_can_be_removed(
        tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # not the checkout: the config's relative paths are taken from configs/
    words = _puzzles(tmp_path / "words.parquet")
    base = ["--config", str(EXAMPLE), f"model.path={tiny_model_dir}", f"data.train_files=[{words}]"]
    # the plug-in is found from here; the stop is the data's: no arithmetic for stage 2's weights
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "reward.custom_functions" not in err and "no rows with data_source ['builtin/arithmetic']" in err, err
    # the entry removed on the command line is gone: its rows have no scorer now
    assert main([*base, "~reward.custom_functions.wordplay"]) == 2
    err = capsys.readouterr().err
    assert "unknown domain 'wordplay'" in err and "reward.custom_functions.wordplay=" in err, err
    assert main([*base, "reward.custom_functions={}"]) == 2  # replaced by an empty mapping: the same
    assert "unknown domain 'wordplay'" in capsys.readouterr().err
    # a relative plug-in path on the command line is taken from the working folder, and says so
    assert main([*base, "reward.custom_functions.wordplay=plugins/reward_plugin.py:compute_score"]) == 2
    err = capsys.readouterr().err
    assert f"taken from the working folder, {tmp_path}" in err, err
