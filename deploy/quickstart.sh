#!/usr/bin/env bash
# fednode quick start on the embedded default (SQLite, local folders): installs fednode and
# DCMTK, initialises a node in ./quickstart, starts it, sends it a SYNTHETIC chest radiograph
# study with DCMTK storescu, shows it received and de-identified, then keeps the node running
# in the foreground (Ctrl-C stops it gracefully).
#
#   bash deploy/quickstart.sh [PORT]
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${1:-11112}"
DIR="${QUICKSTART_DIR:-quickstart}"

if ! [ -x /usr/bin/storescu ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dcmtk >/dev/null
fi
python -m pip install -q --disable-pip-version-check "torch==2.13.0"
python -m pip install -q --disable-pip-version-check -e ".[ml]"

if ! [ -f "$DIR/fednode.toml" ]; then
  fednode init --dir "$DIR" --port "$PORT" --peer "STORESCU@127.0.0.1"
fi
CONFIG="$DIR/fednode.toml"

echo "== generating a synthetic study (fake identities, synthetic pixels)"
fednode synth --task chest_xray --studies 2 --out "$DIR/incoming"

echo "== starting the node"
fednode serve -c "$CONFIG" --port "$PORT" &
NODE=$!
trap 'kill -TERM $NODE 2>/dev/null; wait $NODE' INT TERM EXIT
for _ in $(seq 1 50); do
  fednode echo "FEDNODE@127.0.0.1:$PORT" --calling-ae STORESCU >/dev/null 2>&1 && break
  sleep 0.2
done

echo "== sending the study with DCMTK storescu"
TCP_NODELAY=1 /usr/bin/storescu -aet STORESCU -aec FEDNODE +sd +r 127.0.0.1 "$PORT" "$DIR/incoming/studies"
sleep 3  # the workers de-identify in the background
fednode status -c "$CONFIG"

echo "== the node keeps running on port $PORT (Ctrl-C to stop)"
wait $NODE
