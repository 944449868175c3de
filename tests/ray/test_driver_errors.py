"""Bad input stops the driver before any actor starts, with one clear message."""

from srpo_ray.data.parquet import write_verl_parquet
from srpo_ray.driver import main


def test_unknown_key(capsys):
    assert main(["trainer.totl_steps=3"]) == 2
    assert "trainer.totl_steps" in capsys.readouterr().err


def test_missing_model_folder(tmp_path, capsys):
    assert main([f"model.path={tmp_path / 'nope'}"]) == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err


def test_stage_without_data(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "math_only.parquet"
    write_verl_parquet([{"prompt": [{"role": "user", "content": "1+1?"}], "ability": "math",
                         "data_source": "t", "reward_model": {"ground_truth": "2"}}], data)
    assert main([f"model.path={tiny_model_dir}", f"data.train_files=[{data}]"]) == 2
    assert "has no such rows" in capsys.readouterr().err


def test_prompt_too_long(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "long.parquet"
    rows = [{"prompt": [{"role": "user", "content": "word " * 300}], "ability": d, "data_source": "t",
             "reward_model": {"ground_truth": "2" if d == "math" else '[{"input": "", "output": "", "testtype": "stdin"}]'}}
            for d in ("math", "code")]
    write_verl_parquet(rows, data)
    assert main([f"model.path={tiny_model_dir}", f"data.train_files=[{data}]", "data.max_prompt_tokens=64"]) == 2
    assert "data.max_prompt_tokens=64" in capsys.readouterr().err


def test_reward_plugin_that_does_not_exist(tmp_path, capsys):
    assert main([f"reward.custom_functions.t={tmp_path / 'nope.py'}:compute_score"]) == 2
    err = capsys.readouterr().err
    assert "reward.custom_functions.t" in err and "does not exist" in err


def test_unknown_ability_without_a_plugin_names_the_fix(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "logic.parquet"
    write_verl_parquet([{"prompt": [{"role": "user", "content": "p or q?"}], "ability": "logic",
                         "data_source": "t", "reward_model": {"ground_truth": "p"}}], data)
    assert main([f"model.path={tiny_model_dir}", f"data.train_files=[{data}]"]) == 2
    assert "reward.custom_functions.t=" in capsys.readouterr().err


def test_source_weight_for_a_source_not_in_the_data(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "mixed.parquet"
    write_verl_parquet([{"prompt": [{"role": "user", "content": f"{i}+1?"}], "ability": "math",
                         "data_source": "t", "reward_model": {"ground_truth": str(i + 1)}} for i in range(3)], data)
    assert main([f"model.path={tiny_model_dir}", f"data.train_files=[{data}]", "stages=[{name: m, domains: [math]}]",
                 "data.source_weights={t: 1, gsm8k: 2}"]) == 2
    assert "data.source_weights: no rows with data_source ['gsm8k']" in capsys.readouterr().err


def test_reward_plugin_that_fails_to_import(tmp_path, capsys):
    plugin = tmp_path / "plugin.py"
    plugin.write_text("import not_a_module_anywhere\n\ndef compute_score(**kwargs):\n    return 1.0\n")
    assert main([f"reward.custom_function={plugin}:compute_score"]) == 2
    err = capsys.readouterr().err
    assert "reward.custom_function: cannot load `compute_score`" in err and "not_a_module_anywhere" in err


def test_async_on_shared_cpu_cores_warns(caplog, monkeypatch):
    import logging

    from srpo_ray.config.load import load_config
    from srpo_ray.runtime.build import warn_if_async_shares_cores

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    caplog.set_level(logging.WARNING, logger="srpo_ray.runtime.build")
    warn_if_async_shares_cores(load_config(None, []))  # the default: synchronous
    assert not caplog.records
    warn_if_async_shares_cores(load_config(None, ["rollout.steps_ahead=1", "rollout.max_staleness=1"]))
    assert "share this machine's 2 cores" in caplog.text and "rollout.steps_ahead=0" in caplog.text
    caplog.clear()
    split = ["rollout.steps_ahead=1", "rollout.max_staleness=1", "rollout.cpus_per_worker=1", "learner.cpus_per_rank=1"]
    warn_if_async_shares_cores(load_config(None, split))
    assert not caplog.records
