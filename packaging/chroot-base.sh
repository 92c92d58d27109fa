# shellcheck shell=bash
# The cached Debian 12 base root shared by packaging/test-install.sh and packaging/test-fresh.sh:
# debootstrap --variant=minbase bookworm, plus python3 installed with apt inside it, made once.
# Source it, then call ensure_base_root. It needs CACHE, BASE, SUITE, and the caller's step and fail.

ensure_base_root() {
    step "base root $BASE"
    [ -f "$BASE/.edge-fleet-base-ready" ] && return 0
    if ! command -v debootstrap >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
    fi
    rm -rf "$BASE.tmp"
    mkdir -p "$CACHE"
    step "debootstrap --variant=minbase $SUITE (first run only)"
    # shellcheck disable=SC2086 # the mirror is optional: an empty variable must vanish
    debootstrap --variant=minbase "$SUITE" "$BASE.tmp" ${EDGE_FLEET_DEBIAN_MIRROR:-} >"$CACHE/debootstrap.log" 2>&1 \
        || fail "debootstrap failed, see $CACHE/debootstrap.log"
    step "apt-get install python3 inside the base root (first run only)"
    cp /etc/resolv.conf "$BASE.tmp/etc/resolv.conf"
    mount -t proc proc "$BASE.tmp/proc"
    if ! chroot "$BASE.tmp" env DEBIAN_FRONTEND=noninteractive sh -c \
        'apt-get update -qq && apt-get install -y -qq --no-install-recommends python3 >/dev/null && apt-get clean' \
        >"$CACHE/apt.log" 2>&1; then
        umount "$BASE.tmp/proc"
        fail "apt-get install python3 in the base root failed, see $CACHE/apt.log"
    fi
    umount "$BASE.tmp/proc"
    touch "$BASE.tmp/.edge-fleet-base-ready"
    rm -rf "$BASE"
    mv "$BASE.tmp" "$BASE"
}
