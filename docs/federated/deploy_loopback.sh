#!/usr/bin/env bash
# Flower's deployment runtime on ONE machine (loopback): a SuperLink, one SuperNode per user, `flwr run`.
# The same commands, with real host names and TLS instead of --insecure, deploy on several machines (README.md).
# Usage: bash docs/federated/deploy_loopback.sh FED_CONFIG.yaml NUM_USERS [WORKDIR]
# Checked with flwr 1.42.0 on a 2-user Sent140 fixture (2 rounds, run folder written, status completed).
set -euo pipefail
CONFIG=$(realpath "$1"); USERS=$2; WORK=${3:-$(mktemp -d)}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
export FLWR_HOME=$WORK/flwrhome PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$FLWR_HOME" "$WORK/app"
sed "s#/path/on/every/machine/fed_sent140_dp.yaml#$CONFIG#" "$REPO/docs/federated/flower_app/pyproject.toml" > "$WORK/app/pyproject.toml"
printf '[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:18000"\ninsecure = true\n' > "$FLWR_HOME/config.toml"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
flower-superlink --insecure --port 18000 --disable-runtime-dependency-installation > "$WORK/superlink.log" 2>&1 &
pids+=($!)
sleep 10
for ((i = 0; i < USERS; i++)); do
  flower-supernode --insecure --superlink 127.0.0.1:18000 --port $((19094 + i)) \
    --node-config "partition-id=$i" > "$WORK/supernode$i.log" 2>&1 &
  pids+=($!)
done
sleep 10
flwr run "$WORK/app" loopback
echo "submitted; follow with: FLWR_HOME=$FLWR_HOME flwr ls loopback   (logs in $WORK); Ctrl-C stops the nodes"
wait "${pids[0]}"
