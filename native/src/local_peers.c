/* Engines of this process, for libfabric's shm provider.
 *
 * shm maps a peer that lives in the same process onto that peer's own
 * region, so when one engine closes, another engine of the process that
 * still posts to it (or progresses writes to it) touches unmapped memory and
 * crashes.  Every shm engine registers here; a shm worker holds the read lock
 * while it posts and progresses, a closing shm engine holds the write lock
 * while it marks itself closed and tears its endpoint down, and posts to a
 * same-process peer that closed fail with -FI_ENOTCONN instead. */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>

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
