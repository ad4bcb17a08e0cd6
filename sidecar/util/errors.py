"""The product's exception tree.

Every error the product raises on purpose is a ``SidecarError``; foreign
exceptions (bcc, grpc, yaml, OSError) are converted at module edges with
``raise ... from``.  The CLI turns a ``SidecarError`` into one line on stderr
and exit code 2.
"""

from __future__ import annotations


class SidecarError(Exception):
    """Root of every error the product raises on purpose."""


class ConfigError(SidecarError):
    """A configuration file or flag is invalid."""


class PolicyError(SidecarError):
    """A policy file is invalid or cannot be applied."""


class AttestationError(SidecarError):
    """A process could not be attested, or registration entries are invalid."""


class KernelError(SidecarError):
    """The kernel cannot run the product's BPF programs, or they failed."""


class TransportError(SidecarError):
    """Talking to a collector, a workload or a peer failed."""


class CredentialError(SidecarError):
    """A certificate, key or token could not be made, loaded or verified."""


class DaemonNotRunning(TransportError):
    """Nothing answers on the daemon's admin socket: it is absent or refuses connections."""
