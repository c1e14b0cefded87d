/* Engines of this process, for libfabric's shm provider.
 *
 * shm maps a peer that lives in the same process onto that peer's own
 * region, so when one engine closes, another engine of the process that
 * still posts to it (or progresses writes to it) touches unmapped memory and
 * crashes.  Every shm engine registers here; a shm worker holds the read lock
 * while it posts and progresses, a closing shm engine holds the write lock
 * while it marks itself closed and tears its endpoint down, and posts to a
 * same-process peer that closed fail with -FI_ENOTCONN instead.
 *
 * Posts are not all.  libfabric keeps touching a peer's region after our own
 * engine is done with it: answering commands the peer queued, taking its
 * region lock for our own queued work to it, and unmapping it when we remove
 * its address or close.  Once the peer's region is freed, malloc reuses the
 * addresses and any of these corrupts the heap (seen: segfaults in
 * fi_cq_read, pthread_spin_trylock and malloc, test_close_with_work_in_flight
 * about 1 run in 2 under load).  So a closing shm engine (engine.c, then
 * drain_local_inflight in worker.c) first refuses new posts from the other
 * engines, lets both sides finish what is in flight between them, then has
 * every other engine forget its addresses (local_detach) while its regions
 * are still mapped, and only then tears itself down.  If the drain runs out of
 * time (a peer closed or wedged), its libfabric objects are kept — mapped,
 * never progressed — for the life of the process instead. */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>
#include <rdma/fabric.h>
#include <rdma/fi_domain.h>

#include "internal.h"

static pthread_rwlock_t g_lock = PTHREAD_RWLOCK_WRITER_NONRECURSIVE_INITIALIZER_NP;
static pthread_mutex_t g_list_lock = PTHREAD_MUTEX_INITIALIZER;
static struct local_ep *g_list;

struct local_ep *local_register(const uint8_t *addr, size_t len)
{
    struct local_ep *l = calloc(1, sizeof *l);
    if (!l)
        return NULL;
    memcpy(l->addr, addr, len);
    l->len = len;
    atomic_init(&l->open, true);
    l->refs = 1;
    pthread_mutex_lock(&g_list_lock);
    l->next = g_list;
    g_list = l;
    pthread_mutex_unlock(&g_list_lock);
    return l;
}

struct local_ep *local_lookup(const uint8_t *addr, size_t len)
{
    pthread_mutex_lock(&g_list_lock);
    struct local_ep *l = g_list;
    while (l && !(l->len == len && memcmp(l->addr, addr, len) == 0 && atomic_load(&l->open)))
        l = l->next;
    if (l)
        l->refs++;
    pthread_mutex_unlock(&g_list_lock);
    return l;
}

void local_unref(struct local_ep *l)
{
    if (!l)
        return;
    pthread_mutex_lock(&g_list_lock);
    if (--l->refs == 0) {
        for (struct local_ep **pp = &g_list; *pp; pp = &(*pp)->next)
            if (*pp == l) {
                *pp = l->next;
                break;
            }
        free(l);
    }
    pthread_mutex_unlock(&g_list_lock);
}

void local_read_lock(void) { pthread_rwlock_rdlock(&g_lock); }
void local_read_unlock(void) { pthread_rwlock_unlock(&g_lock); }

void local_close_begin(void) { pthread_rwlock_wrlock(&g_lock); }
void local_close_end(void) { pthread_rwlock_unlock(&g_lock); }

/* ---- deferred teardown ------------------------------------------------- */

struct deferred {
    struct deferred *next;
    struct fid **fids;
    size_t nfids, cap_fids;
    struct fi_info *infos[AIOTE_MAX_NICS];
    size_t ninfos;
    void **frees;
    size_t nfrees, cap_frees;
    bool oom; /* an append failed: tear down at once rather than lose track */
};

static uint64_t g_seq;     /* under g_list_lock */
static int g_open;         /* shm engines open, under g_list_lock */
static struct deferred *g_deferred; /* under the write lock */

struct deferred *deferred_new(void) { return calloc(1, sizeof(struct deferred)); }

static bool grow(void ***arr, size_t *cap, size_t n)
{
    if (n < *cap)
        return true;
    size_t nc = *cap ? *cap * 2 : 16;
    void **na = realloc(*arr, nc * sizeof **arr);
    if (!na)
        return false;
    *arr = na;
    *cap = nc;
    return true;
}

void deferred_fid(struct deferred *d, struct fid *f)
{
    if (!f)
        return;
    if (!grow((void ***)&d->fids, &d->cap_fids, d->nfids)) {
        d->oom = true;
        fi_close(f); /* can't keep it: close it now (the old behaviour) */
        return;
    }
    d->fids[d->nfids++] = f;
}

void deferred_info(struct deferred *d, struct fi_info *fi)
{
    if (fi && d->ninfos < AIOTE_MAX_NICS)
        d->infos[d->ninfos++] = fi;
    else if (fi)
        fi_freeinfo(fi);
}

void deferred_free(struct deferred *d, void *p)
{
    if (!p)
        return;
    if (!grow(&d->frees, &d->cap_frees, d->nfrees)) {
        d->oom = true;
        free(p);
        return;
    }
    d->frees[d->nfrees++] = p;
}

static void teardown(struct deferred *d)
{
    for (size_t i = 0; i < d->nfids; i++)
        fi_close(d->fids[i]);
    for (size_t i = 0; i < d->ninfos; i++)
        fi_freeinfo(d->infos[i]);
    for (size_t i = 0; i < d->nfrees; i++)
        free(d->frees[i]);
    free(d->fids);
    free(d->frees);
    free(d);
}

/* open shm engines, under g_list_lock */
static aiote_engine **g_engines;
static size_t g_nengines, g_cap_engines;

uint64_t local_engine_opened(aiote_engine *e)
{
    pthread_mutex_lock(&g_list_lock);
    uint64_t s = ++g_seq;
    g_open++;
    if (grow((void ***)&g_engines, &g_cap_engines, g_nengines))
        g_engines[g_nengines++] = e; /* else: not seen by local_others_inflight_to (best effort) */
    pthread_mutex_unlock(&g_list_lock);
    return s;
}

static bool is_ours(const aiote_engine *x, const struct local_ep *l)
{
    for (uint32_t k = 0; l && k < x->nnics; k++)
        if (x->nics[k].local == l)
            return true;
    return false;
}

bool local_others_inflight_to(aiote_engine *x)
{
    bool hit = false;
    pthread_mutex_lock(&g_list_lock);
    for (size_t i = 0; i < g_nengines && !hit; i++) {
        aiote_engine *e = g_engines[i];
        if (e == x)
            continue;
        pthread_mutex_lock(&e->peer_lock);
        for (uint32_t k = 0; k < e->nnics && !hit; k++) {
            struct nic *n = &e->nics[k];
            for (size_t c = 0; n->tx_ctxs && c < n->ntx && !hit; c++) {
                struct tx_ctx *t = &n->tx_ctxs[c];
                if (!t->op || t->peer >= e->npeers)
                    continue;
                struct peer *p = e->peers[t->peer];
                for (uint32_t j = 0; j < p->nnics; j++)
                    if (is_ours(x, p->local[j]))
                        hit = true;
            }
        }
        pthread_mutex_unlock(&e->peer_lock);
    }
    pthread_mutex_unlock(&g_list_lock);
    return hit;
}


/* Under the write lock, x drained: the other engines forget x's addresses while
 * x's regions are still mapped (libfabric unmaps a peer on fi_av_remove and when
 * the remover closes; done after x's teardown, that touched freed memory). */
void local_detach(aiote_engine *x)
{
    pthread_mutex_lock(&g_list_lock);
    for (size_t i = 0; i < g_nengines; i++) {
        aiote_engine *e = g_engines[i];
        if (e == x)
            continue;
        pthread_mutex_lock(&e->peer_lock);
        for (size_t q = 0; q < e->npeers; q++) {
            struct peer *p = e->peers[q];
            for (uint32_t j = 0; j < p->nnics; j++) {
                if (!is_ours(x, p->local[j]))
                    continue;
                for (uint32_t k = 0; k < e->nnics; k++) {
                    if (e->nics[k].av && p->fi[k][j] != FI_ADDR_NOTAVAIL)
                        fi_av_remove(e->nics[k].av, &p->fi[k][j], 1, 0);
                    p->fi[k][j] = FI_ADDR_NOTAVAIL;
                }
            }
        }
        pthread_mutex_unlock(&e->peer_lock);
    }
    pthread_mutex_unlock(&g_list_lock);
}

void local_engine_closed(aiote_engine *e, uint64_t open_seq, struct deferred *d)
{
    pthread_mutex_lock(&g_list_lock);
    g_open--;
    for (size_t i = 0; i < g_nengines; i++)
        if (g_engines[i] == e) {
            g_engines[i] = g_engines[--g_nengines];
            break;
        }
    pthread_mutex_unlock(&g_list_lock);
    (void)open_seq;
    if (!d || d->oom) { /* NULL: its objects are closed already */
        if (d)
            teardown(d);
        return;
    }
    /* Kept, mapped and never progressed, for the life of the process: engines
     * of this process may still hold work addressed to it (the drain ran out),
     * and closing it later would have its endpoints touch theirs in turn. */
    d->next = g_deferred;
    g_deferred = d;
}
