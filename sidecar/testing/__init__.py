"""The one harness that the demo, the tests and the benchmarks share.

- ``scratch``: a run's scratch cgroup, pin directory and work folder, and their removal;
- ``daemon_process``: ``sidecar run`` as its own process: config file, start,
  wait for READY=1, stop or kill, its JSON-lines events;
- ``inprocess``: the daemon on its own loop in a thread of the caller;
- ``stack``: a collector, an enrolled host and a daemon, as processes;
- ``postgres``: a throwaway PostgreSQL cluster on a unix socket, for the
  collector's shared store;
- ``hosts``: simulated hosts that sign real hash-chained batches for a collector;
- ``demo`` and ``soak``: the stories told with them.
"""
