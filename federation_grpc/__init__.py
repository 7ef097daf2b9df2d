"""Federation over gRPC: the hub and the node-side client. Never imports dicom_node or torch."""
