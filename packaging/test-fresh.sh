#!/usr/bin/env bash
# The README's two commands on a fresh Debian 12, as a non-root user with sudo.
#
# A copy of the cached base root that packaging/test-install.sh uses (debootstrap minbase + python3)
# gets what a fresh Debian 12 machine has for this (`make` and `sudo`), a user `dev` with
# passwordless sudo and a user `nosudo` without it, and the repository as committed (git archive
# HEAD). Then, in the root:
#   1. `make demo` as nosudo stops at once with one line naming the missing packages (exit non-zero);
#   2. `make demo` as dev, with no terminal: installs the system packages through sudo -n, creates
#      .venv, runs the whole story, keeps the fleet up; `kill` on the pid it prints stops it (exit 0);
#   3. `make test` as dev: ruff, mypy and the tests (EDGE_FLEET_FRESH_TEST=full: the whole suite;
#      default: the test files in EDGE_FLEET_FRESH_TESTS only, as `make test PYTEST_ARGS=…`).
# Services that Debian's packages would start on install are not started inside the root
# (policy-rc.d: the root shares this machine's network); the tests and the demo start their own.
# Needs root, chroot, debootstrap, git, and Debian's archive and PyPI (the host's local CA
# certificates and /etc/pip.conf are copied in, as a machine on the same network would have them).
#
# usage: packaging/test-fresh.sh            (make test-fresh)
#   EDGE_FLEET_CHROOT_CACHE     cached base roots (default packaging/build/chroot)
#   EDGE_FLEET_DEBIAN_MIRROR    mirror for debootstrap (default: debootstrap's own default)
#   EDGE_FLEET_FRESH_TEST       full | some (default some)
#   EDGE_FLEET_FRESH_TESTS      the test files for `some` (default below)
#   EDGE_FLEET_KEEP_ROOT=1      keep the root for inspection
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
CACHE="${EDGE_FLEET_CHROOT_CACHE:-$HERE/build/chroot}"
SUITE=bookworm
BASE="$CACHE/$SUITE-minbase-python3"
MODE="${EDGE_FLEET_FRESH_TEST:-some}"
TESTS="${EDGE_FLEET_FRESH_TESTS:-tests/test_system_packages.py tests/test_broker_acl.py tests/test_dashboard.py}"
START=$(date +%s)

step() { printf '== [%4ss] %s\n' "$(( $(date +%s) - START ))" "$*"; CURRENT_STEP="$*"; }
fail() { printf 'test-fresh: FAILED at step "%s": %s\n' "${CURRENT_STEP:-setup}" "$*" >&2; exit 1; }
CURRENT_STEP=setup

[ "$(id -u)" = 0 ] || fail "must run as root (debootstrap, chroot and mount need it)"
command -v git >/dev/null || fail "git is needed to export the repository"
case "$MODE" in full|some) ;; *) fail "EDGE_FLEET_FRESH_TEST must be full or some, got '$MODE'";; esac

# shellcheck source=packaging/chroot-base.sh
. "$HERE/chroot-base.sh"
ensure_base_root

WORK=$(mktemp -d "$CACHE/fresh.XXXXXX")
ROOT="$WORK/root"
MOUNTS=()
mount_in_root() {  # mount_in_root TARGET ARGS...: mount, and remember it for the clean-up
    mount "${@:2}" "$ROOT/$1"
    MOUNTS=("$ROOT/$1" "${MOUNTS[@]}")
}
stop_root_processes() {  # every process whose root is this root was started by this script
    local p
    for p in /proc/[0-9]*; do
        if [ "$(readlink "$p/root" 2>/dev/null)" = "$ROOT" ]; then kill -9 "${p#/proc/}" 2>/dev/null || true; fi
    done
    return 0
}
cleanup() {
    stop_root_processes
    sleep 1
    local m
    for m in "${MOUNTS[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" || true; done
    if grep -q " $ROOT/" /proc/mounts; then
        echo "test-fresh: something is still mounted under $ROOT; left in place" >&2
    elif [ "${EDGE_FLEET_KEEP_ROOT:-0}" = 1 ]; then
        echo "test-fresh: root kept at $ROOT" >&2
    else
        rm -rf --one-file-system "$WORK"
    fi
}
trap cleanup EXIT

step "copy the base root"
cp -a "$BASE" "$ROOT"
mount_in_root proc -t proc proc
mount_in_root sys -t sysfs -o ro sysfs
mount_in_root dev/shm -t tmpfs -o mode=1777,size=512m tmpfs
mount_in_root dev/pts -t devpts -o newinstance,ptmxmode=0666 devpts
cp /etc/resolv.conf /etc/hosts /etc/hostname "$ROOT/etc/"
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    mkdir -p "$ROOT/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/"
fi
if [ -f /etc/pip.conf ]; then cp /etc/pip.conf "$ROOT/etc/pip.conf"; fi
printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
chmod 0755 "$ROOT/usr/sbin/policy-rc.d"

in_root() { chroot "$ROOT" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"; }
as_user() {  # as_user USER COMMAND: a login-like shell in the checkout, no terminal
    local home="/home/$1"
    chroot --userspec="$1:$1" "$ROOT" env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="$home" USER="$1" \
        LOGNAME="$1" LANG=C.UTF-8 sh -c "cd ~/edge-fleet && $2" </dev/null
}

step "a fresh Debian 12 machine: make and sudo; users dev (passwordless sudo) and nosudo"
in_root sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends make sudo >/dev/null' \
    >"$WORK/base-apt.log" 2>&1 || { cat "$WORK/base-apt.log" >&2; fail "apt-get install make sudo"; }
for user in dev nosudo; do
    in_root useradd --create-home --shell /bin/bash "$user"
    mkdir -p "$ROOT/home/$user/edge-fleet"
    git -C "$REPO" archive HEAD | tar -x -C "$ROOT/home/$user/edge-fleet"
    in_root chown -R "$user:$user" "/home/$user/edge-fleet"
done
echo 'dev ALL=(ALL) NOPASSWD: ALL' >"$ROOT/etc/sudoers.d/dev"
chmod 0440 "$ROOT/etc/sudoers.d/dev"
as_user dev 'sudo -n true' || fail "sudo -n does not work for dev"
installed() { in_root dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
for p in python3-venv mosquitto postgresql prometheus; do
    if installed "$p"; then fail "$p is already installed: the root is not fresh"; fi
done

step "make demo as nosudo: one line naming the missing packages"
if as_user nosudo 'make demo' >"$WORK/nosudo.out" 2>"$WORK/nosudo.err"; then
    fail "make demo without root or sudo exited 0"
fi
grep -q '^ensure-system-packages: missing Debian packages: .*python3-venv' "$WORK/nosudo.err" \
    || { cat "$WORK/nosudo.err" >&2; fail "no one-line reason naming python3-venv"; }
[ "$(grep -c '^ensure-system-packages' "$WORK/nosudo.err")" = 1 ] || fail "more than one line from ensure-system-packages"
[ ! -e "$ROOT/home/nosudo/edge-fleet/.venv" ] || fail "a .venv was made before python3-venv was there"

step "make demo as dev, no terminal (installs packages and .venv first: minutes)"
DEMO_LOG="$WORK/demo.log"
as_user dev 'make demo' >"$DEMO_LOG" 2>&1 &
MAKE_PID=$!
deadline=$(( $(date +%s) + 3600 ))
until grep -q "The fleet keeps running" "$DEMO_LOG"; do
    kill -0 "$MAKE_PID" 2>/dev/null || { tail -n 40 "$DEMO_LOG" >&2; fail "make demo ended before the fleet was up"; }
    [ "$(date +%s)" -lt "$deadline" ] || { tail -n 40 "$DEMO_LOG" >&2; fail "make demo: no fleet after an hour"; }
    sleep 2
done
step "the demo keeps running without a terminal; kill the pid it prints"
DEMO_PID=$(grep -o 'kill [0-9]*' "$DEMO_LOG" | tail -n 1 | cut -d' ' -f2)
[ -n "$DEMO_PID" ] || fail "the demo printed no pid to kill"
sleep 3
kill -0 "$DEMO_PID" 2>/dev/null || fail "the demo (pid $DEMO_PID) is gone without being stopped"
grep -q "fleetctl devices --json: release 2, in_sync: 20; online 20/20" "$DEMO_LOG" \
    || { cat "$DEMO_LOG" >&2; fail "the demo's summary is not 20/20 on release 2"; }
kill -TERM "$DEMO_PID"
rc=0; wait "$MAKE_PID" || rc=$?
[ "$rc" = 0 ] || { tail -n 20 "$DEMO_LOG" >&2; fail "make demo exited $rc after SIGTERM"; }
grep -q '^ensure-system-packages: installing .*python3-venv' "$DEMO_LOG" || fail "make demo installed nothing"
for p in python3-venv mosquitto git chromium postgresql prometheus; do
    installed "$p" || fail "$p was not installed by make demo"
done
echo "test-fresh: make demo as a user with sudo: $(grep -o 'done in [0-9]* s' "$DEMO_LOG")"

if [ "$MODE" = full ]; then
    step "make test as dev (the whole suite)"
    TEST_CMD='make test'
else
    step "make test as dev: ruff, mypy and $TESTS"
    TEST_CMD="make test PYTEST_ARGS='$TESTS'"
fi
as_user dev "$TEST_CMD" >"$WORK/test.log" 2>&1 || { tail -n 60 "$WORK/test.log" >&2; fail "$TEST_CMD"; }
grep -E '^All checks passed!|^Success: no issues|[0-9]+ passed' "$WORK/test.log" | sed 's/^/test-fresh: /'

step "done"
echo "test-fresh: PASSED in $(( $(date +%s) - START ))s"
