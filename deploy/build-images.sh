#!/bin/sh
# Builds the images of deploy/Containerfile (server and bot) and the stand-in S3 server (deploy/s3),
# and makes sure a PostgreSQL image is there, with podman (`make images`; run from the repository root). Prints at the end the lines to
# put in deploy/.env so that deploy/compose.yaml uses them.
#
# Works out from the host, where nothing is set:
#   - BASE_IMAGE (python:3.11-slim-bookworm): pulled; when no registry answers, a stand-in is built
#     from Debian's packages (deploy/base/build-base.sh; needs root and debootstrap).
#   - POSTGRES_IMAGE (postgres:16): pulled; else built from Debian's packages (deploy/postgres).
#   - TORCH_INDEX: PyTorch's CPU wheel index when it answers, else "none" (pip's default sources);
#     give https://download.pytorch.org/whl/cu128 (or another CUDA version) for a CUDA server image.
#   - pip's local wheel folder (find-links) and CA bundle, when this host's pip uses them: mounted
#     into the build, read-only, so that pip in the build uses the same sources as pip here.
#   - CONTAINERS_CONF: on hosts where podman cannot set its default rlimits (a sandbox), a
#     containers.conf with lower ones (deploy/podman/containers.conf); printed with the rest.
set -eu
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
BASE_IMAGE=${BASE_IMAGE:-docker.io/library/python:3.11-slim-bookworm}
LOCAL_BASE_IMAGE=localhost/imagine-python:3.11-bookworm
POSTGRES_IMAGE=${POSTGRES_IMAGE:-docker.io/library/postgres:16}
LOCAL_POSTGRES_IMAGE=localhost/imagine-postgres:15
SERVER_IMAGE=${SERVER_IMAGE:-localhost/imagine-server:latest}
BOT_IMAGE=${BOT_IMAGE:-localhost/imagine-bot:latest}
S3_IMAGE=${S3_IMAGE:-localhost/imagine-s3:latest}
CPU_INDEX=https://download.pytorch.org/whl/cpu

# Each line says how long the build has run (seconds), so a slow step shows.
t0=$(date +%s)
say() { echo "build-images: [$(($(date +%s) - t0)) s] $*" >&2; }

have_image() { podman image exists "$1"; }
pull() { have_image "$1" || podman pull -q "$1" >/dev/null 2>&1; }

if pull "$BASE_IMAGE"; then
    say "base image $BASE_IMAGE"
else
    say "cannot pull $BASE_IMAGE: building a stand-in from Debian's packages"
    sh deploy/base/build-base.sh "$LOCAL_BASE_IMAGE" >&2
    BASE_IMAGE=$LOCAL_BASE_IMAGE
fi

# -- podman's rlimits ------------------------------------------------------------------------------------
if [ -z "${CONTAINERS_CONF:-}" ] && ! podman run --rm "$BASE_IMAGE" true >/dev/null 2>&1; then
    if CONTAINERS_CONF=deploy/podman/containers.conf podman run --rm "$BASE_IMAGE" true >/dev/null 2>&1; then
        CONTAINERS_CONF=$(pwd)/deploy/podman/containers.conf
        export CONTAINERS_CONF
        say "podman cannot raise the default rlimits here: using $CONTAINERS_CONF"
    else
        say "podman cannot run a container from $BASE_IMAGE:"
        podman run --rm "$BASE_IMAGE" true >&2 || true
        exit 1
    fi
fi

# -- where pip finds torch -------------------------------------------------------------------------------
build_args=""
if [ -z "${TORCH_INDEX:-}" ]; then
    if "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=3)' "$CPU_INDEX/torch/" \
        >/dev/null 2>&1; then
        TORCH_INDEX=$CPU_INDEX
    else
        TORCH_INDEX=none
        say "$CPU_INDEX is unreachable: pip in the build uses PyPI and this host's pip sources"
    fi
fi
say "server image torch from: $TORCH_INDEX"
wheels=${PIP_FIND_LINKS:-$("$PYTHON" -m pip config get global.find-links 2>/dev/null || true)}
if [ -n "$wheels" ] && [ -d "$wheels" ]; then
    say "pip's local wheels $wheels mounted into the build"
    build_args="$build_args -v $wheels:/run/wheels:ro --build-arg WHEELS_DIR=/run/wheels"
fi
cert=${PIP_CERT:-$("$PYTHON" -m pip config get global.cert 2>/dev/null || true)}
if [ -n "$cert" ] && [ -f "$cert" ]; then
    say "pip's CA bundle $cert mounted into the build"
    build_args="$build_args -v $cert:/run/ca-bundle.pem:ro --build-arg CA_BUNDLE=/run/ca-bundle.pem"
fi

# -- the images ------------------------------------------------------------------------------------------
for target in server bot; do
    tag=$([ "$target" = server ] && echo "$SERVER_IMAGE" || echo "$BOT_IMAGE")
    say "building $tag (target $target)"
    # shellcheck disable=SC2086 # build_args holds several words on purpose
    podman build -q -f deploy/Containerfile --target "$target" --build-arg BASE_IMAGE="$BASE_IMAGE" \
        --build-arg TORCH_INDEX="$TORCH_INDEX" $build_args -t "$tag" . >/dev/null
done

if pull "$POSTGRES_IMAGE"; then
    say "PostgreSQL image $POSTGRES_IMAGE"
else
    say "cannot pull $POSTGRES_IMAGE: building $LOCAL_POSTGRES_IMAGE from Debian's packages"
    podman build -q -f deploy/postgres/Containerfile --build-arg BASE_IMAGE="$BASE_IMAGE" \
        -t "$LOCAL_POSTGRES_IMAGE" deploy/postgres >/dev/null
    POSTGRES_IMAGE=$LOCAL_POSTGRES_IMAGE
fi

# moto's S3 server for the compose file's `s3` service (production uses a real store: deploy/s3).
say "building $S3_IMAGE (deploy/s3)"
# shellcheck disable=SC2086
podman build -q -f deploy/s3/Containerfile --build-arg BASE_IMAGE="$BASE_IMAGE" $build_args \
    -t "$S3_IMAGE" deploy/s3 >/dev/null

say "done"
for image in "$SERVER_IMAGE" "$BOT_IMAGE" "$POSTGRES_IMAGE" "$S3_IMAGE"; do
    say "$image: $(podman image inspect --format '{{.Size}}' "$image" | awk '{printf "%d MB", $1/1e6}')"
done
echo "SERVER_IMAGE=$SERVER_IMAGE"
echo "BOT_IMAGE=$BOT_IMAGE"
echo "POSTGRES_IMAGE=$POSTGRES_IMAGE"
echo "S3_IMAGE=$S3_IMAGE"
if [ -n "${CONTAINERS_CONF:-}" ]; then
    echo "CONTAINERS_CONF=$CONTAINERS_CONF"
fi
