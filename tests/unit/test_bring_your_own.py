"""Bring your own data and scorer (issue 24), the pure parts: command-line overrides that
replace or clear a mapping, relative paths in a config file taken from its folder, a
plug-in's `answered` and eval's answered_frac, per-source training metrics,
reward.custom_binarize, and every path the files in configs/ name. (The same rules
through the real driver and eval command: tests/ray/test_bring_your_own_cli.py,
tests/ray/test_eval_run.py, tests/ray/test_integration.py.)"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from srpo_ray.config.load import ConfigError, load_config
from srpo_ray.config.schema import RewardConfig
from srpo_ray.eval.runner import _answer
from srpo_ray.eval.scores import ProblemResult, aggregate
from srpo_ray.records import Prompt, RewardResult, RolloutGroup, Sample, ScoredGroup
from srpo_ray.rewards.plugins import CustomRewardPool
from srpo_ray.telemetry.metrics import summarize_rollouts

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "configs" / "plugin_example.yaml"
PLUGIN = REPO / "configs" / "plugins" / "reward_plugin.py"


# ----------------------------------------------------------------- 1. mappings on the command line

@pytest.mark.parametrize("override", ["reward.custom_functions={}", "reward.custom_functions=null",
                                      "reward.custom_functions.wordplay=null", "~reward.custom_functions.wordplay",
                                      "~reward.custom_functions"])
def test_a_mapping_or_its_entry_can_be_cleared_from_the_command_line(override):
    assert load_config(EXAMPLE, [override]).reward.custom_functions == {}


def test_a_mapping_given_whole_replaces_the_one_in_the_file():
    cfg = load_config(EXAMPLE, [f"reward.custom_functions={{other: {PLUGIN}:compute_score}}"])
    assert cfg.reward.custom_functions == {"other": f"{PLUGIN}:compute_score"}
    cfg = load_config(None, ["reward.math_answer_modes={mine: verify}"])  # replaces the bundled list
    assert cfg.reward.math_answer_modes == {"mine": "verify"}
    cfg = load_config(None, ["reward.math_answer_modes.mine=verify"])  # one entry: added to it
    assert cfg.reward.math_answer_modes["mine"] == "verify" and len(cfg.reward.math_answer_modes) > 1


def test_a_mapping_that_may_be_null_still_takes_null():
    assert load_config(None, ["stages.1.source_weights={a: 1}", "stages.1.source_weights=null"]).stages[1].source_weights is None


@pytest.mark.parametrize("override, message", [
    ("~reward.custom_functions.nope", "has no entry 'nope' to remove"),
    ("reward.custom_functions.nope=null", "has no entry 'nope' to remove"),
    ("~trainer.total_steps", "cannot be removed, set it instead"),
    ("reward={}", "would change nothing"),
    ("~reward.custom_functions.wordplay=x", "without a value"),
])
def test_an_override_that_would_do_nothing_is_an_error(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(EXAMPLE, [override])


# ----------------------------------------------------------------- 2. paths in a config file

def test_relative_paths_in_a_config_file_are_taken_from_its_folder(tmp_path, monkeypatch):
    folder = tmp_path / "cfgs"
    (folder / "plugins").mkdir(parents=True)
    (folder / "plugins" / "mine.py").write_text("def score(**kw):\n    return 1.0\n")
    (folder / "run.yaml").write_text(yaml.safe_dump({
        "data": {"train_files": ["builtin:math_code", "../data/mine.parquet"]},
        "eval": {"files": ["held.parquet", "builtin:arithmetic_heldout"]},
        "reward": {"custom_functions": {"mine": "plugins/mine.py:score"}}}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(folder / "run.yaml")
    assert cfg.reward.custom_functions == {"mine": f"{folder / 'plugins' / 'mine.py'}:score"}
    assert cfg.data.train_files == ["builtin:math_code", str(tmp_path / "data" / "mine.parquet")]
    assert cfg.eval.files == [str(folder / "held.parquet"), "builtin:arithmetic_heldout"]
    monkeypatch.chdir(tmp_path)  # inside the working folder: relative to it, as before
    cfg = load_config(folder / "run.yaml", ["reward.custom_function=cfgs/plugins/mine.py:score"])
    assert cfg.reward.custom_functions == {"mine": "cfgs/plugins/mine.py:score"}
    assert cfg.reward.custom_function == "cfgs/plugins/mine.py:score"  # command line: the working folder
    assert cfg.data.train_files[1] == "data/mine.parquet"


def test_a_missing_plugin_file_names_the_folder_it_was_looked_up_in(tmp_path, monkeypatch):
    (tmp_path / "run.yaml").write_text("reward:\n  custom_function: plugins/gone.py:score\n")
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match=re.escape(f"taken from that file's folder, {tmp_path}")):
        load_config(tmp_path / "run.yaml")
    with pytest.raises(ConfigError, match=re.escape(f"taken from the working folder, {REPO}")):
        load_config(None, ["reward.custom_function=plugins/gone.py:score"])


def test_the_example_config_finds_its_plugin_from_any_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(EXAMPLE)
    assert cfg.reward.custom_functions == {"wordplay": f"{PLUGIN}:compute_score"}
    assert cfg.data.train_files[1] == str(REPO / "data" / "wordplay.parquet")  # where word_tasks.py writes it
    monkeypatch.chdir(REPO)
    cfg = load_config(EXAMPLE)  # from the checkout: the same strings as before the rule
    assert cfg.reward.custom_functions == {"wordplay": "configs/plugins/reward_plugin.py:compute_score"}
    assert cfg.data.train_files == ["builtin:math_code", "data/wordplay.parquet"]


def test_a_stored_config_keeps_its_paths_and_skips_keys_it_no_longer_knows(tmp_path, monkeypatch, capsys):
    from srpo_ray.config.load import to_yaml
    monkeypatch.chdir(REPO)
    saved = tmp_path / "config.yaml"
    text = to_yaml(load_config(EXAMPLE, ["eval.k=3"]))
    saved.write_text(text.replace("reward:\n", "reward:\n  retired_key: 1\n", 1))
    cfg = load_config(saved, ["eval.k=5"], stored=True)
    assert cfg.reward.custom_functions == {"wordplay": "configs/plugins/reward_plugin.py:compute_score"}
    assert cfg.eval.k == 5 and cfg.data.system_prompt == "Answer briefly."
    assert "reward.retired_key" in capsys.readouterr().err


# ----------------------------------------------------------------- 4 and 6. a plug-in's answer and reward

def _plugin(tmp_path: Path) -> Path:
    path = tmp_path / "partial.py"
    path.write_text("def score(data_source, solution_str, ground_truth, extra_info=None):\n"
                    "    if 'SAYS' in solution_str:\n"
                    "        return {'score': 0.67, 'answered': 'yes' in solution_str}\n"
                    "    return 0.67\n")
    return path


def _prompt(domain: str = "puzzle") -> Prompt:
    return Prompt("p", domain, [{"role": "user", "content": "q"}], "x", data_source="src")


@pytest.mark.parametrize("binarize, reward", [(None, 0.67), (0.5, 1.0), (0.9, 0.0)])
def test_custom_binarize_turns_a_score_into_a_reward(tmp_path, binarize, reward):
    pool = CustomRewardPool(RewardConfig(custom_function=f"{_plugin(tmp_path)}:score", custom_processes=1,
                                         custom_binarize=binarize, custom_correct_threshold=0.6))
    try:
        (result,) = pool.score([(_prompt(), "\\boxed{x}")])
    finally:
        pool.close()
    assert (result.reward, result.correct) == (reward, True)  # the verdict is on the score itself
    assert result.info.get("score", result.reward) == 0.67


def test_custom_binarize_must_be_a_finite_number():
    with pytest.raises(ConfigError, match="reward.custom_binarize"):
        load_config(None, [f"reward.custom_function={PLUGIN}:compute_score", "reward.custom_binarize=.nan"])


def test_answered_is_the_plugins_word_else_the_format_rule(tmp_path):
    pool = CustomRewardPool(RewardConfig(custom_function=f"{_plugin(tmp_path)}:score", custom_processes=1))
    texts = ["SAYS yes", "SAYS no \\boxed{x}", "so \\boxed{x}", "no box", "\\boxed{a} \\boxed{b}"]
    try:
        results = pool.score([(_prompt(), t) for t in texts])
    finally:
        pool.close()
    assert [r.info["answered"] for r in results] == [True, False, True, False, False]
    problem = ProblemResult("p", "src", "custom", [r.correct for r in results],
                            [_answer("puzzle", r.info) for r in results], [1] * 5, [False] * 5)
    assert aggregate([problem], 5, [1])["answered_frac"] == 2 / 5
    assert _answer("puzzle", {"custom": True, "error": "boom", "answered": False}) is None


# ----------------------------------------------------------------- 5. per-source training metrics

def test_training_metrics_per_data_source():
    def group(source: str, domain: str, rewards: list[float]) -> ScoredGroup:
        prompt = Prompt(source, domain, [], "7", data_source=source)
        samples = [Sample([1, 2], [0.0, 0.0], "t", "stop") for _ in rewards]
        return ScoredGroup(RolloutGroup.of(prompt, [1], samples, 0), [RewardResult(r, r == 1.0, {}) for r in rewards])

    out = summarize_rollouts([group("builtin/arithmetic", "math", [1.0, 0.0]), group("gsm 8k", "math", [1.0, 1.0])])
    assert out["reward/source/builtin/arithmetic/mean"] == 0.5 and out["correct/source/builtin/arithmetic/mean"] == 0.5
    assert out["reward/source/gsm_8k/mean"] == 1.0 and out["reward/math/mean"] == 0.75


# ----------------------------------------------------------------- 7. every path named in configs/

# Files a documented command writes (README, "Rewards"): not in the checkout until then.
WRITTEN_BY_A_COMMAND = {"data/wordplay.parquet"}
PATHISH = re.compile(r"(?<![\w/.:-])(?<!from )(?<!import )((?:\.\./|[\w.-]+/)*[\w.-]+\.(?:py|ya?ml|md|parquet|sh|json))\b")
# Not paths to check: outputs (trainer.run_dir) and the placeholder of the spec format.
NOT_INPUTS = re.compile(r"^(runs/|path/to/)")


def _named_paths(path: Path) -> list[str]:
    text = path.read_text()
    names = PATHISH.findall(text)
    if path.suffix in (".yaml", ".yml"):  # values too, whatever their suffix (plug-in specs: file:name)
        def walk(node):
            if isinstance(node, dict):
                for v in node.values():
                    yield from walk(v)
            elif isinstance(node, list):
                for v in node:
                    yield from walk(v)
            elif isinstance(node, str) and "/" in node and not node.startswith("builtin:") and " " not in node:
                yield node.rpartition(":")[0] if re.search(r"\.py:\w+$", node) else node
        names += list(walk(yaml.safe_load(text)))
    return names


@pytest.mark.parametrize("config", sorted((REPO / "configs").rglob("*.yaml")) + sorted((REPO / "configs").rglob("*.py")),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_every_path_named_in_configs_exists(config):
    written = {REPO / w for w in WRITTEN_BY_A_COMMAND}
    missing = []
    for name in _named_paths(config):
        if name.startswith("/") or NOT_INPUTS.match(name):
            continue  # absolute: a user's machine (/models, /data)
        # from the file's folder, the checkout, or configs/ (where a plug-in's config names it)
        candidates = {(config.parent / name).resolve(), REPO / name, REPO / "configs" / name}
        if not candidates & written and not any(c.exists() for c in candidates):
            missing.append(name)
    assert not missing, f"{config.relative_to(REPO)} names paths that do not exist: {missing}"
