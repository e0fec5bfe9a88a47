#!/usr/bin/env bash
# fednode quick start: the whole mission on one machine, on the embedded default (SQLite, local
# folders), with SYNTHETIC data only (fake identities, invented images).
#
#   1. The model owner trains a chest radiograph model on its own synthetic, labelled studies
#      (a node of its own) and serves it with `fednode inference-server`: under CKKS
#      homomorphic encryption it only ever sees ciphertexts.
#   2. DCMTK storescp plays the hospital's PACS.
#   3. The hospital's node receives a synthetic study from DCMTK storescu, de-identifies it, has
#      it inferred under encryption, writes a DICOM TID 1500 Structured Report under the
#      ORIGINAL patient and study, and sends it back to the PACS.
#   4. The SR's content (DCMTK dsrdump) and each step's timing are printed; then everything
#      keeps running in the foreground until Ctrl-C, which stops all the quick start started.
#
# Creates a virtual environment (.venv, with python3: nothing is installed into the system
# Python, so PEP 668 "externally managed" systems such as Debian 12 work) and installs fednode
# into it.
#
#   bash deploy/quickstart.sh [PORT]
#
# PORT (default 11112) is the hospital node's DICOM port; PORT+1 is the PACS, PORT+2 the
# inference service, PORT+3 the model owner's node.
#
# Environment:
#   FEDNODE_TORCH_INDEX   extra package index for the torch wheel. PyPI's default Linux wheel
#                         pulls the CUDA stack (several GB); PyTorch's CPU-only wheels are at
#                         https://download.pytorch.org/whl/cpu
#   FEDNODE_VENV          the virtual environment (default .venv; reused when it exists)
#   FEDNODE_VENV_OPTIONS  extra `python3 -m venv` options, e.g. --system-site-packages
#   PYTHON                the interpreter that creates the venv (default python3)
#   QUICKSTART_DIR        everything else (default quickstart): the hospital's node (holds a
#                         master secret), owner/ (the model owner's node and model), pacs/,
#                         inference/ (the service's state), logs
#   QUICKSTART_STAY       1 (default): keep everything running until Ctrl-C; 0: stop after the
#                         report (for scripts)
#
# Re-running is safe: the venv, both nodes and the trained model are reused; a new synthetic
# patient is sent, so a new report comes back.
# Exit status: 0 when stopped with Ctrl-C (or SIGTERM) while running in the foreground, or at the
# end with QUICKSTART_STAY=0; 130 when Ctrl-C interrupted the set-up; otherwise the failing
# step's status.
#
# The steps are the functions below, run in order by main(); a new step is a function and a
# line in main().
set -euo pipefail
cd "$(dirname "$0")/.."

PORT="${1:-11112}"
PACS_PORT=$((PORT + 1))
INFER_PORT=$((PORT + 2))
OWNER_PORT=$((PORT + 3))
DIR="${QUICKSTART_DIR:-quickstart}"
VENV="${FEDNODE_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
STAY="${QUICKSTART_STAY:-1}"
TORCH="torch==2.13.0"  # the pin matters: an open range may pull a multi-GB CUDA build
CONFIG="$DIR/fednode.toml"
OWNER="$DIR/owner"
AE="STORESCU"
NODE=""
PIDS=()    # everything started in the background, stopped in reverse order
RUNNING=0  # 1 once everything runs in the foreground: Ctrl-C is then the way to stop it
export TCP_NODELAY=1  # Debian's DCMTK leaves Nagle's algorithm on without it (slow stores)
T0=$(date +%s%N)

step() { printf '\n== [%6.1f s] %s\n' "$(( ($(date +%s%N) - T0) / 1000000 ))e-3" "$*"; }
fednode() { "$VENV/bin/fednode" "$@"; }
py() { "$VENV/bin/python" "$@"; }
count_files() { find "$1" -type f 2>/dev/null | wc -l; }

stop_all() {
  local i pid
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    pid=${PIDS[i]}
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    fi
  done
  PIDS=()
  NODE=""
}

on_signal() {
  trap - INT TERM
  if [ "$RUNNING" = 1 ]; then
    echo
    echo "== stopping the node, the inference service and the PACS"
    stop_all
    echo "stopped"
    exit 0
  fi
  stop_all
  echo "interrupted" >&2
  exit 130
}
trap on_signal INT TERM
trap stop_all EXIT

background() {  # background LOG COMMAND...: start COMMAND (its own process), remember its pid
  local log=$1
  shift
  "$@" >"$log" 2>&1 &
  PIDS+=("$!")
}

wait_until() {  # wait_until SECONDS WHAT COMMAND...: poll COMMAND every 0.2 s
  local seconds=$1 what=$2 pid=${PIDS[${#PIDS[@]} - 1]:-}
  shift 2
  for _ in $(seq 1 $((seconds * 5))); do
    if "$@" >/dev/null 2>&1; then
      return
    fi
    if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
      echo "$what: the process exited (see its log in $DIR)" >&2
      exit 1
    fi
    sleep 0.2
  done
  echo "timed out waiting for $what (see the logs in $DIR)" >&2
  exit 1
}

check_tools() {
  step "checking the tools (python3 with venv, DCMTK)"
  if ! command -v "$PYTHON" >/dev/null; then
    echo "$PYTHON is not installed; on Debian/Ubuntu: apt-get install python3 python3-venv" >&2
    exit 1
  fi
  if ! [ -x /usr/bin/storescu ] || ! [ -x /usr/bin/storescp ] || ! [ -x /usr/bin/dsrdump ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dcmtk >/dev/null
    else
      echo "DCMTK is missing; install it first: sudo apt-get install dcmtk" >&2
      exit 1
    fi
  fi
}

make_venv() {
  if [ -x "$VENV/bin/python" ]; then
    step "reusing the virtual environment $VENV"
    return
  fi
  step "creating the virtual environment $VENV"
  # shellcheck disable=SC2086  # options are words
  if ! "$PYTHON" -m venv ${FEDNODE_VENV_OPTIONS:-} "$VENV"; then
    rm -rf "$VENV"
    echo "cannot create a virtual environment; on Debian/Ubuntu: apt-get install python3-venv" >&2
    exit 1
  fi
}

install_fednode() {
  step "installing fednode into $VENV"
  local pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
  if [ -n "${FEDNODE_TORCH_INDEX:-}" ]; then
    "${pip[@]}" --extra-index-url "$FEDNODE_TORCH_INDEX" "$TORCH"
  else
    "${pip[@]}" "$TORCH"
  fi
  "${pip[@]}" -e ".[ml,he]"
}

train_model() {
  if ls "$OWNER"/fednode-data/models/*.pt >/dev/null 2>&1; then
    step "reusing the model owner's model in $OWNER"
    return
  fi
  step "model owner: a node of its own, 60 SYNTHETIC labelled studies, local training"
  [ -f "$OWNER/fednode.toml" ] ||
    fednode init --dir "$OWNER" --port "$OWNER_PORT" --peer "$AE@127.0.0.1" >/dev/null
  rm -rf "$DIR/owner-data"
  fednode synth --task chest_xray --studies 60 --size 128 --seed 1 --out "$DIR/owner-data" \
    >/dev/null
  # No study completes (no inference is configured there): the owner only trains.
  FEDNODE_TASKS__QUIET_PERIOD_SECONDS=86400 background "$DIR/owner.log" \
    "$VENV/bin/fednode" serve -c "$OWNER/fednode.toml" --port "$OWNER_PORT" --workers 1
  wait_until 60 "the model owner's node" \
    fednode echo "FEDNODE@127.0.0.1:$OWNER_PORT" --calling-ae "$AE"
  /usr/bin/storescu -aet "$AE" -aec FEDNODE +sd +r 127.0.0.1 "$OWNER_PORT" \
    "$DIR/owner-data/studies"
  local sent
  sent=$(count_files "$DIR/owner-data/studies")
  owner_deidentified() {
    fednode status -c "$OWNER/fednode.toml" --json | py -c '
import json, sys
sys.exit(0 if json.load(sys.stdin)["instances"].get("deidentified", 0) >= int(sys.argv[1]) else 1)
' "$sent"
  }
  wait_until 300 "de-identification of the training studies" owner_deidentified
  fednode labels import "$DIR/owner-data/labels.csv" -c "$OWNER/fednode.toml" >/dev/null
  fednode train --task chest_xray --local --epochs 30 -c "$OWNER/fednode.toml"
  stop_all
}

start_inference() {
  local model
  model=$(ls -t "$OWNER"/fednode-data/models/*.pt | head -1)
  step "model owner: serving $(basename "$model") with fednode inference-server, port $INFER_PORT"
  background "$DIR/inference.log" "$VENV/bin/fednode" inference-server --model "$model" \
    --port "$INFER_PORT" --state-dir "$DIR/inference"
  wait_until 120 "the inference service" grep -q "listening on" "$DIR/inference.log"
  # The service's administrator issues the hospital's token (stored there only hashed).
  fednode inference-server token issue hospital --state-dir "$DIR/inference" 2>/dev/null |
    tail -1 >"$DIR/hospital.token"
  chmod 600 "$DIR/hospital.token"
}

start_pacs() {
  step "PACS: DCMTK storescp as AE PACS on port $PACS_PORT, writing to $DIR/pacs"
  mkdir -p "$DIR/pacs"
  background "$DIR/pacs.log" /usr/bin/storescp --aetitle PACS --output-directory "$DIR/pacs" \
    --unique-filenames "$PACS_PORT"
  wait_until 30 "the PACS" /usr/bin/echoscu -aec PACS 127.0.0.1 "$PACS_PORT"
}

init_node() {
  if [ -f "$CONFIG" ]; then
    step "reusing the node in $DIR"
    return
  fi
  step "initialising the hospital's node in $DIR"
  fednode init --dir "$DIR" --port "$PORT" --peer "$AE@127.0.0.1"
}

make_studies() {
  step "generating a synthetic study (a new fake patient, synthetic pixels)"
  rm -rf "$DIR/incoming"  # synthetic and re-generated on every run
  fednode synth --task chest_xray --studies 1 --size 256 --seed "$(date +%s)" \
    --out "$DIR/incoming"
}

start_node() {
  # The demo's settings as environment variables (the same keys work in fednode.toml:
  # [inference] server/token_file, [[export.destinations]], [tasks] quiet_period_seconds).
  export FEDNODE_INFERENCE__SERVER="http://127.0.0.1:$INFER_PORT"
  export FEDNODE_INFERENCE__TOKEN_FILE="$DIR/hospital.token"
  export FEDNODE_EXPORT__DESTINATIONS="[{\"name\": \"pacs\", \"ae_title\": \"PACS\", \"host\": \"127.0.0.1\", \"port\": $PACS_PORT}]"
  export FEDNODE_TASKS__QUIET_PERIOD_SECONDS=2  # a study is complete 2 s after its last image
  export FEDNODE_TASKS__SWEEP_SECONDS=0.5
  export FEDNODE_EXPORT__SWEEP_SECONDS=0.5
  step "starting the hospital's node on port $PORT (reports go to PACS@127.0.0.1:$PACS_PORT)"
  # The executable itself in the background (not the shell function): its pid is then the
  # node's own process, which SIGTERM stops gracefully.
  "$VENV/bin/fednode" serve -c "$CONFIG" --port "$PORT" >"$DIR/node.log" 2>&1 &
  NODE=$!
  PIDS+=("$NODE")
  wait_until 60 "the hospital's node" fednode echo "FEDNODE@127.0.0.1:$PORT" --calling-ae "$AE"
}

send_studies() {
  BEFORE=$(count_files "$DIR/pacs")
  step "PACS -> node: sending the study with DCMTK storescu"
  /usr/bin/storescu -aet "$AE" -aec FEDNODE +sd +r 127.0.0.1 "$PORT" "$DIR/incoming/studies"
}

wait_for_report() {
  step "node: de-identify, assemble, infer under CKKS, report, export (fednode status shows it)"
  local i
  for i in $(seq 1 300); do  # up to 5 minutes
    if [ "$(count_files "$DIR/pacs")" -gt "$BEFORE" ]; then
      return
    fi
    if [ $((i % 3)) = 0 ] && fednode status -c "$CONFIG" --json | py -c '
import json, sys
studies = json.load(sys.stdin)["studies"]
sys.exit(0 if studies and studies[0]["step"] in ("rejected", "inference failed", "export failed") else 1)
'; then
      fednode status -c "$CONFIG"
      echo "the study stopped at a failure (see above and $DIR/node.log)" >&2
      exit 1
    fi
    sleep 1
  done
  fednode status -c "$CONFIG"
  echo "no report came back within 5 minutes (see $DIR/node.log)" >&2
  exit 1
}

show_report() {
  local sr
  sr=$(ls -t "$DIR"/pacs/* | head -1)
  step "the PACS received $sr; its content (DCMTK dsrdump):"
  /usr/bin/dsrdump --print-long-values --print-instance-uid "$sr"
  step "each step of the study, after it was received (fednode status --json):"
  fednode status -c "$CONFIG" --json | py -c '
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
  fednode status -c "$CONFIG"
  fednode exports list -c "$CONFIG"
}

stay_in_foreground() {
  if [ "$STAY" != 1 ]; then
    step "stopping everything (QUICKSTART_STAY=$STAY)"
    stop_all
    return
  fi
  step "the node keeps running on port $PORT, with the inference service and the PACS (Ctrl-C to stop)"
  echo "to use fednode yourself: source $VENV/bin/activate && fednode --help"
  RUNNING=1
  wait "$NODE"
}

main() {
  check_tools
  make_venv
  install_fednode
  mkdir -p "$DIR"
  DIR="$(cd "$DIR" && pwd)"
  CONFIG="$DIR/fednode.toml"
  OWNER="$DIR/owner"
  train_model
  start_inference
  start_pacs
  init_node
  make_studies
  start_node
  send_studies
  wait_for_report
  show_report
  stay_in_foreground
  echo "to use fednode yourself: source $VENV/bin/activate && fednode --help"
}

main
