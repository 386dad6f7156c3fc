#!/usr/bin/env bash
# A Debian 13 (trixie) root with its Blender (4.3) for the second GUI tier
# (scripts/gui_check.py --tier 4.3, tests/gui). Needs root (debootstrap, chroot, mount).
#
#   bash scripts/debian_root.sh [build]        build the root once (cached), print its path
#   bash scripts/debian_root.sh path           print its path; exit 1 if it is not built
#   bash scripts/debian_root.sh run [--no-network] -- CMD [ARG...]
#                                              run CMD inside the root, the repo bind-mounted
#                                              at its own path; exits with CMD's exit code
#
# The root lives in build/debian-trixie (TASKQUEUE_DEBIAN_ROOT overrides it). A build
# is made in <root>.partial and renamed when it is complete, with a stamp file that
# records the suite and the packages: a matching stamp means "reuse", anything else
# (an interrupted build, a changed package list) builds again. debootstrap is
# installed on the host with apt-get if missing; nothing else outside the folder is
# touched.
#
# Mounts (/proc, /sys, /dev, /dev/pts, /dev/shm, the repo) are made in a private mount
# namespace of their own (unshare), so they are invisible to the host and vanish with
# it even if this script is killed; a trap unmounts them explicitly as well. `run`
# also gets its own PID namespace (everything it started dies with it) and, with
# --no-network, its own network namespace: an X server in the root then cannot
# collide with one on the host (X's abstract sockets are per network namespace).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${TASKQUEUE_DEBIAN_ROOT:-$REPO/build/debian-trixie}"
SUITE=trixie
# A mirror only if one is asked for (TASKQUEUE_DEBIAN_MIRROR=URL); otherwise debootstrap
# uses its own default.
MIRROR="${TASKQUEUE_DEBIAN_MIRROR:-}"
# Without the Mesa DRI drivers Blender's window draws black under Xvfb. xwd (x11-apps):
# Blender 4.3's own screenshot reads its front buffer, black with Mesa 25's llvmpipe
# under Xvfb although the X server shows the window, so gui_check.py asks the X server.
PACKAGES=(blender xvfb xauth libgl1-mesa-dri libglx-mesa0 python3 x11-apps)
STAMP_NAME=.taskqueue-root
STAMP_TEXT="suite=$SUITE packages=${PACKAGES[*]}"
ROOT_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

die() { echo "debian_root.sh: $*" >&2; exit 1; }

is_built() { [ -f "$DIR/$STAMP_NAME" ] && [ "$(cat "$DIR/$STAMP_NAME")" = "$STAMP_TEXT" ]; }

# Refuse to delete a folder while anything is mounted below it (rm would follow a bind).
mounted_below() { findmnt -rn -o TARGET | awk -v d="$1" 'index($0, d "/") == 1 || $0 == d' | head -1; }

remove_tree() {
    local dir="$1" busy
    [ -e "$dir" ] || return 0
    busy="$(mounted_below "$dir")"
    [ -z "$busy" ] || die "refusing to remove $dir: $busy is mounted"
    rm -rf --one-file-system "$dir"
}

# ---- inside a private mount namespace (called through unshare, never directly)

mount_all() {  # $1: root folder, $2: "repo" to bind the repo too
    local r="$1"
    MOUNTED=()
    trap 'unmount_all' EXIT
    mount -t proc proc "$r/proc"; MOUNTED+=("$r/proc")
    mount -t sysfs sysfs "$r/sys"; MOUNTED+=("$r/sys")
    mount --bind /dev "$r/dev"; MOUNTED+=("$r/dev")
    mount -t devpts devpts "$r/dev/pts" -o newinstance,ptmxmode=0666,gid=5,mode=620; MOUNTED+=("$r/dev/pts")
    mkdir -p "$r/dev/shm"
    mount -t tmpfs shm "$r/dev/shm" -o mode=1777,nosuid,nodev; MOUNTED+=("$r/dev/shm")
    if [ "${2:-}" = repo ]; then
        mkdir -p "$r$REPO"
        mount --bind "$REPO" "$r$REPO"; MOUNTED+=("$r$REPO")
    fi
}

unmount_all() {
    local i
    for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do
        umount "${MOUNTED[i]}" 2>/dev/null || umount -l "${MOUNTED[i]}" 2>/dev/null || true
    done
    MOUNTED=()
}

ns_install() {  # $1: the partial root
    local r="$1"
    mount_all "$r"
    # No service starts inside the chroot.
    printf '#!/bin/sh\nexit 101\n' > "$r/usr/sbin/policy-rc.d"
    chmod 755 "$r/usr/sbin/policy-rc.d"
    chroot "$r" /usr/bin/env -i PATH="$ROOT_PATH" HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive \
        apt-get update -q
    chroot "$r" /usr/bin/env -i PATH="$ROOT_PATH" HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"
    chroot "$r" /usr/bin/env -i PATH="$ROOT_PATH" apt-get clean
    chroot "$r" /usr/bin/env -i PATH="$ROOT_PATH" HOME=/root blender --version | head -1
    rm -f "$r/usr/sbin/policy-rc.d"
}

ns_run() {  # the command, already past "--"
    mount_all "$DIR" repo
    ip link set lo up 2>/dev/null || true  # a new network namespace starts with it down
    local cwd=/
    case "$PWD/" in "$REPO"/*) cwd="$PWD" ;; esac
    # Not exec: the trap unmounts after the command ends. The environment is a clean
    # one (the host's PATH, venvs and PYTHON* variables mean nothing inside); pass more
    # with `run -- env NAME=value CMD`.
    local rc=0
    chroot "$DIR" /usr/bin/env -i PATH="$ROOT_PATH" HOME=/root LANG=C.UTF-8 TERM="${TERM:-dumb}" \
        /bin/sh -c 'cd "$1" && shift && exec "$@"' sh "$cwd" "$@" || rc=$?
    exit "$rc"
}

# ---- the commands

build() {
    if is_built; then
        echo "$DIR"
        return 0
    fi
    [ "$(id -u)" = 0 ] || die "building the root needs root (debootstrap, chroot, mount)"
    if ! command -v debootstrap >/dev/null; then
        echo "debian_root.sh: installing debootstrap on the host" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >&2 \
            || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >&2; }
    fi
    local partial="$DIR.partial" started=$SECONDS
    mkdir -p "$(dirname "$DIR")"
    remove_tree "$partial"
    echo "debian_root.sh: debootstrap $SUITE into $partial" >&2
    debootstrap --variant=minbase "$SUITE" "$partial" ${MIRROR:+"$MIRROR"} >&2
    echo "debian_root.sh: installing ${PACKAGES[*]}" >&2
    unshare --mount --propagation private -- bash "${BASH_SOURCE[0]}" __ns_install "$partial" >&2
    echo "$STAMP_TEXT" > "$partial/$STAMP_NAME"
    remove_tree "$DIR"
    mv "$partial" "$DIR"
    echo "debian_root.sh: root built in $((SECONDS - started)) s: $DIR" >&2
    echo "$DIR"
}

run() {
    local unshare_net=()
    while [ $# -gt 0 ]; do
        case "$1" in
            --no-network) unshare_net=(--net); shift ;;
            --) shift; break ;;
            *) break ;;
        esac
    done
    [ $# -gt 0 ] || die "run: no command (run [--no-network] -- CMD [ARG...])"
    is_built || die "the root is not built ($DIR): bash scripts/debian_root.sh build"
    [ "$(id -u)" = 0 ] || die "running in the root needs root (chroot, mount)"
    # --kill-child: if this script is killed, the namespace's processes die with it.
    exec unshare --mount --propagation private --pid --fork --kill-child "${unshare_net[@]}" -- \
        bash "${BASH_SOURCE[0]}" __ns_run "$@"
}

case "${1:-build}" in
    build) build ;;
    path) is_built && echo "$DIR" || { echo "debian_root.sh: not built: $DIR" >&2; exit 1; } ;;
    run) shift; run "$@" ;;
    __ns_install) shift; ns_install "$@" ;;
    __ns_run) shift; ns_run "$@" ;;
    -h|--help) sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' ;;
    *) die "unknown command ${1} (build, path, run)" ;;
esac
