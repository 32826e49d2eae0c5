# shellcheck shell=bash
# Sourced by make-base.sh, test.sh and podman.sh: the podman settings these scripts need, kept out of the system.
#
# It writes a containers.conf into a temporary directory and exports CONTAINERS_CONF, so that every podman
# command of the script that sourced it (and podman build's RUN steps) uses it; /etc/containers is not touched.
# Each setting is what a machine of this kind (Debian 12 in a VM, root, no systemd, cgroup v1 with a cgroup2
# hierarchy beside it) needs, and is harmless on an ordinary host:
#   runtime = "runc"         crun 1.8 refuses to start any container on a cgroup v1/v2 hybrid whose v2 hierarchy
#                            has a controller ("cgroups in hybrid mode not supported, drop all controllers from
#                            cgroupv2"; here hugetlb is there); runc runs them, memory limits included.
#   default_ulimits          podman asks for nofile=1048576 and nproc=1048576 by default, and lowers its own
#                            nproc to 32768 first; without CAP_SYS_RESOURCE (absent here) the runtime cannot raise
#                            a limit past the hard one it inherited ("setrlimit RLIMIT_NOFILE: Operation not
#                            permitted"), so ask for the hard limits podman itself runs with.
#   cgroup_manager cgroupfs  no systemd (PID 1 is not systemd here).
#   events_logger file       no journald.
#   cgroupns = "private"     on cgroup v1 a container in the host's cgroup namespace reads its host cgroup path in
#                            /proc/self/cgroup, which is absent under its own /sys/fs/cgroup: mertools then sizes
#                            its memory by the host's instead of the container's limit (podman's v2 default).
# STORAGE_DRIVER (podman's own variable, e.g. vfs) overrides the storage driver; overlay works here.
#
# The caller removes "$MERTOOLS_PODMAN_CONF_DIR" when it is done (test.sh's trap does).

mertools_podman_setup() {
    local nofile nproc
    if ! command -v runc >/dev/null; then
        echo "common.sh: installing runc with apt-get" >&2
        apt-get update -q >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q runc >&2
    fi
    nofile=$(ulimit -Hn)
    nproc=$(ulimit -Hu)
    if [[ $nofile == unlimited ]] || ((nofile > 1048576)); then nofile=1048576; fi
    if [[ $nproc == unlimited ]] || ((nproc > 32768)); then nproc=32768; fi
    MERTOOLS_PODMAN_CONF_DIR=$(mktemp -d /tmp/mertools-podman-conf.XXXXXX)
    cat >"$MERTOOLS_PODMAN_CONF_DIR/containers.conf" <<CONF
[containers]
cgroupns = "private"
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
    export CONTAINERS_CONF="$MERTOOLS_PODMAN_CONF_DIR/containers.conf"
}

mertools_podman_setup
