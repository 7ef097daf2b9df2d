"""Shared fixtures of the node tests: test series, node configs, nodes, real peers.

Everything listens on loopback ports the OS picks; every wait is bounded by a deadline.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pydicom.valuerep import DS
from sqlalchemy import func, select

from dicom_node.config import load_config
from dicom_node.demo.orthanc import OrthancError, OrthancProcess, start_orthanc
from dicom_node.node import Node
from dicom_node.store.db import Database
from dicom_node.store.models import AuditEvent, Instance, Series
from tests.peers import free_port, missing, peer_env, require_binary
from viewer_bridge.main import build_node

T = TypeVar("T")

STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
STORESCP = "/usr/bin/storescp"
ORTHANC = "/usr/sbin/Orthanc"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


# --------------------------------------------------------------------------- waiting

def wait_until(probe: Callable[[], T], *, timeout: float = 30.0, interval: float = 0.1,
               what: str = "condition") -> T:
    """Poll ``probe`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: T = probe()
    while not last:
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")
        time.sleep(interval)
        last = probe()
    return last


def wait_swapped(node: Any, model: str, generation: int, timeout: float = 30.0) -> None:
    """Wait until ``node`` serves ``generation`` of ``model`` from memory. The node
    commits a version as serving first and swaps the model in right after, so a test that
    saw the row and then reads the served model waits for the swap."""
    wait_until(lambda: node.parts.models.loaded_generation(model) == generation,
               timeout=timeout, what=f"{model} generation {generation} swapped in")


# --------------------------------------------------------------------------- test data

def dataset_bytes(path: Path | bytes) -> bytes:
    """The bytes of a Part 10 file after its preamble and file meta group.

    The node writes its own file meta group (its implementation UID, the negotiated
    transfer syntax, source AE), so "stored unchanged" means the dataset bytes that
    follow the meta group are identical to the sender's.
    """
    data = path if isinstance(path, bytes) else Path(path).read_bytes()
    assert data[128:132] == b"DICM", "not a Part 10 file"
    assert struct.unpack_from("<HH", data, 132) == (0x0002, 0x0000)
    group_length = struct.unpack_from("<I", data, 140)[0]
    return data[144 + group_length:]


def as_storescu_sends(ds: pydicom.Dataset) -> pydicom.Dataset:
    """Make ``ds`` encode to the bytes dcmtk's storescu puts on the wire.

    storescu drops Data Set Trailing Padding (FFFC,FFFC), writes sequences and items
    with explicit lengths and encapsulated Pixel Data as OB; test files are written
    that way so that "the node stored the bytes it received" can be checked against
    the file.
    """
    if (0xFFFC, 0xFFFC) in ds:
        del ds[0xFFFC, 0xFFFC]

    def explicit(dataset: pydicom.Dataset) -> None:
        for elem in dataset:
            if elem.VR == "SQ":
                elem.is_undefined_length = False
                for item in elem.value:
                    item.is_undefined_length_sequence_item = False
                    explicit(item)

    explicit(ds)
    pixels = ds.data_element("PixelData")
    if pixels is not None and pixels.is_undefined_length:
        pixels.VR = "OB"
    return ds


@dataclass
class SeriesFiles:
    study_uid: str
    series_uid: str
    files: list[Path]
    sop_uids: list[str]

    @property
    def directory(self) -> Path:
        return self.files[0].parent


def make_ct_series(directory: Path, count: int, *, source: str = "CT_small.dcm",
                   description: str = "tessera test", study_uid: str | None = None,
                   ) -> SeriesFiles:
    """``count`` copies of a pydicom test CT with fresh UIDs, one slice apart, encoded
    as storescu sends them (see :func:`as_storescu_sends`)."""
    template = as_storescu_sends(pydicom.dcmread(get_testdata_file(source)))
    directory.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    files, uids = [], []
    origin = [float(v) for v in template.get("ImagePositionPatient", [0.0, 0.0, 0.0])]
    for i in range(count):
        ds = copy.deepcopy(template)
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SeriesDescription = description
        ds.InstanceNumber = i + 1
        if "ImagePositionPatient" in template:
            # A DS holds at most 16 characters: -63.699997 + 1 is -62.699996999999996.
            ds.ImagePositionPatient = [DS(v, auto_format=True)
                                       for v in (origin[0], origin[1], origin[2] + i)]
            ds.SliceLocation = DS(origin[2] + i, auto_format=True)
        path = directory / f"{i + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        uids.append(uid)
    return SeriesFiles(study_uid, series_uid, files, uids)


@pytest.fixture(scope="session")
def ct100(tmp_path_factory: pytest.TempPathFactory) -> SeriesFiles:
    """A 100-instance CT series (read-only: tests that change UIDs make their own)."""
    return make_ct_series(tmp_path_factory.mktemp("ct100"), 100)


# --------------------------------------------------------------------------- configs

def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(data: dict[str, Any]) -> str:
    """A small TOML writer: top-level tables whose values are scalars, lists or inline
    tables, plus top-level arrays of tables (``rules``)."""
    lines: list[str] = []
    for section, body in data.items():
        if isinstance(body, list):
            for item in body:
                lines.append(f"[[{section}]]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in item.items()]
        else:
            lines.append(f"[{section}]")
            for key, value in body.items():
                if isinstance(value, list) and value and isinstance(value[0], dict):
                    lines.append(f"{key} = {_toml_value(value)}")
                else:
                    lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def node_config_data(data_dir: Path, *, ae_title: str = "TESSERA", quiet_s: float = 1.0,
                     destinations: dict[str, dict[str, Any]] | None = None,
                     rules: list[dict[str, Any]] | None = None,
                     max_attempts: int = 8, backoff_s: float = 0.3,
                     **sections: dict[str, Any]) -> dict[str, Any]:
    """A test configuration: port 0, short quiet period, short backoff and polls."""
    data: dict[str, Any] = {
        "node": {"data_dir": str(data_dir)},
        "dicom": {"ae_title": ae_title, "host": "127.0.0.1", "port": 0,
                  "network_timeout_s": 20},
        "assembler": {"quiet_period_s": quiet_s, "poll_interval_s": 0.1},
        "jobs": {"lease_s": 30, "heartbeat_s": 5, "poll_interval_s": 0.1, "workers": 2},
        "export": {"max_attempts": max_attempts, "backoff_initial_s": backoff_s,
                   "backoff_max_s": 2 * backoff_s, "connect_timeout_s": 5},
    }
    for name, extra in sections.items():
        data.setdefault(name, {}).update(extra)
    if destinations:
        data["destinations"] = destinations
    if rules:
        data["rules"] = rules
    return data


def write_node_config(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` (from :func:`node_config_data`) as TOML; destinations are tables."""
    data = dict(data)
    dests = data.pop("destinations", {})
    text = to_toml(data)
    for name, dest in dests.items():
        text += f"[destinations.{name}]\n" + "".join(
            f"{k} = {_toml_value(v)}\n" for k, v in dest.items()) + "\n"
    path.write_text(text, encoding="utf-8")
    return path


def forward_rule(name: str, *destinations: str, **match: Any) -> dict[str, Any]:
    rule: dict[str, Any] = {"name": name, "action": "forward",
                            "destinations": list(destinations)}
    if match:
        rule["match"] = match
    return rule


# --------------------------------------------------------------------------- the node

@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """Start in-process nodes from config data; all are stopped at teardown."""
    nodes: list[Node] = []

    def _start(data: dict[str, Any] | None = None, **kwargs: Any) -> Node:
        data = data or node_config_data(tmp_path / "node", **kwargs)
        cfg_path = write_node_config(tmp_path / f"node-{len(nodes)}.toml", data)
        node = build_node(load_config(cfg_path, env={})).start()
        nodes.append(node)
        return node

    yield _start
    for node in nodes:
        node.stop()


class NodeProcess:
    """``tessera node serve`` in a subprocess; stderr goes to a log file."""

    def __init__(self, config: Path, log: Path, *extra_args: str,
                 env: dict[str, str] | None = None) -> None:
        self.log = log
        self._log_file = log.open("ab")
        cmd = [sys.executable, "-m", "viewer_bridge.main", "node", "serve", "--config",
               str(config), *extra_args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log_file,
                                     env=env or dict(os.environ), cwd=Path.cwd())
        self.listening = self._read_listening(timeout=60)
        self.port = int(self.listening["port"])

    def _read_listening(self, timeout: float) -> dict[str, Any]:
        result: dict[str, Any] = {}
        assert self.proc.stdout is not None
        stdout = self.proc.stdout

        def read() -> None:
            for line in stdout:
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue
                if doc.get("event") == "listening":
                    result.update(doc)
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        if not result:
            self.kill()
            pytest.fail(f"node did not print its listening line within {timeout} s; log:\n"
                        + self.log.read_text(errors="replace")[-4000:])
        return result

    def kill(self) -> None:
        """SIGKILL: no clean-up runs in the node."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self._log_file.close()

    def stop(self, grace_s: float = 20.0) -> str | None:
        """SIGTERM, then SIGKILL after ``grace_s``; None when the node stopped cleanly
        (exit status 0), else what happened, with the tail of its log."""
        problem = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                problem = f"still running {grace_s:.0f} s after SIGTERM (killed)"
        if problem is None and self.proc.returncode != 0:
            problem = f"exit status {self.proc.returncode}"
        self._log_file.close()
        if problem is None:
            return None
        return f"node {problem}; log:\n" + self.log.read_text(errors="replace")[-3000:]


@pytest.fixture
def node_process(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    procs: list[NodeProcess] = []

    def _start(config: Path, *extra_args: str, env: dict[str, str] | None = None,
               ) -> NodeProcess:
        p = NodeProcess(config, tmp_path / f"node-{len(procs)}.log", *extra_args, env=env)
        procs.append(p)
        return p

    yield _start
    for p in procs:
        p.stop()


def tessera(*args: str, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "viewer_bridge.main", *args],
                          capture_output=True, text=True, timeout=timeout,
                          env=env or dict(os.environ))


def status_json(config: Path) -> dict[str, Any]:
    """``tessera node status --config X --json`` as a dict."""
    result = tessera("node", "status", "--config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


# --------------------------------------------------------------------------- the index

class Index:
    """Read-only queries on a node's database (a separate engine, as an operator would)."""

    def __init__(self, data_dir: Path) -> None:
        self.db = Database(f"sqlite:///{(data_dir / 'node.db').resolve()}")
        self.data_dir = data_dir

    def instance_count(self, series_uid: str | None = None) -> int:
        with self.db.session() as s:
            q = select(func.count()).select_from(Instance)
            if series_uid:
                q = q.join(Series).where(Series.series_uid == series_uid)
            return int(s.execute(q).scalar_one())

    def sop_uids(self) -> set[str]:
        with self.db.session() as s:
            return set(s.execute(select(Instance.sop_instance_uid)).scalars())

    def series_state(self, series_uid: str) -> str | None:
        with self.db.session() as s:
            return s.execute(select(Series.state).where(Series.series_uid == series_uid)
                             ).scalar_one_or_none()

    def instance_paths(self) -> dict[str, Path]:
        root = self.data_dir / "instances"
        with self.db.session() as s:
            return {uid: root / rel for uid, rel in
                    s.execute(select(Instance.sop_instance_uid, Instance.path)).all()}

    def audit(self, kind: str | None = None) -> list[AuditEvent]:
        with self.db.session() as s:
            q = select(AuditEvent).order_by(AuditEvent.id)
            if kind:
                q = q.where(AuditEvent.kind == kind)
            return list(s.execute(q).scalars())

    def close(self) -> None:
        self.db.dispose()


@pytest.fixture
def open_index() -> Iterator[Callable[[Path], Index]]:
    opened: list[Index] = []

    def _open(data_dir: Path) -> Index:
        idx = Index(data_dir)
        opened.append(idx)
        return idx

    yield _open
    for idx in opened:
        idx.close()


# --------------------------------------------------------------------------- dcmtk

def storescu(port: int, *files: Path | str, called_ae: str = "TESSERA",
             calling_ae: str = "STORESCU", options: tuple[str, ...] = (),
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
    exe = require_binary(STORESCU)
    return subprocess.run(
        [exe, "-aet", calling_ae, "-aec", called_ae, *options, "127.0.0.1", str(port),
         *[str(f) for f in files]],
        capture_output=True, text=True, timeout=timeout, env=peer_env())


def echoscu(port: int, *, called_ae: str = "TESSERA", calling_ae: str = "ECHOSCU",
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
    exe = require_binary(ECHOSCU)
    return subprocess.run([exe, "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=timeout, env=peer_env())


@dataclass
class StoreSCP:
    """dcmtk storescp writing every received instance to ``directory``."""

    port: int
    directory: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    _log_file: Any = field(default=None, repr=False)

    @property
    def incoming(self) -> Path:
        """Where storescp writes; a file moves to ``directory`` once it is complete."""
        return self.directory.with_name(self.directory.name + ".incoming")

    def start(self) -> StoreSCP:
        exe = require_binary(STORESCP)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.incoming.mkdir(parents=True, exist_ok=True)
        self._log_file = self.log.open("ab")
        # +uf: unique file names, so a second delivery of an instance is a second file
        # (-uf, the default, names files by SOP Instance UID and overwrites a duplicate).
        # +xa: accept every transfer syntax (compressed ones stay as received).
        # -xcr: storescp runs this after a file is written, so ``received`` never lists
        # one that is still being written (a reader saw a SEG without its Pixel Data).
        self.proc = subprocess.Popen(
            [exe, "-v", "+uf", "+xa", "-aet", "STORESCP", "-od", str(self.incoming),
             "-xcr", f"mv #p/#f {self.directory}/#f", str(self.port)],
            stdout=self._log_file, stderr=subprocess.STDOUT, env=peer_env())
        wait_until(self._listening, timeout=20, what=f"storescp on port {self.port}")
        return self

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail("storescp exited: " + self.log.read_text(errors="replace")[-2000:])
        result = echoscu(self.port, called_ae="STORESCP")
        return result.returncode == 0

    def received(self, settle_s: float = 10.0) -> list[Path]:
        """The complete files. storescp answers a C-STORE once its file is written and
        moves it here just after, so a file still in ``incoming`` is either being
        written or about to move: wait (up to ``settle_s``) for those to land."""
        deadline = time.monotonic() + settle_s
        while any(self.incoming.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.02)
        return sorted(p for p in self.directory.iterdir() if p.is_file())

    def received_sop_uids(self) -> list[str]:
        return [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                for p in self.received()]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


@pytest.fixture
def storescp_factory(tmp_path: Path) -> Iterator[Callable[..., StoreSCP]]:
    started: list[StoreSCP] = []

    def _make(port: int | None = None, *, start: bool = True) -> StoreSCP:
        n = len(started)
        scp = StoreSCP(port or free_port(), tmp_path / f"storescp-{n}",
                       tmp_path / f"storescp-{n}.log")
        started.append(scp)
        return scp.start() if start else scp

    yield _make
    for scp in started:
        scp.stop()


# --------------------------------------------------------------------------- Orthanc

Orthanc = OrthancProcess


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """A real Orthanc (with the DICOMweb plug-in when installed) on loopback ports."""
    require_binary(ORTHANC)
    try:
        instance = start_orthanc(tmp_path / "orthanc", name="TestPACS", dicomweb=True)
    except OrthancError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield instance
    instance.stop()


# --------------------------------------------------------------------------- PostgreSQL

@dataclass
class Postgres:
    url: str
    directory: Path
    bindir: Path


def _pg_bindir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


def _as_postgres(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    if os.geteuid() == 0:
        args = [require_binary("runuser"), "-u", "postgres", "--", *args]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A throwaway PostgreSQL cluster on a free loopback port (fails under CI if absent)."""
    bindir = _pg_bindir()
    if bindir is None:
        missing("PostgreSQL (initdb) is not installed")
    assert bindir is not None
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing("psycopg is not installed")
    if os.geteuid() == 0:
        require_binary("runuser")  # PostgreSQL refuses to run as root
    # Not under pytest's 0700 temp root: the postgres user must reach it.
    base = Path(tempfile.mkdtemp(prefix="tessera-pg-"))
    os.chmod(base, 0o755)
    datadir = base / "data"
    sockdir = base / "sock"
    sockdir.mkdir()
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        shutil.chown(sockdir, "postgres")
    init = _as_postgres([str(bindir / "initdb"), "-D", str(datadir), "-U", "tessera",
                         "--auth=trust", "-E", "UTF8", "--no-sync"])
    if init.returncode != 0:
        pytest.fail(f"initdb failed: {init.stderr}")
    port = free_port()
    start = _as_postgres([str(bindir / "pg_ctl"), "-D", str(datadir), "-w", "-t", "60",
                          "-l", str(base / "pg.log"), "-o",
                          f"-p {port} -k {sockdir} -c listen_addresses=127.0.0.1 "
                          "-c fsync=off", "start"], timeout=90)
    if start.returncode != 0:
        log = (base / "pg.log").read_text(errors="replace") if (base / "pg.log").exists() else ""
        pytest.fail(f"pg_ctl start failed: {start.stderr}\n{log}")
    create = _as_postgres([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port),
                           "-U", "tessera", "tessera"])
    if create.returncode != 0:
        pytest.fail(f"createdb failed: {create.stderr}")
    try:
        yield Postgres(f"postgresql+psycopg://tessera@127.0.0.1:{port}/tessera", base, bindir)
    finally:
        _as_postgres([str(bindir / "pg_ctl"), "-D", str(datadir), "-m", "immediate", "stop"])
        shutil.rmtree(base, ignore_errors=True)
