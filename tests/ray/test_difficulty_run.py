"""The difficulty pre-pass on the real roles (`python -m srpo_ray.difficulty`: vLLM and
the reward workers) on the scripted tiny model, whose answers are known
(tests/scripted_model.py: \\boxed{7} at a low temperature), and the start-up checks'
data.pass_rate_band filter on the bundled data."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from helpers_run import write_eval_data

from srpo_ray.config.load import load_config
from srpo_ray.data.parquet import load_prompts
from srpo_ray.data.verl_rows import DataError
from srpo_ray.difficulty import main as difficulty_main
from srpo_ray.difficulty import write_pass_rates

pytestmark = pytest.mark.slow


def rates_file(path, rates):
    import pyarrow as pa

    write_pass_rates(pa.table({"prompt_id": list(rates), "pass_rate": list(rates.values())}), path)
    return path


def test_the_pre_pass_writes_each_training_prompts_pass_rate(scripted_model_dir, tmp_path, capsys):
    from local_ray import ensure_local_ray

    ensure_local_ray()
    data = write_eval_data(tmp_path / "train.parquet")  # answers 7, 7 (sevens); 7, 3 (mixed)
    out = tmp_path / "rates" / "pass_rates.parquet"
    assert difficulty_main(["--config", "configs/tiny_test.yaml", "--model", scripted_model_dir, "--data", str(data),
                            "--k", "4", "--out", str(out), "rollout.temperature=0.02"]) == 0
    table = pq.read_table(out).to_pylist()
    assert {r["prompt_id"]: (r["data_source"], r["k"], r["correct"], r["pass_rate"]) for r in table} == {
        "sevens-0": ("sevens", 4, 4, 1.0), "sevens-1": ("sevens", 4, 4, 1.0),
        "mixed-0": ("mixed", 4, 4, 1.0), "mixed-1": ("mixed", 4, 0, 0.0)}
    # the ids are the ones training uses for the same file
    assert sorted(r["prompt_id"] for r in table) == sorted(p.prompt_id for p in load_prompts([str(data)]))
    printed = capsys.readouterr().out
    assert "pass rate at k=4 | prompts" in printed and "1 (always solved) |      3" in printed
    assert (tmp_path / "rates" / "pass_rates_samples" / "results.json").is_file()
    # bad input: one line on stderr, exit status 2, nothing written
    assert difficulty_main(["--config", "configs/tiny_test.yaml", "--model", scripted_model_dir, "--data",
                            str(data), "--k", "0", "--out", str(tmp_path / "zero.parquet")]) == 2
    assert difficulty_main(["--config", "configs/tiny_test.yaml", "--model", scripted_model_dir, "--data",
                            str(tmp_path / "absent.parquet"), "--out", str(tmp_path / "absent_rates.parquet")]) == 2
    assert not (tmp_path / "zero.parquet").exists() and not (tmp_path / "absent_rates.parquet").exists()
    err = capsys.readouterr().err
    assert "srpo_ray.difficulty: error: --k 0" in err and "absent.parquet" in err


def test_the_start_up_checks_train_on_the_band_only(tiny_model_dir, tmp_path):
    from srpo_ray.runtime.build import preflight

    prompts = load_prompts(["builtin:tiny_math_code"])
    rates = {p.prompt_id: (0.5 if i % 3 else 1.0) for i, p in enumerate(prompts)}
    path = rates_file(tmp_path / "rates.parquet", rates)
    cfg = load_config(None, [f"model.path={tiny_model_dir}", "data.train_files=[builtin:tiny_math_code]",
                             f"data.pass_rates={path}", "data.pass_rate_band=[0.01,0.99]", "eval.files=[]"])
    kept = preflight(cfg).prompts
    assert [p.prompt_id for p in kept] == [pid for pid, r in rates.items() if r == 0.5]
    rates_file(path, {pid: r for pid, r in list(rates.items())[1:]})  # one training prompt missing
    with pytest.raises(DataError, match="1 of .* training prompts have no pass rate"):
        preflight(cfg)
    # resample.seed_from needs the pre-pass's counts, and is checked at start-up too
    cfg = load_config(None, [f"model.path={tiny_model_dir}", "data.train_files=[builtin:tiny_math_code]",
                             f"resample.seed_from={path}", "eval.files=[]"])
    with pytest.raises(DataError, match=r"resample.seed_from=.*no column \['correct', 'k'\]"):
        preflight(cfg)
