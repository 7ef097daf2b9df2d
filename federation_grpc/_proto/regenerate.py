"""Regenerate the committed protobuf/gRPC code from ``proto/tessera/federation/v1``.

Usage: ``python -m federation_grpc._proto.regenerate`` (from the repository root).

protoc writes imports as ``from tessera.federation.v1 import x_pb2``; they are rewritten
to ``from federation_grpc._proto import x_pb2`` so the generated modules import as a
package, wherever the repository is.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROTO_ROOT = PACKAGE_DIR.parents[1] / "proto"
PROTO_SUBDIR = Path("tessera/federation/v1")
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
_IMPORT = re.compile(r"^from tessera\.federation\.v1 import ", re.MULTILINE)


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    return sorted((proto_root / PROTO_SUBDIR).glob("*.proto"))


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Generate the code for every .proto file into ``out_dir``; return the written paths."""
    from grpc_tools import protoc  # build-time tool only

    files = proto_files(proto_root)
    if not files:
        raise FileNotFoundError(f"no .proto files under {proto_root / PROTO_SUBDIR}")
    with tempfile.TemporaryDirectory() as raw:
        args = [
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"--python_out={raw}",
            f"--pyi_out={raw}",
            f"--grpc_python_out={raw}",
            *(str(f.relative_to(proto_root)) for f in files),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed: " + " ".join(args))
        written = []
        out_dir.mkdir(parents=True, exist_ok=True)
        for path in sorted((Path(raw) / PROTO_SUBDIR).iterdir()):
            if not path.name.endswith(GENERATED_SUFFIXES):
                continue
            text = _IMPORT.sub("from federation_grpc._proto import ", path.read_text())
            target = out_dir / path.name
            target.write_text(text)
            written.append(target)
    return written


def main() -> None:
    for stale in PACKAGE_DIR.iterdir():
        if stale.name.endswith(GENERATED_SUFFIXES):
            stale.unlink()
    for path in generate(PACKAGE_DIR):
        print(path.relative_to(PACKAGE_DIR.parents[1]))
    shutil.rmtree(PACKAGE_DIR / "__pycache__", ignore_errors=True)


if __name__ == "__main__":
    main()
    sys.exit(0)
