#!/bin/sh
# portfwd on a Kubernetes node, run by the DaemonSet in daemonset.yaml:
#
#   portfwd-node.sh run        install the CNI plugin, switch the node's CNI
#                              configuration from portmap to portfwd, bring
#                              portfwd up; then keep doing so every
#                              $PORTFWD_INTERVAL seconds (a network provider
#                              may rewrite its conflist; `portfwd up` also
#                              refreshes the host addresses wildcard mappings
#                              serve), while `portfwd serve` runs the port
#                              holder and the metrics. Exits on SIGTERM,
#                              leaving everything in place: forwarding needs
#                              no running process.
#   portfwd-node.sh once       the same, once.
#   portfwd-node.sh uninstall  switch the conflists back to portmap, take
#                              portfwd down, remove the plugin binary; then
#                              wait (so that a DaemonSet pod stays Running).
#   portfwd-node.sh patch DIR  only switch the conflists in DIR to portfwd,
#   portfwd-node.sh unpatch DIR    or back to portmap.
#
# Environment (paths as the pod sees them; the host's are mounted under /host):
#   HOST_CNI_BIN_DIR   default /host/opt/cni/bin   (the host's CNI plugin dir)
#   HOST_CNI_CONF_DIR  default /host/etc/cni/net.d (the host's CNI config dir)
#   HOST_PORTFWD       default /opt/cni/bin/portfwd (the binary, as the host sees it)
#   PORTFWD_BINARY     default /usr/local/bin/portfwd (the binary in the image)
#   PORTFWD_UPLINKS    interfaces for external traffic, space separated
#                      (default: those of the default routes)
#   PORTFWD_INTERVAL   default 30
#   PORTFWD_METRICS    where `portfwd serve` serves /metrics, default
#                      127.0.0.1:9469 (the node's loopback: hostNetwork);
#                      0.0.0.0:9469 for a Prometheus that scrapes nodes
#
# `portfwd up` runs in the host's mount and network namespaces (nsenter into
# PID 1: the pod needs hostPID and privileged): its pins must be on the
# host's bpffs and it must record the host's network namespace.
set -eu

SRC=${PORTFWD_BINARY:-/usr/local/bin/portfwd}
BIN_DIR=${HOST_CNI_BIN_DIR:-/host/opt/cni/bin}
CONF_DIR=${HOST_CNI_CONF_DIR:-/host/etc/cni/net.d}
HOST_BIN=${HOST_PORTFWD:-/opt/cni/bin/portfwd}
INTERVAL=${PORTFWD_INTERVAL:-30}
METRICS=${PORTFWD_METRICS:-127.0.0.1:9469}

log() { echo "portfwd-node: $*" >&2; }

install_binary() {
    if ! cmp -s "$SRC" "$BIN_DIR/portfwd"; then
        # Copy, then rename: a runtime never executes a half-written plugin.
        cp "$SRC" "$BIN_DIR/.portfwd.tmp"
        chmod 0755 "$BIN_DIR/.portfwd.tmp"
        mv -f "$BIN_DIR/.portfwd.tmp" "$BIN_DIR/portfwd"
        log "installed $BIN_DIR/portfwd"
    fi
}

# Rewrites `"type": "FROM"` to `"type": "TO"` in every CNI configuration of
# DIR. The temporary file is hidden and has no .conf/.conflist/.json
# extension, so runtimes never load it; the rename is atomic.
switch_type() {
    dir=$1 from=$2 to=$3
    for f in "$dir"/*.conflist "$dir"/*.conf "$dir"/*.json; do
        [ -f "$f" ] || continue
        grep -Eq "\"type\"[[:space:]]*:[[:space:]]*\"$from\"" "$f" || continue
        tmp="$dir/.portfwd-switch.tmp"
        cp -p "$f" "$tmp"
        sed -i -E "s/(\"type\"[[:space:]]*:[[:space:]]*)\"$from\"/\\1\"$to\"/g" "$tmp"
        mv -f "$tmp" "$f"
        log "$f: $from -> $to"
    done
}

bring_up() {
    set --
    for uplink in ${PORTFWD_UPLINKS:-}; do
        set -- "$@" --iface "$uplink"
    done
    nsenter --target 1 --mount --net -- "$HOST_BIN" up "$@"
}

once() {
    install_binary
    switch_type "$CONF_DIR" portmap portfwd
    bring_up
}

wait_forever() {
    trap 'exit 0' TERM INT
    while :; do
        sleep 3600 &
        wait $! || true
    done
}

case "${1:-run}" in
run)
    once
    # The periodic re-check runs beside the service and ends with the pod.
    (
        while :; do
            sleep "$INTERVAL"
            install_binary
            switch_type "$CONF_DIR" portmap portfwd
            bring_up >/dev/null || log "portfwd up failed"
        done
    ) &
    # The node's one portfwd service: the port holder and the metrics. It
    # stops on SIGTERM; forwarding stays (it lives in the kernel).
    exec nsenter --target 1 --mount --net -- "$HOST_BIN" serve --metrics "$METRICS"
    ;;
once)
    once
    ;;
uninstall)
    switch_type "$CONF_DIR" portfwd portmap
    if [ -x "$BIN_DIR/portfwd" ]; then
        nsenter --target 1 --mount --net -- "$HOST_BIN" down || log "portfwd down failed"
        rm -f "$BIN_DIR/portfwd"
    fi
    log "uninstalled: the node's conflists use portmap again"
    wait_forever
    ;;
patch)
    switch_type "${2:?usage: $0 patch DIR}" portmap portfwd
    ;;
unpatch)
    switch_type "${2:?usage: $0 unpatch DIR}" portfwd portmap
    ;;
*)
    echo "usage: $0 [run|once|uninstall|patch DIR|unpatch DIR]" >&2
    exit 2
    ;;
esac
