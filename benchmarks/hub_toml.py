"""The hub's config file for the federation benchmarks: 127.0.0.1, port 0, mutual TLS
with the benchmark's certificates, the strategy and limits under test; the hub's tables
on ``database_url`` when given (hub replicas share one PostgreSQL), else SQLite in
``data``."""

from __future__ import annotations

from pathlib import Path


def write_config(  # type: ignore[type-arg]
    path: Path, data: Path, certs: dict, strategy: str, buffer: int,
    max_workers: int = 160, max_update_bytes: int = 268435456,
    database_url: str | None = None,
) -> None:
    database = f'database_url = "{database_url}"' if database_url else ""
    path.write_text(
        f"""
[hub]
host = "127.0.0.1"
port = 0
data_dir = "{data}"
max_workers = {max_workers}
{database}

[tls]
ca_cert = "{certs["ca"].cert}"
server_cert = "{certs["hub"].cert}"
server_key = "{certs["hub"].key}"

[limits]
max_update_bytes = {max_update_bytes}

[aggregation]
strategy = "{strategy}"
buffer_size = {buffer}
"""
    )
