#!/usr/bin/env bash
# Start one participant's Flower SuperNode (TLS + SuperNode auth + its secret context).
set -euo pipefail

usage() {
  cat <<'EOT'
Usage: deploy/supernode.sh --bundle DIR --superlink HOST:PORT [options]

Runs flower-supernode in the foreground (exec) with the participant bundle DIR
made by provision.sh: it verifies the SuperLink's certificate against
DIR/ca.crt, authenticates with DIR/supernode.key (registered beforehand with
deploy/register.sh) and passes the node config

  secret-context='DIR/participant.ctx' participant-index=N

to the hedrl ClientApp (N from DIR/index: seeds this participant's
environments). hedrl must be installed on this host (pip install -e .).
A SuperNode does not install app dependencies at run time unless asked.
Its SuperExec looks for new work every FLWR_SUPEREXEC_TASK_POLL_INTERVAL
seconds: Flower's default is 1 s, this script sets 0.1 unless the variable is
already set (each message is a fresh ClientApp process; this shortens the wait
before it starts).

Options:
  --bundle DIR          this participant's bundle (participant-N/)
  --superlink HOST:PORT the SuperLink's address as in its certificate's SAN
  --index N             participant index (default: the bundle's index file)
  --port PORT           local ClientApp API port (default: 9094; give each
                        SuperNode on one host its own)
  --max-retries N       give up after N failed connection attempts (default: retry)
  --max-wait-time S     give up after S seconds without a connection (default: retry)
  --insecure            NO TLS and no authentication (only against a SuperLink
                        started with --insecure; prints a warning)
  -h, --help            this help
EOT
}

bundle="" ; superlink="" ; index="" ; port=9094 ; insecure=0 ; retry=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --bundle) bundle="$2"; shift 2 ;;
    --superlink) superlink="$2"; shift 2 ;;
    --index) index="$2"; shift 2 ;;
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
[[ -r "$bundle/participant.ctx" ]] || { echo "supernode.sh: $bundle/participant.ctx missing" >&2; exit 2; }
[[ -n "$index" ]] || index="$(cat "$bundle/index")"
[[ "$index" =~ ^[0-9]+$ ]] || { echo "supernode.sh: participant index must be an integer, got '$index'" >&2; exit 2; }

export FLWR_SUPEREXEC_TASK_POLL_INTERVAL="${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.1}"
args=(--superlink "$superlink" --port "$port" "${retry[@]}"
      --node-config "secret-context='$bundle/participant.ctx' participant-index=$index")
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
