"""The handshake of one connection (protocol/qkdp-v2.md §10–§13, §17–§18): version, authentication, and
the agreement on round numbers, pending rounds and the key reserve.

Theory of operation
-------------------
Both sides send ``hello`` at once; the newest handshake key both hellos list (§17) — else the PKI, else
the PSK — authenticates the ``auth`` proofs over both hellos, and the frame MACs of the session come from
it. Nothing of a hello is stored (I2): every durable write below happens only after the peer's proof
verified — retiring older handshake keys and the PSK — or on the authenticated ``sync`` and ``resolve``,
which agree on the reserve position (the larger of both), round numbers, Bob's pending rounds and
Alice's next handshake key. Which key, when a new one, when the PSK retires: :mod:`qkdd.policy`.

The handshake knows no round. It sends through the ``send`` it is given (the engine sequences and MACs
frames) and hands its durable writes to ``act``; once it reports :class:`~qkdd.interface.Ready`, the engine
takes the authenticated session (version, method, MACs, reserve position, next round) from it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from qkdd import messages, policy, wire
from qkdd.auth import pki
from qkdd.auth import psk as psk_auth
from qkdd.bits import RandomSource
from qkdd.errors import RemoteProtocolError
from qkdd.interface import (
    KEEPALIVE_CAPABILITY,
    KEY_CHANNEL_CAPABILITY,
    LIVENESS_CAPABILITY,
    NONCE_BYTES,
    SUPPORTED_VERSIONS,
    Action,
    ConsumeReserve,
    EngineSettings,
    Ready,
    ResolvePending,
    RetirePsk,
    SetHandshakeKeys,
    State,
    StoreView,
)


def version_mismatch(ours: Sequence[int], theirs: Sequence[int]) -> RemoteProtocolError:
    """§10: no version in common (the error frame lists ours)."""
    return RemoteProtocolError(
        f"no common protocol version: peer speaks {list(theirs)}, we speak {list(ours)}",
        code="version-mismatch",
    )


class Handshake:
    """The handshake of one connection, for ``role``; ``send(name, **fields)`` sends a message and
    ``act(action)`` hands the driver a durable write, both in order."""

    def __init__(
        self,
        role: str,
        settings: EngineSettings,
        store: StoreView,
        random: RandomSource,
        *,
        send: Callable[..., None],
        act: Callable[[Action], None],
        macs: dict[str, psk_auth.FrameMac],
    ) -> None:
        self.role = role
        self.peer_role = "bob" if role == "alice" else "alice"
        self.settings = settings
        self._store = store
        self._send = send
        self._act = act
        self.version: int | None = None
        self.peer_capabilities: tuple[str, ...] = ()
        self.auth = "psk"  # how this connection was authenticated
        #: the session's frame MAC by sender, filled in once derived (the session layer's, shared)
        self.macs = macs
        #: the first unused reserve bit as agreed with the peer (§17), from its authenticated sync on
        self.pointer = 0
        self.next_round = store.next_round
        #: how many rounds may be open at once: the smaller of the two sides' (§13), from the peer's sync
        self.window = 1
        self.own_pending = store.pending_rounds() if role == "bob" else []
        self.keys = store.reserve.handshake_keys()  # §17: our handshake keys, as of this connection
        self.hellos: dict[str, bytes] = {}
        self._key: int | None = None  # the handshake key this connection authenticates with
        self._secret = b""
        self._peer_total = 0  # the peer's committed reserve bits, from its (authenticated) sync
        self._capabilities: list[str] = []  # what our hello offered
        self._nonce = random.bytes(NONCE_BYTES)
        self._transcript = b""
        # §18, PKI mode: both nonces, the hybrid key exchange and Alice's offer
        self._nonces = (b"", b"")
        self._exchange: pki.Exchange | None = None
        self._kex_alice = b""

    def hello(self) -> bytes:
        """Our hello's body (§10)."""
        capabilities = []
        if not self._store.psk_retired or self.settings.fallback_to_psk:
            capabilities.append(pki.CAPABILITY if self.settings.pki is not None else psk_auth.CAPABILITY)
        if self.settings.key_channel:
            capabilities.append(KEY_CHANNEL_CAPABILITY)
        capabilities.append(KEEPALIVE_CAPABILITY)  # Bob takes keepalive in IDLE (§13)
        capabilities.append(LIVENESS_CAPABILITY)  # keepalives both ways, bounded silence (§13)
        self._capabilities = capabilities
        body = wire.encode_message(
            "hello",
            versions=list(self.settings.versions),
            capabilities=capabilities,
            role=self.role,
            link_id=self.settings.link_id,
            nonce=self._nonce,
            keys=self.keys.positions(),
        )
        self.hellos[self.role] = body
        return body

    def received_hello(self, body: bytes) -> None:
        """The peer's hello body, as received (the proofs cover it)."""
        self.hellos[self.peer_role] = body

    def on_hello(self, message: messages.Hello) -> State:
        common = set(message.versions) & set(self.settings.versions)
        if not common:
            raise version_mismatch(self.settings.versions, message.versions)
        self.version = max(common)
        self.peer_capabilities = tuple(message.capabilities)
        if message.role != self.peer_role:
            raise RemoteProtocolError(f"the peer says it is {message.role}, as we are", code="wrong-peer")
        if message.link_id != self.settings.link_id:
            raise RemoteProtocolError(
                f"the peer serves link {message.link_id[:64]!r}, we serve {self.settings.link_id!r}",
                code="wrong-peer",
            )
        transcript = psk_auth.transcript_hash(self.hellos["alice"], self.hellos["bob"])
        self._transcript = transcript
        nonces = self._nonce, message.nonce
        alice_nonce, bob_nonce = nonces if self.role == "alice" else nonces[::-1]
        ours = self._capabilities
        # §17: nothing of the hello is stored; a tampered key list only makes the proofs fail
        key = policy.choose_key(self.keys.positions(), message.keys)
        if key is not None:
            self.auth = "reserve"
            self._key = key
            secret = self._store.reserve.handshake_key(key)
            self._secret = secret
            self.macs.update(psk_auth.session_macs(secret, alice_nonce, bob_nonce, transcript))
            if self.role == "alice":  # §17: Bob proves only once Alice's proof verified (on_auth)
                self._send_proof(secret)
            return State.AUTH
        if "pki" in ours and "pki" in message.capabilities:
            assert self.settings.pki is not None
            self.auth = "pki"
            self._nonces = alice_nonce, bob_nonce
            exchange = self._exchange = pki.Exchange()
            if self.role == "alice":
                self._kex_alice = exchange.offer()
                self._send(
                    "auth",
                    proof=self.settings.pki.sign(pki.signed_data("alice", transcript, self._kex_alice)),
                    certificate=self.settings.pki.certificate_der,
                    kex=self._kex_alice,
                )
            return State.AUTH
        if "psk" not in ours or "psk" not in message.capabilities:
            raise self._no_common_authentication(message)
        self.macs.update(psk_auth.session_macs(self.settings.psk, alice_nonce, bob_nonce, transcript))
        self._send(
            "auth", proof=psk_auth.proof(self.settings.psk, self.role, transcript), certificate=b"", kex=b""
        )
        return State.AUTH

    def _pki_auth(self, message: messages.Auth) -> None:
        """§18: check the peer's certificate and signature; finish the hybrid exchange."""
        identity = self.settings.pki
        assert identity is not None
        certificate = identity.check_peer(message.certificate)
        if self.role == "bob":
            kex_alice = message.kex
            pki.verify_signature(
                certificate, message.proof, pki.signed_data("alice", self._transcript, kex_alice)
            )
            assert self._exchange is not None
            kex_bob, shared = self._exchange.accept(kex_alice)
            self._send(
                "auth",
                proof=identity.sign(pki.signed_data("bob", self._transcript, kex_alice, kex_bob)),
                certificate=identity.certificate_der,
                kex=kex_bob,
            )
        else:
            kex_alice, kex_bob = self._kex_alice, message.kex
            pki.verify_signature(
                certificate, message.proof, pki.signed_data("bob", self._transcript, kex_alice, kex_bob)
            )
            assert self._exchange is not None
            shared = self._exchange.finish(kex_bob)
        secret = pki.session_secret(shared, self._transcript, kex_alice, kex_bob)
        self.macs.update(psk_auth.session_macs(secret, *self._nonces, self._transcript))

    def _send_proof(self, secret: bytes) -> None:
        proof = psk_auth.proof(secret, self.role, self._transcript)
        self._send("auth", proof=proof, certificate=b"", kex=b"")

    def _no_common_authentication(self, message: messages.Hello) -> RemoteProtocolError:
        """§17: the hellos share no handshake key and no bootstrap method. The reason names the roles
        (it reaches the peer too) and says which state is behind: a reset one lists no key, a restored
        one lists older keys, a drained reserve has none left with the PSK retired."""
        me, peer = self.role, self.peer_role
        ours, theirs = self.keys.positions(), list(message.keys)
        if ours and not theirs:  # a new key store (or a hello rewritten in transit)
            return RemoteProtocolError(
                f"{peer} lists no handshake key, {me} holds keys at reserve bits {ours} and no bootstrap "
                f"method {peer} offers: {peer}'s state directory was reset or lost; if this lasts, "
                "re-bootstrap the link",
                code="stale-state",
            )
        if ours:  # the peer lists none of our keys: a restore, or a hello rewritten in transit
            return RemoteProtocolError(
                f"no handshake key in common: {me}'s at reserve bits {ours}, {peer}'s at {theirs[:2]}; if "
                "this lasts, one state directory was restored from a backup: re-bootstrap the link",
                code="stale-state",
            )
        if self._store.psk_retired:
            return RemoteProtocolError(
                f"{me}'s key reserve is drained: no handshake key left and the PSK retired ({peer}'s keys "
                f"at {theirs[:2]}); re-bootstrap the link",
                code="reserve-exhausted",
            )
        capabilities = list(message.capabilities)[:4]
        if theirs:  # we would take the PSK; the peer retired it and authenticates from its reserve
            return RemoteProtocolError(
                f"{me}'s key store is new (no handshake key, PSK not retired) while {peer} has retired the "
                f"PSK and holds keys at reserve bits {theirs[:2]}: {me}'s state directory was reset or "
                "lost; re-bootstrap the link",
                code="wrong-peer",
            )
        return RemoteProtocolError(
            f"no common authentication: {me} offers {self._capabilities}, {peer} {capabilities}, and "
            "neither holds a handshake key (psk against pki? set the same auth.method on both sides)",
            code="wrong-peer",
        )

    def on_auth(self, message: messages.Auth) -> State:
        if self.auth != "pki" and (message.certificate or message.kex):
            # §18: only a PKI proof has them, and no PSK or handshake-key proof covers them
            raise RemoteProtocolError(f"a {self.auth} auth carries a certificate or a key exchange")
        if self.auth == "reserve":
            psk_auth.verify_proof(self._secret, self.peer_role, self._transcript, message.proof)
            assert self._key is not None
            # §17: the peer holds this key, so older ones are never needed again
            keys = policy.after_verified(self.keys, self._key, self._store.reserve.total_bits)
            if keys != self.keys:
                self.keys = keys
                self._act(SetHandshakeKeys(keys))
            if policy.retire_psk(self.auth, self._store.psk_retired, self.settings.fallback_to_psk):
                self._act(RetirePsk())
            if self.role == "bob":
                self._send_proof(self._secret)
        elif self.auth == "pki":
            self._pki_auth(message)
        else:
            psk_auth.verify_proof(self.settings.psk, self.peer_role, self._transcript, message.proof)
        reserve = self._store.reserve
        self._send(
            "sync",
            next_round=self.next_round,
            pending=self.own_pending[:1024],
            qber_threshold=self.settings.qber_threshold,
            eps_sec=self.settings.eps_sec,
            eps_cor=self.settings.eps_cor,
            key_block_bits=self.settings.key_block_bits,
            reserve_total=reserve.total_bits,
            reserve_consumed=reserve.consumed,
            window=self.settings.window,
        )
        return State.SYNC

    def on_sync(self, message: messages.Sync) -> State:
        for name in ("qber_threshold", "eps_sec", "eps_cor", "key_block_bits"):
            if getattr(message, name) != getattr(self.settings, name):
                raise RemoteProtocolError(
                    f"{name}: the peer uses {getattr(message, name)}, we use {getattr(self.settings, name)}",
                    code="config-mismatch",
                )
        self.next_round = max(self.next_round, message.next_round)
        self.window = min(self.settings.window, message.window)
        # §17: both continue from the larger position, learnt only now that the peer is authenticated,
        # so no pad either side marked used is used again, and a stranger moves nothing
        self.pointer = max(self._store.reserve.consumed, message.reserve_consumed)
        self._peer_total = message.reserve_total
        if self.pointer > self._store.reserve.consumed:
            self._act(ConsumeReserve(self.pointer))
        if self.role == "bob":
            if message.pending:
                raise RemoteProtocolError("Alice never has pending rounds")
            return State.RESOLVING
        committed = self._store.committed_among(message.pending)
        self._send("resolve", committed=committed, key_next=self.announce_key())
        self._act(self.ready())
        return State.IDLE

    def announce_key(self) -> list[int]:
        """Alice: the handshake key she announces in ``resolve`` (§17) — her unused next key again, or a
        new one at the agreed first unused bit when policy wants one and both reserves hold it."""
        total = self._store.reserve.total_bits
        keyed = self.auth == "reserve"
        if policy.want_new_key(
            self.keys, total, self.settings.reserve_switch_bits, keyed=keyed
        ) and policy.key_fits(self.pointer, self._store.reserve.consumed, min(total, self._peer_total)):
            self.keys = dataclasses.replace(self.keys, next=self.pointer)
            self.pointer += policy.HANDSHAKE_KEY_BITS
            self._act(ConsumeReserve(self.pointer))  # its bits are never a pad
            self._act(SetHandshakeKeys(self.keys))
        return [] if self.keys.next is None else [self.keys.next]

    def ready(self) -> Ready:
        keys = KEY_CHANNEL_CAPABILITY in self.peer_capabilities and self.settings.key_channel
        return Ready(self.version or SUPPORTED_VERSIONS[-1], self.auth, dict(self.macs) if keys else None)

    def on_resolve(self, message: messages.Resolve) -> State:
        if not set(message.committed) <= set(self.own_pending):
            raise RemoteProtocolError("resolve lists a round that is not pending here")
        self._act(ResolvePending(tuple(message.committed)))
        for key in message.key_next:
            self._take_announced_key(key)
        self._act(self.ready())
        return State.IDLE

    def _take_announced_key(self, key: int) -> None:
        """Bob: Alice's announced handshake key (§17), from an authenticated ``resolve``: keep it as next
        and mark its bits used (Alice did before announcing it)."""
        if key in self.keys.positions():
            return
        if key + policy.HANDSHAKE_KEY_BITS > self._store.reserve.total_bits or (
            self.keys.current is not None and key < self.keys.current
        ):
            raise RemoteProtocolError(
                f"resolve announces a handshake key at reserve bit {key}; Bob holds "
                f"{self._store.reserve.total_bits} bits and keys {self.keys.positions()}"
            )
        self.keys = dataclasses.replace(self.keys, next=key)
        self.pointer = max(self.pointer, key + policy.HANDSHAKE_KEY_BITS)
        self._act(ConsumeReserve(self.pointer))
        self._act(SetHandshakeKeys(self.keys))
