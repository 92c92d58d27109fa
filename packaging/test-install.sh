#!/usr/bin/env bash
# Install the edge-agent and fleet-server packages into a throwaway Debian 12 root and use them:
# dpkg -i (running the real maintainer scripts), the optimised byte code of every module the agent
# loads (-OO) and the dpkg trigger that writes it again, edge-agent --version, init, sync --once against a
# signed release on a file:// mirror inside the root, then dpkg -r (keys and state kept) and
# dpkg -P (keys and state gone). Needs root, chroot, debootstrap (installed with apt when missing),
# git, and access to Debian's package archive the first time (the base root is cached).
#
# usage: packaging/test-install.sh [DIST_DIR]
#   DIST_DIR                    where the .debs are (default packaging/build/dist; built when missing)
#   EDGE_FLEET_CHROOT_CACHE     cached base roots (default packaging/build/chroot)
#   EDGE_FLEET_DEBIAN_MIRROR    mirror for debootstrap (default: debootstrap's own default)
#   EDGE_FLEET_FLEETCTL         the operator's fleetctl (default: the checkout's .venv, else python3 -m)
#   EDGE_FLEET_KEEP_ROOT=1      keep the throwaway root for inspection
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
DIST="${1:-$HERE/build/dist}"
CACHE="${EDGE_FLEET_CHROOT_CACHE:-$HERE/build/chroot}"
SUITE=bookworm
BASE="$CACHE/$SUITE-minbase-python3"
START=$(date +%s)

step() { printf '== [%3ss] %s\n' "$(( $(date +%s) - START ))" "$*"; CURRENT_STEP="$*"; }
fail() { printf 'test-install: FAILED at step "%s": %s\n' "${CURRENT_STEP:-setup}" "$*" >&2; exit 1; }
CURRENT_STEP=setup

[ "$(id -u)" = 0 ] || fail "must run as root (debootstrap, chroot and dpkg need it)"
command -v git >/dev/null || fail "git is needed to build the operator's config repository"

if [ -n "${EDGE_FLEET_FLEETCTL:-}" ]; then
    read -r -a FLEETCTL <<<"$EDGE_FLEET_FLEETCTL"
elif [ -x "$REPO/.venv/bin/fleetctl" ]; then
    FLEETCTL=("$REPO/.venv/bin/fleetctl")
else
    FLEETCTL=(env "PYTHONPATH=$REPO" python3 -m fleet_server.fleetctl)
fi

# --- the cached base root: debootstrap minbase + python3 installed with apt inside it ---------------
# shellcheck source=packaging/chroot-base.sh
. "$HERE/chroot-base.sh"
ensure_base_root

# --- the packages ---------------------------------------------------------------------------------
step "packages in $DIST"
AGENT_DEB=$(ls "$DIST"/edge-agent_*.deb 2>/dev/null | tail -n 1 || true)
SERVER_DEB=$(ls "$DIST"/fleet-server_*.deb 2>/dev/null | tail -n 1 || true)
if [ -z "$AGENT_DEB" ] || [ -z "$SERVER_DEB" ]; then
    step "building the packages"
    python3 "$HERE/build_deb.py" --out "$DIST" >/dev/null
    AGENT_DEB=$(ls "$DIST"/edge-agent_*.deb | tail -n 1)
    SERVER_DEB=$(ls "$DIST"/fleet-server_*.deb | tail -n 1)
fi
VERSION=$(dpkg-deb -f "$AGENT_DEB" Version)

# --- a fresh copy of the base root for this run -----------------------------------------------------
WORK=$(mktemp -d "$CACHE/run.XXXXXX")
ROOT="$WORK/root"
cleanup() {
    if mountpoint -q "$ROOT/proc" 2>/dev/null; then umount "$ROOT/proc" || true; fi
    if [ "${EDGE_FLEET_KEEP_ROOT:-0}" = 1 ]; then
        echo "test-install: root kept at $ROOT" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
step "copy the base root"
cp -a "$BASE" "$ROOT"
mount -t proc proc "$ROOT/proc"
mkdir -p "$ROOT/tmp/debs"
cp "$AGENT_DEB" "$SERVER_DEB" "$ROOT/tmp/debs/"
in_root() { chroot "$ROOT" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"; }
sha() { sha256sum "$1" | cut -d' ' -f1; }

# --- edge-agent -----------------------------------------------------------------------------------
step "dpkg -i $(basename "$AGENT_DEB")"
in_root dpkg -i "/tmp/debs/$(basename "$AGENT_DEB")" >"$WORK/dpkg-i.log" 2>&1 || { cat "$WORK/dpkg-i.log" >&2; fail "dpkg -i"; }
grep -q "identity key:" "$WORK/dpkg-i.log" || { cat "$WORK/dpkg-i.log" >&2; fail "postinst printed no identity key"; }
[ "$(stat -c %a "$ROOT/var/lib/edge-agent")" = 700 ] || fail "/var/lib/edge-agent is not 0700"
[ -f "$ROOT/var/lib/edge-agent/identity.key" ] || fail "no identity key after install"
[ "$(stat -c %a "$ROOT/var/lib/edge-agent/identity.key")" = 600 ] || fail "identity.key is not 0600"
[ -L "$ROOT/etc/systemd/system/multi-user.target.wants/edge-agent.service" ] || fail "unit not enabled"
KEY_SHA=$(sha "$ROOT/var/lib/edge-agent/identity.key")

step "optimised byte code for every module the agent loads (it runs with -OO)"
head -n 1 "$ROOT/opt/edge-agent/bin/edge-agent" | grep -qx '#!/opt/edge-agent/bin/python -OO' || fail "edge-agent does not run with -OO"
OPT2_CHECK='import importlib.util, os, sys
import edge_agent.cli, edge_agent.daemon, edge_core.gitclients
missing = [m.__file__ for m in list(sys.modules.values())
           if (getattr(m, "__file__", None) or "").endswith(".py")
           and not os.path.exists(importlib.util.cache_from_source(m.__file__, optimization=2))]
print("\n".join(missing))
sys.exit(1 if missing else 0)'
out=$(in_root /opt/edge-agent/bin/python -B -OO -c "$OPT2_CHECK") || fail "modules without opt-2 byte code: $out"
JSON_OPT2=/usr/lib/python3.11/json/__pycache__/__init__.cpython-311.opt-2.pyc
rm "$ROOT$JSON_OPT2"
in_root dpkg-trigger --no-await /usr/lib/python3.11 || fail "dpkg-trigger"
in_root dpkg --triggers-only --pending >"$WORK/dpkg-trig.log" 2>&1 || { cat "$WORK/dpkg-trig.log" >&2; fail "dpkg --triggers-only"; }
[ -f "$ROOT$JSON_OPT2" ] || { cat "$WORK/dpkg-trig.log" >&2; fail "the trigger did not write the standard library's byte code again"; }

step "edge-agent --version"
out=$(in_root edge-agent --version) || fail "edge-agent --version exited non-zero"
[ "$out" = "edge-agent $VERSION" ] || fail "edge-agent --version printed '$out', expected 'edge-agent $VERSION'"

step "operator: key, config repo, signed release, mirror inside the root"
mkdir -p "$WORK/operator"
PUB=$("${FLEETCTL[@]}" keys generate --out "$WORK/operator/release.key" | grep -o 'ed25519:[A-Za-z0-9+/=]*' | head -n 1)
[ -n "$PUB" ] || fail "fleetctl keys generate printed no public key"
REPO_DIR="$WORK/operator/fleet"
mkdir -p "$REPO_DIR/bundles/hello"
cat >"$REPO_DIR/fleet.yaml" <<'YAML'
description: package install test fleet
YAML
cat >"$REPO_DIR/bundles/hello/bundle.yaml" <<'YAML'
targets:
  - labels: {role: gateway}
resources:
  - kind: directory
    path: /srv/edge-demo
    mode: "0750"
  - kind: file
    path: /etc/edge-demo/hello.txt
    content: "installed by edge-fleet\n"
    mode: "0644"
health:
  - kind: command
    name: hello-present
    run: [test, -f, /etc/edge-demo/hello.txt]
    timeout: 5
YAML
export GIT_AUTHOR_NAME=operator GIT_AUTHOR_EMAIL=operator@example.invalid
export GIT_COMMITTER_NAME=operator GIT_COMMITTER_EMAIL=operator@example.invalid GIT_CONFIG_NOSYSTEM=1
git -C "$REPO_DIR" init -q --initial-branch=main
"${FLEETCTL[@]}" release sign "$REPO_DIR" --key "$WORK/operator/release.key" --expires 1d >/dev/null \
    || fail "fleetctl release sign"
git -C "$REPO_DIR" add -A
git -C "$REPO_DIR" commit -q -m "release 1"
git init -q --bare --initial-branch=main "$ROOT/srv/mirror/fleet.git"
git -C "$REPO_DIR" push -q "$ROOT/srv/mirror/fleet.git" main

step "operator edits /etc/edge-agent/agent.yaml"
cat >"$ROOT/etc/edge-agent/agent.yaml" <<YAML
# edited by the operator
device_id: pkg-test-1
labels: {role: gateway}
profile: generic-linux
repo:
  url: file:///srv/mirror/fleet.git
trust:
  keys: ["$PUB"]
mode: enforce
YAML
AGENT_YAML_SHA=$(sha "$ROOT/etc/edge-agent/agent.yaml")

step "edge-agent init (keeps the identity created at install)"
out=$(in_root edge-agent init) || fail "edge-agent init exited non-zero"
case "$out" in *"identity exists"*) ;; *) fail "edge-agent init did not report an existing identity: $out";; esac
[ "$(sha "$ROOT/var/lib/edge-agent/identity.key")" = "$KEY_SHA" ] || fail "edge-agent init replaced the identity key"

step "edge-agent sync --once"
out=$(in_root edge-agent sync --once 2>"$WORK/sync.err") || { cat "$WORK/sync.err" >&2; fail "edge-agent sync --once: $out"; }
case "$out" in applied:*) ;; *) cat "$WORK/sync.err" >&2; fail "first sync was not applied: $out";; esac
[ "$(cat "$ROOT/etc/edge-demo/hello.txt")" = "installed by edge-fleet" ] || fail "release file not written"
[ "$(stat -c %a "$ROOT/srv/edge-demo")" = 750 ] || fail "release directory mode wrong"
out=$(in_root edge-agent sync --once 2>>"$WORK/sync.err") || fail "second sync: $out"
case "$out" in noop:*) ;; *) fail "second sync was not a noop: $out";; esac
in_root edge-agent status >/dev/null || fail "edge-agent status"

step "dpkg -i again (upgrade path: keys and edited conffile kept)"
in_root dpkg -i "/tmp/debs/$(basename "$AGENT_DEB")" >"$WORK/dpkg-i2.log" 2>&1 || { cat "$WORK/dpkg-i2.log" >&2; fail "dpkg -i again"; }
[ "$(sha "$ROOT/var/lib/edge-agent/identity.key")" = "$KEY_SHA" ] || fail "reinstall replaced the identity key"
[ "$(sha "$ROOT/etc/edge-agent/agent.yaml")" = "$AGENT_YAML_SHA" ] || fail "reinstall overwrote agent.yaml"

# --- fleet-server ---------------------------------------------------------------------------------
step "dpkg -i $(basename "$SERVER_DEB")"
in_root dpkg -i "/tmp/debs/$(basename "$SERVER_DEB")" >"$WORK/dpkg-i-server.log" 2>&1 \
    || { cat "$WORK/dpkg-i-server.log" >&2; fail "dpkg -i fleet-server"; }
in_root getent passwd fleet-server >/dev/null || fail "no fleet-server system user"
[ "$(in_root stat -c '%a %U:%G' /etc/fleet-server/admin.token)" = "640 root:fleet-server" ] || fail "admin.token mode/owner"
[ "$(in_root stat -c '%a %U' /var/lib/fleet-server)" = "750 fleet-server" ] || fail "/var/lib/fleet-server mode/owner"
[ -L "$ROOT/etc/systemd/system/multi-user.target.wants/fleet-server.service" ] || fail "fleet-server unit not enabled"

step "fleetctl keys generate inside the root"
out=$(in_root fleetctl keys generate --out /root/release.key) || fail "fleetctl keys generate"
case "$out" in *ed25519:*) ;; *) fail "fleetctl keys generate printed no public key: $out";; esac

step "fleet-server --help"
in_root fleet-server --help >/dev/null 2>"$WORK/server.err" || { cat "$WORK/server.err" >&2; fail "fleet-server --help"; }

# --- remove and purge -------------------------------------------------------------------------------
step "dpkg -r edge-agent (keys, state and config kept)"
in_root dpkg -r edge-agent >"$WORK/dpkg-r.log" 2>&1 || { cat "$WORK/dpkg-r.log" >&2; fail "dpkg -r"; }
[ ! -e "$ROOT/usr/bin/edge-agent" ] && [ ! -e "$ROOT/opt/edge-agent/bin/python" ] || fail "program files left after remove"
[ "$(sha "$ROOT/var/lib/edge-agent/identity.key")" = "$KEY_SHA" ] || fail "remove lost the identity key"
[ -f "$ROOT/var/lib/edge-agent/state.db" ] || fail "remove lost the state database"
[ "$(sha "$ROOT/etc/edge-agent/agent.yaml")" = "$AGENT_YAML_SHA" ] || fail "remove lost agent.yaml"
[ "$(cat "$ROOT/etc/edge-demo/hello.txt")" = "installed by edge-fleet" ] || fail "remove touched managed files"
[ ! -e "$ROOT$JSON_OPT2" ] || fail "remove left the optimised byte code of the standard library"
[ -f "$ROOT/usr/lib/python3.11/json/__pycache__/__init__.cpython-311.pyc" ] || fail "remove took Debian's own byte code"

step "dpkg -P edge-agent (keys, state and config gone)"
in_root dpkg -P edge-agent >"$WORK/dpkg-p.log" 2>&1 || { cat "$WORK/dpkg-p.log" >&2; fail "dpkg -P"; }
[ ! -e "$ROOT/var/lib/edge-agent" ] || fail "purge left /var/lib/edge-agent"
[ ! -e "$ROOT/etc/edge-agent" ] || fail "purge left /etc/edge-agent"
[ ! -e "$ROOT/opt/edge-agent" ] || fail "purge left /opt/edge-agent"
[ ! -e "$ROOT/etc/systemd/system/multi-user.target.wants/edge-agent.service" ] || fail "purge left the unit enabled"

step "dpkg -r then -P fleet-server"
in_root dpkg -r fleet-server >"$WORK/dpkg-r-server.log" 2>&1 || { cat "$WORK/dpkg-r-server.log" >&2; fail "dpkg -r fleet-server"; }
[ -f "$ROOT/etc/fleet-server/admin.token" ] || fail "remove lost the admin token"
in_root dpkg -P fleet-server >"$WORK/dpkg-p-server.log" 2>&1 || { cat "$WORK/dpkg-p-server.log" >&2; fail "dpkg -P fleet-server"; }
for d in /etc/fleet-server /var/lib/fleet-server /var/cache/fleet-server /opt/fleet-server; do
    [ ! -e "$ROOT$d" ] || fail "purge left $d"
done

step "done"
echo "test-install: PASSED in $(( $(date +%s) - START ))s"
