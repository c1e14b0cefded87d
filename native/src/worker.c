/* The worker thread: the only thread that touches a live endpoint.
 *
 * Each iteration: take new submissions, post what the transmit queue takes
 * (work that gets -FI_EAGAIN stays queued, in order), read the CQ, count
 * imm arrivals, and hand finished operations to the event queue in one
 * flush.  When idle it spins (busy), spins briefly then sleeps (adaptive), or
 * sleeps at once (blocking) on the CQ's fd and the submission eventfd. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define CQ_BATCH 64

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
    free(op->wrs);
    free(op->src_pages);
    free(op->dst_pages);
    free(op->msg);
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
    release_mr(e, op);
    aiote_event ev = {
        .id = op->id,
        .kind = AIOTE_EV_OP,
        .status = op->status,
        .fi_errno = op->fi_errno,
        .prov_errno = op->prov_errno,
        .index = op->bad_index,
    };
    event_buf_push(&e->pending_events, &ev);
    if (op->status)
        e->stats.ops_failed++;
    else
        e->stats.ops_completed++;
    atomic_fetch_sub(&e->outstanding, op->kind == OP_SEND ? 1 : (op->n ? op->n : 1));
    live_remove(e, op);
    op_free(op);
}

static inline void elem(const struct op *op, size_t i, aiote_wr *w)
{
    if (op->kind == OP_WRITES) {
        *w = op->wrs[i];
        return;
    }
    w->peer = op->peer;
    w->len = op->page_len;
    w->src_off = op->src_off + (uint64_t)op->src_pages[i] * op->src_stride;
    w->dst_off = op->dst_off + (uint64_t)op->dst_pages[i] * op->dst_stride;
    w->remote_base = op->remote_base;
    w->remote_key = op->remote_key;
}

/* 0: posted (or nothing to post), 1: provider said -FI_EAGAIN, 2: no transmit
 * context free (wait for our completions), <0: -fi_errno */
static int post_write(aiote_engine *e, struct op *op, size_t i)
{
    aiote_wr w;
    elem(op, i, &w);
    if (w.len == 0 && !op->has_imm)
        return 0;
    if (e->peer_local[w.peer] && !atomic_load(&e->peer_local[w.peer]->open))
        return -FI_ENOTCONN; /* a same-process peer that closed */
    struct tx_ctx *c = e->tx_free;
    if (!c)
        return 2;
    struct iovec iov = {.iov_base = op->local_base + w.src_off, .iov_len = w.len};
    void *desc = op->local_desc;
    struct fi_rma_iov riov = {.addr = w.remote_base + w.dst_off, .len = w.len, .key = w.remote_key};
    struct fi_msg_rma msg = {
        .msg_iov = &iov,
        .desc = &desc,
        .iov_count = 1,
        .addr = e->peer_fi[w.peer],
        .rma_iov = &riov,
        .rma_iov_count = 1,
        .context = &c->h.fi,
        .data = op->imm,
    };
    uint64_t flags = FI_COMPLETION;
    if (op->has_imm)
        flags |= FI_REMOTE_CQ_DATA;
    /* shm never completes a 0-byte write asked for delivery-complete
     * (LIBFABRIC-NOTES.md); there is no payload to deliver anyway. */
    if (e->info.delivery_complete && !(e->is_shm && w.len == 0))
        flags |= FI_DELIVERY_COMPLETE;
    ssize_t rc = fi_writemsg(e->ep, &msg, flags);
    if (rc == -FI_EAGAIN)
        return 1;
    if (rc)
        return (int)rc;
    e->tx_free = c->next_free;
    c->op = op;
    c->send_slot = -1;
    c->index = i;
    op->inflight++;
    e->stats.writes_posted++;
    e->stats.bytes_written += w.len;
    return 0;
}

static int post_send(aiote_engine *e, struct op *op)
{
    struct tx_ctx *c = e->tx_free;
    if (!c || !e->nsend_free)
        return 2;
    if (e->peer_local[op->peer] && !atomic_load(&e->peer_local[op->peer]->open))
        return -FI_ENOTCONN;
    int slot = e->send_free[e->nsend_free - 1];
    uint8_t *buf = e->send_arena + (size_t)slot * e->slot_size;
    uint32_t hdr[4] = {MSG_MAGIC | (MSG_VERSION << 16), (uint32_t)e->addr_len, (uint32_t)op->msg_len, 0};
    memcpy(buf, hdr, sizeof hdr);
    memcpy(buf + sizeof hdr, e->addr, e->addr_len);
    memcpy(buf + sizeof hdr + e->addr_len, op->msg, op->msg_len);
    size_t total = sizeof hdr + e->addr_len + op->msg_len;
    ssize_t rc = fi_send(e->ep, buf, total, fi_mr_desc(e->send_mr), e->peer_fi[op->peer], &c->h.fi);
    if (rc == -FI_EAGAIN)
        return 1;
    if (rc)
        return (int)rc;
    e->nsend_free--;
    e->tx_free = c->next_free;
    c->op = op;
    c->send_slot = slot;
    c->index = 0;
    op->inflight++;
    e->stats.msgs_sent++;
    return 0;
}

static void fail_op(struct op *op, int32_t status, int fi_err, int prov_err, uint64_t index)
{
    if (op->status)
        return; /* keep the first error */
    op->status = status;
    op->fi_errno = fi_err;
    op->prov_errno = prov_err;
    op->bad_index = index;
}

#define MAX_BLOCKED_OPS 8 /* refused ops to try past before giving up this round */

/* Post queued work in submission order.  An op the provider refuses
 * (-FI_EAGAIN: queue full, or its peer still connecting) stays queued and
 * the next ops get their turn, so one unreachable peer can't stall the
 * others; an op refused without any progress for peer_timeout fails with
 * ETIMEDOUT (its peer is taken for unreachable). */
static bool post_pending(aiote_engine *e, uint64_t now)
{
    bool did = false;
    int blocked = 0;
    struct op *prev = NULL, *op = e->pend_head;
    while (op && blocked < MAX_BLOCKED_OPS) {
        struct op *next = op->next;
        if (op->cancelled && op->next_post < op->n) {
            fail_op(op, -AIOTE_E_CLOSED, FI_ECANCELED, 0, op->next_post);
            op->n = op->next_post;
        }
        bool refused = false;
        while (op->next_post < op->n) {
            int rc = op->kind == OP_SEND ? post_send(e, op) : post_write(e, op, op->next_post);
            if (rc == 2) { /* our own transmit contexts are all in flight: wait for completions */
                e->stats.eagain++;
                return did;
            }
            if (rc == 1) {
                e->stats.eagain++;
                if (!op->eagain_since)
                    op->eagain_since = now;
                else if (now - op->eagain_since > e->peer_timeout_ns) {
                    fail_op(op, -AIOTE_E_PROVIDER, FI_ETIMEDOUT, 0, op->next_post);
                    op->n = op->next_post;
                    break;
                }
                refused = true;
                break;
            }
            op->eagain_since = 0;
            if (rc < 0) {
                fail_op(op, -AIOTE_E_PROVIDER, -rc, 0, op->next_post);
                op->n = op->next_post; /* post nothing more of it */
                break;
            }
            op->next_post++;
            did = true;
        }
        if (refused) {
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
    return did;
}

static void tx_done(aiote_engine *e, struct tx_ctx *c)
{
    struct op *op = c->op;
    if (c->send_slot >= 0)
        e->send_free[e->nsend_free++] = c->send_slot;
    c->op = NULL;
    c->next_free = e->tx_free;
    e->tx_free = c;
    op->inflight--;
    if (op->posted_all && op->inflight == 0)
        finish_op(e, op);
}

static void recv_done(aiote_engine *e, struct recv_slot *s, size_t len)
{
    const uint8_t *b = s->buf;
    uint32_t hdr[4];
    bool ok = len >= sizeof hdr && len <= e->slot_size;
    if (ok) {
        memcpy(hdr, b, sizeof hdr);
        ok = (hdr[0] & 0xffff) == MSG_MAGIC && (hdr[0] >> 16) == MSG_VERSION &&
             hdr[1] <= AIOTE_ADDR_MAX && (uint64_t)hdr[1] + hdr[2] == len - sizeof hdr;
    }
    if (ok) {
        uint8_t *copy = malloc(len);
        if (copy) {
            memcpy(copy, b, len);
            aiote_event ev = {
                .kind = AIOTE_EV_RECV,
                .data = copy,
                .len = hdr[2],
                .src_off = sizeof hdr,
                .src_len = hdr[1],
                .payload_off = sizeof hdr + hdr[1],
            };
            event_buf_push(&e->pending_events, &ev);
            e->stats.msgs_received++;
        }
    } else {
        e->stats.bad_msgs++; /* malformed message from the wire: dropped */
    }
    int rc;
    while ((rc = fabric_post_recv(e, s)) == -FI_EAGAIN)
        fi_cq_read(e->cq, NULL, 0);
}

static size_t poll_cq(aiote_engine *e)
{
    struct fi_cq_data_entry ents[CQ_BATCH];
    uint32_t imms[CQ_BATCH];
    size_t nimm = 0;
    ssize_t n = fi_cq_read(e->cq, ents, CQ_BATCH);
    if (n > 0) {
        for (ssize_t i = 0; i < n; i++) {
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
            else
                tx_done(e, (struct tx_ctx *)h);
        }
        if (nimm) {
            e->stats.imms_received += nimm;
            imm_table_arrive(&e->imms, imms, nimm, &e->pending_events);
        }
        return (size_t)n;
    }
    if (n == -FI_EAVAIL) {
        struct fi_cq_err_entry err;
        memset(&err, 0, sizeof err);
        if (fi_cq_readerr(e->cq, &err, 0) != 1)
            return 0;
        struct ctx_hdr *h = err.op_context;
        if (!h) {
            e->stats.remote_errors++; /* an incoming write failed; nobody waits on it */
        } else if (h->kind == CTX_RECV) {
            /* truncated or otherwise bad message: drop it, keep the slot */
            e->stats.bad_msgs++;
            struct recv_slot *s = (struct recv_slot *)h;
            if (err.err != FI_ECANCELED)
                while (fabric_post_recv(e, s) == -FI_EAGAIN)
                    fi_cq_read(e->cq, NULL, 0);
        } else {
            struct tx_ctx *c = (struct tx_ctx *)h;
            fail_op(c->op, -AIOTE_E_PROVIDER, err.err, err.prov_errno, c->index);
            if (!c->op->posted_all) /* post nothing more of a failed op */
                c->op->n = c->op->next_post;
            tx_done(e, c);
        }
        return 1;
    }
    return 0;
}

/* Move submissions and cancellations to the worker's own lists. */
static bool take_submissions(aiote_engine *e)
{
    pthread_mutex_lock(&e->sub_lock);
    struct op *head = e->sub_head;
    e->sub_head = e->sub_tail = NULL;
    size_t ncancel = e->ncancel;
    uint64_t cancels[64];
    if (ncancel > 64)
        ncancel = 64;
    memcpy(cancels, e->cancel_ids + (e->ncancel - ncancel), ncancel * sizeof *cancels);
    e->ncancel -= ncancel;
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
        e->stats.ops_submitted++;
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
    for (size_t i = 0; i < ncancel; i++)
        for (struct op *op = e->pend_head; op; op = op->next)
            if (op->id == cancels[i])
                op->cancelled = true;
    return did;
}

static bool sub_nonempty(aiote_engine *e)
{
    pthread_mutex_lock(&e->sub_lock);
    bool r = e->sub_head != NULL || e->ncancel;
    pthread_mutex_unlock(&e->sub_lock);
    return r;
}

static void idle_sleep(aiote_engine *e, uint64_t *backoff_ns)
{
    atomic_store(&e->worker_sleeping, true);
    if (sub_nonempty(e) || atomic_load(&e->stopping) || e->pending_events.n) {
        atomic_store(&e->worker_sleeping, false);
        return;
    }
    struct pollfd fds[2] = {{.fd = e->sub_efd, .events = POLLIN}, {.fd = e->cq_fd, .events = POLLIN}};
    int nfds = 1;
    struct timespec ts;
    if (e->cq_fd >= 0) {
        struct fid *f = &e->cq->fid;
        if (fi_trywait(e->fabric, &f, 1) != FI_SUCCESS) {
            atomic_store(&e->worker_sleeping, false);
            return; /* completions are ready: don't sleep */
        }
        nfds = 2;
        /* manual-progress providers need to be driven now and then */
        ts.tv_sec = 0;
        ts.tv_nsec = 10 * 1000 * 1000;
    } else {
        /* No wait object: nap, doubling up to 200 us while idle. */
        *backoff_ns = *backoff_ns ? *backoff_ns * 2 : 5000;
        if (*backoff_ns > 200000)
            *backoff_ns = 200000;
        ts.tv_sec = 0;
        ts.tv_nsec = (long)*backoff_ns;
    }
    int r = ppoll(fds, (nfds_t)nfds, &ts, NULL);
    atomic_store(&e->worker_sleeping, false);
    e->stats.wakeups++;
    if (r > 0 && (fds[0].revents & POLLIN)) {
        uint64_t v;
        ssize_t rr = read(e->sub_efd, &v, sizeof v);
        (void)rr;
    }
}

/* On shutdown: every op the worker owns fails with AIOTE_E_CLOSED.  Ops
 * stay allocated until the endpoint is closed (the NIC may still hold
 * their contexts); engine_shutdown frees them. */
static void fail_all_closed(aiote_engine *e)
{
    for (struct op *op = e->live; op; op = op->live_next) {
        fail_op(op, -AIOTE_E_CLOSED, FI_ECANCELED, 0, op->next_post);
        aiote_event ev = {.id = op->id, .kind = AIOTE_EV_OP, .status = op->status,
                          .fi_errno = op->fi_errno, .prov_errno = op->prov_errno,
                          .index = op->bad_index};
        event_buf_push(&e->pending_events, &ev);
    }
    event_queue_flush(&e->events, &e->pending_events);
}

void *worker_main(void *arg)
{
    aiote_engine *e = arg;
    uint64_t last_active = now_ns(), backoff = 0;
    uint64_t spin_ns = (uint64_t)e->cfg.spin_us * 1000;
    for (;;) {
        bool active = take_submissions(e);
        if (atomic_load(&e->stopping))
            break;
        if (e->local)
            local_read_lock();
        active |= post_pending(e, now_ns());
        for (int i = 0; i < 4; i++) {
            size_t n = poll_cq(e);
            if (!n)
                break;
            active = true;
        }
        if (e->local)
            local_read_unlock();
        if (e->pending_events.n)
            event_queue_flush(&e->events, &e->pending_events);
        if (active) {
            last_active = now_ns();
            backoff = 0;
            continue;
        }
        if (e->pend_head) { /* work waits on the queue: keep driving progress */
            sched_yield();
            continue;
        }
        if (e->cfg.polling == AIOTE_POLL_BUSY)
            continue;
        if (e->cfg.polling == AIOTE_POLL_ADAPTIVE && now_ns() - last_active < spin_ns)
            continue;
        idle_sleep(e, &backoff);
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
    fail_all_closed(e);
    return NULL;
}
