#!/usr/bin/env bash
# Provision everything a hedrl deployment needs, one bundle directory per host.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: deploy/provision.sh --out DIR --coordinator-host ADDR [options]

Creates, under DIR, one kit per host (copy each to its host, nothing else):
  ca/               the CA (ca.key stays with the operator: copy it nowhere)
  coordinator/      for the coordinator host: ca.crt, server.crt, server.key
                    (SAN: 127.0.0.1, localhost and every --coordinator-host),
                    coordinator.ctx (public CKKS context, no secret key),
                    fingerprint.txt, supernodes/participant-N.pub (to register),
                    app.sha256 (the app-sha256 participants accept; submit.sh
                    --bundle checks a tree against it before submitting and
                    makes the run expect fingerprint.txt's key),
                    start-superlink.sh and hedrl-superlink.service
  participant-N/    for participant host N (N = 0 .. participants-1): ca.crt,
                    supernode.key (+ .pub; EC P-384, the SuperNode's identity),
                    participant.ctx (the run's CKKS secret key, mode 0600),
                    fingerprint.txt, state/ (mode 0700), and node.toml: the
                    node config supernode.sh hands to the hedrl ClientApp
                    (participant-index = N, federation-size = --participants,
                    secret-context, state-dir, the guard settings below,
                    app-sha256), start-supernode.sh and
                    hedrl-supernode.service. Relative paths in node.toml are
                    taken from the bundle directory.

The app pin: app-sha256 is a digest of the app bundle (FAB) that `flwr run`
builds from the --app tree (deploy/app_pin.py). A participant's SuperNode
(supernode.sh) refuses any bundle with another digest before flwr installs
it, so submit runs from a checkout identical to the one provisioned here (see
docs/deployment-trust.md). Re-run provision.sh (e.g. --keys-only) after
changing the code, and hand out the new node.toml files.

Options:
  --out DIR                 output directory (must not hold a previous bundle
                            unless --force)
  --coordinator-host ADDR   IP or DNS name participants use to reach the
                            SuperLink; repeat for several names
  --participants N          number of participant bundles (default: 3)
  --param-set ID            CKKS parameter set (default: 8k-35x3)
  --backend ckks|plain      ckks (default) or the plaintext twin's stand-in key
  --keys-only               keep CA, certificates and SuperNode keys; make a
                            fresh CKKS key (do this before every training run)
                            and rewrite node.toml: app-sha256 from --app, the
                            other settings kept unless given again here
  --app DIR                 the app tree participants will accept (default:
                            the checkout this script is in)
  --days N                  certificate validity (default: 365)
  --hedrl-home DIR          where the hedrl checkout lives on the hosts, for the
                            start scripts (default: this checkout's path)
  --kit-dir DIR             where the bundles will be copied on their hosts, for
                            the systemd units (default: /opt/hedrl)
  --force                   replace an existing bundle
  -h, --help                this help

Participant settings written into every node.toml (each participant's operator
may edit its own copy; the ClientApp takes them from there, never from the
coordinator):
  --state-dir DIR           writable directory for the participant's guard state
                            (refusal count, last accepted round and θ, final θ);
                            relative to the bundle directory (default: state)
  --theta-step-bound X      largest change per θ element and round between
                            the θ a participant last accepted and a new one
                            (> 0; default: 0.065, or from --preset). Must
                            exceed the largest step the run's optimiser can
                            take: 12.8 x lr for Adam at beta1 0.9, beta2 0.999
                            (0.065 serves lr <= 0.0040; docs/threat-model.md)
  --preset FILE             the run-config preset the runs will use (e.g.
                            deploy/presets/cartpole-delta.toml): unless
                            --theta-step-bound is given, it is 1.25 x the
                            largest step of that preset's server optimiser
  --max-round-gap N         the most rounds that bound is multiplied by when
                            rounds were skipped (default: 64)
  --max-rounds N            highest round number a participant handles
                            (default: 100000)
  --refusal-budget N        refusals a participant makes under one key; then
                            it answers every message under that key with one
                            constant refusal (default: 3)
  --report-metrics BOOL     true: send episode metrics (returns, counts) to the
                            coordinator; false (default): send none
  --max-param-count N       largest policy (parameters) a run config may ask
                            for through hidden-sizes and env-id (default:
                            200000; the default 64,64 network has ~9-10k)
  --max-rollout-steps N     most environment steps per rollout (num-envs x
                            num-steps) a run config may ask for (default: 65536)

Needs: openssl, ssh-keygen, hedrl-keygen and flwr (pip install -e . in the repo).
EOF
}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="" ; hosts=() ; n=3 ; param_set="8k-35x3" ; backend="ckks" ; days=365
keys_only=0 ; force=0 ; app="$here/.." ; node_opts=() ; preset=""
hedrl_home="$(cd "$here/.." && pwd)" ; kit_dir="/opt/hedrl"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --coordinator-host) hosts+=("$2"); shift 2 ;;
    --participants) n="$2"; shift 2 ;;
    --param-set) param_set="$2"; shift 2 ;;
    --backend) backend="$2"; shift 2 ;;
    --keys-only) keys_only=1; shift ;;
    --days) days="$2"; shift 2 ;;
    --force) force=1; shift ;;
    --app) app="$2"; shift 2 ;;
    --preset) preset="$2"; shift 2 ;;
    --hedrl-home) hedrl_home="$2"; shift 2 ;;
    --kit-dir) kit_dir="$2"; shift 2 ;;
    --state-dir|--theta-step-bound|--max-round-gap|--max-rounds|--refusal-budget|--report-metrics|--max-param-count|--max-rollout-steps)
      node_opts+=("${1#--}=$2"); shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "provision.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ -n "$out" ]] || { echo "provision.sh: --out is required" >&2; exit 2; }
# these values are written into the kits' start scripts and systemd units:
# plain host names, addresses and paths only
host_re='^[A-Za-z0-9]([A-Za-z0-9.:-]*[A-Za-z0-9])?$'
for h in "${hosts[@]}"; do
  [[ "$h" =~ $host_re ]] || {
    echo "provision.sh: --coordinator-host '$h': expected a host name or IP address (letters, digits, '.', ':', '-')" >&2
    exit 2; }
done
path_re='^/[A-Za-z0-9._/+-]*$'
for v in "$hedrl_home" "$kit_dir"; do
  [[ "$v" =~ $path_re ]] || {
    echo "provision.sh: '$v': --hedrl-home and --kit-dir must be absolute paths of letters, digits and . _ / + -" >&2
    exit 2; }
done
[[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "provision.sh: --participants must be >= 1" >&2; exit 2; }
[[ -f "$app/pyproject.toml" ]] || { echo "provision.sh: --app $app holds no pyproject.toml" >&2; exit 2; }
for tool in openssl ssh-keygen hedrl-keygen python; do
  command -v "$tool" >/dev/null || { echo "provision.sh: $tool not found" >&2; exit 2; }
done
if [[ -n "$preset" ]] && ! printf '%s\n' "${node_opts[@]}" | grep -q '^theta-step-bound='; then
  [[ -r "$preset" ]] || { echo "provision.sh: cannot read --preset $preset" >&2; exit 2; }
  bound="$(python - "$preset" <<'PY'
import sys
import tomllib

from participants.trust import auto_bound
from protocol.config import RunConfig
from protocol.errors import ConfigError

try:
    with open(sys.argv[1], "rb") as fh:
        raw = tomllib.load(fh)
    print(f"{auto_bound(RunConfig.from_mapping(raw)):.6g}")
except (OSError, ValueError, ConfigError) as exc:
    sys.exit(f"provision.sh: --preset {sys.argv[1]}: {exc}")
PY
)"
  node_opts+=("theta-step-bound=$bound")
  echo "provision.sh: theta-step-bound $bound from $preset" >&2
fi
# Writes participant-N/node.toml; with CHECK_ONLY=1 only validates the settings.
write_node_configs=$(cat <<'PY'
import json
import math
import os
import sys
import tomllib
from pathlib import Path



def fail(message):
    print(f"provision.sh: {message}", file=sys.stderr)
    sys.exit(2)


DEFAULTS = {
    "secret-context": "participant.ctx",
    "state-dir": "state",
    "theta-step-bound": 0.065,
    "max-round-gap": 64,
    "max-rounds": 100000,
    "refusal-budget": 3,
    "report-metrics": False,
    "max-param-count": 200000,
    "max-rollout-steps": 65536,
}


def parse(key, text):
    if key == "state-dir":
        return text
    if key == "report-metrics":
        if text not in ("true", "false"):
            fail(f"--{key} must be true or false, got {text!r}")
        return text == "true"
    number = float if key == "theta-step-bound" else int
    try:
        value = number(text)
    except ValueError:
        value = None
    if number is float and value is not None and 0 < value < math.inf:
        return value
    if number is int and value is not None and value >= 1:
        return value
    what = "a number > 0" if number is float else "an integer >= 1"
    fail(f"--{key} must be {what}, got {text!r}")


given = {k: parse(k, v) for k, v in (a.split("=", 1) for a in sys.argv[1:])}
if os.environ.get("CHECK_ONLY") == "1":
    sys.exit(0)
out, n = Path(os.environ["OUT"]), int(os.environ["N"])
for i in range(n):
    path = out / f"participant-{i}" / "node.toml"
    kept = {}
    if os.environ["KEYS_ONLY"] == "1" and path.exists():
        kept = tomllib.loads(path.read_text())
    # index, size and pin are provisioning's own, never kept from an old file
    own = {"participant-index": i, "federation-size": n, "app-sha256": os.environ["PIN"]}
    cfg = own | DEFAULTS | kept | given | own
    lines = [
        "# hedrl participant node config, written by deploy/provision.sh (its --help",
        "# explains each key). supernode.sh resolves relative paths against the",
        "# bundle directory and passes the result to flower-supernode --node-config.",
    ]
    for key, value in cfg.items():
        text = str(value).lower() if isinstance(value, bool) else json.dumps(value)
        lines.append(f"{key} = {text}")
    path.write_text("\n".join(lines) + "\n")
    state = Path(cfg["state-dir"])
    if not state.is_absolute():
        (path.parent / state).mkdir(mode=0o700, parents=True, exist_ok=True)
PY
)
CHECK_ONLY=1 python -c "$write_node_configs" "${node_opts[@]}"
pin="$(python "$here/app_pin.py" digest --app "$app")" || {
  echo "provision.sh: cannot bundle --app $app (see the error above)" >&2; exit 2; }

umask 077
mkdir -p "$out"
out="$(cd "$out" && pwd)"

if [[ $keys_only -eq 0 ]]; then
  [[ ${#hosts[@]} -gt 0 ]] || { echo "provision.sh: --coordinator-host is required" >&2; exit 2; }
  if [[ -e "$out/ca/ca.crt" && $force -eq 0 ]]; then
    echo "provision.sh: $out already holds a bundle (use --keys-only or --force)" >&2
    exit 2
  fi
  rm -rf "$out/ca" "$out/coordinator" "$out"/participant-*
  mkdir -p "$out/ca" "$out/coordinator/supernodes"

  # --- CA and SuperLink server certificate (EC P-384) ---------------------------
  openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes \
    -keyout "$out/ca/ca.key" -out "$out/ca/ca.crt" -days "$days" \
    -subj "/CN=hedrl deployment CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  san="IP:127.0.0.1,DNS:localhost"
  for h in "${hosts[@]}"; do
    if [[ "$h" =~ ^[0-9.]+$ || "$h" == *:* ]]; then san+=",IP:$h"; else san+=",DNS:$h"; fi
  done
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes \
    -keyout "$out/coordinator/server.key" -out "$out/ca/server.csr" \
    -subj "/CN=${hosts[0]}" 2>/dev/null
  ext="$out/ca/server.ext"
  printf '%s\n' "subjectAltName=$san" "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth" >"$ext"
  openssl x509 -req -in "$out/ca/server.csr" -CA "$out/ca/ca.crt" \
    -CAkey "$out/ca/ca.key" -CAcreateserial -out "$out/coordinator/server.crt" \
    -days "$days" -extfile "$ext" 2>/dev/null
  rm -f "$out/ca/server.csr" "$ext"
  cp "$out/ca/ca.crt" "$out/coordinator/ca.crt"
  echo "SuperLink certificate: SAN $san"

  # --- one SuperNode identity per participant host -----------------------------
  for ((i = 0; i < n; i++)); do
    d="$out/participant-$i"
    mkdir -p "$d"
    cp "$out/ca/ca.crt" "$d/ca.crt"
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "hedrl-participant-$i" -f "$d/supernode.key"
    cp "$d/supernode.key.pub" "$out/coordinator/supernodes/participant-$i.pub"
  done
else
  [[ -d "$out/coordinator" ]] || { echo "provision.sh: no bundle in $out to refresh" >&2; exit 2; }
  n=$(find "$out" -maxdepth 1 -name 'participant-*' -type d | wc -l)
fi

# --- the training run's CKKS key: secret to participants, public to coordinator --
tmp="$(mktemp -d "$out/.keygen.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
hedrl-keygen --param-set "$param_set" --backend "$backend" --out "$tmp/keys" >/dev/null
install -m 0644 "$tmp/keys/coordinator.ctx" "$out/coordinator/coordinator.ctx"
install -m 0644 "$tmp/keys/fingerprint.txt" "$out/coordinator/fingerprint.txt"
for ((i = 0; i < n; i++)); do
  install -m 0600 "$tmp/keys/participant.ctx" "$out/participant-$i/participant.ctx"
  install -m 0644 "$tmp/keys/fingerprint.txt" "$out/participant-$i/fingerprint.txt"
done

# --- each participant's node config: the settings above plus the app pin ---------
OUT="$out" N="$n" PIN="$pin" KEYS_ONLY="$keys_only" python -c "$write_node_configs" "${node_opts[@]}"
printf '%s\n' "$pin" >"$out/coordinator/app.sha256"
chmod 0644 "$out/coordinator/app.sha256"
# --- start scripts and systemd units, one per host --------------------------------
# kit NAME UNIT WHAT SCRIPT ARGS: NAME/start-*.sh runs deploy/SCRIPT ARGS (in
# which @KIT@ becomes the kit's own directory on its host), and NAME/UNIT.service
kit() {
  local name="$1" unit="$2" what="$3" script="$4" args="$5" start
  start="$out/$name/start-${unit#hedrl-}.sh"
  {
    echo '#!/usr/bin/env bash'
    echo "# Start $what from this kit (written by deploy/provision.sh)."
    echo '# HEDRL_HOME: the hedrl checkout on this host (pip install -e . there).'
    echo "# Extra arguments go to deploy/$script (see its --help)."
    echo 'set -euo pipefail'
    echo 'kit="$(cd "$(dirname "$0")" && pwd)"'
    printf 'exec "${HEDRL_HOME:-%s}/deploy/%s" %s "$@"\n' \
      "$hedrl_home" "$script" "${args//@KIT@/\"\$kit\"}"
  } >"$start"
  chmod 0755 "$start"
  cat >"$out/$name/$unit.service" <<EOS
# systemd unit for $what (written by deploy/provision.sh): copy this kit to
# $kit_dir/$name on its host, then
#   sudo cp $unit.service /etc/systemd/system/ && sudo systemctl enable --now $unit
[Unit]
Description=hedrl: $what
After=network-online.target
Wants=network-online.target

[Service]
Environment=HEDRL_HOME=$hedrl_home
ExecStart=$kit_dir/$name/$(basename "$start")
Restart=on-failure
RestartSec=5

[Install]
WantedBy=multi-user.target
EOS
  chmod 0644 "$out/$name/$unit.service"
}
if [[ -f "$out/coordinator/server.crt" ]]; then
  superlink_host="$(openssl x509 -in "$out/coordinator/server.crt" -noout -subject \
    | sed -n 's/.*CN *= *//p')"
  [[ "$superlink_host" =~ $host_re ]] || {
    echo "provision.sh: the SuperLink certificate's CN '$superlink_host' is no plain host name: no start scripts written (re-provision without --keys-only)" >&2
    superlink_host=""; }
fi
if [[ -n "${superlink_host:-}" ]]; then
  kit coordinator hedrl-superlink "the coordinator's SuperLink" superlink.sh \
    "--bundle @KIT@ --database @KIT@/superlink.db"
  for ((i = 0; i < n; i++)); do
    kit "participant-$i" hedrl-supernode "participant $i's SuperNode" supernode.sh \
      "--bundle @KIT@ --superlink $superlink_host:8000"
  done
fi
echo "CKKS key ($backend, $param_set): fingerprint $(cat "$out/coordinator/fingerprint.txt")"
echo "App pin (app-sha256 of $(cd "$app" && pwd)): $pin"
echo "Bundles in $out: coordinator/ and participant-0 .. participant-$((n - 1))/" \
  "(the CA key in $out/ca/ stays with you)"
