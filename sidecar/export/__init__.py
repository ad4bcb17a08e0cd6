"""Exporter of the host daemon: queue, disk spool, and signed batches streamed to a collector."""
