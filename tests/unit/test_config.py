from pathlib import Path

import pytest

from srpo_ray.config.load import CONFIG_DIR, ConfigError, load_config, parse_cli

ALL_CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=[p.name for p in ALL_CONFIGS])
def test_every_shipped_config_loads(path: Path):
    cfg = load_config(path, ["model.path=/some/model"])
    assert cfg.stages and cfg.rollout.n >= 2


def test_paper_config_matches_the_published_setting():
    cfg = load_config(CONFIG_DIR / "srpo_qwen32b.yaml")
    assert (cfg.trainer.prompts_per_step, cfg.rollout.n) == (256, 32)
    assert cfg.optim.lr == 1e-6 and cfg.optim.betas == [0.9, 0.95]
    assert cfg.algo.kl_coef == 0.0 and cfg.algo.loss_agg == "token-mean"
    assert [s.domains for s in cfg.stages] == [["math"], ["math", "code"]]


def test_default_is_used_without_config_file():
    cfg, resume = parse_cli(["trainer.total_steps=3"])
    assert cfg.trainer.total_steps == 3 and not resume
    assert cfg.model.path.startswith("builtin:")


@pytest.mark.parametrize("override, named", [
    ("trainer.totl_steps=3", "trainer.totl_steps"),
    ("trainer.total_steps=many", "trainer.total_steps"),
    ("nonsense=1", "nonsense"),
    ("rollout.n=1", "rollout.n"),
    ("stages.0.domains=[all]", "stages.0.domains"),
    ("algo.loss_agg=sum", "algo.loss_agg"),
    ("trainer.total_steps", "key=value"),
])
def test_bad_override_names_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.").replace("[", r"\[")):
        load_config(None, [override])


def test_bad_yaml_key_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout:\n  temprature: 0.7\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*rollout\.temprature"):
        load_config(bad)


def test_missing_required_key_is_named(tmp_path):
    bad = tmp_path / "stages.yaml"
    bad.write_text("stages:\n  - domains: [math]\n")
    with pytest.raises(ConfigError, match="name"):
        load_config(bad)


def test_missing_config_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_stage_without_switch_rule_is_rejected():
    with pytest.raises(ConfigError, match="switch rule"):
        load_config(None, ["stages.0.until_steps=null"])


def test_text_overrides_that_look_like_yaml_mappings_stay_text():
    cfg = load_config(None, ["data.system_prompt=Answer: end with \\boxed{17}.", "reward.format_pattern=[0-9]+"])
    assert cfg.data.system_prompt == "Answer: end with \\boxed{17}." and cfg.reward.format_pattern == "[0-9]+"
    with pytest.raises(ConfigError, match="trainer.total_steps"):
        load_config(None, ["trainer.total_steps={a: 1}"])


def test_host_heap_is_checked_and_the_removed_low_host_memory_is_an_unknown_key():
    for role in ("learner", "rollout"):
        with pytest.raises(ConfigError, match=rf"{role}.host_heap: must be auto, reuse, trim, compact, not 'fast'"):
            load_config(None, [f"{role}.host_heap=fast"])
        assert getattr(load_config(None, []), role).host_heap == "auto"
    # the key before learner.host_heap (true meant compact) is gone
    with pytest.raises(ConfigError, match="unknown key 'learner.low_host_memory'"):
        load_config(None, ["learner.low_host_memory=true"])
