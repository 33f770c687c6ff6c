#!/usr/bin/env bash
# Start one participant's Flower SuperNode (TLS + SuperNode auth + its node config + the app pin).
set -euo pipefail

usage() {
  cat <<'EOT'
Usage: deploy/supernode.sh --bundle DIR --superlink HOST:PORT [options]

Runs flower-supernode in the foreground (exec) with the participant bundle DIR
made by provision.sh: it verifies the SuperLink's certificate against
DIR/ca.crt, authenticates with DIR/supernode.key (registered beforehand with
deploy/register.sh) and passes DIR/node.toml to the hedrl ClientApp as its
node config (secret-context, participant-index, state-dir, the guard settings
and app-sha256; see provision.sh --help). Relative paths in node.toml are
resolved against DIR; the resolved copy is written to STATE/node-config.toml
(STATE: the state-dir, created with mode 0700 if missing; it must be
writable). The node config is read once, when the SuperNode starts.

The app pin: deploy/bin goes first on the SuperNode's PATH, so the process
Flower's SuperExec starts for each message (flwr-clientapp) is
deploy/app_pin.py. It refuses an app bundle whose app-sha256 is not the one in
node.toml before flwr installs or imports it (error reply INVALID_FAB, one log
line with both digests); other task types (flwr-agentapp, ...) are refused
too. See docs/deployment-trust.md.

hedrl must be installed on this host (pip install -e .); the SuperNode does not
install app dependencies at run time. Its SuperExec looks for new work every
FLWR_SUPEREXEC_TASK_POLL_INTERVAL seconds: Flower's default is 1 s, this script
sets 0.1 unless the variable is already set (each message is a fresh ClientApp
process; this shortens the wait before it starts).

Options:
  --bundle DIR          this participant's bundle (participant-N/)
  --superlink HOST:PORT the SuperLink's address as in its certificate's SAN
  --index N             participant index (default: node.toml's participant-index)
  --state-dir DIR       writable state directory (default: node.toml's state-dir;
                        use this when DIR is read-only, e.g. mounted in Docker)
  --port PORT           local ClientApp API port (default: 9094; give each
                        SuperNode on one host its own)
  --max-retries N       give up after N failed connection attempts (default: retry)
  --max-wait-time S     give up after S seconds without a connection (default: retry)
  --insecure            NO TLS and no authentication (only against a SuperLink
                        started with --insecure; prints a warning)
  -h, --help            this help
EOT
}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bundle="" ; superlink="" ; index="" ; state_dir="" ; port=9094 ; insecure=0 ; retry=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --bundle) bundle="$2"; shift 2 ;;
    --superlink) superlink="$2"; shift 2 ;;
    --index) index="$2"; shift 2 ;;
    --state-dir) state_dir="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --max-retries) retry+=(--max-retries "$2"); shift 2 ;;
    --max-wait-time) retry+=(--max-wait-time "$2"); shift 2 ;;
    --insecure) insecure=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "supernode.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ -n "$bundle" && -n "$superlink" ]] || { echo "supernode.sh: --bundle and --superlink are required" >&2; exit 2; }
bundle="$(cd "$bundle" && pwd)"
[[ -z "$index" || "$index" =~ ^[0-9]+$ ]] || { echo "supernode.sh: --index must be an integer >= 0, got '$index'" >&2; exit 2; }
[[ -z "$state_dir" || "$state_dir" == /* ]] || state_dir="$PWD/$state_dir"
[[ -r "$bundle/node.toml" ]] || {
  echo "supernode.sh: $bundle/node.toml missing: run provision.sh (bundles made" \
    "before the app pin lack it; --keys-only writes it) and copy it here" >&2
  exit 2
}

# The node config with absolute paths, in the state directory; prints its path.
node_config="$(BUNDLE="$bundle" INDEX="$index" STATE_DIR="$state_dir" python - <<'PY'
import os
import re
import sys
import tomllib
from pathlib import Path

import tomli_w

bundle = Path(os.environ["BUNDLE"])


def fail(message):
    print(f"supernode.sh: {message}", file=sys.stderr)
    sys.exit(2)


try:
    cfg = tomllib.loads((bundle / "node.toml").read_text())
except tomllib.TOMLDecodeError as exc:
    fail(f"{bundle}/node.toml is not valid TOML ({exc})")
if os.environ["INDEX"]:
    cfg["participant-index"] = int(os.environ["INDEX"])
if os.environ["STATE_DIR"]:
    cfg["state-dir"] = os.environ["STATE_DIR"]
for key in ("secret-context", "participant-index", "app-sha256"):
    if key not in cfg:
        fail(f"{bundle}/node.toml has no {key}: re-run provision.sh")
if not re.fullmatch(r"[0-9a-f]{64}", str(cfg["app-sha256"])):
    fail(f"{bundle}/node.toml: app-sha256 must be 64 hex digits: re-run provision.sh")
key = bundle / Path(cfg["secret-context"]).expanduser()
if not os.access(key, os.R_OK):
    fail(f"secret-context {key} is not readable (run provision.sh, copy its key)")
state = bundle / Path(cfg.get("state-dir") or key.parent).expanduser()
try:
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
except OSError as exc:
    fail(f"cannot create state-dir {state} ({exc.strerror}): give --state-dir")
if not os.access(state, os.W_OK):
    fail(f"state-dir {state} is not writable: give a writable one with --state-dir")
cfg["secret-context"], cfg["state-dir"] = str(key), str(state)
out = state / "node-config.toml"
out.write_text(tomli_w.dumps(cfg))
print(out)
PY
)"

export PATH="$here/bin:$PATH"
[[ "$(command -v flwr-clientapp)" == "$here/bin/flwr-clientapp" ]] || {
  echo "supernode.sh: flwr-clientapp does not resolve to $here/bin/flwr-clientapp;" \
    "the app pin would not run" >&2
  exit 2
}
python "$here/app_pin.py" selftest >/dev/null

export FLWR_SUPEREXEC_TASK_POLL_INTERVAL="${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.1}"
args=(--superlink "$superlink" --port "$port" "${retry[@]}" --node-config "$node_config")
if [[ $insecure -eq 1 ]]; then
  echo "supernode.sh: WARNING: --insecure: no TLS; this participant's ciphertexts" \
    "travel in the clear and the SuperLink is not authenticated" >&2
  args+=(--insecure)
else
  for f in ca.crt supernode.key; do
    [[ -r "$bundle/$f" ]] || { echo "supernode.sh: $bundle/$f missing (run provision.sh)" >&2; exit 2; }
  done
  args+=(--root-certificates "$bundle/ca.crt" --auth-supernode-private-key "$bundle/supernode.key")
fi
exec flower-supernode "${args[@]}"
