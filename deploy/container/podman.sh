#!/usr/bin/env bash
# podman with the settings of common.sh (runtime runc, ulimits within the inherited hard limits, cgroupfs, events
# in a file), for running the image by hand on a host of the kind test.sh runs on:
#   deploy/container/podman.sh run -d --name mertools -p 127.0.0.1:8000:8000 -v /srv/layout:/layout:ro \
#       -e MERTOOLS_API_KEY localhost/mertools:latest
# On an ordinary host plain podman (or docker) needs none of this.
set -euo pipefail
# shellcheck source=deploy/container/common.sh
. "$(dirname "$0")/common.sh"
trap 'rm -rf "$MERTOOLS_PODMAN_CONF_DIR"' EXIT
podman "$@"
