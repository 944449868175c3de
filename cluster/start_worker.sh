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

head="" ip="" labels="" extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --head) head=$2; shift 2 ;;
    --ip) ip=$2; shift 2 ;;
    --labels) labels=$2; shift 2 ;;
    --num-cpus|--num-gpus) extra+=("$1=$2"); shift 2 ;;
    --) shift; extra+=("$@"); break ;;
    *) echo "start_worker.sh: unknown argument '$1'; see the usage at the top of $0" >&2; exit 2 ;;
  esac
done
if [[ -z "$head" || -z "$ip" ]]; then
  echo "start_worker.sh: --head HEAD_IP:PORT and --ip THIS_NODE_IP are required" >&2
  exit 2
fi

if [[ "$ip" == "127.0.0.1" || "$ip" == "localhost" ]]; then
  echo "start_worker.sh: --ip must be an address the other nodes can reach; a loopback head" \
       "(start_head.sh --ip 127.0.0.1) is single-machine and accepts no workers" >&2
  exit 2
fi

resources="{"
IFS=, read -ra names <<< "$labels"
for name in "${names[@]}"; do
  [[ -z "$name" ]] && continue
  if [[ ! "$name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then
    echo "start_worker.sh: label '$name' must be letters, digits and underscores (e.g. srpo_rollout)" >&2
    exit 2
  fi
  if [[ "$resources" != "{" ]]; then resources+=", "; fi
  resources+="\"$name\": 1"
done
resources+="}"

exec ray start --address="$head" --node-ip-address="$ip" --resources="$resources" "${extra[@]}"
