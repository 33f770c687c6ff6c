#!/usr/bin/env bash
# Rehearse a deployment on this machine before touching real hosts.
set -euo pipefail

usage() {
  cat <<'EOT'
Usage: deploy/rehearse.sh [--rounds N] [--preset FILE] [--namespaces] [--json FILE]

Runs the deploy/ recipe end to end on this machine, as an operator would on
separate hosts: provision.sh (CA, certificates, SuperNode keys, a fresh CKKS
key, app pin), superlink.sh with TLS, connect.sh and register.sh, three
supernode.sh with node authentication, then submit.sh with a short run. It
prints the rounds, their median time and where a ClientApp message's seconds
went, and stops every process it started (by PID). Everything lives in a
temporary directory on free loopback ports; nothing of an existing deployment
is touched.

Options:
  --rounds N        rounds of the rehearsal run (default: 5)
  --preset FILE     run-config preset to rehearse (e.g.
                    deploy/presets/cartpole-delta.toml; default: none)
  --namespaces      one network namespace per host on a bridge instead of
                    loopback (needs root and iproute2)
  --json FILE       also write the measurements as JSON
  --backend B       ckks (default) or plain
  -h, --help        this help
Exit status: 0 if the run completed and every participant answered.
EOT
}

args=(--rounds 5)
while [[ $# -gt 0 ]]; do
  case "$1" in
    --rounds|--preset|--json|--backend) args+=("$1" "$2"); shift 2 ;;
    --namespaces) args+=("$1"); shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "rehearse.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."
exec python -m benchmarks.round_times "${args[@]}"
