#!/bin/sh
# Entrypoint of the balancer image (docker/Dockerfile.balancer): HAProxy in front of the captioner
# replicas of docker-compose.replicas.yml.
#
# It derives HAProxy's limits from the settings the replicas get, so that the two always agree:
#   CAPTIONER_REPLICAS            server slots for replicas (default 2, 1-64); the replicas are found
#                                 by DNS under CAPTIONER_BALANCER_BACKEND (default captioner-replicas)
#   CAPTIONER_REQUEST_TIMEOUT_S   the replicas' request deadline (default 30, the service's default):
#                                 HAProxy waits for a replica that long + 5 s, and queues a request
#                                 at most that long
#   CAPTIONER_MAX_QUEUE_IMAGES    the replicas' queue (default 256) and
#   CAPTIONER_MAX_BATCH_FILES     the most images in one request (default 16): each replica gets at
#                                 most QUEUE / FILES requests at once (16 by default), so even a
#                                 replica full of largest batches has room in its queue and never
#                                 answers 503 for load; further requests wait in HAProxy's queue
#   CAPTIONER_BALANCER_REPLICA_MAXCONN  overrides that per-replica limit
# then writes the per-replica /metrics routes, checks the configuration (`haproxy -c`; a bad
# setting exits 2 with one line saying which) and execs HAProxy, which then runs as PID 1.
set -eu

CONFIG_DIR=/usr/local/etc/captioner-balancer
GENERATED=/tmp/replica-metrics.cfg

fail() {
    echo "captioner-balancer: cannot start: $*" >&2
    exit 2
}

# A whole number in [min, max], else fail naming the variable.
whole() {
    name="$1" value="$2" min="$3" max="$4"
    case "$value" in
        '' | *[!0-9]*) fail "$name must be a whole number from $min to $max, got '$value'" ;;
    esac
    if [ "$value" -lt "$min" ] || [ "$value" -gt "$max" ]; then
        fail "$name must be a whole number from $min to $max, got '$value'"
    fi
}

replicas="${CAPTIONER_REPLICAS:-2}"
whole CAPTIONER_REPLICAS "$replicas" 1 64
backend="${CAPTIONER_BALANCER_BACKEND:-captioner-replicas}"
case "$backend" in
    '' | *[!A-Za-z0-9._-]*) fail "CAPTIONER_BALANCER_BACKEND must be a host name, got '$backend'" ;;
esac

timeout_s="${CAPTIONER_REQUEST_TIMEOUT_S:-30}"
# Seconds, rounded up to a whole number (HAProxy's timeouts are whole units).
timeout_whole="$(printf '%s\n' "$timeout_s" | awk '/^[0-9]+(\.[0-9]+)?$/ && $1 > 0 && $1 <= 3600 { t = int($1); if (t < $1) t++; print t; exit } { exit 1 }')" \
    || fail "CAPTIONER_REQUEST_TIMEOUT_S must be a number of seconds in (0, 3600], got '$timeout_s'"

queue_images="${CAPTIONER_MAX_QUEUE_IMAGES:-256}"
whole CAPTIONER_MAX_QUEUE_IMAGES "$queue_images" 1 100000
batch_files="${CAPTIONER_MAX_BATCH_FILES:-16}"
whole CAPTIONER_MAX_BATCH_FILES "$batch_files" 1 256
per_replica=$((queue_images / batch_files))
[ "$per_replica" -ge 1 ] || per_replica=1
per_replica="${CAPTIONER_BALANCER_REPLICA_MAXCONN:-$per_replica}"
whole CAPTIONER_BALANCER_REPLICA_MAXCONN "$per_replica" 1 100000

export CAPTIONER_REPLICAS="$replicas"
export BALANCER_BACKEND="$backend"
export BALANCER_REPLICA_MAXCONN="$per_replica"
export BALANCER_SERVER_TIMEOUT=$((timeout_whole + 5))
export BALANCER_QUEUE_TIMEOUT="$timeout_whole"
export BALANCER_STOP_TIMEOUT=$((timeout_whole + 5))
# Room for every replica's connections, the queue in front of them, and the stats port.
export BALANCER_MAXCONN=$((replicas * per_replica * 4 + 256))

# /replicas/N/metrics on the stats port: replica slot N's own /metrics (a slot with no replica
# behind it answers 503), so one Prometheus job can scrape every replica through one port.
{
    echo "backend replica_metrics"
    echo "    # Slot N or nothing: never another replica's figures."
    echo "    retries 0"
    echo "    no option redispatch"
    echo "    http-request set-var(txn.slot) path,field(3,/)"
    i=1
    while [ "$i" -le "$replicas" ]; do
        echo "    http-request return status 503 content-type text/plain string \"no replica in slot $i\" if { var(txn.slot) -m str $i } !{ srv_is_up(replica_metrics/replica$i) }"
        i=$((i + 1))
    done
    echo "    http-request return status 404 content-type text/plain string \"no such replica slot\" unless { var(txn.slot) -m int 1:$replicas }"
    echo "    http-request set-path /metrics"
    echo "    default-server resolvers compose resolve-prefer ipv4 init-addr none"
    echo "    server-template replica 1-$replicas $backend:8000"
    i=1
    while [ "$i" -le "$replicas" ]; do
        echo "    use-server replica$i if { var(txn.slot) -m str $i }"
        i=$((i + 1))
    done
} > "$GENERATED"

if ! haproxy -c -f "$CONFIG_DIR/haproxy.cfg" -f "$GENERATED" > /tmp/haproxy-check.log 2>&1; then
    grep -E 'ALERT|WARNING' /tmp/haproxy-check.log >&2 || cat /tmp/haproxy-check.log >&2
    fail "the HAProxy configuration does not check (the lines above say why)"
fi

echo "captioner-balancer: $replicas replica slots on $backend:8000, at most $per_replica requests at once each, timeouts: server ${BALANCER_SERVER_TIMEOUT}s, queue ${BALANCER_QUEUE_TIMEOUT}s" >&2
# -W: master-worker (reloads, clean stops); -db: stay in the foreground, log to stdout.
exec haproxy -W -db -f "$CONFIG_DIR/haproxy.cfg" -f "$GENERATED" "$@"
