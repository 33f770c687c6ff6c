#!/usr/bin/env bash
# Register SuperNode public keys with the SuperLink (needs --enable-supernode-auth).
set -euo pipefail

usage() {
  cat <<'EOT'
Usage: deploy/register.sh --connection NAME KEY.pub [KEY.pub ...]

Runs `flwr supernode register KEY.pub NAME` for each public key (the files in
the coordinator bundle's supernodes/ directory). Only registered SuperNodes can
connect; an unregistered one is refused (flower-supernode exits with code 305).
Registrations live in the SuperLink's state: in memory unless the SuperLink was
started with --database, so register again after a SuperLink restart.
List them with `flwr supernode list NAME`.

Options:
  --connection NAME   the SuperLink connection (deploy/connect.sh)
  -h, --help          this help
EOT
}

conn="" ; keys=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --connection) conn="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "register.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) keys+=("$1"); shift ;;
  esac
done
[[ -n "$conn" && ${#keys[@]} -gt 0 ]] || { usage >&2; exit 2; }
for key in "${keys[@]}"; do
  flwr supernode register "$key" "$conn" --name "$(basename "$key" .pub)"
done
