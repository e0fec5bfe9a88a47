#!/usr/bin/env bash
# fednode quick start on the embedded default (SQLite, local folders).
#
# Creates a virtual environment (.venv, with python3: nothing is installed into the system
# Python, so PEP 668 "externally managed" systems such as Debian 12 work), installs fednode
# into it, initialises a node in ./quickstart, starts it, sends it two SYNTHETIC chest
# radiograph studies with DCMTK storescu, shows them received and de-identified, then keeps
# the node running in the foreground.
#
#   bash deploy/quickstart.sh [PORT]
#
# Environment:
#   FEDNODE_TORCH_INDEX   extra package index for the torch wheel. PyPI's default Linux wheel
#                         pulls the CUDA stack (several GB); PyTorch's CPU-only wheels are at
#                         https://download.pytorch.org/whl/cpu
#   FEDNODE_VENV          the virtual environment (default .venv; reused when it exists)
#   FEDNODE_VENV_OPTIONS  extra `python3 -m venv` options, e.g. --system-site-packages
#   PYTHON                the interpreter that creates the venv (default python3)
#   QUICKSTART_DIR        the node's folder (default quickstart; holds a master secret)
#   QUICKSTART_STAY       1 (default): keep the node running until Ctrl-C; 0: stop it after
#                         the status (for scripts)
#
# Re-running is safe: the venv and the node are reused, the synthetic studies are generated
# afresh and sent again (the node acknowledges re-sent instances as duplicates).
# Exit status: 0 when the node was stopped with Ctrl-C (or SIGTERM) while it ran in the
# foreground, or at the end with QUICKSTART_STAY=0; 130 when Ctrl-C interrupted the set-up;
# otherwise the failing step's status.
#
# The steps are the functions below, run in order by main(); a new step is a function and a
# line in main().
set -euo pipefail
cd "$(dirname "$0")/.."

PORT="${1:-11112}"
DIR="${QUICKSTART_DIR:-quickstart}"
VENV="${FEDNODE_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
STAY="${QUICKSTART_STAY:-1}"
TORCH="torch==2.13.0"  # the pin matters: an open range may pull a multi-GB CUDA build
CONFIG="$DIR/fednode.toml"
AE="STORESCU"
NODE=""
RUNNING=0  # 1 once the node runs in the foreground: Ctrl-C is then the way to stop it

step() { printf '\n== %s\n' "$*"; }
fednode() { "$VENV/bin/fednode" "$@"; }

stop_node() {
  if [ -n "$NODE" ] && kill -0 "$NODE" 2>/dev/null; then
    kill -TERM "$NODE" 2>/dev/null || true
    wait "$NODE" 2>/dev/null || true
  fi
  NODE=""
}

on_signal() {
  trap - INT TERM
  if [ "$RUNNING" = 1 ]; then
    echo
    echo "== stopping the node"
    stop_node
    echo "stopped"
    exit 0
  fi
  stop_node
  echo "interrupted" >&2
  exit 130
}
trap on_signal INT TERM
trap stop_node EXIT

check_tools() {
  step "checking the tools (python3 with venv, DCMTK)"
  if ! command -v "$PYTHON" >/dev/null; then
    echo "$PYTHON is not installed; on Debian/Ubuntu: apt-get install python3 python3-venv" >&2
    exit 1
  fi
  if ! [ -x /usr/bin/storescu ]; then
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
  "${pip[@]}" -e ".[ml]"
}

init_node() {
  if [ -f "$CONFIG" ]; then
    step "reusing the node in $DIR"
    return
  fi
  step "initialising a node in $DIR"
  fednode init --dir "$DIR" --port "$PORT" --peer "$AE@127.0.0.1"
}

make_studies() {
  step "generating two synthetic studies (fake identities, synthetic pixels)"
  rm -rf "$DIR/incoming"  # synthetic and re-generated on every run
  fednode synth --task chest_xray --studies 2 --out "$DIR/incoming"
}

start_node() {
  step "starting the node on port $PORT"
  # The executable itself in the background (not the shell function): $! is then the node's
  # own process, which SIGTERM stops gracefully.
  "$VENV/bin/fednode" serve -c "$CONFIG" --port "$PORT" &
  NODE=$!
  for _ in $(seq 1 100); do
    if fednode echo "FEDNODE@127.0.0.1:$PORT" --calling-ae "$AE" >/dev/null 2>&1; then
      return
    fi
    if ! kill -0 "$NODE" 2>/dev/null; then
      wait "$NODE" || true
      echo "the node did not start (see its messages above)" >&2
      exit 1
    fi
    sleep 0.2
  done
  echo "the node does not answer C-ECHO on port $PORT" >&2
  exit 1
}

send_studies() {
  step "sending the studies with DCMTK storescu"
  TCP_NODELAY=1 /usr/bin/storescu -aet "$AE" -aec FEDNODE +sd +r 127.0.0.1 "$PORT" \
    "$DIR/incoming/studies"
}

show_status() {
  step "waiting for the workers to de-identify them"
  local sent
  sent=$(find "$DIR/incoming/studies" -name '*.dcm' | wc -l)
  for _ in $(seq 1 60); do
    if fednode status -c "$CONFIG" --json | "$VENV/bin/python" -c '
import json, sys
done = json.load(sys.stdin)["instances"].get("deidentified", 0)
sys.exit(0 if done >= int(sys.argv[1]) else 1)' "$sent"; then
      break
    fi
    sleep 0.5
  done
  fednode status -c "$CONFIG"
}

stay_in_foreground() {
  if [ "$STAY" != 1 ]; then
    step "stopping the node (QUICKSTART_STAY=$STAY)"
    stop_node
    return
  fi
  step "the node keeps running on port $PORT (Ctrl-C to stop)"
  echo "to use fednode yourself: source $VENV/bin/activate && fednode --help"
  RUNNING=1
  wait "$NODE"
}

main() {
  check_tools
  make_venv
  install_fednode
  init_node
  make_studies
  start_node
  send_studies
  show_status
  stay_in_foreground
  echo "to use fednode yourself: source $VENV/bin/activate && fednode --help"
}

main
