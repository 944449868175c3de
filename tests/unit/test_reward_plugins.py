"""Reward plug-ins (reward.custom_function / custom_functions): verl's compute_score in
capped child processes. Hostile plug-ins score 0, are counted, and never stall a step;
start-up errors name the key; rows of any ability load and train."""
from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from srpo_ray.config.load import ConfigError, RewardConfig, load_config
from srpo_ray.data.parquet import DataError, load_prompts, write_verl_parquet
from srpo_ray.records import Prompt, RewardResult, RolloutGroup, Sample, ScoredGroup
from srpo_ray.rewards import plugins
from srpo_ray.rewards.plugins import CustomRewardPool, check_plugins
from srpo_ray.telemetry.metrics import summarize_rollouts

REPO = Path(__file__).resolve().parents[2]
# A liveness bound, not a speed check: every hostile call below ends within
# custom_timeout_s + the hard slack, so a whole batch near this bound means a stall.
BATCH_BOUND_S = 60.0

HOSTILE = '''
import math, os, sys, time

def good(data_source, solution_str, ground_truth, extra_info=None):
    return {"score": float(solution_str == ground_truth), "length": len(solution_str), "pred": solution_str}

def sleeps(data_source, solution_str, ground_truth, extra_info=None):
    time.sleep(3600)

def swallows_the_alarm(data_source, solution_str, ground_truth, extra_info=None):
    while True:
        try:
            time.sleep(3600)
        except BaseException:
            pass

def allocates(data_source, solution_str, ground_truth, extra_info=None):
    return len(bytearray(1 << 30))  # one block past the cap

def hoards(data_source, solution_str, ground_truth, extra_info=None):
    hoard = []  # grows until the cap (or the deadline, on a slow machine)
    while True:
        hoard.append(bytearray(16 << 20))

def raises(data_source, solution_str, ground_truth, extra_info=None):
    raise KeyError("no such field")

def exits(data_source, solution_str, ground_truth, extra_info=None):
    os._exit(3)

def sys_exits(data_source, solution_str, ground_truth, extra_info=None):
    sys.exit(0)

def string(data_source, solution_str, ground_truth, extra_info=None):
    return "1.0"

def nan(data_source, solution_str, ground_truth, extra_info=None):
    return math.nan

def no_score(data_source, solution_str, ground_truth, extra_info=None):
    return {"acc": 1.0}

def nan_score(data_source, solution_str, ground_truth, extra_info=None):
    return {"score": float("inf")}

def reads_stdin(data_source, solution_str, ground_truth, extra_info=None):
    print("noise on stdout")
    return len(sys.stdin.read())

def wrong_signature(prompt, response):
    return 1.0
'''
HOSTILE_NAMES = ["sleeps", "swallows_the_alarm", "allocates", "hoards", "raises", "exits", "sys_exits", "string", "nan",
                 "no_score", "nan_score", "wrong_signature"]


@pytest.fixture(scope="module")
def hostile_pool(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugins") / "hostile.py"
    path.write_text(HOSTILE)
    cfg = RewardConfig(custom_functions={name: f"{path}:{name}" for name in [*HOSTILE_NAMES, "good", "reads_stdin"]},
                       custom_timeout_s=1.0, custom_memory_mb=512, custom_processes=2)
    old_slack, plugins.HARD_SLACK_S = plugins.HARD_SLACK_S, 0.5
    try:
        pool = CustomRewardPool(cfg)
    finally:
        plugins.HARD_SLACK_S = old_slack
    yield pool
    pool.close()


def prompt(source: str, truth="42", domain="wordplay", **extra) -> Prompt:
    return Prompt(f"{source}-p", domain, [{"role": "user", "content": "q"}], truth, data_source=source,
                  extra_info=extra)


def test_a_plugin_scores_with_verl_keywords_and_returns_its_metrics(hostile_pool):
    right, wrong = hostile_pool.score([(prompt("good"), "42"), (prompt("good"), "41!")])
    assert (right.reward, right.correct) == (1.0, True) and right.info == {"custom": True, "metrics": {"length": 2.0},
                                                                       "answered": False}  # no box: the format rule
    assert (wrong.reward, wrong.correct, wrong.info["metrics"]) == (0.0, False, {"length": 3.0})


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_a_hostile_plugin_scores_zero_is_counted_and_the_next_sample_still_scores(hostile_pool, name):
    start = time.monotonic()
    bad, after = hostile_pool.score([(prompt(name), "42"), (prompt("good"), "42")])
    assert time.monotonic() - start < BATCH_BOUND_S
    assert (bad.reward, bad.correct, bad.info["custom"]) == (0.0, False, True)
    assert bad.info.get("timeout") or bad.info.get("error"), bad.info
    assert (after.reward, after.correct) == (1.0, True)
    metrics = summarize_rollouts([scored_group(prompt(name), [bad, after])])
    assert metrics["reward/custom_errors"] + metrics["reward/custom_timeouts"] == 1
    assert metrics["reward/timeouts"] == 0  # math timeouts are counted apart


def test_what_each_hostile_plugin_is_flagged_as(hostile_pool):
    results = hostile_pool.score([(prompt(name), "42") for name in HOSTILE_NAMES])
    flags = {name: "timeout" if r.info.get("timeout") else r.info["error"] for name, r in zip(HOSTILE_NAMES, results)}
    assert flags["sleeps"] == flags["swallows_the_alarm"] == "timeout"
    assert flags["allocates"] == "out of memory" and flags["hoards"] in ("out of memory", "timeout")
    assert flags["raises"] == "KeyError: 'no such field'"
    assert flags["exits"] == "checker process died"
    assert flags["sys_exits"].startswith("SystemExit")
    assert "'1.0'" in flags["string"] and "nan" in flags["nan"]
    assert "without `score`" in flags["no_score"] and "inf" in flags["nan_score"]
    assert flags["wrong_signature"].startswith("TypeError")


def test_a_plugin_that_prints_or_reads_stdin_cannot_break_the_protocol(hostile_pool):
    (result,) = hostile_pool.score([(prompt("reads_stdin"), "x")])
    assert (result.reward, result.info) == (0.0, {"custom": True, "answered": False})  # stdin is /dev/null: read "" -> 0


def test_a_hostile_batch_is_bounded_by_the_timeouts(hostile_pool):
    calls = [(prompt("sleeps"), "x")] * 4 + [(prompt("good"), "42")] * 4
    start = time.monotonic()
    results = hostile_pool.score(calls)
    assert time.monotonic() - start < 2 * 1.0 + 10  # 4 sleepers on 2 processes, 1 s each (+ slack for load)
    assert [r.reward for r in results] == [0.0] * 4 + [1.0] * 4


def scored_group(p: Prompt, results: list[RewardResult]) -> ScoredGroup:
    samples = [Sample([1], [0.0], "t", "stop") for _ in results]
    return ScoredGroup(RolloutGroup.of(p, [1], samples, 0), results)


def test_plugin_metrics_are_step_means_and_correct_uses_the_threshold(tmp_path):
    path = tmp_path / "graded.py"
    path.write_text("def score(data_source, solution_str, ground_truth, extra_info):\n"
                    "    return {'score': float(solution_str), 'acc': float(solution_str) >= 0.5,\n"
                    "            'pred': 'text is ignored', 'source_len': len(data_source)}\n")
    pool = CustomRewardPool(RewardConfig(custom_function=f"{path}:score", custom_correct_threshold=0.5,
                                         custom_processes=1))
    try:
        results = pool.score([(prompt("src"), "0.25"), (prompt("src"), "0.5"), (prompt("src"), "1")])
    finally:
        pool.close()
    assert [(r.reward, r.correct) for r in results] == [(0.25, False), (0.5, True), (1.0, True)]
    metrics = summarize_rollouts([scored_group(prompt("src"), results)])
    assert metrics["reward/custom/acc/mean"] == pytest.approx(2 / 3)
    assert metrics["reward/custom/source_len/mean"] == 3.0
    assert metrics["reward/custom_errors"] == metrics["reward/custom_timeouts"] == 0
    assert metrics["reward/wordplay/mean"] == pytest.approx(1.75 / 3)


def test_each_file_is_loaded_once_per_process(tmp_path):
    log = tmp_path / "imports.log"
    path = tmp_path / "counted.py"
    path.write_text(f"import os\nopen({str(log)!r}, 'a').write(f'{{os.getpid()}}\\n')\n"
                    "def score(**kwargs):\n    return 1\n")
    pool = CustomRewardPool(RewardConfig(custom_function=f"{path}:score", custom_processes=2))
    try:
        assert [r.reward for r in pool.score([(prompt("s"), "x")] * 20)] == [1.0] * 20
    finally:
        pool.close()
    assert len(log.read_text().split()) == 2


def test_ground_truth_and_extra_info_reach_the_plugin_as_json_values(tmp_path):
    path = tmp_path / "echo.py"
    path.write_text("def score(data_source, solution_str, ground_truth, extra_info):\n"
                    "    ok = ground_truth == {'tests': [1, 2]} and extra_info['k'] == [3] and data_source == 'src'\n"
                    "    return float(ok)\n")
    pool = CustomRewardPool(RewardConfig(custom_function=f"{path}:score", custom_processes=1))
    try:
        (result,) = pool.score([(prompt("src", truth={"tests": (1, 2)}, k=(3,)), "x")])
    finally:
        pool.close()
    assert result.reward == 1.0


# -- start-up errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("body, spec, message", [
    (None, "{dir}/missing.py:score", "does not exist"),
    ("def other(**k):\n    return 1\n", "{path}:score", "defines no top-level `score`"),
    ("def score(:\n", "{path}:score", "not valid Python"),
    ("def score(**k):\n    return 1\n", "{path}", "expected path/to/file.py:function_name"),
    ("def score(**k):\n    return 1\n", "{path}:not-a-name", "expected path/to/file.py:function_name"),
])
def test_a_bad_plugin_spec_is_a_config_error_naming_the_key(tmp_path, body, spec, message):
    path = tmp_path / "plugin.py"
    if body is not None:
        path.write_text(body)
    text = spec.format(dir=tmp_path, path=path)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, [f"reward.custom_functions.gsm8k={text}"])
    assert "reward.custom_functions.gsm8k" in str(err.value)
    with pytest.raises(ConfigError, match="reward.custom_function="):
        load_config(None, [f"reward.custom_function={text}"])


def test_names_bound_by_import_or_assignment_count_as_defined(tmp_path):
    path = tmp_path / "reexport.py"
    path.write_text("from json import loads as score\ntry:\n    import numpy as np\nexcept ImportError:\n"
                    "    np = None\nalias = score\n")
    for name in ("score", "np", "alias"):
        check_plugins(RewardConfig(custom_function=f"{path}:{name}"))


def test_a_plugin_that_fails_to_import_stops_start_up_naming_the_key(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("import not_a_module_anywhere\ndef score(**k):\n    return 1\n")
    with pytest.raises(RuntimeError, match=r"reward.custom_functions.src: cannot load `score`.*ModuleNotFoundError"):
        CustomRewardPool(RewardConfig(custom_functions={"src": f"{path}:score"}, custom_processes=1))


def test_a_non_callable_name_stops_start_up(tmp_path):
    path = tmp_path / "value.py"
    path.write_text("score = 3\n")
    with pytest.raises(RuntimeError, match="is a int, not a function"):
        CustomRewardPool(RewardConfig(custom_function=f"{path}:score", custom_processes=1))


def test_bad_plugin_limits_are_rejected():
    with pytest.raises(ConfigError, match="reward.custom_timeout_s"):
        load_config(None, ["reward.custom_timeout_s=0"])


# -- rows of any ability -----------------------------------------------------------------------

def word_row(ability="wordplay", truth="elppa", source="wordplay", i=0):
    return {"data_source": source, "ability": ability, "prompt": [{"role": "user", "content": f"q{i}"}],
            "reward_model": {"ground_truth": truth}, "extra_info": {"i": i}}


def test_rows_of_any_ability_load_when_a_plugin_scores_their_source(tmp_path):
    words, structs = tmp_path / "words.parquet", tmp_path / "structs.parquet"
    write_verl_parquet([word_row(), word_row("math", "x^2", source="judged_math", i=1)], words)
    write_verl_parquet([word_row("Word Play", {"tests": [1, 2]}, i=2)], structs)
    with pytest.raises(DataError, match=r"unknown domain 'wordplay'.*reward.custom_functions.wordplay="):
        load_prompts([str(words)])
    prompts = load_prompts([str(words), str(structs)], scored_by_plugin=lambda source: True)
    assert [p.domain for p in prompts] == ["wordplay", "math", "word_play"]
    assert prompts[1].ground_truth == "x^2" and prompts[2].ground_truth == {"tests": [1, 2]}  # as the data has it


@pytest.mark.parametrize("ability, message", [("all", "reserved"), ("wörd?", "lowercase letters")])
def test_an_ability_that_cannot_name_a_domain_is_rejected(tmp_path, ability, message):
    path = tmp_path / "bad.parquet"
    write_verl_parquet([word_row(ability)], path)
    with pytest.raises(DataError, match=f"bad.parquet row 0.*{message}"):
        load_prompts([str(path)], scored_by_plugin=lambda source: True)


def test_stages_accept_plugin_domains_and_reject_bad_names():
    cfg = load_config(None, ["stages=[{name: words, domains: [wordplay, math]}]"])
    assert cfg.stages[0].domains == ["wordplay", "math"]
    with pytest.raises(ConfigError, match="stages.0.domains"):
        load_config(None, ["stages=[{name: words, domains: [all]}]"])


def test_the_scorer_routes_plugin_sources_and_keeps_math_and_code_builtin(tmp_path):
    from srpo_ray.rewards.scorer import RewardScorer, check_answer_modes
    path = tmp_path / "plugin.py"
    path.write_text("def score(data_source, solution_str, ground_truth, extra_info):\n"
                    "    return 0.5 if 'x^2' in solution_str else 0.0\n")
    cfg = RewardConfig(custom_functions={"judged": f"{path}:score"}, format_reward=0.1, custom_processes=1,
                       math_answer_modes={"judged": "number"})
    judged = Prompt("j", "math", [{"role": "user", "content": "q"}], "x^2", data_source="judged")
    builtin = Prompt("b", "math", [{"role": "user", "content": "q"}], "4", data_source="other")
    check_answer_modes(cfg, [judged, builtin])  # the number rule does not apply to plug-in rows
    scorer = RewardScorer(cfg)
    try:
        (j,), (b,) = scorer.score_batch([(judged, ["\\boxed{x^2}"]), (builtin, ["\\boxed{4}"])])
    finally:
        scorer.close()
    assert (j.reward, j.correct, j.info) == (0.5, False, {"custom": True, "answered": True})  # no format bonus: the plug-in's score
    assert (b.reward, b.correct, b.info) == (1.1, True, {"answer": "4"})  # math-verify + format bonus


def test_the_example_plugin_scores_the_example_rows(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the example config names the plug-in relative to the checkout
    import runpy
    rows = runpy.run_path(str(REPO / "configs/plugins/word_tasks.py"))["word_rows"]()
    data = tmp_path / "wordplay.parquet"
    write_verl_parquet(rows, data)
    cfg = load_config(REPO / "configs/plugin_example.yaml", [f"data.train_files=[builtin:math_code,{data}]"])
    prompts = load_prompts(cfg.data.train_files, scored_by_plugin=lambda s: plugins.plugin_key(cfg.reward, s) is not None)
    words = [p for p in prompts if p.domain == "wordplay"]
    assert len(words) == len(rows) and {p.domain for p in prompts} == {"math", "code", "wordplay"}
    from srpo_ray.algo.source_mix import check_source_weights
    check_source_weights(cfg, prompts)  # stage 2 mixes arithmetic and puzzles by weight
    pool = CustomRewardPool(cfg.reward)
    try:
        results = pool.score([(words[1], f"So: \\boxed{{{words[1].ground_truth}}}"), (words[1], "no idea")])
    finally:
        pool.close()
    assert [(r.reward, r.correct) for r in results] == [(1.0, True), (0.0, False)]
    assert results[0].info["metrics"]["answered"] == 1.0 and not math.isnan(results[1].info["metrics"]["answer_chars"])
