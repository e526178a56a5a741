#!/usr/bin/env bash
# Build an image of one Debian package's server with no container registry: debootstrap a
# minimal bookworm with the package on the host (from the mirror in the host's apt
# sources), then `docker import` that root filesystem with the image's user, entrypoint,
# ports and volume. Nothing is downloaded inside a container.
#
#   deploy/offline/build-debian-image.sh redis        # actfleet/redis:bookworm
#   deploy/offline/build-debian-image.sh prometheus   # actfleet/prometheus:bookworm
#
# Each image behaves like its registry counterpart as docker-compose.yml uses it:
#   redis       `redis-server ...` and `redis-cli` on PATH, user redis, /data its volume
#               (the official redis:7 image's layout)
#   prometheus  ENTRYPOINT prometheus, promtool on PATH, user prometheus, /prometheus its
#               volume, /etc/prometheus for the configuration (prom/prometheus's layout)
#
# Idempotent: an image built by this same script is kept (its label actfleet.build-hash is
# a hash of the script and the image's name); the root filesystem is kept in
# $ACTFLEET_BUILD_CACHE and reused while that hash holds. FORCE=1 rebuilds both.
#
# Environment: ACTFLEET_BUILD_CACHE (default /var/cache/actfleet-build), DEBIAN_MIRROR
# (default: read from the apt sources), ACTFLEET_REDIS_IMAGE / ACTFLEET_PROMETHEUS_IMAGE
# (the tags; defaults above), FORCE=1.
set -euo pipefail

what="${1:-}"
cache="${ACTFLEET_BUILD_CACHE:-/var/cache/actfleet-build}"
force="${FORCE:-0}"

say() { printf '[build-debian-image] %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

case "$what" in
    redis)
        image="${ACTFLEET_REDIS_IMAGE:-actfleet/redis:bookworm}"
        packages="redis-server"
        user="redis"
        data="/data"
        changes=(
            --change 'EXPOSE 6379'
            --change 'VOLUME /data'
            --change 'WORKDIR /data'
            --change 'USER redis'
            --change 'CMD ["redis-server"]'
        )
        ;;
    prometheus)
        image="${ACTFLEET_PROMETHEUS_IMAGE:-actfleet/prometheus:bookworm}"
        packages="prometheus"
        user="prometheus"
        data="/prometheus"
        changes=(
            --change 'EXPOSE 9090'
            --change 'VOLUME /prometheus'
            --change 'WORKDIR /prometheus'
            --change 'USER prometheus'
            --change 'ENTRYPOINT ["/usr/bin/prometheus"]'
            --change 'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]'
        )
        ;;
    *)
        echo "usage: $0 redis|prometheus" >&2
        exit 2
        ;;
esac

# The Debian mirror this machine's apt already uses (deb822 or one-line format); the same
# lookup as sandbox_images/build.sh.
debian_mirror() {
    if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
    local f uri
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        uri="$(awk '
            /^[[:space:]]*$/ { if (uri != "" && suite ~ /(^| )bookworm( |$)/) { print uri; exit } uri=""; suite="" ; next }
            /^URIs:/ { uri=$2 }
            /^Suites:/ { $1=""; suite=$0 " " }
            END { if (uri != "" && suite ~ /(^| )bookworm( |$)/) print uri }
        ' "$f" | head -n 1)"
        if [ -n "$uri" ]; then echo "$uri"; return; fi
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        uri="$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' "$f")"
        if [ -n "$uri" ]; then echo "$uri"; return; fi
    done
    say "no Debian mirror found in the apt sources; set DEBIAN_MIRROR"; exit 1
}

build_hash="$( { cat "${BASH_SOURCE[0]}"; echo "$what $packages"; } | sha256sum | cut -c1-32)"
if [ "$force" != 1 ] && [ "$(docker image inspect --format '{{index .Config.Labels "actfleet.build-hash"}}' "$image" 2>/dev/null)" = "$build_hash" ]; then
    say "$image is up to date ($build_hash)"
    exit 0
fi
command -v debootstrap >/dev/null || { say "debootstrap is missing (apt-get install debootstrap)"; exit 1; }

rootfs="$cache/$what-rootfs"
debs="$cache/debootstrap-debs-$what"  # its own: builds of both images may run at once
mkdir -p "$cache" "$debs"
if [ "$force" = 1 ] || [ "$(cat "$rootfs/.actfleet-complete" 2>/dev/null)" != "$build_hash" ]; then
    mirror="$(debian_mirror)"
    say "debootstrap bookworm (minbase + $packages) from the apt mirror into $rootfs"
    as_root rm -rf "$rootfs"
    as_root debootstrap --variant=minbase --include="$packages" --cache-dir="$debs" \
        bookworm "$rootfs" "$mirror" >"$cache/$what-debootstrap.log" 2>&1 \
        || { tail -n 30 "$cache/$what-debootstrap.log" >&2; exit 1; }
    # What a server container never needs: apt lists and caches, docs, man pages.
    as_root rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
        "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/*
    # The data directory, owned by the server's user, so that a new named volume mounted
    # there inherits the ownership (Docker copies it from the image).
    as_root chroot "$rootfs" sh -c "mkdir -p '$data' && chown '$user:$user' '$data'"
    if [ "$what" = prometheus ]; then
        # Debian's package ships an example configuration; the compose file mounts its own.
        as_root chroot "$rootfs" sh -c "mkdir -p /etc/prometheus && chown -R '$user:$user' /etc/prometheus"
    fi
    echo "$build_hash" | as_root tee "$rootfs/.actfleet-complete" >/dev/null
fi

say "docker import $image"
as_root tar -C "$rootfs" --exclude=./.actfleet-complete -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change "LABEL actfleet.build-hash=$build_hash" \
    "${changes[@]}" - "$image" >/dev/null
say "built $image"
