"""The driver on a two-node Ray cluster (two raylets on this machine): learner ranks on
the node labelled srpo_learner, the generator on the node labelled srpo_rollout, and
the weights synced across them (each node has its own object store, so the state dict
really travels from one to the other). The test's shared local Ray is shut down first;
the next test that needs it starts it again (conftest.ensure_local_ray)."""
from __future__ import annotations

import pytest
import ray
from helpers_run import assert_sampled_with, hook_actor_class, metrics, rollouts, run_args, write_data
from ray.cluster_utils import Cluster

from srpo_ray.driver import main


@pytest.fixture
def two_nodes():
    """Yields (cluster address, {label: node id}); one learner node, one rollout node."""
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"srpo_learner": 1}, "include_dashboard": False})
    cluster.add_node(num_cpus=2, resources={"srpo_rollout": 1})
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address)
        nodes = {label: n["NodeID"] for n in ray.nodes() if n["Alive"]
                 for label in n["Resources"] if label.startswith("srpo_")}
        yield cluster.address, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow  # a cluster start and a full driver run
def test_driver_places_roles_on_their_nodes_and_syncs_weights_across(
        two_nodes, monkeypatch, scripted_model_dir, tmp_path):
    address, nodes = two_nodes
    assert len(set(nodes.values())) == 2
    learners = hook_actor_class(monkeypatch, "actors.learner", "LearnerRank")
    generators = hook_actor_class(monkeypatch, "actors.generation", "GenerationWorker")
    data = write_data(tmp_path / "data.parquet")
    run_dir = tmp_path / "run"
    # Stage 1 at temperature 1: mixed groups, so step 1 trains and pushes version 1.
    assert main(run_args(scripted_model_dir, data, run_dir, "trainer.total_steps=2",
                         "stages.0.temperature=1.0", f"cluster.address={address}",
                         "cluster.learner_node_label=srpo_learner",
                         "cluster.rollout_node_label=srpo_rollout")) == 0

    assert learners.node_ids() == [nodes["srpo_learner"]] * 2
    assert generators.node_ids() == [nodes["srpo_rollout"]]
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["policy/version"] == 1
    # Step 2 sampled with the weights of step 1's update (checkpoint 1), on the other node.
    step2 = rollouts(run_dir, 2)
    assert step2 and all(g["policy_version"] == 1 for g in step2)
    assert_sampled_with(step2, run_dir / "checkpoints" / "step_000001" / "hf", not_with=scripted_model_dir)
