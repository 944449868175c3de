#!/usr/bin/env bash
# Start the head node of an srpo-ray cluster.
#
#   cluster/start_head.sh --ip IP [--port 6379] [--labels srpo_learner,srpo_rollout]
#                         [--num-cpus N] [--num-gpus N] [--dashboard-host 127.0.0.1]
#                         [-- more `ray start` flags]
#
# Other nodes join with `cluster/start_worker.sh --head IP:PORT ...`. The dashboard and job
# API (port 8265) stay on 127.0.0.1 unless --dashboard-host says otherwise: whoever reaches
# them can run code on the cluster, so submit from the head (`ray job submit --address
# http://127.0.0.1:8265 ...`) or through an SSH tunnel. --ip 127.0.0.1 makes a one-machine
# cluster that no worker can join (Ray otherwise swaps loopback for the external address,
# see RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER below). Each label becomes a custom resource
# {"srpo_learner": 1}: the node pool that cluster.learner_node_label (or rollout_/reward_)
# selects. Give the head --num-cpus 0 to keep actors off it (it then runs the driver only).
# Environment set here (e.g. NCCL_SOCKET_IFNAME) reaches the actors started on this node.
set -euo pipefail

# shellcheck source=cluster/_ray_args.sh
source "$(dirname "${BASH_SOURCE[0]}")/_ray_args.sh"
ip="" port=6379 dashboard_host=127.0.0.1 LABEL_EXAMPLE=srpo_learner
parse_ray_args start_head.sh "--ip --port --dashboard-host" "$@"
if [[ -z "$ip" ]]; then
  echo "start_head.sh: --ip is required (this node's address that the other nodes can reach," \
       "or 127.0.0.1 for a cluster on one machine)" >&2
  exit 2
fi

if [[ "$ip" == "127.0.0.1" || "$ip" == "localhost" ]]; then
  # Without this Ray replaces a loopback --node-ip-address with the external interface's
  # address (and binds there); with it, the cluster is single-machine only.
  export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
fi

exec ray start --head --node-ip-address="$ip" --port="$port" \
  --dashboard-host="$dashboard_host" --resources="$resources" "${extra[@]}"
