#!/usr/bin/env bash
# Submit a hedrl training run to a deployed SuperLink, follow it, summarise metrics.jsonl.
set -euo pipefail

usage() {
  cat <<'EOT'
Usage: deploy/submit.sh --connection NAME --results-dir DIR [options] [-- FLWR_RUN_ARGS]

Runs, from the hedrl checkout (the app directory),

  flwr run . NAME --stream [--run-config "PRESET KEYS"] \
    --run-config "results-dir='DIR' run-name='RUN' ..."

which builds the app bundle, submits it through the SuperLink's Control API,
streams the ServerApp's log until the run ends, then summarises
DIR/RUN/metrics.jsonl (rounds, participants per round, median round_s).
It first prints the app-sha256 of the bundle it will submit: participants
refuse a bundle whose app-sha256 differs from their node.toml's (see
docs/deployment-trust.md); --app-sha256 checks that before submitting.
DIR is a path ON THE COORDINATOR HOST (the ServerApp writes it); run this
script there, or copy the directory back afterwards (scp coordinator:DIR/RUN .).

Options:
  --connection NAME   SuperLink connection in $FLWR_HOME/config.toml (connect.sh)
  --results-dir DIR   absolute results directory on the coordinator host
  --run-name RUN      results sub-directory (default: deploy-<UTC timestamp>)
  --preset FILE       run-config preset (TOML of run-config keys, e.g.
                      deploy/presets/cartpole-fast.toml); --run-config
                      values override it
  --run-config STR    more run-config overrides, e.g.
                      "num-participants=3 num-rounds=200 stop-return=195"
                      (num-participants must equal the number of SuperNodes)
  --app DIR           the hedrl checkout (default: this script's repository)
  --bundle DIR        the coordinator kit from provision.sh: refuse to submit
                      unless the app bundle's app-sha256 is DIR/app.sha256,
                      and make the run refuse any key but DIR/fingerprint.txt's
                      (expect-fingerprint)
  --app-sha256 PIN    refuse to submit unless the bundle's app-sha256 is PIN
                      (64 hex digits, or a file holding them)
  -h, --help          this help
Exit status: 0 when the run wrote its summary.json, 1 otherwise.
EOT
}

conn="" ; results="" ; preset="" ; run_name="deploy-$(date -u +%Y%m%dT%H%M%SZ)" ; extra="" ; rest=()
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
app="$here/.." ; expect="" ; fingerprint=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --connection) conn="$2"; shift 2 ;;
    --results-dir) results="$2"; shift 2 ;;
    --run-name) run_name="$2"; shift 2 ;;
    --run-config) extra="$2"; shift 2 ;;
    --preset) preset="$2"; shift 2 ;;
    --app) app="$2"; shift 2 ;;
    --app-sha256) expect="$2"; shift 2 ;;
    --bundle)
      [[ -f "$2/app.sha256" && -f "$2/fingerprint.txt" ]] || {
        echo "submit.sh: --bundle $2 holds no app.sha256 and fingerprint.txt (the coordinator kit of provision.sh)" >&2
        exit 2
      }
      expect="$2/app.sha256"; fingerprint="$(tr -d '[:space:]' <"$2/fingerprint.txt")"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; rest=("$@"); break ;;
    *) echo "submit.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ -n "$conn" && -n "$results" ]] || { echo "submit.sh: --connection and --results-dir are required" >&2; exit 2; }
[[ "$results" == /* ]] || { echo "submit.sh: --results-dir must be absolute (the ServerApp runs elsewhere)" >&2; exit 2; }
# both go into a run-config string between quotes
for v in "$results" "$run_name"; do
  [[ "$v" =~ ^[A-Za-z0-9._/+-]+$ ]] || {
    echo "submit.sh: '$v': --results-dir and --run-name take letters, digits and . _ / + - only" >&2
    exit 2; }
done

# A preset goes in its own --run-config (flwr applies them in order, later
# ones win; flwr refuses a .toml file next to key=value pairs, and a key given
# twice in one --run-config string).
preset_cfg=()
if [[ -n "$preset" ]]; then
  [[ -r "$preset" ]] || { echo "submit.sh: cannot read preset $preset" >&2; exit 2; }
  pairs="$(python - "$preset" <<'PY'
import sys
import tomllib

path = sys.argv[1]
with open(path, "rb") as fh:
    data = tomllib.load(fh)


def fmt(key, v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str) and "'" not in v and " " not in v:
        return f"'{v}'"
    sys.exit(f"submit.sh: {path}: {key} = {v!r} is not a run-config value")


print(" ".join(f"{k}={fmt(k, v)}" for k, v in data.items()))
PY
)"
  preset_cfg=(--run-config "$pairs")
  echo "submit.sh: preset $preset: $pairs" >&2
fi

pin="$(python "$here/app_pin.py" digest --app "$app")"
echo "submit.sh: app-sha256 of $(cd "$app" && pwd): $pin" >&2
if [[ -n "$expect" ]]; then
  [[ -f "$expect" ]] && expect="$(tr -d '[:space:]' <"$expect")"
  if [[ "$pin" != "$expect" ]]; then
    echo "submit.sh: app-sha256 $pin is not the provisioned $expect: participants" \
      "would refuse this bundle; submit the provisioned checkout or re-run" \
      "provision.sh and hand out the new node.toml files" >&2
    exit 2
  fi
fi

[[ -z "$fingerprint" || "$fingerprint" =~ ^[0-9a-f]{64}$ ]] || {
  echo "submit.sh: fingerprint.txt does not hold 64 hex digits" >&2; exit 2; }
own="results-dir='$results' run-name='$run_name'"
[[ -n "$fingerprint" ]] && own+=" expect-fingerprint='$fingerprint'"

cd "$app"
# the script's own values go last: flwr applies --run-config in order, so
# nothing passed through after -- can drop the kit's expect-fingerprint
flwr run . "$conn" --stream "${preset_cfg[@]}" ${extra:+--run-config "$extra"} \
  "${rest[@]}" --run-config "$own"

run_dir="$results/$run_name"
if [[ ! -f "$run_dir/metrics.jsonl" ]]; then
  echo "submit.sh: $run_dir/metrics.jsonl not found here; if the coordinator is" \
    "another machine, fetch it: scp -r COORDINATOR:$run_dir ." >&2
  exit 1
fi
RUN_DIR="$run_dir" python - <<'PY'
import json
import os
import statistics
from pathlib import Path

run_dir = Path(os.environ["RUN_DIR"])
rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
times = [r["round_s"] for r in rows]
print(
    f"{run_dir}: {len(rows)} rounds, participants per round "
    f"{sorted({r['participants'] for r in rows})}, median round_s "
    f"{statistics.median(times):.2f} (min {min(times):.2f}, max {max(times):.2f}), "
    f"summary.json {'present' if (run_dir / 'summary.json').exists() else 'MISSING'}"
)
PY
[[ -f "$run_dir/summary.json" ]]
