"""Generated protobuf and gRPC code. Do not edit: run ``python -m federation_grpc._proto.regenerate``."""
