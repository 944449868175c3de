from srpo_ray.loop.checkpoint import CheckpointManager


def write(manager, step, text="weights"):
    tmp = manager.begin(step)
    (tmp / "hf").mkdir()
    (tmp / "hf" / "model.safetensors").write_text(text)
    return manager.commit(tmp, step)


def test_commit_is_atomic_and_latest_points_at_newest(tmp_path):
    m = CheckpointManager(tmp_path, keep=2)
    assert m.latest() is None
    write(m, 1)
    final = write(m, 2)
    assert m.latest() == final and (final / "hf" / "model.safetensors").read_text() == "weights"
    assert not list(m.root.glob("*.tmp"))


def test_a_run_killed_mid_write_keeps_the_previous_checkpoint(tmp_path):
    m = CheckpointManager(tmp_path, keep=2)
    good = write(m, 3)
    half = m.begin(4)  # the process dies here: the folder is never committed
    (half / "trainer_state.pt").write_text("partial")
    again = CheckpointManager(tmp_path, keep=2)
    assert again.latest() == good
    assert again.clean_partial() == [half] and not half.exists()


def test_old_checkpoints_are_pruned_but_the_newest_kept(tmp_path):
    m = CheckpointManager(tmp_path, keep=2)
    for step in (1, 2, 3, 4):
        write(m, step)
    assert sorted(p.name for p in m._committed()) == ["step_000003", "step_000004"]
    m1 = CheckpointManager(tmp_path, keep=1)
    write(m1, 5)
    assert [p.name for p in m1._committed()] == ["step_000005"]


def test_latest_survives_a_lost_pointer(tmp_path):
    m = CheckpointManager(tmp_path, keep=3)
    write(m, 1)
    newest = write(m, 2)
    (m.root / "latest").unlink()
    assert m.latest() == newest
