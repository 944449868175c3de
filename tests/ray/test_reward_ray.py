"""RewardWorker inside a real Ray actor: math (including a timeout) and code groups."""
from __future__ import annotations

import pytest

from srpo_ray.config.schema import RewardConfig
from srpo_ray.records import CodeCase, CodeSpec, Prompt, RolloutGroup, Sample, ScoreRequest, join_scores

ray = pytest.importorskip("ray")


def group(prompt: Prompt, texts: list[str]) -> RolloutGroup:
    return RolloutGroup.of(prompt=prompt, prompt_token_ids=[1, 2], policy_version=0,
                        samples=[Sample(token_ids=[3], logprobs=[-0.1], text=t, finish_reason="stop")
                                 for t in texts])


def test_reward_worker_in_a_ray_actor(ray_local):  # the session's Ray; the worker is killed at the end
    from actors.reward import RewardWorker

    worker = RewardWorker.options(num_cpus=1).remote(RewardConfig(math_timeout_s=1, math_processes=1))
    try:
        assert ray.get(worker.ping.remote()) is True
        math = group(Prompt("m", "math", [{"role": "user", "content": "1/2?"}], "\\frac{1}{2}"),
                     ["\\boxed{0.5}", "\\boxed{2}", "\\boxed{9^{9^{9^9}}}", "no answer"])
        code = group(Prompt("c", "code", [{"role": "user", "content": "double"}],
                            CodeSpec(cases=(CodeCase("4\n", "8\n", "stdin"),))),
                     ["```python\nprint(int(input()) * 2)\n```", "```python\nwhile True: pass\n```"])
        # the worker gets texts and answer keys only, and returns RewardResults only
        results = ray.get(worker.score.remote([ScoreRequest.of(math), ScoreRequest.of(code)]), timeout=120)
        scored = join_scores([math, code], results)
        assert [sg.group.prompt.prompt_id for sg in scored] == ["m", "c"]
        assert scored[0].rewards == [1.0, 0.0, 0.0, 0.0]
        assert scored[0].results[2].info.get("timeout") is True
        assert scored[0].num_correct == 1
        assert scored[1].rewards == [1.0, 0.0] and scored[1].results[1].info.get("timeout") is True
        # The actor is still healthy after the timeouts.
        again = ray.get(worker.score.remote([ScoreRequest.of(math)]), timeout=120)
        assert [r.reward for r in again[0]] == [1.0, 0.0, 0.0, 0.0]
    finally:
        ray.kill(worker)
