"""RewardScorer: one object that scores responses to math and code prompts, and to
prompts of any domain whose data source has a reward plug-in (reward.custom_function /
custom_functions; plugins.py): a plug-in replaces the built-in rules below for its rows.

Math: the final answer is judged by the prompt's data source's answer mode
(reward.math_answer_mode / math_answer_modes). verify: the final answer
(math_check.extract_final_answer on the response's last `math_max_chars` characters) is
checked against the ground truth with math-verify, gold first, in a pool of capped
child processes (math_pool). number: the response's only box must hold a plain number
literal equal to the truth (answer_forms.plain_number; no child process needed). Code:
the last python block runs on the prompt's tests in the sandbox (code_reward). Reward =
verdict (1/0, or the pass fraction with code_partial_credit) + format_reward when the
response is well formed (answer_forms.well_formed) or matches format_pattern if set.
`info` flags: {"timeout": True}, {"error": "..."}, math {"answer": the final answer
judged}, code {"passed": k, "total": n, "failure": "case i: why"}.
"""
from __future__ import annotations

import queue
import re
from concurrent.futures import ThreadPoolExecutor

from srpo_ray.config.schema import RewardConfig
from srpo_ray.records import CodeSpec, Prompt, RewardResult, ScoreRequest
from srpo_ray.rewards.answer_forms import plain_number, single_box_content, well_formed
from srpo_ray.rewards.code_reward import CodeScore, extract_code, score_programs
from srpo_ray.rewards.code_tests import parse_code_tests
from srpo_ray.rewards.math_check import extract_final_answer
from srpo_ray.rewards.math_pool import MathCheckPool
from srpo_ray.rewards.plugins import CustomRewardPool, check_plugins, configured_plugins, plugin_key
from srpo_ray.rewards.sandbox import SandboxLimits, make_sandbox


class RewardScorer:
    """Construction starts the math pool and checks that the sandbox works (RuntimeError
    naming the fix if not). Call close() when done."""

    def __init__(self, cfg: RewardConfig) -> None:
        _check_config(cfg)
        self.cfg = cfg
        try:
            self._format = re.compile(cfg.format_pattern) if cfg.format_pattern else None
        except re.error as e:
            raise ValueError(f"reward.format_pattern is not a valid regular expression: {e}") from None
        limits = SandboxLimits(
            case_timeout_s=cfg.code_case_timeout_s, total_timeout_s=cfg.code_total_timeout_s,
            memory_bytes=cfg.code_memory_mb << 20, max_processes=cfg.code_max_processes,
            max_open_files=cfg.code_max_open_files, tmp_bytes=cfg.code_tmp_mb << 20)
        self._sandbox = make_sandbox(cfg.sandbox, limits, cfg.code_python)
        self._sandbox.self_check()
        self._math = MathCheckPool(cfg.math_processes, cfg.math_timeout_s, cfg.math_memory_mb)
        self._custom = CustomRewardPool(cfg) if configured_plugins(cfg) else None
        self._slots: queue.Queue[int] = queue.Queue()
        for slot in range(cfg.code_parallel):
            self._slots.put(slot)
        self._threads = ThreadPoolExecutor(cfg.code_parallel, thread_name_prefix="sandbox") \
            if cfg.code_parallel > 1 else None

    def score(self, prompt: Prompt, texts: list[str]) -> list[RewardResult]:
        """One RewardResult per response text, in order."""
        return self.score_batch([(prompt, texts)])[0]

    def score_requests(self, requests: list[ScoreRequest]) -> list[list[RewardResult]]:
        """One list of RewardResults per request (a reward worker's call), in order."""
        return self.score_batch([(r, list(r.texts)) for r in requests])

    def score_batch(self, items: list[tuple[Prompt | ScoreRequest, list[str]]]) -> list[list[RewardResult]]:
        """Score several prompts' responses at once: math checks of all prompts share
        the checker pool, and all programs share sandbox runs (start-up paid once).
        Each item's prompt side is a Prompt or a ScoreRequest: the scorer reads only
        prompt_id, domain, data_source, ground_truth and extra_info."""
        results: list[list[RewardResult | None]] = [[None] * len(texts) for _, texts in items]
        math_slots: list[tuple[int, int, str, str]] = []  # (item, text, gold, answer)
        code_slots: list[tuple[int, int, CodeSpec, str]] = []
        custom_slots: list[tuple[int, int]] = []  # scored by a plug-in
        for n, (prompt, texts) in enumerate(items):
            if self._custom is not None and plugin_key(self.cfg, prompt.data_source) is not None:
                custom_slots += [(n, t) for t in range(len(texts))]
            elif prompt.domain == "math":
                gold = prompt.ground_truth
                if not isinstance(gold, str):
                    raise TypeError(f"math prompt {prompt.prompt_id}: ground_truth must be the answer "
                                    f"text, got {type(gold).__name__}")
                strict = answer_mode(self.cfg, prompt.data_source) == "number"
                for t, text in enumerate(texts):
                    tail = text[-self.cfg.math_max_chars:]
                    if strict:
                        results[n][t] = _judge_number(gold, tail, self.cfg.allow_answer_line)
                        continue
                    answer = extract_final_answer(tail, self.cfg.allow_answer_line)
                    if answer is None:
                        results[n][t] = RewardResult(0.0, False, {"error": "no final answer"})
                    else:
                        math_slots.append((n, t, gold, answer))
            elif prompt.domain == "code":
                spec = prompt.ground_truth
                if not isinstance(spec, CodeSpec):
                    spec = parse_code_tests(spec, prompt.extra_info)
                for t, text in enumerate(texts):
                    code = extract_code(text)
                    if code is None:
                        results[n][t] = RewardResult(0.0, False, {"error": "no code block"})
                    else:
                        code_slots.append((n, t, spec, code))
            else:
                raise ValueError(f"prompt {prompt.prompt_id}: domain {prompt.domain!r} has no built-in reward "
                                 f"(math or code); score data_source {prompt.data_source!r} with a plug-in "
                                 f"(reward.custom_function or reward.custom_functions)")
        self._score_math(math_slots, results)
        self._score_code(code_slots, results)
        if custom_slots:
            calls = [(items[n][0], items[n][1][t]) for n, t in custom_slots]
            for (n, t), result in zip(custom_slots, self._custom.score(calls)):  # type: ignore[union-attr]
                results[n][t] = result
        if self.cfg.format_reward:
            for row, (prompt, texts) in zip(results, items):
                for result, text in zip(row, texts):
                    if result.info.get("custom"):  # type: ignore[union-attr]
                        continue  # a plug-in's score is the whole reward
                    if self._format.search(text) if self._format else well_formed(prompt.domain, text):
                        result.reward += self.cfg.format_reward  # type: ignore[union-attr]
        return results  # type: ignore[return-value]

    def close(self) -> None:
        self._math.close()
        if self._custom is not None:
            self._custom.close()
        if self._threads is not None:
            self._threads.shutdown(wait=True)

    # -- math -----------------------------------------------------------------------------
    def _score_math(self, slots: list[tuple[int, int, str, str]], results) -> None:
        unique = list(dict.fromkeys((gold, answer) for _, _, gold, answer in slots))
        verdicts = dict(zip(unique, self._math.check(unique)))
        for n, t, gold, answer in slots:
            v = verdicts[(gold, answer)]
            info: dict = {"answer": answer}
            if v.timeout:
                info["timeout"] = True
            if v.error:
                info["error"] = v.error
            results[n][t] = RewardResult(1.0 if v.correct else 0.0, v.correct, info)

    # -- code -----------------------------------------------------------------------------
    def _score_code(self, slots: list[tuple[int, int, CodeSpec, str]], results) -> None:
        # The same program for the same tests gets the same verdict (and runs once).
        unique = list(dict.fromkeys((id(spec), code) for _, _, spec, code in slots))
        spec_of = {id(spec): spec for _, _, spec, _ in slots}
        scores = dict(zip(unique, self._run_programs([(spec_of[i], code) for i, code in unique])))
        for n, t, spec, code in slots:
            s = scores[(id(spec), code)]
            correct = s.all_passed
            reward = s.passed / s.total if self.cfg.code_partial_credit and s.total else float(correct)
            results[n][t] = RewardResult(reward, correct, dict(s.info))

    def _run_programs(self, programs: list[tuple[CodeSpec, str]]) -> list[CodeScore]:
        """Split over code_parallel sandboxes (each its own uid slot), in order."""
        if not programs:
            return []
        shares = [programs[i::self.cfg.code_parallel] for i in range(self.cfg.code_parallel)]
        shares = [s for s in shares if s]
        if self._threads is None or len(shares) == 1:
            parts = [self._run_share(programs)]
        else:
            parts = list(self._threads.map(self._run_share, shares))
        scores: list[CodeScore] = [None] * len(programs)  # type: ignore[list-item]
        for i, part in enumerate(parts):
            scores[i::len(parts)] = part
        return scores

    def _run_share(self, programs: list[tuple[CodeSpec, str]]) -> list[CodeScore]:
        slot = self._slots.get()
        try:
            return score_programs(self._sandbox, programs, partial_credit=self.cfg.code_partial_credit,
                                  max_output_bytes=self.cfg.code_max_output_bytes, slot=slot)
        finally:
            self._slots.put(slot)


ANSWER_MODES = ("verify", "number")


def answer_mode(cfg: RewardConfig, data_source: str) -> str:
    """The math answer mode of a data source: its entry in math_answer_modes, else math_answer_mode."""
    return cfg.math_answer_modes.get(data_source, cfg.math_answer_mode)


def check_answer_modes(cfg: RewardConfig, prompts: list[Prompt]) -> None:
    """Every math prompt judged by the number rule must have a number as its truth:
    checked before a run, so a misconfigured source is an error, not a silent 0 reward."""
    for prompt in prompts:
        if plugin_key(cfg, prompt.data_source) is not None:
            continue  # a plug-in scores it
        if prompt.domain == "math" and answer_mode(cfg, prompt.data_source) == "number" \
                and plain_number(str(prompt.ground_truth)) is None:
            raise ValueError(f"prompt {prompt.prompt_id!r} (data_source {prompt.data_source!r}) has ground truth "
                             f"{prompt.ground_truth!r:.80}, which is not a plain number, but its source is judged "
                             f"by the strict number rule; set reward.math_answer_modes.{prompt.data_source}=verify")


def _judge_number(gold: str, text: str, allow_answer_line: bool) -> RewardResult:
    """The strict number rule: the only box (or, without any box and with
    allow_answer_line, the answer line) holds a number literal equal to the truth."""
    answer = single_box_content(text)
    if answer is None and "\\boxed" not in text and allow_answer_line:
        answer = extract_final_answer(text, allow_answer_line=True)
    if answer is None:
        return RewardResult(0.0, False, {"error": "no single final answer"})
    value, truth = plain_number(answer), plain_number(gold)
    if value is None:
        return RewardResult(0.0, False, {"answer": answer, "error": "answer is not a plain number"})
    correct = truth is not None and value == truth
    return RewardResult(float(correct), correct, {"answer": answer})


def _check_config(cfg: RewardConfig) -> None:
    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ValueError(f"reward.{key}={getattr(cfg, key)!r}: {why}")

    need(cfg.math_answer_mode in ANSWER_MODES, "math_answer_mode", f"use one of {ANSWER_MODES}")
    bad = {k: v for k, v in cfg.math_answer_modes.items() if v not in ANSWER_MODES}
    need(not bad, "math_answer_modes", f"unknown mode(s) {bad}; use one of {ANSWER_MODES}")
    need(cfg.sandbox in ("bubblewrap", "nsjail", "UNSAFE_no_sandbox"), "sandbox",
         "use bubblewrap, nsjail or UNSAFE_no_sandbox")
    need(isinstance(cfg.math_timeout_s, int) and cfg.math_timeout_s >= 1, "math_timeout_s",
         "must be a whole number of seconds >= 1 (math-verify's alarm takes whole seconds)")
    need(cfg.math_max_chars >= 64, "math_max_chars", "must be >= 64")
    need(cfg.math_processes >= 1, "math_processes", "need at least 1")
    need(cfg.math_memory_mb >= 256, "math_memory_mb", "must be >= 256 (sympy alone needs ~150 MiB)")
    need(cfg.code_case_timeout_s > 0, "code_case_timeout_s", "must be > 0")
    need(cfg.code_total_timeout_s >= cfg.code_case_timeout_s, "code_total_timeout_s",
         "must be >= code_case_timeout_s")
    need(cfg.code_memory_mb >= 32, "code_memory_mb", "must be >= 32 (Python itself needs ~20 MiB)")
    need(cfg.code_max_processes >= 2, "code_max_processes", "must be >= 2 (the harness and the program)")
    need(cfg.code_max_open_files >= 16, "code_max_open_files", "must be >= 16")
    need(cfg.code_max_output_bytes >= 1024, "code_max_output_bytes", "must be >= 1024")
    need(cfg.code_tmp_mb >= 1, "code_tmp_mb", "must be >= 1")
    need(1 <= cfg.code_parallel <= 64, "code_parallel", "must be between 1 and 64")
    check_plugins(cfg)
