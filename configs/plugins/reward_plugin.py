"""An example reward plug-in: a verl-style `compute_score` that srpo-ray runs for the
rows it is configured for (README.md, "Rewards"; srpo_ray/rewards/plugins.py), as
configs/plugin_example.yaml does (a relative path in a config file is taken from that
file's folder, here configs/):

    reward:
      custom_functions:
        wordplay: plugins/reward_plugin.py:compute_score   # one data source
      # custom_function: plugins/reward_plugin.py:compute_score   # or every row

It pays 1 for a final \\boxed{} answer equal to the ground truth (case and surrounding
spaces ignored), else 0. Besides `score` it returns two numbers that show up as step
metrics: reward/custom/answered/mean and reward/custom/answer_chars/mean; `answered`
is also what evaluation's answered_frac counts for these rows (without it, the format
rule decides: one non-empty \\boxed{} at the end). The file is
imported once per plug-in process, so module-level set-up (a compiled regex here, a
tokenizer or a lookup table elsewhere) is paid once, not per response.
"""
import re

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    boxes = _BOXED.findall(solution_str)
    answer = boxes[-1].strip() if boxes else None
    correct = answer is not None and answer.casefold() == str(ground_truth).strip().casefold()
    return {
        "score": 1.0 if correct else 0.0,
        "answered": float(answer is not None),
        "answer_chars": float(len(answer)) if answer is not None else 0.0,
    }
