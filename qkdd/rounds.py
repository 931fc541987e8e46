"""One qkdp/2 round, from ``round_start`` to ``committed``, for either role (protocol/qkdp-v2.md §3–§8,
§13, §16).

Theory of operation
-------------------
A :class:`Round` holds everything of one round — the link's record of its frame, the sifted key, the
estimate, Cascade's state, the transcripts, the key blocks — and handles the round's messages
(``on_<message>``), Alice's and Bob's interleaved in protocol order. Each handler returns the state the
round moves to; IDLE means it is over (committed, or dropped through :attr:`Host.end`).

A round sees its session only through its :class:`Host`: sending a message (which the session frames,
sequences, records in the round's transcript and, for ``amplify``, ``commit`` and ``committed`` of a
reserve round, tags with the next one-time pad), emitting a durable action, handing out work
(:class:`~qkdd.interface.Compute`), taking a one-time pad to check the peer's tag, and the reserve's
refill. It holds no session state (sequence numbers, the reserve position, the handshake), so that a
session can hold several rounds at once, each its own object. Work it hands out reads only values it
captured when handing it out; the outcome comes back through :meth:`Round.got` or the ``apply`` it gave.
"""

from __future__ import annotations

import dataclasses
import hmac
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from qkdd import messages, policy
from qkdd.auth import wegman_carter as wc
from qkdd.bits import Bits, RandomSource, pack_bits
from qkdd.errors import RemoteProtocolError
from qkdd.interface import Action, CommitRound, EngineSettings, Outcome, RoundEnded, State
from qkdd.links import LinkInfo
from qkdd.records import RoundSummary, key_blocks, key_ids
from qkdd.stages import amplify, cascade, confirm, estimation, keylength, secrecy, sifting

T = TypeVar("T")


@dataclass(frozen=True)
class Host:
    """What a round takes from its session (the engine), and nothing else."""

    role: str
    settings: EngineSettings
    info: LinkInfo
    random: RandomSource
    send: Callable[..., None]  # send(name, *, tagged=False, **fields): framed, recorded, tagged (§16)
    act: Callable[[Action], None]  # a durable action, checked against the transition's persist list
    hand_out: Callable[..., None]  # hand_out(round, kind, function, *, needed_by, apply=None, urgent=False)
    pads: Callable[[Round, str], list[int]]  # the pad of the round's tag on a message (§16), consumed first
    frame_tag: Callable[[], bytes]  # the transcript tag on the frame being handled
    refill: Callable[[int], int]  # Alice: the reserve's share of a bound (§17)
    end: Callable[..., State]  # end(round, reason, *, record=True): drop the round, store why, -> IDLE


@dataclass(eq=False)
class Round:
    """One round's data and message handlers (see the module's header)."""

    host: Host = field(repr=False)
    number: int
    frame: int
    auth: str = "psk"
    state: State = State.IDLE  # the round's own state (§15): IDLE before it starts and once it is over
    slot: int | None = None  # its tag slot in the session (§16), from its amplify on
    qber_guess: float | None = None  # the previous round's exact Z error rate (Cascade's guess, Bob)
    pulses: int = 0
    detections: int = 0
    sifted_bits: int = 0
    qber: float | None = None
    phase_error: float | None = None
    disclosed_bits: int = 0
    preparation: sifting.Preparation | None = None
    detected: sifting.Detections | None = None
    sifted: sifting.SiftedKey | None = None
    estimate_request: estimation.EstimateRequest | None = None
    estimate: estimation.Estimate | None = None
    key: Bits | None = None
    alice: cascade.CascadeAlice | None = None
    bob: cascade.CascadeBob | None = None
    bound: int = 0  # the key-length bound (§8), before the reserve share and whole blocks
    length_reason: str | None = None  # why the bound allows no key block, if it does not
    blocks: tuple[tuple[str, bytes], ...] = ()
    reserve: tuple[bytes, int] = (b"", 0)
    mac: wc.Mac | None = field(default=None, repr=False)  # a reserve round's Wegman–Carter hash (§16)
    # this direction's transcript since its last tag, and the peer's (§16); hashed as they grow
    sent: wc.Transcript = field(init=False)
    received: wc.Transcript = field(init=False)
    # the outcomes of the work handed out (Compute), by kind: "hash" (Alice's key hashed to the longest
    # output she may need, §7), "key_ids" (as many as §8's bound could allow), "blocks" (Alice's cut key),
    # "amplification" (Bob's prepared transform)
    results: dict[str, Outcome] = field(default_factory=dict)
    seed: Bits | None = None  # Alice: the seed for any output length (§7)
    output: tuple[int, int] | None = None  # Alice: output and reserve bits, once amplify is out
    pending: bool = False  # Bob: stored as pending, until Alice's committed or the next resolve (§13)

    def __post_init__(self) -> None:
        self.sent, self.received = wc.Transcript(self.mac), wc.Transcript(self.mac)

    def release(self) -> None:
        """The round is over (whatever became of it): let go of what holds a reference cycle, Bob's
        Cascade search, so that its memory is freed now rather than at a rare full garbage collection."""
        if self.bob is not None:
            self.bob.close()

    def handle(self, message: messages.Message) -> State:
        """Handle a message of this round (the session checked that the spec allows it now)."""
        handler: Callable[[Any], State] = getattr(self, f"on_{message.type}")
        return handler(message)

    def frame_ready(self, record: sifting.Preparation | sifting.Detections) -> State:
        """The link's record of the round's frame is here: Alice opens the round, Bob announces."""
        if self.host.role == "alice":
            assert not isinstance(record, sifting.Detections)
            self.preparation, self.pulses = record, record.pulses
            self.host.send(
                "round_start", round=self.number, frame=self.frame, pulses=self.pulses, auth=self.auth
            )
            return State.SIFTING
        assert isinstance(record, sifting.Detections)
        detected = sifting.resolve_double_clicks(record, self.host.random)
        if detected.pulses != self.pulses:
            raise RemoteProtocolError(
                f"frame of {self.pulses} pulses; Bob's link has {detected.pulses}", code="config-mismatch"
            )
        self.detected, self.detections = detected, int(detected.indices.size)
        self.host.send("sift_announce", round=self.number, **_fields_of(sifting.bob_announce(detected)))
        return State.SIFTING

    def frame_work(self, message: messages.Message) -> Callable[[], Any] | None:
        """The heavy part of handling ``message`` as a pure function, or ``None`` when its handler does
        all the work itself. The session hands it out as soon as the frame arrives and holds the frame
        until its outcome is back, so that one round's sifting (a tenth of a second or more) does not
        stall the other open rounds' frames; the handler then takes the outcome (:meth:`_frame_result`)
        and runs the transition as before, with the same checks and sends."""
        if self.state is not State.SIFTING or message.type in self.results:
            return None
        if isinstance(message, messages.SiftAnnounce) and self.preparation is not None:
            preparation, pulses = self.preparation, self.pulses
            return lambda: _alice_sifting(preparation, message, pulses)
        if isinstance(message, messages.SiftAnswer) and self.detected is not None:
            detected = self.detected
            return lambda: sifting.bob_sift(
                detected, _build(sifting.SiftAnswer, message), pulse_indices=False
            )
        return None

    def _frame_result(self, message: messages.Message) -> Any:
        """The outcome of :meth:`frame_work` for ``message``, computed here if it was not handed out (a
        driver may handle a frame before any work of it)."""
        outcome = self.results.pop(message.type, None)
        if outcome is None:
            work = self.frame_work(message)
            assert work is not None
            return work()
        return outcome.get()

    def on_sift_announce(self, message: messages.SiftAnnounce) -> State:
        assert self.preparation is not None
        answer, self.sifted = self._frame_result(message)
        self.preparation = None  # the frame's record is sifted: an open round keeps only its key (memory)
        self.detections = message.detections
        self.sifted_bits = int(self.sifted.bits.size)
        self.host.send("sift_answer", round=self.number, **_fields_of(answer))
        return State.ESTIMATING

    def on_sift_answer(self, message: messages.SiftAnswer) -> State:
        assert self.detected is not None
        self.sifted = self._frame_result(message)
        self.detected = None  # the frame's record is sifted: an open round keeps only its key (memory)
        self.sifted_bits = int(self.sifted.bits.size)
        request = estimation.bob_request(
            self.sifted, self.host.random, z_sample_fraction=self.host.settings.z_sample_fraction
        )
        self.estimate_request = request
        self.host.send("estimate_request", round=self.number, **_fields_of(request))
        return State.ESTIMATING

    def on_estimate_request(self, message: messages.EstimateRequest) -> State:
        assert self.sifted is not None
        request = _build(estimation.EstimateRequest, message)
        answer, estimate = estimation.alice_answer(
            self.sifted, request, threshold=self.host.settings.qber_threshold
        )
        self.host.send("estimate_answer", round=self.number, **_fields_of(answer))
        reason = self._take_estimate(estimate)
        if reason:
            return self.host.end(self, reason)
        assert self.key is not None
        self.alice = cascade.CascadeAlice(self.key)
        self._speculate()
        return State.RECONCILING

    def _speculate(self) -> None:
        """Alice: hash her key while Bob reconciles (her key no longer changes). The output length is
        not known yet, but it cannot exceed the §8 bound with nothing disclosed but the confirmation
        tag, and the hash to fewer bits is a prefix of the hash to more (:func:`amplify.longest_seed`)."""
        assert self.key is not None
        key, n = self.key, int(self.key.size)
        seed = self.seed = amplify.longest_seed(self.host.random, n)
        longest_output = self._longest_output()

        def hash_longest() -> tuple[int, Bits]:
            longest = longest_output()
            if longest <= 0:
                return 0, np.zeros(0, dtype=np.uint8)
            return longest, amplify.toeplitz_hash(key, seed[: n + longest - 1], longest, threads=1)

        self.host.hand_out(self, "hash", hash_longest, needed_by=frozenset({"commit"}))
        self._early_key_ids(needed_by="commit")

    def _early_key_ids(self, *, needed_by: str) -> None:
        """Either side, as Cascade starts: the IDs of as many key blocks as §8's bound allows with nothing
        disclosed but the confirmation tag — at least as many as the round will have — handed out to be
        computed while Cascade runs, so that neither side's key split waits for them (a few thousand
        SHA-1 hashes, 6–20 ms) once the output length is known."""
        longest_output, link_id, number = self._longest_output(), self.host.settings.link_id, self.number
        block_bits = self.host.settings.key_block_bits

        def ids() -> list[str]:
            return key_ids(link_id, number, max(0, longest_output()) // block_bits)

        self.host.hand_out(self, "key_ids", ids, needed_by=frozenset({needed_by}))

    def _longest_output(self) -> Callable[[], int]:
        """The most output bits the round's key can have, as a function to run anywhere: §8's bound with
        nothing disclosed but the confirmation tag (bounds only fall as disclosure grows), at most the
        key's size. Known as Cascade starts, so that work sized by the output can begin then."""
        assert self.key is not None and self.sifted is not None and self.estimate is not None
        size, sifted, estimate = int(self.key.size), self.sifted, self.estimate
        info, settings, disclosed = self.host.info, self.host.settings, confirm.TAG_BITS
        return lambda: min(size, _length_bound(info, settings, sifted, estimate, disclosed).secret_bits)

    def _take_estimate(self, estimate: estimation.Estimate) -> str | None:
        """Both sides: record §4's estimate and cut the key, or say why the round must stop."""
        assert self.sifted is not None
        self.estimate = estimate
        self.phase_error = estimate.phase_error_rate if estimate.x_bits else None
        reason = estimate.abort_reason or _key_size_problem(estimate)
        if reason is None:
            self.key = estimate.z_key(self.sifted)
        return reason

    def on_estimate_answer(self, message: messages.EstimateAnswer) -> State:
        assert self.sifted is not None and self.estimate_request is not None
        answer = _build(estimation.EstimateAnswer, message)
        estimate = estimation.bob_estimate(
            self.sifted, self.estimate_request, answer, threshold=self.host.settings.qber_threshold
        )
        reason = self._take_estimate(estimate)
        if reason:
            return self.host.end(self, reason)
        assert self.key is not None
        guess = estimation.cascade_qber_guess(estimate, self.host.settings.qber_prior, self.qber_guess)
        self.bob = cascade.CascadeBob(
            self.key, min(guess, 0.5), self.host.random, variant=self.host.settings.cascade_variant
        )
        state = self._send_cascade()
        self._early_key_ids(needed_by="amplify")  # while the first requests are on their way
        return state

    def _send_cascade(self) -> State:
        """Bob: send what Cascade asks now — a flight of requests (§5), or nothing while answers to an
        earlier one are still on their way."""
        assert self.bob is not None and self.key is not None
        flight = self.bob.outgoing()
        for message in flight:
            if isinstance(message, cascade.Finished):
                return self._finish_cascade(message.disclosed_bits)
            self._send_cascade_request(message)
        work = self.bob.preparation() if flight else None
        if work is not None:
            # his own range parities of the passes this flight starts, while Alice builds hers: the
            # answers wait for them
            bob = self.bob
            self.host.hand_out(
                self,
                "parities",
                work,
                needed_by=frozenset({"cascade_parities"}),
                apply=lambda outcome: bob.prepared(outcome.get()),
                urgent=True,
            )
        return State.RECONCILING

    def _send_cascade_request(self, message: cascade.StartPass | cascade.RangeRequest) -> None:
        match message:
            case cascade.StartPass(index=index, layout=layout):
                self.host.send(
                    "cascade_pass",
                    round=self.number,
                    index=index,
                    kind=layout.kind,
                    block_size=layout.block_size,
                    multiplier=layout.multiplier,
                    offset=layout.offset,
                    seed=layout.seed,
                )
            case cascade.RangeRequest(passes=passes, starts=starts, ends=ends):
                self.host.send(
                    "cascade_ranges",
                    round=self.number,
                    passes=passes.astype(np.uint8).tobytes(),
                    starts=starts.astype("<u4").tobytes(),
                    ends=ends.astype("<u4").tobytes(),
                )

    def _finish_cascade(self, disclosed: int) -> State:
        assert self.bob is not None
        result = self.bob.result()
        self.key = result.key
        self.host.send(
            "cascade_done", round=self.number, disclosed_bits=disclosed, corrected_bits=result.corrected_bits
        )
        return self._after_cascade(disclosed, result.corrected_bits)

    def _after_cascade(self, disclosed: int, corrected: int) -> State:
        assert self.key is not None
        self.disclosed_bits = disclosed + confirm.TAG_BITS
        self.qber = corrected / self.key.size
        reason = estimation.qber_abort_reason(
            corrected, int(self.key.size), self.host.settings.qber_threshold
        )
        if reason:
            return self.host.end(self, reason)
        if self.host.role == "alice":
            request = confirm.alice_confirm(self.key, self.host.random)
            self.host.send(
                "confirm",
                round=self.number,
                hash_key=request.hash_key.to_bytes(12, "big"),
                tag=request.tag.to_bytes(12, "big"),
            )
        else:
            self._prepare_amplification()
        return State.CONFIRMING

    def _prepare_amplification(self) -> None:
        """Bob: make his key ready for privacy amplification while the confirmation runs, so that Alice's
        seed leaves him less to do (:class:`amplify.PreparedKey`: packed, or transformed). His key no
        longer changes (a failed confirmation ends the round), and the output cannot exceed §8's bound
        now that the disclosure is final."""
        key, disclosed = self.key, self.disclosed_bits
        assert key is not None and self.sifted is not None and self.estimate is not None
        sifted, estimate, info, settings = self.sifted, self.estimate, self.host.info, self.host.settings

        def prepare() -> amplify.PreparedKey | None:
            bound = min(int(key.size), _length_bound(info, settings, sifted, estimate, disclosed).secret_bits)
            return amplify.prepare_key(key, bound) if bound > 0 else None

        self.host.hand_out(self, "amplification", prepare, needed_by=frozenset({"amplify"}), urgent=True)

    def on_cascade_pass(self, message: messages.CascadePass) -> State:
        layout = cascade.PassLayout(
            message.kind, message.block_size, message.multiplier, message.offset, message.seed
        )
        return self._answer_cascade(cascade.StartPass(message.index, layout))

    def on_cascade_ranges(self, message: messages.CascadeRanges) -> State:
        count = len(message.passes)
        if len(message.starts) != 4 * count or len(message.ends) != 4 * count:
            raise RemoteProtocolError("cascade_ranges: passes, starts and ends must describe the same ranges")
        request = cascade.RangeRequest(
            np.frombuffer(message.passes, dtype=np.uint8),
            np.frombuffer(message.starts, dtype="<u4").astype(np.uint32),
            np.frombuffer(message.ends, dtype="<u4").astype(np.uint32),
        )
        return self._answer_cascade(request)

    def _answer_cascade(self, request: cascade.StartPass | cascade.RangeRequest) -> State:
        assert self.alice is not None
        reply = self.alice.handle(request)
        assert reply is not None
        self.host.send("cascade_parities", round=self.number, count=reply.count, parities=reply.parities)
        return State.RECONCILING

    def on_cascade_parities(self, message: messages.CascadeParities) -> State:
        assert self.bob is not None
        self.bob.receive(cascade.Parities(message.count, message.parities))
        return self._send_cascade()

    def on_cascade_done(self, message: messages.CascadeDone) -> State:
        assert self.alice is not None and self.key is not None
        self.alice.handle(cascade.Finished(message.disclosed_bits))
        if message.corrected_bits > self.key.size:
            raise RemoteProtocolError("cascade_done: more corrected bits than key bits")
        return self._after_cascade(message.disclosed_bits, message.corrected_bits)

    def on_confirm(self, message: messages.Confirm) -> State:
        assert self.key is not None
        request = confirm.ConfirmRequest(
            int.from_bytes(message.hash_key, "big"), int.from_bytes(message.tag, "big")
        )
        matched = confirm.bob_confirm(self.key, request).matched
        self.host.send("confirm_result", round=self.number, matched=matched)
        if not matched:
            return self.host.end(self, "confirmation tags differ: residual errors after reconciliation")
        self.bound = self._secret_length()
        return State.AMPLIFYING

    def on_confirm_result(self, message: messages.ConfirmResult) -> State:
        assert self.key is not None
        if not message.matched:
            return self.host.end(self, "confirmation tags differ: residual errors after reconciliation")
        self.bound = self._secret_length()
        reserve_bits = self.host.refill(self.bound)
        output = self._output_bits(self.bound, reserve_bits)
        if output == 0:
            self.host.send(
                "amplify",
                round=self.number,
                input_bits=int(self.key.size),
                output_bits=0,
                reserve_bits=0,
                seed=b"",
            )
            return self.host.end(self, f"no secret key: {self.length_reason}")
        assert self.seed is not None
        seed = amplify.seed_prefix(self.seed, int(self.key.size), output)
        self.host.send(
            "amplify",
            tagged=True,
            round=self.number,
            input_bits=seed.input_bits,
            output_bits=seed.output_bits,
            reserve_bits=reserve_bits,
            seed=seed.seed,
        )
        self.output = output, reserve_bits
        self._cut_blocks()
        return State.COMMITTING

    def _cut_blocks(self) -> None:
        """Alice, once amplify is out and her early hash and key IDs are back: hand out the cutting of her
        output into the reserve's share and key blocks (while Bob hashes his); her commit waits for it."""
        if self.output is None or "blocks" in self.results or not {"hash", "key_ids"} <= self.results.keys():
            return
        assert self.key is not None and self.seed is not None
        (output, reserve_bits), hashed, ids = self.output, self.results["hash"], self.results["key_ids"]
        key, seed, n, settings, number = (
            self.key,
            self.seed,
            int(self.key.size),
            self.host.settings,
            self.number,
        )

        def cut() -> tuple[tuple[bytes, int], tuple[tuple[str, bytes], ...]]:
            longest, final = hashed.get()
            if output > longest:  # §8's bounds only fall as disclosure grows; should one not, hash anew
                final = amplify.toeplitz_hash(key, seed[: n + output - 1], output)
            return _split(settings, number, final[:output], reserve_bits, ids.get())

        self.results["blocks"] = Outcome()  # handed out: not again
        self.host.hand_out(self, "blocks", cut, needed_by=frozenset({"commit"}))

    def on_amplify(self, message: messages.Amplify) -> State:
        assert self.key is not None
        reserve_bits = message.reserve_bits
        expected = self._output_bits(self.bound, reserve_bits) if reserve_bits <= self.bound // 2 else -1
        if message.input_bits != self.key.size or message.output_bits != expected:
            raise RemoteProtocolError(
                f"amplify: {message.input_bits} -> {message.output_bits} bits ({reserve_bits} to the "
                f"reserve); Bob's bound allows {self.key.size} -> {self.bound}",
                code="config-mismatch",
            )
        if expected == 0:
            return self.host.end(self, f"no secret key: {self.length_reason}")
        self._check_round_tag(
            "amplify"
        )  # §16: nothing of the round is kept unless Alice's transcript verifies
        seed = amplify.AmplificationSeed(message.input_bits, message.output_bits, message.seed)
        prepared = self.results.pop("amplification").get()
        final = amplify.amplify(self.key, seed, prepared)
        self.reserve, self.blocks = _split(
            self.host.settings, self.number, final, reserve_bits, self.results["key_ids"].get()
        )
        self.host.act(RoundEnded(self.summary(None), "pending", self.blocks, self.reserve))
        self.pending = True
        self.host.send("commit", tagged=True, round=self.number, blocks=len(self.blocks))
        return State.COMMITTING

    def on_commit(self, message: messages.Commit) -> State:
        self.reserve, self.blocks = self.results["blocks"].get()  # her cut key: commit waited for it
        if message.blocks != len(self.blocks):
            raise RemoteProtocolError(
                f"commit: Bob holds {message.blocks} key blocks, Alice {len(self.blocks)}"
            )
        self._check_round_tag("commit")
        self.host.act(RoundEnded(self.summary(None), "committed", self.blocks, self.reserve))
        self.host.send("committed", tagged=True, round=self.number)
        return State.IDLE

    def on_committed(self, message: messages.Committed) -> State:
        self._check_round_tag("committed")
        self.host.act(CommitRound(self.number))
        return State.IDLE

    def _check_round_tag(self, message: str) -> None:
        """Verify the peer's transcript tag on ``message``, the frame just received (reserve rounds, §16)."""
        tag = self.host.frame_tag()
        if self.auth != "reserve":
            if tag:
                raise RemoteProtocolError("a transcript tag in a PSK round", code="bad-message")
            return
        if len(tag) != wc.TAG_BYTES or self.received.length > wc.MAX_TRANSCRIPT_BYTES:
            raise RemoteProtocolError("missing or malformed transcript tag", code="bad-mac")
        expected = self.received.tag(self.host.pads(self, message))
        if not hmac.compare_digest(expected, tag):
            raise RemoteProtocolError(
                f"round {self.number}: the transcript tag does not verify", code="bad-mac"
            )
        self.received = wc.Transcript(self.mac)  # the next tag covers the frames after this one

    def got(self, kind: str, outcome: Outcome) -> None:
        self.results[kind] = outcome
        if kind in ("hash", "key_ids"):
            self._cut_blocks()

    def _secret_length(self) -> int:
        """§8: the decoy-state bound for a weak-coherent source (the link declares its intensities), the
        single-photon bound for a single-photon source. Both sides compute it from the same counts."""
        assert self.sifted is not None and self.estimate is not None
        length = _length_bound(
            self.host.info, self.host.settings, self.sifted, self.estimate, self.disclosed_bits
        )
        self.length_reason = length.reason or (
            None
            if length.secret_bits >= self.host.settings.key_block_bits
            else f"{length.secret_bits} secret bits, less than one key block"
        )
        return length.secret_bits

    def _output_bits(self, bound: int, reserve_bits: int) -> int:
        return policy.output_bits(bound, reserve_bits, self.host.settings.key_block_bits)

    def summary(self, reason: str | None) -> RoundSummary:
        return RoundSummary(
            round=self.number,
            frame=self.frame,
            pulses=self.pulses,
            detections=self.detections,
            sifted_bits=self.sifted_bits,
            qber=self.qber,
            phase_error=self.phase_error,
            disclosed_bits=self.disclosed_bits,
            secret_bits=0 if reason else len(self.blocks) * self.host.settings.key_block_bits,
            aborted=reason is not None,
            reason=reason,
            auth=self.auth,
            reconciled_bits=0 if self.qber is None or self.key is None else int(self.key.size),
        )


def _length_bound(
    info: LinkInfo,
    settings: EngineSettings,
    sifted: sifting.SiftedKey,
    estimate: estimation.Estimate,
    disclosed_bits: int,
) -> keylength.KeyLength:
    """§8: the decoy-state bound for a weak-coherent source (the link declares its intensities), the
    single-photon bound for a single-photon source, for a round's counts with ``disclosed_bits``
    disclosed. Both sides compute it from the same counts; handed-out work calls it too."""
    return secrecy.round_key_length(
        info.intensities,
        info.intensity_probabilities,
        sifted,
        estimate,
        disclosed_bits,
        eps_sec=settings.eps_sec,
        eps_cor=settings.eps_cor,
    )


def _split(
    settings: EngineSettings, number: int, final: Bits, reserve_bits: int, ids: Sequence[str]
) -> tuple[tuple[bytes, int], tuple[tuple[str, bytes], ...]]:
    """A round's output cut into the reserve's share (packed, and its bit count) and key blocks (§17)."""
    key = final[reserve_bits:]
    blocks = key_blocks(settings.link_id, number, key, settings.key_block_bits, ids)
    return (pack_bits(final[:reserve_bits]), reserve_bits), tuple(blocks)


def _alice_sifting(
    preparation: sifting.Preparation, message: messages.SiftAnnounce, pulses: int
) -> tuple[sifting.SiftAnswer, sifting.SiftedKey]:
    """Alice's answer to ``sift_announce`` and her sifted key (:meth:`Round.frame_work`)."""
    if message.pulses != pulses:
        raise RemoteProtocolError(f"sift_announce is for {message.pulses} pulses, the frame has {pulses}")
    # an open round keeps its sifted key without pulse indices, which nothing after sifting reads (8 bytes
    # per sifted bit, the largest array of an open round: a deep window holds many); not even gathered
    return sifting.alice_answer(preparation, _build(sifting.SiftAnnounce, message), pulse_indices=False)


def _fields_of(value: Any) -> dict[str, Any]:
    """A stage message's fields by name (they are named as in protocol/qkdp-v2.toml)."""
    return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}


def _build(cls: type[T], message: messages.Message) -> T:
    """A stage message from the checked wire message of the same field names."""
    return cls(**{f.name: getattr(message, f.name) for f in dataclasses.fields(cls)})  # type: ignore[arg-type]


def _key_size_problem(estimate: estimation.Estimate) -> str | None:
    """Both sides refuse a round whose key is longer than privacy amplification takes (§7)."""
    key_bits = int(np.count_nonzero(estimate.z_key_mask))
    if key_bits > amplify.MAX_INPUT_BITS:
        return f"frame too large: {key_bits} key bits, at most {amplify.MAX_INPUT_BITS}; use shorter frames"
    return None
