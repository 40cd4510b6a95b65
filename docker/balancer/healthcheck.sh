#!/bin/bash
# Health check of the balancer container: healthy while at least one replica is up, i.e. while the
# stats port's /healthz (HAProxy's monitor-uri) answers 200. bash's /dev/tcp: the image has no curl.
set -eu
exec 3<>/dev/tcp/127.0.0.1/8404
printf 'GET /healthz HTTP/1.0\r\n\r\n' >&3
read -r -t 3 _ status _ <&3
[ "$status" = 200 ]
