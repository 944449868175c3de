"""Pure tests of cluster/placement.py (no Ray) and of the launch material's consistency."""
from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from cluster.placement import (
    LABEL_SHARE,
    PlacementError,
    check_fits,
    local_custom_resources,
    local_num_cpus_needed,
    plan_placement,
)
from srpo_ray.config.load import CONFIG_DIR, ConfigError, SRPOConfig, load_config, parse_cli

CLUSTER_DIR = Path(__file__).resolve().parents[2] / "cluster"


def make_cfg(**sections) -> SRPOConfig:
    """SRPOConfig with e.g. learner={"num_ranks": 4} overriding section fields."""
    cfg = SRPOConfig()
    for section, values in sections.items():
        for key, value in values.items():
            assert hasattr(getattr(cfg, section), key), f"{section}.{key}"
            setattr(getattr(cfg, section), key, value)
    return cfg


def test_default_plan_separates_roles_and_packs_the_learner():
    plan = plan_placement(SRPOConfig())
    assert [(g.name, g.strategy, g.roles) for g in plan.groups] == [
        ("srpo-learner", "PACK", ("learner",)),
        ("srpo-rollout", "PACK", ("rollout",)),
        ("srpo-reward", "SPREAD", ("reward",)),
    ]
    assert plan.group("srpo-learner").bundles == ({"CPU": 1.0}, {"CPU": 1.0})
    assert [(s.group, s.bundle_index) for s in plan.slots["learner"]] == [("srpo-learner", 0), ("srpo-learner", 1)]
    assert plan.slot("rollout", 0).num_cpus == 1.0 and plan.slot("rollout", 0).num_gpus == 0.0
    assert local_num_cpus_needed(SRPOConfig()) == 4
    check_fits(plan, [{"CPU": 4}])
    with pytest.raises(PlacementError, match="role reward does not fit.*reward.num_workers"):
        check_fits(plan, [{"CPU": 3}])


def test_separate_node_pools_carry_labels_and_fail_clearly_without_them():
    cfg = make_cfg(learner={"num_ranks": 2, "gpus_per_rank": 1},
                   rollout={"num_workers": 2, "gpus_per_worker": 1},
                   cluster={"learner_node_label": "srpo_learner", "rollout_node_label": "srpo_rollout"})
    plan = plan_placement(cfg)
    assert plan.group("srpo-learner").bundles[0] == {"CPU": 1.0, "GPU": 1.0, "srpo_learner": LABEL_SHARE}
    assert plan.group("srpo-rollout").bundles[0] == {"CPU": 1.0, "GPU": 1.0, "srpo_rollout": LABEL_SHARE}
    # The bundle pins the pool; the actor only asks its bundle for CPU/GPU.
    assert plan.slot("learner", 1).resources == {}
    learner_node = {"CPU": 8, "GPU": 2, "srpo_learner": 1}
    rollout_node = {"CPU": 8, "GPU": 2, "srpo_rollout": 1}
    check_fits(plan, [learner_node, rollout_node])
    with pytest.raises(PlacementError) as e:
        check_fits(plan, [learner_node, {"CPU": 8, "GPU": 2}])
    msg = str(e.value)
    assert "role rollout does not fit" in msg and "'srpo_rollout'" in msg
    assert "ray start --resources" in msg and "cluster.rollout_node_label" in msg
    # Learner GPUs cannot spill onto the rollout pool even though they are free there.
    with pytest.raises(PlacementError, match="role learner does not fit.*too little free GPU"):
        check_fits(plan, [{"CPU": 8, "GPU": 1, "srpo_learner": 1}, rollout_node])
    assert local_custom_resources(cfg) == {"srpo_learner": 1.0, "srpo_rollout": 1.0}


def test_colocated_generators_share_the_learner_bundles_and_gpu():
    cfg = make_cfg(learner={"num_ranks": 2, "gpus_per_rank": 0.5, "cpus_per_rank": 2},
                   rollout={"num_workers": 4, "gpus_per_worker": 0.25, "cpus_per_worker": 1},
                   cluster={"colocate": True})
    plan = plan_placement(cfg)
    shared = plan.group("srpo-colocated")
    assert shared.roles == ("learner", "rollout") and shared.strategy == "PACK"
    assert shared.bundles == ({"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0})
    assert [s.bundle_index for s in plan.slots["rollout"]] == [0, 1, 0, 1]
    assert [s.index for s in plan.slots["rollout"]] == [0, 1, 2, 3]
    assert plan.slot("rollout", 2).num_gpus == 0.25 and plan.slot("learner", 0).num_gpus == 0.5
    check_fits(plan, [{"CPU": 9, "GPU": 2}])
    with pytest.raises(PlacementError, match=r"roles learner\+rollout \(colocated\) does not fit"):
        check_fits(plan, [{"CPU": 9, "GPU": 1}])


def test_fractional_cpus_round_up_for_a_local_cluster():
    cfg = make_cfg(learner={"num_ranks": 2, "cpus_per_rank": 0.3},
                   rollout={"num_workers": 1, "cpus_per_worker": 0.3},
                   reward={"num_workers": 2, "cpus_per_worker": 0.25})
    assert local_num_cpus_needed(cfg) == 2  # 0.6 + 0.3 + 0.5 = 1.4
    plan = plan_placement(cfg)
    check_fits(plan, [{"CPU": 2}])
    with pytest.raises(PlacementError):
        check_fits(plan, [{"CPU": 1}])
    # Exact sums must not be pushed over by float error (0.1 * 10 != 1.0 in floats).
    tenth = make_cfg(learner={"num_ranks": 7, "cpus_per_rank": 0.1},
                     rollout={"num_workers": 2, "cpus_per_worker": 0.1},
                     reward={"num_workers": 1, "cpus_per_worker": 0.1})
    assert local_num_cpus_needed(tenth) == 1
    check_fits(plan_placement(tenth), [{"CPU": 1}])


def test_too_big_plans_name_the_role_and_the_fix():
    big = make_cfg(learner={"num_ranks": 8, "gpus_per_rank": 1}, cluster={"learner_strategy": "STRICT_PACK"})
    four_gpu_nodes = [{"CPU": 32, "GPU": 4}, {"CPU": 32, "GPU": 4}]
    with pytest.raises(PlacementError, match="role learner.*STRICT_PACK.*cluster.learner_strategy=PACK"):
        check_fits(plan_placement(big), four_gpu_nodes)
    big.cluster.learner_strategy = "PACK"
    check_fits(plan_placement(big), four_gpu_nodes)  # PACK may span the two nodes

    huge_rank = make_cfg(learner={"gpus_per_rank": 8})
    with pytest.raises(PlacementError, match="No single node is that large: lower learner.num_ranks"):
        check_fits(plan_placement(huge_rank), four_gpu_nodes)

    spread = make_cfg(rollout={"num_workers": 3}, cluster={"rollout_strategy": "STRICT_SPREAD"})
    with pytest.raises(PlacementError, match="role rollout.*STRICT_SPREAD needs 3 distinct nodes"):
        check_fits(plan_placement(spread), four_gpu_nodes)


def test_reward_workers_without_a_placement_group():
    cfg = make_cfg(reward={"num_workers": 3, "cpus_per_worker": 0.5},
                   cluster={"reward_strategy": "none", "reward_node_label": "srpo_cpu"})
    plan = plan_placement(cfg)
    assert [g.name for g in plan.groups] == ["srpo-learner", "srpo-rollout"]
    slot = plan.slot("reward", 2)
    assert slot.group is None and slot.resources == {"srpo_cpu": LABEL_SHARE}
    assert local_num_cpus_needed(cfg) == 5 and local_custom_resources(cfg) == {"srpo_cpu": 1.0}
    check_fits(plan, [{"CPU": 5, "srpo_cpu": 1}])
    with pytest.raises(PlacementError, match="role reward.*'srpo_cpu'"):
        check_fits(plan, [{"CPU": 5}])
    assert "without a group" in plan.describe()


@pytest.mark.parametrize("sections, key", [
    ({"cluster": {"learner_strategy": "TIGHT"}}, "cluster.learner_strategy"),
    ({"cluster": {"reward_strategy": "pack"}}, "cluster.reward_strategy"),
    ({"learner": {"gpus_per_rank": 1.5}}, "learner.gpus_per_rank"),
    ({"rollout": {"cpus_per_worker": -1}}, "rollout.cpus_per_worker"),
    ({"rollout": {"gpus_per_worker": 1, "tensor_parallel_size": 2}}, "rollout.gpus_per_worker"),
    ({"reward": {"cpus_per_worker": 0}}, "reward.cpus_per_worker"),
    ({"cluster": {"colocate": True, "rollout_node_label": "srpo_rollout"}}, "cluster.rollout_node_label"),
    ({"cluster": {"colocate": True}, "learner": {"gpus_per_rank": 0.75}, "rollout": {"gpus_per_worker": 0.5}},
     "cluster.colocate"),
])
def test_bad_sizes_are_config_errors_naming_the_key(sections, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        plan_placement(make_cfg(**sections))


def test_cluster_fields_merge_from_the_command_line():
    cfg = load_config(None, ["cluster.colocate=true", "cluster.learner_node_label=srpo_learner",
                             "cluster.placement_timeout_s=5"])
    assert cfg.cluster.colocate and cfg.cluster.learner_node_label == "srpo_learner"
    assert plan_placement(cfg).groups[0].name == "srpo-colocated"


def test_launch_yamls_load_and_name_the_same_pools():
    cluster_yaml = yaml.safe_load((CLUSTER_DIR / "ray-cluster.yaml").read_text())
    pools = {t: spec["resources"] for t, spec in cluster_yaml["available_node_types"].items()}
    assert pools["learner_gpu"] == {"srpo_learner": 1} and pools["rollout_gpu"] == {"srpo_rollout": 1}
    assert any(".[gpu]" in cmd for cmd in cluster_yaml["setup_commands"])
    assert yaml.safe_load((CLUSTER_DIR / "rayjob.yaml").read_text())["kind"] == "RayJob"


def test_rayjob_entrypoint_is_a_valid_config_that_fits_its_worker_groups():
    job = yaml.safe_load((CLUSTER_DIR / "rayjob.yaml").read_text())
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "srpo_ray.driver"]
    args = [str(CONFIG_DIR / Path(a).name) if a.startswith("/app/configs/") else a for a in argv[3:]]
    cfg, _ = parse_cli(args)  # unknown keys or bad values would raise here
    assert cfg.trainer.run_dir.startswith("/shared/")

    def node(group_spec: dict) -> dict[str, float]:
        container = group_spec["template"]["spec"]["containers"][0]
        limits = container["resources"]["limits"]
        resources = {"CPU": float(limits["cpu"]), "GPU": float(limits.get("nvidia.com/gpu", 0))}
        custom = group_spec["rayStartParams"].get("resources")
        if custom:  # KubeRay's quoting: '"{\"name\": 1}"'
            resources.update(yaml.safe_load(yaml.safe_load(custom)))
        return resources

    spec = job["spec"]["rayClusterSpec"]
    nodes = [node(spec["headGroupSpec"])]
    nodes += [node(g) for g in spec["workerGroupSpecs"] for _ in range(g["replicas"])]
    check_fits(plan_placement(cfg), nodes)


def test_start_scripts_are_valid_bash_and_reject_bad_input():
    for script in ("start_head.sh", "start_worker.sh"):
        subprocess.run(["bash", "-n", str(CLUSTER_DIR / script)], check=True)
    no_ip = subprocess.run(["bash", str(CLUSTER_DIR / "start_head.sh")], capture_output=True, text=True)
    assert no_ip.returncode == 2 and "--ip is required" in no_ip.stderr
    bad_label = subprocess.run(["bash", str(CLUSTER_DIR / "start_head.sh"), "--ip", "10.0.0.1",
                                "--labels", "srpo-learner"], capture_output=True, text=True)
    assert bad_label.returncode == 2 and "letters, digits and underscores" in bad_label.stderr
    loopback_worker = subprocess.run(["bash", str(CLUSTER_DIR / "start_worker.sh"), "--head", "10.0.0.1:6379",
                                      "--ip", "127.0.0.1"], capture_output=True, text=True)
    assert loopback_worker.returncode == 2 and "loopback" in loopback_worker.stderr
