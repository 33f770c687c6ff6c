#!/usr/bin/env bash
# Start the Flower SuperLink on the coordinator host (TLS + SuperNode auth).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: deploy/superlink.sh --bundle DIR [options]

Runs flower-superlink in the foreground (exec; stop it with Ctrl-C or SIGTERM)
with TLS (DIR/ca.crt, DIR/server.crt, DIR/server.key from provision.sh),
--enable-supernode-auth (only SuperNodes registered with `flwr supernode
register` may connect) and without Flower's per-run `uv sync` (hedrl must be
installed on this host: pip install -e .).

Fleet, Control and ServerApp (runtime) APIs share ONE port in flwr 1.42. The
Control API (submit/stop runs, register SuperNodes) is unauthenticated in
open-source Flower: firewall the port (see README, "Deploy on separate
machines").

Options:
  --bundle DIR        the coordinator bundle made by provision.sh
  --host ADDR         listen address (default: 0.0.0.0; participants must reach it)
  --port PORT         listen port (default: 8000)
  --database FILE     keep runs and registered SuperNodes in this SQLite file
                      across restarts (default: in memory)
  --log-file FILE     also write the SuperLink log here
  --insecure          NO TLS (plaintext HTTP): only for debugging on a trusted
                      network; with a shared CKKS key TLS is what keeps one
                      participant from reading another's ciphertexts
  -h, --help          this help
EOF
}

bundle="" ; host="0.0.0.0" ; port=8000 ; database="" ; log_file="" ; insecure=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --bundle) bundle="$2"; shift 2 ;;
    --host) host="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --database) database="$2"; shift 2 ;;
    --log-file) log_file="$2"; shift 2 ;;
    --insecure) insecure=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "superlink.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
args=(--host "$host" --port "$port" --disable-runtime-dependency-installation)
[[ -n "$database" ]] && args+=(--database "$database")
[[ -n "$log_file" ]] && args+=(--log-file "$log_file")
if [[ $insecure -eq 1 ]]; then
  echo "superlink.sh: WARNING: --insecure: no TLS, no SuperNode authentication;" \
    "ciphertexts, run submissions and node traffic travel in the clear" >&2
  args+=(--insecure)
else
  [[ -n "$bundle" ]] || { echo "superlink.sh: --bundle is required (or --insecure)" >&2; exit 2; }
  for f in ca.crt server.crt server.key; do
    [[ -r "$bundle/$f" ]] || { echo "superlink.sh: $bundle/$f missing (run provision.sh)" >&2; exit 2; }
  done
  if [[ -e "$bundle/participant.ctx" ]]; then
    echo "superlink.sh: $bundle holds participant.ctx (a secret key): the coordinator" \
      "host must not have it; remove it" >&2
    exit 2
  fi
  args+=(--ssl-ca-certfile "$bundle/ca.crt" --ssl-certfile "$bundle/server.crt"
         --ssl-keyfile "$bundle/server.key" --enable-supernode-auth)
fi
exec flower-superlink "${args[@]}"
