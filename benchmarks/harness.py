"""What every benchmark needs besides its subject: peers, clocks and outputs, once.

* Peers: dcmtk's tools at Debian's paths (never looked up on ``PATH``, where the
  virtualenv's pynetdicom scripts of the same names shadow them), run with
  ``tests.peers.peer_env`` (TCP_NODELAY), every wait bounded; how big and how busy a
  peer process is (``/proc``).
* Timing: a :class:`Clock` for elapsed seconds and log lines, :func:`timed` for one
  call, :func:`percentile`.
* Output: figures printed as ``key: value`` lines (and JSON), JSON documents and PNG
  plots written under ``--out``.

Benchmarks run as scripts (``python benchmarks/NAME.py``): this folder is first on
``sys.path``, so they import this module and each other by bare name. Importing it puts
the repository on ``sys.path`` too, for the test helpers the benchmarks share with the
tests (``tests.peers``, ``tests.federation``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))  # after this folder, so siblings are found first

from tests.peers import peer_env  # noqa: E402

T = TypeVar("T")

# -- peers ---------------------------------------------------------------------------------
STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
STORESCP = "/usr/bin/storescp"
SEND_TIMEOUT_S = 300.0


def missing_peer(*paths: str) -> str | None:
    """The first of ``paths`` that is not an executable, or None."""
    return next((p for p in paths if not os.access(p, os.X_OK)), None)


def storescu(port: int, called: str, files: Sequence[Path], calling: str | None = None,
             timeout: float = SEND_TIMEOUT_S) -> float:
    """Seconds dcmtk's storescu needs to send ``files`` in one association to
    127.0.0.1:``port`` (fails loudly)."""
    command = [STORESCU, *(("-aet", calling) if calling else ()), "-aec", called,
               "127.0.0.1", str(port), *map(str, files)]
    t0 = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=peer_env(),
                            timeout=timeout)
    elapsed = time.perf_counter() - t0
    if result.returncode != 0:
        raise RuntimeError(f"storescu to {called} failed (exit status {result.returncode}): "
                           f"{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return elapsed


def spawn_peer(command: Sequence[str]) -> subprocess.Popen[bytes]:
    """A peer process (storescp ...) with :func:`peer_env`, its output discarded."""
    return subprocess.Popen(list(command), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=peer_env())


def echo_ok(port: int, called: str) -> bool:
    """Whether a C-ECHO to 127.0.0.1:``port`` succeeds (dcmtk's echoscu)."""
    return subprocess.run([ECHOSCU, "-aec", called, "127.0.0.1", str(port)],
                          capture_output=True, env=peer_env(), timeout=30).returncode == 0


def wait_for(probe: Callable[[], bool], timeout: float, what: str,
             interval: float = 0.1) -> None:
    """Poll ``probe`` until it holds; TimeoutError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)


def peak_rss_mib(pid: int, unknown: float = 0.0) -> float:
    """VmHWM of a live process (MiB); ``unknown`` when it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return unknown


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average(decimals: int = 2) -> str:
    return " ".join(f"{x:.{decimals}f}" for x in os.getloadavg())


class RssSampler:
    """Samples a process's resident set (anonymous vs file-mapped pages) every 20 ms:
    anonymous is heap and buffers, file-mapped is the pages of memory-mapped blobs read."""

    FIELDS = ("VmRSS", "RssAnon", "RssFile")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = dict.fromkeys(self.FIELDS, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                text = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:
                return
            for line in text.splitlines():
                key = line.split(":", 1)[0]
                if key in self.peak:
                    self.peak[key] = max(self.peak[key], int(line.split()[1]) / 1024)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {key: round(value, 1) for key, value in self.peak.items()}


# -- timing --------------------------------------------------------------------------------
class Clock:
    """Seconds since it was made; :meth:`log` prints a line stamped with them."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.start

    def log(self, msg: str) -> None:
        print(f"[{self.seconds:7.1f} s] {msg}", flush=True)


def timed(fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
    """``fn(*args, **kwargs)`` and the seconds it took."""
    t0 = time.monotonic()
    result = fn(*args, **kwargs)
    return result, time.monotonic() - t0


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q`` quantile of sorted values (nearest rank)."""
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# -- output --------------------------------------------------------------------------------
def print_figures(figures: Mapping[str, object], width: int, as_json: bool = False) -> None:
    """``key: value`` per line after a blank line (keys right-aligned), then JSON if asked."""
    print()
    for key, value in figures.items():
        print(f"{key:>{width}}: {value}")
    if as_json:
        print(json.dumps(figures))


def scores_text(scores: Mapping[str, float], sep: str = ", ") -> str:
    """``liver 0.912, spleen 0.874``."""
    return sep.join(f"{k} {v:.3f}" for k, v in scores.items())


def args_json(args: argparse.Namespace) -> dict[str, Any]:
    """The run's options as JSON values (paths as text)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def write_json(path: Path, doc: object, default: Callable[[Any], Any] | None = None) -> None:
    """``doc`` as indented JSON at ``path`` (its folder made if need be)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=default))


def pyplot() -> Any:
    """matplotlib's pyplot, drawing to files only. Called when a benchmark module loads,
    so a missing ``bench`` extra fails at once, not after the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int) -> None:
    """Lay out, write and close a figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
