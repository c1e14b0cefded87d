/* Completion events from the worker to the asyncio loop.
 *
 * The worker collects an iteration's events in a private buffer and moves
 * them into the queue under one lock.  The eventfd is written only when the
 * loop has emptied the queue and is waiting ("armed"), so a busy loop that
 * keeps draining costs no syscall per completion; and never while the loop
 * spins on `avail` instead of sleeping (aiote_loop_spin).  Turning the spin
 * off and checking `avail` (loop) against publishing `avail` and checking
 * `spinning` (here) are both sequentially consistent: either the loop sees
 * the events or this writes the eventfd. */
#define _GNU_SOURCE
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "internal.h"

int event_buf_push(struct event_buf *b, const aiote_event *ev)
{
    if (b->n == b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 256;
        aiote_event *n = realloc(b->ev, cap * sizeof *n);
        if (!n)
            return -AIOTE_E_NOMEM;
        b->ev = n;
        b->cap = cap;
    }
    b->ev[b->n++] = *ev;
    return 0;
}

int event_queue_init(struct event_queue *q)
{
    memset(q, 0, sizeof *q);
    pthread_mutex_init(&q->lock, NULL);
    q->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    q->armed = true;
    atomic_init(&q->avail, 0);
    atomic_init(&q->spinning, false);
    return q->efd >= 0 ? 0 : -AIOTE_E_NOMEM;
}

void event_queue_destroy(struct event_queue *q)
{
    for (size_t i = q->head; i < q->q.n; i++)
        free(q->q.ev[i].data);
    free(q->q.ev);
    if (q->efd >= 0)
        close(q->efd);
    pthread_mutex_destroy(&q->lock);
}

void event_queue_flush(struct event_queue *q, struct event_buf *b)
{
    if (!b->n)
        return;
    atomic_fetch_add_explicit(&q->flushes, 1, memory_order_relaxed);
    bool wake = false;
    pthread_mutex_lock(&q->lock);
    if (q->head == q->q.n) { /* empty: reuse the storage from the start */
        q->q.n = 0;
        q->head = 0;
    }
    if (q->q.n == 0) {
        /* swap buffers instead of copying */
        struct event_buf t = q->q;
        q->q = *b;
        *b = t;
        b->n = 0;
    } else {
        for (size_t i = 0; i < b->n; i++)
            if (event_buf_push(&q->q, &b->ev[i]))
                free(b->ev[i].data); /* out of memory: the event is lost, its buffer freed */
        b->n = 0;
    }
    atomic_store(&q->avail, q->q.n - q->head); /* seq_cst: before the load of spinning */
    if (q->armed && !atomic_load(&q->spinning)) {
        q->armed = false;
        wake = true;
    }
    pthread_mutex_unlock(&q->lock);
    if (wake) {
        uint64_t one = 1;
        ssize_t r = write(q->efd, &one, sizeof one);
        (void)r; /* EAGAIN means the counter is already non-zero: the loop will wake */
    }
}

size_t event_queue_take(struct event_queue *q, aiote_event *out, size_t max)
{
    pthread_mutex_lock(&q->lock);
    size_t avail = q->q.n - q->head;
    size_t n = avail < max ? avail : max;
    if (n)
        memcpy(out, q->q.ev + q->head, n * sizeof *out);
    q->head += n;
    if (q->head == q->q.n) {
        q->head = q->q.n = 0;
        q->armed = true; /* empty: the next flush must wake the loop */
    }
    atomic_store_explicit(&q->avail, q->q.n - q->head, memory_order_release);
    pthread_mutex_unlock(&q->lock);
    return n;
}

void aiote_host_notify(void *efd)
{
    uint64_t one = 1;
    ssize_t r = write((int)(intptr_t)efd, &one, sizeof one);
    (void)r;
}

int aiote_fd_readable(int fd)
{
    struct pollfd f = {.fd = fd, .events = POLLIN};
    int r = poll(&f, 1, 0);
    return r < 0 ? -1 : (r > 0 && (f.revents & (POLLIN | POLLERR | POLLHUP | POLLNVAL)) ? 1 : 0);
}
