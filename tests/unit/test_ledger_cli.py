"""Ledger analytics: the per-prompt history the ledger keeps (removals included, compact,
old checkpoints still load) and `python -m srpo_ray.ledger` on a run's checkpoints."""
from __future__ import annotations

import io

import pyarrow.parquet as pq
import pytest
import torch
from test_trainer import make_trainer

from srpo_ray.algo.ledger import HistoryLedger
from srpo_ray.config.schema import ResampleConfig
from srpo_ray.ledger import main


def _drain(led: HistoryLedger, outcomes: dict[str, tuple[int, int]]) -> dict:
    """Hand out the whole open epoch, observe `outcomes` (id -> correct, samples) for the
    ids drawn, and close it."""
    ids, _ = led.next_batch(1000)
    for pid in ids:
        if pid in outcomes:
            led.observe(pid, *outcomes[pid])
    return led.close_epoch()


def test_history_keeps_every_removal_of_a_retested_prompt():
    led = HistoryLedger(ResampleConfig(retest_every_epochs=1), seed=0)
    led.set_pool(["easy", "hard"])
    _drain(led, {"easy": (4, 4), "hard": (0, 4)})  # epoch 0: easy removed
    _drain(led, {"hard": (1, 4)})  # epoch 1: easy sits out
    _drain(led, {"easy": (4, 4), "hard": (0, 4)})  # epoch 2: easy back (re-test) and removed again
    rows = {r["prompt_id"]: r for r in led.history_table().to_pylist()}
    assert rows["easy"]["removed_epochs"] == [0, 2] and rows["easy"]["removed_at_epoch"] == 2
    assert rows["easy"]["epochs"] == [0, 2] and rows["easy"]["pass_rates"] == [1.0, 1.0]
    assert rows["hard"]["epochs"] == [0, 1, 2] and rows["hard"]["correct"] == [0, 1, 0]
    assert rows["hard"]["pass_rate"] == pytest.approx(1 / 12) and rows["hard"]["removed_epochs"] == []


def test_removals_survive_a_checkpoint_and_old_checkpoints_still_load():
    led = HistoryLedger(ResampleConfig(), seed=3)
    led.set_pool([f"p{i}" for i in range(6)])
    _drain(led, {f"p{i}": (2 if i < 3 else 1, 2) for i in range(6)})
    buf = io.BytesIO()
    torch.save(led.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    resumed = HistoryLedger(ResampleConfig(), seed=3)
    resumed.load_state_dict(state)
    assert resumed.history_table().equals(led.history_table())

    old = {k: v for k, v in state.items() if not k.startswith("removal_")}  # as the code before wrote it
    from_old = HistoryLedger(ResampleConfig(), seed=3)
    from_old.load_state_dict(old)
    assert from_old.history_table().column("removed_epochs").to_pylist() == \
        led.history_table().column("removed_epochs").to_pylist()
    _drain(from_old, {"p3": (2, 2)})  # and it keeps recording
    assert {r["prompt_id"]: r["removed_epochs"] for r in from_old.history_table().to_pylist()}["p3"] == [1]


def test_history_stays_compact():
    n = 100_000
    led = HistoryLedger(ResampleConfig(), seed=0)
    led.set_pool([f"prompt-{i:09d}" for i in range(n)])
    base = led.nbytes
    ids, _ = led.next_batch(n)
    for pid in ids[: n // 2]:
        led.observe(pid, 4, 4)
    led.close_epoch()
    per_observation = (led.nbytes - base) / (n // 2)
    assert per_observation <= 16 + 8  # (slot, epoch, correct, samples) + one removal each
    assert base / n <= 40 + 16


def _run(tmp_path, *overrides):
    trainer, _ = make_trainer(tmp_path, "trainer.save_every=2", "trainer.keep_checkpoints=10", *overrides)
    trainer.fit()
    return trainer


def test_cli_prints_difficulty_and_writes_parquet(tmp_path, capsys):
    trainer = _run(tmp_path)  # fake roles: *easy always solved, *hard never, the rest half
    out = tmp_path / "difficulty.parquet"
    assert main([str(tmp_path), "--out", str(out), "--top", "3"]) == 0
    printed = capsys.readouterr().out
    assert f"ledger of {tmp_path / 'checkpoints' / 'step_000008'} (step 8): 15 prompts" in printed
    assert "epochs closed: 2; removed by History Resampling now: 4; in the pool: 11" in printed
    assert "all right 4" in printed
    lines = printed.splitlines()
    first = lines[lines.index(next(line for line in lines if line.startswith("prompt_id"))) + 1]
    assert first.split()[0].endswith("hard") and first.split()[1] == "0.000"  # hardest first
    assert "(3 of 15 prompts, hardest first" in printed and f"wrote 15 prompts to {out}" in printed
    table = pq.read_table(out)
    assert table.num_rows == 15
    assert table.sort_by("prompt_id").equals(trainer.ledger.history_table().sort_by("prompt_id"))
    rows = {r["prompt_id"]: r for r in table.to_pylist()}
    assert rows["m0-easy"]["removed_epochs"] == [0] and rows["m0-easy"]["pass_rates"] == [1.0]
    assert rows["m0-hard"]["pass_rate"] == 0.0 and not rows["m0-hard"]["removed_epochs"]
    assert rows["c0-mixed"]["epochs"] and rows["c0-mixed"]["pass_rate"] == 0.5


def test_cli_reads_a_given_checkpoint(tmp_path, capsys):
    _run(tmp_path)
    early = tmp_path / "checkpoints" / "step_000006"  # the two newest are kept
    assert main([str(tmp_path), "--checkpoint", str(early), "--sort", "easiest", "--top", "0"]) == 0
    printed = capsys.readouterr().out
    assert "(step 6): 15 prompts; epochs closed: 1; removed by History Resampling now: 4" in printed
    assert "of 15 prompts" not in printed  # --top 0: every prompt
    assert main([str(tmp_path), "--checkpoint", str(early / "trainer_state.pt"), "--sort", "id"]) == 0


@pytest.mark.parametrize("setup, args, message", [
    (lambda d: None, lambda d: [str(d / "nope")], "run directory"),
    (lambda d: d.mkdir(), lambda d: [str(d)], "no checkpoint in"),
    (lambda d: (d / "checkpoints" / "step_000001").mkdir(parents=True), lambda d: [str(d)], "has no trainer_state.pt"),
    (lambda d: d.mkdir(), lambda d: [str(d), "--checkpoint", str(d / "x")], "--checkpoint"),
    (lambda d: (d.mkdir(), (d / "trainer_state.pt").write_bytes(b"junk")),
     lambda d: [str(d), "--checkpoint", str(d / "trainer_state.pt")], "not a readable trainer state"),
    (lambda d: d.mkdir(), lambda d: [str(d), "--out", str(d / "no" / "x.parquet")], "does not exist"),
    (lambda d: d.mkdir(), lambda d: [str(d), "--top", "-1"], "--top"),
])
def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys, setup, args, message):
    run_dir = tmp_path / "run"
    setup(run_dir)
    assert main(args(run_dir)) == 2
    err = capsys.readouterr().err
    assert err.startswith("srpo_ray.ledger: error:") and message in err and err.count("\n") == 1
