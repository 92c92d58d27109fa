#!/usr/bin/env bash
# Installs the Debian packages the tests and the demo use, only those that are missing.
set -euo pipefail
want=(mosquitto mosquitto-clients git openssh-client openssh-server chromium debootstrap postgresql prometheus)
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing system packages: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The Debian packages start a broker on :1883, a PostgreSQL cluster on :5432 and Prometheus on :9090
# on install; the tests start their own (tests/support/broker.py, tests/support/postgres.py) on free
# ports, and use only Prometheus's promtool.
for service in mosquitto postgresql prometheus; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$service" 2>/dev/null; then
    systemctl stop "$service" || true
  fi
done
