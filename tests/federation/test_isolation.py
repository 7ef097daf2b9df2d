"""The hub imports neither torch nor dicom_node, even while serving and merging."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from .hubproc import REPO

SCRIPT = textwrap.dedent(
    """
    import sys, tempfile, uuid
    from pathlib import Path
    import numpy as np
    from safetensors.numpy import save
    from federation_grpc.hub.config import HubConfig
    from federation_grpc.hub.process import HubServer
    from federation_grpc.hub import cli  # the CLI module too
    from federation_grpc.client import FederationClient
    from federation_grpc.uploading import UpdateMetadata

    config = HubConfig(data_dir=Path(tempfile.mkdtemp()), port=0, max_workers=8)
    server = HubServer(config, insecure_loopback=True, watch_poll_s=0.1)
    model = {"encoder.w": np.ones((4, 4), np.float32), "heads.a.w": np.ones(2, np.float32)}
    server.service.init_model(save(model), '{"architecture": "unet2d"}')
    server.start()
    token, _ = server.service.create_enrolment_token()
    client = FederationClient(f"127.0.0.1:{server.port}", insecure=True)
    client.enrol(token)
    update = {"encoder.w": np.full((4, 4), 1.1, np.float32)}
    client.upload(save(update), UpdateMetadata(str(uuid.uuid4()), 0, 5, ("encoder",)))
    for generation in client.watch(0):
        break
    assert generation.number == 1, generation
    client.close()
    server.stop(0.5)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "dicom_node"})
    assert not leaked, leaked
    print("clean")
    """
)


def test_hub_process_never_imports_torch_or_dicom_node() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("clean")
