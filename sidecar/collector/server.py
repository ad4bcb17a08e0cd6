"""The collector's gRPC servers: mTLS Collector service and TLS Enrollment service.

Why two listeners: everything that touches events requires a client certificate at
the TLS layer, so a client without one never reaches our code.  Only enrollment,
where a host has no certificate yet and proves itself with a join token, is served
on a second port that does not ask for one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import secrets
import signal
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any, TypeVar

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.message import DecodeError

from sidecar.api.v1 import collector_pb2, collector_pb2_grpc, event_pb2
from sidecar.collector.broker import Broker, StoreFeed
from sidecar.collector.config import CollectorConfig
from sidecar.collector.store import (
    BootstrapUse,
    Differs,
    HostState,
    NewEvent,
    Plan,
    SignedBatch,
    Store,
    open_store,
)
from sidecar.collector.tls import peer_svid, roots_pem, server_credentials
from sidecar.collector.verify import (
    BatchError,
    Checked,
    Verified,
    decide_batch,
    resent_differs,
    verify_batch,
)
from sidecar.identity.spiffeid import SpiffeId, parse_spiffe_id
from sidecar.identity.x509 import BACKDATE, CertificateAuthority
from sidecar.util.errors import CredentialError, SidecarError, TransportError

_logger = logging.getLogger(__name__)
T = TypeVar("T")
Ctx = grpc.aio.ServicerContext
HOST_PREFIX = "/host/"
#: How often a collector prepares the store's coming days and drops expired ones.
MAINTENANCE_INTERVAL_S = 3600.0
#: Batches of at most this many events are verified on the event loop (see Publish).
VERIFY_ON_LOOP_EVENTS = 1000


def token_hash(token: str) -> str:
    """Join tokens are stored hashed: a copy of the database cannot enroll a host."""
    return hashlib.sha256(token.encode()).hexdigest()


def host_name_of(sid: SpiffeId) -> str | None:
    """``spiffe://td/host/<name>`` -> ``<name>``; None for any other ID."""
    if sid.path.startswith(HOST_PREFIX) and "/" not in sid.path[len(HOST_PREFIX) :]:
        return sid.path[len(HOST_PREFIX) :]
    return None


def create_join_token(store: Store, trust_domain: str, host: str, ttl_s: int) -> str:
    """A single-use token with which ``host`` can enroll within ``ttl_s`` seconds."""
    try:
        sid = parse_spiffe_id(f"spiffe://{trust_domain}{HOST_PREFIX}{host}")
    except ValueError as exc:
        raise CredentialError(f"host name '{host}': {exc}") from exc
    if host_name_of(sid) != host:
        raise CredentialError(f"host name '{host}' must be one path segment")
    token = secrets.token_hex(24)  # hex: never starts with "-", which a CLI would misread
    store.add_join_token(token_hash(token), host, time.time_ns() + ttl_s * 1_000_000_000)
    return token


#: A node name as Kubernetes spells one (a DNS-1123 subdomain): what a bootstrap
#: token may enroll, as the host name of the certificate.
_NODE_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
NODE_NAME_MAX = 253
BOOTSTRAP_USES_MAX = 100_000


def check_node_name(name: str) -> str | None:
    """Why ``name`` cannot be a bootstrap-enrolled host name, or None when it can."""
    if not name:
        return "a bootstrap enrollment needs a node name"
    if len(name) > NODE_NAME_MAX or not _NODE_NAME.fullmatch(name):
        shown = name[:64] + ("..." if len(name) > 64 else "")
        return (
            f"node name {shown!r} is not a Kubernetes node name (lower-case letters, digits,"
            f" '-' and '.', at most {NODE_NAME_MAX} characters)"
        )
    return None


def create_bootstrap_token(store: Store, uses: int, ttl_s: int) -> str:
    """A token that enrolls at most ``uses`` node names, each once, within ``ttl_s`` seconds."""
    if not 0 < uses <= BOOTSTRAP_USES_MAX:
        raise CredentialError(f"--uses must be from 1 to {BOOTSTRAP_USES_MAX}, not {uses}")
    if ttl_s <= 0:
        raise CredentialError(f"a bootstrap token's lifetime must be positive, not {ttl_s}")
    token = secrets.token_hex(24)  # hex: never starts with "-", which a CLI would misread
    now = time.time_ns()
    store.add_bootstrap_token(token_hash(token), uses, now + ttl_s * 1_000_000_000, now)
    return token


def revoked_by(leaf: x509.Certificate, revoked_ns: int | None) -> bool:
    """Whether ``leaf`` was issued no later than the host's revocation.

    Certificates are backdated by a fixed margin: adding it back gives the
    second of issue.  One issued in the very second of the revocation counts
    as revoked.
    """
    if revoked_ns is None:
        return False
    issued = leaf.not_valid_before_utc + BACKDATE
    return int(issued.timestamp()) * 1_000_000_000 <= revoked_ns


async def _after_revocation(core: _Core, host: str) -> None:
    """Wait, if need be, until a certificate issued now is later than ``host``'s revocation.

    Revocation refuses what was issued up to its second (see :func:`revoked_by`):
    a host re-admitted within that second waits for the next one, or its new
    certificate would count as revoked too.
    """
    revoked = await core.db(core.store.host_revoked_ns, host)
    if revoked is not None:
        wait_ns = (revoked // 1_000_000_000 + 1) * 1_000_000_000 - time.time_ns()
        if wait_ns > 0:
            await asyncio.sleep(wait_ns / 1e9)


class _Core:
    """State shared by both services: config, CA, store and its database threads.

    The host's chain state is read from the store inside each batch's transaction,
    never cached here: with a shared store another replica may have moved it (the
    PostgreSQL store remembers heads, and stores only while the remembered one holds).
    """

    def __init__(self, config: CollectorConfig) -> None:
        self.config = config
        try:
            config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise TransportError(f"cannot create {config.data_dir}: {exc}") from exc
        self.ca = CertificateAuthority.load_or_generate(config.ca_dir, config.trust_domain)
        self.store: Store = open_store(config)
        try:
            der = self.ca.certificate.public_bytes(serialization.Encoding.DER)
            self.store.check_root(config.trust_domain, der)
        except BaseException:
            self.store.close()
            raise
        self.broker = Broker(config.subscriber_buffer)
        # SQLite: one thread, the single writer, which also orders the fan-out.
        # PostgreSQL: one per connection; the fan-out reads rows back (StoreFeed).
        self._db = ThreadPoolExecutor(
            max_workers=self.store.threads, thread_name_prefix="collector-db"
        )
        self.publish_own = True  # False once a StoreFeed reads every row back
        self._host_locks: dict[str, asyncio.Lock] = {}
        from sidecar.metrics import CollectorMetrics

        self.metrics = CollectorMetrics()

    async def db(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._db, fn, *args)

    def close(self) -> None:
        self._db.shutdown(wait=True)
        self.store.close()

    async def ingest_batch(
        self, host: str, batch: collector_pb2.Batch, key: ec.EllipticCurvePublicKey
    ) -> Checked:
        """Verify and store one batch (see :meth:`ingest_verified`)."""
        verified = verify_batch(batch, host, key, self.config.max_batch_events)
        return await self.ingest_verified(host, verified)

    async def ingest_verified(self, host: str, verified: Verified) -> Checked:
        """Verify ``batch`` against the stored chain and store it, in one transaction.

        Raises BatchError for a malformed batch (nothing stored).  With a store
        only this process writes, schedules the fan-out from the writer thread, in
        cursor order.
        """
        loop = asyncio.get_running_loop()
        batch = verified.batch
        began = time.monotonic()

        def write() -> Checked:
            seen: list[Checked] = []

            def decide(state: HostState) -> Plan:
                checked = decide_batch(verified, state)
                seen.append(checked)
                rows = [
                    NewEvent(a, a.SerializeToString(), collector_pb2.VERIFICATION_COLLECTOR)
                    for a in checked.alerts
                ]
                rows.extend(checked.events)
                held = (batch, checked.quarantine) if checked.quarantine else None
                signed = None
                if not held:  # kept with its events, to check the chain again later
                    signed = SignedBatch(
                        host,
                        batch.first_sequence,
                        batch.last_sequence,
                        batch.prev_chain,
                        verified.chains,
                        batch.signature,
                        verified.signer,
                    )

                def differs(sequences: list[int]) -> Differs:
                    alert = resent_differs(host, sequences)
                    checked.alerts.append(alert)
                    row = NewEvent(
                        alert, alert.SerializeToString(), collector_pb2.VERIFICATION_COLLECTOR
                    )
                    return [row], (batch, "resent_differs")

                return Plan(rows, checked.state, held, signed, differs)

            stored = self.store.ingest_checked(host, decide)
            checked = seen[-1]
            if stored and self.publish_own:
                loop.call_soon_threadsafe(self.broker.publish, stored)
            offered = len(checked.alerts) + len(checked.events)
            self.metrics.record_stored(host, len(stored))
            if offered > len(stored):
                self.metrics.record_duplicates(host, offered - len(stored))
            self.metrics.record_ingest(host, time.monotonic() - began, time.time())
            return checked

        return await self.db(write)

    def host_lock(self, host: str) -> asyncio.Lock:
        return self._host_locks.setdefault(host, asyncio.Lock())

    async def host_state(self, host: str) -> HostState:
        return await self.db(self.store.host_state, host)

    def issue(
        self, host: str, csr_der: bytes, host_csr_der: bytes
    ) -> collector_pb2.HostCredentials:
        """Host SVID (signed by the root) and the host's intermediate CA, both for the
        host's own keys: only certificate requests travel, never a private key."""
        try:
            csr = x509.load_der_x509_csr(csr_der)
            host_csr = x509.load_der_x509_csr(host_csr_der)
        except ValueError as exc:
            raise CredentialError(f"certificate request cannot be read: {exc}") from exc
        inter = self.ca.sign_intermediate_csr(
            csr, timedelta(seconds=self.config.intermediate_ttl_s)
        )
        sid = f"spiffe://{self.ca.trust_domain}{HOST_PREFIX}{host}"
        cert = self.ca.sign_x509_svid_csr(
            sid, timedelta(seconds=self.config.host_svid_ttl_s), host_csr
        )
        der = serialization.Encoding.DER
        return collector_pb2.HostCredentials(
            spiffe_id=sid,
            host_svid=cert.public_bytes(der),
            intermediate_ca=inter.public_bytes(der),
            trust_bundle=[c.public_bytes(der) for c in self.ca.bundle()],
        )


async def _authenticate(
    context: Ctx[object, object], core: _Core
) -> tuple[SpiffeId, x509.Certificate]:
    try:
        return peer_svid(context, core.ca)
    except CredentialError as exc:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        raise  # abort raises; this satisfies the type checker


async def _host_peer(
    context: Ctx[object, object], core: _Core
) -> tuple[str, ec.EllipticCurvePublicKey]:
    sid, leaf = await _authenticate(context, core)
    host = host_name_of(sid)
    key = leaf.public_key()
    if host is None or not isinstance(key, ec.EllipticCurvePublicKey):
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{sid} is not a host SVID")
        raise AssertionError("unreachable")
    if revoked_by(leaf, await core.db(core.store.host_revoked_ns, host)):
        _logger.warning("refused host %s: its certificate was revoked", host)
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED, f"the certificate of host {host} was revoked"
        )
        raise AssertionError("unreachable")
    return host, key


async def _subscriber_peer(context: Ctx[object, object], core: _Core) -> SpiffeId:
    sid, _ = await _authenticate(context, core)
    if sid not in core.config.subscribers:
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED, f"{sid} is not listed as a subscriber"
        )
    return sid


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Take a dropped future's outcome, so that nothing logs it as never retrieved."""
    if not future.cancelled():
        future.exception()


class CollectorService(collector_pb2_grpc.CollectorServicer):
    def __init__(self, core: _Core) -> None:
        self.core = core

    async def Publish(
        self,
        request_iterator: AsyncIterator[collector_pb2.Batch],
        context: Ctx[collector_pb2.Batch, collector_pb2.Ack],
    ) -> AsyncIterator[collector_pb2.Ack]:
        core = self.core
        host, key = await _host_peer(context, core)  # type: ignore[arg-type]
        yield collector_pb2.Ack(acked_sequence=(await core.host_state(host)).last_sequence)
        batches = request_iterator.__aiter__()
        max_events = core.config.max_batch_events

        async def receive() -> Verified | None:
            """The next batch, decoded and its signature checked (None at the stream's end).

            Runs while the batch before it is being stored, so the checks that need
            no stored state do not wait their turn.  A small batch is checked right
            here, on the event loop: handing it to a thread and back cost more than
            the check (about 2.5 µs an event); a large one goes to a thread, so
            that the loop keeps serving the other streams meanwhile.
            """
            try:
                batch = await batches.__anext__()
            except StopAsyncIteration:
                return None
            if len(batch.events) <= VERIFY_ON_LOOP_EVENTS:
                return verify_batch(batch, host, key, max_events)
            return await asyncio.to_thread(verify_batch, batch, host, key, max_events)

        ahead: asyncio.Future[Verified | None] = asyncio.ensure_future(receive())
        try:
            while True:
                try:
                    verified = await ahead
                except DecodeError as exc:  # bytes that are no Batch: the client's error
                    _logger.warning("host %s sent bytes that are not a batch: %s", host, exc)
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, f"the message is not a Batch: {exc}"
                    )
                    return
                except BatchError as exc:
                    _logger.warning("host %s sent a malformed batch: %s", host, exc)
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                    return
                if verified is None:
                    return
                ahead = asyncio.ensure_future(receive())
                # In-process lock: this replica's streams of one host wait here rather
                # than in the database; across replicas the store's host lock serialises.
                async with core.host_lock(host):
                    checked = await core.ingest_verified(host, verified)
                    for alert in checked.alerts:
                        _logger.warning(
                            "integrity alert for host %s: %s", host, alert.integrity.detail
                        )
                        core.metrics.record_verification_failure(
                            event_pb2.IntegrityAlert.Kind.Name(alert.integrity.kind)
                            .removeprefix("KIND_")
                            .lower()
                        )
                yield collector_pb2.Ack(acked_sequence=checked.state.last_sequence)
        finally:
            # A batch read ahead and never acknowledged: the host sends it again.
            ahead.cancel()
            ahead.add_done_callback(_retrieved)

    async def Subscribe(
        self,
        request: collector_pb2.SubscribeRequest,
        context: Ctx[collector_pb2.SubscribeRequest, collector_pb2.StoredEvent],
    ) -> AsyncIterator[collector_pb2.StoredEvent]:
        core = self.core
        await _subscriber_peer(context, core)  # type: ignore[arg-type]
        start = request.WhichOneof("start")
        if start == "after_cursor":
            cursor = request.after_cursor
        elif start == "since_time_ns":
            cursor = await core.db(core.store.first_cursor_since, request.since_time_ns)
        else:
            cursor = await core.db(core.store.last_cursor)
        page = core.config.query_page_size
        # Replay from the store, then subscribe and replay once more what was stored
        # meanwhile; from then on the live queue has everything after the cursor.
        sub = None
        try:
            for _ in range(2):
                while True:
                    rows = await core.db(core.store.query, request.filter, cursor, page)
                    for se in rows:
                        yield se
                        cursor = se.cursor
                    if len(rows) < page:
                        break
                if sub is None:
                    sub = core.broker.add(request.filter, cursor)
                    core.metrics.set_subscribers(len(core.broker))
            assert sub is not None
            while True:
                if sub.overflowed:
                    await context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"subscriber too slow: its buffer of {core.broker.buffer} events"
                        f" overflowed; resume with after_cursor={cursor}",
                    )
                se = await sub.queue.get()
                if se.cursor <= cursor:
                    continue
                yield se
                cursor = se.cursor
        finally:
            if sub is not None:
                core.broker.remove(sub)
                core.metrics.set_subscribers(len(core.broker))

    async def Query(
        self,
        request: collector_pb2.QueryRequest,
        context: Ctx[collector_pb2.QueryRequest, collector_pb2.QueryResponse],
    ) -> collector_pb2.QueryResponse:
        core = self.core
        await _subscriber_peer(context, core)  # type: ignore[arg-type]
        limit = min(request.limit or core.config.query_page_size, core.config.query_page_size)
        rows = await core.db(core.store.query, request.filter, request.after_cursor, limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        nxt = rows[-1].cursor if rows else request.after_cursor
        return collector_pb2.QueryResponse(events=rows, next_cursor=nxt, more=more)

    async def Renew(
        self,
        request: collector_pb2.RenewRequest,
        context: Ctx[collector_pb2.RenewRequest, collector_pb2.HostCredentials],
    ) -> collector_pb2.HostCredentials:
        host, _ = await _host_peer(context, self.core)  # type: ignore[arg-type]
        try:
            creds = self.core.issue(host, request.intermediate_csr, request.host_csr)
        except CredentialError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise
        _logger.info("renewed credentials of host %s", host)
        return creds


class EnrollmentService(collector_pb2_grpc.EnrollmentServicer):
    def __init__(self, core: _Core) -> None:
        self.core = core

    async def Enroll(
        self,
        request: collector_pb2.EnrollRequest,
        context: Ctx[collector_pb2.EnrollRequest, collector_pb2.HostCredentials],
    ) -> collector_pb2.HostCredentials:
        core = self.core
        if request.bootstrap_token or request.node_name:
            host = await self._bootstrap(request, context)
        else:
            maybe = await core.db(
                core.store.use_join_token, token_hash(request.join_token), time.time_ns()
            )
            if maybe is None:
                _logger.warning("refused an enrollment with an unknown, used or expired join token")
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED, "join token is unknown, used or expired"
                )
                raise AssertionError("unreachable")
            host = maybe
        await _after_revocation(core, host)
        try:
            creds = core.issue(host, request.intermediate_csr, request.host_csr)
        except CredentialError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise
        _logger.info("enrolled host %s", host)
        return creds

    async def _bootstrap(
        self,
        request: collector_pb2.EnrollRequest,
        context: Ctx[collector_pb2.EnrollRequest, collector_pb2.HostCredentials],
    ) -> str:
        """The node name a bootstrap token was just spent on; aborts the call otherwise.

        The token never reaches a log line: only what was refused and why.
        """
        core = self.core
        node = request.node_name
        problem = None
        if request.join_token:
            problem = "an enrollment carries a join token or a bootstrap token, not both"
        elif not request.bootstrap_token:
            problem = "a node name comes with a bootstrap token"
        else:
            problem = check_node_name(node)
        if problem is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
            raise AssertionError("unreachable")
        use = await core.db(
            core.store.use_bootstrap_token,
            token_hash(request.bootstrap_token),
            node,
            time.time_ns(),
        )
        if use is BootstrapUse.REFUSED_TOKEN:
            _logger.warning(
                "refused enrolling node %s: bootstrap token unknown, used up or expired", node
            )
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "bootstrap token is unknown, used up or expired",
            )
            raise AssertionError("unreachable")
        if use is BootstrapUse.REFUSED_NAME:
            _logger.warning("refused enrolling node %s: the name is enrolled already", node)
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS,
                f"node name {node} is enrolled already: its credentials live on that node;"
                " if they were lost, the operator releases the name"
                " (sidecar collector --release-host NAME) or mints a join token for it",
            )
            raise AssertionError("unreachable")
        assert use is BootstrapUse.ENROLLED
        _logger.info("node %s enrolled with a bootstrap token", node)
        return node

    async def GetTrustBundle(
        self,
        request: collector_pb2.TrustBundleRequest,
        context: Ctx[collector_pb2.TrustBundleRequest, collector_pb2.TrustBundle],
    ) -> collector_pb2.TrustBundle:
        der = serialization.Encoding.DER
        return collector_pb2.TrustBundle(
            trust_domain=self.core.ca.trust_domain,
            certificates=[c.public_bytes(der) for c in self.core.ca.bundle()],
        )


class CollectorServer:
    """Both gRPC servers around one store; ``port``/``enrollment_port`` after start."""

    def __init__(self, config: CollectorConfig) -> None:
        self.config = config
        self.core = _Core(config)
        self.port = 0
        self.enrollment_port = 0
        self._servers: list[grpc.aio.Server] = []
        self._cert: tuple[bytes, bytes] | None = None
        self._cert_renew_at = 0.0
        self.cert_rotations = 0  # certificates made so far (the first one included)
        self._feed: asyncio.Task[None] | None = None
        self._maintenance: asyncio.Task[None] | None = None

    @property
    def store(self) -> Store:
        return self.core.store

    @property
    def ca(self) -> CertificateAuthority:
        return self.core.ca

    def _options(self) -> list[tuple[str, int]]:
        n = self.config.max_message_bytes
        return [("grpc.max_receive_message_length", n), ("grpc.max_send_message_length", n)]

    def _current_cert(self) -> tuple[bytes, bytes]:
        """The TLS key and chain to present now: a fresh pair past half of the last one's life.

        gRPC asks before each handshake (dynamic credentials), so a collector that
        runs for months keeps presenting a valid certificate without a restart.
        """
        now = time.monotonic()
        if self._cert is None or now >= self._cert_renew_at:
            ttl = timedelta(seconds=self.config.server_cert_ttl_s)
            self._cert = server_credentials(self.core.ca, self.config.server_names, ttl)
            self._cert_renew_at = now + ttl.total_seconds() / 2
            self.cert_rotations += 1
            if self.cert_rotations > 1:
                _logger.info("collector TLS certificate renewed (valid %s)", ttl)
        return self._cert

    def _dynamic_credentials(self, client_auth: bool) -> grpc.ServerCredentials:
        roots = roots_pem(self.core.ca) if client_auth else None

        def config(cert: tuple[bytes, bytes]) -> Any:
            return grpc.ssl_server_certificate_configuration([cert], root_certificates=roots)

        served = [self._current_cert()]

        def fetch() -> Any:
            cert = self._current_cert()
            if cert is served[0]:
                return None  # keep presenting the one in use
            served[0] = cert
            return config(cert)

        return grpc.dynamic_ssl_server_credentials(
            config(served[0]), fetch, require_client_authentication=client_auth
        )

    def _start_feed(self) -> None:
        """With a shared store, subscribers are fed by reading rows back, whoever stored them."""
        core = self.core
        page = self.config.query_page_size

        async def read(after: int, limit: int) -> list[collector_pb2.StoredEvent]:
            return await core.db(core.store.query, collector_pb2.EventFilter(), after, limit)

        feed = StoreFeed(core.broker, read, page)
        loop = asyncio.get_running_loop()

        def wake() -> None:  # from the store's listener thread
            with contextlib.suppress(RuntimeError):  # the loop is closing
                loop.call_soon_threadsafe(feed.wake)

        if core.store.notify_on_change(wake):
            core.publish_own = False
            self._feed = asyncio.create_task(feed.run(), name="collector-feed")

    async def maintain(self) -> list[int]:
        """Prepare the store's coming days and drop the expired ones (``retention``)."""
        return await self.core.db(self.core.store.maintain, self.config.retention_days)

    async def _maintain_forever(self) -> None:
        """Hourly: days are whole, so an hour late at worst keeps a day an hour longer."""
        while True:
            try:
                await self.maintain()
            except SidecarError as exc:  # the next round tries again
                _logger.warning("store maintenance failed: %s", exc)
            await asyncio.sleep(MAINTENANCE_INTERVAL_S)

    async def start(self) -> None:
        core = self.core
        self._start_feed()
        self._maintenance = asyncio.create_task(self._maintain_forever(), name="store-maintenance")
        main = grpc.aio.server(options=self._options())
        collector_pb2_grpc.add_CollectorServicer_to_server(CollectorService(core), main)
        self.port = _bind(main, self.config.listen, self._dynamic_credentials(True))
        self._servers.append(main)
        if self.config.enrollment_listen:
            enroll = grpc.aio.server(options=self._options())
            collector_pb2_grpc.add_EnrollmentServicer_to_server(EnrollmentService(core), enroll)
            tls = self._dynamic_credentials(False)
            self.enrollment_port = _bind(enroll, self.config.enrollment_listen, tls)
            self._servers.append(enroll)
        for server in self._servers:
            await server.start()
        _logger.info(
            "collector for %s listening on port %d (mTLS), enrollment on port %d",
            self.config.trust_domain,
            self.port,
            self.enrollment_port,
        )

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking calls, let running ones finish for ``grace`` seconds, close the store."""
        g = self.config.grace_s if grace is None else grace
        await asyncio.gather(*(s.stop(g) for s in self._servers))
        self._servers.clear()
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintenance
            self._maintenance = None
        if self._feed is not None:
            self._feed.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._feed
            self._feed = None
        self.core.close()


def _bind(server: grpc.aio.Server, address: str, creds: grpc.ServerCredentials) -> int:
    try:
        port = server.add_secure_port(address, creds)
    except RuntimeError as exc:
        raise TransportError(f"cannot listen on {address}: {exc}") from exc
    if port == 0:
        raise TransportError(f"cannot listen on {address}")
    return port


# How often the health task asks the store for its newest cursor (readiness,
# store size), and how long an answer may take before the store counts as
# unreachable.
STORE_PROBE_S = 5.0
STORE_PROBE_TIMEOUT_S = 5.0


class CollectorHealth:
    """Live while the event loop ticks; ready while the store answers.

    One task on the loop beats the heartbeat, probes the store through the
    store's own threads, publishes its size, and feeds systemd's watchdog
    only while the loop is live.
    """

    def __init__(self, core: _Core) -> None:
        from sidecar.health import Health

        self.core = core
        self.health = Health()
        self.beat = self.health.heartbeat("event loop")
        self.store_problem: str | None = "not ready: the store has not answered yet"
        self.health.require(lambda: self.store_problem)

    async def probe_store(self) -> None:
        core = self.core
        try:
            last = await asyncio.wait_for(core.db(core.store.last_cursor), STORE_PROBE_TIMEOUT_S)
        except asyncio.TimeoutError:  # not TimeoutError before 3.11
            self.store_problem = f"not ready: the store did not answer in {STORE_PROBE_TIMEOUT_S} s"
            return
        except SidecarError as exc:
            self.store_problem = f"not ready: the store does not answer: {exc}"
            return
        self.store_problem = None
        size = None
        if not core.config.store_dsn:
            db = core.config.db_path
            size = sum(f.stat().st_size for f in (db, db.with_name(db.name + "-wal")) if f.exists())
        core.metrics.set_store_size(last, size)

    async def run(self) -> None:
        from sidecar.daemon import sdnotify

        watchdog = sdnotify.watchdog_interval()
        tick = min((watchdog or 2.0) / 2, 1.0)
        next_probe = 0.0
        while True:
            self.beat.beat()
            if time.monotonic() >= next_probe:
                await self.probe_store()
                next_probe = time.monotonic() + STORE_PROBE_S
                self.beat.beat()
            if watchdog and self.health.live().ok:
                _notify_systemd(sdnotify.watchdog)
            await asyncio.sleep(tick)


def _notify_systemd(send: Callable[[], bool]) -> None:
    """Tell systemd; a service manager that stopped listening never stops the collector."""
    try:
        send()
    except SidecarError as exc:
        _logger.warning("%s", exc)


async def serve(config: CollectorConfig) -> None:
    """Run the collector until SIGTERM or SIGINT, then shut down gracefully."""
    from sidecar.daemon import sdnotify

    server = CollectorServer(config)
    await server.start()
    health = CollectorHealth(server.core)
    health_task = asyncio.create_task(health.run(), name="collector-health")
    endpoint = None
    if config.metrics:
        from sidecar.metrics import serve as serve_metrics

        host, _, port = config.metrics.rpartition(":")
        endpoint = serve_metrics(server.core.metrics.registry, host, int(port), health.health)
        _logger.info("metrics and health on %s", endpoint.base)
    # The unit is Type=notify: started once the store is open and the ports listen.
    _notify_systemd(sdnotify.ready)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        _logger.info("stopping: letting running calls finish for %.1fs", config.grace_s)
    finally:
        _notify_systemd(sdnotify.stopping)
        health_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await health_task
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(sig)
        await server.stop()
        if endpoint is not None:
            endpoint.stop()
