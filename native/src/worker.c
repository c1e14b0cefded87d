/* The worker thread: the only thread that touches live endpoints.
 *
 * Each iteration: take new submissions, post what the transmit queues take
 * (work that gets -FI_EAGAIN stays queued), read every NIC's CQ, count imm
 * arrivals, and hand finished operations to the event queue in one flush.
 * When idle it spins (busy), spins briefly then sleeps (adaptive), or sleeps
 * at once (blocking) on the CQs' fds and the submission eventfd.
 *
 * Routing: an element of a batch goes whole to one NIC pair, chosen round
 * robin; a write of at least stripe_threshold bytes is split into 2^s shards
 * (enough for the larger NIC count of the two sides), shard i on our NIC
 * i mod k_local to their NIC i mod k_remote.  Every shard carries the imm
 * with s in its top bits, so the receiver's ImmCounter adds 1/2^s of a write
 * per shard and counts whole writes whatever the NIC counts. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <sys/prctl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define CQ_BATCH 64
#define MAX_BLOCKED_OPS 8 /* peers refused this round before giving up on the rest of the queue */
#define MAX_SKIPPED_OPS 65536 /* ops waiting behind refused ones looked at in one round, at most */
/* A post the provider keeps refusing (-FI_EAGAIN) is offered again after a delay
 * of 1/16 of how long it has been refused (from 50 us on, at most 1 ms), not in a
 * hot loop; the worker keeps driving progress meanwhile and naps only when nothing
 * of its own is in flight.  On shm every attempt takes the *peer's* region lock (a
 * connection request not yet taken, a full command queue), and the peer's own
 * progress needs that lock to take what would end the refusal: a sender retrying
 * flat out, and preempted while it holds the lock, can keep the peer from draining
 * for seconds on a small machine (docs/reliability.md).  Short refusals (a queue
 * full for a few microseconds) are still retried at once. */
#define RETRY_BACKOFF_AFTER_NS 50000ull
#define RETRY_BACKOFF_MAX_NS 1000000ull
#define RETRY_NAP_MIN_NS 20000ull  /* the worker naps (instead of yielding) for waits this long, */
#define RETRY_NAP_MAX_NS 200000ull /* at most this long at a time */
#define SHARD_ALIGN 64
#define WARM_NS (50ull * 1000 * 1000) /* recent traffic keeps naps short */
/* Adaptive polling's spin window (shm engines): a spin that runs its whole window without
 * work halves the next window, down to this; a spin that finds work doubles
 * it, up to spin_us; a wake-up (an fd) that comes t < spin_us after the worker
 * went to sleep sets it to 2t (haltpoll's idea: that window would have caught
 * it).  Events that come faster than spin_us keep the worker spinning (a
 * stream of small batches, which then go inline); events further apart (a
 * stream of large writes, ~85 us apart for 1 MiB on shm) shrink the window, so
 * the worker does not burn most of a core spinning between them (on 2 cores
 * that core is the writer's: issue 2's throughput). */
#define SPIN_MIN_NS 2000ull
#define SPIN_STRETCH 8 /* not shm: the window stretches up to this many times spin_us */
#define STREAM_SPIN_NS 2000000ull /* not shm: spin this long after bytes (not completions) were last seen */
#define STREAM_LOOK_NS 50000ull    /* and look for them this often meanwhile */
#define STREAM_PASS_NS 5000ull     /* a progress pass this long took in bytes */

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

void op_free(struct op *op)
{
    if (!op)
        return;
    if (op->cu_event) /* its copies may still touch buffers about to be freed */
        cu_release(op->cu_ctx, op->cu_event, true);
    free(op->wrs);
    free(op->src_pages);
    free(op->dst_pages);
    free(op->msg);
    free(op->ipeers);
    free(op->icounts);
    free(op);
}

static void live_remove(aiote_engine *e, struct op *op)
{
    if (op->live_prev)
        op->live_prev->live_next = op->live_next;
    else
        e->live = op->live_next;
    if (op->live_next)
        op->live_next->live_prev = op->live_prev;
    op->live_prev = op->live_next = NULL;
}

static void release_mr(aiote_engine *e, struct op *op)
{
    if (op->kind != OP_WRITES && op->kind != OP_PAGED)
        return;
    pthread_mutex_lock(&e->mr_lock);
    e->mrs[op->mr_index].refs--;
    pthread_mutex_unlock(&e->mr_lock);
}

/* Report the operation and free it (nothing of it is in flight). */
static void finish_op(aiote_engine *e, struct op *op)
{
    if (op->kind == OP_NOTE) { /* the engine's own message (carry.c): nobody waits for it */
        live_remove(e, op);
        op_free(op);
        return;
    }
    if (op->kind == OP_PING) {
        struct peer *p = e->peers[op->peer];
        p->ping_inflight = false;
        if (op->status)
            carry_fail_peer(e, op->peer, op->fi_errno); /* it owes us acknowledgements it can't send */
        if (op->status && !p->gone) {
            aiote_event ev = {.id = op->peer, .kind = AIOTE_EV_PEER_DOWN, .status = op->status,
                              .fi_errno = op->fi_errno, .prov_errno = op->prov_errno, .nic = op->nic};
            event_buf_push(&e->pending_events, &ev);
        }
        live_remove(e, op);
        op_free(op);
        return;
    }
    release_mr(e, op);
    aiote_event ev = {
        .id = op->id,
        .kind = AIOTE_EV_OP,
        .status = op->status,
        .fi_errno = op->fi_errno,
        .prov_errno = op->prov_errno,
        .index = op->bad_index,
        .nic = op->status ? op->nic : -1,
    };
    event_buf_push(&e->pending_events, &ev);
    if (op->kind == OP_IMMS && op->id == 0)
        ; /* internal (direct.c: imms of a failed op's writes that landed) */
    else if (op->status)
        e->stats.ops_failed++;
    else
        e->stats.ops_completed++;
    atomic_fetch_sub(&e->outstanding, op->kind == OP_SEND ? 1 : (op->n_submitted ? op->n_submitted : 1));
    live_remove(e, op);
    op_free(op);
}

static void fail_op(struct op *op, int32_t status, int fi_err, int prov_err, uint64_t index, int nic)
{
    if (op->status)
        return; /* keep the first error */
    op->status = status;
    op->fi_errno = fi_err;
    op->prov_errno = prov_err;
    op->bad_index = index;
    op->nic = nic;
}

void op_fail(struct op *op, int32_t status, int fi_err, uint64_t index) { fail_op(op, status, fi_err, 0, index, 0); }

void op_settle(aiote_engine *e, struct op *op)
{
    op->inflight--;
    if (op->posted_all && op->inflight == 0)
        finish_op(e, op);
}

/* log2 of the shard count of an element */
static unsigned shard_log(const aiote_engine *e, const struct op *op, const struct peer *p, uint64_t len)
{
    uint32_t k = e->nnics > p->nnics ? e->nnics : p->nnics;
    if (k == 1 || op->kind != OP_WRITES || e->cfg.routing == AIOTE_ROUTE_PINNED ||
        len < e->cfg.stripe_threshold)
        return 0;
    unsigned lg = 0;
    while ((1u << lg) < k)
        lg++;
    while (lg > 0 && (len >> lg) < e->cfg.stripe_min)
        lg--;
    return lg;
}

/* Our NIC for a shard: the wanted one, or the next one still in service. */
static struct nic *pick_nic(aiote_engine *e, uint32_t want)
{
    for (uint32_t k = 0; k < e->nnics; k++) {
        struct nic *n = &e->nics[(want + k) % e->nnics];
        if (!atomic_load(&n->failed))
            return n;
    }
    return NULL;
}

/* A provider post to a shm peer: the watchdog may find us stuck in it for
 * good (see struct aiote_engine) and cancel the thread, which only takes
 * effect here (cancellation is asynchronous but disabled elsewhere). */
static inline void watched_post_begin(aiote_engine *e, uint32_t peer)
{
    int old;
    atomic_store_explicit(&e->posting_peer, peer + 1, memory_order_relaxed);
    pthread_setcancelstate(PTHREAD_CANCEL_ENABLE, &old);
}

static inline void watched_post_end(aiote_engine *e)
{
    int old;
    pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, &old);
    atomic_store_explicit(&e->posting_peer, 0, memory_order_relaxed);
    atomic_fetch_add_explicit(&e->post_seq, 1, memory_order_relaxed);
}

/* A post's outcome for the connection-request bookkeeping (struct peer.conn). */
static inline void note_conn(struct peer *p, uint32_t nic, uint32_t remote, ssize_t rc)
{
    if (rc == 0)
        p->conn[nic][remote] = CONN_TRIED | CONN_TAKEN;
    else if (rc == -FI_EAGAIN)
        p->conn[nic][remote] |= CONN_TRIED;
}

/* Must element i ask for delivery-complete?  On an ordered single-NIC connection
 * (e->waw_ordered) not when the next element of the same op goes to the same
 * remote region (same descriptor: same peer, key and connection) and will be
 * posted: that one, or the last of the run, asks for it, and its completion
 * means this one's bytes are in place too (the provider places writes on a
 * connection in order).  The op completes only with all its writes, so its
 * future still resolves once every byte is in the target's memory; a write the
 * target refuses (a closed region) fails the run's delivered write to the same
 * region with it.  A 32-write batch over tcp then costs the target one ack, not 32. */
static inline bool dc_needed(const aiote_engine *e, const struct op *op, size_t i, const struct peer *p)
{
    if (!e->waw_ordered || p->nnics != 1 || i + 1 >= op->n || carry_follows(e, op, i + 1))
        return true; /* (a carried next element is a message, not an ordered write) */
    if (op->kind == OP_PAGED)
        return op->page_len == 0 && !op->has_imm;
    if (op->kind != OP_WRITES)
        return true;
    const struct welem *nx = &op->wrs[i + 1];
    return nx->rd != op->wrs[i].rd || (nx->len == 0 && !op->has_imm);
}

/* 0: posted (or nothing to post), 1: provider said -FI_EAGAIN, 2: no transmit
 * context free (wait for our completions), <0: -fi_errno (*nic_out names the NIC) */
static int post_shard(aiote_engine *e, struct op *op, size_t i, int *nic_out)
{
    struct welem w;
    op_elem(op, i, &w);
    if (w.len == 0 && !op->has_imm)
        return 0;
    const struct rdesc *rd = w.rd;
    struct peer *p = e->peers[rd->peer];
    unsigned lg = shard_log(e, op, p, w.len);
    uint32_t s = op->next_shard, nshards = 1u << lg;
    uint32_t want_local, remote;
    if (e->cfg.routing == AIOTE_ROUTE_PINNED) {
        want_local = e->cfg.pinned_nic % e->nnics;
        remote = e->cfg.pinned_nic % p->nnics;
    } else if (nshards > 1) {
        want_local = s % e->nnics;
        remote = s % p->nnics;
    } else {
        /* advances on every attempt: an element refused on one NIC tries the next */
        want_local = e->rr % e->nnics;
        remote = e->rr % p->nnics;
        e->rr++;
    }
    struct nic *n = pick_nic(e, want_local);
    if (!n) {
        *nic_out = (int)want_local;
        return -FI_ENETDOWN; /* every NIC failed */
    }
    *nic_out = n->index;
    if (p->local[remote] && !atomic_load(&p->local[remote]->open))
        return -FI_ENOTCONN; /* a same-process peer that closed */
    if (p->gone)
        return -FI_ECONNRESET; /* its process exited */
    struct tx_ctx *c = n->tx_free;
    if (!c || n->inflight >= n->max_inflight)
        return 2;
    uint64_t chunk = nshards > 1 ? (w.len >> lg) & ~(uint64_t)(SHARD_ALIGN - 1) : w.len;
    uint64_t off = (uint64_t)s * chunk;
    uint64_t len = s + 1 == nshards ? w.len - off : chunk;
    struct iovec iov = {.iov_base = op->local_base + w.src_off + off, .iov_len = len};
    void *desc = op->local_desc[n->index];
    struct fi_rma_iov riov = {.addr = rd->base + w.dst_off + off, .len = len, .key = rd->keys[remote]};
    struct fi_msg_rma msg = {
        .msg_iov = &iov,
        .desc = &desc,
        .iov_count = 1,
        .addr = p->fi[n->index][remote],
        .rma_iov = &riov,
        .rma_iov_count = 1,
        .context = &c->h.fi,
        .data = op->imm | ((uint32_t)lg << AIOTE_IMM_SHARD_SHIFT),
    };
    uint64_t flags = FI_COMPLETION;
    if (op->has_imm)
        flags |= FI_REMOTE_CQ_DATA;
    /* shm never completes a 0-byte write asked for delivery-complete
     * (LIBFABRIC-NOTES.md); there is no payload to deliver anyway. */
    if (e->info.delivery_complete && !(e->is_shm && len == 0) && dc_needed(e, op, i, p))
        flags |= FI_DELIVERY_COMPLETE;
    if (p->ep[n->index])
        watched_post_begin(e, rd->peer);
    ssize_t rc = fi_writemsg(p->ep[n->index] ? p->ep[n->index] : n->ep, &msg, flags);
    if (p->ep[n->index])
        watched_post_end(e);
    note_conn(p, n->index, remote, rc);
    if (rc == -FI_EAGAIN)
        return 1;
    if (rc)
        return (int)rc;
    n->tx_free = c->next_free;
    n->inflight++;
    c->op = op;
    c->send_slot = -1;
    c->peer = rd->peer;
    c->index = i;
    c->big = len >= BIG_WRITE;
    e->big_inflight += c->big;
    op->inflight++;
    e->stats.writes_posted++;
    e->stats.writes_delivered += (flags & FI_DELIVERY_COMPLETE) != 0;
    e->stats.bytes_written += len;
    n->stats.writes_posted++;
    n->stats.bytes_written += len;
    if (s + 1 < nshards) {
        op->next_shard++;
        return 3; /* more shards of this element */
    }
    op->next_shard = 0;
    return 0;
}

static int post_send(aiote_engine *e, struct op *op, int *nic_out)
{
    struct nic *n = &e->nics[0];
    uint32_t peer = op->kind == OP_IMMS ? op->ipeers[op->next_post] : op->peer;
    struct peer *p = e->peers[peer];
    /* OP_IMMS: {magic, imm, count} for element next_post (direct.c) */
    uint32_t imms_msg[4];
    const uint8_t *payload = op->msg;
    size_t payload_len = op->msg_len;
    uint32_t mflags = op->kind == OP_PING ? MSG_FLAG_PING : op->msg_flags;
    if (op->kind == OP_IMMS) {
        uint64_t cnt = op->icounts[op->next_post];
        imms_msg[0] = IMMS_MAGIC;
        imms_msg[1] = op->imm;
        memcpy(&imms_msg[2], &cnt, sizeof cnt);
        payload = (const uint8_t *)imms_msg;
        payload_len = sizeof imms_msg;
        mflags = MSG_FLAG_IMMS;
    }
    *nic_out = 0;
    if (atomic_load(&n->failed))
        return -FI_ENETDOWN;
    struct tx_ctx *c = n->tx_free;
    if (!c || !e->nsend_free || n->inflight >= n->max_inflight)
        return 2;
    if (p->local[0] && !atomic_load(&p->local[0]->open))
        return -FI_ENOTCONN;
    if (p->gone)
        return -FI_ECONNRESET;
    int slot = e->send_free[e->nsend_free - 1];
    uint8_t *buf = e->send_arena + (size_t)slot * e->slot_size;
    uint32_t hdr[4] = {MSG_MAGIC | (MSG_VERSION << 16), (uint32_t)e->self_blob_len, (uint32_t)payload_len,
                       mflags};
    memcpy(buf, hdr, sizeof hdr);
    memcpy(buf + sizeof hdr, e->self_blob, e->self_blob_len);
    if (payload_len)
        memcpy(buf + sizeof hdr + e->self_blob_len, payload, payload_len);
    size_t total = sizeof hdr + e->self_blob_len + payload_len;
    if (p->ep[0])
        watched_post_begin(e, peer);
    struct fid_ep *ep = p->ep[0] ? p->ep[0] : n->ep;
    ssize_t rc;
    if (op->kind == OP_IMMS) {
        /* The bytes are in place already; this only has to reach the target's
         * receive queue (in its shared memory on shm), not wait for its worker
         * to take it: inject-complete. */
        struct iovec iov = {.iov_base = buf, .iov_len = total};
        void *desc = fi_mr_desc(e->send_mr);
        struct fi_msg m = {.msg_iov = &iov, .desc = &desc, .iov_count = 1, .addr = p->fi[0][0],
                           .context = &c->h.fi};
        rc = fi_sendmsg(ep, &m, FI_COMPLETION | FI_INJECT_COMPLETE);
    } else {
        rc = fi_send(ep, buf, total, fi_mr_desc(e->send_mr), p->fi[0][0], &c->h.fi);
    }
    if (p->ep[0])
        watched_post_end(e);
    note_conn(p, 0, 0, rc);
    if (rc == -FI_EAGAIN)
        return 1;
    if (rc)
        return (int)rc;
    e->nsend_free--;
    n->tx_free = c->next_free;
    n->inflight++;
    c->op = op;
    c->send_slot = slot;
    c->peer = peer;
    c->index = 0;
    op->inflight++;
    e->stats.msgs_sent++;
    return 0;
}

/* The peer the next post of op goes to; UINT32_MAX for none (nothing left to post). */
static uint32_t op_next_peer(const struct op *op)
{
    if (op->next_post >= op->n)
        return UINT32_MAX;
    switch (op->kind) {
    case OP_SEND:
    case OP_PING:
    case OP_NOTE:
        return op->peer;
    case OP_IMMS:
        return op->ipeers[op->next_post];
    case OP_WRITES:
    case OP_PAGED: {
        struct welem w;
        op_elem(op, op->next_post, &w);
        return w.rd ? w.rd->peer : UINT32_MAX;
    }
    default:
        return UINT32_MAX;
    }
}

/* Post queued work in submission order.  An op the provider refuses
 * (-FI_EAGAIN: queue full, or its peer still connecting) stays queued, later
 * ops to the same peer wait behind it (one peer's ops leave in order), and
 * ops to other peers get their turn, so one unreachable peer can't stall the
 * others; an op refused (or waiting behind a refused one) for peer_timeout
 * fails with ETIMEDOUT (its peer is taken for unreachable). */
static bool post_pending(aiote_engine *e)
{
    bool did = false;
    uint64_t now = 0; /* read the clock only when the provider refuses something */
    uint64_t wait = UINT64_MAX; /* until the first deferred op may be tried again */
    int blocked = 0;
    /* peers refused (or deferred) in this pass: a later op to one of them waits too, so
     * what goes to one peer leaves in submission order (messages are delivered in order) */
    uint32_t held[MAX_BLOCKED_OPS];
    int nheld = 0, skipped = 0;
    struct op *prev = NULL, *op = e->pend_head;
    e->retry_wait_ns = 0;
    while (op && blocked < MAX_BLOCKED_OPS) {
        struct op *next = op->next;
        /* OP_IMMS: the imms of bytes that landed already must follow them */
        if (op->cancelled && op->next_post < op->n && op->kind != OP_IMMS) {
            fail_op(op, -AIOTE_E_CLOSED, FI_ECANCELED, 0, op->next_post, -1);
            op->n = op->next_post;
        }
        uint32_t to = op_next_peer(op);
        bool behind = false;
        for (int k = 0; k < nheld && !behind; k++)
            behind = held[k] == to;
        if (!behind && op->retry_at && op->next_post < op->n) {
            if (!now)
                now = now_ns();
            if (now < op->retry_at) { /* refused a while ago: not yet */
                if (op->retry_at - now < wait)
                    wait = op->retry_at - now;
                behind = true;
            } else {
                op->retry_at = 0;
            }
        }
        if (behind) { /* behind a refused op to the same peer, or deferred itself */
            if (!now)
                now = now_ns();
            if (!op->eagain_since) {
                op->eagain_since = now; /* waiting behind a refusal is being refused */
            } else if (now - op->eagain_since > e->peer_timeout_ns) {
                fail_op(op, -AIOTE_E_PROVIDER, FI_ETIMEDOUT, 0, op->next_post, -1);
                op->n = op->next_post; /* post nothing more of it: unlinked below */
                behind = false;
            }
        }
        if (behind) {
            /* only a peer newly held counts towards MAX_BLOCKED_OPS: any number of ops
             * queued behind a refused one cost a compare each, never a provider call, and
             * must not hold up the peers queued after them */
            bool known = false;
            for (int k = 0; k < nheld && !known; k++)
                known = held[k] == to;
            if (!known) {
                if (to != UINT32_MAX && nheld < MAX_BLOCKED_OPS)
                    held[nheld++] = to;
                blocked++;
            }
            if (++skipped >= MAX_SKIPPED_OPS)
                break;
            prev = op;
            op = next;
            continue;
        }
        bool refused = false;
        while (op->next_post < op->n) {
            int nic = -1;
            size_t adv = 1;
            int rc = op->kind == OP_SEND || op->kind == OP_PING || op->kind == OP_IMMS || op->kind == OP_NOTE
                         ? post_send(e, op, &nic)
                         : CARRY_SKIP;
            if (rc == CARRY_SKIP && op->next_shard == 0)
                rc = carry_post(e, op, op->next_post, &adv, &nic);
            if (rc == CARRY_SKIP)
                rc = post_shard(e, op, op->next_post, &nic);
            if (rc == 2) { /* our transmit contexts are all in flight: wait for completions */
                e->stats.eagain++;
                return did;
            }
            if (rc == 1) {
                e->stats.eagain++;
                if (!now)
                    now = now_ns();
                if (!op->eagain_since) {
                    op->eagain_since = now;
                } else if (now - op->eagain_since > e->peer_timeout_ns) {
                    fail_op(op, -AIOTE_E_PROVIDER, FI_ETIMEDOUT, 0, op->next_post, nic);
                    op->n = op->next_post; /* post nothing more of it */
                    break;
                }
                uint64_t refused_for = now - op->eagain_since;
                if (refused_for >= RETRY_BACKOFF_AFTER_NS) {
                    uint64_t d = refused_for / 16 < RETRY_BACKOFF_MAX_NS ? refused_for / 16 : RETRY_BACKOFF_MAX_NS;
                    op->retry_at = now + d;
                    if (d < wait)
                        wait = d;
                } else {
                    wait = 0;
                }
                refused = true;
                break;
            }
            op->eagain_since = 0;
            if (rc < 0) {
                fail_op(op, -AIOTE_E_PROVIDER, -rc, 0, op->next_post, nic);
                if (nic >= 0 && nic < (int)e->nnics)
                    e->nics[nic].stats.errors++;
                op->n = op->next_post; /* post nothing more of it */
                break;
            }
            did = true;
            if (rc == 3)
                continue; /* next shard of the same element */
            op->next_post += adv;
        }
        if (refused) {
            to = op_next_peer(op); /* the element refused (after any posted before it) */
            if (to != UINT32_MAX && nheld < MAX_BLOCKED_OPS)
                held[nheld++] = to;
            blocked++;
            prev = op;
            op = next;
            continue;
        }
        /* fully posted (or stopped): unlink */
        if (prev)
            prev->next = next;
        else
            e->pend_head = next;
        if (e->pend_tail == op)
            e->pend_tail = prev;
        op->next = NULL;
        op->posted_all = true;
        if (op->inflight == 0)
            finish_op(e, op);
        op = next;
    }
    /* every op looked at is deferred: the worker may nap that long (not if the scan
     * stopped at MAX_BLOCKED_OPS with ops behind it unseen) */
    if (!op && wait != UINT64_MAX)
        e->retry_wait_ns = wait;
    return did;
}

static void tx_done(aiote_engine *e, struct tx_ctx *c)
{
    struct op *op = c->op;
    struct nic *n = c->nic;
    if (c->send_slot >= 0)
        e->send_free[e->nsend_free++] = c->send_slot;
    if (c->carry)
        carry_sent(e, c);
    if (c->big) {
        e->big_inflight--;
        c->big = false;
    }
    c->op = NULL;
    c->carry = 0;
    c->next_free = n->tx_free;
    n->tx_free = c;
    n->inflight--;
    n->stats.completions++;
    op->inflight--;
    if (op->posted_all && op->inflight == 0)
        finish_op(e, op);
}

static size_t poll_cq(aiote_engine *e, struct nic *n);

/* Does an operation of ours still wait for a same-process shm peer?  Its answer
 * will be written into our region (local_peers.c). */
static bool local_inflight(aiote_engine *e)
{
    for (uint32_t k = 0; k < e->nnics; k++) {
        struct nic *n = &e->nics[k];
        for (size_t i = 0; n->tx_ctxs && i < n->ntx; i++) {
            struct tx_ctx *c = &n->tx_ctxs[i];
            if (!c->op || c->peer >= e->npeers)
                continue;
            struct peer *p = e->peers[c->peer];
            for (uint32_t j = 0; j < p->nnics; j++)
                if (p->local[j] && atomic_load(&p->local[j]->open))
                    return true;
        }
    }
    return false;
}

/* Closing a shm engine (its worker has stopped): no new posts to it from this
 * process (its endpoints are marked closed), then progress it until nothing
 * is in flight between it and a same-process engine either way — our
 * operations answered by them, theirs answered by us — so neither side
 * touches the other's regions once ours are gone.  Bounded by budget_ns;
 * false if it ran out (the teardown is then deferred, see local_peers.c). */
bool drain_local_inflight(aiote_engine *e, uint64_t budget_ns)
{
    uint64_t end = now_ns() + budget_ns;
    local_close_begin();
    for (uint32_t i = 0; i < AIOTE_MAX_NICS; i++)
        if (e->nics[i].local)
            atomic_store(&e->nics[i].local->open, false);
    local_close_end();
    for (;;) {
        local_close_begin(); /* the other workers are outside their posts and progress */
        bool busy = local_inflight(e) || local_others_inflight_to(e);
        local_close_end();
        if (!busy)
            return true;
        if (now_ns() >= end)
            return false;
        local_read_lock();
        for (uint32_t k = 0; k < e->nnics; k++)
            while (poll_cq(e, &e->nics[k]))
                ;
        local_read_unlock();
        struct timespec ts = {0, 20000};
        nanosleep(&ts, NULL);
    }
}

/* Closing a shm engine: might a live peer still hold an untaken connection
 * request of ours?  libfabric 1.17's shm introduces an endpoint to a peer with
 * a request that carries the endpoint's name, and refuses every post
 * (-FI_EAGAIN) until the peer's progress has taken it; taking it maps the
 * sender's region by that name.  Closing our endpoint removes the name, and a
 * peer that takes the request afterwards gets no mapping, dereferences NULL
 * (smr_progress_connreq) and dies of SIGSEGV in fi_cq_read.  A post that was
 * refused and never followed by an accepted one means a request may still
 * wait.  A peer whose process exited, or a same-process engine that closed,
 * takes nothing.  The caller then keeps our endpoints (local_peers.c). */
bool conn_requests_pending(aiote_engine *e)
{
    for (size_t i = 0; i < e->npeers; i++) {
        struct peer *p = e->peers[i];
        if (p->gone)
            continue;
        for (uint32_t k = 0; k < e->nnics; k++)
            for (uint32_t j = 0; j < p->nnics && j < AIOTE_MAX_NICS; j++) {
                if (p->conn[k][j] != CONN_TRIED)
                    continue;
                if (p->local[j] ? atomic_load(&p->local[j]->open) : !peer_process_gone(p))
                    return true;
            }
    }
    return false;
}

/* A failed NIC's outstanding contexts will never complete: fail them now. */
void fail_nic_inflight(aiote_engine *e, struct nic *n, int fi_err)
{
    for (size_t i = 0; i < n->ntx; i++) {
        struct tx_ctx *c = &n->tx_ctxs[i];
        if (!c->op)
            continue;
        struct op *op = c->op;
        fail_op(op, -AIOTE_E_PROVIDER, fi_err, 0, c->index, n->index);
        if (!op->posted_all)
            op->n = op->next_post;
        n->stats.errors++;
        if (c->carry)
            carry_send_failed(e, c);
        tx_done(e, c);
    }
    event_queue_flush(&e->events, &e->pending_events);
}

static size_t poll_cq(aiote_engine *e, struct nic *n);

/* A peer's process exited: what is in flight to it will never complete (shm
 * gives no signal).  Settle what its endpoints already completed, close
 * them, fail the rest, and forget its address so a new process that gets
 * the same name is a new peer. */
void peer_down(aiote_engine *e, uint32_t idx, int fi_err)
{
    struct peer *p = e->peers[idx];
    if (p->gone && !p->ep[0] && p->pidfd < 0)
        return;
    p->gone = true;
    for (uint32_t k = 0; k < e->nnics; k++)
        while (poll_cq(e, &e->nics[k]))
            ;
    peer_close(e, p);
    for (uint32_t k = 0; k < e->nnics; k++) {
        struct nic *n = &e->nics[k];
        for (size_t i = 0; i < n->ntx; i++) {
            struct tx_ctx *c = &n->tx_ctxs[i];
            if (!c->op || c->peer != idx)
                continue;
            struct op *op = c->op;
            fail_op(op, -AIOTE_E_PROVIDER, fi_err, 0, c->index, n->index);
            if (!op->posted_all)
                op->n = op->next_post;
            if (c->carry)
                carry_send_failed(e, c);
            tx_done(e, c);
        }
        for (uint32_t j = 0; j < p->nnics; j++)
            fi_av_remove(n->av, &p->fi[k][j], 1, 0);
    }
    carry_fail_peer(e, idx, fi_err);
    aiote_event ev = {.id = idx, .kind = AIOTE_EV_PEER_DOWN, .status = -AIOTE_E_PROVIDER,
                      .fi_errno = fi_err, .index = 1 /* exited */, .nic = -1};
    event_buf_push(&e->pending_events, &ev);
}

/* The worker owns op from now on; it is posted in turn. */
static void add_live_pending(aiote_engine *e, struct op *op)
{
    op->live_next = e->live;
    if (e->live)
        e->live->live_prev = op;
    e->live = op;
    if (e->pend_tail)
        e->pend_tail->next = op;
    else
        e->pend_head = op;
    e->pend_tail = op;
}

void queue_internal_send(aiote_engine *e, uint32_t peer, void *msg, size_t len, uint32_t flags)
{
    struct op *op = calloc(1, sizeof *op);
    if (!op) {
        free(msg);
        return;
    }
    op->kind = OP_NOTE;
    op->peer = peer;
    op->n = 1;
    op->msg = msg;
    op->msg_len = len;
    op->msg_flags = flags;
    add_live_pending(e, op);
}

/* Every few ms: peers whose process exited go down; watched peers get a
 * probe message each ping interval (its failure or timeout reports them). */
static void check_peers(aiote_engine *e, uint64_t now)
{
    if (now < e->next_liveness_ns)
        return;
    e->next_liveness_ns = now + 2 * 1000 * 1000;
    carry_check(e, now);
    size_t np = e->npeers;
    for (size_t i = 0; i < np; i++) {
        struct peer *p = e->peers[i];
        if ((p->pidfd >= 0 || (p->pid && p->ep[0])) && peer_process_gone(p)) {
            peer_down(e, (uint32_t)i, FI_ECONNRESET);
            continue;
        }
        if (!atomic_load_explicit(&p->watch, memory_order_relaxed) || p->gone || p->ping_inflight ||
            now < p->next_ping_ns)
            continue;
        if (p->pidfd >= 0)
            continue; /* its process is watched directly */
        struct op *op = calloc(1, sizeof *op);
        if (!op)
            continue;
        op->kind = OP_PING;
        op->peer = (uint32_t)i;
        op->n = 1;
        op->msg = malloc(1);
        if (!op->msg) {
            free(op);
            continue;
        }
        p->ping_inflight = true;
        p->next_ping_ns = now + e->ping_interval_ns;
        add_live_pending(e, op);
    }
}

static void recv_done(aiote_engine *e, struct recv_slot *s, size_t len)
{
    struct msg_view v;
    uint32_t flags = 0;
    if (len >= 16)
        memcpy(&flags, s->buf + 12, sizeof flags);
    if (len <= e->slot_size && parse_msg(s->buf, len, &v) == 0 && (flags & MSG_FLAG_PING)) {
        /* a peer's liveness probe: receiving it was the answer (or our own warm-up) */
        if (v.src_len == e->self_blob_len && memcmp(s->buf + v.src_off, e->self_blob, v.src_len) == 0)
            e->stats.warm_msgs++;
    } else if (len <= e->slot_size && parse_msg(s->buf, len, &v) == 0 && (flags & MSG_FLAG_CARRY)) {
        carry_apply(e, s->buf, &v);
    } else if (len <= e->slot_size && parse_msg(s->buf, len, &v) == 0 && (flags & MSG_FLAG_CACK)) {
        carry_ack(e, s->buf, &v);
    } else if (len <= e->slot_size && parse_msg(s->buf, len, &v) == 0 && (flags & MSG_FLAG_CHELLO)) {
        carry_hello(e, s->buf, &v);
    } else if (len <= e->slot_size && parse_msg(s->buf, len, &v) == 0 && (flags & MSG_FLAG_IMMS)) {
        /* imms of a peer's direct writes: their bytes are in place already */
        uint32_t m[4];
        uint64_t cnt = 0;
        if (v.payload_len == sizeof m) {
            memcpy(m, s->buf + v.payload_off, sizeof m);
            memcpy(&cnt, &m[2], sizeof cnt);
        }
        if (v.payload_len == sizeof m && m[0] == IMMS_MAGIC && cnt > 0 &&
            imm_table_restore(&e->imms, m[1], cnt, &e->pending_events) == 0) {
            e->stats.imms_received += cnt;
            e->nics[0].stats.imms_received += cnt;
        } else {
            e->stats.bad_msgs++;
        }
    } else if (len <= e->slot_size && parse_msg(s->buf, len, &v) == 0) {
        uint8_t *copy = malloc(len);
        if (copy) {
            memcpy(copy, s->buf, len);
            aiote_event ev = {
                .kind = AIOTE_EV_RECV,
                .data = copy,
                .len = v.payload_len,
                .src_off = v.src_off,
                .src_len = v.src_len,
                .payload_off = v.payload_off,
                .index = flags & AIOTE_MSG_CTRL,
                .nic = -1,
            };
            event_buf_push(&e->pending_events, &ev);
            e->stats.msgs_received++;
        }
    } else {
        e->stats.bad_msgs++; /* malformed message from the wire: dropped */
    }
    while (fabric_post_recv(e, s) == -FI_EAGAIN)
        fi_cq_read(e->nics[0].cq, NULL, 0);
}

/* errors that mean the connection to the peer is gone */
static bool peer_errno(int err)
{
    return err == FI_ECONNRESET || err == FI_ENOTCONN || err == FI_ECONNREFUSED || err == FI_ECONNABORTED ||
           err == EPIPE || err == FI_EHOSTUNREACH || err == FI_ENETUNREACH || err == FI_ECANCELED;
}

static size_t poll_cq(aiote_engine *e, struct nic *n)
{
    struct fi_cq_data_entry ents[CQ_BATCH];
    uint32_t imms[CQ_BATCH];
    size_t nimm = 0;
    ssize_t got = fi_cq_read(n->cq, ents, CQ_BATCH);
    if (got > 0) {
        for (ssize_t i = 0; i < got; i++) {
            struct fi_cq_data_entry *en = &ents[i];
            if (en->flags & FI_REMOTE_CQ_DATA) {
                imms[nimm++] = (uint32_t)en->data;
                continue;
            }
            struct ctx_hdr *h = en->op_context;
            if (!h)
                continue;
            if (h->kind == CTX_RECV)
                recv_done(e, (struct recv_slot *)h, en->len);
            else if (((struct tx_ctx *)h)->op) /* failed NICs' contexts were settled already */
                tx_done(e, (struct tx_ctx *)h);
        }
        if (nimm) {
            e->stats.imms_received += nimm;
            n->stats.imms_received += nimm;
            imm_table_arrive(&e->imms, imms, nimm, &e->pending_events);
        }
        return (size_t)got;
    }
    if (got == -FI_EAVAIL) {
        struct fi_cq_err_entry err;
        memset(&err, 0, sizeof err);
        if (fi_cq_readerr(n->cq, &err, 0) != 1)
            return 0;
        struct ctx_hdr *h = err.op_context;
        if (!h) {
            e->stats.remote_errors++; /* an incoming write failed; nobody waits on it */
        } else if (h->kind == CTX_RECV) {
            /* truncated or otherwise bad message: drop it, keep the slot */
            e->stats.bad_msgs++;
            if (err.err != FI_ECANCELED)
                while (fabric_post_recv(e, (struct recv_slot *)h) == -FI_EAGAIN)
                    fi_cq_read(e->nics[0].cq, NULL, 0);
        } else if (((struct tx_ctx *)h)->op) {
            struct tx_ctx *c = (struct tx_ctx *)h;
            fail_op(c->op, -AIOTE_E_PROVIDER, err.err, err.prov_errno, c->index, n->index);
            n->stats.errors++;
            if (!c->op->posted_all) /* post nothing more of a failed op */
                c->op->n = c->op->next_post;
            if (c->carry)
                carry_send_failed(e, c);
            if (peer_errno(err.err))
                carry_fail_peer(e, c->peer, err.err); /* its connection broke: no acknowledgement comes */
            tx_done(e, c);
        }
        return 1;
    }
    return 0;
}

/* A fired reaction's transfer: a fresh op from the prepared template. */
struct op *op_clone(const struct op *t, uint64_t id)
{
    struct op *op = malloc(sizeof *op);
    if (!op)
        return NULL;
    *op = *t;
    op->wrs = NULL;
    op->src_pages = op->dst_pages = NULL;
    op->msg = NULL;
    size_t n = t->n_submitted;
    if (t->kind == OP_WRITES) {
        op->wrs = malloc(n * sizeof *op->wrs);
        if (!op->wrs)
            goto fail;
        memcpy(op->wrs, t->wrs, n * sizeof *op->wrs);
    } else {
        op->src_pages = malloc(n * sizeof(int64_t));
        op->dst_pages = malloc(n * sizeof(int64_t));
        if (!op->src_pages || !op->dst_pages)
            goto fail;
        memcpy(op->src_pages, t->src_pages, n * sizeof(int64_t));
        memcpy(op->dst_pages, t->dst_pages, n * sizeof(int64_t));
    }
    op->next = op->live_prev = op->live_next = NULL;
    op->id = id;
    op->cancelled = op->posted_all = false;
    op->eagain_since = 0;
    op->n = n;
    op->next_post = 0;
    op->next_shard = 0;
    op->inflight = 0;
    op->status = op->fi_errno = op->prov_errno = 0;
    op->nic = -1;
    op->bad_index = 0;
    return op;
fail:
    op_free(op);
    return NULL;
}

/* Fire every armed reaction whose watched word has reached its threshold. */
bool poll_watches(aiote_engine *e)
{
    if (!atomic_load_explicit(&e->narmed, memory_order_relaxed))
        return false;
    bool fired = false;
    pthread_mutex_lock(&e->watch_lock);
    for (size_t i = 0; i < e->nwatches; i++) {
        struct watch *w = &e->watches[i];
        if (!w->head)
            continue;
        uint64_t v = __atomic_load_n(w->word, __ATOMIC_ACQUIRE);
        while (w->head && w->head->threshold <= v) {
            struct reaction *r = w->head;
            w->head = r->next;
            atomic_fetch_sub(&e->narmed, 1);
            fired = true;
            if (!r->prep) {
                aiote_event ev = {.id = r->id, .kind = AIOTE_EV_WATCH, .index = v, .nic = -1, .time_ns = now_ns()};
                event_buf_push(&e->pending_events, &ev);
                free(r);
                continue;
            }
            struct prepared *p = &e->preps[r->prep - 1];
            p->armed--;
            struct op *op = op_clone(p->tmpl, r->id);
            if (!op) {
                aiote_event ev = {.id = r->id, .kind = AIOTE_EV_OP, .status = -AIOTE_E_NOMEM, .nic = -1};
                event_buf_push(&e->pending_events, &ev);
                free(r);
                continue;
            }
            pthread_mutex_lock(&e->mr_lock);
            e->mrs[op->mr_index].refs++;
            pthread_mutex_unlock(&e->mr_lock);
            atomic_fetch_add(&e->outstanding, op->n_submitted);
            e->stats.ops_submitted++;
            add_live_pending(e, op);
            free(r);
        }
    }
    pthread_mutex_unlock(&e->watch_lock);
    return fired;
}

/* Move submissions and cancellations to the worker's own lists.  Control
 * ops run here; a caller that must not run them (the event loop's thread,
 * aiote_progress) passes allow_ctrl false and leaves the whole queue to the
 * worker while one waits (their enqueue woke it). */
static bool take_submissions(aiote_engine *e, bool allow_ctrl)
{
    if (!atomic_load_explicit(&e->sub_pending, memory_order_acquire))
        return false; /* nothing new: skip the lock */
    pthread_mutex_lock(&e->sub_lock);
    if (!allow_ctrl && e->nctrl) {
        pthread_mutex_unlock(&e->sub_lock);
        return false;
    }
    e->nctrl = 0;
    atomic_store_explicit(&e->sub_pending, false, memory_order_relaxed);
    struct op *head = e->sub_head;
    e->sub_head = e->sub_tail = NULL;
    size_t ncancel = e->ncancel;
    uint64_t cancels[64];
    if (ncancel > 64)
        ncancel = 64;
    if (ncancel)
        memcpy(cancels, e->cancel_ids + (e->ncancel - ncancel), ncancel * sizeof *cancels);
    e->ncancel -= ncancel;
    if (e->ncancel)
        atomic_store_explicit(&e->sub_pending, true, memory_order_relaxed); /* more next round */
    pthread_mutex_unlock(&e->sub_lock);

    bool did = head || ncancel;
    while (head) {
        struct op *op = head;
        head = op->next;
        op->next = NULL;
        if (op->kind == OP_CTRL) {
            aiote_set_error("%s", "");
            op->ctrl_rc = op->fn(e, op->arg);
            snprintf(op->err, sizeof op->err, "%s", aiote_last_error());
            sem_post(&op->done);
            continue;
        }
        if (op->kind != OP_ARRIVE && !(op->kind == OP_IMMS && op->id == 0))
            e->stats.ops_submitted++;
        op->live_next = e->live;
        if (e->live)
            e->live->live_prev = op;
        e->live = op;
        if (op->cu_event) { /* posted once its copies are done (poll_gated) */
            if (e->gated_tail)
                e->gated_tail->next = op;
            else
                e->gated_head = op;
            e->gated_tail = op;
            continue;
        }
        if (e->pend_tail)
            e->pend_tail->next = op;
        else
            e->pend_head = op;
        e->pend_tail = op;
    }
    for (size_t i = 0; i < ncancel; i++) {
        for (struct op *op = e->pend_head; op; op = op->next)
            if (op->id == cancels[i])
                op->cancelled = true;
        for (struct op *op = e->gated_head; op; op = op->next)
            if (op->id == cancels[i] && op->kind != OP_ARRIVE)
                op->cancelled = true;
    }
    return did;
}

/* A gated op whose copies are done, through the direct same-host path
 * (direct.c) when it takes it: the imm of a CUDA IPC write goes straight into
 * the target's imm ring, a staged chunk is copied with process_vm_writev,
 * without libfabric's delivery-complete round trip.  true: the op is gone
 * (complete, or its outcome follows as an event from direct.c); false:
 * post it through libfabric. */
static bool gated_direct(aiote_engine *e, struct op *op)
{
    if (op->kind != OP_WRITES || op->local_device || direct_mode(e, op) != 1) /* larger: libfabric, as before */
        return false;
    int r = direct_run(e, op);
    if (r == AIOTE_DIRECT_FALLBACK)
        return false;
    /* direct.c counts the op in its own statistics (direct_ops_ok/failed, or
     * the imm message it queued under this op's id): not ours twice */
    e->stats.ops_submitted--;
    release_mr(e, op);
    if (r == AIOTE_DIRECT_DONE) { /* complete: report it (else direct.c does) */
        aiote_event ev = {.id = op->id, .kind = AIOTE_EV_OP, .nic = -1};
        event_buf_push(&e->pending_events, &ev);
    }
    atomic_fetch_sub(&e->outstanding, op->n_submitted ? op->n_submitted : 1);
    live_remove(e, op);
    op_free(op);
    return true;
}

/* Ops whose CUDA copies are done go on: their writes are queued for
 * posting (a cancelled one fails there, unposted), a local arrival counts
 * its imm; a failed copy fails its op. */
static bool poll_gated(aiote_engine *e)
{
    bool did = false;
    struct op *prev = NULL, *op = e->gated_head;
    while (op) {
        struct op *next = op->next;
        int rc = cu_poll(op->cu_ctx, op->cu_event);
        if (rc == 1) {
            prev = op;
            op = next;
            continue;
        }
        did = true;
        if (prev)
            prev->next = next;
        else
            e->gated_head = next;
        if (e->gated_tail == op)
            e->gated_tail = prev;
        op->next = NULL;
        cu_release(op->cu_ctx, op->cu_event, false);
        op->cu_event = NULL;
        if (op->kind == OP_ARRIVE) {
            if (rc == 0 && op->arrive_count)
                imm_table_restore(&e->imms, op->imm, op->arrive_count, &e->pending_events);
            live_remove(e, op);
            op_free(op);
        } else if (rc || op->n == 0) {
            if (rc) {
                fail_op(op, -AIOTE_E_CUDA, 0, rc, 0, -1);
                op->n = 0;
            }
            op->posted_all = true;
            finish_op(e, op);
        } else if (!op->cancelled && gated_direct(e, op)) {
            ; /* done through the direct same-host path (an IPC write's imm, a staged chunk) */
        } else if (e->pend_tail) {
            e->pend_tail->next = op;
            e->pend_tail = op;
        } else {
            e->pend_head = e->pend_tail = op;
        }
        op = next;
    }
    return did;
}

static bool sub_nonempty(aiote_engine *e)
{
    pthread_mutex_lock(&e->sub_lock);
    bool r = e->sub_head != NULL || e->ncancel;
    pthread_mutex_unlock(&e->sub_lock);
    return r;
}

/* Sleep up to ns on the submission eventfd (new submissions, control ops, the loop
 * turning its spin off wake it); not if any of those is already there, or, with
 * while_loop_spins, if the event loop no longer spins.  Returns whether it slept. */
static bool nap_on_submissions(aiote_engine *e, uint64_t ns, bool while_loop_spins)
{
    atomic_store(&e->worker_sleeping, true); /* seq_cst: before the loads below (Dekker with aiote_loop_spin, enqueue) */
    if (atomic_load(&e->sub_pending) || atomic_load(&e->stopping) ||
        (while_loop_spins && !atomic_load(&e->events.spinning))) {
        atomic_store(&e->worker_sleeping, false);
        return false;
    }
    struct pollfd fd = {.fd = e->sub_efd, .events = POLLIN};
    struct timespec ts = {(time_t)(ns / 1000000000u), (long)(ns % 1000000000u)};
    int r = ppoll(&fd, 1, &ts, NULL);
    atomic_store(&e->worker_sleeping, false);
    if (r > 0 && (fd.revents & POLLIN)) {
        uint64_t v;
        ssize_t rr = read(e->sub_efd, &v, sizeof v);
        (void)rr;
    }
    return true;
}

/* Loop-spin mode on a provider whose progress the loop drives (not shm): the
 * worker rests on its submission eventfd (control ops, gated ops, the loop
 * turning the spin off) for up to a millisecond at a time. */
static void rest_while_loop_drives(aiote_engine *e)
{
    if (nap_on_submissions(e, 1000 * 1000, true))
        e->stats.wakeups++;
}

/* Nothing of ours in flight on any NIC: no transfer needs this worker's progress
 * calls (over tcp they are what feeds a write's bytes to the socket). */
static bool nics_idle(const aiote_engine *e)
{
    for (uint32_t i = 0; i < e->nnics; i++)
        if (e->nics[i].inflight)
            return false;
    return true;
}

/* Every pending op was refused for a while and is deferred (post_pending), and
 * nothing else of ours is in flight (nics_idle): sleep
 * until the first may be offered again, or a submission or control op comes.
 * Completions of other ops wait meanwhile (at most RETRY_NAP_MAX_NS). */
static void retry_nap(aiote_engine *e, uint64_t ns)
{
    if (nap_on_submissions(e, ns, false))
        e->stats.retry_naps++;
}

/* The CQs' fds as pollfds and their fids for fi_trywait; returns how many, or -1 if
 * some CQ has no fd (then the worker naps instead of sleeping on them). */
static int cq_wait_set(const aiote_engine *e, struct pollfd *fds, struct fid **cqs)
{
    int n = 0;
    for (uint32_t i = 0; i < e->nnics; i++) {
        if (e->nics[i].cq_fd < 0)
            return -1;
        fds[n] = (struct pollfd){.fd = e->nics[i].cq_fd, .events = POLLIN};
        cqs[n++] = &e->nics[i].cq->fid;
    }
    return n;
}

/* Bytes (or completions) wait behind the CQs' fds right now.  fi_trywait first: it
 * clears the fds' own signals (set by completions already taken, which would otherwise
 * keep the fds readable until the worker next sleeps), then one poll(2) with no timeout
 * tells whether a provider socket has bytes.  False when some CQ has no fd.  Call with
 * the progress lock held. */
static bool cq_fds_ready(const aiote_engine *e)
{
    struct pollfd fds[AIOTE_MAX_NICS];
    struct fid *cqs[AIOTE_MAX_NICS];
    int n = cq_wait_set(e, fds, cqs);
    if (n <= 0)
        return false;
    if (fi_trywait(e->nics[0].fabric, cqs, n) != FI_SUCCESS)
        return true; /* completions are there */
    return poll(fds, (nfds_t)n, 0) > 0;
}

/* A wake-up (or work) that came gap ns after the worker went idle: a window of twice
 * that would have caught it.  Stretch the spin window so, never past cap. */
static void stretch_window(aiote_engine *e, uint64_t *spin_win, uint64_t gap, uint64_t cap)
{
    if (gap < cap && 2 * gap > *spin_win) {
        *spin_win = 2 * gap < cap ? 2 * gap : cap;
        e->stats.spin_window_ns = *spin_win;
    }
}

enum { SLEPT, WOKEN, TRAFFIC };

/* Returns WOKEN if the submission eventfd ended the sleep; TRAFFIC if a CQ's fd did
 * (bytes moved on a provider socket, or completions came) or fi_trywait refused the
 * sleep because they are there; SLEPT for a timeout or no sleep at all. */
static int idle_sleep(aiote_engine *e, uint64_t *backoff_ns, bool warm)
{
    atomic_store(&e->worker_sleeping, true);
    if (!direct_sleep_begin(e) || sub_nonempty(e) || atomic_load(&e->stopping) || e->pending_events.n) {
        direct_sleep_end(e);
        atomic_store(&e->worker_sleeping, false);
        return SLEPT;
    }
    struct pollfd fds[1 + AIOTE_MAX_NICS];
    struct fid *cqs[AIOTE_MAX_NICS];
    fds[0] = (struct pollfd){.fd = e->sub_efd, .events = POLLIN};
    int ncq = cq_wait_set(e, fds + 1, cqs);
    bool all_fd = ncq >= 0;
    int nfds = all_fd ? 1 + ncq : 1;
    struct timespec ts = {0};
    bool watching = atomic_load_explicit(&e->narmed, memory_order_relaxed) != 0;
    /* While reactions are armed, a 5 us nap must last 5 us, not the default
     * 50 us timer slack; otherwise keep the slack: precise short naps wake the
     * worker far more often, which on a small machine takes CPU from the
     * application (the KV demo ran 2.4x slower with 1 us slack always on). */
    if (watching != e->fine_slack) {
        prctl(PR_SET_TIMERSLACK, watching ? 1000UL : 0UL, 0, 0, 0); /* 0: the thread's default */
        e->fine_slack = watching;
    }
    /* fi_trywait under the progress lock (the domain is FI_THREAD_DOMAIN, and a loop
     * driving progress may be in fi_cq_read); while the loop holds it, nap instead */
    if (all_fd && ncq && !watching && pthread_mutex_trylock(&e->progress_lock) == 0) {
        int tw = fi_trywait(e->nics[0].fabric, cqs, ncq);
        pthread_mutex_unlock(&e->progress_lock);
        if (tw != FI_SUCCESS) {
            direct_sleep_end(e);
            atomic_store(&e->worker_sleeping, false);
            return TRAFFIC; /* completions are ready: don't sleep */
        }
        /* manual-progress providers need to be driven now and then */
        ts.tv_nsec = 10 * 1000 * 1000;
    } else {
        /* No wait object (or the loop is in a pass): nap, doubling up to 200 us
         * while idle, or up to 20 us while writes are in flight, imm waits are
         * armed or traffic was seen in the last 50 ms (a peer's shm write may
         * need us to progress before it can complete). */
        nfds = 1;
        /* a watched word is read once per nap: keep them short while armed */
        /* While the loop spins it polls the imm rings itself, and only libfabric traffic
         * (messages, writes that did not take the direct path) needs this worker: nap 2 ms
         * once none was seen for 50 ms, else 200 us.  Each wake-up of ours preempts a
         * spinning loop on a small machine: at 200 us it made the latency mode's p99
         * (issue 2: 28-34 us at 200 us, 23-29 us at 2 ms, quiet dev VM). */
        bool fab_quiet = now_ns() - e->fab_seen_ns > WARM_NS;
        uint64_t cap = watching ? 5000
                       : (atomic_load(&e->events.spinning) && !e->live) ? (fab_quiet ? 2000000 : 200000)
                       : (warm || e->live || e->imms.nwaiters) ? 20000 : 200000;
        *backoff_ns = *backoff_ns ? *backoff_ns * 2 : 5000;
        if (*backoff_ns > cap)
            *backoff_ns = cap;
        ts.tv_nsec = (long)*backoff_ns;
    }
    int r = ppoll(fds, (nfds_t)nfds, &ts, NULL);
    direct_sleep_end(e);
    atomic_store(&e->worker_sleeping, false);
    e->stats.wakeups++;
    if (r > 0 && (fds[0].revents & POLLIN)) {
        uint64_t v;
        ssize_t rr = read(e->sub_efd, &v, sizeof v);
        (void)rr;
    }
    for (int i = 1; r > 0 && i < nfds; i++)
        if (fds[i].revents)
            return TRAFFIC;
    return r > 0 ? WOKEN : SLEPT;
}

/* The part of a worker iteration after submissions, watches and CUDA gates:
 * direct-path imms, posting, completions, liveness; then the events go out.
 * Under progress_lock.  from_loop: the event loop's thread (aiote_progress):
 * no liveness checks (they may close endpoints; the worker does them), and
 * on shm nothing of libfabric at all, only the imm rings: a shm peer that
 * dies inside the provider's critical section can leave a lock held that
 * any later call spins on forever, and only the worker can be given up on
 * (the watchdog), never the event loop. */
static bool progress_pass(aiote_engine *e, bool from_loop)
{
    bool active = direct_poll_imms(e);
    if (!(from_loop && e->is_shm)) {
        if (e->is_shm)
            local_read_lock();
        active |= post_pending(e);
        if (e->hello_wanted)
            carry_send_hellos(e); /* queued now, posted next pass */
        bool fab = false;
        for (uint32_t k = 0; k < e->nnics; k++) {
            struct nic *n = &e->nics[k];
            for (int i = 0; i < 4; i++) {
                if (!poll_cq(e, n))
                    break;
                fab = true;
            }
        }
        if (fab) {
            active = true;
            if (!from_loop)
                e->fab_seen_ns = now_ns(); /* libfabric traffic: keep the naps short (idle_sleep) */
        }
        if (!from_loop)
            check_peers(e, now_ns());
        if (e->is_shm)
            local_read_unlock();
    }
    if (e->pending_events.n)
        event_queue_flush(&e->events, &e->pending_events);
    return active;
}

int aiote_progress(aiote_engine *e)
{
    if (!atomic_load_explicit(&e->stopping, memory_order_relaxed) && pthread_mutex_trylock(&e->progress_lock) == 0) {
        if (!atomic_load(&e->stopping)) {
            bool found = !e->is_shm && take_submissions(e, false);
            found |= progress_pass(e, true);
            atomic_fetch_add_explicit(&e->progress_seq, 1, memory_order_relaxed);
            e->stats.loop_passes++;
            e->stats.loop_found += found;
        }
        pthread_mutex_unlock(&e->progress_lock);
    }
    return atomic_load(&e->events.avail) ? 1 : 0;
}

/* Loop-spin mode, not shm, on the spinning loop's thread right after it
 * queued work (engine.c, enqueue): post it now rather than on the loop's
 * next pass, a few microseconds of Python later.  Try-lock: if the worker is
 * in a pass, that pass or the loop's next one posts it. */
void loop_post_now(aiote_engine *e)
{
    if (pthread_mutex_trylock(&e->progress_lock) != 0)
        return;
    if (!atomic_load(&e->stopping)) {
        take_submissions(e, false);
        post_pending(e);
        if (e->pending_events.n)
            event_queue_flush(&e->events, &e->pending_events);
    }
    pthread_mutex_unlock(&e->progress_lock);
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Spin on the engines' events.  After the first SPIN_PURE_NS without any,
 * yield the CPU between rounds: on an oversubscribed machine a pure spinner
 * holds its core until the scheduler takes it away, and then waits a whole
 * time slice for it back; a yielding one lets the other runnable threads go
 * first and looks again as soon as they are done (cheap when nobody waits). */
#define SPIN_PURE_NS 20000ull
int aiote_spin(aiote_engine *const *engines, size_t n, uint64_t budget_ns)
{
    uint64_t start = budget_ns ? now_ns() : 0, end = start + budget_ns;
    for (;;) {
        int ready = 0;
        for (size_t i = 0; i < n; i++)
            ready += aiote_progress(engines[i]);
        if (ready || !budget_ns)
            return ready;
        uint64_t now = now_ns();
        if (now >= end)
            return 0;
        if (now - start > SPIN_PURE_NS)
            sched_yield();
        else
            cpu_relax();
    }
}

int aiote_events_pending(aiote_engine *e) { return atomic_load(&e->events.avail) ? 1 : 0; }

int aiote_loop_spin(aiote_engine *e, int on)
{
    if (on) {
        e->driver = pthread_self();
        atomic_store(&e->has_driver, true);
        atomic_store(&e->events.spinning, true);
    } else {
        atomic_store(&e->events.spinning, false); /* seq_cst: before the loads below */
        if (atomic_load(&e->worker_sleeping)) {   /* it rests or naps on our behalf: it is its turn */
            uint64_t one = 1;
            ssize_t r = write(e->sub_efd, &one, sizeof one);
            (void)r;
        }
    }
    return atomic_load(&e->events.avail) ? 1 : 0;
}

/* On shutdown: every op the worker owns fails with AIOTE_E_CLOSED.  Ops
 * stay allocated until the endpoints are closed (a NIC may still hold their
 * contexts); engine_shutdown frees them. */
static void fail_all_closed(aiote_engine *e)
{
    for (struct op *op = e->live; op; op = op->live_next) {
        if (op->kind == OP_PING || op->kind == OP_ARRIVE || op->kind == OP_NOTE)
            continue;
        fail_op(op, -AIOTE_E_CLOSED, FI_ECANCELED, 0, op->next_post, -1);
        aiote_event ev = {.id = op->id, .kind = AIOTE_EV_OP, .status = op->status,
                          .fi_errno = op->fi_errno, .prov_errno = op->prov_errno,
                          .index = op->bad_index, .nic = op->nic};
        event_buf_push(&e->pending_events, &ev);
    }
    event_queue_flush(&e->events, &e->pending_events);
}

/* tcp;ofi_rxm grows its bounce-buffer pools on an endpoint's first send (~12 ms
 * of page faults here for 16 KiB buffers) and first segmented (SAR) message (~10
 * ms more at the receiver): paid by whichever exchange comes first — a target's
 * first acknowledgement, the first carried batch over 16 KiB — unless the worker
 * pays it now, before any work, with two dropped messages to itself (one small,
 * one segmented).  Self-sends go through a loopback connection of the endpoint's
 * own (closed with it). */
static void warm_pools(aiote_engine *e)
{
    const char *prov = e->nics[0].fi->fabric_attr->prov_name;
    if (e->is_shm || strncmp(prov, "tcp", 3) != 0 || !strstr(prov, "ofi_rxm"))
        return;
    struct peer_arg pa = {.addrs = e->self_blob, .len = e->self_blob_len};
    if (ctrl_peer_insert(e, &pa))
        return;
    /* over rxm's 16 KiB eager limit (SAR), within what a message may carry */
    size_t big = e->cfg.msg_size < 40 * 1024 ? (size_t)e->cfg.msg_size : 40 * 1024;
    size_t sizes[2] = {8, big};
    for (int i = 0; i < 2; i++) {
        void *m = calloc(1, sizes[i]);
        if (m)
            queue_internal_send(e, pa.peer, m, sizes[i], MSG_FLAG_PING);
    }
}

void *worker_main(void *arg)
{
    aiote_engine *e = arg;
    int old;
    pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, &old);
    pthread_setcanceltype(PTHREAD_CANCEL_ASYNCHRONOUS, &old);

    uint64_t idle_since = 0, backoff = 0;
    uint64_t spin_ns = (uint64_t)e->cfg.spin_us * 1000;
    /* adaptive: the spin window adapts between SPIN_MIN_NS and spin_ns (see spin_adapt) */
    uint64_t spin_win = spin_ns;
    bool spun_out = false; /* this idle period's spin ended without work: the worker sleeps */
    bool woken = false;     /* an fd ended its last sleep (not a nap's timeout) */
    e->stats.spin_window_ns = spin_win;
    /* only on shm: there the direct path moves the bytes and the worker's spin only
     * serves imm counting; on tcp (and NICs) the worker drives every write's progress
     * and a shorter spin cost one-at-a-time 64 B writes over tcp ~30-60 us each
     * (peers driver, interleaved with the fixed spin) */
    bool adapt = e->is_shm;
    /* Not shm: the window never shrinks below spin_ns (one-at-a-time writes), but a
     * wake-up soon after the spin gave up stretches it to twice that idle gap, up to
     * SPIN_STRETCH x spin_ns: a stream whose gaps are a little longer than spin_us (1 MiB
     * writes over tcp: the target's worker slept ~3 times per write) then finds the
     * worker spinning.  The spin yields its CPU (below), so a longer one no longer takes
     * the core that the other threads need (it did when this was first tried, tcp8). */
    uint64_t win_hi = spin_ns * SPIN_STRETCH;
    /* Not shm: a large write streams over the provider's socket for milliseconds and
     * completes nothing until its last byte.  A sleep that a CQ's fd ended (bytes came, or
     * the socket took more) and that no completion follows is such a stream: the worker
     * spins (politely) until something completes, instead of sleeping and being woken
     * again each time it catches up with the other side (40-80 times per 16 MiB write
     * over tcp, each wake-up paid on the peer's CPU on loopback; docs/benchmarks.md,
     * "Large tcp writes and the sleeping worker").  Signs that bytes still flow push the
     * stream's end STREAM_SPIN_NS on, so the spin lasts as long as the write does (a 16 MiB
     * write over tcp outlasted a fixed 2 ms) and ends STREAM_SPIN_NS after the last bytes
     * (a peer's plain writes complete nothing here): a progress pass of STREAM_PASS_NS or
     * more (it copied bytes in), or bytes waiting behind the CQs' fds, looked at every
     * STREAM_LOOK_NS (cq_fds_ready; a look alone mostly finds the socket just drained).
     * A look on every turn without fi_trywait found the fds always readable and cost
     * the KV demo 0.6-1.2 s of system CPU per run.  Such a wake-up also stretches the
     * spin window like a completion does (below): the next write's first bytes, after
     * its initiator has seen this one complete, then find the worker spinning, not
     * asleep (one-at-a-time 16 MiB writes over tcp, p50 ~2.9 -> ~2.5 ms on 2 cores;
     * docs/benchmarks.md, "Streams that keep the target awake"). */
    uint64_t stream_until = 0, stream_look = 0;
    uint64_t stream_ns = spin_ns ? STREAM_SPIN_NS : 0;
    /* Not shm: the idle spin yields its CPU (below) only when the work just done may
     * have put another thread on it: this worker handed events to its event loop (which
     * then runs, woken by the eventfd or spinning) or posted to a peer (on one host, the
     * peer's worker is woken by the bytes).  A worker that only took in bytes and imms
     * (a target nobody on its side awaits) spins without yielding: its yields gave its
     * CPU to other threads while the next write's bytes waited in its socket
     * (one-at-a-time 1 MiB writes over tcp, p50 135 -> 108 us; docs/benchmarks.md,
     * "Yield only after a wake-up"). */
    uint64_t woke_mark = 0;
    bool yield_owed = true;
    direct_worker_begin(e);
    pthread_mutex_lock(&e->progress_lock);
    warm_pools(e);
    pthread_mutex_unlock(&e->progress_lock);
    for (;;) {
        pthread_mutex_lock(&e->progress_lock);
        bool active = take_submissions(e, true);
        if (atomic_load(&e->stopping)) {
            pthread_mutex_unlock(&e->progress_lock);
            break;
        }
        /* direct-path imms first and apart: taking them alone, while the event loop
         * spins (it polls the rings itself), keeps the naps long (below) */
        bool ring = direct_poll_imms(e);
        active |= poll_watches(e);
        if (e->gated_head)
            active |= poll_gated(e);
        uint64_t pass_t0 = stream_until ? now_ns() : 0;
        active |= progress_pass(e, false);
        uint64_t pass_ns = stream_until ? now_ns() - pass_t0 : 0;
        bool waiting = e->pend_head || e->gated_head;
        bool own_work = waiting || atomic_load_explicit(&e->narmed, memory_order_relaxed) || e->big_inflight;
        pthread_mutex_unlock(&e->progress_lock);
        if (active || ring) {
            if (idle_since && !spun_out && spin_win < spin_ns) {
                spin_win = spin_win * 2 < spin_ns ? spin_win * 2 : spin_ns; /* the spin caught it */
                e->stats.spin_window_ns = spin_win;
            } else if (!adapt && spun_out && woken && spin_ns) {
                /* not shm: woken soon after the spin gave up: stretch the window */
                stretch_window(e, &spin_win, now_ns() - idle_since, win_hi);
            } else if (spun_out && woken && spin_ns) {
                /* woken soon after it gave up: a window of twice this idle gap would have
                 * caught it (one-at-a-time writes over tcp, a stream of small batches; naps
                 * that find lazy imm entries are no evidence: nobody waited for them) */
                stretch_window(e, &spin_win, now_ns() - idle_since, spin_ns);
            }
            idle_since = 0;
            spun_out = false;
            woken = false;
            stream_until = 0; /* something completed: the stream (if any) is over */
            /* short naps again only for work the loop does not do; otherwise each early
             * wake-up preempts a spinning thread on a small machine (issue 2's p99) */
            if (active || !atomic_load_explicit(&e->events.spinning, memory_order_relaxed))
                backoff = 0;
            continue;
        }
        bool loop_spins = atomic_load_explicit(&e->events.spinning, memory_order_relaxed);
        if (loop_spins && !e->is_shm && !own_work) {
            /* the event loop drives progress: rest, unless it stopped (busy elsewhere) */
            uint64_t seq = atomic_load_explicit(&e->progress_seq, memory_order_relaxed);
            if (seq != e->seen_seq) {
                e->seen_seq = seq;
                rest_while_loop_drives(e);
                continue;
            }
        }
        if (waiting) { /* work waits on a queue or copies: keep driving progress */
            if (e->retry_wait_ns >= RETRY_NAP_MIN_NS && !e->gated_head && nics_idle(e))
                retry_nap(e, e->retry_wait_ns < RETRY_NAP_MAX_NS ? e->retry_wait_ns : RETRY_NAP_MAX_NS);
            else
                sched_yield();
            continue;
        }
        if (direct_inline_pending(e) && !loop_spins) {
            /* inline writes wait for their targets' acks (a slow or stopped target): nap */
            struct timespec ts = {0, 20000};
            nanosleep(&ts, NULL);
            continue;
        }
        if (e->cfg.polling == AIOTE_POLL_BUSY)
            continue;
        uint64_t now = now_ns();
        if (!idle_since) {
            idle_since = now;
            uint64_t m = atomic_load_explicit(&e->events.flushes, memory_order_relaxed) + e->stats.writes_posted +
                         e->stats.msgs_sent;
            yield_owed = m != woke_mark;
            woke_mark = m;
        }
        if (stream_until && pass_ns >= STREAM_PASS_NS) {
            stream_until = now + stream_ns; /* that pass took in bytes: the stream flows */
        } else if (stream_until && now >= stream_look && pthread_mutex_trylock(&e->progress_lock) == 0) {
            /* under the lock: a loop that drives progress (aiote_progress) may be in
             * fi_cq_read, and the domain is FI_THREAD_DOMAIN; busy: look next turn */
            stream_look = now + STREAM_LOOK_NS;
            bool flows = cq_fds_ready(e);
            pthread_mutex_unlock(&e->progress_lock);
            if (flows)
                stream_until = now + stream_ns; /* bytes wait: the stream flows */
        }
        /* while the loop spins it sees direct-path imms itself: no spin here */
        if (e->cfg.polling == AIOTE_POLL_ADAPTIVE &&
            (now - idle_since < spin_win || now < stream_until) && !loop_spins) {
            /* Not shm: spin politely.  A thread woken by this worker's own work (the
             * event loop on its eventfd, a peer's worker on a loopback socket) is put
             * on this CPU (a sync wake-up, the waker "about to sleep"), and an idle CPU
             * beside does not pull it: it waited out the whole spin window here, 50-70
             * us per batch of 32 tcp writes, on the critical path (sched_switch trace,
             * docs/benchmarks.md).  With nobody else runnable the yield returns at once. */
            if (!e->is_shm && yield_owed) {
                sched_yield();
                e->stats.spin_yields++;
            }
            continue;
        }
        if (e->cfg.polling == AIOTE_POLL_ADAPTIVE && !spun_out && !loop_spins && adapt) {
            spun_out = true; /* a whole window for nothing: the next one is half as long */
            spin_win = spin_win / 2 > SPIN_MIN_NS ? spin_win / 2 : (spin_ns < SPIN_MIN_NS ? spin_ns : SPIN_MIN_NS);
            e->stats.spin_window_ns = spin_win;
        } else if (e->cfg.polling == AIOTE_POLL_ADAPTIVE && !spun_out && !loop_spins) {
            spun_out = true; /* not shm: half as long next time, never below spin_us */
            spin_win = spin_win / 2 > spin_ns ? spin_win / 2 : spin_ns;
            e->stats.spin_window_ns = spin_win;
        }
        int slept = idle_sleep(e, &backoff, now - idle_since < WARM_NS);
        woken = slept != SLEPT;
        if (slept == TRAFFIC && !adapt && stream_ns && e->cfg.polling == AIOTE_POLL_ADAPTIVE) {
            uint64_t t = now_ns();
            stream_until = t + stream_ns;
            e->stats.stream_spins++;
            stretch_window(e, &spin_win, t - idle_since, win_hi); /* it would have seen these bytes */
        }
    }
    /* ctrl ops that raced with stopping: refuse them */
    pthread_mutex_lock(&e->sub_lock);
    struct op *head = e->sub_head;
    e->sub_head = e->sub_tail = NULL;
    pthread_mutex_unlock(&e->sub_lock);
    while (head) {
        struct op *op = head;
        head = op->next;
        op->next = NULL;
        if (op->kind == OP_CTRL) {
            op->ctrl_rc = -AIOTE_E_CLOSED;
            snprintf(op->err, sizeof op->err, "engine is closed");
            sem_post(&op->done);
        } else {
            op->live_next = e->live;
            if (e->live)
                e->live->live_prev = op;
            e->live = op;
        }
    }
    pthread_mutex_lock(&e->progress_lock);
    direct_inline_close(e);
    carry_close(e);
    fail_all_closed(e);
    pthread_mutex_unlock(&e->progress_lock);
    direct_worker_end(e);
    return NULL;
}

/* See struct aiote_engine (watchdog).  Samples every 100 ms; half a second
 * inside one post to a peer whose process is gone means it never returns. */
void *watchdog_main(void *arg)
{
    aiote_engine *e = arg;
    unsigned last_peer = 0, stuck = 0;
    uint64_t last_seq = 0;
    pthread_mutex_lock(&e->wd_lock);
    while (!atomic_load(&e->stopping)) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 100 * 1000 * 1000;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&e->wd_cond, &e->wd_lock, &ts);
        if (atomic_load(&e->stopping))
            break;
        unsigned pp = atomic_load_explicit(&e->posting_peer, memory_order_relaxed);
        uint64_t seq = atomic_load_explicit(&e->post_seq, memory_order_relaxed);
        stuck = (pp && pp == last_peer && seq == last_seq) ? stuck + 1 : 0;
        last_peer = pp;
        last_seq = seq;
        if (stuck < 5)
            continue;
        pthread_mutex_lock(&e->peer_lock);
        struct peer *p = pp - 1 < e->npeers ? e->peers[pp - 1] : NULL;
        bool dead = p && peer_process_gone(p);
        pthread_mutex_unlock(&e->peer_lock);
        if (!dead)
            continue;
        atomic_store(&e->wedged, true);
        /* The worker holds the same-process shm read lock (local_peers.c)
         * and will never return to drop it: drop it for it, or every later
         * shm engine close in this process would wait forever.  (glibc's
         * rwlock keeps a reader count, not owners.) */
        local_read_unlock();
        pthread_cancel(e->worker); /* stop it spinning (it is in a watched post) */
        struct event_buf b = {0};
        aiote_event ev = {.id = pp - 1, .kind = AIOTE_EV_WEDGED, .status = -AIOTE_E_PROVIDER,
                          .fi_errno = FI_ECONNRESET, .nic = -1};
        event_buf_push(&b, &ev);
        event_queue_flush(&e->events, &b);
        free(b.ev);
        break;
    }
    pthread_mutex_unlock(&e->wd_lock);
    return NULL;
}
