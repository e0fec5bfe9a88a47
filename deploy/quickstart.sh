#!/usr/bin/env bash
# fednode quick start: the whole mission on one machine, on the embedded default (SQLite, local
# folders), with SYNTHETIC data only (fake identities, invented images).
#
#   1. The model owner trains a chest radiograph model on its own synthetic, labelled studies
#      and serves it with `fednode inference-server` (CKKS: it only ever sees ciphertexts).
#   2. DCMTK storescp plays the hospital's PACS.
#   3. The hospital's node receives a synthetic study from DCMTK storescu, de-identifies it,
#      has it inferred under homomorphic encryption, writes a DICOM TID 1500 Structured Report
#      under the ORIGINAL patient and study, and sends it to the PACS.
#   4. The SR's content (DCMTK dsrdump) and each step's timing are printed.
#
# Everything keeps running until Ctrl-C, which stops all the quick start started. Re-running is
# safe: the nodes, the model and the PACS folder are reused, and a new synthetic patient is sent.
#
#   bash deploy/quickstart.sh [PORT]
#
# PORT (default 11112) is the hospital node's DICOM port; PORT+1 is the PACS, PORT+2 the
# inference service, PORT+3 the model owner's node. QUICKSTART_DIR (default ./quickstart) holds
# everything; QUICKSTART_NO_INSTALL=1 skips the installation; QUICKSTART_EXIT=1 stops after the
# report instead of keeping everything running.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${1:-11112}"
PACS_PORT=$((PORT + 1))
INFER_PORT=$((PORT + 2))
OWNER_PORT=$((PORT + 3))
DIR="${QUICKSTART_DIR:-quickstart}"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"

if [ "${QUICKSTART_NO_INSTALL:-0}" != 1 ]; then
  if ! [ -x /usr/bin/storescu ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dcmtk >/dev/null
  fi
  python -m pip install -q --disable-pip-version-check "torch==2.13.0"
  python -m pip install -q --disable-pip-version-check -e ".[ml]"
fi
export TCP_NODELAY=1  # Debian's DCMTK leaves Nagle's algorithm on without it

PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

T0=$(date +%s%N)
step() { printf '\n== [%6.1f s] %s\n' "$(( ($(date +%s%N) - T0) / 1000000 ))e-3" "$*"; }
wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local seconds=$1 what=$2; shift 2
  for _ in $(seq 1 $((seconds * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "timed out waiting for $what" >&2
  return 1
}
count_files() { find "$1" -type f 2>/dev/null | wc -l; }

# -- 1. the model owner: train on its own synthetic labelled studies, then serve under CKKS ----
OWNER="$DIR/owner"
if ! ls "$OWNER"/fednode-data/models/*.pt >/dev/null 2>&1; then
  step "model owner: a node of its own, 60 SYNTHETIC labelled studies, local training"
  [ -f "$OWNER/fednode.toml" ] ||
    fednode init --dir "$OWNER" --port "$OWNER_PORT" --peer "STORESCU@127.0.0.1" >/dev/null
  rm -rf "$DIR/owner-data"
  fednode synth --task chest_xray --studies 60 --size 128 --seed 1 --out "$DIR/owner-data" >/dev/null
  FEDNODE_TASKS__QUIET_PERIOD_SECONDS=86400 \
    fednode serve -c "$OWNER/fednode.toml" --port "$OWNER_PORT" --workers 1 \
    >"$DIR/owner.log" 2>&1 &
  OWNER_PID=$!
  PIDS+=("$OWNER_PID")
  wait_for 60 "the model owner's node" \
    fednode echo "FEDNODE@127.0.0.1:$OWNER_PORT" --calling-ae STORESCU
  /usr/bin/storescu -aet STORESCU -aec FEDNODE +sd +r 127.0.0.1 "$OWNER_PORT" \
    "$DIR/owner-data/studies"
  expected=$(count_files "$DIR/owner-data/studies")
  deidentified() {
    fednode status -c "$OWNER/fednode.toml" --json |
      python -c "import json,sys; n=json.load(sys.stdin)['instances'].get('deidentified', 0); sys.exit(n < $expected)"
  }
  wait_for 300 "de-identification of the training studies" deidentified
  fednode labels import "$DIR/owner-data/labels.csv" -c "$OWNER/fednode.toml" >/dev/null
  fednode train --task chest_xray --local --epochs 30 -c "$OWNER/fednode.toml"
  kill -TERM "$OWNER_PID"
  wait "$OWNER_PID" 2>/dev/null || true
fi
MODEL=$(ls -t "$OWNER"/fednode-data/models/*.pt | head -1)

step "model owner: serving $(basename "$MODEL") with fednode inference-server on port $INFER_PORT"
fednode inference-server --model "$MODEL" --port "$INFER_PORT" --state-dir "$DIR/inference" \
  >"$DIR/inference.log" 2>&1 &
PIDS+=("$!")
wait_for 120 "the inference service" grep -q "listening on" "$DIR/inference.log"
fednode inference-server token issue hospital --state-dir "$DIR/inference" 2>/dev/null |
  tail -1 >"$DIR/hospital.token"
chmod 600 "$DIR/hospital.token"

# -- 2. the PACS -----------------------------------------------------------------------------
step "PACS: DCMTK storescp as AE PACS on port $PACS_PORT, writing to $DIR/pacs"
mkdir -p "$DIR/pacs"
/usr/bin/storescp --aetitle PACS --output-directory "$DIR/pacs" --unique-filenames \
  "$PACS_PORT" >"$DIR/pacs.log" 2>&1 &
PIDS+=("$!")
wait_for 30 "the PACS" /usr/bin/echoscu -aec PACS 127.0.0.1 "$PACS_PORT"

# -- 3. the hospital's node --------------------------------------------------------------------
CONFIG="$DIR/fednode.toml"
[ -f "$CONFIG" ] || fednode init --dir "$DIR" --port "$PORT" --peer "STORESCU@127.0.0.1" >/dev/null
# The demo's settings, as environment variables (the same keys work in fednode.toml):
export FEDNODE_INFERENCE__SERVER="http://127.0.0.1:$INFER_PORT"
export FEDNODE_INFERENCE__TOKEN_FILE="$DIR/hospital.token"
export FEDNODE_EXPORT__DESTINATIONS="[{\"name\": \"pacs\", \"ae_title\": \"PACS\", \"host\": \"127.0.0.1\", \"port\": $PACS_PORT}]"
export FEDNODE_TASKS__QUIET_PERIOD_SECONDS=2   # a study is complete 2 s after its last image
export FEDNODE_TASKS__SWEEP_SECONDS=0.5
export FEDNODE_EXPORT__SWEEP_SECONDS=0.5
step "hospital node: fednode serve on port $PORT (reports to PACS@127.0.0.1:$PACS_PORT)"
fednode serve -c "$CONFIG" --port "$PORT" >"$DIR/node.log" 2>&1 &
NODE=$!
PIDS+=("$NODE")
wait_for 60 "the hospital node" fednode echo "FEDNODE@127.0.0.1:$PORT" --calling-ae STORESCU

SEED=$(date +%s)  # a new synthetic patient on every run
rm -rf "$DIR/incoming"
fednode synth --task chest_xray --studies 1 --size 256 --seed "$SEED" --out "$DIR/incoming" >/dev/null
before=$(count_files "$DIR/pacs")
step "PACS -> node: a SYNTHETIC chest study (fake patient) with DCMTK storescu"
/usr/bin/storescu -aet STORESCU -aec FEDNODE +sd +r 127.0.0.1 "$PORT" "$DIR/incoming/studies"
step "node: de-identify, assemble, infer under CKKS, report, export (watch: fednode status)"
stopped() {  # the newest study stopped at a failure: say where, and why (fednode status)
  fednode status -c "$CONFIG" --json | python -c '
import json, sys
studies = json.load(sys.stdin)["studies"]
sys.exit(0 if studies and studies[0]["step"] in ("rejected", "inference failed", "export failed") else 1)'
}
for i in $(seq 1 300); do  # up to 5 minutes
  [ "$(count_files "$DIR/pacs")" -gt "$before" ] && break
  if [ $((i % 3)) = 0 ] && stopped >/dev/null 2>&1; then
    fednode status -c "$CONFIG"
    echo "the study stopped at a failure (see above and $DIR/node.log)" >&2
    exit 1
  fi
  [ "$i" = 300 ] && { echo "no report after 5 minutes (see $DIR/node.log)" >&2; exit 1; }
  sleep 1
done
SR=$(ls -t "$DIR"/pacs/* | head -1)

# -- 4. what came back -------------------------------------------------------------------------
step "PACS received $SR; its content (DCMTK dsrdump):"
/usr/bin/dsrdump --print-long-values --print-instance-uid "$SR"
step "each step of this study, in seconds after it was received (fednode status):"
fednode status -c "$CONFIG" --json | python -c '
import json, sys
from datetime import datetime
study = json.load(sys.stdin)["studies"][0]
times = {k: datetime.fromisoformat(v) for k, v in study["times"].items() if v}
start = previous = times["received"]
print("study", study["study_key"], "(pseudonym), version", study["version"], "->", study["step"])
for name, at in times.items():
    total, delta = (at - start).total_seconds(), (at - previous).total_seconds()
    print(f"  {name:<14} +{total:6.2f} s   (this step {delta:6.2f} s)")
    previous = at
'
fednode exports list -c "$CONFIG"

if [ "${QUICKSTART_EXIT:-0}" = 1 ]; then
  exit 0
fi
step "all running (node, inference service, PACS); Ctrl-C stops everything"
wait "$NODE"
