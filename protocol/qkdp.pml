/*
 * qkdp/2: a Promela model of both roles' state machines and of the key reserve under an active
 * adversary (qkdp-v2.md §10–§17, qkdp-v2.toml).
 *
 * What is modelled
 *   - Alice and Bob exactly as the [[transitions]] of qkdp-v2.toml: every state, every received round
 *     message, the local events start_round and abort, and what each side persists before it sends.
 *     tests/test_model.py checks that the states, the messages and the (state, message) pairs of the
 *     guards below are those of the toml: every guard of a receive is written `st == X && t == m`.
 *   - Several connections, one after the other. A connection stands for its session keys: a frame
 *     carries the connection it was made for, and a MAC that verifies only there (§12). `hello` has
 *     no MAC: a side accepts any hello and only learns at the proofs whether it was the peer's.
 *   - The adversary on everything unauthenticated and on the network: it loses, duplicates and reorders
 *     frames, replays frames of another connection, injects any message, and modifies `hello` (its
 *     `keys`; in the qkdp/1 mutants also its reserve position), but cannot forge a MAC, a proof or a
 *     transcript tag. Its actions share one finite budget, BUDGET. Either side may crash, cut or time
 *     out at any moment and between a durable write and the frame that follows it, at no cost; what it
 *     persisted survives, the rest of the connection is gone (§11, §13).
 *   - The key reserve as a stream of slots (one slot: one 122-bit pad or one 256-bit handshake key).
 *     Slot 0 is the bootstrap handshake key; each side's durable `consumed` starts at 1 and `total` at
 *     T0; a committed round appends REFILL slots at each side when it commits there. A round's three
 *     tags (Alice's amplify, Bob's commit, Alice's committed) take the three pads of the round's tag
 *     slot (§16): the connection's next slot, counted from the position both took from the
 *     authenticated `sync`s, taken when the tagged amplify is sent or received; the receiver verifies a
 *     tag with the pad at its own position, and the tag verifies only if that is the sender's. A tagged
 *     amplify of a dropped round takes its slot all the same. Every use, by sender or receiver, raises
 *     `consumed` durably before anything is sent. (One round is open at a time here, window 1.) Alice opens a round only if her reserve can pay for its three
 *     pads; if it cannot, the link is paused for good (nothing could refill it). T0 pays for every
 *     round Alice can open here: a round cut after `amplify` costs its pads and refills nothing, so
 *     an adversary who cuts every round drains any reserve, 366 bits a round (that is outside I3).
 *   - Handshake keys (§17): each side's durable set of at most two slots; `hello` carries it; both take
 *     h = max(keys_A ∩ keys_B) (an empty intersection closes with stale-state, nothing stored). The
 *     proofs verify only if both hellos arrived unmodified and both sides chose the same h. Alice
 *     proves first; Bob verifies, durably drops every key < h, then proves; Alice verifies Bob's proof
 *     and drops every key < h. After Bob's `sync`, if Alice holds one key and a round committed since
 *     it became current, she takes a key at P = max(consumed_A, consumed_B) when
 *     P + 1 <= min(total_A, total_B), marks it consumed, and announces her pending key in every
 *     `resolve` until it is used; Bob adds it and marks it consumed.
 *   - The link's counts as one choice per round made when Alice opens it (outcome, blocks): the QBER
 *     is too high, the error rate after reconciliation is too high, the confirmation tags differ, or
 *     the round passes with 0 (keyless, untagged), 1 or 2 key blocks.
 *   - After the NCONN connections under attack, the adversary stops: one calm connection follows, in
 *     which nothing is lost, changed or cut, no side crashes or aborts, the link's counts are good
 *     (one key block), and Alice opens one round and then stops.
 *
 * Not modelled: sending keepalive (either side's IDLE takes it and changes nothing but a timer, so
 * dropping, replaying or injecting it can do no more than the adversary's cuts), the key channel of
 * §19, PSK and PKI handshakes (after bootstrap the reserve authenticates everything), field contents
 * other than those named here, the bit-level layout of pads and keys (a slot is used whole or not at
 * all), and the probability ε of a forgery (a tag, proof or MAC never verifies on other data).
 *
 * Checked by spin (tests/test_model.py; see qkdp-v2.md §20):
 *   - safety run: no assertion fails and there is no invalid end state (no deadlock);
 *   - I1, one-time pads: a ghost array records, for every reserve slot, the message its pad was used
 *     for (or the handshake key it became); no slot is ever used for two different messages, by either
 *     side, across connections and crashes; every slot used is below that side's total;
 *   - I4, consistent: a round is committed at Bob only if Alice committed it with the same key blocks,
 *     and a round Alice committed is held by Bob, committed or pending (pending keys are never read
 *     out, and the next handshake's resolve commits them, §13); verified: no side commits a round whose
 *     confirmation did not match or whose frames did not all pass their MAC, sequence and tag checks;
 *   - handshake keys, after every durable write: each side holds one or two keys, and every key of
 *     Bob's is one of Alice's, so the sets intersect and h is Bob's larger key unless a hello was
 *     modified. (Not "Alice's current key is in Bob's set": Bob drops it once Alice proved with her
 *     announced key, before she has seen his proof; -DALICE_CURRENT_IN_BOB asserts it, and spin
 *     shows that execution.)
 *   - I3, recovery: when both roles have ended, the round of the calm connection is committed at both
 *     sides: whatever the adversary did before, the next connection authenticated, agreed a position
 *     the reserve can pay for, and committed a round; no side exited or paused for good;
 *   - liveness run, ltl `terminates`: every execution reaches the end, both roles done, whatever the
 *     network, the attacker and crashes do.
 *
 * Why it holds (the argument the model checks): nothing received before the peer's proof verifies
 * changes durable state, so a modified, replayed or forged hello costs one connection and nothing
 * else. Positions are agreed only from the authenticated syncs and are the max of both sides' durable
 * `consumed`, which covers every slot either side used or took as a key, so no later pad or key can
 * land on a used slot (I1). Handshake proofs use keys, not pads, so cutting connections spends
 * nothing, and the reserve only pays for rounds (at most three pads and one key each). Bob adds only
 * keys Alice holds and drops a key only after Alice proved with a newer one; Alice drops a key only
 * after Bob proved with a newer one, so after Bob dropped it: Bob's keys stay a subset of Alice's,
 * the sets always intersect, and the next untampered handshake verifies. With no epochs nothing can
 * run apart, so once the adversary stops the next connection authenticates, both continue from the
 * same position, and a round commits (I3).
 *
 * Variant: -DBOB_PROVES_FIRST has Bob send his proof on Alice's hello, before hers verified (he
 * still drops keys only once it has); then Alice may drop a key before Bob, and the model asserts
 * only that the key sets intersect. It passes the same checks (tests/test_model.py, QKDD_STRESS=1).
 *
 * Mutants (each must fail; tests/test_model.py runs them):
 *   -DMUTANT_B1  qkdp/1 position agreement: hello carries `consumed`, each side adopts the max on the
 *                unauthenticated hello, and the proofs are one-time-pad tags at that position. Bob's
 *                commit takes a pad, the connection ends before Alice has it, the attacker lowers
 *                `consumed` in Bob's next hello, and Alice's proof takes the same pad: I1 fails.
 *   -DMUTANT_B2  the same adoption on the hello, with key proofs. The attacker raises `consumed` in a
 *                hello; the reserve can pay for no round, and the calm connection commits none: I3.
 *   -DMUTANT_B3  qkdp/1 epochs: sync carries an epoch, Alice stores max + 1 when she sends resolve,
 *                Bob when he receives it, and a side whose epoch is more than one behind exits. Two
 *                connections that end before Bob has resolve (a lost frame or a crash) and Bob exits
 *                on the third: I3 fails.
 */

#ifndef NCONN
#define NCONN 2    /* connections under attack, one after another; then one calm connection */
#endif
#ifndef NROUND
#define NROUND 1    /* rounds Alice opens under attack, in all */
#endif
#ifndef CAP
#define CAP 4    /* frames in flight per direction */
#endif
#ifndef BUDGET
#define BUDGET 1    /* losses, duplicates, reorderings, replays, injections and modifications, in all */
#endif
#define NR      (NROUND + 1)               /* rounds, the calm connection's included */
#define PADS    3                          /* pads per round: amplify, commit, committed */
#define T0      (1 + (PADS + 1) * NR)      /* slots at bootstrap: every round and one key per round */
#define REFILL  1                          /* slots a committed round adds */
#define MAXPOS  (T0 + REFILL * NR)
#define ALLKEYS ((1 << MAXPOS) - 1)
#define NONE    255
#define MAX(a, b) ((a) > (b) -> (a) : (b))
#define MIN(a, b) ((a) < (b) -> (a) : (b))

mtype = {   /* messages */
              hello, auth, sync, resolve, round_start, sift_announce, sift_answer, estimate_request,
              estimate_answer, cascade_pass, cascade_ranges, cascade_parities, cascade_done, confirm,
              confirm_result, amplify, commit, committed, keepalive, abort, error };

mtype = {   /* Alice's states */
              A_HELLO, A_AUTH, A_SYNC, A_IDLE, A_SIFTING, A_ESTIMATING, A_RECONCILING,
                      A_CONFIRMING, A_COMMITTING, A_CLOSED };

mtype = {   /* Bob's states */
              B_HELLO, B_AUTH, B_SYNC, B_RESOLVING, B_IDLE, B_SIFTING, B_ESTIMATING,
                    B_RECONCILING, B_CONFIRMING, B_AMPLIFYING, B_COMMITTING, B_CLOSED };

#define ROUND_MSG(t) (t != hello && t != auth && t != sync && t != resolve && t != keepalive && t != error)

/*
 * A frame: message, the connection whose keys made its MAC, seq, MAC valid (for hello: sent as is),
 * then the values it carries here:
 *   fr  the round (round messages), next_round (sync), whether the prover received the peer's hello
 *       unmodified (auth: a ghost, standing for the hello transcript the proof covers)
 *   fv  key blocks (amplify, commit), a mask of rounds (sync: pending, resolve: committed), the
 *       sender's keys (hello) or the key it proves with (auth), as sets of slots (bit p: slot p)
 *   fp  the pad's slot (tagged frames; auth in MUTANT_B1), reserve_consumed (sync; hello in
 *       MUTANT_B1/B2), key_next (resolve; NONE: none)
 *   fx  reserve_total (sync), + 256 * epoch in MUTANT_B3
 */
chan a2b[NCONN + 1] = [CAP] of { mtype, byte, byte, bit, byte, int, byte, short };
chan b2a[NCONN + 1] = [CAP] of { mtype, byte, byte, bit, byte, int, byte, short };

/* Where each side is: 2c+1 while connection c is open at that side, 2c+2 once it closed it. */
byte a_at, b_at;

/* An honest frame on connection c. A frame to a side that has closed that connection is lost with the
 * socket; a full channel means the peer stopped reading, and the frame is lost too. */
inline SENDX(ch, m, rnd, val, pos, ext, peer_at) {
    if
    :: peer_at <= 2 * c + 1 && nfull(ch) -> ch ! m, c, sseq, 1, rnd, val, pos, ext
    :: else -> skip
    fi;
    sseq++
}
#define SEND(ch, m, rnd, val, peer_at) SENDX(ch, m, rnd, val, 0, 0, peer_at)

/* leave connection c: what is still in flight to this side is lost */
inline LEAVE(ch, at) {
    at = 2 * c + 2;
    do
    :: nempty(ch) -> ch ? _, _, _, _, _, _, _, _
    :: empty(ch) -> break
    od
}

/* the link's counts of each round, fixed when Alice opens it */
/* How round r ends, given its counts: the first check that fails decides, so one choice among these
 * covers every combination. blocks[r] is the number of key blocks when none fails (0: keyless). */
mtype = { QBER_HIGH, EC_HIGH, TAGS_DIFFER, PASSES }
mtype outcome[NR];
byte blocks[NR];
#define qok(r)     (outcome[r] != QBER_HIGH)
#define ecok(r)    (outcome[r] != QBER_HIGH && outcome[r] != EC_HIGH)
#define matched(r) (outcome[r] == PASSES)

/* durable state (each side's store) */
byte a_next;                 /* next_round, reserved before round_start (§13) */
bool a_comm[NR];
byte a_blocks[NR];
byte b_next;
bool b_pend[NR];
bool b_comm[NR];
byte b_blocks[NR];
byte a_cons = 1, b_cons = 1;     /* reserve_consumed: the first unused slot */
byte a_sb, b_sb;                 /* the connection's next tag slot: its first pad (§16) */
byte a_rb, b_rb;                 /* the open round's tag slot: its first pad */
byte a_tot = T0, b_tot = T0;     /* reserve_total: committed slots */
int a_keys = 1, b_keys = 1;      /* handshake keys, bit p: slot p (slot 0: the bootstrap key) */
byte a_knext = NONE;             /* Alice's announced key while she holds two (the larger) */
bool a_since;                    /* a round committed at Alice since her current key became current */
#ifdef MUTANT_B3
byte a_ep, b_ep;                 /* qkdp/1 epochs */
#endif

/* ghost: the round's confirmation matched and every frame of it passed its checks, at each side */
bool a_verified[NR];
bool b_verified[NR];

/* ghost, I1: what each reserve slot was used for: 0 unused, else the message (or key) */
byte used[MAXPOS];
#define ID_AMPLIFY(r)   (3 * (r) + 1)
#define ID_COMMIT(r)    (3 * (r) + 2)
#define ID_COMMITTED(r) (3 * (r) + 3)
#define ID_KEY(p)       (64 + (p))
#define ID_PROOF(c, s)  (128 + 2 * (c) + (s))     /* MUTANT_B1: the proof of side s on connection c */

/* a side uses slot q for message id: never a slot used for anything else, never beyond its reserve */
#define USE(q, id, tot) assert(q < tot); assert(used[q] == 0 || used[q] == id); used[q] = id

byte calm_r = NONE;          /* ghost: the round Alice opened on the calm connection */
byte finished;               /* roles that reached their end */
byte budget = BUDGET;        /* what the network and the attacker may still do */
#define ADV (budget > 0 && !calm)

/*
 * The next frame the receiver reads from ch. The network and the attacker act on a frame when it is
 * delivered, which is when the receiver can tell: the frame is lost, delivered twice, overtaken by
 * the next one, or instead of it comes a frame the attacker made (any message, no valid MAC), one
 * recorded on another connection (a valid MAC under that connection's keys), or a hello it modified.
 * Each of these spends one unit of the budget; on the calm connection there is none. `lost` is set
 * when nothing is read.
 */
inline DELIVER(ch) {
    lost = false;
    if
    :: nempty(ch) -> ch ? t, fc, fs, fm, fr, fv, fp, fx                               /* as sent */
    :: ADV && nempty(ch) -> budget--; ch ? _, _, _, _, _, _, _, _; lost = true         /* lost */
    :: ADV && nempty(ch) -> budget--; ch ? <t, fc, fs, fm, fr, fv, fp, fx>             /* duplicated */
    :: ADV && len(ch) > 1 ->                                                          /* reordered */
        budget--; ch ? ht, hc, hs, hm, hr, hv, hp, hx; ch ? t, fc, fs, fm, fr, fv, fp, fx;
        ch ! ht, hc, hs, hm, hr, hv, hp, hx;
        ht = 0; hc = 0; hs = 0; hm = 0; hr = 0; hv = 0; hp = 0; hx = 0
    :: ADV -> budget--; select (m : 1 .. 20); t = m; m = 0; fc = c; fs = rseq; fm = 0    /* forged */
    :: ADV -> budget--; select (m : 1 .. 20); t = m; m = 0; fc = c + 1; fs = rseq; fm = 1 /* replayed */
    :: ADV && ch?[hello, _, _, _, _, _, _, _] ->                                      /* hello modified */
        budget--; ch ? t, fc, fs, fm, fr, fv, fp, fx; fm = 0;
        if
        :: skip                       /* another field (nonce, capabilities, ...) */
        :: fv = 0                     /* no keys */
        :: fv = fv & -fv              /* the smaller key only */
        :: fv = fv & (fv - 1)         /* the larger key only (none if one) */
        :: fv = ALLKEYS               /* every slot */
        fi;
#if defined(MUTANT_B1) || defined(MUTANT_B2)
        if
        :: skip
        :: fp = 1                     /* reserve_consumed lowered */
        :: fp = T0                    /* reserve_consumed raised */
        fi
#endif
    fi
}

#define CONSISTENT(r) \
    ((!b_comm[r] || (a_comm[r] && a_blocks[r] == b_blocks[r])) && \
     (!a_comm[r] || ((b_pend[r] || b_comm[r]) && a_blocks[r] == b_blocks[r])))

/* a set of at most two slots, not empty */
#define ONE_OR_TWO(x) ((x) != 0 && ((((x) & ((x) - 1)) & (((x) & ((x) - 1)) - 1)) == 0))
/* the larger of a set of at most two slots, as a set */
#define TOP(x) (((x) & ((x) - 1)) != 0 -> ((x) & ((x) - 1)) : (x))
/* each side holds one or two keys, and Bob's are Alice's: the sets intersect, h = Bob's larger key */
#ifndef BOB_PROVES_FIRST
#define KEYS_OK (ONE_OR_TWO(a_keys) && ONE_OR_TWO(b_keys) && (b_keys & ~a_keys) == 0)
#else
/* Bob proves on the hello, so Alice may drop a key before Bob does: the sets only intersect */
#define KEYS_OK (ONE_OR_TWO(a_keys) && ONE_OR_TWO(b_keys) && (b_keys & a_keys) != 0)
#endif

ltl terminates { <> (finished == 2) }

/* the invariants, checked after every durable write of rounds or keys */
inline CHECK() {
    i = 0;
    do
    :: i < NR -> assert(CONSISTENT(i)); i++
    :: else -> break
    od;
    i = 0;
    assert(KEYS_OK);
#ifdef ALICE_CURRENT_IN_BOB
    assert((b_keys & (a_keys & -a_keys)) != 0);
#endif
}

/* I3: whatever happened under attack, the calm connection committed its round at both sides */
bool recovered;              /* ghost */
inline FINISH() {
    atomic {
        finished++;
        if
        :: finished == 2 ->
            recovered = (calm_r != NONE && a_comm[calm_r] && b_comm[calm_r]);
            assert(recovered); assert(KEYS_OK)
        :: else -> skip
        fi
    }
}

/* the rounds of `mask` that `held` holds, as a mask */
#define HELD(held, mask, out) \
    i = 0; out = 0; \
    do \
    :: i < NR -> if :: held[i] && (mask >> i) & 1 -> out = out | (1 << i) :: else -> skip fi; i++ \
    :: else -> break \
    od; \
    i = 0

active proctype Alice() {
    byte c = 0;
    byte sseq, rseq;
    byte r, dropped, next, i;
    bool stopped = false, calm, hok;
    int h;                       /* this connection's handshake key, as a set */
    mtype st;
    mtype t, ht;
    byte fc, fs, fr, fp, hc, hs, hr, hp, m;
    int fv, hv;
    short fx, hx;
    bit fm, hm;
    bool lost;
#ifdef MUTANT_B3
    byte pe;
#endif

    used[0] = ID_KEY(0);
    do
    :: c <= NCONN && !stopped ->
        atomic {
            calm = (c == NCONN); hok = false; h = 0;
            sseq = 0; rseq = 0; r = NONE; dropped = NONE; st = A_HELLO; a_at = 2 * c + 1;
#if defined(MUTANT_B1) || defined(MUTANT_B2)
            SENDX(a2b[c], hello, 0, a_keys, a_cons, 0, b_at)
#else
            SENDX(a2b[c], hello, 0, a_keys, 0, 0, b_at)
#endif
        }
        do
        :: st == A_CLOSED -> break
        :: st != A_CLOSED && !calm -> st = A_CLOSED   /* timeout, cut, crash or stop: the open round is gone */
        :: st != A_CLOSED && calm && finished > 0 && empty(b2a[c]) -> st = A_CLOSED   /* Bob is gone */
        :: atomic { st == A_IDLE && next < NR && (calm || next < NROUND) && calm_r == NONE &&
                    a_sb + PADS <= a_tot ->   /* start_round: persist next_round, then round_start */
                r = next; next++; a_next = next;
                if
                :: calm -> outcome[r] = PASSES; blocks[r] = 1; calm_r = r
                :: !calm -> outcome[r] = QBER_HIGH
                :: !calm -> outcome[r] = EC_HIGH
                :: !calm -> outcome[r] = TAGS_DIFFER
                :: !calm -> outcome[r] = PASSES; if :: blocks[r] = 0 :: blocks[r] = 1 :: blocks[r] = 2 fi
                fi;
                SEND(a2b[c], round_start, r, 0, b_at);
                st = A_SIFTING
            }
        :: atomic { st == A_IDLE && next < NR && a_sb + PADS > a_tot ->
            /* the reserve cannot pay for a round: paused, and with nothing to refill it, for good */
            SEND(a2b[c], error, 0, 0, b_at); stopped = true; st = A_CLOSED }
        :: atomic { st == A_IDLE && calm && calm_r != NONE && r == NONE ->   /* Alice stops */
            SEND(a2b[c], error, 0, 0, b_at); stopped = true; st = A_CLOSED }
        :: atomic { !calm && (st == A_SIFTING || st == A_ESTIMATING || st == A_RECONCILING ||
                     st == A_CONFIRMING || st == A_COMMITTING) ->   /* the local event abort */
            SEND(a2b[c], abort, r, 0, b_at); dropped = r; r = NONE; st = A_IDLE }
        :: atomic { st != A_CLOSED && (nempty(b2a[c]) || ADV) -> DELIVER(b2a[c]);
            if
            :: lost -> skip
            :: !lost && t != hello && (fc != c || fm == 0 || fs != rseq) ->       /* bad-mac, bad-seq */
                SEND(a2b[c], error, 0, 0, b_at); st = A_CLOSED
            :: else ->
                rseq++;
                if
                :: t == error -> st = A_CLOSED
                :: t != error && ROUND_MSG(t) && fr == dropped && fr != r ->   /* stale (§13) */
                    if   /* a tagged amplify takes its slot all the same (§16) */
                    :: t == amplify && fv != 0 -> a_sb = a_sb + PADS
                    :: else -> skip
                    fi
                :: else ->
                    if
                    :: st == A_HELLO && t == hello ->
                        hok = (fm == 1 && fc == c);
#if defined(MUTANT_B1) || defined(MUTANT_B2)
                        a_cons = MAX(a_cons, fp);   /* qkdp/1: the peer's position, unauthenticated */
#endif
                        h = TOP(a_keys & fv);
                        if
                        :: h == 0 ->                                         /* stale-state */
                            SEND(a2b[c], error, 0, 0, b_at); st = A_CLOSED
#ifdef MUTANT_B1
                        :: h != 0 && a_cons + 2 > a_tot ->   /* the reserve cannot pay for the proofs */
                            SEND(a2b[c], error, 0, 0, b_at); st = A_CLOSED
#endif
                        :: else ->
#ifdef MUTANT_B1
                            atomic { USE(a_cons, ID_PROOF(c, 0), a_tot); a_cons++ }   /* a pad proof */
                            if
                            :: SENDX(a2b[c], auth, hok, h, a_cons - 1, 0, b_at); st = A_AUTH
                            :: !calm -> st = A_CLOSED                      /* crash after the write */
                            fi
#else
                            SENDX(a2b[c], auth, hok, h, 0, 0, b_at); st = A_AUTH
#endif
                        fi
                    :: st == A_AUTH && t == auth ->
                        if
#ifdef MUTANT_B1
                        :: fv != h || !hok || fr == 0 || fp != a_cons ->
#else
                        :: fv != h || !hok || fr == 0 ->                     /* auth-failed */
#endif
                            SEND(a2b[c], error, 0, 0, b_at); st = A_CLOSED
                        :: else ->
                            atomic {                  /* persist: the keys older than h are dropped */
#ifdef MUTANT_B1
                                a_cons++;
#endif
                                if
                                :: (a_keys & (h - 1)) != 0 ->
                                    a_keys = a_keys & ~(h - 1); a_knext = NONE; a_since = false
                                :: else -> skip
                                fi;
                                CHECK()
                            }
#ifdef MUTANT_B3
                            SENDX(a2b[c], sync, a_next, 0, a_cons, a_tot + 256 * a_ep, b_at);
#else
                            SENDX(a2b[c], sync, a_next, 0, a_cons, a_tot, b_at);
#endif
                            st = A_SYNC
                        fi
                    :: st == A_SYNC && t == sync ->
                        next = MAX(a_next, fr);
                        HELD(a_comm, fv, fs);   /* Alice's committed among Bob's pending */
                        fv = fs;
#ifdef MUTANT_B3
                        pe = fx / 256; fx = fx % 256;
                        if
                        :: pe > a_ep + 1 ->                   /* "restored from a backup": exit */
                            SEND(a2b[c], error, 0, 0, b_at); stopped = true; st = A_CLOSED
                        :: a_ep > pe + 1 -> SEND(a2b[c], error, 0, 0, b_at); st = A_CLOSED
                        :: else -> a_ep = MAX(a_ep, pe) + 1
                        fi;
                        if
                        :: st == A_CLOSED -> skip
                        :: else ->
#endif
                        atomic {   /* persist: the reserve position and maybe a new key */
                            a_cons = MAX(a_cons, fp);   /* max(own, Bob's reserve_consumed) */
                            if
                            :: (a_keys & (a_keys - 1)) == 0 && a_since && a_cons + 1 <= MIN(a_tot, fx) ->
                                USE(a_cons, ID_KEY(a_cons), a_tot);
                                a_keys = a_keys | (1 << a_cons); a_knext = a_cons; a_cons++;
                                CHECK()
                            :: else -> skip
                            fi;
                            a_sb = a_cons                  /* slot 0 of the connection's tags */
                        }
                        if
                        :: SENDX(a2b[c], resolve, 0, fv, a_knext, 0, b_at); st = A_IDLE
                        :: !calm -> st = A_CLOSED                          /* crash after the write */
                        fi
#ifdef MUTANT_B3
                        fi
#endif
                    :: st == A_SIFTING && t == sift_announce && fr == r ->
                        SEND(a2b[c], sift_answer, r, 0, b_at); st = A_ESTIMATING
                    :: st == A_ESTIMATING && t == estimate_request && fr == r ->
                        SEND(a2b[c], estimate_answer, r, 0, b_at);
                        if
                        :: qok(r) -> st = A_RECONCILING
                        :: else -> dropped = r; r = NONE; st = A_IDLE   /* both abort: QBER */
                        fi
                    :: st == A_RECONCILING && (t == cascade_pass || t == cascade_ranges) && fr == r ->
                        SEND(a2b[c], cascade_parities, r, 0, b_at)
                    :: st == A_RECONCILING && t == cascade_done && fr == r ->
                        if
                        :: ecok(r) -> SEND(a2b[c], confirm, r, 0, b_at); st = A_CONFIRMING
                        :: else -> dropped = r; r = NONE; st = A_IDLE
                        fi
                    :: st == A_CONFIRMING && t == confirm_result && fr == r ->
                        if
                        :: fv == 0 -> dropped = r; r = NONE; st = A_IDLE
                        :: fv != 0 && blocks[r] == 0 ->
                            SEND(a2b[c], amplify, r, 0, b_at);        /* keyless round, untagged */
                            dropped = r; r = NONE; st = A_IDLE
                        :: fv != 0 && blocks[r] != 0 ->
                            atomic {                   /* persist the pad's use, then the tagged frame */
                                a_verified[r] = true; a_rb = a_sb; a_sb = a_sb + PADS;   /* the next slot */
                                USE(a_rb, ID_AMPLIFY(r), a_tot); a_cons = MAX(a_cons, a_rb + 1)
                            }
                            if
                            :: SENDX(a2b[c], amplify, r, blocks[r], a_rb, 0, b_at); st = A_COMMITTING
                            :: !calm -> st = A_CLOSED                      /* crash after the write */
                            fi
                        fi
                    :: st == A_COMMITTING && t == commit && fr == r ->
                        if
                        :: fv != blocks[r] ->                              /* bad-message */
                            SEND(a2b[c], error, 0, 0, b_at); st = A_CLOSED
                        :: fv == blocks[r] && fp != a_rb + 1 ->            /* bad-mac: the tag */
                            SEND(a2b[c], error, 0, 0, b_at); st = A_CLOSED
                        :: else ->
                            atomic {   /* persist the committed round, its refill, the pads' use */
                                assert(a_verified[r]);
                                USE(a_rb + 1, ID_COMMIT(r), a_tot);        /* Bob's tag, verified */
                                a_comm[r] = true; a_blocks[r] = fv; a_tot = a_tot + REFILL; a_since = true;
                                USE(a_rb + 2, ID_COMMITTED(r), a_tot); a_cons = MAX(a_cons, a_rb + 3);
                                CHECK()
                            }
                            if
                            :: SENDX(a2b[c], committed, r, 0, a_rb + 2, 0, b_at); r = NONE; st = A_IDLE
                            :: !calm -> st = A_CLOSED                      /* crash after the write */
                            fi
                        fi
                    :: st == A_IDLE && t == keepalive -> skip   /* Bob is there; nothing changes */
                    :: (st == A_SIFTING || st == A_ESTIMATING || st == A_RECONCILING ||
                        st == A_CONFIRMING || st == A_COMMITTING) && t == abort && fr == r ->
                        dropped = r; r = NONE; st = A_IDLE
                    :: else ->                                              /* bad-state, bad-message */
                        SEND(a2b[c], error, 0, 0, b_at); st = A_CLOSED
                    fi
                fi
            fi;
            t = 0; fc = 0; fs = 0; fm = 0; fr = 0; fv = 0; fp = 0; fx = 0   /* forget the frame */
            }
        od;
        atomic { LEAVE(b2a[c], a_at); r = NONE; h = 0; hok = false; c++ }
    :: else -> break
    od;
    FINISH()
}

active proctype Bob() {
    byte c = 0;
    byte sseq, rseq;
    byte r, dropped, next, steps, i;
    bool stopped = false, calm, hok;
    int h;
    mtype st;
    mtype t, ht;
    byte fc, fs, fr, fp, hc, hs, hr, hp, m;
    int fv, hv;
    short fx, hx;
    bit fm, hm;
    bool lost;
#ifdef MUTANT_B3
    byte pe;
#endif

    do
    :: c <= NCONN && !stopped ->
        atomic {
            calm = (c == NCONN); hok = false; h = 0;
            sseq = 0; rseq = 0; r = NONE; dropped = NONE; st = B_HELLO; b_at = 2 * c + 1;
#if defined(MUTANT_B1) || defined(MUTANT_B2)
            SENDX(b2a[c], hello, 0, b_keys, b_cons, 0, a_at)
#else
            SENDX(b2a[c], hello, 0, b_keys, 0, 0, a_at)
#endif
        }
        do
        :: st == B_CLOSED -> break
        :: st != B_CLOSED && !calm -> st = B_CLOSED   /* timeout, cut, crash, or replaced by a new connection */
        :: st != B_CLOSED && calm && finished > 0 && empty(a2b[c]) -> st = B_CLOSED   /* Alice is gone */
        :: atomic { !calm && (st == B_SIFTING || st == B_ESTIMATING || st == B_RECONCILING ||
                     st == B_CONFIRMING || st == B_AMPLIFYING) ->
            /* the local event abort (never in COMMITTING: Bob gives up there by closing, §13) */
            SEND(b2a[c], abort, r, 0, a_at); dropped = r; r = NONE; st = B_IDLE }
        :: atomic { st != B_CLOSED && (nempty(a2b[c]) || ADV) -> DELIVER(a2b[c]);
            if
            :: lost -> skip
            :: !lost && t != hello && (fc != c || fm == 0 || fs != rseq) ->
                SEND(b2a[c], error, 0, 0, a_at); st = B_CLOSED
            :: else ->
                rseq++;
                if
                :: t == error -> st = B_CLOSED
                :: t != error && ROUND_MSG(t) && fr == dropped && fr != r ->
                    if   /* a tagged amplify takes its slot all the same (§16) */
                    :: t == amplify && fv != 0 -> b_sb = b_sb + PADS
                    :: else -> skip
                    fi
                :: else ->
                    if
                    :: st == B_HELLO && t == hello ->
                        hok = (fm == 1 && fc == c);
#if defined(MUTANT_B1) || defined(MUTANT_B2)
                        b_cons = MAX(b_cons, fp);   /* qkdp/1: the peer's position, unauthenticated */
#endif
                        h = TOP(b_keys & fv);
                        if
                        :: h == 0 ->                                         /* stale-state */
                            SEND(b2a[c], error, 0, 0, a_at); st = B_CLOSED
#ifdef MUTANT_B1
                        :: h != 0 && b_cons + 2 > b_tot ->   /* the reserve cannot pay for the proofs */
                            SEND(b2a[c], error, 0, 0, a_at); st = B_CLOSED
#endif
#ifdef BOB_PROVES_FIRST
                        :: else -> SENDX(b2a[c], auth, hok, h, 0, 0, a_at); st = B_AUTH
#else
                        :: else -> st = B_AUTH                  /* Bob proves after Alice did */
#endif
                        fi
                    :: st == B_AUTH && t == auth ->
                        if
#ifdef MUTANT_B1
                        :: fv != h || !hok || fr == 0 || fp != b_cons ->
#else
                        :: fv != h || !hok || fr == 0 ->                     /* auth-failed */
#endif
                            SEND(b2a[c], error, 0, 0, a_at); st = B_CLOSED
                        :: else ->
                            atomic {                  /* persist: the keys older than h are dropped */
#ifdef MUTANT_B1
                                b_cons++; USE(b_cons, ID_PROOF(c, 1), b_tot); b_cons++;
#endif
                                b_keys = b_keys & ~(h - 1);
                                CHECK()
                            }
                            if
                            :: 
#ifdef MUTANT_B1
                                SENDX(b2a[c], auth, hok, h, b_cons - 1, 0, a_at);
#elif !defined(BOB_PROVES_FIRST)
                                SENDX(b2a[c], auth, hok, h, 0, 0, a_at);
#endif
                                HELD(b_pend, 255, fs);
#ifdef MUTANT_B3
                                SENDX(b2a[c], sync, b_next, fs, b_cons, b_tot + 256 * b_ep, a_at);
#else
                                SENDX(b2a[c], sync, b_next, fs, b_cons, b_tot, a_at);
#endif
                                st = B_SYNC
                            :: !calm -> st = B_CLOSED                      /* crash after the write */
                            fi
                        fi
                    :: st == B_SYNC && t == sync ->
                        next = MAX(b_next, fr);
#ifdef MUTANT_B3
                        pe = fx / 256;
                        if
                        :: pe > b_ep + 1 ->                   /* "restored from a backup": exit */
                            SEND(b2a[c], error, 0, 0, a_at); stopped = true; st = B_CLOSED
                        :: b_ep > pe + 1 -> SEND(b2a[c], error, 0, 0, a_at); st = B_CLOSED
                        :: else -> st = B_RESOLVING
                        fi;
#else
                        st = B_RESOLVING;
#endif
                        b_cons = MAX(b_cons, fp)     /* persist: consumed := max(own, Alice's) */
                    :: st == B_RESOLVING && t == resolve ->
                        HELD(b_pend, fv, fs);
                        if
                        :: fs != fv ->   /* lists a round not pending here */
                            SEND(b2a[c], error, 0, 0, a_at); st = B_CLOSED
                        :: else ->
                            atomic {   /* persist: commit the listed, drop the others; the new key */
                                i = 0;
                                do
                                :: i < NR ->
                                    if
                                    :: b_pend[i] && (fv >> i) & 1 ->
                                        b_comm[i] = true; b_pend[i] = false; b_tot = b_tot + REFILL
                                    :: b_pend[i] && !((fv >> i) & 1) -> b_pend[i] = false; b_blocks[i] = 0
                                    :: else -> skip
                                    fi;
                                    i++
                                :: else -> break
                                od;
                                if
                                :: fp != NONE && (b_keys & (1 << fp)) == 0 ->
                                    USE(fp, ID_KEY(fp), b_tot);
                                    b_keys = b_keys | (1 << fp); b_cons = MAX(b_cons, fp + 1)
                                :: else -> skip
                                fi;
                                b_sb = b_cons;                 /* slot 0 of the connection's tags */
#ifdef MUTANT_B3
                                b_ep = MAX(b_ep, pe) + 1;
#endif
                                CHECK()
                            }
                            st = B_IDLE
                        fi
                    :: st == B_IDLE && t == keepalive -> skip   /* Alice is there; nothing changes */
                    :: st == B_IDLE && t == round_start ->
                        if
                        :: fr < next ->                      /* a used round number */
                            SEND(b2a[c], error, 0, 0, a_at); st = B_CLOSED
                        :: else ->
                            atomic { r = fr; next = fr + 1; b_next = next; steps = 0 }
                            SEND(b2a[c], sift_announce, r, 0, a_at); st = B_SIFTING
                        fi
                    :: st == B_SIFTING && t == sift_answer && fr == r ->
                        SEND(b2a[c], estimate_request, r, 0, a_at); st = B_ESTIMATING
                    :: st == B_ESTIMATING && t == estimate_answer && fr == r ->
                        if
                        :: qok(r) -> SEND(b2a[c], cascade_pass, r, 0, a_at); st = B_RECONCILING
                        :: else -> dropped = r; r = NONE; st = B_IDLE
                        fi
                    :: st == B_RECONCILING && t == cascade_parities && fr == r ->
                        if
                        :: steps < 1 -> steps++; SEND(b2a[c], cascade_ranges, r, 0, a_at)
                        :: true ->
                            SEND(b2a[c], cascade_done, r, 0, a_at);
                            if
                            :: ecok(r) -> st = B_CONFIRMING
                            :: else -> dropped = r; r = NONE; st = B_IDLE
                            fi
                        fi
                    :: st == B_CONFIRMING && t == confirm && fr == r ->
                        SEND(b2a[c], confirm_result, r, matched(r), a_at);
                        if
                        :: matched(r) -> b_verified[r] = true; st = B_AMPLIFYING
                        :: else -> dropped = r; r = NONE; st = B_IDLE
                        fi
                    :: st == B_AMPLIFYING && t == amplify && fr == r ->
                        if
                        :: fv != blocks[r] ->                               /* config-mismatch */
                            SEND(b2a[c], error, 0, 0, a_at); st = B_CLOSED
                        :: fv == 0 -> dropped = r; r = NONE; st = B_IDLE        /* keyless round */
                        :: fv != 0 && fv == blocks[r] && fp != b_sb ->       /* bad-mac: the tag */
                            SEND(b2a[c], error, 0, 0, a_at); st = B_CLOSED
                        :: fv != 0 && fv == blocks[r] && fp == b_sb ->
                            atomic {   /* persist the pending round and the pads' use */
                                assert(b_verified[r]);
                                b_rb = b_sb; b_sb = b_sb + PADS;             /* the next slot */
                                USE(b_rb, ID_AMPLIFY(r), b_tot);             /* Alice's tag, verified */
                                b_pend[r] = true; b_blocks[r] = fv;
                                USE(b_rb + 1, ID_COMMIT(r), b_tot); b_cons = MAX(b_cons, b_rb + 2);
                                CHECK()
                            }
                            if
                            :: SENDX(b2a[c], commit, r, fv, b_rb + 1, 0, a_at); st = B_COMMITTING
                            :: !calm -> st = B_CLOSED                      /* crash after the write */
                            fi
                        fi
                    :: st == B_COMMITTING && t == committed && fr == r ->
                        if
                        :: fp != b_rb + 2 ->                                /* bad-mac: the tag */
                            SEND(b2a[c], error, 0, 0, a_at); st = B_CLOSED
                        :: else ->
                            atomic {
                                assert(b_verified[r]);
                                USE(b_rb + 2, ID_COMMITTED(r), b_tot);        /* Alice's tag, verified */
                                b_cons = MAX(b_cons, b_rb + 3);
                                b_comm[r] = true; b_pend[r] = false; b_tot = b_tot + REFILL; CHECK()
                            };
                            r = NONE; st = B_IDLE
                        fi
                    :: (st == B_SIFTING || st == B_ESTIMATING || st == B_RECONCILING ||
                        st == B_CONFIRMING || st == B_AMPLIFYING || st == B_COMMITTING) && t == abort &&
                       fr == r ->
                        if   /* Alice never aborts a round she committed: drop it if pending */
                        :: st == B_COMMITTING -> b_pend[r] = false; b_blocks[r] = 0; CHECK()
                        :: else -> skip
                        fi;
                        dropped = r; r = NONE; st = B_IDLE
                    :: else ->
                        SEND(b2a[c], error, 0, 0, a_at); st = B_CLOSED
                    fi
                fi
            fi;
            t = 0; fc = 0; fs = 0; fm = 0; fr = 0; fv = 0; fp = 0; fx = 0   /* forget the frame */
            }
        od;
        atomic { LEAVE(a2b[c], b_at); r = NONE; h = 0; hok = false; c++ }
    :: else -> break
    od;
    FINISH()
}
