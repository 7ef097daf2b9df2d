#!/bin/sh
# Make a private CA, a hub server certificate and node client certificates for mutual TLS.
# Usage: deploy/tls/make-certs.sh [OUT_DIR] [NODE_NAME...]
#   HUB_HOSTS="hub.example.org 10.0.0.5" deploy/tls/make-certs.sh deploy/tls/out site-a site-b
# Keep ca.key offline; give each node ca.pem plus its own NODE.pem and NODE.key.
set -eu
out="${1:-deploy/tls/out}"
[ "$#" -gt 0 ] && shift
nodes=""
for n in "${@:-node1}"; do nodes="$nodes --node $n"; done
hosts=""
for h in ${HUB_HOSTS:-localhost 127.0.0.1}; do hosts="$hosts --host $h"; done
# shellcheck disable=SC2086
exec python -m federation_grpc.hub.cli certs "$out" $nodes $hosts
