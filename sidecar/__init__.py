"""eBPF host sidecar: runtime identity and least agency for AI agents."""

__version__ = "0.1.0"
