/* ImmCounter: counts imm arrivals per value and fires armed thresholds.
 *
 * Counts are kept in units: a whole logical write is 1 << IMM_UNIT_SHIFT
 * units, and a shard of a write striped into 2^s pieces carries s in the
 * imm's top bits and adds 1 << (IMM_UNIT_SHIFT - s).  So a receiver waits
 * for whole writes whatever the sender's NIC count.  Waiters on one imm are
 * served in the order they were armed; a fired waiter consumes its units. */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define IMM_MASK ((1u << AIOTE_IMM_BITS) - 1)

static inline size_t hash32(uint32_t x, size_t n)
{
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x & (n - 1);
}

static inline size_t hash64(uint64_t x, size_t n)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return (size_t)x & (n - 1);
}

int imm_table_init(struct imm_table *t)
{
    memset(t, 0, sizeof *t);
    pthread_mutex_init(&t->lock, NULL);
    t->nbuckets = 1024;
    t->nwbuckets = 256;
    t->buckets = calloc(t->nbuckets, sizeof *t->buckets);
    t->wbuckets = calloc(t->nwbuckets, sizeof *t->wbuckets);
    return t->buckets && t->wbuckets ? 0 : -AIOTE_E_NOMEM;
}

void imm_table_destroy(struct imm_table *t)
{
    for (size_t i = 0; t->buckets && i < t->nbuckets; i++) {
        struct imm_entry *en = t->buckets[i];
        while (en) {
            struct imm_entry *nx = en->hnext;
            free(en);
            en = nx;
        }
    }
    for (size_t i = 0; t->wbuckets && i < t->nwbuckets; i++) {
        struct imm_waiter *w = t->wbuckets[i];
        while (w) {
            struct imm_waiter *nx = w->hnext;
            free(w);
            w = nx;
        }
    }
    free(t->buckets);
    free(t->wbuckets);
    pthread_mutex_destroy(&t->lock);
}

static void grow_entries(struct imm_table *t)
{
    size_t n = t->nbuckets * 2;
    struct imm_entry **b = calloc(n, sizeof *b);
    if (!b)
        return; /* keep the old table: slower, still correct */
    for (size_t i = 0; i < t->nbuckets; i++) {
        struct imm_entry *en = t->buckets[i];
        while (en) {
            struct imm_entry *nx = en->hnext;
            size_t h = hash32(en->imm, n);
            en->hnext = b[h];
            b[h] = en;
            en = nx;
        }
    }
    free(t->buckets);
    t->buckets = b;
    t->nbuckets = n;
}

static struct imm_entry *entry_get(struct imm_table *t, uint32_t imm, bool create)
{
    size_t h = hash32(imm, t->nbuckets);
    for (struct imm_entry *en = t->buckets[h]; en; en = en->hnext)
        if (en->imm == imm)
            return en;
    if (!create)
        return NULL;
    struct imm_entry *en = calloc(1, sizeof *en);
    if (!en)
        return NULL;
    en->imm = imm;
    en->hnext = t->buckets[h];
    t->buckets[h] = en;
    if (++t->nentries > t->nbuckets)
        grow_entries(t);
    return en;
}

/* Drop an entry that holds nothing, so the table tracks only live imms. */
static void entry_maybe_drop(struct imm_table *t, struct imm_entry *en)
{
    if (en->units || en->head)
        return;
    size_t h = hash32(en->imm, t->nbuckets);
    for (struct imm_entry **pp = &t->buckets[h]; *pp; pp = &(*pp)->hnext) {
        if (*pp == en) {
            *pp = en->hnext;
            free(en);
            t->nentries--;
            return;
        }
    }
}

static void waiter_unhash(struct imm_table *t, struct imm_waiter *w)
{
    size_t h = hash64(w->id, t->nwbuckets);
    for (struct imm_waiter **pp = &t->wbuckets[h]; *pp; pp = &(*pp)->hnext) {
        if (*pp == w) {
            *pp = w->hnext;
            t->nwaiters--;
            return;
        }
    }
}

static void grow_waiters(struct imm_table *t)
{
    size_t n = t->nwbuckets * 2;
    struct imm_waiter **b = calloc(n, sizeof *b);
    if (!b)
        return;
    for (size_t i = 0; i < t->nwbuckets; i++) {
        struct imm_waiter *w = t->wbuckets[i];
        while (w) {
            struct imm_waiter *nx = w->hnext;
            size_t h = hash64(w->id, n);
            w->hnext = b[h];
            b[h] = w;
            w = nx;
        }
    }
    free(t->wbuckets);
    t->wbuckets = b;
    t->nwbuckets = n;
}

/* Fire waiters at the head of the FIFO while the count covers them. */
static void entry_fire(struct imm_table *t, struct imm_entry *en, struct event_buf *out)
{
    while (en->head && en->units >= en->head->units) {
        struct imm_waiter *w = en->head;
        en->units -= w->units;
        en->head = w->next;
        if (!en->head)
            en->tail = NULL;
        waiter_unhash(t, w);
        aiote_event ev = {.id = w->id, .kind = AIOTE_EV_IMM};
        event_buf_push(out, &ev);
        free(w);
    }
}

void imm_table_arrive(struct imm_table *t, const uint32_t *wire, size_t n, struct event_buf *out)
{
    pthread_mutex_lock(&t->lock);
    for (size_t i = 0; i < n; i++) {
        uint32_t imm = wire[i] & IMM_MASK;
        uint32_t shard_log = wire[i] >> AIOTE_IMM_SHARD_SHIFT;
        struct imm_entry *en = entry_get(t, imm, true);
        if (!en)
            continue; /* out of memory: the count is lost; nothing better to do */
        en->units += 1ull << (IMM_UNIT_SHIFT - shard_log);
        if (en->head)
            entry_fire(t, en, out);
    }
    pthread_mutex_unlock(&t->lock);
}

int imm_table_wait(struct imm_table *t, uint64_t waiter_id, uint32_t imm, uint64_t count)
{
    if (imm > IMM_MASK || count == 0 || count > (UINT64_MAX >> (IMM_UNIT_SHIFT + 1)))
        return -AIOTE_E_INVAL;
    uint64_t units = count << IMM_UNIT_SHIFT;
    pthread_mutex_lock(&t->lock);
    struct imm_entry *en = entry_get(t, imm, true);
    if (!en) {
        pthread_mutex_unlock(&t->lock);
        return -AIOTE_E_NOMEM;
    }
    if (!en->head && en->units >= units) {
        en->units -= units;
        entry_maybe_drop(t, en);
        pthread_mutex_unlock(&t->lock);
        return 1;
    }
    struct imm_waiter *w = calloc(1, sizeof *w);
    if (!w) {
        entry_maybe_drop(t, en);
        pthread_mutex_unlock(&t->lock);
        return -AIOTE_E_NOMEM;
    }
    w->id = waiter_id;
    w->imm = imm;
    w->units = units;
    if (en->tail)
        en->tail->next = w;
    else
        en->head = w;
    en->tail = w;
    size_t h = hash64(waiter_id, t->nwbuckets);
    w->hnext = t->wbuckets[h];
    t->wbuckets[h] = w;
    if (++t->nwaiters > t->nwbuckets)
        grow_waiters(t);
    pthread_mutex_unlock(&t->lock);
    return 0;
}

int imm_table_cancel(struct imm_table *t, uint64_t waiter_id, struct event_buf *out)
{
    pthread_mutex_lock(&t->lock);
    size_t h = hash64(waiter_id, t->nwbuckets);
    struct imm_waiter *w = t->wbuckets[h];
    while (w && w->id != waiter_id)
        w = w->hnext;
    if (!w) {
        pthread_mutex_unlock(&t->lock);
        return 0;
    }
    waiter_unhash(t, w);
    struct imm_entry *en = entry_get(t, w->imm, false);
    if (en) {
        struct imm_waiter *prev = NULL;
        for (struct imm_waiter *it = en->head; it; prev = it, it = it->next) {
            if (it == w) {
                if (prev)
                    prev->next = w->next;
                else
                    en->head = w->next;
                if (en->tail == w)
                    en->tail = prev;
                break;
            }
        }
        /* the waiter behind it may be satisfiable now */
        entry_fire(t, en, out);
        entry_maybe_drop(t, en);
    }
    free(w);
    pthread_mutex_unlock(&t->lock);
    return 1;
}

int imm_table_restore(struct imm_table *t, uint32_t imm, uint64_t count, struct event_buf *out)
{
    if (imm > IMM_MASK || count > (UINT64_MAX >> (IMM_UNIT_SHIFT + 1)))
        return -AIOTE_E_INVAL;
    pthread_mutex_lock(&t->lock);
    struct imm_entry *en = entry_get(t, imm, true);
    if (!en) {
        pthread_mutex_unlock(&t->lock);
        return -AIOTE_E_NOMEM;
    }
    en->units += count << IMM_UNIT_SHIFT;
    entry_fire(t, en, out);
    entry_maybe_drop(t, en);
    pthread_mutex_unlock(&t->lock);
    return 0;
}

uint64_t imm_table_pending(struct imm_table *t, uint32_t imm)
{
    pthread_mutex_lock(&t->lock);
    struct imm_entry *en = entry_get(t, imm & IMM_MASK, false);
    uint64_t u = en ? en->units : 0;
    pthread_mutex_unlock(&t->lock);
    return u >> IMM_UNIT_SHIFT;
}
