/*
 * qkdp/1: a Promela model of both roles' state machines (qkdp-v1.md §10–§15, qkdp-v1.toml).
 *
 * What is modelled
 *   - Alice and Bob exactly as the [[transitions]] of qkdp-v1.toml: every state, every received round
 *     message, the local events start_round and abort, and what each side persists before it sends.
 *     tests/test_model.py checks that the states, the messages and the (state, message) pairs of the
 *     guards below are those of the toml: every guard of a receive is written `st == X && t == m`.
 *   - Several connections, one after the other. A connection stands for its session keys: a frame
 *     carries the connection it was made for, and a MAC that verifies only there (§12).
 *   - A network that loses, duplicates and reorders frames, and an attacker who replays frames of
 *     another connection and injects any message, but cannot forge a MAC. They act on a frame as it is
 *     delivered (DELIVER), and their actions share one finite budget.
 *   - Crashes, cuts and timeouts: either side may close its connection at any moment, and may crash
 *     between a durable write and the frame that follows it; what it persisted survives, the rest of
 *     the round is gone (§11, §13).
 *   - The link's counts as one choice per round made when Alice opens it (outcome, blocks): the QBER
 *     is too high, the error rate after reconciliation is too high, the confirmation tags differ, or
 *     the round passes with 0 (keyless), 1 or 2 key blocks. Both sides decide from the same counts, as
 *     the real protocol does.
 *
 * Not modelled: Alice sending keepalive (Bob's IDLE takes it and changes nothing, so it cannot matter),
 * the key channel of §19 (its messages are outside the round state machine), field
 * contents other than the round number and the one value each message carries here, and the
 * information-theoretic tags of §16 (a tag is one more MAC the attacker cannot forge).
 *
 * Checked by spin (tests/test_model.py; see README "Guarantees"):
 *   - safety run: no assertion fails and there is no invalid end state (no deadlock);
 *   - consistent: a round is committed at Bob only if Alice committed it with the same key blocks, and
 *     a round Alice committed is held by Bob, committed or pending (pending keys are never read out,
 *     and the next handshake's resolve commits them, §13);
 *   - verified: no side commits a round whose confirmation did not match or whose frames did not all
 *     pass their MAC and sequence checks;
 *   - liveness run, ltl `terminates`: every execution reaches the end: both roles done, every round
 *     either committed or abandoned, whatever the network, the attacker and crashes do. Every budget
 *     being finite, this says every reachable state can reach abort or done.
 */

#ifndef NCONN
#define NCONN 2    /* connections, one after another */
#endif
#ifndef NROUND
#define NROUND 1    /* rounds Alice opens in all */
#endif
#ifndef CAP
#define CAP 4    /* frames in flight per direction */
#endif
#ifndef BUDGET
#define BUDGET 1    /* losses, duplicates, reorderings, replays and injections, in all */
#endif
#define NONE    255
#define MAX(a, b) ((a) > (b) -> (a) : (b))

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

/* a frame: message, the connection whose keys made its MAC, seq, MAC valid, round, one value */
chan a2b[NCONN] = [CAP] of { mtype, byte, byte, bit, byte, byte };
chan b2a[NCONN] = [CAP] of { mtype, byte, byte, bit, byte, byte };

/* Where each side is: 2c+1 while connection c is open at that side, 2c+2 once it closed it. */
byte a_at, b_at;

/* An honest frame on connection c. A frame to a side that has closed that connection is lost with the
 * socket; a full channel means the peer stopped reading, and the frame is lost too. */
inline SEND(ch, m, rnd, val, peer_at) {
    if
    :: peer_at <= 2 * c + 1 && nfull(ch) -> ch ! m, c, sseq, 1, rnd, val
    :: else -> skip
    fi;
    sseq++
}

/* leave connection c: what is still in flight to this side is lost */
inline LEAVE(ch, at) {
    at = 2 * c + 2;
    do
    :: nempty(ch) -> ch ? _, _, _, _, _, _
    :: empty(ch) -> break
    od
}

/* the link's counts of each round, fixed when Alice opens it */
/* How round r ends, given its counts: the first check that fails decides, so one choice among these
 * covers every combination. blocks[r] is the number of key blocks when none fails (0: keyless). */
mtype = { QBER_HIGH, EC_HIGH, TAGS_DIFFER, PASSES }
mtype outcome[NROUND];
byte blocks[NROUND];
#define qok(r)     (outcome[r] != QBER_HIGH)
#define ecok(r)    (outcome[r] != QBER_HIGH && outcome[r] != EC_HIGH)
#define matched(r) (outcome[r] == PASSES)

/* durable state (each side's store) */
byte a_next;                 /* next_round, reserved before round_start (§13) */
bool a_comm[NROUND];
byte a_blocks[NROUND];
byte b_next;
bool b_pend[NROUND];
bool b_comm[NROUND];
byte b_blocks[NROUND];

/* ghost: the round's confirmation matched and every frame of it passed its checks, at each side */
bool a_verified[NROUND];
bool b_verified[NROUND];

byte finished;               /* roles that reached their end */
byte budget = BUDGET;        /* what the network and the attacker may still do */

/*
 * The next frame the receiver reads from ch. The network and the attacker act on a frame when it is
 * delivered, which is when the receiver can tell: the frame is lost, delivered twice, overtaken by
 * the next one, or instead of it comes a frame the attacker made (any message, no valid MAC) or
 * recorded on another connection (a valid MAC under that connection's keys). Each of these spends one
 * unit of the budget. `lost` is set when nothing is read.
 */
inline DELIVER(ch) {
    lost = false;
    if
    :: nempty(ch) -> ch ? t, fc, fs, fm, fr, fv                                 /* as sent */
    :: budget > 0 && nempty(ch) -> budget--; ch ? _, _, _, _, _, _; lost = true       /* lost */
    :: budget > 0 && nempty(ch) -> budget--; ch ? <t, fc, fs, fm, fr, fv>            /* duplicated */
    :: budget > 0 && len(ch) > 1 ->                                                  /* reordered */
        budget--; ch ? ht, hc, hs, hm, hr, hv; ch ? t, fc, fs, fm, fr, fv; ch ! ht, hc, hs, hm, hr, hv;
        ht = 0; hc = 0; hs = 0; hm = 0; hr = 0; hv = 0
    :: budget > 0 -> budget--; select (m : 1 .. 20); t = m; m = 0; fc = c; fs = rseq; fm = 0   /* forged */
    :: budget > 0 -> budget--; select (m : 1 .. 20); t = m; m = 0; fc = c + 1; fs = rseq; fm = 1 /* replayed */
    fi
}

#define CONSISTENT(r) \
    ((!b_comm[r] || (a_comm[r] && a_blocks[r] == b_blocks[r])) && \
     (!a_comm[r] || ((b_pend[r] || b_comm[r]) && a_blocks[r] == b_blocks[r])))

ltl terminates { <> (finished == 2) }

/* the invariant, checked after every durable write (the only steps that change what it reads) */
inline CHECK() {
    i = 0;
    do
    :: i < NROUND -> assert(CONSISTENT(i)); i++
    :: else -> break
    od;
    i = 0
}

/* the rounds of `mask` that `held` holds, as a mask */
#define HELD(held, mask, out) \
    i = 0; out = 0; \
    do \
    :: i < NROUND -> if :: held[i] && (mask >> i) & 1 -> out = out | (1 << i) :: else -> skip fi; i++ \
    :: else -> break \
    od; \
    i = 0

active proctype Alice() {
    byte c = 0;
    byte sseq, rseq;
    byte r, dropped, next, i;
    bool stopped = false;
    mtype st;
    mtype t, ht;
    byte fc, fs, fr, fv, hc, hs, hr, hv, m;
    bit fm, hm;
    bool lost;

    do
    :: c < NCONN && !stopped ->
        atomic {
            sseq = 0; rseq = 0; r = NONE; dropped = NONE; st = A_HELLO; a_at = 2 * c + 1;
            SEND(a2b[c], hello, 0, 0, b_at)
        }
        do
        :: st == A_CLOSED -> break
        :: st != A_CLOSED -> st = A_CLOSED   /* timeout, cut, crash or stop: the open round is gone */
        :: atomic { st == A_IDLE && next < NROUND ->   /* start_round: persist next_round, then round_start */
                r = next; next++; a_next = next;
                if
                :: outcome[r] = QBER_HIGH
                :: outcome[r] = EC_HIGH
                :: outcome[r] = TAGS_DIFFER
                :: outcome[r] = PASSES; if :: blocks[r] = 0 :: blocks[r] = 1 :: blocks[r] = 2 fi
                fi;
                SEND(a2b[c], round_start, r, 0, b_at);
                st = A_SIFTING
            }
        :: atomic { st == A_IDLE && next >= NROUND ->   /* all rounds done: Alice stops */
            SEND(a2b[c], error, 0, 0, b_at); stopped = true; st = A_CLOSED }
        :: atomic { (st == A_SIFTING || st == A_ESTIMATING || st == A_RECONCILING || st == A_CONFIRMING ||
                     st == A_COMMITTING) ->   /* the local event abort */
            SEND(a2b[c], abort, r, 0, b_at); dropped = r; r = NONE; st = A_IDLE }
        :: atomic { st != A_CLOSED && (nempty(b2a[c]) || budget > 0) -> DELIVER(b2a[c]);
            if
            :: lost -> skip
            :: !lost && (fc != c || fm == 0 || fs != rseq) ->       /* bad-mac, bad-seq */
                SEND(a2b[c], error, 0, 0, b_at); st = A_CLOSED
            :: else ->
                rseq++;
                if
                :: t == error -> st = A_CLOSED
                :: t != error && ROUND_MSG(t) && fr == dropped && fr != r -> skip   /* stale (§13) */
                :: else ->
                    if
                    :: st == A_HELLO && t == hello ->
                        SEND(a2b[c], auth, 0, 0, b_at); st = A_AUTH
                    :: st == A_AUTH && t == auth ->
                        SEND(a2b[c], sync, a_next, 0, b_at); st = A_SYNC
                    :: st == A_SYNC && t == sync ->
                        next = MAX(a_next, fr);
                        HELD(a_comm, fv, fs);   /* Alice's committed among Bob's pending */
                    fv = fs;
                        SEND(a2b[c], resolve, 0, fv, b_at); st = A_IDLE
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
                            SEND(a2b[c], amplify, r, 0, b_at);
                            dropped = r; r = NONE; st = A_IDLE          /* keyless round */
                        :: fv != 0 && blocks[r] != 0 ->
                            a_verified[r] = true;
                            SEND(a2b[c], amplify, r, blocks[r], b_at); st = A_COMMITTING
                        fi
                    :: st == A_COMMITTING && t == commit && fr == r ->
                        if
                        :: fv != blocks[r] ->                              /* bad-message */
                            SEND(a2b[c], error, 0, 0, b_at); st = A_CLOSED
                        :: else ->
                            atomic {
                                assert(a_verified[r]);
                                a_comm[r] = true; a_blocks[r] = fv; CHECK()   /* persist the committed round */
                            }
                            if
                            :: SEND(a2b[c], committed, r, 0, b_at); r = NONE; st = A_IDLE
                            :: st = A_CLOSED                               /* crash after the write */
                            fi
                        fi
                    :: (st == A_SIFTING || st == A_ESTIMATING || st == A_RECONCILING ||
                        st == A_CONFIRMING || st == A_COMMITTING) && t == abort && fr == r ->
                        dropped = r; r = NONE; st = A_IDLE
                    :: else ->                                              /* bad-state, bad-message */
                        SEND(a2b[c], error, 0, 0, b_at); st = A_CLOSED
                    fi
                fi
            fi;
            t = 0; fc = 0; fs = 0; fm = 0; fr = 0; fv = 0   /* forget the frame */
            }
        od;
        atomic { LEAVE(b2a[c], a_at); r = NONE; c++ }
    :: else -> break
    od;
    finished++
}

active proctype Bob() {
    byte c = 0;
    byte sseq, rseq;
    byte r, dropped, next, steps, i;
    mtype st;
    mtype t, ht;
    byte fc, fs, fr, fv, hc, hs, hr, hv, m;
    bit fm, hm;
    bool lost;

    do
    :: c < NCONN ->
        atomic {
            sseq = 0; rseq = 0; r = NONE; dropped = NONE; st = B_HELLO; b_at = 2 * c + 1;
            SEND(b2a[c], hello, 0, 0, a_at)
        }
        do
        :: st == B_CLOSED -> break
        :: st != B_CLOSED -> st = B_CLOSED   /* timeout, cut, crash, or replaced by a new connection */
        :: atomic { (st == B_SIFTING || st == B_ESTIMATING || st == B_RECONCILING || st == B_CONFIRMING ||
                     st == B_AMPLIFYING || st == B_COMMITTING) ->   /* the local event abort; a pending round stays */
            SEND(b2a[c], abort, r, 0, a_at); dropped = r; r = NONE; st = B_IDLE }
        :: atomic { st != B_CLOSED && (nempty(a2b[c]) || budget > 0) -> DELIVER(a2b[c]);
            if
            :: lost -> skip
            :: !lost && (fc != c || fm == 0 || fs != rseq) ->
                SEND(b2a[c], error, 0, 0, a_at); st = B_CLOSED
            :: else ->
                rseq++;
                if
                :: t == error -> st = B_CLOSED
                :: t != error && ROUND_MSG(t) && fr == dropped && fr != r -> skip
                :: else ->
                    if
                    :: st == B_HELLO && t == hello ->
                        SEND(b2a[c], auth, 0, 0, a_at); st = B_AUTH
                    :: st == B_AUTH && t == auth ->
                        HELD(b_pend, 255, fs); SEND(b2a[c], sync, b_next, fs, a_at); st = B_SYNC
                    :: st == B_SYNC && t == sync ->
                        next = MAX(b_next, fr); st = B_RESOLVING
                    :: st == B_RESOLVING && t == resolve ->
                        HELD(b_pend, fv, fs);
                        if
                        :: fs != fv ->   /* lists a round not pending here */
                            SEND(b2a[c], error, 0, 0, a_at); st = B_CLOSED
                        :: else ->
                            atomic {                      /* persist: commit the listed, drop the others */
                                i = 0;
                                do
                                :: i < NROUND ->
                                    if
                                    :: b_pend[i] && (fv >> i) & 1 -> b_comm[i] = true; b_pend[i] = false
                                    :: b_pend[i] && !((fv >> i) & 1) -> b_pend[i] = false; b_blocks[i] = 0
                                    :: else -> skip
                                    fi;
                                    i++
                                :: else -> break
                                od;
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
                        :: fv != 0 && fv == blocks[r] ->
                            atomic {
                                assert(b_verified[r]);
                                b_pend[r] = true; b_blocks[r] = fv; CHECK()   /* persist the pending round */
                            }
                            if
                            :: SEND(b2a[c], commit, r, fv, a_at); st = B_COMMITTING
                            :: st = B_CLOSED                                /* crash after the write */
                            fi
                        fi
                    :: st == B_COMMITTING && t == committed && fr == r ->
                        atomic { assert(b_verified[r]); b_comm[r] = true; b_pend[r] = false; CHECK() };
                        r = NONE; st = B_IDLE
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
            t = 0; fc = 0; fs = 0; fm = 0; fr = 0; fv = 0   /* forget the frame */
            }
        od;
        atomic { LEAVE(a2b[c], b_at); r = NONE; c++ }
    :: else -> break
    od;
    finished++
}
