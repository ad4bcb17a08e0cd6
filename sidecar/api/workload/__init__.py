"""Generated SPIFFE Workload API code (standard workload.proto, no package; see proto/)."""
