#!/usr/bin/env bash
# Build the interpreters pyenv does not carry here -- CPython 3.14 (GIL),
# 3.14t and 3.13t (free-threaded, ./configure --disable-gil) -- from Debian's
# source tarballs, and cache them outside the clone so that a second run on
# the same machine does not rebuild.
#
#   bash .ci/build_python.sh [3.14 3.14t 3.13t]     # default: all three
#
# Prints one line per interpreter: "<name> <path to its bin directory>".
# Under CI=true a failure to get an interpreter is an error, never a skip.
#
# Cache: $SQLA_SHIM_PYTHON_CACHE (default /var/cache/sqla-anyio-shim/cpython);
# each build lives in <cache>/<full version><t>/ and is used only once its
# "ok" stamp exists (a build interrupted half-way is redone).
set -euo pipefail

cache="${SQLA_SHIM_PYTHON_CACHE:-/var/cache/sqla-anyio-shim/cpython}"
mkdir -p "$cache"

# newest first; the mirror keeps only a few, so several are tried
versions_314="3.14.7 3.14.6 3.14.5 3.14.4"
versions_313="3.13.15 3.13.14 3.13.13 3.13.12 3.13.5"

# the mirror the machine's own apt sources name (their URIs: line): the
# Debian archive itself (path ending in /debian), not a third-party repository
# or the security archive
mirror="$( (grep -rhoE '^URIs: *\S+' /etc/apt/sources.list.d/ 2>/dev/null \
        | awk '{print $2}'; \
    grep -rhoE '^deb +(\[[^]]*\] +)?\S+' /etc/apt/sources.list 2>/dev/null \
        | awk '{print $NF}') | grep -E '/debian/?$' | head -1 || true)"
mirror="${mirror%/}"
if [ -z "$mirror" ]; then
    echo "build_python: no Debian archive found among the apt sources' URIs" >&2
    exit 1
fi

log() { echo "build_python: $*" >&2; }

ensure_build_deps() {
    local missing=()
    for p in build-essential libsqlite3-dev libssl-dev libffi-dev zlib1g-dev \
             libbz2-dev liblzma-dev libreadline-dev uuid-dev xz-utils curl; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        log "installing build dependencies: ${missing[*]}"
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
    fi
}

# build <minor> <freethreaded 0|1> -> echoes the bin dir
build() {
    local minor="$1" ft="$2" suffix="" candidates v
    [ "$ft" = 1 ] && suffix="t"
    case "$minor" in
        3.14) candidates="$versions_314" ;;
        3.13) candidates="$versions_313" ;;
        *) log "unknown version $minor"; return 1 ;;
    esac
    # a cached build of any candidate will do
    for v in $candidates; do
        if [ -f "$cache/$v$suffix/ok" ]; then
            echo "$cache/$v$suffix/bin"
            return 0
        fi
    done
    ensure_build_deps
    local work tarball=""
    work="$(mktemp -d /tmp/sqla-shim-cpython.XXXXXX)"
    for v in $candidates; do
        local url="$mirror/pool/main/p/python$minor/python${minor}_$v.orig.tar.xz"
        if curl -fsSL --retry 2 --max-time 300 -o "$work/src.tar.xz" "$url"; then
            tarball="$work/src.tar.xz"
            break
        fi
        log "not available: $url"
    done
    if [ -z "$tarball" ]; then
        rm -rf "$work"
        log "no source tarball of Python $minor found on $mirror (tried: $candidates)"
        return 1
    fi
    local prefix="$cache/$v$suffix"
    rm -rf "$prefix"
    log "building Python $v$suffix into $prefix (a few minutes)"
    # set -e does not apply inside a function called from an `if`: every
    # step checks its own status, so a failed build is never stamped "ok"
    fail() { log "$1"; rm -rf "$work" "$prefix"; return 1; }
    tar xJf "$tarball" -C "$work" || { fail "cannot unpack $url"; return 1; }
    local src
    src="$(find "$work" -maxdepth 1 -mindepth 1 -type d | head -1)"
    [ -n "$src" ] || { fail "no source tree in $url"; return 1; }
    local flags=(--prefix="$prefix" --with-ensurepip=install --without-doc-strings)
    [ "$ft" = 1 ] && flags+=(--disable-gil)
    (
        cd "$src"
        ./configure -q "${flags[@]}" >"$work/configure.log" 2>&1 \
            || { tail -30 "$work/configure.log" >&2; exit 1; }
        make -s -j"$(nproc)" >"$work/make.log" 2>&1 \
            || { tail -40 "$work/make.log" >&2; exit 1; }
        make -s install >"$work/install.log" 2>&1 \
            || { tail -40 "$work/install.log" >&2; exit 1; }
    ) || { fail "building Python $v$suffix failed (log above)"; return 1; }
    # tox looks for python3.14 / python3.14t
    if [ "$ft" = 1 ] && [ ! -e "$prefix/bin/python${minor}t" ]; then
        ln -s "python$minor" "$prefix/bin/python${minor}t"
    fi
    "$prefix/bin/python${minor}$suffix" -c "
import sys, sqlite3, ssl, ctypes, zlib
ft = bool(__import__('sysconfig').get_config_var('Py_GIL_DISABLED'))
assert ft == ($ft == 1), ('free-threaded build expected' if $ft else 'GIL build expected')
if ft:
    assert not sys._is_gil_enabled(), 'GIL is enabled in a free-threaded build'
print(sys.version)
" >&2 || { fail "the new Python $v$suffix does not work (see above)"; return 1; }
    touch "$prefix/ok"
    rm -rf "$work"
    echo "$prefix/bin"
}

want=("$@")
[ "${#want[@]}" -eq 0 ] && want=(3.14 3.14t 3.13t)
status=0
for name in "${want[@]}"; do
    minor="${name%t}"
    ft=0
    [ "$name" != "$minor" ] && ft=1
    if bin="$(build "$minor" "$ft")"; then
        echo "$name $bin"
    else
        log "FAILED to get Python $name"
        status=1
    fi
done
if [ "$status" -ne 0 ] && [ "${CI:-}" != "true" ]; then
    log "(not under CI: continuing without the missing interpreters)"
    status=0
fi
exit "$status"
