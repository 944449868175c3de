"""cluster/ray_placement.py on a real two-node Ray cluster (two raylets on this machine):
actors created with the plan's options land in the intended node pool, and a plan that
cannot fit fails with a clear error instead of hanging."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import ray
import yaml
from ray.cluster_utils import Cluster
from ray.util import placement_group_table

from cluster.placement import plan_placement
from cluster.ray_placement import PlacementTimeoutError, create_placement_groups
from srpo_ray.config.schema import SRPOConfig

CLUSTER_DIR = Path(__file__).resolve().parents[2] / "cluster"


@ray.remote(num_cpus=0)
class WhereAmI:
    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def gpu_ids(self) -> list:
        return ray.get_gpu_ids()


@pytest.fixture(scope="module")
def two_nodes():
    """Head = learner pool (with two logical GPUs: Ray hands out GPU ids without
    hardware), second node = rollout pool. The head has two CPUs: the reward group's
    one-bundle SPREAD may land on either node, and the colocated pair needs a whole CPU
    beside it. Yields node ids by label."""
    ray.shutdown()  # this test needs a two-node cluster of its own
    # an in-process CPU engine of an earlier test hid the GPUs (set_engine_env); Ray
    # refuses logical GPUs that CUDA_VISIBLE_DEVICES says are not there
    hidden = os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "num_gpus": 2, "resources": {"srpo_learner": 1}, "include_dashboard": False})
    cluster.add_node(num_cpus=1, resources={"srpo_rollout": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        nodes = {label: n["NodeID"] for n in ray.nodes() if n["Alive"]
                 for label in n["Resources"] if label.startswith("srpo_")}
        yield nodes
    finally:
        ray.shutdown()
        cluster.shutdown()
        if hidden is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = hidden


def small_cfg(**cluster_fields) -> SRPOConfig:
    cfg = SRPOConfig()
    cfg.learner.num_ranks, cfg.learner.cpus_per_rank = 2, 0.25
    cfg.rollout.num_workers, cfg.rollout.cpus_per_worker = 2, 0.25
    cfg.reward.num_workers, cfg.reward.cpus_per_worker = 1, 0.25
    for key, value in cluster_fields.items():
        setattr(cfg.cluster, key, value)
    return cfg


def actor_nodes(placement, role: str) -> list[str]:
    actors = [WhereAmI.options(**placement.actor_options(role, i)).remote()
              for i in range(placement.num_actors(role))]
    nodes = ray.get([a.node_id.remote() for a in actors], timeout=60)
    for a in actors:
        ray.kill(a)
    return nodes


def test_separate_pools_put_each_role_on_its_labelled_node(two_nodes):
    cfg = small_cfg(learner_node_label="srpo_learner", rollout_node_label="srpo_rollout")
    placement = create_placement_groups(plan_placement(cfg), timeout_s=30)
    try:
        assert actor_nodes(placement, "learner") == [two_nodes["srpo_learner"]] * 2
        assert actor_nodes(placement, "rollout") == [two_nodes["srpo_rollout"]] * 2
        assert actor_nodes(placement, "reward")[0] in two_nodes.values()
    finally:
        placement.remove()


def test_colocated_generators_join_the_learner_pool(two_nodes):
    cfg = small_cfg(colocate=True, learner_node_label="srpo_learner", reward_strategy="none")
    placement = create_placement_groups(plan_placement(cfg), timeout_s=30)
    try:
        assert actor_nodes(placement, "learner") == [two_nodes["srpo_learner"]] * 2
        assert actor_nodes(placement, "rollout") == [two_nodes["srpo_learner"]] * 2
        assert "scheduling_strategy" not in placement.actor_options("reward", 0)
    finally:
        placement.remove()


def test_colocated_rank_and_generator_share_one_gpu(two_nodes):
    cfg = small_cfg(colocate=True, learner_node_label="srpo_learner")
    cfg.learner.gpus_per_rank, cfg.rollout.gpus_per_worker = 0.5, 0.5
    placement = create_placement_groups(plan_placement(cfg), timeout_s=30)
    try:
        def gpus(role: str) -> list:
            actors = [WhereAmI.options(**placement.actor_options(role, i)).remote() for i in range(2)]
            return ray.get([a.gpu_ids.remote() for a in actors], timeout=60)
        learner_gpus, rollout_gpus = gpus("learner"), gpus("rollout")
        assert learner_gpus == rollout_gpus  # rank i and generator i hold the same GPU
        assert sorted(str(g) for [g] in learner_gpus) == ["0", "1"]  # one GPU per pair
    finally:
        placement.remove()


def test_a_plan_that_cannot_fit_fails_clearly_and_releases_its_groups(two_nodes):
    cfg = small_cfg(learner_node_label="srpo_gpu_pool")  # no node advertises this label
    with pytest.raises(PlacementTimeoutError) as e:
        create_placement_groups(plan_placement(cfg), timeout_s=2)
    msg = str(e.value)
    assert "srpo-learner" in msg and "role learner does not fit" in msg and "'srpo_gpu_pool'" in msg
    assert "cluster.placement_timeout_s" in msg
    states = {pg["state"] for pg in placement_group_table().values()}
    assert states <= {"REMOVED"}, states


def test_cluster_launcher_yaml_passes_rays_own_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER_DIR / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
