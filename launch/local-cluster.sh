#!/usr/bin/env bash
# A multi-node Ray cluster on ONE machine: a head and N worker "nodes", each its own raylet with
# its own ports and resources. This is how the tests exercise multi-node sweeps; it is also a
# quick way to try `search.run --address` by hand.
#
#   launch/local-cluster.sh start [N_WORKERS=1] [CPUS_PER_NODE=1] [GPUS_PER_NODE=1]
#   python -m search.run --address 127.0.0.1:${TUMORSEG_HEAD_PORT:-6390} --gpus 2 ...
#   launch/local-cluster.sh kill-worker 1     # simulate losing worker node 1 (SIGKILL its raylet)
#   launch/local-cluster.sh stop
#
# GPUS_PER_NODE are logical GPUs when the machine has none: scheduling behaves as on a GPU box.
# Ray's token authentication stays on: `ray start --head` generates ~/.ray/auth_token if needed.
set -euo pipefail
HEAD_PORT=${TUMORSEG_HEAD_PORT:-6390}
BASE=${TUMORSEG_NODE_PORT_BASE:-21000}  # node i uses ports BASE+100*i .. BASE+100*i+99
TEMP_DIR=${TUMORSEG_RAY_TEMP_DIR:-/tmp/ray-tumorseg}
export RAY_USAGE_STATS_ENABLED=0
# token authentication on for every process of this cluster (and the drivers that attach to it)
export RAY_AUTH_MODE=token

node_ports() {  # ports for node $1 (0 = head)
  local b=$((BASE + 100 * $1))
  echo "--node-manager-port=$b --object-manager-port=$((b + 1)) --min-worker-port=$((b + 10)) --max-worker-port=$((b + 99))"
}

case "${1:-}" in
  start)
    workers=${2:-1}; cpus=${3:-1}; gpus=${4:-1}
    [ -n "${RAY_AUTH_TOKEN:-}" ] || [ -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ] || ray get-auth-token --generate >/dev/null
    # each simulated node gets its own node-local data cache (search/datapath.py), as separate machines would
    # shellcheck disable=SC2046
    TUMORSEG_NODE_CACHE_DIR="$TEMP_DIR/node-cache/head" ray start --head --port="$HEAD_PORT" --temp-dir="$TEMP_DIR" --num-cpus="$cpus" --num-gpus="$gpus" \
      --include-dashboard=false $(node_ports 0) --disable-usage-stats >/dev/null
    for i in $(seq 1 "$workers"); do
      # shellcheck disable=SC2046
      TUMORSEG_NODE_CACHE_DIR="$TEMP_DIR/node-cache/node_$i" ray start --address="127.0.0.1:$HEAD_PORT" --num-cpus="$cpus" --num-gpus="$gpus" $(node_ports "$i") \
        --resources="{\"node_$i\": 1}" >/dev/null
    done
    echo "Ray cluster up: head 127.0.0.1:$HEAD_PORT + $workers worker node(s), $cpus CPU / $gpus GPU each"
    echo "  python -m search.run --address 127.0.0.1:$HEAD_PORT --gpus $((gpus * (workers + 1))) ..."
    ;;
  kill-worker)
    port=$((BASE + 100 * ${2:?which worker node}))
    pkill -KILL -f -- "raylet.*--node_manager_port=$port( |$)" || { echo "no raylet on port $port" >&2; exit 1; }
    echo "killed worker node ${2} (raylet on port $port)"
    ;;
  stop)
    # only this cluster's processes (their command lines name its temp dir); `ray stop` would also
    # end every other Ray instance on the machine
    for _ in 1 2 3; do
      pkill -TERM -f -- "$TEMP_DIR/session_" 2>/dev/null || true
      pkill -TERM -f -- "--port=$HEAD_PORT" 2>/dev/null || true
      sleep 1
    done
    pkill -KILL -f -- "$TEMP_DIR/session_" 2>/dev/null || true
    echo "Ray cluster stopped"
    ;;
  *)
    sed -n '2,13p' "$0"; exit 2 ;;
esac
