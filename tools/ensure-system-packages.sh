#!/usr/bin/env bash
# Installs the Debian packages that `make` needs, only those that are missing.
#
# usage: tools/ensure-system-packages.sh [venv|all]
#   venv   what creating .venv needs (python3, python3-venv): run before `python3 -m venv`
#   all    (default) also what the tests, the demo and the benchmarks run: Mosquitto, git, OpenSSH,
#          openssl (test certificates), Chromium (and libatomic1 for Playwright's driver),
#          debootstrap, PostgreSQL, Prometheus (for promtool)
#
# As root it runs apt-get itself; as any other user it runs it through `sudo -n` (never a password
# prompt). When packages are missing and neither works it names them in one line and exits 1.
# It never starts, stops or reconfigures a system service: the tests and the demo start their own
# Mosquitto and PostgreSQL on free loopback ports, beside whatever the machine already runs.
set -euo pipefail

me=ensure-system-packages
venv_set=(python3 python3-venv ca-certificates)
# libatomic1: the node program inside the Playwright wheel (which drives Chromium) links it.
all_set=("${venv_set[@]}" mosquitto mosquitto-clients git openssh-client openssh-server openssl chromium
         libatomic1 debootstrap postgresql prometheus)

case "${1:-all}" in
  venv) want=("${venv_set[@]}") ;;
  all) want=("${all_set[@]}") ;;
  *) echo "$me: unknown package set '$1' (expected venv or all)" >&2; exit 2 ;;
esac

if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
  echo "$me: no dpkg/apt-get here (not Debian-like); install these packages yourself: ${want[*]}" >&2
  exit 1
fi

# One dpkg-query for every package; a package never installed is absent from its output.
installed=$(dpkg-query -W -f='${Package} ${db:Status-Abbrev}\n' "${want[@]}" 2>/dev/null || true)
missing=()
for p in "${want[@]}"; do
  grep -q "^$p ii" <<<"$installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
  as_root=(sudo -n)
else
  echo "$me: missing Debian packages: ${missing[*]}; run make as root or as a user with" \
       "passwordless sudo, or install them first: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi

echo "$me: installing ${missing[*]}" >&2
apt=(env DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=300)
"${as_root[@]}" "${apt[@]}" update -qq \
  || { echo "$me: apt-get update failed (see above)" >&2; exit 1; }
"${as_root[@]}" "${apt[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
  || { echo "$me: apt-get install ${missing[*]} failed (see above)" >&2; exit 1; }
