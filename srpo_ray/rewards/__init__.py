"""Reward logic: math answers checked with math-verify, code run on its tests in a sandbox,
and users' reward plug-ins (verl's compute_score) in capped child processes.

Entry points: `scorer.RewardScorer` (what reward workers call), `code_tests.parse_code_tests`
(test-case encodings -> CodeSpec), `math_check.extract_final_answer` (the final-answer rule),
`plugins` (reward.custom_function / custom_functions).
Nothing here imports ray; actors/reward.py wraps RewardScorer in a Ray actor.
"""
