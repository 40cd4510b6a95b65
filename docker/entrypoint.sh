#!/bin/sh
# Entrypoint of the captioner images (Dockerfile, docker/Dockerfile.cpu).
#
# Before the service starts, check that the model bundle (CAPTIONER_BUNDLE, /models/default in the
# images) is there and readable by this user, so that a missing volume or a permission problem
# stops the container at once with one clear line and exit status 3, the status the service uses
# for a bundle that cannot load. The service checks everything else itself (settings such as
# CAPTIONER_DEVICE, the manifest, checksums, the ONNX graphs) and exits non-zero with its own
# message. Then `exec` the command, so the service is PID 1 and receives SIGTERM directly.
set -eu

fail() {
    echo "captioner: cannot start: $*" >&2
    exit 3
}

check_bundle() {
    bundle="${CAPTIONER_BUNDLE:-models/default}"
    uid="$(id -u)"
    mount_hint="mount a model bundle folder there read-only (docker compose: set CAPTIONER_BUNDLE_DIR=/path/to/bundle; docker run: -v /path/to/bundle:${bundle}:ro)"
    perm_hint="the bundle must be readable by uid ${uid} (e.g. chmod -R a+rX on the host folder)"

    [ -e "$bundle" ] || fail "model bundle not found: ${bundle} (CAPTIONER_BUNDLE) does not exist; ${mount_hint}"
    [ -d "$bundle" ] || fail "model bundle ${bundle} (CAPTIONER_BUNDLE) is not a folder; ${mount_hint}"
    if [ ! -r "$bundle" ] || [ ! -x "$bundle" ]; then
        fail "model bundle ${bundle} is not readable (mode $(stat -c %a "$bundle"), owner uid $(stat -c %u "$bundle")); ${perm_hint}"
    fi
    if [ ! -e "$bundle/manifest.json" ]; then
        if [ -z "$(ls -A "$bundle")" ]; then
            fail "model bundle ${bundle} is an empty folder: the bundle volume is missing or its host folder is empty; ${mount_hint}"
        fi
        fail "${bundle} is not a model bundle: it has no manifest.json (see docs/bundle-format.md)"
    fi
    for file in "$bundle"/*; do
        [ -r "$file" ] || fail "model bundle file ${file} is not readable (mode $(stat -c %a "$file"), owner uid $(stat -c %u "$file")); ${perm_hint}"
    done
}

if [ "$#" -eq 0 ]; then
    set -- python -m app.cli serve
fi

# Only the service needs the bundle; `docker run IMAGE sh` and the like start without the check.
case " $* " in
    *" serve "* | *uvicorn*) check_bundle ;;
esac

exec "$@"
