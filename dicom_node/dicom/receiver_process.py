"""A receiving process of the node (``[dicom] receivers`` above 1).

The node's process accepts every DICOM connection and hands some to receiving
processes (:mod:`dicom_node.dicom.receiver_pool`), so that concurrent associations run
on several CPUs instead of one interpreter. A receiving process is the SCP and the
instance store only: no job workers, no models, no torch. It keeps its own intake
journal (``data_dir/intake-N``, replayed when it starts, so a receiver killed with
instances acknowledged but not yet indexed indexes them when it is started again),
and writes files and index rows into the node's one store and database.

Started by the pool as ``python -m dicom_node.dicom.receiver_process`` with the node's
configuration as JSON on stdin and the Unix socket it is handed connections on as an
inherited file descriptor. It says, as JSON messages on that socket, when it is ready,
when a handed connection closes, and every ingest count (the node's /metrics shows
them). It ends when the node's process closes its end (or dies) or on SIGTERM,
ending its associations as the node's own SCP does at a stop, applying what it
journaled and checkpointing; SIGINT
(a terminal's Ctrl-C reaches the whole process group) is left to the node's process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading

from dicom_node.config import NodeConfig
from dicom_node.dicom.scp import serve_handed
from dicom_node.errors import DicomNodeError
from dicom_node.node_process import prepare_process
from dicom_node.prometheus import forward_counts
from dicom_node.store.opening import journal_dir, open_store

LOGGER = logging.getLogger("dicom_node.dicom.receiver_process")  # also when run as __main__

EXIT_CANNOT_START = 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dicom_node.dicom.receiver_process")
    parser.add_argument("--number", type=int, required=True)
    parser.add_argument("--fd", type=int, required=True, help="the inherited Unix socket")
    parser.add_argument("--host", required=True, help="where the node listens")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--json-logs", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from federation_grpc.jsonlog import configure_logging

    configure_logging(args.log_level, args.json_logs, quiet=("pynetdicom", "highdicom"))
    stop = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    config = NodeConfig.model_validate_json(sys.stdin.buffer.read())
    control = socket.socket(fileno=args.fd)

    def say(doc: dict[str, object]) -> None:
        with contextlib.suppress(OSError):
            control.send(json.dumps(doc).encode())

    forward_counts(lambda name, labels: say({"count": name, "labels": list(labels)}))
    store = open_store(config, create_schema=False)
    prepare_process()  # built; the replay and the associations come after
    try:
        replayed = store.open_journal(journal_dir(config, args.number))
    except (DicomNodeError, OSError) as exc:
        LOGGER.error("receiver %d cannot open its intake journal: %s", args.number, exc)
        store.db.dispose()
        return EXIT_CANNOT_START
    scp, ended = serve_handed(config.dicom, store, control, (args.host, args.port),
                              share=config.dicom.receivers)
    LOGGER.info("receiver %d ready (pid %d, %d journal record(s) replayed)", args.number,
                os.getpid(), replayed)
    say({"ready": os.getpid()})
    while not stop.wait(0.2) and not ended.is_set():
        pass
    scp.shutdown()
    store.close_journal()
    store.db.dispose()
    LOGGER.info("receiver %d stopped", args.number)
    return 0


if __name__ == "__main__":
    sys.exit(main())
