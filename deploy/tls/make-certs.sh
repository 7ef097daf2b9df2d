#!/bin/sh
# Make a private CA, a hub server certificate and node client certificates for mutual TLS.
# Usage: deploy/tls/make-certs.sh [OUT_DIR] [NODE_NAME...]
#   HUB_HOSTS="hub.example.org 10.0.0.5" deploy/tls/make-certs.sh deploy/tls/out site-a site-b
# Keep ca.key offline; give each node ca.pem plus its own NODE.pem and NODE.key.
#
# DICOM TLS for a node's SCP (optional): DICOM_SERVER=NAME also issues a server
# certificate NAME.pem/NAME.key for the hosts in DICOM_HOSTS (default: localhost
# 127.0.0.1), signed by the same CA; put them in [dicom] tls_cert/tls_key and, to
# require client certificates from PACS and viewers, tls_ca = ca.pem.
set -eu
out="${1:-deploy/tls/out}"
[ "$#" -gt 0 ] && shift
nodes=""
for n in "${@:-node1}"; do nodes="$nodes --node $n"; done
hosts=""
for h in ${HUB_HOSTS:-localhost 127.0.0.1}; do hosts="$hosts --host $h"; done
# shellcheck disable=SC2086
python -m federation_grpc.hub.cli certs "$out" $nodes $hosts
if [ -n "${DICOM_SERVER:-}" ]; then
    python - "$out" "$DICOM_SERVER" ${DICOM_HOSTS:-localhost 127.0.0.1} <<'PY'
import sys
from pathlib import Path

from federation_grpc.hub.certs import Issued, issue

out, name, hosts = Path(sys.argv[1]), sys.argv[2], tuple(sys.argv[3:])
made = issue(Issued(out / "ca.pem", out / "ca.key"), out, name, server=True, hosts=hosts)
print(f"{name}: {made.cert} {made.key} (DICOM TLS server)")
PY
fi
