#!/usr/bin/env bash
# Provision everything a hedrl deployment needs, one bundle directory per host.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: deploy/provision.sh --out DIR --coordinator-host ADDR [options]

Creates, under DIR:
  ca/               the CA (ca.key stays with the operator: copy it nowhere)
  coordinator/      for the coordinator host: ca.crt, server.crt, server.key
                    (SAN: 127.0.0.1, localhost and every --coordinator-host),
                    coordinator.ctx (public CKKS context, no secret key),
                    fingerprint.txt, supernodes/participant-N.pub (to register)
  participant-N/    for participant host N (N = 0 .. participants-1): ca.crt,
                    supernode.key (+ .pub; EC P-384, the SuperNode's identity),
                    participant.ctx (the run's CKKS secret key, mode 0600),
                    fingerprint.txt, index (N)

Options:
  --out DIR                 output directory (must not hold a previous bundle
                            unless --force)
  --coordinator-host ADDR   IP or DNS name participants use to reach the
                            SuperLink; repeat for several names
  --participants N          number of participant bundles (default: 3)
  --param-set ID            CKKS parameter set (default: 8k-35x3)
  --backend ckks|plain      ckks (default) or the plaintext twin's stand-in key
  --keys-only               keep CA, certificates and SuperNode keys; only make a
                            fresh CKKS key (do this before every training run)
  --days N                  certificate validity (default: 365)
  --force                   replace an existing bundle
  -h, --help                this help

Needs: openssl, ssh-keygen, hedrl-keygen (pip install -e . in the repo).
EOF
}

out="" ; hosts=() ; n=3 ; param_set="8k-35x3" ; backend="ckks" ; days=365
keys_only=0 ; force=0
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
    -h|--help) usage; exit 0 ;;
    *) echo "provision.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ -n "$out" ]] || { echo "provision.sh: --out is required" >&2; exit 2; }
[[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "provision.sh: --participants must be >= 1" >&2; exit 2; }
for tool in openssl ssh-keygen hedrl-keygen; do
  command -v "$tool" >/dev/null || { echo "provision.sh: $tool not found" >&2; exit 2; }
done
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
    echo "$i" >"$d/index"
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
echo "CKKS key ($backend, $param_set): fingerprint $(cat "$out/coordinator/fingerprint.txt")"
echo "Bundles in $out: coordinator/ and participant-0 .. participant-$((n - 1))/" \
  "(the CA key in $out/ca/ stays with you)"
