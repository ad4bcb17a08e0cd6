"""Credentials for attested workloads: CA, X.509/JWT SVIDs and the SPIFFE Workload API."""
