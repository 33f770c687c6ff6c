#!/usr/bin/env bash
# Define a SuperLink connection in $FLWR_HOME/config.toml (for flwr run/log/ls/supernode).
set -euo pipefail

usage() {
  cat <<'EOT'
Usage: deploy/connect.sh --name NAME --address HOST:PORT (--ca FILE | --insecure)

Adds or replaces [superlink.NAME] in $FLWR_HOME/config.toml (default
~/.flwr/config.toml; the file is created with Flower's defaults if missing):

  [superlink.NAME]
  address = "HOST:PORT"
  root-certificates = "/absolute/path/ca.crt"

Then `flwr run . NAME`, `flwr supernode register KEY.pub NAME`, `flwr ls NAME`
and `flwr log RUN_ID NAME` talk to that SuperLink's Control API. Run these
commands on the coordinator host itself (HOST 127.0.0.1) or from an admin
machine the firewall lets through.

Options:
  --name NAME          connection name (e.g. hedrl)
  --address HOST:PORT  the SuperLink (e.g. 127.0.0.1:8000)
  --ca FILE            the deployment CA certificate (ca.crt from provision.sh)
  --insecure           plaintext connection (only with a SuperLink started with
                       --insecure; prints a warning)
  --default            also make NAME the default connection
  -h, --help           this help
EOT
}

name="" ; address="" ; ca="" ; insecure=0 ; default=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --address) address="$2"; shift 2 ;;
    --ca) ca="$2"; shift 2 ;;
    --insecure) insecure=1; shift ;;
    --default) default=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "connect.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ -n "$name" && -n "$address" ]] || { echo "connect.sh: --name and --address are required" >&2; exit 2; }
if [[ $insecure -eq 1 ]]; then
  echo "connect.sh: WARNING: --insecure: run submissions travel in the clear" >&2
elif [[ -r "$ca" ]]; then
  ca="$(cd "$(dirname "$ca")" && pwd)/$(basename "$ca")"
else
  echo "connect.sh: --ca FILE (readable) is required unless --insecure" >&2; exit 2
fi

NAME="$name" ADDRESS="$address" CA="$ca" INSECURE="$insecure" DEFAULT="$default" python - <<'PY'
import os
from pathlib import Path

import tomli
import tomli_w
from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML

home = Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")
path = home / "config.toml"
home.mkdir(parents=True, exist_ok=True)
if not path.exists():
    path.write_text(DEFAULT_FLOWER_CONFIG_TOML)
cfg = tomli.loads(path.read_text())
conn = {"address": os.environ["ADDRESS"]}
if os.environ["INSECURE"] == "1":
    conn["insecure"] = True
else:
    conn["root-certificates"] = os.environ["CA"]
links = cfg.setdefault("superlink", {})
links[os.environ["NAME"]] = conn
if os.environ["DEFAULT"] == "1":
    links["default"] = os.environ["NAME"]
path.write_text(tomli_w.dumps(cfg))
print(f"connection {os.environ['NAME']!r} -> {conn['address']} written to {path}")
PY
