#!/usr/bin/env bash
# The README's run command: a whole fleet on this one machine. It starts a gateway (with the
# Mosquitto it supervises), two Node-RED instances and two edge agents that enroll with a
# provisioning token, shows them online, and tells you what to try next.
#
# Everything it starts runs in its own process group and is stopped on Ctrl-C, on error and on
# --no-wait, so nothing outlives the demo. Its state lives in demo-data/ (or --data-dir), which a
# new run wipes unless --keep is given.
# shellcheck disable=SC2317  # cleanup and what it calls run from a trap
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'USAGE'
usage: scripts/demo.sh [--data-dir DIR] [--http-port PORT] [--mqtt-port PORT] [--keep] [--no-wait]

Runs a local edgefleet demo: a gateway, two Node-RED instances and two edge agents
(press-01, press-02), until Ctrl-C.

  --data-dir DIR    where the demo keeps its state (default: demo-data/ in the repository)
  --http-port PORT  the gateway's HTTP port on 127.0.0.1 (default: 8080)
  --mqtt-port PORT  the gateway's MQTT port on 127.0.0.1 (default: 8883)
  --keep            reuse the state of the last run instead of wiping it
  --no-wait         stop everything and exit once the fleet is shown online
USAGE
}

DATA_DIR="$REPO/demo-data"
HTTP_PORT=8080
MQTT_PORT=8883
KEEP=0
WAIT=1
STARTUP_TIMEOUT=60 # seconds for each service to come up; Node-RED's first start is the slowest
AGENT_NAMES=(press-01 press-02)

PIDS=() # process group ids of everything started here, in start order
NAMES=()
LOGS=()

parse_args() {
  while [ $# -gt 0 ]; do
    case "$1" in
      --data-dir) DATA_DIR="${2:?--data-dir needs a directory}"; shift 2 ;;
      --data-dir=*) DATA_DIR="${1#*=}"; shift ;;
      --http-port) HTTP_PORT="${2:?--http-port needs a port number}"; shift 2 ;;
      --http-port=*) HTTP_PORT="${1#*=}"; shift ;;
      --mqtt-port) MQTT_PORT="${2:?--mqtt-port needs a port number}"; shift 2 ;;
      --mqtt-port=*) MQTT_PORT="${1#*=}"; shift ;;
      --keep) KEEP=1; shift ;;
      --no-wait) WAIT=0; shift ;;
      -h | --help) usage; exit 0 ;;
      *) usage >&2; die "unknown argument: $1" ;;
    esac
  done
  check_port_number --http-port "$HTTP_PORT"
  check_port_number --mqtt-port "$MQTT_PORT"
  [ "$HTTP_PORT" != "$MQTT_PORT" ] || die "--http-port and --mqtt-port are both $HTTP_PORT: pick two ports"
  DATA_DIR="$(realpath -m "$DATA_DIR")"
}

check_port_number() {
  if ! [[ "$2" =~ ^[0-9]+$ ]] || [ "$2" -lt 1 ] || [ "$2" -gt 65535 ]; then
    die "$1 must be a port number from 1 to 65535, not '$2'"
  fi
}

port_busy() {
  # Something accepts connections on 127.0.0.1:$1 (a listener on 0.0.0.0 counts too).
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

check_ports_free() {
  port_busy "$HTTP_PORT" \
    && die "port $HTTP_PORT (HTTP) is already in use on 127.0.0.1: stop what uses it or pass --http-port PORT"
  port_busy "$MQTT_PORT" \
    && die "port $MQTT_PORT (MQTT) is already in use on 127.0.0.1: stop what uses it or pass --mqtt-port PORT"
  return 0
}

prepare_data_dir() {
  local marker="$DATA_DIR/.edgefleet-demo"
  if [ -e "$DATA_DIR" ] && [ ! -e "$marker" ] && [ -n "$(ls -A "$DATA_DIR" 2>/dev/null)" ]; then
    die "$DATA_DIR exists and was not made by demo.sh; remove it yourself or pass another --data-dir"
  fi
  if [ -e "$marker" ] && [ "$KEEP" -eq 0 ]; then
    say "wiping the previous demo's state in $DATA_DIR (pass --keep to reuse it)"
    rm -rf "$DATA_DIR"
  elif [ -e "$marker" ]; then
    say "keeping the previous demo's state in $DATA_DIR"
  fi
  mkdir -p "$DATA_DIR/logs"
  touch "$marker"
}

ef() {
  "$VENV/bin/edgefleet" "$@"
}

# Start a long-running command in a session of its own, so that Ctrl-C in this terminal reaches
# only this script, and stopping the group also stops whatever the command started.
start() {
  local name="$1" log="$2"
  shift 2
  setsid "$@" >"$log" 2>&1 </dev/null &
  PIDS+=("$!")
  NAMES+=("$name")
  LOGS+=("$log")
  say "started $name (pid $!, log ${log#"$REPO"/})"
}

proc_alive() {
  # True while $1 runs; a zombie (exited, not yet reaped) counts as gone.
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  stat="${stat##*) }"
  [ "${stat%% *}" != Z ]
}

stop_group() {
  local pid="$1" name="$2" tick
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || return 0
  for ((tick = 0; tick < 100; tick++)); do # up to 10 s to shut down cleanly
    proc_alive "$pid" || break
    sleep 0.1
  done
  if proc_alive "$pid"; then
    warn "$name did not stop within 10s; killing it"
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
  kill -TERM -- "-$pid" 2>/dev/null || true # anything the leader left behind
  say "stopped $name"
}

cleanup() {
  trap - EXIT INT TERM
  local i
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    stop_group "${PIDS[$i]}" "${NAMES[$i]}"
  done
}

show_log_tail() {
  local i
  for i in "${!PIDS[@]}"; do
    if [ "${PIDS[$i]}" = "$1" ]; then
      warn "${NAMES[$i]} exited; the end of ${LOGS[$i]#"$REPO"/}:"
      tail -n 20 "${LOGS[$i]}" >&2 || true
    fi
  done
}

# Wait for an HTTP endpoint to answer, giving up early if the process that should serve it dies.
wait_http() {
  local url="$1" what="$2" pid="$3" rc=0
  "$VENV/bin/python" - "$url" "$STARTUP_TIMEOUT" "$pid" <<'PY' || rc=$?
import sys, time, urllib.error, urllib.request

url, timeout, pid = sys.argv[1], float(sys.argv[2]), sys.argv[3]
deadline = time.monotonic() + timeout


def alive() -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


while True:
    try:
        with urllib.request.urlopen(url, timeout=2):
            sys.exit(0)
    except urllib.error.HTTPError as err:
        if err.code < 500:  # it answers; the status is the caller's business
            sys.exit(0)
    except OSError:
        pass
    if not alive():
        sys.exit(2)
    if time.monotonic() > deadline:
        sys.exit(1)
    time.sleep(0.2)
PY
  case "$rc" in
    0) say "$what is up ($url)" ;;
    2) show_log_tail "$pid"; die "$what exited before answering on $url" ;;
    *) show_log_tail "$pid"; die "$what did not answer on $url within ${STARTUP_TIMEOUT}s" ;;
  esac
}

json_field() {
  "$VENV/bin/python" -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"
}

free_port() {
  "$VENV/bin/python" -c \
    'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start_gateway() {
  GATEWAY_URL="http://127.0.0.1:$HTTP_PORT"
  start gateway "$DATA_DIR/logs/gateway.log" \
    "$VENV/bin/edgefleet" gateway run --data-dir "$DATA_DIR/gateway" \
    --http "127.0.0.1:$HTTP_PORT" --mqtt-port "$MQTT_PORT"
  wait_http "$GATEWAY_URL/healthz" "the gateway" "${PIDS[-1]}"
}

operator_login() {
  # The demo's admin is a person with a password (for the console and `edgefleet login`). The
  # first run makes them with a bootstrap token; a --keep run logs in with what it saved.
  local creds="$DATA_DIR/admin-login.txt" out bootstrap
  unset EDGEFLEET_TOKEN # the demo logs in as its own admin, whatever this shell had
  export EDGEFLEET_GATEWAY="$GATEWAY_URL"
  export XDG_CONFIG_HOME="$DATA_DIR/config" # the demo's login token stays in the demo's state
  ADMIN_EMAIL="admin@demo.example"
  if [ -s "$creds" ]; then
    ADMIN_PASSWORD="$(cat "$creds")"
  else
    out="$(ef admin create-token --data-dir "$DATA_DIR/gateway" --json)" \
      || die "edgefleet admin create-token failed (see above)"
    bootstrap="$(json_field token <<<"$out")" \
      || die "edgefleet admin create-token --json printed no \"token\": $out"
    ADMIN_PASSWORD="$(od -An -tx1 -N9 /dev/urandom | tr -d ' \n')"
    ef users create "$ADMIN_EMAIL" --role admin --password-stdin --token "$bootstrap" \
      <<<"$ADMIN_PASSWORD" >/dev/null || die "edgefleet users create failed (see above)"
    (umask 077 && printf '%s\n' "$ADMIN_PASSWORD" >"$creds")
    say "created the admin user $ADMIN_EMAIL (password in ${creds#"$REPO"/})"
  fi
  ef login --email "$ADMIN_EMAIL" --password-stdin --name demo <<<"$ADMIN_PASSWORD" >/dev/null \
    || die "edgefleet login failed (see above)"
  # A token of the admin's own for the shells that source demo.env (`login` keeps its own).
  out="$(ef api-tokens create --name demo-shell --expires 7d --json)" \
    || die "edgefleet api-tokens create failed (see above)"
  EDGEFLEET_TOKEN="$(json_field token <<<"$out")" \
    || die "edgefleet api-tokens create --json printed no \"token\": $out"
  export EDGEFLEET_TOKEN
  say "logged in as $ADMIN_EMAIL; EDGEFLEET_GATEWAY and EDGEFLEET_TOKEN are set for the commands below"
}

write_node_red_settings() {
  local dir="$1" port="$2" secret
  secret="$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')"
  mkdir -p "$dir"
  cat >"$dir/settings.js" <<JS
// Written by scripts/demo.sh: a Node-RED for one demo machine, reachable from this host only.
module.exports = {
    uiHost: "127.0.0.1",
    uiPort: $port,
    flowFile: "flows.json",
    credentialSecret: "$secret",
    telemetry: { enabled: false, updateNotification: false },
    diagnostics: { enabled: false, ui: false },
    editorTheme: { tours: false },
    logging: { console: { level: "info", metrics: false, audit: false } },
};
JS
}

NODE_RED_PORTS=()
start_node_reds() {
  [ -x "$NODE_RED_BIN" ] || die "Node-RED is not at $NODE_RED_BIN: run scripts/setup.sh"
  local i port dir
  for i in "${!AGENT_NAMES[@]}"; do
    port="$(free_port)"
    dir="$DATA_DIR/node-red-$((i + 1))"
    write_node_red_settings "$dir" "$port"
    start "node-red for ${AGENT_NAMES[$i]}" "$DATA_DIR/logs/node-red-$((i + 1)).log" \
      "$NODE_RED_BIN" --userDir "$dir" --port "$port"
    NODE_RED_PORTS+=("$port")
  done
  # Both start at once; wait for each in turn.
  local n=${#AGENT_NAMES[@]}
  for i in "${!AGENT_NAMES[@]}"; do
    wait_http "http://127.0.0.1:${NODE_RED_PORTS[$i]}/settings" \
      "Node-RED for ${AGENT_NAMES[$i]}" "${PIDS[-n + i]}"
  done
}

enroll_and_run_agents() {
  local i state token="" out
  for i in "${!AGENT_NAMES[@]}"; do
    state="$DATA_DIR/agent-$((i + 1))"
    if [ -n "$(ls -A "$state" 2>/dev/null)" ]; then
      say "${AGENT_NAMES[$i]}: already enrolled (state in ${state#"$REPO"/})"
    else
      if [ -z "$token" ]; then
        out="$(ef token create --tag site=demo --ttl 1h --uses "${#AGENT_NAMES[@]}" --json)" \
          || die "edgefleet token create failed (see above)"
        token="$(json_field token <<<"$out")" || die "edgefleet token create --json printed no \"token\": $out"
        say "created a provisioning token (tag site=demo, 1 hour, ${#AGENT_NAMES[@]} uses)"
      fi
      say "${AGENT_NAMES[$i]}: edgefleet agent enroll --gateway $GATEWAY_URL --token ... --name ${AGENT_NAMES[$i]}"
      ef agent enroll --gateway "$GATEWAY_URL" --token "$token" --name "${AGENT_NAMES[$i]}" \
        --state-dir "$state" || die "enrolling ${AGENT_NAMES[$i]} failed (see above)"
    fi
    start "agent ${AGENT_NAMES[$i]}" "$DATA_DIR/logs/agent-$((i + 1)).log" \
      "$VENV/bin/edgefleet" agent run --state-dir "$state" \
      --node-red "http://127.0.0.1:${NODE_RED_PORTS[$i]}"
  done
}

# Wait until `edgefleet devices list --json` shows every demo machine online; print one
# "name id" line per machine. Gives up early when any started process has died.
wait_online() {
  local rc=0
  "$VENV/bin/python" - "$STARTUP_TIMEOUT" "$VENV/bin/edgefleet" "${AGENT_NAMES[*]}" "${PIDS[@]}" \
    >"$DATA_DIR/devices.txt" <<'PY' || rc=$?
import json, subprocess, sys, time

timeout, cli, names, pids = float(sys.argv[1]), sys.argv[2], sys.argv[3].split(), sys.argv[4:]
deadline = time.monotonic() + timeout


def dead() -> str | None:
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    continue
        except OSError:
            pass
        return pid
    return None


last = ""
while True:
    run = subprocess.run([cli, "devices", "list", "--json"], capture_output=True, text=True)
    if run.returncode == 0:
        devices = {d["name"]: d for d in json.loads(run.stdout)}
        if all(devices.get(n, {}).get("online") is True for n in names):
            for n in names:
                print(n, devices[n]["id"])
            sys.exit(0)
        last = ", ".join(f"{n}: {'online' if devices.get(n, {}).get('online') else 'not online'}" for n in names)
    else:
        last = run.stderr.strip()
    pid = dead()
    if pid:
        print(pid)  # the caller shows this process's log
        sys.exit(2)
    if time.monotonic() > deadline:
        print(last, file=sys.stderr)
        sys.exit(1)
    time.sleep(0.5)
PY
  case "$rc" in
    0) say "all ${#AGENT_NAMES[@]} machines are online" ;;
    2) show_log_tail "$(tail -n 1 "$DATA_DIR/devices.txt" 2>/dev/null)"; die "a demo process exited before the fleet came online" ;;
    *) die "the machines were not all online within ${STARTUP_TIMEOUT}s (logs in ${DATA_DIR#"$REPO"/}/logs)" ;;
  esac
}

show_next_steps() {
  local env_file="$DATA_DIR/demo.env" first_id
  (
    umask 077
    cat >"$env_file" <<ENV
# Written by scripts/demo.sh: source it to talk to the running demo gateway.
export EDGEFLEET_GATEWAY=$EDGEFLEET_GATEWAY
export EDGEFLEET_TOKEN=$EDGEFLEET_TOKEN
export PATH="$VENV/bin:\$PATH"
ENV
  )
  first_id="$(awk 'NR == 1 { print $2 }' "$DATA_DIR/devices.txt")"
  echo
  ef devices list
  echo
  cat <<MSG
The demo fleet is running: a gateway on $GATEWAY_URL (MQTT on 127.0.0.1:$MQTT_PORT) and two
machines, each an edge agent beside its own Node-RED:
$(for i in "${!AGENT_NAMES[@]}"; do
    printf '  %-9s Node-RED editor at http://127.0.0.1:%s\n' "${AGENT_NAMES[$i]}" "${NODE_RED_PORTS[$i]}"
  done)

Try it from another shell:
  source ${env_file}   # sets EDGEFLEET_GATEWAY, EDGEFLEET_TOKEN and PATH
  edgefleet devices list
  edgefleet devices show $first_id
  edgefleet devices ping $first_id      # a signed command to the machine and back
  edgefleet audit
  edgefleet token create --tag site=demo --ttl 1h --uses 1   # provision one more machine

Log in as $ADMIN_EMAIL with password $ADMIN_PASSWORD (edgefleet login, or the console).
API documentation: $GATEWAY_URL/docs    Logs: $DATA_DIR/logs/
MSG
}

main() {
  parse_args "$@"
  check_ports_free
  bash "$REPO/scripts/setup.sh"
  "$VENV/bin/edgefleet" --help >/dev/null || die "the edgefleet command does not run in .venv (see above)"
  prepare_data_dir
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM

  start_gateway
  operator_login
  start_node_reds
  enroll_and_run_agents
  wait_online
  show_next_steps

  if [ "$WAIT" -eq 0 ]; then
    say "--no-wait: stopping everything"
    exit 0
  fi
  say "running; press Ctrl-C to stop everything"
  local died=""
  wait -n -p died "${PIDS[@]}" || true
  show_log_tail "$died"
  die "a demo process exited on its own; stopping the rest"
}

main "$@"
