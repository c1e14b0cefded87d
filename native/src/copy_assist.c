/* Copy assistants: one large direct copy, several threads.
 *
 * One thread's process_vm_writev moves 11-13 GB/s on the dev VM into 4 KiB
 * target pages whatever the size (~25 GB/s into huge pages: the kernel pins and
 * copies page by page); two threads copying halves of the same range move
 * 1.3-1.9x that (benchmarks.md, "Copy assistants").
 * So a run of at least 512 KiB (2 MiB on hosts of fewer than 8 CPUs: on two
 * cores the event loop, an assistant and the peers' workers share them, and
 * a 1 MiB write measured no faster assisted) is cut into chunks: the thread
 * that does the copy (the caller, or a copy thread) takes chunks from the
 * front, and idle assistant threads of the engine take chunks from the back,
 * all from one claim word.  An assistant that wakes late (or never) costs
 * nothing but the post: the caller simply takes every chunk itself.
 *
 * The caller still owns the copy: it holds the target slot (direct.c's
 * hold/generation protocol) from before the first chunk until every
 * assistant has let go of the job, so deregistration waits for the
 * assistants' chunks as it waits for the caller's own.  The result is the
 * contiguous prefix of the range that landed, as a serial copy reports it:
 * a chunk that failed, or one never copied because a failure stopped the
 * claiming, ends the prefix; bytes of later chunks may have landed, as the
 * rest of a failed libfabric batch may have.
 *
 * Assistants spin (with sched_yield) for a short while after a job, so the
 * next large write of a stream finds them awake, then sleep on a futex. */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define AS_CHUNK (256u << 10)   /* bytes per chunk (at least) */
#define AS_MIN (512u << 10)     /* the smallest run shared, on hosts of AS_MIN_CPUS or more */
#define AS_MIN_FEW (2u << 20)   /* ... on smaller hosts */
#define AS_MIN_CPUS 8
#define AS_MAX_CHUNKS 256u
#define AS_IOV 1024             /* IOV_MAX: a run has at most this many iovecs a side */
#define AS_SPIN_NS 200000ull    /* an assistant stays awake this long after a job */
#define AS_WAKE_MIN (2u << 20)  /* a sleeping assistant is woken only for runs this large, */
#define AS_STREAM_NS 1000000ull /* or when the previous large run began less than this before */
#define AS_LATE_NS 100000ull    /* a wait this much longer than a chunk's copy: the assistant was preempted */

struct as_job {
    aiote_engine *e;
    int pid;
    const struct iovec *liov, *riov;
    size_t nl, nr;
    uint64_t lpre[AS_IOV + 1], rpre[AS_IOV + 1]; /* byte offset where each iovec starts */
    uint64_t total, chunk;
    uint32_t nch;
    _Atomic uint64_t claim;      /* front << 32 | back: chunks [front, back) not taken yet */
    uint64_t done[AS_MAX_CHUNKS]; /* bytes landed of each chunk taken (its copier writes it) */
    int err[AS_MAX_CHUNKS];       /* its errno, 0: whole */
    uint8_t taken[AS_MAX_CHUNKS];
    struct iovec lo[AS_IOV], ro[AS_IOV]; /* the caller's chunk iovecs */
};

struct as_thread {
    _Atomic uintptr_t slot;   /* 0: free; a job: posted; job | 1: taken by this assistant */
    _Atomic uint32_t sleeping; /* futex word: 1 while it sleeps (or is about to) */
    struct iovec lo[AS_IOV], ro[AS_IOV];
    aiote_engine *e;
    pthread_t thread;
    bool started;
};

struct assist {
    uint32_t n;
    uint64_t min; /* the smallest run shared (AS_MIN or AS_MIN_FEW) */
    _Atomic bool stop;
    struct as_thread *t;
    /* backoff: a caller that had to wait long for an assistant's chunk (the assistant was
     * not on a CPU: the machine is oversubscribed) copies the next `skip` runs alone,
     * twice as many after each such wait in a row */
    _Atomic uint32_t skip, backoff;
    _Atomic uint64_t last_ns; /* when the last large run began: a stream is worth waking for */
};

/* Tests only (aiote_direct_assist_test): the caller leaves every chunk to the
 * assistants; assistants stop after each chunk while `hold` is set. */
static _Atomic int t_only, t_hold, t_held;

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void iov_skip(struct iovec *v, size_t n, size_t *idx, uint64_t adv)
{
    while (adv && *idx < n) {
        if (adv >= v[*idx].iov_len) {
            adv -= v[*idx].iov_len;
            v[*idx].iov_len = 0;
            (*idx)++;
        } else {
            v[*idx].iov_base = (uint8_t *)v[*idx].iov_base + adv;
            v[*idx].iov_len -= adv;
            adv = 0;
        }
    }
    while (*idx < n && v[*idx].iov_len == 0)
        (*idx)++;
}

/* Copy the iovecs (modified: advanced as bytes land).  Returns the bytes that
 * landed; *err: 0, or the errno that stopped it (a zero-byte return is EFAULT). */
static uint64_t copy_serial(aiote_engine *e, int pid, struct iovec *l, size_t nl, struct iovec *r, size_t nr,
                            uint64_t len, int *err)
{
    size_t li = 0, ri = 0;
    uint64_t done = 0;
    *err = 0;
    while (done < len) {
        ssize_t k = process_vm_writev(pid, l + li, (unsigned long)(nl - li), r + ri, (unsigned long)(nr - ri), 0);
        __atomic_fetch_add(&e->stats.direct_syscalls, 1, __ATOMIC_RELAXED);
        if (k <= 0) {
            int x = k < 0 ? errno : EFAULT;
            if (x == EINTR)
                continue;
            *err = x;
            break;
        }
        done += (uint64_t)k;
        iov_skip(l, nl, &li, (uint64_t)k);
        iov_skip(r, nr, &ri, (uint64_t)k);
    }
    return done;
}

/* The iovecs covering bytes [off, off + len) of v (pre: where each starts). */
static size_t iov_slice(const struct iovec *v, const uint64_t *pre, size_t n, uint64_t off, uint64_t len,
                        struct iovec *out)
{
    size_t lo = 0, hi = n; /* the last iovec starting at or before off */
    while (hi - lo > 1) {
        size_t mid = lo + (hi - lo) / 2;
        if (pre[mid] <= off)
            lo = mid;
        else
            hi = mid;
    }
    size_t k = 0;
    uint64_t skip = off - pre[lo];
    for (size_t i = lo; i < n && len; i++) {
        uint64_t take = v[i].iov_len - skip;
        if (take > len)
            take = len;
        out[k++] = (struct iovec){(uint8_t *)v[i].iov_base + skip, take};
        len -= take;
        skip = 0;
    }
    return k;
}

static int claim(struct as_job *j, bool front)
{
    uint64_t c = atomic_load(&j->claim);
    for (;;) {
        uint32_t f = (uint32_t)(c >> 32), b = (uint32_t)c;
        if (f >= b)
            return -1;
        uint64_t nc = front ? ((uint64_t)(f + 1) << 32 | b) : ((uint64_t)f << 32 | (b - 1));
        if (atomic_compare_exchange_weak(&j->claim, &c, nc))
            return (int)(front ? f : b - 1);
    }
}

/* Take chunks (from the front or the back) until none is left or one fails. */
static uint32_t run_chunks(struct as_job *j, bool front, struct iovec *lo, struct iovec *ro)
{
    uint32_t copied = 0;
    int c;
    while ((c = claim(j, front)) >= 0) {
        uint64_t off = (uint64_t)c * j->chunk;
        uint64_t len = j->total - off < j->chunk ? j->total - off : j->chunk;
        size_t nl = iov_slice(j->liov, j->lpre, j->nl, off, len, lo);
        size_t nr = iov_slice(j->riov, j->rpre, j->nr, off, len, ro);
        int err;
        j->done[c] = copy_serial(j->e, j->pid, lo, nl, ro, nr, len, &err);
        j->err[c] = err;
        j->taken[c] = 1;
        copied++;
        if (err) {
            atomic_store(&j->claim, 0); /* stop everyone: the prefix ends here anyway */
            break;
        }
        if (!front && atomic_load(&t_hold)) { /* tests: held between chunks until released or closing */
            atomic_fetch_add(&t_held, 1);
            while (atomic_load(&t_hold) && !atomic_load(&j->e->stopping))
                sched_yield();
            atomic_fetch_sub(&t_held, 1);
        }
    }
    return copied;
}

static void *assist_main(void *arg)
{
    struct as_thread *t = arg;
    struct assist *a = t->e->assist;
    uint64_t last = mono_ns();
    for (;;) {
        uintptr_t s = atomic_load(&t->slot);
        if (s && !(s & 1) && atomic_compare_exchange_strong(&t->slot, &s, s | 1)) {
            uint32_t n = run_chunks((struct as_job *)s, false, t->lo, t->ro);
            __atomic_fetch_add(&t->e->stats.direct_assisted, n, __ATOMIC_RELAXED);
            atomic_store(&t->slot, 0); /* release: the job's results are written; the caller may go */
            last = mono_ns();
            continue;
        }
        if (atomic_load(&a->stop))
            break;
        if (mono_ns() - last < AS_SPIN_NS) {
            sched_yield();
            continue;
        }
        atomic_store(&t->sleeping, 1); /* seq_cst, then the slot: Dekker with the poster */
        if (!atomic_load(&t->slot) && !atomic_load(&a->stop))
            syscall(SYS_futex, &t->sleeping, FUTEX_WAIT_PRIVATE, 1, NULL, NULL, 0);
        atomic_store(&t->sleeping, 0);
        last = mono_ns();
    }
    return NULL;
}

static struct assist *assist_start(aiote_engine *e)
{
    pthread_mutex_lock(&e->dcp_lock);
    struct assist *a = e->assist;
    if (a || e->assist_off || atomic_load(&e->stopping)) {
        pthread_mutex_unlock(&e->dcp_lock);
        return a;
    }
    uint32_t n = e->cfg.direct_assist > 0 ? (uint32_t)e->cfg.direct_assist : 1;
    if (n > 15)
        n = 15;
    a = calloc(1, sizeof *a);
    if (a)
        a->t = calloc(n, sizeof *a->t);
    if (!a || !a->t) {
        if (a)
            free(a->t);
        free(a);
        e->assist_off = true;
        pthread_mutex_unlock(&e->dcp_lock);
        return NULL;
    }
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    a->min = cpus >= AS_MIN_CPUS ? AS_MIN : AS_MIN_FEW;
    __atomic_store_n(&e->assist, a, __ATOMIC_RELEASE); /* before the threads start: they read it */
    for (uint32_t i = 0; i < n; i++) {
        a->t[i].e = e;
        if (pthread_create(&a->t[i].thread, NULL, assist_main, &a->t[i]) != 0)
            break;
        pthread_setname_np(a->t[i].thread, "aiote-assist");
        a->t[i].started = true;
        a->n++;
    }
    if (!a->n)
        e->assist_off = true; /* copies stay serial */
    pthread_mutex_unlock(&e->dcp_lock);
    return a;
}

uint64_t assist_copy(aiote_engine *e, int pid, struct iovec *liov, size_t nl, struct iovec *riov, size_t nr,
                     uint64_t total, int *err)
{
    struct assist *a = __atomic_load_n(&e->assist, __ATOMIC_ACQUIRE);
    bool test_only = atomic_load(&t_only);
    if (total < AS_MIN || e->cfg.direct_assist < 0 || nl > AS_IOV || nr > AS_IOV || atomic_load(&e->stopping) ||
        (a && total < a->min && !test_only))
        return copy_serial(e, pid, liov, nl, riov, nr, total, err);
    if (!a)
        a = assist_start(e);
    if (!a || !a->n || atomic_load(&a->stop) || (total < a->min && !test_only))
        return copy_serial(e, pid, liov, nl, riov, nr, total, err);
    uint32_t sk = atomic_load_explicit(&a->skip, memory_order_relaxed);
    if (sk && !test_only) { /* backing off (approximate under concurrent callers: that is fine) */
        atomic_store_explicit(&a->skip, sk - 1, memory_order_relaxed);
        return copy_serial(e, pid, liov, nl, riov, nr, total, err);
    }
    struct as_job *j = malloc(sizeof *j);
    if (!j)
        return copy_serial(e, pid, liov, nl, riov, nr, total, err);
    j->e = e;
    j->pid = pid;
    j->liov = liov;
    j->riov = riov;
    j->nl = nl;
    j->nr = nr;
    j->lpre[0] = j->rpre[0] = 0;
    for (size_t i = 0; i < nl; i++)
        j->lpre[i + 1] = j->lpre[i] + liov[i].iov_len;
    for (size_t i = 0; i < nr; i++)
        j->rpre[i + 1] = j->rpre[i] + riov[i].iov_len;
    j->total = total;
    uint64_t chunk = (total + AS_MAX_CHUNKS - 1) / AS_MAX_CHUNKS;
    chunk = (chunk + 4095) & ~4095ull; /* page-aligned cuts: a page is pinned by one thread */
    j->chunk = chunk < AS_CHUNK ? AS_CHUNK : chunk;
    j->nch = (uint32_t)((total + j->chunk - 1) / j->chunk);
    memset(j->taken, 0, j->nch);
    atomic_store(&j->claim, (uint64_t)j->nch);
    /* post to every idle assistant; a busy one (another caller's job) is skipped */
    uint64_t t0 = mono_ns();
    uint64_t prev = atomic_exchange(&a->last_ns, t0);
    bool wake = total >= AS_WAKE_MIN || test_only || t0 - prev < AS_STREAM_NS;
    uint32_t posted = 0;
    bool mine[15] = {false};
    for (uint32_t i = 0; i < a->n; i++) {
        struct as_thread *t = &a->t[i];
        uintptr_t z = 0;
        if (!wake && atomic_load(&t->sleeping))
            continue; /* a lone smaller run is not worth a futex wake and a late start */
        if (atomic_compare_exchange_strong(&t->slot, &z, (uintptr_t)j)) {
            mine[i] = true;
            posted++;
            if (atomic_exchange(&t->sleeping, 0))
                syscall(SYS_futex, &t->sleeping, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
        }
    }
    if (test_only && posted) { /* tests: wait until an assistant took the job */
        for (bool taken = false; !taken && !atomic_load(&a->stop) && !atomic_load(&e->stopping);) {
            for (uint32_t i = 0; i < a->n && !taken; i++)
                taken = mine[i] && atomic_load(&a->t[i].slot) != (uintptr_t)j;
            if (!taken)
                sched_yield();
        }
        for (uint32_t i = 0; i < a->n; i++) /* ... and is done with it */
            while (mine[i] && atomic_load(&a->t[i].slot) == ((uintptr_t)j | 1))
                sched_yield();
    }
    run_chunks(j, true, j->lo, j->ro);
    /* withdraw the job from assistants that never took it; wait for those that did */
    uint64_t w0 = 0;
    for (uint32_t i = 0; posted && i < a->n; i++) {
        if (!mine[i])
            continue;
        struct as_thread *t = &a->t[i];
        uintptr_t want = (uintptr_t)j;
        if (atomic_compare_exchange_strong(&t->slot, &want, 0))
            continue;
        if (atomic_load(&t->slot) == ((uintptr_t)j | 1) && !w0)
            w0 = mono_ns();
        while (atomic_load(&t->slot) == ((uintptr_t)j | 1))
            sched_yield();
    }
    if (posted && !test_only) {
        /* a chunk copies at >= 4 GB/s (ns = bytes / 4) when its thread is on a CPU */
        bool late = w0 && mono_ns() - w0 > AS_LATE_NS + j->chunk / 4;
        uint32_t b = atomic_load_explicit(&a->backoff, memory_order_relaxed);
        b = late ? (b ? (b < 512 ? 2 * b : 1024) : 4) : 0;
        atomic_store_explicit(&a->backoff, b, memory_order_relaxed);
        if (late) {
            atomic_store_explicit(&a->skip, b, memory_order_relaxed);
            __atomic_fetch_add(&e->stats.direct_assist_late, 1, __ATOMIC_RELAXED);
        }
    }
    /* the contiguous prefix that landed */
    uint64_t done = 0;
    *err = 0;
    for (uint32_t c = 0; c < j->nch; c++) {
        if (!j->taken[c]) { /* never copied: a failure further on stopped the claiming */
            for (uint32_t d = c + 1; d < j->nch; d++)
                if (j->taken[d] && j->err[d]) {
                    *err = j->err[d];
                    break;
                }
            if (!*err)
                *err = EFAULT;
            break;
        }
        done += j->done[c];
        if (j->err[c]) {
            *err = j->err[c];
            break;
        }
    }
    free(j);
    return done;
}

void assist_stop(aiote_engine *e)
{
    pthread_mutex_lock(&e->dcp_lock);
    struct assist *a = e->assist;
    e->assist_off = true; /* none is started after this */
    pthread_mutex_unlock(&e->dcp_lock);
    if (!a || atomic_exchange(&a->stop, true))
        return;
    for (uint32_t i = 0; i < a->n; i++) {
        atomic_store(&a->t[i].sleeping, 0);
        syscall(SYS_futex, &a->t[i].sleeping, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
    }
    for (uint32_t i = 0; i < a->n; i++)
        pthread_join(a->t[i].thread, NULL);
    /* the struct stays until assist_free: a late caller finds it stopped */
}

void assist_free(aiote_engine *e)
{
    struct assist *a = e->assist;
    if (!a)
        return;
    e->assist = NULL;
    free(a->t);
    free(a);
}

int aiote_direct_assist_test(aiote_engine *e, int only_assistants, int hold)
{
    (void)e;
    atomic_store(&t_only, only_assistants ? 1 : 0);
    atomic_store(&t_hold, hold ? 1 : 0);
    return 0;
}

int aiote_direct_assist_wait_held(aiote_engine *e, uint32_t timeout_ms)
{
    (void)e;
    struct timespec nap = {0, 1000000L};
    for (uint32_t waited = 0; !atomic_load(&t_held); waited++) {
        if (waited >= timeout_ms)
            return 0;
        nanosleep(&nap, NULL);
    }
    return 1;
}
