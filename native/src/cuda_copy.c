/* CUDA copies ahead of an operation, with the driver loaded at run time.
 *
 * aiote has no build-time dependency on CUDA: libcuda.so.1 is dlopen'd the
 * first time a GPU path needs it (aiote_cuda_load), and only the handful of
 * entry points below are bound.  The CUDA types are opaque pointers and ints
 * here, declared by hand (the driver ABI of these calls has been stable since
 * CUDA 4).
 *
 * A "gated" operation (aiote_submit_cuda, aiote_cuda_arrive in engine.c) is
 * queued on the caller's thread: the copies go on the caller's stream
 * (cuMemcpyAsync, the copy engines), an event is recorded after them, and
 * the op is handed to the worker holding that event.  The worker polls the
 * event (cuEventQuery, no thread and no host function of ours) and, once it
 * has completed, posts the op's writes as any other (the imm of a CUDA IPC
 * write, a staged chunk's NIC write) or counts an imm locally (a staged
 * commit on the owner's side).  An event that fails fails the op with
 * AIOTE_E_CUDA. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define CU_EVENT_DISABLE_TIMING 2
#define CUDA_ERROR_NOT_READY 600

typedef int (*cu_init_t)(unsigned);
typedef int (*cu_ctx_set_t)(void *);
typedef int (*cu_ctx_get_t)(void **);
typedef int (*cu_memcpy_async_t)(uint64_t, uint64_t, size_t, void *);
typedef int (*cu_event_create_t)(void **, unsigned);
typedef int (*cu_event_record_t)(void *, void *);
typedef int (*cu_event_t)(void *);
typedef int (*cu_stream_wait_event_t)(void *, void *, unsigned);
typedef int (*cu_error_name_t)(int, const char **);

static struct {
    cu_ctx_set_t ctx_set;
    cu_ctx_get_t ctx_get;
    cu_memcpy_async_t memcpy_async;
    cu_event_create_t event_create;
    cu_event_record_t event_record;
    cu_event_t event_query, event_sync, event_destroy;
    cu_stream_wait_event_t stream_wait_event;
    cu_event_t stream_query;
    cu_error_name_t error_name;
} cu;

/* Events of finished ops, kept for reuse (cuEventCreate + cuEventDestroy per
 * write cost more than the copy of a small one).  Bounded; an event belongs
 * to the context it was created in. */
#define EV_POOL 256
static struct {
    pthread_mutex_t lock;
    size_t n;
    struct {
        void *ctx, *ev;
    } e[EV_POOL];
} ev_pool = {.lock = PTHREAD_MUTEX_INITIALIZER};

static void *ev_pool_take(void *ctx)
{
    void *ev = NULL;
    pthread_mutex_lock(&ev_pool.lock);
    for (size_t i = ev_pool.n; i-- > 0;)
        if (ev_pool.e[i].ctx == ctx) {
            ev = ev_pool.e[i].ev;
            ev_pool.e[i] = ev_pool.e[--ev_pool.n];
            break;
        }
    pthread_mutex_unlock(&ev_pool.lock);
    return ev;
}

static bool ev_pool_put(void *ctx, void *ev)
{
    bool kept = false;
    pthread_mutex_lock(&ev_pool.lock);
    if (ev_pool.n < EV_POOL) {
        ev_pool.e[ev_pool.n].ctx = ctx;
        ev_pool.e[ev_pool.n++].ev = ev;
        kept = true;
    }
    pthread_mutex_unlock(&ev_pool.lock);
    return kept;
}

/* Tests only (aiote_cuda_fake): "device memory" is host memory and a copy is
 * a memcpy, done when it is queued (so in stream order); its event reports
 * "not ready" to the first poll, so the worker's waiting path runs too.  Lets
 * the staging protocol run in real processes on machines without a GPU. */
#define FAKE_MAGIC 0xFA4EC0DAu
struct fake_event {
    uint32_t magic;
    int polls_left;
};
static _Atomic int cu_fake;        /* 1: the fake above instead of libcuda */
static _Atomic long fake_live;     /* fake events not yet released */

int aiote_cuda_fake(int on)
{
    if (!on && atomic_load(&fake_live) > 0) {
        aiote_set_error("fake CUDA events are still in use");
        return -AIOTE_E_BUSY;
    }
    atomic_store(&cu_fake, on ? 1 : 0);
    return 0;
}

static int fake_issue(const aiote_copy *copies, size_t n, void **event_out)
{
    struct fake_event *fe = malloc(sizeof *fe);
    if (!fe)
        return -AIOTE_E_NOMEM;
    for (size_t i = 0; i < n; i++)
        if (copies[i].len)
            memmove((void *)(uintptr_t)copies[i].dst, (const void *)(uintptr_t)copies[i].src, copies[i].len);
    fe->magic = FAKE_MAGIC;
    fe->polls_left = 1;
    atomic_fetch_add(&fake_live, 1);
    *event_out = fe;
    return 0;
}

static pthread_once_t cu_once = PTHREAD_ONCE_INIT;
static int cu_state;       /* 1: usable, -1: not */
static char cu_why[256];

static void *sym(void *h, const char *name, const char *v2)
{
    void *f = v2 ? dlsym(h, v2) : NULL;
    return f ? f : dlsym(h, name);
}

static void cu_load_once(void)
{
    void *h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        const char *d = dlerror();
        snprintf(cu_why, sizeof cu_why, "the CUDA driver (libcuda.so.1) is not available: %s", d ? d : "?");
        cu_state = -1;
        return;
    }
    cu_init_t init = (cu_init_t)sym(h, "cuInit", NULL);
    cu.ctx_set = (cu_ctx_set_t)sym(h, "cuCtxSetCurrent", NULL);
    cu.ctx_get = (cu_ctx_get_t)sym(h, "cuCtxGetCurrent", NULL);
    cu.memcpy_async = (cu_memcpy_async_t)sym(h, "cuMemcpyAsync", NULL);
    cu.event_create = (cu_event_create_t)sym(h, "cuEventCreate", NULL);
    cu.event_record = (cu_event_record_t)sym(h, "cuEventRecord", NULL);
    cu.event_query = (cu_event_t)sym(h, "cuEventQuery", NULL);
    cu.event_sync = (cu_event_t)sym(h, "cuEventSynchronize", NULL);
    cu.event_destroy = (cu_event_t)sym(h, "cuEventDestroy", "cuEventDestroy_v2");
    cu.stream_wait_event = (cu_stream_wait_event_t)sym(h, "cuStreamWaitEvent", NULL);
    cu.stream_query = (cu_event_t)sym(h, "cuStreamQuery", NULL);
    cu.error_name = (cu_error_name_t)sym(h, "cuGetErrorName", NULL);
    if (!init || !cu.ctx_set || !cu.ctx_get || !cu.memcpy_async || !cu.event_create || !cu.event_record ||
        !cu.event_query || !cu.event_sync || !cu.event_destroy || !cu.stream_wait_event || !cu.stream_query ||
        !cu.error_name) {
        snprintf(cu_why, sizeof cu_why, "the CUDA driver lacks an entry point aiote needs");
        cu_state = -1;
        return; /* the library stays loaded: harmless */
    }
    int rc = init(0);
    if (rc) {
        snprintf(cu_why, sizeof cu_why, "cuInit failed (%d)", rc);
        cu_state = -1;
        return;
    }
    cu_state = 1;
}

int aiote_cuda_load(void)
{
    if (atomic_load(&cu_fake))
        return 0;
    pthread_once(&cu_once, cu_load_once);
    if (cu_state != 1) {
        aiote_set_error("%s", cu_why);
        return -AIOTE_E_CUDA;
    }
    return 0;
}

const char *cu_error_name(int rc)
{
    const char *s = NULL;
    if (cu_state != 1 || cu.error_name(rc, &s) || !s)
        return "CUDA_ERROR_UNKNOWN";
    return s;
}

/* Queue the copies (and, with wait, a wait for work already on wait_stream)
 * on stream in ctx, then record a fresh event after them.  The calling
 * thread's current context is restored.  0, or -AIOTE_E_CUDA with the error
 * set. */
int cu_issue(void *ctx, void *stream, int wait, void *wait_stream, const aiote_copy *copies, size_t n,
             void **event_out)
{
    *event_out = NULL;
    int rc = aiote_cuda_load();
    if (rc)
        return rc;
    if (!ctx || !stream || (n && !copies)) {
        aiote_set_error("CUDA copy: null context, stream or copy list");
        return -AIOTE_E_INVAL;
    }
    for (size_t i = 0; i < n; i++)
        if (!copies[i].dst || !copies[i].src) {
            aiote_set_error("CUDA copy %zu: null address", i);
            return -AIOTE_E_INVAL;
        }
    if (atomic_load(&cu_fake))
        return fake_issue(copies, n, event_out);
    void *prev = NULL;
    cu.ctx_get(&prev);
    const char *what = "cuCtxSetCurrent";
    void *ev = NULL;
    size_t queued = 0;
    int cr = prev == ctx ? 0 : cu.ctx_set(ctx);
    if (cr)
        goto fail;
    if (wait && cu.stream_query(wait_stream) != 0) { /* work pending there (idle: nothing to wait for) */
        void *w = NULL;
        what = "cuEventCreate";
        if ((cr = cu.event_create(&w, CU_EVENT_DISABLE_TIMING)))
            goto fail;
        what = "cuEventRecord";
        cr = cu.event_record(w, wait_stream);
        if (!cr) {
            what = "cuStreamWaitEvent";
            cr = cu.stream_wait_event(stream, w, 0);
        }
        cu.event_destroy(w); /* destroyed after the wait is queued: allowed by CUDA */
        if (cr)
            goto fail;
    }
    what = "cuMemcpyAsync";
    for (size_t i = 0; i < n; i++) {
        if (!copies[i].len)
            continue;
        if ((cr = cu.memcpy_async(copies[i].dst, copies[i].src, copies[i].len, stream)))
            goto fail;
        queued++;
    }
    what = "cuEventCreate";
    ev = ev_pool_take(ctx);
    if (!ev && (cr = cu.event_create(&ev, CU_EVENT_DISABLE_TIMING)))
        goto fail;
    what = "cuEventRecord";
    if ((cr = cu.event_record(ev, stream))) {
        cu.event_destroy(ev);
        ev = NULL;
        goto fail;
    }
    if (prev != ctx)
        cu.ctx_set(prev);
    *event_out = ev;
    return 0;
fail:
    /* copies queued before the failure may still run: wait for them, their
     * buffers may be released as soon as we return the error */
    aiote_set_error("%s failed: %s (%d)", what, cu_error_name(cr), cr);
    if (queued && cu.event_create(&ev, CU_EVENT_DISABLE_TIMING) == 0) {
        if (cu.event_record(ev, stream) == 0)
            cu.event_sync(ev);
        cu.event_destroy(ev);
    }
    if (prev != ctx)
        cu.ctx_set(prev);
    return -AIOTE_E_CUDA;
}

int aiote_cuda_copy(uint64_t ctx, uint64_t stream, const aiote_copy *copies, size_t n)
{
    int rc = aiote_cuda_load();
    if (rc)
        return rc;
    if (!ctx || (n && !copies)) {
        aiote_set_error("CUDA copy: null context or copy list");
        return -AIOTE_E_INVAL;
    }
    for (size_t i = 0; i < n; i++) {
        const aiote_copy *c = &copies[i];
        if (!c->dst || !c->src) {
            aiote_set_error("CUDA copy %zu: null address", i);
            return -AIOTE_E_INVAL;
        }
        if (c->len && c->dst < c->src + c->len && c->src < c->dst + c->len) {
            aiote_set_error("CUDA copy %zu: source and destination overlap", i);
            return -AIOTE_E_INVAL;
        }
    }
    if (atomic_load(&cu_fake)) {
        for (size_t i = 0; i < n; i++)
            if (copies[i].len)
                memcpy((void *)(uintptr_t)copies[i].dst, (const void *)(uintptr_t)copies[i].src, copies[i].len);
        return 0;
    }
    void *prev = NULL;
    cu.ctx_get(&prev);
    int cr = prev == (void *)(uintptr_t)ctx ? 0 : cu.ctx_set((void *)(uintptr_t)ctx);
    const char *what = cr ? "cuCtxSetCurrent" : "cuMemcpyAsync";
    for (size_t i = 0; i < n && !cr; i++)
        if (copies[i].len)
            cr = cu.memcpy_async(copies[i].dst, copies[i].src, copies[i].len, (void *)(uintptr_t)stream);
    if (prev != (void *)(uintptr_t)ctx)
        cu.ctx_set(prev);
    if (cr) {
        aiote_set_error("%s failed: %s (%d)", what, cu_error_name(cr), cr);
        return -AIOTE_E_CUDA;
    }
    return 0;
}

static __thread void *cur_ctx; /* the worker's current context (set lazily) */

/* Worker: 0 done, 1 not yet, else the (positive) CUresult of a failure. */
int cu_poll(void *ctx, void *event)
{
    if (atomic_load(&cu_fake)) {
        struct fake_event *fe = event;
        return fe->polls_left-- > 0 ? 1 : 0;
    }
    if (ctx != cur_ctx) {
        if (cu.ctx_set(ctx) == 0)
            cur_ctx = ctx;
    }
    int rc = cu.event_query(event);
    if (rc == CUDA_ERROR_NOT_READY)
        return 1;
    return rc;
}

/* Destroy an op's event; with sync, after waiting for it (its copies may
 * still read or write buffers about to be freed).  Any thread. */
void cu_release(void *ctx, void *event, bool sync)
{
    if (event && atomic_load(&cu_fake)) {
        ((struct fake_event *)event)->magic = 0;
        free(event);
        atomic_fetch_sub(&fake_live, 1);
        return;
    }
    if (!event || cu_state != 1)
        return;
    /* done without error (the worker's case): kept for the next op */
    if (!sync && cu.event_query(event) == 0 && ev_pool_put(ctx, event))
        return;
    void *prev = NULL;
    cu.ctx_get(&prev);
    if (prev != ctx)
        cu.ctx_set(ctx);
    if (sync)
        cu.event_sync(event);
    cu.event_destroy(event);
    if (prev != ctx)
        cu.ctx_set(prev);
}

/* Wait (on this thread) for what is queued on stream so far; errors ignored:
 * the failure paths use it before returning their own error. */
static void stream_drain(void *stream)
{
    void *ev = NULL;
    if (cu.event_create(&ev, CU_EVENT_DISABLE_TIMING) == 0) {
        if (cu.event_record(ev, stream) == 0)
            cu.event_sync(ev);
        cu.event_destroy(ev);
    }
}

/* cu_issue with the copies spread over lanes (stream, event pairs of ctx):
 * with wait (and work pending on wait_stream), fork_event is recorded there
 * and every lane used waits on it; each copy goes on its lane's stream; each
 * lane used records its event and stream waits on it; then the op's event is
 * recorded on stream.  Copies to different lanes overlap on the copy engines;
 * copies on one lane stay in order, also across calls. */
int cu_issue_lanes(void *ctx, void *stream, int wait, void *wait_stream, const aiote_copy *copies, size_t n,
                   const struct cu_lanes *l, void **event_out)
{
    *event_out = NULL;
    int rc = aiote_cuda_load();
    if (rc)
        return rc;
    if (!ctx || !stream || (n && !copies) || !l || !l->nlanes || l->nlanes > 256) {
        aiote_set_error("CUDA copy: null context, stream, copy or lane list");
        return -AIOTE_E_INVAL;
    }
    for (size_t i = 0; i < n; i++)
        if (!copies[i].dst || !copies[i].src || l->lane_of[i] >= l->nlanes) {
            aiote_set_error("CUDA copy %zu: null address or no such lane", i);
            return -AIOTE_E_INVAL;
        }
    if (atomic_load(&cu_fake))
        return fake_issue(copies, n, event_out);
    uint8_t used[256] = {0};
    for (size_t i = 0; i < n; i++)
        if (copies[i].len)
            used[l->lane_of[i]] = 1;
    void *prev = NULL;
    cu.ctx_get(&prev);
    const char *what = "cuCtxSetCurrent";
    void *ev = NULL;
    bool queued = false;
    int cr = prev == ctx ? 0 : cu.ctx_set(ctx);
    if (cr)
        goto fail;
    if (wait && cu.stream_query(wait_stream) != 0) { /* work pending there (idle: nothing to wait for) */
        what = "cuEventRecord";
        if ((cr = cu.event_record(l->fork_event, wait_stream)))
            goto fail;
        what = "cuStreamWaitEvent";
        for (size_t k = 0; k < l->nlanes; k++)
            if (used[k] && (cr = cu.stream_wait_event((void *)(uintptr_t)l->lanes[2 * k], l->fork_event, 0)))
                goto fail;
    }
    what = "cuMemcpyAsync";
    for (size_t i = 0; i < n; i++) {
        if (!copies[i].len)
            continue;
        if ((cr = cu.memcpy_async(copies[i].dst, copies[i].src, copies[i].len,
                                  (void *)(uintptr_t)l->lanes[2 * l->lane_of[i]])))
            goto fail;
        queued = true;
    }
    for (size_t k = 0; k < l->nlanes; k++) {
        if (!used[k])
            continue;
        void *ls = (void *)(uintptr_t)l->lanes[2 * k], *le = (void *)(uintptr_t)l->lanes[2 * k + 1];
        what = "cuEventRecord";
        if ((cr = cu.event_record(le, ls)))
            goto fail;
        what = "cuStreamWaitEvent";
        if ((cr = cu.stream_wait_event(stream, le, 0)))
            goto fail;
    }
    what = "cuEventCreate";
    ev = ev_pool_take(ctx);
    if (!ev && (cr = cu.event_create(&ev, CU_EVENT_DISABLE_TIMING)))
        goto fail;
    what = "cuEventRecord";
    if ((cr = cu.event_record(ev, stream))) {
        cu.event_destroy(ev);
        ev = NULL;
        goto fail;
    }
    if (prev != ctx)
        cu.ctx_set(prev);
    *event_out = ev;
    return 0;
fail:
    /* copies queued before the failure may still run: wait for them (their buffers
     * may be released as soon as we return the error) */
    aiote_set_error("%s failed: %s (%d)", what, cu_error_name(cr), cr);
    if (queued)
        for (size_t k = 0; k < l->nlanes; k++)
            if (used[k])
                stream_drain((void *)(uintptr_t)l->lanes[2 * k]);
    if (prev != ctx)
        cu.ctx_set(prev);
    return -AIOTE_E_CUDA;
}
