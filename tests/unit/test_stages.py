"""Stage schedule: each switch rule, the last stage, resume, validation, and the
per-stage sampling overrides."""
import pytest

from srpo_ray.algo.stages import StageSchedule, effective_sampling, prompts_per_step
from srpo_ray.config.schema import RolloutConfig, StageConfig, TrainerConfig
from srpo_ray.records import Sampling


def _two(**first) -> StageSchedule:
    return StageSchedule([StageConfig(name="math", domains=["math"], **first),
                          StageConfig(name="math+code", domains=["math", "code"])])


def test_until_steps():
    sched = _two(until_steps=3)
    for _ in range(2):
        sched.record_step({})
        assert not sched.should_switch()
    sched.record_step({})
    assert sched.switch_reason() == "until_steps=3"
    assert sched.advance().name == "math+code"
    assert sched.index == 1 and sched.is_last and sched.steps_in_stage == 0


def test_until_epochs_counts_only_epochs():
    sched = _two(until_epochs=2)
    sched.record_epoch()
    for _ in range(50):
        sched.record_step({})
    assert not sched.should_switch()
    sched.record_epoch()
    assert sched.should_switch() and sched.epochs_in_stage == 2


def test_until_metric_latest_value():
    sched = _two(until_metric="reward/math/mean", until_threshold=0.5)
    sched.record_step({"reward/math/mean": 0.49})
    assert not sched.should_switch()
    sched.record_step({"other": 1.0})  # a step without the metric keeps the last value
    assert not sched.should_switch()
    sched.record_step({"reward/math/mean": 0.5})  # >= threshold
    assert sched.switch_reason().startswith("reward/math/mean=0.5")


def test_until_metric_window_averages_and_needs_a_full_window():
    sched = _two(until_metric="acc", until_threshold=0.5, until_metric_window=3)
    sched.record_step({"acc": 0.9})
    sched.record_step({"acc": float("nan")})  # skipped
    sched.record_step({"acc": 0.9})
    assert not sched.should_switch()  # only 2 values so far
    sched.record_step({"acc": 0.0})
    assert sched.should_switch()  # mean 0.6
    sched.record_step({"acc": 0.0})
    assert not sched.should_switch()  # mean 0.3


def test_last_stage_never_switches_and_cannot_advance():
    sched = StageSchedule([StageConfig(name="only", domains=["math"], until_steps=1)])
    sched.record_step({})
    assert sched.is_last and not sched.should_switch()
    with pytest.raises(RuntimeError, match="last stage"):
        sched.advance()


def test_first_rule_that_holds_switches():
    sched = _two(until_steps=100, until_epochs=1)
    sched.record_epoch()
    assert sched.switch_reason() == "until_epochs=1"


def test_state_roundtrip_and_history():
    sched = _two(until_steps=2, until_metric="acc", until_threshold=2.0, until_metric_window=2)
    sched.record_step({"acc": 1.0})
    saved = sched.state_dict()
    again = _two(until_steps=2, until_metric="acc", until_threshold=2.0, until_metric_window=2)
    again.load_state_dict(saved)
    assert again.state_dict() == saved
    again.record_step({"acc": 1.0})
    assert again.should_switch()
    again.advance()
    assert again.history == [{"from": "math", "to": "math+code", "at_step": 2, "steps_in_stage": 2,
                               "epochs_in_stage": 0, "reason": "until_steps=2"}]
    later = _two(until_steps=2)
    later.load_state_dict(again.state_dict())
    assert later.index == 1 and later.current.name == "math+code" and later.history == again.history


def test_resume_with_other_stages_is_refused():
    sched = _two(until_steps=1)
    sched.record_step({})
    sched.advance()
    other = StageSchedule([StageConfig(name="code", domains=["code"], until_steps=1),
                           StageConfig(name="math+code", domains=["math", "code"])])
    with pytest.raises(ValueError, match="same stages"):
        other.load_state_dict(sched.state_dict())


@pytest.mark.parametrize("bad, match", [
    (dict(), "needs a switch rule"),
    (dict(until_steps=0), "until_steps"),
    (dict(until_epochs=0), "until_epochs"),
    (dict(until_metric="acc"), "go together"),
    (dict(until_steps=1, until_metric_window=0), "until_metric_window"),
    (dict(until_steps=1, n=1), "stages.0 \\('math'\\).n"),
    (dict(until_steps=1, temperature=0.0), "temperature"),
    (dict(until_steps=1, top_p=1.5), "top_p"),
    (dict(until_steps=1, max_new_tokens=0), "max_new_tokens"),
    (dict(until_steps=1, prompts_per_step=0), "prompts_per_step"),
])
def test_bad_stage_config_is_named(bad, match):
    with pytest.raises(ValueError, match=match):
        _two(**bad)
    with pytest.raises(ValueError, match="empty"):
        StageSchedule([])


def test_effective_sampling_and_prompts_per_step():
    rollout = RolloutConfig(n=8, temperature=1.0, top_p=1.0, max_new_tokens=64)
    plain = StageConfig(name="a", domains=["math"])
    tuned = StageConfig(name="b", domains=["math"], n=16, temperature=0.7, top_p=0.95, max_new_tokens=256,
                        prompts_per_step=4)
    assert effective_sampling(rollout, plain) == Sampling(n=8, temperature=1.0, top_p=1.0, max_new_tokens=64)
    assert effective_sampling(rollout, tuned) == Sampling(n=16, temperature=0.7, top_p=0.95, max_new_tokens=256)
    assert prompts_per_step(TrainerConfig(prompts_per_step=8), plain) == 8
    assert prompts_per_step(TrainerConfig(prompts_per_step=8), tuned) == 4


def test_default_config_stages_are_accepted():
    from srpo_ray.config.schema import SRPOConfig
    sched = StageSchedule(SRPOConfig().stages)
    assert sched.current.name == "math" and not sched.is_last
