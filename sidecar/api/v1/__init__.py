"""sidecar.api.v1: generated protobuf and gRPC code (do not edit; run scripts/gen-proto.sh)."""
