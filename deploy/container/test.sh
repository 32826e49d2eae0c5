#!/usr/bin/env bash
# Build the mertools image with podman and prove it end to end (not part of the test suite):
#   1. the base image localhost/mertools-base:bookworm (make-base.sh), unless it exists
#   2. podman build of the repository's Dockerfile on it
#   3. the trained fixture converted (q4_0) into a temporary layout, with the repository's venv
#   4. the container started: layout mounted read-only, host network with the server bound to 127.0.0.1 only,
#      an API key in MERTOOLS_API_KEY, a memory limit, all capabilities dropped
#   5. a bounded wait for /health 200; checks: the server's uid is not 0, the HEALTHCHECK passes, /layout is
#      read-only, mertools sees the memory limit, numba's kernels came from the image's cache, a request
#      without the key gets 401
#   6. a chat completion streamed through the official openai client (from the repository's venv)
#   7. the container and the temporary directories removed (trap); the image is kept
#
#   sudo deploy/container/test.sh
#
# Needs root, podman and debootstrap (installed with apt-get when missing), and the repository's .venv with
# mertools and openai installed (`make test` makes it). Environment:
#   MERTOOLS_IMAGE        tag to build (default localhost/mertools:test)
#   MERTOOLS_BASE_IMAGE   base to build on (default localhost/mertools-base:bookworm, made if missing); e.g.
#                         docker.io/library/python:3.11-slim-bookworm where Docker Hub is reachable
#   MERTOOLS_TEST_TIMEOUT seconds to wait for /health (default 600)
#   MERTOOLS_TEST_NICE    niceness of the build and the server (default 10: the machine is shared)
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST: passed to the build (else the host pip's settings,
#                         file:// indexes left out); PIP_CERT (else the host's CA bundle): the build secret pip_cert
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
IMAGE=${MERTOOLS_IMAGE:-localhost/mertools:test}
BASE_IMAGE=${MERTOOLS_BASE_IMAGE:-localhost/mertools-base:bookworm}
TIMEOUT=${MERTOOLS_TEST_TIMEOUT:-600}
VENV_PY=$REPO/.venv/bin/python
FIXTURE=$REPO/fixtures/trained/tiny-shakespeare-moe

say() { printf 'test.sh: %s\n' "$*" >&2; }
die() { say "FAILED: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "needs root (podman build/run, debootstrap)"
[[ -x $VENV_PY && -x $REPO/.venv/bin/mertools ]] || die "no $REPO/.venv with mertools (run make test first)"
"$VENV_PY" -c 'import openai' 2>/dev/null || die "the openai client is not in $REPO/.venv (pip install openai)"
renice -n "${MERTOOLS_TEST_NICE:-10}" -p $$ >/dev/null

need=()
command -v podman >/dev/null || need+=(podman)
command -v debootstrap >/dev/null || need+=(debootstrap)
if ((${#need[@]})); then
    say "installing ${need[*]} with apt-get"
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >&2
fi

# podman settings for this kind of host, in a temporary containers.conf (see common.sh)
# shellcheck source=deploy/container/common.sh
. "$HERE/common.sh"

NAME=mertools-test-$$
WORK=$(mktemp -d /tmp/mertools-container-test.XXXXXX)
cleanup() {
    local rc=$?
    if podman container exists "$NAME" 2>/dev/null; then
        if ((rc != 0)); then
            say "container log (last 40 lines):"
            podman logs --tail 40 "$NAME" >&2 2>&1 || true
        fi
        podman rm -f -t 10 "$NAME" >/dev/null 2>&1 || true
    fi
    rm -rf "$WORK" "$MERTOOLS_PODMAN_CONF_DIR"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------------------------------------------ 1. base
if [[ $BASE_IMAGE == localhost/mertools-base:* ]] && ! podman image exists "$BASE_IMAGE"; then
    say "building the base image $BASE_IMAGE (debootstrap)"
    MERTOOLS_BASE_IMAGE=$BASE_IMAGE "$HERE/make-base.sh" >&2
fi

# ------------------------------------------------------------------------------------------------ 2. image
# pip's registry as the host's pip reaches it: environment first, else pip's own configuration; file:// indexes
# are local to the host and left out. The host's CA bundle (a TLS-intercepting proxy's CA may be in it) goes
# in as a build secret, never into a layer. --network host: RUN steps resolve and connect as the host does
# (podman passes the host's http(s)_proxy variables on by itself).
pip_setting() {  # $1: env name, $2: pip config key
    local v=${!1:-}
    [[ -n $v ]] || v=$("$VENV_PY" -m pip config get "$2" 2>/dev/null || true)
    local out=() u
    for u in $v; do [[ $u == file:* ]] || out+=("$u"); done
    echo "${out[*]}"
}
build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
for pair in PIP_INDEX_URL:global.index-url PIP_EXTRA_INDEX_URL:global.extra-index-url \
            PIP_TRUSTED_HOST:global.trusted-host; do
    v=$(pip_setting "${pair%%:*}" "${pair#*:}")
    [[ -z $v ]] || build_args+=(--build-arg "${pair%%:*}=$v")
done
cert=${PIP_CERT:-$("$VENV_PY" -m pip config get global.cert 2>/dev/null || true)}
[[ -n $cert && -r $cert ]] || cert=/etc/ssl/certs/ca-certificates.crt
[[ -r $cert ]] && build_args+=(--secret "id=pip_cert,src=$cert")

say "podman build -t $IMAGE (base $BASE_IMAGE); log: $WORK/build.log"
t0=$(date +%s)
if ! podman build --format docker --network host "${build_args[@]}" -t "$IMAGE" -f "$REPO/Dockerfile" "$REPO" \
        >"$WORK/build.log" 2>&1; then
    tail -n 40 "$WORK/build.log" >&2
    die "podman build"
fi
build_s=$(($(date +%s) - t0))
image_size=$(podman image inspect "$IMAGE" --format '{{.Size}}')
image_mb=$(awk -v b="$image_size" 'BEGIN { printf "%.0f", b / 1e6 }')
say "built in ${build_s} s: $IMAGE, $image_mb MB"
[[ $(podman image inspect "$IMAGE" --format '{{.Config.Healthcheck}}') == *mertools-healthcheck* ]] \
    || die "the image has no HEALTHCHECK (build with --format docker)"

# ------------------------------------------------------------------------------------------------ 3. layout
LAYOUT=$WORK/tiny-shakespeare-moe-q4_0
say "mertools convert $FIXTURE -> $LAYOUT (q4_0)"
"$REPO/.venv/bin/mertools" convert "$FIXTURE" "$LAYOUT" --dtype q4_0 >"$WORK/convert.log" 2>&1 \
    || { cat "$WORK/convert.log" >&2; die "mertools convert"; }
chmod -R a+rX "$WORK"  # the container's user (uid 10001) reads it
layout_mb=$(du -sm "$LAYOUT" | cut -f1)

# ------------------------------------------------------------------------------------------------ 4. run
PORT=$("$VENV_PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
MERTOOLS_API_KEY=$("$VENV_PY" -c 'import secrets; print(secrets.token_hex(16))')
export MERTOOLS_API_KEY
say "podman run $NAME: /layout read-only, 127.0.0.1:$PORT (host network), --cache-mb 1, --memory 1g"
t0=$(date +%s.%N)
# --host 127.0.0.1: with the host's network the server must not listen on the host's other addresses.
# --cgroupns private: on a cgroup v1 host the container otherwise sees its host cgroup path in /proc/self/cgroup,
# which does not exist under its /sys/fs/cgroup, and mertools would size its memory by the host's, not the limit
podman run -d --name "$NAME" --network host \
    -v "$LAYOUT:/layout:ro" -e MERTOOLS_API_KEY \
    --memory 1g --cgroupns private --cap-drop ALL --security-opt no-new-privileges \
    "$IMAGE" /layout --host 127.0.0.1 --port "$PORT" --cache-mb 1 --model-name tiny-shakespeare \
    >"$WORK/run.log" 2>&1 || { cat "$WORK/run.log" >&2; die "podman run"; }
# podman schedules periodic health checks with systemd timers; without systemd it says so (an error line) and
# runs them only when asked (`podman healthcheck run`, below)

# ------------------------------------------------------------------------------------------------ 5. health
say "waiting for http://127.0.0.1:$PORT/health (at most $TIMEOUT s)"
status=none
deadline=$(($(date +%s) + TIMEOUT))
while (($(date +%s) < deadline)); do
    [[ $(podman inspect "$NAME" --format '{{.State.Running}}') == true ]] || die "the container stopped"
    status=$("$VENV_PY" - "$PORT" <<'EOF'
import sys, urllib.error, urllib.request
try:
    print(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=5).status)
except urllib.error.HTTPError as e:
    print(e.code)
except OSError:
    print("down")
EOF
)
    [[ $status == 200 ]] && break
    sleep 0.5
done
[[ $status == 200 ]] || die "/health did not answer 200 within $TIMEOUT s (last: $status)"
healthy_s=$("$VENV_PY" -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$t0")
say "healthy after $healthy_s s"

pid=$(podman inspect "$NAME" --format '{{.State.Pid}}')
uid=$(awk '/^Uid:/ { print $2 }' "/proc/$pid/status")
user=$(podman exec "$NAME" id)
[[ $uid != 0 ]] || die "the server runs as root"
say "server process: uid $uid; podman exec id: $user"

podman healthcheck run "$NAME" >"$WORK/health.log" 2>&1 || { cat "$WORK/health.log" >&2; die "podman healthcheck run"; }
health=$(podman inspect "$NAME" --format '{{.State.Health.Status}}' 2>/dev/null \
    || podman inspect "$NAME" --format '{{.State.Healthcheck.Status}}')
[[ $health == healthy ]] || die "HEALTHCHECK status: $health"
say "HEALTHCHECK: $health"

if podman exec "$NAME" sh -c ': >/layout/probe' 2>/dev/null; then die "/layout is writable"; fi
say "/layout is read-only"

seen_mb=$(podman exec "$NAME" python3 -c 'from mertools.runtime.memory import total_bytes; print(total_bytes() >> 20)')
((seen_mb <= 1024)) || die "mertools sees $seen_mb MiB of memory, not the 1 GiB limit"
say "mertools sees the memory limit: $seen_mb MiB"

# ------------------------------------------------------------------------------------------------ 6. stream
"$VENV_PY" - "$PORT" >"$WORK/stream.txt" 2>"$WORK/stream.err" <<'EOF' || { cat "$WORK/stream.err" >&2; die "streamed chat completion"; }
import os, sys, time
import httpx
import openai

base = f"http://127.0.0.1:{sys.argv[1]}/v1"
# the key is required: a request without it is refused
r = httpx.get(base + "/models", timeout=10)
assert r.status_code == 401, f"GET /v1/models without a key: {r.status_code}"
client = openai.OpenAI(base_url=base, api_key=os.environ["MERTOOLS_API_KEY"], timeout=120, max_retries=0)
model = client.models.list().data[0].id
t0 = time.monotonic()
first = None
chunks = 0
finish = None
stream = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "ROMEO:"}], max_tokens=48, temperature=0, stream=True)
for chunk in stream:
    if not chunk.choices:
        continue
    choice = chunk.choices[0]
    if choice.delta.content:
        first = first or time.monotonic()
        chunks += 1
        sys.stdout.write(choice.delta.content)
        sys.stdout.flush()
    finish = choice.finish_reason or finish
took = time.monotonic() - t0
assert chunks > 0, "no text streamed"
print(f"model {model}: {chunks} chunks, first after {first - t0:.2f} s, all in {took:.2f} s, "
      f"finish {finish}", file=sys.stderr)
EOF
say "streamed chat completion: $(cat "$WORK/stream.err")"

mem=$(podman stats --no-stream --format '{{.MemUsage}}' "$NAME" 2>/dev/null || echo "n/a")

# numba's cache: the kernels were compiled into the image on this CPU, so the server should only have loaded
# them; a recompile writes .nbi/.nbc files into the container's layer (podman diff lists them)
written=$(podman diff "$NAME" 2>/dev/null | grep -c '^[AC] /var/cache/mertools/numba/.*\.nb[ic]$' || true)
if ((written == 0)); then
    numba_note="loaded from the image's cache (no kernel recompiled)"
else
    numba_note="$written cache files written: kernels recompiled (a CPU other than the build's?)"
    say "WARNING: numba $numba_note"
fi

# ------------------------------------------------------------------------------------------------ summary
stop_t0=$(date +%s.%N)
podman stop -t 30 "$NAME" >/dev/null 2>>"$WORK/podman.log"
stop_s=$("$VENV_PY" -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$stop_t0")
exit_code=$(podman inspect "$NAME" --format '{{.State.ExitCode}}')

cat <<SUMMARY

== mertools container test: PASSED ==
image          $IMAGE ($image_mb MB), base $BASE_IMAGE, built in $build_s s
layout         tiny-shakespeare-moe q4_0 ($layout_mb MiB), mounted read-only at /layout
server         uid $uid (non-root), 127.0.0.1:$PORT, --cache-mb 1; --memory 1g (mertools sees $seen_mb MiB), in use: $mem
healthy after  $healthy_s s (GET /health 200); HEALTHCHECK: $health
numba kernels  $numba_note
API key        required (401 without it)
stream         $(cat "$WORK/stream.err")
stopped        podman stop in $stop_s s, exit code $exit_code
streamed text:
$(cat "$WORK/stream.txt")
SUMMARY
