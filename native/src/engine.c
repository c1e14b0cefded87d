/* The public C API: engine life cycle, registration, submission, counters.
 * Everything here runs on caller threads; libfabric objects of a running
 * engine are touched only by the worker (control ops are handed to it). */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define IMM_USER_MAX ((1u << AIOTE_IMM_BITS) - 1)
#define DEFAULT_MAX_QUEUED (1u << 20)

static __thread char last_error[512];

void aiote_set_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
}

const char *aiote_last_error(void) { return last_error; }
const char *aiote_fi_strerror(int fi_errno) { return fi_strerror(fi_errno); }
int aiote_abi_version(void) { return AIOTE_ABI_VERSION; }
void aiote_free(void *p) { free(p); }

static char *dup_or_null(const char *s) { return s ? strdup(s) : NULL; }

static void watches_close(aiote_engine *e);

static void engine_release(aiote_engine *e)
{
    free((char *)e->cfg.provider);
    free((char *)e->cfg.node);
    free((char *)e->cfg.domain);
    imm_table_destroy(&e->imms);
    event_queue_destroy(&e->events);
    if (e->sub_efd >= 0)
        close(e->sub_efd);
    free(e->pending_events.ev);
    free(e->mrs);
    carry_free(e);
    direct_async_free(e);
    assist_free(e);
    pthread_mutex_destroy(&e->dcp_lock);
    pthread_mutex_destroy(&e->ipend_lock);
    direct_peers_free(e);
    for (size_t i = 0; i < e->npeers; i++) {
        for (uint32_t j = 0; j < e->peers[i]->nnics; j++)
            local_unref(e->peers[i]->local[j]);
        free(e->peers[i]);
    }
    free(e->peers);
    for (size_t i = 0; i < e->nrdescs; i++)
        free(e->rdescs[i]);
    free(e->rdescs);
    for (uint32_t i = 0; i < AIOTE_MAX_NICS; i++)
        local_unref(e->nics[i].local);
    free(e->cancel_ids);
    pthread_mutex_destroy(&e->mr_lock);
    pthread_mutex_destroy(&e->peer_lock);
    pthread_mutex_destroy(&e->sub_lock);
    pthread_mutex_destroy(&e->watch_lock);
    pthread_mutex_destroy(&e->progress_lock);
    free(e->watches);
    free(e->preps);
    free(e);
}

int aiote_engine_open(const aiote_config *cfg, aiote_engine **out)
{
    *out = NULL;
    if (!cfg || cfg->polling < AIOTE_POLL_BUSY || cfg->polling > AIOTE_POLL_BLOCKING) {
        aiote_set_error("invalid engine configuration");
        return -AIOTE_E_INVAL;
    }
    aiote_engine *e = calloc(1, sizeof *e);
    if (!e)
        return -AIOTE_E_NOMEM;
    e->cfg = *cfg;
    e->cfg.provider = dup_or_null(cfg->provider);
    e->cfg.node = dup_or_null(cfg->node);
    e->cfg.domain = dup_or_null(cfg->domain);
    if (!e->cfg.msg_size)
        e->cfg.msg_size = 64 * 1024;
    if (!e->cfg.recv_slots)
        e->cfg.recv_slots = 64;
    if (!e->cfg.send_slots)
        e->cfg.send_slots = 64;
    if (!e->cfg.max_queued)
        e->cfg.max_queued = DEFAULT_MAX_QUEUED;
    if (!e->cfg.stripe_threshold)
        e->cfg.stripe_threshold = 256 * 1024;
    if (!e->cfg.stripe_min)
        e->cfg.stripe_min = 64 * 1024;
    if (e->cfg.routing != AIOTE_ROUTE_ROUND_ROBIN && e->cfg.routing != AIOTE_ROUTE_PINNED) {
        aiote_set_error("invalid routing %d", e->cfg.routing);
        free(e);
        return -AIOTE_E_INVAL;
    }
    e->peer_timeout_ns = (uint64_t)(e->cfg.peer_timeout_ms ? e->cfg.peer_timeout_ms : 10000) * 1000000ull;
    /* probes of watched peers: often enough to notice a death well within
     * peer_timeout, rarely enough to cost nothing */
    e->ping_interval_ns = e->peer_timeout_ns / 4;
    if (e->ping_interval_ns > 250000000ull)
        e->ping_interval_ns = 250000000ull;
    if (e->ping_interval_ns < 10000000ull)
        e->ping_interval_ns = 10000000ull;
    e->sub_efd = -1;
    pthread_mutex_init(&e->mr_lock, NULL);
    pthread_mutex_init(&e->peer_lock, NULL);
    pthread_mutex_init(&e->sub_lock, NULL);
    pthread_mutex_init(&e->watch_lock, NULL);
    pthread_mutex_init(&e->dcp_lock, NULL);
    pthread_mutex_init(&e->ipend_lock, NULL);
    pthread_mutex_init(&e->progress_lock, NULL);
    atomic_init(&e->outstanding, 0);
    atomic_init(&e->narmed, 0);
    int rc = imm_table_init(&e->imms);
    if (!rc)
        rc = event_queue_init(&e->events);
    if (!rc) {
        e->sub_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (e->sub_efd < 0)
            rc = -AIOTE_E_NOMEM;
    }
    if (!rc)
        rc = fabric_open(e);
    e->direct_max = e->cfg.direct_max ? e->cfg.direct_max : 4 * 1024 * 1024;
    e->inline_max = e->cfg.direct_inline < 0 ? 0 : e->cfg.direct_inline ? (uint64_t)e->cfg.direct_inline : 256;
    if (e->inline_max > 4096)
        e->inline_max = 4096; /* an entry must fit well inside the ring */
    const char *wake = getenv("AIOTE_DIRECT_INLINE_WAKE");
    e->inline_wake = wake && wake[0] == '1';
    if (!rc && e->is_shm && e->cfg.direct_shm && (e->info.mr_mode & FI_MR_VIRT_ADDR))
        rc = direct_table_open(e);
    if (!rc)
        rc = carry_open(e);
    if (!rc && pthread_create(&e->worker, NULL, worker_main, e) != 0) {
        aiote_set_error("cannot start the worker thread: %s", strerror(errno));
        rc = -AIOTE_E_NOMEM;
    } else if (!rc) {
        pthread_setname_np(e->worker, "aiote-worker"); /* top -H, perf, py-spy tell the threads apart */
    }
    if (!rc && e->is_shm) {
        pthread_mutex_init(&e->wd_lock, NULL);
        pthread_cond_init(&e->wd_cond, NULL);
        e->watchdog_started = pthread_create(&e->watchdog, NULL, watchdog_main, e) == 0;
        if (e->watchdog_started)
            pthread_setname_np(e->watchdog, "aiote-watchdog");
    }
    if (rc) {
        char saved[sizeof last_error];
        memcpy(saved, last_error, sizeof saved);
        fabric_close(e);
        engine_release(e);
        memcpy(last_error, saved, sizeof saved);
        return rc;
    }
    e->worker_started = true;
    *out = e;
    return 0;
}

int aiote_engine_shutdown(aiote_engine *e)
{
    pthread_mutex_lock(&e->sub_lock);
    bool already = atomic_exchange(&e->stopping, true);
    pthread_mutex_unlock(&e->sub_lock);
    if (already)
        return 0;
    uint64_t one = 1;
    ssize_t r = write(e->sub_efd, &one, sizeof one);
    (void)r;
    direct_async_stop(e); /* copy threads: the chunk in progress ends, the rest fails as closed */
    assist_stop(e);       /* after the copy threads, which share runs with them */
    if (e->watchdog_started) {
        pthread_mutex_lock(&e->wd_lock);
        pthread_cond_signal(&e->wd_cond);
        pthread_mutex_unlock(&e->wd_lock);
        pthread_join(e->watchdog, NULL);
        e->watchdog_started = false;
    }
    if (atomic_load(&e->wedged)) {
        /* the worker was stuck inside the provider for good and has been
         * cancelled there; the provider's state is beyond repair: leave the
         * endpoints and everything behind (aiote_engine_free keeps it too) */
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += 2;
        if (pthread_timedjoin_np(e->worker, NULL, &ts) != 0)
            pthread_detach(e->worker);
        e->worker_started = false;
        return 0;
    }
    if (e->worker_started)
        pthread_join(e->worker, NULL);
    e->worker_started = false;
    watches_close(e);
    if (e->is_shm && e->local_seq) {
        e->defer_teardown = !drain_local_inflight(e, 500 * 1000000ull);
        /* a live peer may still take a connection request of ours: our
         * regions must outlive it (conn_requests_pending, worker.c) */
        if (!e->defer_teardown && conn_requests_pending(e))
            e->defer_teardown = true;
    }
    fabric_close(e);
    /* the NIC can't touch them any more: free what the worker left */
    struct op *op = e->live;
    while (op) {
        struct op *nx = op->live_next;
        op_free(op);
        op = nx;
    }
    e->live = NULL;
    e->pend_head = e->pend_tail = NULL;
    e->gated_head = e->gated_tail = NULL;
    return 0;
}

void aiote_engine_free(aiote_engine *e)
{
    if (!e)
        return;
    aiote_engine_shutdown(e);
    if (atomic_load(&e->wedged))
        return; /* a worker stuck in the provider may still touch it: leaked on purpose */
    if (e->is_shm) {
        pthread_mutex_destroy(&e->wd_lock);
        pthread_cond_destroy(&e->wd_cond);
    }
    engine_release(e);
}

int aiote_engine_eventfd(aiote_engine *e) { return e->events.efd; }

int aiote_engine_info(aiote_engine *e, aiote_info *out)
{
    *out = e->info;
    return 0;
}

int aiote_engine_address(aiote_engine *e, uint32_t nic, uint8_t *buf, size_t *len)
{
    if (nic >= e->nnics) {
        aiote_set_error("no NIC %u (engine has %u)", nic, e->nnics);
        return -AIOTE_E_INVAL;
    }
    struct nic *n = &e->nics[nic];
    if (*len < n->addr_len) {
        *len = n->addr_len;
        aiote_set_error("address buffer too small");
        return -AIOTE_E_INVAL;
    }
    memcpy(buf, n->addr, n->addr_len);
    *len = n->addr_len;
    return 0;
}

int aiote_engine_stats(aiote_engine *e, aiote_stats *out)
{
    *out = e->stats;
    /* ops the direct path finished on callers' threads (its ops with imms that
     * went as messages are the worker's: counted there) */
    uint64_t ok = atomic_load(&e->direct_ops_ok), bad = atomic_load(&e->direct_ops_failed);
    out->ops_submitted += ok + bad;
    out->ops_completed += ok;
    out->ops_failed += bad;
    return 0;
}

int aiote_nic_stats(aiote_engine *e, uint32_t nic, aiote_nic_counters *out)
{
    if (nic >= e->nnics) {
        aiote_set_error("no NIC %u (engine has %u)", nic, e->nnics);
        return -AIOTE_E_INVAL;
    }
    *out = e->nics[nic].stats;
    return 0;
}

/* ---- submission ------------------------------------------------------- */

static void wake_worker(aiote_engine *e)
{
    if (atomic_load(&e->worker_sleeping)) {
        uint64_t one = 1;
        ssize_t r = write(e->sub_efd, &one, sizeof one);
        (void)r;
    }
}

/* Loop-spin mode, called on the spinning loop's own thread, not shm: the
 * loop's next aiote_progress posts it (before that thread sleeps, it turns
 * the spin off, which wakes the worker); no eventfd write needed. */
static bool loop_will_post(aiote_engine *e, const struct op *op)
{
    return !e->is_shm && op->kind != OP_CTRL && !op->cu_event && atomic_load(&e->events.spinning) &&
           atomic_load(&e->has_driver) && pthread_equal(e->driver, pthread_self());
}

static int enqueue(aiote_engine *e, struct op *op)
{
    pthread_mutex_lock(&e->sub_lock);
    if (atomic_load(&e->stopping)) {
        pthread_mutex_unlock(&e->sub_lock);
        aiote_set_error("engine is closed");
        return -AIOTE_E_CLOSED;
    }
    op->next = NULL;
    if (e->sub_tail)
        e->sub_tail->next = op;
    else
        e->sub_head = op;
    e->sub_tail = op;
    if (op->kind == OP_CTRL)
        e->nctrl++;
    bool quiet = loop_will_post(e, op);
    atomic_store(&e->sub_pending, true); /* seq_cst: before wake_worker's load (Dekker with the worker's rest) */
    pthread_mutex_unlock(&e->sub_lock);
    if (quiet)
        loop_post_now(e); /* post it from here: the loop would only do so on its next pass */
    else
        wake_worker(e);
    return 0;
}

/* Queue an op built outside the worker's submission functions (direct.c);
 * on failure it is freed and its elements given back. */
int enqueue_op(aiote_engine *e, struct op *op)
{
    int rc = enqueue(e, op);
    if (rc) {
        atomic_fetch_sub(&e->outstanding, op->n_submitted);
        op_free(op);
    }
    return rc;
}

/* Run fn on the worker and wait for it (GIL is released by cffi). */
static int run_ctrl(aiote_engine *e, ctrl_fn fn, void *arg)
{
    struct op *op = calloc(1, sizeof *op);
    if (!op)
        return -AIOTE_E_NOMEM;
    op->kind = OP_CTRL;
    op->fn = fn;
    op->arg = arg;
    sem_init(&op->done, 0, 0);
    int rc = enqueue(e, op);
    if (rc) {
        sem_destroy(&op->done);
        free(op);
        return rc;
    }
    /* Wait in slices: a wedged worker (see the watchdog) never runs it.  The
     * op is then left behind with the engine (never freed under it). */
    for (;;) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 100 * 1000 * 1000;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        if (sem_timedwait(&op->done, &ts) == 0)
            break;
        if (atomic_load(&e->wedged)) {
            aiote_set_error("engine is unusable: its worker is stuck in the provider on a dead peer");
            return -AIOTE_E_CLOSED;
        }
    }
    rc = op->ctrl_rc;
    if (rc)
        aiote_set_error("%s", op->err);
    sem_destroy(&op->done);
    free(op);
    return rc;
}

/* Reserve room for n elements; AIOTE_E_AGAIN when the engine is saturated. */
static int reserve(aiote_engine *e, size_t n)
{
    size_t cur = atomic_fetch_add(&e->outstanding, n);
    if (cur > 0 && cur + n > e->cfg.max_queued) {
        atomic_fetch_sub(&e->outstanding, n);
        aiote_set_error("submission queue full (%zu elements outstanding)", cur);
        return -AIOTE_E_AGAIN;
    }
    return 0;
}

static struct mr_slot *mr_lookup(aiote_engine *e, uint64_t mr_id)
{
    size_t idx = (size_t)(mr_id & 0xffffffffu);
    uint32_t gen = (uint32_t)(mr_id >> 32);
    if (idx >= e->nmrs || !e->mrs[idx].used || e->mrs[idx].closing || e->mrs[idx].gen != gen)
        return NULL;
    return &e->mrs[idx];
}

int aiote_mr_register(aiote_engine *e, void *addr, uint64_t len, int access, uint64_t *mr_id,
                      uint64_t *keys, uint64_t *base)
{
    if (!addr || len == 0) {
        aiote_set_error("cannot register an empty buffer");
        return -AIOTE_E_INVAL;
    }
    struct mr_reg_arg a = {.addr = addr, .len = len, .access = access, .cuda_device = -1};
    int rc = run_ctrl(e, ctrl_mr_register, &a);
    if (rc)
        return rc;
    *mr_id = a.mr_id;
    memcpy(keys, a.keys, e->nnics * sizeof *keys);
    *base = a.base;
    return 0;
}

int aiote_mr_register_cuda(aiote_engine *e, void *addr, uint64_t len, int access, int device,
                           uint64_t *mr_id, uint64_t *keys, uint64_t *base)
{
    if (!addr || len == 0 || device < 0) {
        aiote_set_error("cannot register an empty buffer or device %d", device);
        return -AIOTE_E_INVAL;
    }
    if (!e->cfg.hmem || !e->info.hmem) {
        aiote_set_error("this engine was not opened for device memory (FI_HMEM)");
        return -AIOTE_E_INVAL;
    }
    struct mr_reg_arg a = {.addr = addr, .len = len, .access = access, .cuda_device = device};
    int rc = run_ctrl(e, ctrl_mr_register, &a);
    if (rc)
        return rc;
    *mr_id = a.mr_id;
    memcpy(keys, a.keys, e->nnics * sizeof *keys);
    *base = a.base;
    return 0;
}

int aiote_mr_deregister(aiote_engine *e, uint64_t mr_id)
{
    pthread_mutex_lock(&e->mr_lock);
    struct mr_slot *s = mr_lookup(e, mr_id);
    if (!s) {
        pthread_mutex_unlock(&e->mr_lock);
        aiote_set_error("unknown or already closed memory region");
        return -AIOTE_E_NO_MR;
    }
    if (s->refs > 0) {
        int64_t refs = s->refs;
        pthread_mutex_unlock(&e->mr_lock);
        aiote_set_error("memory region is in use by %lld operation(s)", (long long)refs);
        return -AIOTE_E_BUSY;
    }
    /* direct path: no peer copies into it from now on.  The wait for copies
     * in flight may be long (a stopped peer: up to peer_timeout), so it runs
     * without mr_lock (the worker takes it); "closing" keeps the slot from
     * being used or reused meanwhile. */
    size_t idx = (size_t)(mr_id & 0xffffffffu);
    s->closing = true;
    pthread_mutex_unlock(&e->mr_lock);
    int drc = direct_unpublish(e, idx, e->peer_timeout_ns);
    pthread_mutex_lock(&e->mr_lock);
    s = &e->mrs[idx]; /* the array may have moved */
    s->closing = false;
    if (drc) {
        pthread_mutex_unlock(&e->mr_lock);
        return drc;
    }
    struct mr_close_arg a;
    memcpy(a.mr, s->mr, sizeof a.mr);
    memset(s->mr, 0, sizeof s->mr);
    s->used = false;
    pthread_mutex_unlock(&e->mr_lock);
    int rc = run_ctrl(e, ctrl_mr_close, &a);
    if (rc == -AIOTE_E_CLOSED)
        rc = 0; /* engine shut down: the region was closed with it */
    return rc;
}

int aiote_peer_insert(aiote_engine *e, const uint8_t *addrs, size_t len, uint32_t *peer)
{
    if (!addrs || len == 0 || len > 1 + AIOTE_MAX_NICS * (2 + AIOTE_ADDR_MAX)) {
        aiote_set_error("peer address list of %zu bytes is malformed", len);
        return -AIOTE_E_PEER;
    }
    struct peer_arg a = {.addrs = addrs, .len = len};
    int rc = run_ctrl(e, ctrl_peer_insert, &a);
    if (!rc)
        *peer = a.peer;
    return rc;
}

int aiote_peer_watch(aiote_engine *e, uint32_t peer, int delta)
{
    pthread_mutex_lock(&e->peer_lock);
    if (peer >= e->npeers || (delta != 1 && delta != -1)) {
        pthread_mutex_unlock(&e->peer_lock);
        aiote_set_error("unknown peer %u or bad delta %d", peer, delta);
        return -AIOTE_E_INVAL;
    }
    struct peer *p = e->peers[peer];
    int before = atomic_fetch_add(&p->watch, delta);
    if (before + delta < 0)
        atomic_store(&p->watch, 0);
    bool gone = p->gone;
    pthread_mutex_unlock(&e->peer_lock);
    return gone ? 1 : 0;
}

int aiote_rdesc_insert(aiote_engine *e, uint32_t peer, uint64_t base, uint64_t len, const uint64_t *keys,
                       uint32_t nkeys, uint32_t *rdesc)
{
    pthread_mutex_lock(&e->peer_lock);
    if (peer >= e->npeers) {
        pthread_mutex_unlock(&e->peer_lock);
        aiote_set_error("unknown peer %u", peer);
        return -AIOTE_E_PEER;
    }
    uint32_t pn = e->peers[peer]->nnics;
    if (nkeys != pn || len == 0) {
        pthread_mutex_unlock(&e->peer_lock);
        aiote_set_error("descriptor has %u keys for a peer with %u NICs (length %llu)", nkeys, pn,
                        (unsigned long long)len);
        return -AIOTE_E_INVAL;
    }
    if (e->nrdescs == e->cap_rdescs) {
        size_t cap = e->cap_rdescs ? e->cap_rdescs * 2 : 64;
        struct rdesc **n = realloc(e->rdescs, cap * sizeof *n);
        if (!n) {
            pthread_mutex_unlock(&e->peer_lock);
            return -AIOTE_E_NOMEM;
        }
        e->rdescs = n;
        e->cap_rdescs = cap;
    }
    struct rdesc *rd = calloc(1, sizeof *rd);
    if (!rd || e->nrdescs >= UINT32_MAX) {
        pthread_mutex_unlock(&e->peer_lock);
        free(rd);
        return -AIOTE_E_NOMEM;
    }
    rd->peer = peer;
    rd->base = base;
    rd->len = len;
    memcpy(rd->keys, keys, nkeys * sizeof *keys);
    direct_resolve(e, e->peers[peer], rd);
    *rdesc = (uint32_t)e->nrdescs;
    e->rdescs[e->nrdescs++] = rd;
    pthread_mutex_unlock(&e->peer_lock);
    return 0;
}

static const struct rdesc *rdesc_get(aiote_engine *e, uint32_t id)
{
    pthread_mutex_lock(&e->peer_lock);
    const struct rdesc *rd = id < e->nrdescs ? e->rdescs[id] : NULL;
    pthread_mutex_unlock(&e->peer_lock);
    return rd;
}

static inline bool out_of(uint64_t off, uint64_t len, uint64_t total)
{
    return len > total || off > total - len;
}

static size_t npeers_now(aiote_engine *e)
{
    pthread_mutex_lock(&e->peer_lock);
    size_t n = e->npeers;
    pthread_mutex_unlock(&e->peer_lock);
    return n;
}


/* Look up the local region and take a reference for the op. */
static int take_local(aiote_engine *e, struct op *op, uint64_t mr_id, struct mr_slot **slot)
{
    pthread_mutex_lock(&e->mr_lock);
    struct mr_slot *s = mr_lookup(e, mr_id);
    if (!s) {
        pthread_mutex_unlock(&e->mr_lock);
        aiote_set_error("unknown or closed memory region");
        return -AIOTE_E_NO_MR;
    }
    *slot = s;
    op->mr_index = (uint32_t)(mr_id & 0xffffffffu);
    op->local_base = s->addr;
    op->local_device = s->device;
    memcpy(op->local_desc, s->desc, sizeof op->local_desc);
    return 0; /* mr_lock held: caller validates, then commit_local/abort_local */
}

static void commit_local(aiote_engine *e, struct mr_slot *s)
{
    s->refs++;
    pthread_mutex_unlock(&e->mr_lock);
}

static int submit_op(aiote_engine *e, struct op *op, size_t nelems)
{
    int rc = enqueue(e, op);
    if (rc) {
        if (op->kind == OP_WRITES || op->kind == OP_PAGED) {
            pthread_mutex_lock(&e->mr_lock);
            e->mrs[op->mr_index].refs--;
            pthread_mutex_unlock(&e->mr_lock);
        }
        atomic_fetch_sub(&e->outstanding, nelems);
        op_free(op);
    }
    return rc;
}

static void release_local(aiote_engine *e, struct op *op)
{
    pthread_mutex_lock(&e->mr_lock);
    e->mrs[op->mr_index].refs--;
    pthread_mutex_unlock(&e->mr_lock);
}

/* The direct path (direct.c), mr_lock held: mode 1: copy now, on the calling
 * thread; mode 2: queue it for a copy thread (an event reports it);
 * libfabric if it can't. */
static int direct_submit(aiote_engine *e, struct op *op, size_t n, int mode)
{
    commit_local(e, &e->mrs[op->mr_index]); /* the local region stays while we copy */
    if (mode == 2) {
        int rc = reserve(e, n); /* backpressure as for libfabric's queue */
        if (rc) {
            release_local(e, op);
            op_free(op);
            return rc;
        }
        rc = direct_async(e, op);
        if (rc == 0)
            return 0;
        if (rc != AIOTE_DIRECT_FALLBACK) {
            atomic_fetch_sub(&e->outstanding, n);
            release_local(e, op);
            op_free(op);
            return rc;
        }
        return submit_op(e, op, n);
    }
    int r = direct_run(e, op);
    if (r != AIOTE_DIRECT_FALLBACK) {
        release_local(e, op);
        op_free(op);
        return r;
    }
    int rc = reserve(e, n);
    if (rc) {
        release_local(e, op);
        op_free(op);
        return rc;
    }
    return submit_op(e, op, n);
}

int engine_handoff(aiote_engine *e, struct op *op) { return submit_op(e, op, op->n_submitted); }

/* Build a batch of writes: checked, remote regions resolved, the local
 * region referenced.  With prep_out the op becomes a template (not queued,
 * nothing reserved); else it is submitted. */
static int writes_op(aiote_engine *e, uint64_t op_id, uint64_t mr_id, const aiote_wr *wrs, size_t n,
                     int has_imm, uint32_t imm, uint64_t *bad_index, struct op **prep_out)
{
    *bad_index = 0;
    if (has_imm && imm > IMM_USER_MAX) {
        aiote_set_error("imm %u out of range 0..%u", imm, IMM_USER_MAX);
        return -AIOTE_E_INVAL;
    }
    if (n == 0) {
        aiote_set_error("empty batch");
        return -AIOTE_E_INVAL;
    }
    struct op *op = calloc(1, sizeof *op);
    if (!op)
        return -AIOTE_E_NOMEM;
    op->wrs = malloc(n * sizeof *op->wrs);
    if (!op->wrs) {
        free(op);
        return -AIOTE_E_NOMEM;
    }
    op->kind = OP_WRITES;
    op->id = op_id;
    op->n = op->n_submitted = n;
    op->has_imm = has_imm;
    op->imm = imm;
    /* resolve remote regions (stable pointers) before taking the region lock */
    pthread_mutex_lock(&e->peer_lock);
    size_t nrd = e->nrdescs;
    for (size_t i = 0; i < n; i++) {
        if (wrs[i].rdesc >= nrd) {
            pthread_mutex_unlock(&e->peer_lock);
            aiote_set_error("element %zu: unknown remote region %u", i, wrs[i].rdesc);
            *bad_index = i;
            op_free(op);
            return -AIOTE_E_PEER;
        }
        op->wrs[i] = (struct welem){.rd = e->rdescs[wrs[i].rdesc], .src_off = wrs[i].src_off,
                                    .dst_off = wrs[i].dst_off, .len = wrs[i].len};
    }
    pthread_mutex_unlock(&e->peer_lock);
    struct mr_slot *s;
    int rc = take_local(e, op, mr_id, &s);
    if (rc) {
        op_free(op);
        return rc;
    }
    /* every element is checked before anything is posted */
    for (size_t i = 0; i < n; i++) {
        const struct welem *w = &op->wrs[i];
        const char *what = NULL;
        if (out_of(w->src_off, w->len, s->len))
            what = "source range outside the local region";
        else if (out_of(w->dst_off, w->len, w->rd->len))
            what = "destination range outside the remote region";
        if (what) {
            pthread_mutex_unlock(&e->mr_lock);
            aiote_set_error("element %zu: %s (src_off=%llu dst_off=%llu len=%llu, local=%llu remote=%llu)",
                            i, what, (unsigned long long)w->src_off, (unsigned long long)w->dst_off,
                            (unsigned long long)w->len, (unsigned long long)s->len,
                            (unsigned long long)w->rd->len);
            *bad_index = i;
            op_free(op);
            return -AIOTE_E_BOUNDS;
        }
    }
    if (prep_out) {
        commit_local(e, s);
        *prep_out = op;
        return 0;
    }
    int dmode = direct_mode(e, op);
    if (dmode)
        return direct_submit(e, op, n, dmode);
    rc = reserve(e, n);
    if (rc) {
        pthread_mutex_unlock(&e->mr_lock);
        op_free(op);
        return rc;
    }
    commit_local(e, s);
    return submit_op(e, op, n);
}

int aiote_submit_writes(aiote_engine *e, uint64_t op_id, uint64_t mr_id, const aiote_wr *wrs,
                        size_t n, int has_imm, uint32_t imm, uint64_t *bad_index)
{
    return writes_op(e, op_id, mr_id, wrs, n, has_imm, imm, bad_index, NULL);
}

int aiote_submit_write(aiote_engine *e, uint64_t op_id, uint64_t mr_id, uint32_t rdesc, uint64_t src_off,
                       uint64_t dst_off, uint64_t len, int has_imm, uint32_t imm, uint64_t *bad_index)
{
    aiote_wr w = {.rdesc = rdesc, .src_off = src_off, .dst_off = dst_off, .len = len};
    return writes_op(e, op_id, mr_id, &w, 1, has_imm, imm, bad_index, NULL);
}

/* ---- CUDA-gated operations (cuda_copy.c) -------------------------------- */

static void unref_local(aiote_engine *e, struct op *op)
{
    pthread_mutex_lock(&e->mr_lock);
    e->mrs[op->mr_index].refs--;
    pthread_mutex_unlock(&e->mr_lock);
}

static int submit_cuda(aiote_engine *e, uint64_t op_id, uint64_t ctx, uint64_t stream, int wait,
                       uint64_t wait_stream, const aiote_copy *copies, size_t ncopies, const struct cu_lanes *lanes,
                       uint64_t mr_id, const aiote_wr *wrs, size_t n, int has_imm, uint32_t imm,
                       uint64_t *bad_index);

int aiote_submit_cuda(aiote_engine *e, uint64_t op_id, uint64_t ctx, uint64_t stream, int wait,
                      uint64_t wait_stream, const aiote_copy *copies, size_t ncopies, uint64_t mr_id,
                      const aiote_wr *wrs, size_t n, int has_imm, uint32_t imm, uint64_t *bad_index)
{
    return submit_cuda(e, op_id, ctx, stream, wait, wait_stream, copies, ncopies, NULL, mr_id, wrs, n, has_imm,
                       imm, bad_index);
}

int aiote_submit_cuda_lanes(aiote_engine *e, uint64_t op_id, uint64_t ctx, uint64_t stream, int wait,
                            uint64_t wait_stream, const aiote_copy *copies, const uint8_t *lane_of,
                            size_t ncopies, const uint64_t *lanes, size_t nlanes, uint64_t fork_event,
                            uint64_t mr_id, const aiote_wr *wrs, size_t n, int has_imm, uint32_t imm,
                            uint64_t *bad_index)
{
    *bad_index = 0;
    if ((ncopies && !lane_of) || !nlanes || !lanes || (wait && !fork_event)) {
        aiote_set_error("CUDA write: null lane list or fork event");
        return -AIOTE_E_INVAL;
    }
    for (size_t i = 0; i < nlanes; i++)
        if (!lanes[2 * i] || !lanes[2 * i + 1]) {
            aiote_set_error("CUDA write: lane %zu has a null stream or event", i);
            return -AIOTE_E_INVAL;
        }
    for (size_t i = 0; i < ncopies; i++)
        if (lane_of[i] >= nlanes) {
            *bad_index = i;
            aiote_set_error("CUDA copy %zu: lane %u of %zu", i, (unsigned)lane_of[i], nlanes);
            return -AIOTE_E_INVAL;
        }
    struct cu_lanes l = {.lane_of = lane_of, .lanes = lanes, .nlanes = nlanes,
                         .fork_event = (void *)(uintptr_t)fork_event};
    return submit_cuda(e, op_id, ctx, stream, wait, wait_stream, copies, ncopies, &l, mr_id, wrs, n, has_imm, imm,
                       bad_index);
}

static int submit_cuda(aiote_engine *e, uint64_t op_id, uint64_t ctx, uint64_t stream, int wait,
                       uint64_t wait_stream, const aiote_copy *copies, size_t ncopies, const struct cu_lanes *lanes,
                       uint64_t mr_id, const aiote_wr *wrs, size_t n, int has_imm, uint32_t imm,
                       uint64_t *bad_index)
{
    *bad_index = 0;
    int rc = aiote_cuda_load();
    if (rc)
        return rc;
    if (!ctx || !stream || (ncopies && !copies) || (n && !wrs)) {
        aiote_set_error("CUDA write: null context, stream or list");
        return -AIOTE_E_INVAL;
    }
    struct op *op = NULL;
    if (n) {
        rc = writes_op(e, op_id, mr_id, wrs, n, has_imm, imm, bad_index, &op); /* checked, region held */
        if (rc)
            return rc;
    } else {
        op = calloc(1, sizeof *op);
        if (!op)
            return -AIOTE_E_NOMEM;
        op->kind = OP_WRITES;
        op->id = op_id;
        struct mr_slot *s;
        rc = take_local(e, op, mr_id, &s);
        if (rc) {
            op_free(op);
            return rc;
        }
        commit_local(e, s);
    }
    size_t units = n ? n : 1;
    rc = reserve(e, units);
    if (rc) {
        unref_local(e, op);
        op_free(op);
        return rc;
    }
    rc = lanes ? cu_issue_lanes((void *)(uintptr_t)ctx, (void *)(uintptr_t)stream, wait,
                                (void *)(uintptr_t)wait_stream, copies, ncopies, lanes, &op->cu_event)
               : cu_issue((void *)(uintptr_t)ctx, (void *)(uintptr_t)stream, wait, (void *)(uintptr_t)wait_stream,
                          copies, ncopies, &op->cu_event);
    if (rc) {
        atomic_fetch_sub(&e->outstanding, units);
        unref_local(e, op);
        op_free(op);
        return rc;
    }
    op->cu_ctx = (void *)(uintptr_t)ctx;
    return submit_op(e, op, units);
}

int aiote_submit_cuda_one(aiote_engine *e, uint64_t op_id, uint64_t ctx, uint64_t stream, int wait,
                          uint64_t wait_stream, uint64_t dst, uint64_t src, uint64_t len, uint64_t mr_id,
                          uint32_t rdesc, int has_imm, uint32_t imm)
{
    aiote_copy c = {.dst = dst, .src = src, .len = len};
    aiote_wr w = {.rdesc = rdesc}; /* imm-only */
    uint64_t bad;
    return aiote_submit_cuda(e, op_id, ctx, stream, wait, wait_stream, &c, 1, mr_id, has_imm ? &w : NULL,
                             has_imm ? 1 : 0, has_imm, imm, &bad);
}

int aiote_cuda_arrive(aiote_engine *e, uint64_t ctx, uint64_t stream, const aiote_copy *copies,
                      size_t ncopies, uint32_t imm, uint64_t count)
{
    if (count && imm > IMM_USER_MAX) {
        aiote_set_error("imm %u out of range 0..%u", imm, IMM_USER_MAX);
        return -AIOTE_E_INVAL;
    }
    struct op *op = calloc(1, sizeof *op);
    if (!op)
        return -AIOTE_E_NOMEM;
    op->kind = OP_ARRIVE;
    op->imm = imm;
    op->arrive_count = count;
    int rc = cu_issue((void *)(uintptr_t)ctx, (void *)(uintptr_t)stream, 0, NULL, copies, ncopies, &op->cu_event);
    if (rc) {
        free(op);
        return rc;
    }
    op->cu_ctx = (void *)(uintptr_t)ctx;
    rc = enqueue(e, op);
    if (rc)
        op_free(op); /* waits for the copies */
    return rc;
}

static int paged_op(aiote_engine *e, uint64_t op_id, uint64_t mr_id, uint32_t rdesc,
                    uint64_t page_len, const int64_t *src_pages, uint64_t src_stride,
                    uint64_t src_off, const int64_t *dst_pages, uint64_t dst_stride,
                    uint64_t dst_off, size_t n, int has_imm, uint32_t imm, uint64_t *bad_index,
                    struct op **prep_out)
{
    *bad_index = 0;
    if (has_imm && imm > IMM_USER_MAX) {
        aiote_set_error("imm %u out of range 0..%u", imm, IMM_USER_MAX);
        return -AIOTE_E_INVAL;
    }
    if (n == 0) {
        aiote_set_error("empty batch");
        return -AIOTE_E_INVAL;
    }
    const struct rdesc *rd = rdesc_get(e, rdesc);
    if (!rd) {
        aiote_set_error("unknown remote region %u", rdesc);
        return -AIOTE_E_PEER;
    }
    uint64_t remote_len = rd->len;
    struct op *op = calloc(1, sizeof *op);
    if (!op)
        return -AIOTE_E_NOMEM;
    op->src_pages = malloc(n * sizeof(int64_t));
    op->dst_pages = malloc(n * sizeof(int64_t));
    if (!op->src_pages || !op->dst_pages) {
        op_free(op);
        return -AIOTE_E_NOMEM;
    }
    memcpy(op->src_pages, src_pages, n * sizeof(int64_t));
    memcpy(op->dst_pages, dst_pages, n * sizeof(int64_t));
    op->kind = OP_PAGED;
    op->id = op_id;
    op->n = op->n_submitted = n;
    op->has_imm = has_imm;
    op->imm = imm;
    op->rd = rd;
    op->page_len = page_len;
    op->src_stride = src_stride;
    op->src_off = src_off;
    op->dst_stride = dst_stride;
    op->dst_off = dst_off;
    struct mr_slot *s;
    int rc = take_local(e, op, mr_id, &s);
    if (rc) {
        op_free(op);
        return rc;
    }
    for (size_t i = 0; i < n; i++) {
        int64_t sp = op->src_pages[i], dp = op->dst_pages[i];
        /* compute offsets with overflow checks: a page index from Python can be anything */
        unsigned __int128 so = (unsigned __int128)(uint64_t)sp * src_stride + src_off;
        unsigned __int128 d = (unsigned __int128)(uint64_t)dp * dst_stride + dst_off;
        const char *what = NULL;
        if (sp < 0 || so + page_len > s->len)
            what = "source page outside the local region";
        else if (dp < 0 || d + page_len > remote_len)
            what = "destination page outside the remote region";
        if (what) {
            pthread_mutex_unlock(&e->mr_lock);
            aiote_set_error("page %zu: %s (src page %lld, dst page %lld, page_len=%llu, local=%llu remote=%llu)",
                            i, what, (long long)sp, (long long)dp, (unsigned long long)page_len,
                            (unsigned long long)s->len, (unsigned long long)remote_len);
            *bad_index = i;
            op_free(op);
            return -AIOTE_E_BOUNDS;
        }
    }
    if (prep_out) {
        commit_local(e, s);
        *prep_out = op;
        return 0;
    }
    int dmode = direct_mode(e, op);
    if (dmode)
        return direct_submit(e, op, n, dmode);
    rc = reserve(e, n);
    if (rc) {
        pthread_mutex_unlock(&e->mr_lock);
        op_free(op);
        return rc;
    }
    commit_local(e, s);
    return submit_op(e, op, n);
}

int aiote_submit_paged(aiote_engine *e, uint64_t op_id, uint64_t mr_id, uint32_t rdesc,
                       uint64_t page_len, const int64_t *src_pages, uint64_t src_stride,
                       uint64_t src_off, const int64_t *dst_pages, uint64_t dst_stride,
                       uint64_t dst_off, size_t n, int has_imm, uint32_t imm, uint64_t *bad_index)
{
    return paged_op(e, op_id, mr_id, rdesc, page_len, src_pages, src_stride, src_off, dst_pages,
                    dst_stride, dst_off, n, has_imm, imm, bad_index, NULL);
}

/* ---- watchers and prepared transfers ------------------------------------ */

static void release_template(aiote_engine *e, struct op *t)
{
    pthread_mutex_lock(&e->mr_lock);
    e->mrs[t->mr_index].refs--;
    pthread_mutex_unlock(&e->mr_lock);
    op_free(t);
}

static int prep_store(aiote_engine *e, struct op *t, uint32_t *prep)
{
    pthread_mutex_lock(&e->watch_lock);
    size_t i = 0;
    while (i < e->npreps && e->preps[i].tmpl)
        i++;
    if (i == e->npreps) {
        struct prepared *np = realloc(e->preps, (e->npreps + 16) * sizeof *np);
        if (!np) {
            pthread_mutex_unlock(&e->watch_lock);
            release_template(e, t);
            return -AIOTE_E_NOMEM;
        }
        memset(np + e->npreps, 0, 16 * sizeof *np);
        e->preps = np;
        e->npreps += 16;
    }
    e->preps[i] = (struct prepared){.tmpl = t};
    *prep = (uint32_t)i + 1;
    pthread_mutex_unlock(&e->watch_lock);
    return 0;
}

int aiote_prepare_writes(aiote_engine *e, uint64_t mr_id, const aiote_wr *wrs, size_t n, int has_imm,
                         uint32_t imm, uint64_t *bad_index, uint32_t *prep)
{
    struct op *t = NULL;
    int rc = writes_op(e, 0, mr_id, wrs, n, has_imm, imm, bad_index, &t);
    return rc ? rc : prep_store(e, t, prep);
}

int aiote_prepare_paged(aiote_engine *e, uint64_t mr_id, uint32_t rdesc, uint64_t page_len,
                        const int64_t *src_pages, uint64_t src_stride, uint64_t src_off,
                        const int64_t *dst_pages, uint64_t dst_stride, uint64_t dst_off,
                        size_t n, int has_imm, uint32_t imm, uint64_t *bad_index, uint32_t *prep)
{
    struct op *t = NULL;
    int rc = paged_op(e, 0, mr_id, rdesc, page_len, src_pages, src_stride, src_off, dst_pages, dst_stride,
                      dst_off, n, has_imm, imm, bad_index, &t);
    return rc ? rc : prep_store(e, t, prep);
}

int aiote_prepare_free(aiote_engine *e, uint32_t prep)
{
    pthread_mutex_lock(&e->watch_lock);
    if (prep == 0 || prep > e->npreps || !e->preps[prep - 1].tmpl) {
        pthread_mutex_unlock(&e->watch_lock);
        aiote_set_error("unknown prepared transfer %u", prep);
        return -AIOTE_E_NOT_FOUND;
    }
    struct prepared *p = &e->preps[prep - 1];
    if (p->armed || p->posting) {
        uint32_t armed = p->armed;
        pthread_mutex_unlock(&e->watch_lock);
        aiote_set_error("prepared transfer %u is armed on %u reaction(s) or being posted", prep, armed);
        return -AIOTE_E_BUSY;
    }
    struct op *t = p->tmpl;
    p->tmpl = NULL;
    pthread_mutex_unlock(&e->watch_lock);
    release_template(e, t);
    return 0;
}

/* Post a prepared batch now.  The template was checked and resolved once:
 * this only copies it (or, on the direct path's calling-thread mode, not even
 * that: the copy runs from a stack copy of the template). */
static int post_template(aiote_engine *e, const struct op *t, uint64_t op_id, int imm_mode, uint32_t imm)
{
    struct op tmp = *t; /* shallow: wrs / pages stay the template's (read only) */
    tmp.id = op_id;
    if (imm_mode == 1)
        tmp.has_imm = 0;
    else if (imm_mode == 2) {
        tmp.has_imm = 1;
        tmp.imm = imm;
    }
    size_t n = t->n_submitted;
    int dmode = direct_mode(e, &tmp);
    if (dmode == 1) {
        /* the template holds its local region: no reference to take for a copy that ends here */
        int r = direct_run(e, &tmp);
        if (r != AIOTE_DIRECT_FALLBACK)
            return r;
        dmode = 0;
    }
    struct op *op = op_clone(t, op_id);
    if (!op)
        return -AIOTE_E_NOMEM;
    op->has_imm = tmp.has_imm;
    op->imm = tmp.imm;
    pthread_mutex_lock(&e->mr_lock); /* the op's own reference on the region, as writes_op takes */
    if (dmode)
        return direct_submit(e, op, n, dmode);
    int rc = reserve(e, n);
    if (rc) {
        pthread_mutex_unlock(&e->mr_lock);
        op_free(op);
        return rc;
    }
    commit_local(e, &e->mrs[op->mr_index]);
    return submit_op(e, op, n);
}

int aiote_post_prepared(aiote_engine *e, uint64_t op_id, uint32_t prep, int imm_mode, uint32_t imm)
{
    if (imm_mode < 0 || imm_mode > 2 || (imm_mode == 2 && imm > IMM_USER_MAX)) {
        aiote_set_error("imm %u out of range 0..%u (mode %d)", imm, IMM_USER_MAX, imm_mode);
        return -AIOTE_E_INVAL;
    }
    if (atomic_load(&e->stopping)) {
        aiote_set_error("engine is closed");
        return -AIOTE_E_CLOSED;
    }
    pthread_mutex_lock(&e->watch_lock);
    if (prep == 0 || prep > e->npreps || !e->preps[prep - 1].tmpl) {
        pthread_mutex_unlock(&e->watch_lock);
        aiote_set_error("unknown prepared transfer %u", prep);
        return -AIOTE_E_NOT_FOUND;
    }
    const struct op *t = e->preps[prep - 1].tmpl; /* its own allocation: stable while posting > 0 */
    e->preps[prep - 1].posting++;
    pthread_mutex_unlock(&e->watch_lock);
    int rc = post_template(e, t, op_id, imm_mode, imm);
    pthread_mutex_lock(&e->watch_lock);
    e->preps[prep - 1].posting--;
    pthread_mutex_unlock(&e->watch_lock);
    return rc;
}

int aiote_watch_add(aiote_engine *e, const uint64_t *word, uint32_t *watch)
{
    if (!word || ((uintptr_t)word & 7)) {
        aiote_set_error("a watched word must be a non-NULL, 8-byte aligned address");
        return -AIOTE_E_INVAL;
    }
    pthread_mutex_lock(&e->watch_lock);
    size_t i = 0;
    while (i < e->nwatches && e->watches[i].word)
        i++;
    if (i == e->nwatches) {
        struct watch *nw = realloc(e->watches, (e->nwatches + 16) * sizeof *nw);
        if (!nw) {
            pthread_mutex_unlock(&e->watch_lock);
            return -AIOTE_E_NOMEM;
        }
        memset(nw + e->nwatches, 0, 16 * sizeof *nw);
        e->watches = nw;
        e->nwatches += 16;
    }
    e->watches[i] = (struct watch){.word = word};
    *watch = (uint32_t)i;
    pthread_mutex_unlock(&e->watch_lock);
    return 0;
}

/* Report a reaction that will never fire (watch removed, engine closed). */
static void reaction_fail(aiote_engine *e, struct reaction *r, struct event_buf *out)
{
    aiote_event ev = {.id = r->id, .kind = r->prep ? AIOTE_EV_OP : AIOTE_EV_WATCH,
                      .status = -AIOTE_E_CLOSED, .fi_errno = FI_ECANCELED, .nic = -1};
    event_buf_push(out, &ev);
    if (r->prep)
        e->preps[r->prep - 1].armed--;
    atomic_fetch_sub(&e->narmed, 1);
}

int aiote_watch_remove(aiote_engine *e, uint32_t watch)
{
    struct event_buf out = {0};
    pthread_mutex_lock(&e->watch_lock);
    if (watch >= e->nwatches || !e->watches[watch].word) {
        pthread_mutex_unlock(&e->watch_lock);
        aiote_set_error("unknown watcher %u", watch);
        return -AIOTE_E_NOT_FOUND;
    }
    struct reaction *r = e->watches[watch].head;
    while (r) {
        struct reaction *nx = r->next;
        reaction_fail(e, r, &out);
        free(r);
        r = nx;
    }
    e->watches[watch] = (struct watch){0};
    pthread_mutex_unlock(&e->watch_lock);
    event_queue_flush(&e->events, &out);
    free(out.ev);
    return 0;
}

int aiote_watch_arm(aiote_engine *e, uint32_t watch, uint64_t threshold, uint32_t prep, uint64_t id)
{
    if (atomic_load(&e->stopping)) {
        aiote_set_error("engine is closed");
        return -AIOTE_E_CLOSED;
    }
    struct reaction *r = calloc(1, sizeof *r);
    if (!r)
        return -AIOTE_E_NOMEM;
    pthread_mutex_lock(&e->watch_lock);
    if (watch >= e->nwatches || !e->watches[watch].word ||
        (prep && (prep > e->npreps || !e->preps[prep - 1].tmpl))) {
        pthread_mutex_unlock(&e->watch_lock);
        free(r);
        aiote_set_error("unknown watcher %u or prepared transfer %u", watch, prep);
        return -AIOTE_E_NOT_FOUND;
    }
    r->threshold = threshold;
    r->prep = prep;
    r->id = id;
    r->seq = ++e->reaction_seq;
    struct reaction **pp = &e->watches[watch].head;
    while (*pp && (*pp)->threshold <= threshold)
        pp = &(*pp)->next;
    r->next = *pp;
    *pp = r;
    if (prep)
        e->preps[prep - 1].armed++;
    atomic_fetch_add(&e->narmed, 1);
    pthread_mutex_unlock(&e->watch_lock);
    wake_worker(e);
    return 0;
}

int aiote_watch_disarm(aiote_engine *e, uint32_t watch, uint64_t id)
{
    pthread_mutex_lock(&e->watch_lock);
    if (watch >= e->nwatches || !e->watches[watch].word) {
        pthread_mutex_unlock(&e->watch_lock);
        return 0;
    }
    for (struct reaction **pp = &e->watches[watch].head; *pp; pp = &(*pp)->next) {
        struct reaction *r = *pp;
        if (r->id != id)
            continue;
        *pp = r->next;
        if (r->prep)
            e->preps[r->prep - 1].armed--;
        atomic_fetch_sub(&e->narmed, 1);
        pthread_mutex_unlock(&e->watch_lock);
        free(r);
        return 1;
    }
    pthread_mutex_unlock(&e->watch_lock);
    return 0;
}

/* Shutdown: every armed reaction fails; templates go (their regions with the engine). */
static void watches_close(aiote_engine *e)
{
    struct event_buf out = {0};
    pthread_mutex_lock(&e->watch_lock);
    for (size_t i = 0; i < e->nwatches; i++) {
        struct reaction *r = e->watches[i].head;
        while (r) {
            struct reaction *nx = r->next;
            reaction_fail(e, r, &out);
            free(r);
            r = nx;
        }
        e->watches[i].head = NULL;
    }
    for (size_t i = 0; i < e->npreps; i++) {
        op_free(e->preps[i].tmpl);
        e->preps[i].tmpl = NULL;
    }
    pthread_mutex_unlock(&e->watch_lock);
    event_queue_flush(&e->events, &out);
    free(out.ev);
}

int aiote_submit_send(aiote_engine *e, uint64_t op_id, uint32_t peer, const void *data, size_t len,
                      uint32_t flags)
{
    if (flags & ~(uint32_t)AIOTE_MSG_CTRL) {
        aiote_set_error("unknown message flags %#x", flags);
        return -AIOTE_E_INVAL;
    }
    if (len > e->cfg.msg_size) {
        aiote_set_error("message of %zu bytes exceeds msg_size %u", len, e->cfg.msg_size);
        return -AIOTE_E_TOO_BIG;
    }
    if (peer >= npeers_now(e)) {
        aiote_set_error("unknown peer %u", peer);
        return -AIOTE_E_PEER;
    }
    struct op *op = calloc(1, sizeof *op);
    if (!op)
        return -AIOTE_E_NOMEM;
    op->msg = malloc(len ? len : 1);
    if (!op->msg) {
        free(op);
        return -AIOTE_E_NOMEM;
    }
    if (len)
        memcpy(op->msg, data, len);
    op->msg_len = len;
    op->msg_flags = flags;
    op->kind = OP_SEND;
    op->id = op_id;
    op->n = op->n_submitted = 1;
    op->peer = peer;
    int rc = reserve(e, 1);
    if (rc) {
        op_free(op);
        return rc;
    }
    return submit_op(e, op, 1);
}

int aiote_cancel(aiote_engine *e, uint64_t op_id)
{
    pthread_mutex_lock(&e->sub_lock);
    if (e->ncancel == e->cap_cancel) {
        size_t cap = e->cap_cancel ? e->cap_cancel * 2 : 64;
        uint64_t *n = realloc(e->cancel_ids, cap * sizeof *n);
        if (!n) {
            pthread_mutex_unlock(&e->sub_lock);
            return -AIOTE_E_NOMEM;
        }
        e->cancel_ids = n;
        e->cap_cancel = cap;
    }
    e->cancel_ids[e->ncancel++] = op_id;
    atomic_store_explicit(&e->sub_pending, true, memory_order_release);
    pthread_mutex_unlock(&e->sub_lock);
    wake_worker(e);
    direct_async_cancel(e, op_id);
    return 0;
}

/* ---- ImmCounter --------------------------------------------------------- */

int aiote_imm_wait(aiote_engine *e, uint64_t waiter_id, uint32_t imm, uint64_t count)
{
    direct_imms_settle(e, true); /* entries a lazily sleeping worker left in the rings count now */
    int rc = imm_table_wait(&e->imms, waiter_id, imm, count);
    if (rc == 0)
        direct_imm_armed(e);
    if (rc == -AIOTE_E_INVAL)
        aiote_set_error("imm must be 0..%u and count >= 1 (imm=%u count=%llu)", IMM_USER_MAX, imm,
                        (unsigned long long)count);
    return rc;
}

int aiote_imm_cancel(aiote_engine *e, uint64_t waiter_id)
{
    struct event_buf fired = {0};
    int rc = imm_table_cancel(&e->imms, waiter_id, &fired);
    event_queue_flush(&e->events, &fired);
    free(fired.ev);
    return rc;
}

int aiote_imm_restore(aiote_engine *e, uint32_t imm, uint64_t count)
{
    struct event_buf fired = {0};
    int rc = imm_table_restore(&e->imms, imm, count, &fired);
    event_queue_flush(&e->events, &fired);
    free(fired.ev);
    if (rc == -AIOTE_E_INVAL)
        aiote_set_error("imm must be 0..%u", IMM_USER_MAX);
    return rc;
}

int aiote_imm_arrive(aiote_engine *e, uint32_t imm, uint64_t count)
{
    return aiote_imm_restore(e, imm, count);
}

int aiote_imm_pending(aiote_engine *e, uint32_t imm, uint64_t *count)
{
    direct_imms_settle(e, false);
    *count = imm_table_pending(&e->imms, imm);
    return 0;
}

int aiote_poll_events(aiote_engine *e, aiote_event *out, size_t max)
{
    return (int)event_queue_take(&e->events, out, max);
}

int aiote_nic_fail(aiote_engine *e, uint32_t nic)
{
    if (nic >= e->nnics) {
        aiote_set_error("no NIC %u (engine has %u)", nic, e->nnics);
        return -AIOTE_E_INVAL;
    }
    return run_ctrl(e, ctrl_nic_fail, &nic);
}
