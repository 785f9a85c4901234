#!/usr/bin/env bash
# `make docker-test` (not part of CI): build the Dockerfile with podman and run a smoke test inside the
# image: `dist-ssl --help`, digits `shards write` and a 20-step fixmatch run, as the image's user.
#
# No registry of images is reachable here, so the base is made locally: a debootstrap'd Debian
# bookworm (python3 follows PEP 668 there, as on Ubuntu-based CUDA images) with torch and torchvision
# in its system site-packages, standing in for a CUDA PyTorch image. It is built once (about 6 GB)
# and reused. Storage is overlay through fuse-overlayfs: vfs copies the whole 6 GB root for every
# layer and filled the disk. Needs root, debootstrap, podman and fuse-overlayfs (Debian packages).
#
#   DOCKER_TEST_DIR   where podman's storage and the base's root live (default /var/tmp/dist-ssl-docker)
#   PIP_CERT          CA bundle pip must trust inside the builds (default: this machine's, when present)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${DOCKER_TEST_DIR:-/var/tmp/dist-ssl-docker}
PODMAN=(podman --root "$WORK/storage" --runroot "$WORK/run" --storage-driver overlay
        --storage-opt overlay.mount_program=/usr/bin/fuse-overlayfs)
BASE=localhost/dist-ssl-base:bookworm
IMAGE=localhost/dist-ssl:test
CERT=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
mkdir -p "$WORK/tmp"
export TMPDIR=$WORK/tmp  # podman import stages the whole 6 GB tarball there, twice
started=$(date +%s)

build_base() {
    local root=$WORK/rootfs
    # The root is kept until its import succeeds: an import stopped half-way (7 minutes, 6 GB) resumes
    # from it instead of from debootstrap.
    if [ ! -f "$WORK/rootfs.done" ]; then  # not `|| make_root`: errexit is off in such a call
        make_root "$root"
    fi
    echo "docker-test: base root $(du -sh "$root" | cut -f1), importing it" >&2
    tar -C "$root" -c . | "${PODMAN[@]}" import --change 'CMD ["/bin/bash"]' - "$BASE"
    rm -rf "$root" "$WORK/rootfs.done"
}

make_root() {
    local root=$1
    rm -rf "$root"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" http://deb.debian.org/debian
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    mount -t proc proc "$root/proc"
    if [ -f "$CERT" ]; then mount --bind -o ro "$CERT" "$root/etc/ssl/certs/ca-certificates.crt"; fi
    trap 'umount "$root/etc/ssl/certs/ca-certificates.crt" "$root/proc" 2>/dev/null || true' EXIT
    # pip from a throw-away venv writes into the system site (--target): a PEP 668 Python refuses its
    # own pip there, and CUDA PyTorch images keep torch in the system Python too.
    chroot "$root" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root PIP_CERT=/etc/ssl/certs/ca-certificates.crt sh -c '
        python3 -m venv /tmp/pip && /tmp/pip/bin/pip install -q --no-cache-dir --target /usr/local/lib/python3.11/dist-packages \
            "torchvision>=0.29" && rm -rf /tmp/pip'
    umount "$root/etc/ssl/certs/ca-certificates.crt" 2>/dev/null || true
    umount "$root/proc"
    trap - EXIT
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root/etc/resolv.conf"
    touch "$WORK/rootfs.done"
}

if ! "${PODMAN[@]}" image exists "$BASE"; then
    build_base
    echo "docker-test: base image built in $(( ($(date +%s) - started) / 60 )) min" >&2
fi
[ "${1:-}" = "--base-only" ] && exit 0

built=$(date +%s)
cert_args=()
[ -f "$CERT" ] && cert_args=(--volume "$CERT:/etc/pip-ca.crt:ro" --build-arg PIP_CERT=/etc/pip-ca.crt)
# --isolation chroot: crun cannot run build steps here ("cgroups in hybrid mode not supported").
"${PODMAN[@]}" build --isolation chroot --build-arg BASE_IMAGE="$BASE" "${cert_args[@]}" -t "$IMAGE" .
echo "docker-test: image built in $(( $(date +%s) - built )) s; $("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1 / 1e9}') (base $("${PODMAN[@]}" image inspect --format '{{.Size}}' "$BASE" | awk '{printf "%.2f GB", $1 / 1e9}'))" >&2

SMOKE='set -e
dist-ssl --help > /dev/null
dist-ssl shards write digits --out /app/shards/digits-5pc --labels-per-class 5
dist-ssl train configs/digits/fixmatch.yaml data.shards=/app/shards/digits-5pc train.output_dir=/app/runs/smoke \
    train.epochs=1 train.steps_per_epoch=20 train.log_every_steps=5
dist-ssl report /app/runs/smoke
test "$(id -u)" != 0'
# podman run, as the image's user; where this machine does not let it set up a container (rlimits,
# cgroups), the same commands run by chroot into the container's mounted root, as that user.
# Limits within the host's own: crun cannot raise RLIMIT_NOFILE/NPROC here. --shm-size as the docs
# say for training: DataLoader workers pass batches through /dev/shm, 64 MB by default in a container.
if "${PODMAN[@]}" run --rm --shm-size=1g --ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit nproc=4096:4096 --entrypoint /bin/sh "$IMAGE" -c "$SMOKE"; then
    echo "docker-test: smoke run inside the image (podman run) passed" >&2
else
    echo "docker-test: podman run failed here; running the smoke test by chroot into the container instead" >&2
    container=$("${PODMAN[@]}" create "$IMAGE")
    root=$("${PODMAN[@]}" mount "$container")
    # What a container runtime would give it: /proc, the usual device files and a shared-memory tmpfs
    # (DataLoader workers). Files bound one by one, never `--rbind /dev`: unmounting an rbind's
    # submounts can propagate to the host's /dev/pts and /dev/shm.
    mounted=("$root/proc")
    mount -t proc proc "$root/proc"
    mkdir -p "$root/dev/shm" && mount -t tmpfs -o mode=1777 shm "$root/dev/shm" && mounted+=("$root/dev/shm")
    # Bound over the image's own nodes too: a fuse-overlayfs mount is nodev, its /dev/null refuses opening.
    for device in null zero full random urandom tty; do
        [ -e "$root/dev/$device" ] || touch "$root/dev/$device"
        mount --bind "/dev/$device" "$root/dev/$device" && mounted+=("$root/dev/$device")
    done
    trap 'for m in "${mounted[@]}"; do umount "$m"; done; "${PODMAN[@]}" umount "$container" >/dev/null; "${PODMAN[@]}" rm "$container" >/dev/null' EXIT
    uid=$("${PODMAN[@]}" image inspect --format '{{.Config.User}}' "$IMAGE")
    chroot --userspec="$(chroot "$root" id -u "$uid"):$(chroot "$root" id -g "$uid")" "$root" /usr/bin/env -i \
        HOME=/home/dist-ssl PATH=/opt/dist-ssl/bin:/usr/local/bin:/usr/bin:/bin VIRTUAL_ENV=/opt/dist-ssl PYTHONUNBUFFERED=1 \
        /bin/sh -c "cd /app && $SMOKE"
    echo "docker-test: smoke run inside the image (chroot) passed" >&2
fi
echo "docker-test: done in $(( ($(date +%s) - started) / 60 )) min" >&2
