#!/usr/bin/env bash
# Join a worker node to an srpo-ray cluster started with cluster/start_head.sh.
#
#   cluster/start_worker.sh --head HEAD_IP:PORT --ip IP [--labels srpo_rollout]
#                           [--num-cpus N] [--num-gpus N] [-- more `ray start` flags]
#
# --ip is this node's address as the other nodes reach it (Ray binds to it). Labels mark
# the node pool: e.g. GPU nodes for generation with --labels srpo_rollout and
# cluster.rollout_node_label=srpo_rollout, learner nodes with --labels srpo_learner.
# Environment set here (e.g. NCCL_SOCKET_IFNAME) reaches the actors started on this node.
set -euo pipefail

# shellcheck source=cluster/_ray_args.sh
source "$(dirname "${BASH_SOURCE[0]}")/_ray_args.sh"
head="" ip="" LABEL_EXAMPLE=srpo_rollout
parse_ray_args start_worker.sh "--head --ip" "$@"
if [[ -z "$head" || -z "$ip" ]]; then
  echo "start_worker.sh: --head HEAD_IP:PORT and --ip THIS_NODE_IP are required" >&2
  exit 2
fi

if [[ "$ip" == "127.0.0.1" || "$ip" == "localhost" ]]; then
  echo "start_worker.sh: --ip must be an address the other nodes can reach; a loopback head" \
       "(start_head.sh --ip 127.0.0.1) is single-machine and accepts no workers" >&2
  exit 2
fi

exec ray start --address="$head" --node-ip-address="$ip" --resources="$resources" "${extra[@]}"
