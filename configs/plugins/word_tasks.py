"""Write a small verl-layout parquet of word puzzles (ability `wordplay`, data_source
`wordplay`) for the reward plug-in example (configs/plugins/reward_plugin.py):

    .venv/bin/python configs/plugins/word_tasks.py data/wordplay.parquet

No built-in reward knows the `wordplay` ability: its rows train only when a plug-in
scores their source (reward.custom_functions.wordplay, as configs/plugin_example.yaml).
"""
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
from srpo_ray.data.parquet import write_verl_parquet  # noqa: E402

WORDS = ("apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "candle", "garden", "rocket",
         "silver", "window", "pencil", "forest", "bridge", "planet", "butter", "dragon", "marble", "orange")
HINT = "Put the final answer in \\boxed{}."


def word_rows(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i, word in enumerate(WORDS):
        if i % 2:
            question, truth = f"Spell the word '{word}' backwards.", word[::-1]
        else:
            letter = rng.choice(word)
            question, truth = f"How many times does the letter '{letter}' occur in '{word}'?", str(word.count(letter))
        rows.append({"data_source": "wordplay", "ability": "wordplay",
                     "prompt": [{"role": "user", "content": f"{question} {HINT}"}],
                     "reward_model": {"style": "rule", "ground_truth": truth},
                     "extra_info": {"id": f"word-{i}", "split": "train"}})
    return rows


if __name__ == "__main__":
    # default: the checkout's data/wordplay.parquet, which configs/plugin_example.yaml names
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "data/wordplay.parquet"
    write_verl_parquet(word_rows(), out)
    print(f"wrote {len(WORDS)} rows to {out}")
