"""The prompt schedule on its own (srpo_ray/loop/prompt_schedule.py): epochs close inside a
draw and count towards the stage, a due stage switch waits for the next step, an empty
stage hands over, and its state survives a round trip. The trainer's tests drive it
through whole runs (test_trainer.py)."""
from srpo_ray.config.load import load_config
from srpo_ray.loop.prompt_schedule import PromptSchedule
from srpo_ray.records import Prompt, RewardResult, RolloutGroup, Sample, ScoredGroup


def prompt(pid: str, domain: str = "math") -> Prompt:
    return Prompt(pid, domain, [{"role": "user", "content": "q"}], "1", data_source=domain)


def scored(p: Prompt, correct: int, n: int = 2) -> ScoredGroup:
    samples = [Sample(token_ids=[5], logprobs=[-0.1], text="t", finish_reason="stop") for _ in range(n)]
    group = RolloutGroup.of(prompt=p, prompt_token_ids=[1], samples=samples, policy_version=0)
    return ScoredGroup(group, [RewardResult(float(i < correct), i < correct) for i in range(n)])


def schedule(*overrides: str) -> tuple[PromptSchedule, list[str], dict[str, Prompt]]:
    cfg = load_config(None, ["trainer.prompts_per_step=2", "stages.0.until_epochs=1", *overrides])
    prompts = [prompt("m-easy"), prompt("m-hard"), prompt("c-0", "code"), prompt("c-1", "code")]
    events: list[str] = []
    return PromptSchedule(cfg, prompts, events.append), events, {p.prompt_id: p for p in prompts}


def test_an_epoch_end_resamples_and_moves_the_curriculum_on_before_the_step_draws():
    sched, events, by_id = schedule()
    sched.start()
    ids, closed = sched.next_ids(1)
    assert sorted(ids) == ["m-easy", "m-hard"] and closed == {}  # stage 1: math only
    sched.observe([scored(by_id["m-easy"], 2), scored(by_id["m-hard"], 0)])
    ids, closed = sched.next_ids(2)  # the math epoch closed: m-easy (all correct) leaves
    assert closed["dropped"] == 1 and sched.stages.index == 1
    assert set(ids) <= {"m-hard", "c-0", "c-1"} and len(ids) == 2
    assert any("History Resampling" in e for e in events) and any("stage 1" in e for e in events)


def test_a_due_switch_gives_dynamic_sampling_nothing_more_in_this_step():
    sched, _, by_id = schedule()
    sched.start()
    epoch_metrics: dict = {}
    sched.next_ids(1)
    sched.observe([scored(by_id["m-easy"], 1), scored(by_id["m-hard"], 1)])
    assert sched.draw_more(1, 2, epoch_metrics) == []  # the epoch closed: stage 2 waits for step 2
    assert epoch_metrics and sched.stages.index == 0


def test_state_round_trip_keeps_ledger_and_stage():
    sched, _, by_id = schedule()
    sched.start()
    sched.next_ids(1)
    sched.observe([scored(by_id["m-easy"], 2), scored(by_id["m-hard"], 1)])
    sched.next_ids(2)
    fresh, _, _ = schedule()
    fresh.load_state_dict(sched.state_dict())
    assert str(fresh.state_dict()) == str(sched.state_dict())
    assert fresh.step_metrics({}, [])["stage"] == 1 == sched.stages.index
