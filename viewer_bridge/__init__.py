"""viewer_bridge: DICOMweb (QIDO-RS, WADO-RS, STOW-RS) over the node store for OHIF.

The node starts it on its HTTP port (``[http]`` in the node configuration):
``/dicomweb`` (bearer token or login cookie), ``/healthz``, ``/status`` and, when
``http.ohif_dir`` is set, OHIF's prebuilt viewer at ``/``.
"""
