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
#
# The work is done by the `tessera` CLI: $TESSERA when set, else the one installed in
# this checkout's .venv (what `make demo` / `make test` create), else `tessera` on PATH.
set -eu
here=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd)
if [ -z "${TESSERA:-}" ]; then
    if [ -x "$here/../../.venv/bin/tessera" ]; then
        TESSERA="$here/../../.venv/bin/tessera"
    elif command -v tessera >/dev/null 2>&1; then
        TESSERA=tessera
    else
        echo "make-certs.sh: no tessera CLI: run 'make demo' (creates .venv) or set TESSERA" >&2
        exit 2
    fi
fi
out="${1:-deploy/tls/out}"
[ "$#" -gt 0 ] && shift
args=""
for n in "${@:-node1}"; do args="$args --node $n"; done
for h in ${HUB_HOSTS:-localhost 127.0.0.1}; do args="$args --host $h"; done
if [ -n "${DICOM_SERVER:-}" ]; then
    args="$args --dicom-server $DICOM_SERVER"
    for h in ${DICOM_HOSTS:-localhost 127.0.0.1}; do args="$args --dicom-host $h"; done
fi
# shellcheck disable=SC2086
"$TESSERA" hub certs "$out" $args
