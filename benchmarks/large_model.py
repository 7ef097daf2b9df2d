"""Large models, a scale mode of ``benchmarks/federation.py`` (``--size-mb 2048
--resume-at 0.5``): one node uploads one update of the model's size over mutual TLS
through a proxy that kills the connection at that fraction; the client resumes from the
hub's offset; the hub merges it; the node then downloads the new generation through a
proxy that kills it at the same fraction, and resumes. Both files are written and read
in blocks here (a memory map is uploaded), so this process stays small too. Prints
throughput, bytes forwarded against the payload (resumed, not restarted), the sha256
check, the hub's peak RSS.

    python benchmarks/federation.py --size-mb 2048 --resume-at 0.5
"""

from __future__ import annotations

import argparse
import mmap
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from harness import RssSampler, load_average, peak_rss_mib
from hub_toml import write_config
from scale_models import CONFIG, model_file, sha256_of

from federation_grpc.client import FederationClient
from federation_grpc.connection import ClientTls, RetryPolicy
from federation_grpc.hub.certs import make_certs
from federation_grpc.hub.config import load_config
from federation_grpc.hub.domain import UploadState
from federation_grpc.hub.service import HubService
from federation_grpc.uploading import UpdateMetadata
from tests.federation.cutproxy import CutProxy
from tests.federation.hubproc import HubProcess


def run_large(args: argparse.Namespace) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="tessera-large-"))
    need = int(args.size_mb * (1 << 20) * 6)
    free = shutil.disk_usage(work).free
    if free < need:
        shutil.rmtree(work)
        raise SystemExit(f"need {need >> 30} GiB free under {work.parent}, have {free >> 30}")
    try:
        return _large(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _large_hub(args: argparse.Namespace, work: Path) -> tuple[dict, Path, str]:
    """Certificates, a hub config admitting the update, generation 0 and the update
    written in blocks; the certificates, the config and an enrolment token."""
    certs = make_certs(work / "tls", nodes=("node0",))
    config = work / "hub.toml"
    size_limit = int(args.size_mb * (1 << 20)) + (1 << 20)
    write_config(config, work / "data", certs, "fedasync", 1, max_update_bytes=size_limit)
    print(f"writing a {args.size_mb:g} MB model and an update ...", flush=True)
    model_file(work / "g0.safetensors", args.size_mb, 0.0, 0)
    model_file(work / "update.safetensors", args.size_mb, 0.01, 1)
    setup = HubService(load_config(config))
    setup.init_model(work / "g0.safetensors", CONFIG)
    token, _ = setup.create_enrolment_token()
    setup.close()
    (work / "g0.safetensors").unlink()
    return certs, config, token


def _upload_until_merged(client: FederationClient, update: Path, timeout: float
                         ) -> tuple[Any, float, float]:
    """Upload the (memory-mapped) update, then poll until it is no longer only received:
    its last status, the upload's and the merge's seconds."""
    meta = UpdateMetadata(str(uuid.uuid4()), 0, 20, ("encoder", "heads.liver"), {})
    with update.open("rb") as fh:
        # Mapped, not read: the node side stays small too. (Left to the collector: the
        # client's views of it may outlive the call.)
        payload = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    start = time.perf_counter()
    status = client.upload(payload, meta)  # type: ignore[arg-type]  # a buffer will do
    upload_s = time.perf_counter() - start
    deadline = time.perf_counter() + timeout
    while status.state == UploadState.RECEIVED and time.perf_counter() < deadline:
        time.sleep(0.2)
        status = client.upload_status(meta.update_id)
    return status, upload_s, time.perf_counter() - start - upload_s


def _large(args: argparse.Namespace, work: Path) -> dict[str, object]:
    certs, config, token = _large_hub(args, work)
    hub = HubProcess(config, work / "hub.log")
    sampler = RssSampler(hub.proc.pid)
    size = (work / "update.safetensors").stat().st_size
    cut = int(size * args.resume_at)
    up = CutProxy(hub.port, cut, "up")
    down = CutProxy(hub.port, cut, "down")
    tls = ClientTls.from_files(certs["ca"].cert, certs["node0"].cert, certs["node0"].key)
    retry = RetryPolicy(attempts=8, initial_backoff_s=0.2, max_backoff_s=2.0)
    chunk = int(args.chunk_mb * (1 << 20))
    client = FederationClient(up.target, tls=tls, retry=retry, chunk_size=chunk,
                              timeout_s=args.timeout)
    client.enrol(token, "large")
    status, upload_s, merged_s = _upload_until_merged(client, work / "update.safetensors",
                                                      args.timeout)
    reader = FederationClient(down.target, tls=tls, retry=retry, chunk_size=chunk,
                              timeout_s=args.timeout, node_token=client.node_token)
    start = time.perf_counter()
    target = work / "generation.safetensors"
    if status.state == UploadState.MERGED:
        reader.download_to(status.merged_into, target)  # resumes, checks size and sha256
    download_s = time.perf_counter() - start
    check = HubService(load_config(config))
    expected = check.generation(status.merged_into).sha256 if status.merged_into > 0 else ""
    check.close()
    peaks = sampler.stop()
    hwm = peak_rss_mib(hub.proc.pid, float("nan"))
    hub.stop()
    for each in (client, reader):
        each.close()
    up.close()
    down.close()
    return {
        "update_mb": round(size / 1e6, 1),
        "state": str(status.state),
        "killed_at": f"{cut} bytes ({args.resume_at:g})",
        "upload_connections": up.connections,
        "upload_forwarded_vs_payload": round(up.forwarded["up"] / size, 3),
        "upload_s": round(upload_s, 1),
        "upload_mb_s": round(size / upload_s / 1e6, 1),
        "merge_s": round(merged_s, 1),
        "download_connections": down.connections,
        "download_forwarded_vs_payload": round(down.forwarded["down"] / size, 3),
        "download_s": round(download_s, 1),
        "download_mb_s": round(size / download_s / 1e6, 1) if download_s else None,
        "download_sha256_ok": bool(expected) and target.exists() and sha256_of(target) == expected,
        "hub_peak_rss_mb": round(hwm, 1),
        "hub_peak_rss_anon_mb": peaks["RssAnon"],
        "hub_peak_rss_file_mb": peaks["RssFile"],
        "load_average": load_average(),
    }
