/* The direct same-host path for shm peers: the initiator copies the bytes
 * itself with process_vm_writev into the target's registered memory.
 *
 * libfabric shm moves bytes the same way (CMA: process_vm_readv/writev), but
 * its delivery-complete write needs the *target's* worker to progress before
 * the initiator hears of it, so a small write costs several thread wake-ups
 * on each side.  Here the calling thread does the copy (cffi releases the
 * GIL), and a write is complete when the syscall returns: the bytes are in
 * the target's memory.  Imms follow after the bytes are in place, so the
 * receiver counts them only once they are there: (imm, count) goes into the
 * initiator's ring in the target's key table (below), and the target's
 * worker, if it sleeps, is woken through its submission eventfd (a copy of
 * it got with pidfd_getfd, which needs the same ptrace access as CMA).  The
 * target's worker takes each published entry once (its tail is its own) and
 * adds it to its ImmCounter.  Where the ring is full or no eventfd could be
 * had, the imms go as one small control message per target instead
 * (OP_IMMS through the worker and libfabric).
 *
 * Safety: libfabric refuses writes with a stale key; so must we.  The target
 * engine publishes its registered regions in a POSIX shm segment, the key
 * table (name derived from its shm address; mode 0600, same user as CMA
 * needs anyway):
 *
 *   slot i (= the region's index in the engine): state = gen << 1 | valid,
 *   key (NIC 0's), base, len.  Written only by the target.
 *   lanes: one per initiator engine, claimed by CAS on owner (pid and
 *   process start time); held[k] = slot + 1 while that initiator copies into
 *   the slot.
 *
 * Initiator, per copy:  CAS held[k] 0 -> slot+1 (seq_cst); load state
 *   (seq_cst); proceed only if it equals the generation the descriptor was
 *   resolved to and key/base/len match the descriptor; copy; store held[k] 0.
 * Target, deregistration:  store state = invalid (seq_cst); then wait until
 *   no lane holds slot+1.
 * Both sides use sequentially consistent operations (Dekker): either the
 *   initiator's load sees the invalidation (no copy), or the target's scan
 *   sees the initiator's hold and waits for the copy to end.  Hence no byte
 *   lands in a region after aiote_mr_deregister has returned, and a slot is
 *   reused (new generation, new random key) only after every copy into its
 *   old generation ended.
 * Dead initiator: a lane whose owner process exited (pidfd readable, pid
 *   gone, or start time changed: pid reused) cannot copy any more: its holds
 *   are dropped.  A *stopped* initiator (SIGSTOP) might stop between the
 *   check and the syscall, so its hold is honoured: deregistration waits up
 *   to peer_timeout, then fails with AIOTE_E_BUSY (the slot stays invalid, so
 *   no new copy starts; a later close retries).
 * Dead target: before each copy the initiator checks that the target is
 *   alive, and process_vm_writev fails with ESRCH once it is gone (a zombie
 *   has no mm either: PeerUnreachable).  The check must hold before the pid
 *   can name another process.  Fast and exact: the liveness word (below)
 *   still holds the tid of the target's worker thread.  Otherwise (the word
 *   not published yet, the worker gone, an older target) the initiator polls
 *   a pidfd of the target, a syscall.  A pid reused between the check and the
 *   syscall is the residual window, the same one libfabric shm's own CMA
 *   copies have (and it needs the target reaped and the pid space cycled
 *   within that window).
 * Liveness word: `alive` in the header is a process-shared *robust* mutex
 *   that the target's worker thread locks when it starts and unlocks when it
 *   stops; `alive_tid` says which tid holds it.  When that thread exits in any
 *   way (SIGKILL included) the kernel rewrites the word (FUTEX_OWNER_DIED, tid
 *   cleared: the robust-futex list, walked in exit_mm) before the thread, hence
 *   the process, has finished exiting: before the pidfd turns readable, before
 *   the process can be reaped, before its pid can be reused.  So "word ==
 *   alive_tid" is at least as strong as "pidfd not readable", for one load of
 *   shared memory instead of a syscall.  The word is glibc's mutex __lock (the
 *   target checks it holds its tid before publishing alive_tid; where it
 *   doesn't, alive_tid stays 0 and initiators poll the pidfd).
 * Anything unusual (no table: the target turned the path off or runs an older
 *   aiote; EPERM: CMA not allowed; a full lane table; GPU memory) falls back
 *   to libfabric before any byte is copied.
 * Inline writes (small ones, below): instead of the syscall the initiator
 *   copies the payload into its lane's inline ring in the table and the
 *   *target* applies it under its progress lock (checks against its own
 *   slots, a hold of its own, memcpy, then the imm), then acknowledges; the
 *   write completes on the acknowledgement.  Only to a target that is polling
 *   (its worker not asleep): the syscall needs nothing of the target, inline
 *   needs it on a CPU.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define DT_MAGIC 0x3174626c746b6961ull /* "aiktlbt1" */
#define DT_VERSION 2u /* 2: inline rings */
#define DT_SLOTS 8192u
#define DT_LANES 64u
#define DT_HELD 8u
#define DT_IOV 1024 /* IOV_MAX */
#define DT_RING 1024u /* imm entries per lane */
/* dt_header.sleeping: 0 awake; WAKE: wake me for anything; LAZY: nobody waits
 * for imms here, so imm entries need not wake me (inline entries still do).
 * An initiator of an older aiote wakes on any non-zero value. */
#define DT_SLEEP_WAKE 1u
#define DT_SLEEP_LAZY 2u
#define DT_LAZY_MIN_BYTES 4096u /* ops smaller than this wake even a lazy target */
#define DT_ICELL 64u     /* inline ring: entries are whole cells (header cell + payload) */
#define DT_ICELLS 1024u  /* cells per lane (64 KiB) */

struct dt_slot {
    _Atomic uint64_t state; /* gen << 1 | valid */
    uint64_t key, base, len;
    uint64_t _pad[4];
};

struct dt_lane {
    _Atomic uint64_t owner; /* pid << 42 | (start time & (2^42 - 1)); 0: free */
    _Atomic uint32_t held[DT_HELD];
    uint64_t _pad[3];
    _Atomic uint64_t head; /* imm ring: written by the initiator (published entries) */
    uint64_t _pad2[7];
    _Atomic uint64_t tail; /* taken by the target */
    uint64_t _pad3[7];
    uint64_t ring[DT_RING]; /* count << 32 | imm */
};

struct dt_header {
    uint64_t magic;
    uint32_t version, nslots, nlanes, pid;
    uint64_t starttime;
    _Atomic uint32_t closed;
    _Atomic uint32_t overflow; /* a region could not be published (index >= nslots) */
    _Atomic uint32_t high;     /* slots in use are below this */
    _Atomic uint32_t sleeping; /* the target's worker sleeps (or is about to): wake it (DT_SLEEP_*) */
    _Atomic uint32_t imm_pending; /* an initiator published imms since the target last looked */
    int32_t efd;               /* the target's submission eventfd (its number there) */
    uint32_t addr_len;
    uint8_t addr[AIOTE_ADDR_MAX];
    /* the liveness word (see the top of this file); zero in a table of an older
     * aiote, which makes its initiators poll the pidfd */
    _Alignas(64) pthread_mutex_t alive;
    _Atomic uint32_t alive_tid; /* tid of the worker holding `alive`; 0: not held */
    _Atomic uint32_t self_held; /* slot + 1 while the target itself copies an inline entry into it */
};

/* Inline ring of one lane: small writes carried in shared memory.  The
 * initiator writes whole entries, then publishes `head` (cells, release);
 * the target applies them in order, writes each entry's status into it and
 * publishes `done` (release) once bytes and imms are in place. */
struct dt_ient {
    uint32_t ncells; /* cells of this entry, header included */
    uint32_t kind;   /* DT_IK_DATA / DT_IK_PAD */
    uint32_t slot, len;
    uint64_t state, key, off;
    uint32_t imm, has_imm;
    int32_t status; /* written by the target: 0 or -AIOTE_E_* / DT_IST_* */
    uint32_t _r[3];
};
_Static_assert(sizeof(struct dt_ient) == DT_ICELL, "inline header is one cell");
#define DT_IK_DATA 1u
#define DT_IK_PAD 2u
#define DT_IST_PENDING 1      /* not applied yet (the initiator's mark) */
#define DT_IST_STALE (-1000)  /* key/generation/slot mismatch: the region is closed or the key stale */

struct dt_iring {
    _Atomic uint64_t head; /* cells published by the initiator */
    uint64_t _pad[7];
    _Atomic uint64_t done; /* cells applied by the target (statuses written) */
    uint64_t _pad2[7];
    uint8_t cells[DT_ICELLS * DT_ICELL];
};

#define DT_HDR_SIZE 4096u
#define DT_IR_OFF (DT_HDR_SIZE + DT_LANES * sizeof(struct dt_lane) + DT_SLOTS * sizeof(struct dt_slot))
#define DT_SIZE (DT_IR_OFF + DT_LANES * sizeof(struct dt_iring))

struct dtable {
    uint8_t *map;
    struct dt_header *h;
    struct dt_lane *lanes;
    struct dt_slot *slots;
    struct dt_iring *irings;
    char name[96];
    bool alive_ok;   /* target side: `alive` initialised */
    bool alive_held; /* target side: the worker holds it */
};

/* An initiator's view of one target engine (stable until the engine is freed). */
struct dpeer {
    struct dtable t;
    int pid;
    int pidfd;
    int lane;
    int efd; /* the target's eventfd (pidfd_getfd), -1: imms go as messages */
    pthread_mutex_t push_lock; /* our threads share our lane's ring */
    atomic_bool ibusy;         /* one inline batch at a time in our lane's inline ring (until acked) */
    atomic_bool off; /* fall back to libfabric (EPERM, gone, closed) */
    atomic_bool dead; /* its process exited: fail at once here (PeerUnreachable), never hand
                       * work for it to libfabric (shm would try to connect to a dead peer) */
};

_Static_assert(sizeof(struct dt_header) <= DT_HDR_SIZE, "key table header too large");

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

/* Field 22 of /proc/PID/stat (start time in clock ticks), 0 if unreadable. */
static uint64_t proc_starttime(int pid)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = 0;
    char *p = strrchr(buf, ')'); /* the command name may hold spaces and parentheses */
    if (!p)
        return 0;
    p++;
    /* after ")": field 3 (state) ... field 22 */
    for (int field = 3; field < 22; field++) {
        p = strchr(p + 1, ' ');
        if (!p)
            return 0;
    }
    return strtoull(p + 1, NULL, 10);
}

static uint64_t owner_word(int pid, uint64_t st) { return ((uint64_t)pid << 42) | (st & ((1ull << 42) - 1)); }

static int pidfd_open_(int pid)
{
#ifdef SYS_pidfd_open
    return (int)syscall(SYS_pidfd_open, pid, 0);
#else
    errno = ENOSYS;
    return -1;
#endif
}

/* Is the process named by an owner word gone for good (or a different one now)? */
static bool owner_dead(uint64_t owner)
{
    int pid = (int)(owner >> 42);
    if (pid == getpid())
        return false;
    int fd = pidfd_open_(pid);
    if (fd < 0)
        return errno == ESRCH;
    bool dead = false;
    uint64_t st = proc_starttime(pid);
    if (st == 0 || (st & ((1ull << 42) - 1)) != (owner & ((1ull << 42) - 1))) {
        dead = true; /* exited, and the pid may belong to another process now */
    } else {
        struct pollfd f = {.fd = fd, .events = POLLIN};
        dead = poll(&f, 1, 0) > 0; /* readable once every thread has exited */
    }
    close(fd);
    return dead;
}

static uint64_t fnv64(const uint8_t *b, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 1099511628211ull;
    return h;
}

/* "/<pid>:aiote_kt_<hash>": under the "<pid>:" prefix of shm's own files, so
 * whoever cleans a dead process's files there removes it too. */
static void table_name(char *out, size_t cap, int pid, const uint8_t *addr, size_t len)
{
    snprintf(out, cap, "/%d:aiote_kt_%016llx", pid, (unsigned long long)fnv64(addr, len));
}

static void table_map(struct dtable *t, uint8_t *map)
{
    t->map = map;
    t->h = (struct dt_header *)map;
    t->lanes = (struct dt_lane *)(map + DT_HDR_SIZE);
    t->slots = (struct dt_slot *)(map + DT_HDR_SIZE + DT_LANES * sizeof(struct dt_lane));
    t->irings = (struct dt_iring *)(map + DT_IR_OFF);
}

/* ---- target side ------------------------------------------------------ */

int direct_table_open(aiote_engine *e)
{
    struct nic *n0 = &e->nics[0];
    struct dtable *t = calloc(1, sizeof *t);
    if (!t)
        return -AIOTE_E_NOMEM;
    table_name(t->name, sizeof t->name, getpid(), n0->addr, n0->addr_len);
    shm_unlink(t->name); /* a dead process's file under a reused pid */
    int fd = shm_open(t->name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) {
        free(t);
        return 0; /* no direct path to us: peers use libfabric */
    }
    if (ftruncate(fd, DT_SIZE) != 0) {
        close(fd);
        shm_unlink(t->name);
        free(t);
        return 0;
    }
    void *m = mmap(NULL, DT_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (m == MAP_FAILED) {
        shm_unlink(t->name);
        free(t);
        return 0;
    }
    table_map(t, m);
    struct dt_header *h = t->h;
    h->version = DT_VERSION;
    h->nslots = DT_SLOTS;
    h->nlanes = DT_LANES;
    h->pid = (uint32_t)getpid();
    h->starttime = proc_starttime(getpid());
    h->addr_len = (uint32_t)n0->addr_len;
    memcpy(h->addr, n0->addr, n0->addr_len);
    h->efd = e->sub_efd;
    pthread_mutexattr_t ma;
    if (pthread_mutexattr_init(&ma) == 0) {
        if (pthread_mutexattr_setpshared(&ma, PTHREAD_PROCESS_SHARED) == 0 &&
            pthread_mutexattr_setrobust(&ma, PTHREAD_MUTEX_ROBUST) == 0 &&
            pthread_mutex_init(&h->alive, &ma) == 0)
            t->alive_ok = true; /* the worker takes it (direct_worker_begin) */
        pthread_mutexattr_destroy(&ma);
    }
    __atomic_store_n(&h->magic, DT_MAGIC, __ATOMIC_SEQ_CST); /* last: the header is complete */
    e->dtab = t;
    return 0;
}

static __thread bool tl_worker; /* this thread is an engine's worker: never wait on a target */

/* The worker thread, when it starts: hold the liveness word for its lifetime. */
void direct_worker_begin(aiote_engine *e)
{
    tl_worker = true;
    struct dtable *t = e->dtab;
    if (!t || !t->alive_ok || pthread_mutex_lock(&t->h->alive) != 0)
        return;
    t->alive_held = true;
    uint32_t tid = (uint32_t)syscall(SYS_gettid);
    /* publish only if the word is what the kernel will rewrite at our exit */
    if (__atomic_load_n((uint32_t *)&t->h->alive, __ATOMIC_SEQ_CST) == tid)
        atomic_store(&t->h->alive_tid, tid);
}

/* The worker thread, when it stops (the engine closes; `closed` tells peers). */
void direct_worker_end(aiote_engine *e)
{
    struct dtable *t = e->dtab;
    if (!t || !t->alive_held)
        return;
    atomic_store(&t->h->alive_tid, 0);
    t->alive_held = false;
    pthread_mutex_unlock(&t->h->alive);
}

/* Initiator: is the target's worker thread, hence its process, certainly alive?
 * false: don't know (poll the pidfd). */
static inline bool target_alive(const struct dpeer *dp)
{
    struct dt_header *h = dp->t.h;
    uint32_t tid = atomic_load_explicit(&h->alive_tid, memory_order_acquire);
    return tid && __atomic_load_n((uint32_t *)&h->alive, __ATOMIC_ACQUIRE) == tid;
}

void direct_publish(aiote_engine *e, size_t idx, uint32_t gen, uint64_t key, uint64_t base, uint64_t len)
{
    struct dtable *t = e->dtab;
    if (!t)
        return;
    if (idx >= DT_SLOTS) {
        atomic_store(&t->h->overflow, 1);
        return;
    }
    struct dt_slot *s = &t->slots[idx];
    /* the slot is invalid here (a fresh one, or unpublished and drained) */
    s->key = key;
    s->base = base;
    s->len = len;
    atomic_store(&s->state, ((uint64_t)gen << 1) | 1); /* seq_cst: fields before state */
    uint32_t hi = atomic_load(&t->h->high);
    while (hi < idx + 1 && !atomic_compare_exchange_weak(&t->h->high, &hi, (uint32_t)idx + 1))
        ;
}

static bool slot_held(struct dtable *t, uint32_t mark)
{
    if (atomic_load(&t->h->self_held) == mark)
        return true;
    for (uint32_t l = 0; l < DT_LANES; l++) {
        struct dt_lane *ln = &t->lanes[l];
        if (!atomic_load(&ln->owner))
            continue;
        for (uint32_t k = 0; k < DT_HELD; k++)
            if (atomic_load(&ln->held[k]) == mark)
                return true;
    }
    return false;
}

/* Drop the holds of lanes whose processes are gone. */
static void reap_dead_lanes(struct dtable *t, uint32_t mark)
{
    for (uint32_t l = 0; l < DT_LANES; l++) {
        struct dt_lane *ln = &t->lanes[l];
        uint64_t owner = atomic_load(&ln->owner);
        if (!owner)
            continue;
        bool holds = false;
        for (uint32_t k = 0; k < DT_HELD && !holds; k++)
            holds = atomic_load(&ln->held[k]) == mark;
        if (!holds || !owner_dead(owner))
            continue;
        for (uint32_t k = 0; k < DT_HELD; k++) {
            uint32_t v = mark;
            atomic_compare_exchange_strong(&ln->held[k], &v, 0);
        }
    }
}

/* Invalidate slot idx and wait until no copy into it is in flight.
 * 0, or -AIOTE_E_BUSY after timeout_ns with a live initiator holding it
 * (the slot stays invalid). */
int direct_unpublish(aiote_engine *e, size_t idx, uint64_t timeout_ns)
{
    struct dtable *t = e->dtab;
    if (!t || idx >= DT_SLOTS)
        return 0;
    struct dt_slot *s = &t->slots[idx];
    uint64_t st = atomic_load(&s->state);
    atomic_store(&s->state, st & ~1ull); /* seq_cst: before the scan below */
    uint32_t mark = (uint32_t)idx + 1;
    uint64_t start = 0, next_reap = 0;
    for (unsigned spins = 0; slot_held(t, mark); spins++) {
        if (spins < 64) {
            sched_yield();
            continue;
        }
        uint64_t now = now_ns();
        if (!start)
            start = now;
        if (now >= next_reap) {
            reap_dead_lanes(t, mark);
            next_reap = now + 1000000;
        }
        if (now - start > timeout_ns) {
            aiote_set_error("a direct write of a live peer into this region is in flight (is that process "
                            "stopped?); the region takes no new writes, close it again later");
            return -AIOTE_E_BUSY;
        }
        struct timespec ts = {0, 20000};
        nanosleep(&ts, NULL);
    }
    return 0;
}

/* Engine close: every region is unpublished (drained), the table removed. */
void direct_table_close(aiote_engine *e, uint64_t timeout_ns)
{
    struct dtable *t = e->dtab;
    if (!t)
        return;
    atomic_store(&t->h->closed, 1);
    uint32_t hi = atomic_load(&t->h->high);
    for (uint32_t i = 0; i < hi && i < DT_SLOTS; i++)
        if (atomic_load(&t->slots[i].state) & 1)
            direct_unpublish(e, i, timeout_ns);
    shm_unlink(t->name);
    munmap(t->map, DT_SIZE);
    free(t);
    e->dtab = NULL;
}

/* An inline batch whose acknowledgement the worker (or the spinning loop)
 * waits for: the caller's budget ran out (the target sleeps, is stopped, or
 * is slow).  Its future resolves by event. */
struct ipend {
    struct ipend *next;
    uint64_t op_id;
    struct dpeer *dp;
    uint64_t end, deadline, next_check;
    size_t n;
    uint64_t pos[]; /* each element's entry */
};

/* ---- initiator side ---------------------------------------------------- */

static struct dpeer *dpeer_attach(aiote_engine *e, const uint8_t *addr, size_t len)
{
    static const char pre[] = "fi_shm://";
    size_t i = 0;
    if (len >= sizeof pre - 1 && memcmp(addr, pre, sizeof pre - 1) == 0)
        i = sizeof pre - 1;
    long pid = 0;
    size_t start = i;
    while (i < len && addr[i] >= '0' && addr[i] <= '9' && pid < (1L << 22))
        pid = pid * 10 + (addr[i++] - '0');
    if (i == start || i >= len || addr[i] != ':' || pid <= 0 || pid >= (1L << 22))
        return NULL;
    /* pidfd first, then the start time, then the pidfd still live: the start
     * time is that of the process the pidfd names */
    int pfd = pidfd_open_((int)pid);
    if (pfd < 0)
        return NULL;
    uint64_t st = proc_starttime((int)pid);
    struct pollfd f = {.fd = pfd, .events = POLLIN};
    if (!st || poll(&f, 1, 0) != 0) {
        close(pfd);
        return NULL;
    }
    char name[96];
    table_name(name, sizeof name, (int)pid, addr, len);
    int fd = shm_open(name, O_RDWR | O_CLOEXEC, 0);
    if (fd < 0) {
        close(pfd);
        return NULL; /* the target has no table: libfabric */
    }
    struct stat sb;
    void *m = MAP_FAILED;
    if (fstat(fd, &sb) == 0 && (uint64_t)sb.st_size == DT_SIZE)
        m = mmap(NULL, DT_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (m == MAP_FAILED) {
        close(pfd);
        return NULL;
    }
    struct dpeer *dp = calloc(1, sizeof *dp);
    if (!dp) {
        munmap(m, DT_SIZE);
        close(pfd);
        return NULL;
    }
    table_map(&dp->t, m);
    struct dt_header *h = dp->t.h;
    /* it must be this process's table for this very endpoint */
    if (__atomic_load_n(&h->magic, __ATOMIC_SEQ_CST) != DT_MAGIC || h->version != DT_VERSION ||
        h->nslots != DT_SLOTS || h->nlanes != DT_LANES || h->pid != (uint32_t)pid || h->starttime != st ||
        h->addr_len != len || memcmp(h->addr, addr, len) != 0 || atomic_load(&h->closed))
        goto fail;
    /* a lane of our own: a free one, or one whose process is gone */
    uint64_t me = owner_word(getpid(), proc_starttime(getpid()));
    dp->lane = -1;
    for (int pass = 0; pass < 2 && dp->lane < 0; pass++) {
        for (uint32_t l = 0; l < DT_LANES; l++) {
            struct dt_lane *ln = &dp->t.lanes[l];
            uint64_t cur = atomic_load(&ln->owner);
            if (pass == 0 ? cur != 0 : (cur == 0 || !owner_dead(cur)))
                continue;
            if (atomic_compare_exchange_strong(&ln->owner, &cur, me)) {
                for (uint32_t k = 0; k < DT_HELD; k++)
                    atomic_store(&ln->held[k], 0); /* a dead owner's holds */
                dp->lane = (int)l;
                break;
            }
        }
    }
    if (dp->lane < 0)
        goto fail;
    dp->pid = (int)pid;
    dp->pidfd = pfd;
    dp->efd = -1;
#ifdef SYS_pidfd_getfd
    if (h->efd >= 0)
        dp->efd = (int)syscall(SYS_pidfd_getfd, pfd, h->efd, 0);
    if (dp->efd >= 0) {
        /* it must be an eventfd (the number is the target's say-so) */
        char link[64], path[64];
        snprintf(path, sizeof path, "/proc/self/fd/%d", dp->efd);
        ssize_t n = readlink(path, link, sizeof link - 1);
        if (n <= 0 || (link[n] = 0, strcmp(link, "anon_inode:[eventfd]") != 0)) {
            close(dp->efd);
            dp->efd = -1;
        }
    }
#endif
    pthread_mutex_init(&dp->push_lock, NULL);
    return dp;
fail:
    munmap(m, DT_SIZE);
    close(pfd);
    free(dp);
    return NULL;
}

static void dpeer_free(struct dpeer *dp)
{
    if (!dp)
        return;
    struct dt_lane *ln = &dp->t.lanes[dp->lane];
    for (uint32_t k = 0; k < DT_HELD; k++)
        atomic_store(&ln->held[k], 0);
    atomic_store(&ln->owner, 0);
    munmap(dp->t.map, DT_SIZE);
    close(dp->pidfd);
    if (dp->efd >= 0)
        close(dp->efd);
    pthread_mutex_destroy(&dp->push_lock);
    free(dp);
}

/* Called under peer_lock by aiote_rdesc_insert: resolve the remote region
 * to its slot (once per descriptor).  Leaves rd->dp NULL when the direct
 * path can't serve it. */
void direct_resolve(aiote_engine *e, struct peer *p, struct rdesc *rd)
{
    if (!e->cfg.direct_shm || !e->is_shm || e->cfg.hmem || p->gone)
        return;
    if (!p->dpeer_tried) {
        p->dpeer_tried = true;
        const uint8_t *addrs[AIOTE_MAX_NICS];
        size_t lens[AIOTE_MAX_NICS];
        uint32_t count;
        if (parse_addrs(p->blob, p->blob_len, &count, addrs, lens) == 0)
            p->dpeer = dpeer_attach(e, addrs[0], lens[0]);
    }
    struct dpeer *dp = p->dpeer;
    if (!dp)
        return;
    struct dt_header *h = dp->t.h;
    uint32_t hi = atomic_load(&h->high);
    if (hi > DT_SLOTS)
        hi = DT_SLOTS;
    for (uint32_t i = 0; i < hi; i++) {
        struct dt_slot *s = &dp->t.slots[i];
        uint64_t st = atomic_load(&s->state);
        if (!(st & 1) || s->key != rd->keys[0] || s->base != rd->base || rd->len > s->len)
            continue;
        if (atomic_load(&s->state) != st)
            continue; /* changed while we read it */
        rd->dp = dp;
        rd->dslot = i;
        rd->dstate = st;
        return;
    }
    /* Not published: if the table holds every region of the target, the
     * descriptor is stale (or forged) and every write with it must fail. */
    if (!atomic_load(&h->overflow) && !atomic_load(&h->closed)) {
        rd->dp = dp;
        rd->dslot = UINT32_MAX;
    }
}

void direct_peers_free(aiote_engine *e)
{
    while (e->ipend) { /* none after a worker that ran; a worker that never started leaves them */
        struct ipend *pd = e->ipend;
        e->ipend = pd->next;
        free(pd);
    }
    for (size_t i = 0; i < e->npeers; i++) {
        dpeer_free(e->peers[i]->dpeer);
        e->peers[i]->dpeer = NULL;
    }
}

/* ---- the copy ------------------------------------------------------------ */

/* Can the direct path take this (checked) op, and where?  0: no (libfabric);
 * 1: on the calling thread (at most direct_max bytes); 2: on a copy thread
 * (larger, if the engine has copy threads).  Nothing is changed. */
int direct_mode(aiote_engine *e, const struct op *op)
{
    if (!e->cfg.direct_shm || !e->is_shm || op->n == 0 || op->local_device)
        return 0;
    uint64_t total = 0;
    if (op->kind == OP_PAGED) {
        if (!op->rd->dp || (atomic_load(&op->rd->dp->off) && !atomic_load(&op->rd->dp->dead)))
            return 0;
        total = op->page_len * op->n;
        if (op->page_len && total / op->page_len != op->n)
            total = UINT64_MAX;
    } else {
        for (size_t i = 0; i < op->n; i++) {
            const struct rdesc *rd = op->wrs[i].rd;
            if (!rd->dp || (atomic_load(&rd->dp->off) && !atomic_load(&rd->dp->dead)))
                return 0;
            total = op->wrs[i].len > UINT64_MAX - total ? UINT64_MAX : total + op->wrs[i].len;
        }
    }
    if (total <= e->direct_max)
        return 1;
    return e->cfg.direct_workers >= 0 ? 2 : 0;
}

static int hold_slot(struct dpeer *dp, uint32_t slot, uint32_t *k_out)
{
    struct dt_lane *ln = &dp->t.lanes[dp->lane];
    for (uint32_t k = 0; k < DT_HELD; k++) {
        uint32_t zero = 0;
        if (atomic_compare_exchange_strong(&ln->held[k], &zero, slot + 1)) {
            *k_out = k;
            return 0;
        }
    }
    return -1; /* every hold of our lane is taken (8 threads copying): use libfabric */
}

static void release_slot(struct dpeer *dp, uint32_t k)
{
    atomic_store(&dp->t.lanes[dp->lane].held[k], 0);
}

/* Per target peer: imms to deliver. */
struct imm_acc {
    uint32_t peer;
    struct dpeer *dp;
    uint64_t count;
};

static void acc_add(struct imm_acc *acc, size_t *nacc, size_t cap, uint32_t peer, struct dpeer *dp, uint64_t c)
{
    for (size_t i = 0; i < *nacc; i++)
        if (acc[i].peer == peer) {
            acc[i].count += c;
            return;
        }
    if (*nacc < cap)
        acc[(*nacc)++] = (struct imm_acc){peer, dp, c};
}

/* Publish (imm, count) in our ring of the target's table and wake its worker
 * if it sleeps.  0, or -1: no room / no way to wake it (send a message). */
static int push_imms(struct dpeer *dp, uint32_t imm, uint64_t count, bool lazy_ok)
{
    if (dp->efd < 0 || count > UINT32_MAX)
        return -1;
    struct dt_lane *ln = &dp->t.lanes[dp->lane];
    pthread_mutex_lock(&dp->push_lock);
    uint64_t head = atomic_load_explicit(&ln->head, memory_order_relaxed);
    if (head - atomic_load(&ln->tail) >= DT_RING) {
        pthread_mutex_unlock(&dp->push_lock);
        return -1;
    }
    ln->ring[head % DT_RING] = (count << 32) | imm;
    atomic_store(&ln->head, head + 1); /* seq_cst: the entry before head, head before the flag */
    pthread_mutex_unlock(&dp->push_lock);
    struct dt_header *h = dp->t.h;
    atomic_store(&h->imm_pending, 1);
    /* Dekker with direct_sleep_begin and direct_imm_armed.  A target that sleeps
     * with nobody waiting for imms (DT_SLEEP_LAZY) takes the entry on its next
     * nap's end (shm naps are short) or when a wait is armed: no wake-up per
     * write; but a ring half full wakes it, so it never fills for that.  Only
     * for ops of DT_LAZY_MIN_BYTES and more (lazy_ok): small ones keep waking
     * it, so that a stream of them finds it awake and goes inline. */
    uint32_t sl = atomic_load(&h->sleeping);
    if (sl && (sl != DT_SLEEP_LAZY || !lazy_ok || head + 1 - atomic_load(&ln->tail) >= DT_RING / 2)) {
        uint64_t one = 1;
        ssize_t r = write(dp->efd, &one, sizeof one);
        (void)r;
    }
    return 0;
}

static bool poll_ipend(aiote_engine *e, bool closing);

static void count_imms(aiote_engine *e, uint32_t imm, uint64_t cnt)
{
    if (cnt && cnt <= UINT32_MAX && imm_table_restore(&e->imms, imm, (uint32_t)cnt, &e->pending_events) == 0) {
        e->stats.imms_received += cnt;
        e->nics[0].stats.imms_received += cnt;
    } else if (cnt) {
        e->stats.bad_msgs++;
    }
}

/* Target, under progress_lock: apply one entry (read once: it is wire input).
 * Returns its status. */
static int32_t inline_apply(aiote_engine *e, struct dtable *t, const struct dt_ient *x, const uint8_t *payload)
{
    uint32_t hi = atomic_load(&t->h->high);
    if (x->slot >= DT_SLOTS || x->slot >= hi)
        return DT_IST_STALE;
    struct dt_slot *s = &t->slots[x->slot];
    /* the same Dekker pair as an initiator's copy: hold, then check the state */
    atomic_store(&t->h->self_held, x->slot + 1);
    int32_t st = 0;
    uint64_t state = atomic_load(&s->state);
    if (!(state & 1) || state != x->state || s->key != x->key || atomic_load(&t->h->closed))
        st = DT_IST_STALE;
    else if (x->off > s->len || x->len > s->len - x->off)
        st = -AIOTE_E_BOUNDS;
    else if (x->len)
        memcpy((uint8_t *)(uintptr_t)(s->base + x->off), payload, x->len);
    atomic_store(&t->h->self_held, 0);
    (void)e;
    return st;
}

/* Target, under progress_lock: apply the published entries of one lane's
 * inline ring: bytes first, then their imms, then `done` (the initiator's
 * completion). */
static bool poll_inline(aiote_engine *e, struct dtable *t, struct dt_iring *r)
{
    uint64_t head = atomic_load_explicit(&r->head, memory_order_acquire);
    uint64_t pos = atomic_load_explicit(&r->done, memory_order_relaxed);
    if (head == pos)
        return false;
    uint32_t run_imm = 0;
    uint64_t run = 0;
    if (head - pos > DT_ICELLS) { /* not something an aiote initiator writes */
        e->stats.bad_msgs++;
        atomic_store_explicit(&r->done, head, memory_order_release);
        return true;
    }
    while (pos != head) {
        uint32_t at = (uint32_t)(pos % DT_ICELLS);
        struct dt_ient *cell = (struct dt_ient *)(r->cells + (size_t)at * DT_ICELL);
        struct dt_ient x;
        memcpy(&x, cell, sizeof x); /* once: the initiator's process could change it under us */
        if (x.ncells == 0 || x.ncells > head - pos || at + x.ncells > DT_ICELLS) {
            e->stats.bad_msgs++; /* malformed: drop what is left */
            pos = head;
            break;
        }
        if (x.kind == DT_IK_DATA) {
            int32_t st = x.len > (uint64_t)(x.ncells - 1) * DT_ICELL
                             ? -AIOTE_E_INVAL
                             : inline_apply(e, t, &x, (const uint8_t *)(cell + 1));
            if (st == 0 && x.has_imm) {
                if (run && run_imm != x.imm) {
                    count_imms(e, run_imm, run);
                    run = 0;
                }
                run_imm = x.imm;
                run++;
            }
            __atomic_store_n(&cell->status, st, __ATOMIC_RELAXED); /* published by `done` */
        }
        pos += x.ncells;
    }
    if (run)
        count_imms(e, run_imm, run);
    atomic_store_explicit(&r->done, pos, memory_order_release);
    return true;
}

/* Target worker: take every published imm entry of every lane. */
bool direct_poll_imms(aiote_engine *e)
{
    bool acks = poll_ipend(e, false);
    struct dtable *t = e->dtab;
    if (!t || !atomic_load_explicit(&t->h->imm_pending, memory_order_relaxed))
        return acks;
    atomic_store(&t->h->imm_pending, 0); /* before the scan: a later push sets it again */
    bool any = false;
    for (uint32_t l = 0; l < DT_LANES; l++) {
        struct dt_lane *ln = &t->lanes[l];
        uint64_t head = atomic_load(&ln->head), tail = atomic_load_explicit(&ln->tail, memory_order_relaxed);
        if (head == tail)
            continue;
        if (head - tail > DT_RING) { /* not something an aiote initiator writes: drop it */
            e->stats.bad_msgs++;
            atomic_store(&ln->tail, head);
            continue;
        }
        for (; tail != head; tail++) {
            uint64_t v = ln->ring[tail % DT_RING];
            uint32_t imm = (uint32_t)v, cnt = (uint32_t)(v >> 32);
            if (cnt && imm_table_restore(&e->imms, imm, cnt, &e->pending_events) == 0) {
                e->stats.imms_received += cnt;
                e->nics[0].stats.imms_received += cnt;
            } else {
                e->stats.bad_msgs++;
            }
        }
        atomic_store(&ln->tail, tail);
        any = true;
    }
    for (uint32_t l = 0; l < DT_LANES; l++)
        any |= poll_inline(e, t, &t->irings[l]);
    return any || acks;
}

/* Target worker about to sleep: false if imms are waiting (don't sleep). */
bool direct_sleep_begin(aiote_engine *e)
{
    struct dtable *t = e->dtab;
    if (!t)
        return true;
    /* A spinning event loop polls the rings itself (aiote_progress): initiators
     * need not wake us.  worker_sleeping is set already; turning the spin off
     * wakes us (aiote_loop_spin), and the next nap here publishes sleeping. */
    if (atomic_load(&e->events.spinning))
        return true;
    /* nobody waits for an imm (no armed wait, no watcher): initiators need not
     * wake us for their imm entries (push_imms).  Dekker with direct_imm_armed:
     * the store of `sleeping` before the load of nwaiters, the waiter's count
     * before its load of `sleeping`: one of the two sees the other. */
    bool lazy = !atomic_load(&e->narmed) && !__atomic_load_n(&e->imms.nwaiters, __ATOMIC_SEQ_CST);
    atomic_store(&t->h->sleeping, lazy ? DT_SLEEP_LAZY : DT_SLEEP_WAKE);
    if (lazy && (__atomic_load_n(&e->imms.nwaiters, __ATOMIC_SEQ_CST) || atomic_load(&e->narmed)))
        atomic_store(&t->h->sleeping, DT_SLEEP_WAKE);
    return !atomic_load(&t->h->imm_pending);
}

/* A wait was armed (aiote_imm_wait, after its count is in the table): entries
 * that a lazily sleeping worker left in the rings may be what it waits for,
 * and later ones must wake the worker.  Any thread. */
void direct_imm_armed(aiote_engine *e)
{
    struct dtable *t = e->dtab;
    if (!t)
        return;
    uint32_t lazy = DT_SLEEP_LAZY;
    atomic_thread_fence(memory_order_seq_cst); /* the waiter's count before these loads */
    if (atomic_compare_exchange_strong(&t->h->sleeping, &lazy, DT_SLEEP_WAKE) && atomic_load(&t->h->imm_pending)) {
        uint64_t one = 1;
        ssize_t r = write(e->sub_efd, &one, sizeof one);
        (void)r;
    }
}

/* A caller that reads counts (imms.pending; imms.wait's fast path with
 * only_lazy): take what the imm rings hold, unless the worker is in its
 * progress pass (it takes them there).  only_lazy: only if the worker sleeps
 * lazily (it would take them only when its nap ends; an awake one takes them
 * on its next pass, and the hot path should not contend with it).  Any thread
 * but the worker's; never blocks (a worker wedged in the provider holds the
 * lock for good). */
void direct_imms_settle(aiote_engine *e, bool only_lazy)
{
    struct dtable *t = e->dtab;
    if (!t || (only_lazy && atomic_load(&t->h->sleeping) != DT_SLEEP_LAZY) || !atomic_load(&t->h->imm_pending) ||
        atomic_load(&e->stopping))
        return;
    if (pthread_mutex_trylock(&e->progress_lock) != 0)
        return;
    direct_poll_imms(e);
    if (e->pending_events.n)
        event_queue_flush(&e->events, &e->pending_events);
    pthread_mutex_unlock(&e->progress_lock);
}

void direct_sleep_end(aiote_engine *e)
{
    if (e->dtab)
        atomic_store_explicit(&e->dtab->h->sleeping, 0, memory_order_relaxed);
}

/* Deliver the accumulated imms: rings where possible, one OP_IMMS (with id)
 * for the rest.  1 if nothing had to be queued, 0 if an op was, <0 on error. */
static int queue_imms(aiote_engine *e, uint64_t id, uint32_t imm, const struct imm_acc *acc, size_t nacc);

static int deliver_imms(aiote_engine *e, uint64_t id, uint32_t imm, struct imm_acc *acc, size_t nacc,
                        uint64_t bytes)
{
    size_t left = 0;
    bool lazy_ok = bytes >= DT_LAZY_MIN_BYTES; /* the op's bytes, all targets together */
    for (size_t i = 0; i < nacc; i++)
        if (push_imms(acc[i].dp, imm, acc[i].count, lazy_ok) != 0)
            acc[left++] = acc[i];
    if (!left)
        return 1;
    int rc = queue_imms(e, id, imm, acc, left);
    return rc ? rc : 0;
}

static void push_op_event(aiote_engine *e, uint64_t id, int32_t status, int fi_err, uint64_t index)
{
    struct event_buf b = {0};
    aiote_event ev = {.id = id, .kind = AIOTE_EV_OP, .status = status, .fi_errno = fi_err,
                      .index = index, .nic = -1};
    event_buf_push(&b, &ev);
    event_queue_flush(&e->events, &b);
    free(b.ev);
}

/* Queue the imm messages (one per target peer) as an OP_IMMS with this id. */
static int queue_imms(aiote_engine *e, uint64_t id, uint32_t imm, const struct imm_acc *acc, size_t nacc)
{
    struct op *op = calloc(1, sizeof *op);
    if (!op)
        return -AIOTE_E_NOMEM;
    op->ipeers = malloc(nacc * sizeof *op->ipeers);
    op->icounts = malloc(nacc * sizeof *op->icounts);
    if (!op->ipeers || !op->icounts) {
        op_free(op);
        return -AIOTE_E_NOMEM;
    }
    for (size_t i = 0; i < nacc; i++) {
        op->ipeers[i] = acc[i].peer;
        op->icounts[i] = acc[i].count;
    }
    op->kind = OP_IMMS;
    op->id = id;
    op->imm = imm;
    op->n = op->n_submitted = nacc;
    atomic_fetch_add(&e->outstanding, nacc); /* no bound: the bytes are already there */
    return enqueue_op(e, op);
}

/* Between two chunks of a copy thread's op: held here by the test gate
 * (aiote_direct_pause); then is the op to stop (cancelled, engine closing)? */
static bool async_checkpoint(aiote_engine *e, struct op *op);
static void async_release(aiote_engine *e, struct op *op);

/* ---- inline writes: small ones carried in the target's shared memory ----- */


static inline void cpu_pause(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static inline uint32_t icells(uint64_t len) { return 1u + (uint32_t)((len + DT_ICELL - 1) / DT_ICELL); }

/* While we wait for a target: take our own rings too (two engines that write
 * inline to each other from spinning loops would otherwise wait for each other). */
static void serve_own(aiote_engine *e)
{
    if (!e->dtab || pthread_mutex_trylock(&e->progress_lock) != 0)
        return;
    if (!atomic_load(&e->stopping)) {
        direct_poll_imms(e);
        if (e->pending_events.n)
            event_queue_flush(&e->events, &e->pending_events);
    }
    pthread_mutex_unlock(&e->progress_lock);
}

/* The cell where an entry of nc cells starts at *pos.  Entries never wrap: if it
 * would, a pad entry fills the ring's end and *pos moves to the ring's start. */
static struct dt_ient *icell_at(struct dt_iring *r, uint64_t *pos, uint32_t nc)
{
    uint32_t at = (uint32_t)(*pos % DT_ICELLS);
    if (at + nc > DT_ICELLS) {
        struct dt_ient *pad = (struct dt_ient *)(r->cells + (size_t)at * DT_ICELL);
        pad->ncells = DT_ICELLS - at;
        pad->kind = DT_IK_PAD;
        *pos += DT_ICELLS - at;
        at = 0;
    }
    return (struct dt_ient *)(r->cells + (size_t)at * DT_ICELL);
}

/* Publish [start, end) of our inline ring and wake the target if it sleeps. */
static void inline_publish(struct dpeer *dp, struct dt_iring *r, uint64_t end)
{
    atomic_store(&r->head, end); /* seq_cst: entries before head, head before the flag */
    struct dt_header *h = dp->t.h;
    atomic_store(&h->imm_pending, 1);
    if (atomic_load(&h->sleeping)) { /* Dekker with direct_sleep_begin */
        uint64_t one = 1;
        ssize_t w = write(dp->efd, &one, sizeof one);
        (void)w;
    }
}

static uint64_t inline_deadline(aiote_engine *e)
{
    return now_ns() + (uint64_t)(e->cfg.peer_timeout_ms ? e->cfg.peer_timeout_ms : 10000) * 1000000ull;
}

static inline bool inline_acked(struct dt_iring *r, uint64_t end)
{
    return (int64_t)(atomic_load_explicit(&r->done, memory_order_acquire) - end) >= 0;
}

/* Is the target gone or closed?  0, or a negative status with *fi_err. */
static int32_t inline_target_check(struct dpeer *dp, int *fi_err)
{
    struct pollfd pf = {.fd = dp->pidfd, .events = POLLIN};
    if (!target_alive(dp) && poll(&pf, 1, 0) != 0) {
        atomic_store(&dp->off, true);
        atomic_store(&dp->dead, true);
        *fi_err = FI_ECONNRESET;
        return -AIOTE_E_PROVIDER;
    }
    if (atomic_load(&dp->t.h->closed)) {
        *fi_err = FI_ENOTCONN;
        return -AIOTE_E_PROVIDER;
    }
    return 0;
}

/* The caller waits for the acknowledgement up to budget_ns, spinning: a
 * polling target on a CPU of its own acks within a microsecond or two; one
 * that isn't running won't be helped by a longer wait, and yielding here is
 * worse (on a small machine sched_yield hands this core to a busy-polling
 * worker for a whole time slice: ~2 ms ping-pongs with polling="busy" on 2
 * cores).  Past the budget the worker completes the op.
 * 1: acked; 0: not yet. */
static int inline_wait(aiote_engine *e, struct dt_iring *r, uint64_t end, uint64_t budget_ns)
{
    uint64_t stop = 0;
    for (uint32_t spins = 0;; spins++) {
        if (inline_acked(r, end))
            return 1;
        if (spins < 32) {
            cpu_pause();
            continue;
        }
        if ((spins & 15) == 0) {
            serve_own(e); /* two engines of one process writing to each other */
            uint64_t now = now_ns();
            if (!stop)
                stop = now + budget_ns;
            else if (now > stop)
                return 0;
        }
        cpu_pause();
    }
}

/* The statuses of an acked batch: 0 or the first failure (*bad, *fi_err). */
static int32_t inline_result(aiote_engine *e, struct dt_iring *r, const uint64_t *pos, size_t n, uint64_t *bad,
                             int *fi_err)
{
    int32_t status = 0;
    uint64_t ok = 0, bytes = 0;
    for (size_t i = 0; i < n; i++) {
        const struct dt_ient *c = (const struct dt_ient *)(r->cells + (size_t)(pos[i] % DT_ICELLS) * DT_ICELL);
        int32_t st = __atomic_load_n(&c->status, __ATOMIC_RELAXED);
        if (st == 0) {
            ok++;
            bytes += c->len;
        } else if (!status) {
            *bad = i;
            if (st == -AIOTE_E_BOUNDS) {
                status = -AIOTE_E_BOUNDS;
            } else {
                status = -AIOTE_E_PROVIDER;
                *fi_err = FI_EKEYREJECTED; /* as the copy says for a closed region */
            }
        }
    }
    __atomic_fetch_add(&e->stats.direct_inline, ok, __ATOMIC_RELAXED);
    __atomic_fetch_add(&e->stats.direct_writes, ok, __ATOMIC_RELAXED);
    __atomic_fetch_add(&e->stats.direct_bytes, bytes, __ATOMIC_RELAXED);
    return status;
}

#define DT_INLINE_BUDGET_NS 50000ull /* the caller waits this long for the target, then the worker does */

/* Try the op as inline entries: every element small, one target.  -1: not
 * taken (nothing published; copy it as usual), else as direct_copy. */
static int inline_try(aiote_engine *e, struct op *op)
{
    uint64_t lim = e->inline_max;
    if (!lim || tl_worker || op->n == 0 || op->n > DT_ICELLS / 2)
        return -1;
    struct welem w;
    op_elem(op, 0, &w);
    struct dpeer *dp = w.rd->dp;
    if (!dp || dp->efd < 0 || dp->pid == getpid() || atomic_load(&dp->off))
        return -1;
    uint64_t cells = 0;
    for (size_t i = 0; i < op->n; i++) {
        struct welem x;
        op_elem(op, i, &x);
        if (x.rd->dp != dp || x.rd->dslot == UINT32_MAX || x.len > lim)
            return -1;
        cells += icells(x.len);
    }
    if (cells > DT_ICELLS / 2)
        return -1;
    /* inline needs the target to run; process_vm_writev does not: a target whose worker
     * sleeps (nor its loop spins) would cost a wake-up per write, so copy it ourselves */
    if (!e->inline_wake && atomic_load_explicit(&dp->t.h->sleeping, memory_order_relaxed))
        return -1;
    int fi_err = 0;
    if (inline_target_check(dp, &fi_err) != 0)
        return -1; /* the usual path reports it */
    bool idle = false;
    if (!atomic_compare_exchange_strong(&dp->ibusy, &idle, true))
        return -1; /* a batch of ours to that target is not acked yet: copy this one ourselves */
    struct dt_iring *r = &dp->t.irings[dp->lane];
    uint64_t start = atomic_load_explicit(&r->head, memory_order_relaxed);
    /* room for the entries and at most one pad at the wrap */
    if (start - atomic_load_explicit(&r->done, memory_order_acquire) + cells + (cells - 1) > DT_ICELLS) {
        atomic_store(&dp->ibusy, false);
        __atomic_fetch_add(&e->stats.direct_inline_full, 1, __ATOMIC_RELAXED);
        return -1; /* full (the target is behind): copy it ourselves */
    }
    uint64_t pos = start;
    uint64_t at_idx[DT_ICELLS / 2]; /* each element's entry */
    for (size_t i = 0; i < op->n; i++) {
        struct welem x;
        op_elem(op, i, &x);
        uint32_t nc = icells(x.len);
        struct dt_ient *c = icell_at(r, &pos, nc);
        c->ncells = nc;
        c->kind = DT_IK_DATA;
        c->slot = x.rd->dslot;
        c->len = (uint32_t)x.len;
        c->state = x.rd->dstate;
        c->key = x.rd->keys[0];
        c->off = x.dst_off; /* the descriptor's base is the slot's (direct_resolve) */
        c->imm = op->imm;
        c->has_imm = op->has_imm ? 1 : 0;
        c->status = DT_IST_PENDING;
        if (x.len)
            memcpy(c + 1, op->local_base + x.src_off, x.len);
        at_idx[i] = pos;
        pos += nc;
    }
    inline_publish(dp, r, pos);
    if (!inline_wait(e, r, pos, DT_INLINE_BUDGET_NS)) {
        /* the entries are published and can't be withdrawn: the worker (or the spinning
         * loop) completes the op when the target acks, fails it when the target dies */
        struct ipend *pd = malloc(sizeof *pd + op->n * sizeof(uint64_t));
        __atomic_fetch_add(&e->stats.direct_inline_late, 1, __ATOMIC_RELAXED);
        if (pd) {
            pd->op_id = op->id;
            pd->dp = dp;
            pd->end = pos;
            pd->deadline = inline_deadline(e);
            pd->next_check = 0;
            pd->n = op->n;
            memcpy(pd->pos, at_idx, op->n * sizeof(uint64_t));
            pthread_mutex_lock(&e->ipend_lock);
            pd->next = e->ipend;
            e->ipend = pd;
            atomic_fetch_add(&e->ipend_n, 1);
            pthread_mutex_unlock(&e->ipend_lock);
            uint64_t one = 1;
            ssize_t wr = write(e->sub_efd, &one, sizeof one); /* the worker may sleep */
            (void)wr;
            return 0;
        }
        /* no memory to hand it over: wait here */
        while (!inline_wait(e, r, pos, DT_INLINE_BUDGET_NS)) {
            int32_t st = inline_target_check(dp, &fi_err);
            if (st) {
                atomic_store(&dp->ibusy, false);
                push_op_event(e, op->id, st, fi_err, 0);
                atomic_fetch_add(&e->direct_ops_failed, 1);
                return 0;
            }
        }
    }
    uint64_t bad = 0;
    int32_t status = inline_result(e, r, at_idx, op->n, &bad, &fi_err);
    atomic_store(&dp->ibusy, false);
    if (status) {
        push_op_event(e, op->id, status, fi_err, bad);
        atomic_fetch_add(&e->direct_ops_failed, 1);
        return 0;
    }
    atomic_fetch_add(&e->direct_ops_ok, 1);
    return AIOTE_DIRECT_DONE;
}

/* Under progress_lock (worker or spinning loop): complete the handed-over
 * inline batches that were acked; fail those whose target died or closed, or
 * that waited peer_timeout (their entries stay published: they may still
 * land).  closing: the engine stops: fail the rest (AIOTE_E_CLOSED). */
static bool poll_ipend(aiote_engine *e, bool closing)
{
    if (!atomic_load_explicit(&e->ipend_n, memory_order_relaxed))
        return false;
    bool any = false;
    uint64_t now = 0;
    pthread_mutex_lock(&e->ipend_lock);
    for (struct ipend **pp = &e->ipend; *pp;) {
        struct ipend *pd = *pp;
        struct dt_iring *r = &pd->dp->t.irings[pd->dp->lane];
        int32_t status = 0;
        int fi_err = 0;
        uint64_t bad = 0;
        if (inline_acked(r, pd->end)) {
            status = inline_result(e, r, pd->pos, pd->n, &bad, &fi_err);
        } else if (closing) {
            status = -AIOTE_E_CLOSED;
            fi_err = FI_ECANCELED;
        } else {
            if (!now)
                now = now_ns();
            if (now < pd->next_check) {
                pp = &pd->next;
                continue;
            }
            pd->next_check = now + 1000000; /* liveness once a ms */
            status = inline_target_check(pd->dp, &fi_err);
            if (!status && now > pd->deadline) {
                status = -AIOTE_E_PROVIDER;
                fi_err = FI_ETIMEDOUT;
            }
            if (!status) {
                pp = &pd->next;
                continue;
            }
        }
        *pp = pd->next;
        atomic_fetch_sub(&e->ipend_n, 1);
        atomic_store(&pd->dp->ibusy, false);
        aiote_event ev = {.id = pd->op_id, .kind = AIOTE_EV_OP, .status = status, .fi_errno = fi_err,
                          .index = bad, .nic = -1};
        event_buf_push(&e->pending_events, &ev);
        atomic_fetch_add(status ? &e->direct_ops_failed : &e->direct_ops_ok, 1);
        free(pd);
        any = true;
    }
    pthread_mutex_unlock(&e->ipend_lock);
    return any;
}

bool direct_inline_pending(aiote_engine *e) { return atomic_load_explicit(&e->ipend_n, memory_order_relaxed) != 0; }

/* Worker exit (under progress_lock): fail what is still handed over. */
void direct_inline_close(aiote_engine *e) { poll_ipend(e, true); }

/* Tests: publish one raw (forged) entry through rdesc's peer, wait for it.
 * Returns the entry's status (0, -AIOTE_E_BOUNDS, DT_IST_STALE -> -AIOTE_E_NO_MR,
 * -AIOTE_E_INVAL) or a negative error of the wait. */
int aiote_direct_inline_raw(aiote_engine *e, uint32_t rdesc, uint32_t slot, uint64_t state, uint64_t key,
                            uint64_t off, uint32_t len, uint32_t payload_len, int has_imm, uint32_t imm)
{
    pthread_mutex_lock(&e->peer_lock);
    struct rdesc *rd = rdesc < e->nrdescs ? e->rdescs[rdesc] : NULL;
    pthread_mutex_unlock(&e->peer_lock);
    if (!rd || !rd->dp || rd->dp->efd < 0 || payload_len > 4096) {
        aiote_set_error("no inline ring to that peer");
        return -AIOTE_E_INVAL;
    }
    struct dpeer *dp = rd->dp;
    if (slot == UINT32_MAX)
        slot = rd->dslot;
    if (state == UINT64_MAX)
        state = rd->dstate;
    if (key == UINT64_MAX)
        key = rd->keys[0];
    bool idle = false;
    if (!atomic_compare_exchange_strong(&dp->ibusy, &idle, true)) {
        aiote_set_error("an inline batch to that peer is in flight");
        return -AIOTE_E_BUSY;
    }
    struct dt_iring *r = &dp->t.irings[dp->lane];
    uint64_t pos = atomic_load(&r->head);
    uint32_t nc = icells(payload_len);
    if (pos - atomic_load(&r->done) + 2 * nc > DT_ICELLS) {
        atomic_store(&dp->ibusy, false);
        aiote_set_error("the inline ring to that peer is full");
        return -AIOTE_E_BUSY;
    }
    struct dt_ient *c = icell_at(r, &pos, nc);
    *c = (struct dt_ient){.ncells = nc, .kind = DT_IK_DATA, .slot = slot, .len = len, .state = state,
                          .key = key, .off = off, .imm = imm, .has_imm = has_imm ? 1 : 0,
                          .status = DT_IST_PENDING};
    memset(c + 1, 0xAB, payload_len);
    inline_publish(dp, r, pos + nc);
    int fi_err = 0;
    int32_t st = 0;
    while (!inline_wait(e, r, pos + nc, DT_INLINE_BUDGET_NS) && !(st = inline_target_check(dp, &fi_err)))
        ;
    if (!st)
        st = __atomic_load_n(&c->status, __ATOMIC_RELAXED);
    atomic_store(&dp->ibusy, false);
    return st == DT_IST_STALE ? -AIOTE_E_NO_MR : st;
}

#define DT_CHUNK_BYTES (64ull << 20) /* a chunk ends after this many bytes (cancel/close/deregistration
                                      * are seen between chunks) */

/* Do the op's copies.  Returns AIOTE_DIRECT_DONE (complete, nothing queued),
 * 0 (the outcome comes as an event: imm messages queued, or a failure), or
 * AIOTE_DIRECT_FALLBACK (nothing copied: post it through libfabric).
 * The caller holds a reference on the local region.  on_thread: a copy
 * thread runs it (checkpoints between chunks). */
static int direct_copy(aiote_engine *e, struct op *op, bool on_thread)
{
    if (!on_thread) {
        int ir = inline_try(e, op);
        if (ir >= 0)
            return ir;
    }
    struct iovec liov[DT_IOV], riov[DT_IOV];
    size_t nacc = 0, acc_cap = op->kind == OP_PAGED ? 1 : op->n;
    struct imm_acc acc_small[8];
    struct imm_acc *acc = acc_cap <= 8 ? acc_small : malloc(acc_cap * sizeof *acc);
    if (!acc)
        return AIOTE_DIRECT_FALLBACK;
    int32_t status = 0;
    int fi_err = 0;
    uint64_t bad = 0, copied_elems = 0, bytes = 0;
    bool fallback = false;
    size_t i = 0;
    while (i < op->n && !status && !fallback) {
        if (on_thread && i > 0 && async_checkpoint(e, op)) {
            status = -AIOTE_E_CLOSED; /* cancelled or closing: the rest is withdrawn */
            fi_err = FI_ECANCELED;
            bad = i;
            break;
        }
        struct welem w;
        op_elem(op, i, &w);
        const struct rdesc *rd = w.rd;
        struct dpeer *dp = rd->dp;
        if (rd->dslot == UINT32_MAX) { /* not in the target's table: a closed region */
            status = -AIOTE_E_PROVIDER;
            fi_err = FI_EKEYREJECTED;
            bad = i;
            break;
        }
        /* the target's process: gone means gone (before the pid can be reused); the
         * liveness word spares the pidfd poll while it proves the target alive */
        struct pollfd pf = {.fd = dp->pidfd, .events = POLLIN};
        if (!target_alive(dp) && poll(&pf, 1, 0) != 0) {
            atomic_store(&dp->off, true);
            atomic_store(&dp->dead, true);
            status = -AIOTE_E_PROVIDER;
            fi_err = FI_ECONNRESET;
            bad = i;
            break;
        }
        uint32_t k;
        if (hold_slot(dp, rd->dslot, &k)) {
            if (copied_elems == 0 && bytes == 0) {
                fallback = true;
                break;
            }
            /* part of the op is there already: wait for a hold (each is held for one syscall) */
            while (hold_slot(dp, rd->dslot, &k))
                sched_yield();
        }
        struct dt_slot *s = &dp->t.slots[rd->dslot];
        if (atomic_load(&dp->t.h->closed)) { /* the target engine closed (its process lives on) */
            release_slot(dp, k);
            status = -AIOTE_E_PROVIDER;
            fi_err = FI_ENOTCONN; /* as libfabric says for a closed same-process peer */
            bad = i;
            break;
        }
        /* seq_cst load after the seq_cst hold (see the top of this file) */
        if (atomic_load(&s->state) != rd->dstate || s->key != rd->keys[0] || s->base != rd->base ||
            rd->len > s->len || atomic_load(&dp->t.h->closed)) {
            release_slot(dp, k);
            status = -AIOTE_E_PROVIDER;
            fi_err = FI_EKEYREJECTED; /* the target deregistered it: libfabric's stale-key error */
            bad = i;
            break;
        }
        /* this element and the following ones into the same slot, IOV_MAX iovecs a side at a
         * time; a range that continues the previous one on its side joins its iovec (local
         * and remote sides merge independently: the kernel pairs them by byte count) */
        size_t first = i, nl = 0, nr = 0;
        uint64_t run_bytes = 0;
        for (;;) {
            struct welem x;
            op_elem(op, i, &x);
            if (x.rd != rd && (x.rd->dp != dp || x.rd->dslot != rd->dslot || x.rd->dstate != rd->dstate ||
                               x.rd->base != rd->base))
                break;
            if (x.len) {
                uint8_t *lp = op->local_base + x.src_off;
                /* bounds: x.dst_off + x.len <= x.rd->len <= slot len (checked at submission and above) */
                uint8_t *rp = (uint8_t *)(uintptr_t)(s->base + x.dst_off);
                bool lm = nl && (uint8_t *)liov[nl - 1].iov_base + liov[nl - 1].iov_len == lp;
                bool rm = nr && (uint8_t *)riov[nr - 1].iov_base + riov[nr - 1].iov_len == rp;
                if ((!lm && nl == DT_IOV) || (!rm && nr == DT_IOV) ||
                    (run_bytes && (run_bytes >= DT_CHUNK_BYTES || x.len > DT_CHUNK_BYTES - run_bytes)))
                    break; /* no room in this syscall: the next chunk starts here */
                if (lm)
                    liov[nl - 1].iov_len += x.len;
                else
                    liov[nl++] = (struct iovec){lp, x.len};
                if (rm)
                    riov[nr - 1].iov_len += x.len;
                else
                    riov[nr++] = (struct iovec){rp, x.len};
                run_bytes += x.len;
            }
            i++;
            if (i == op->n)
                break;
        }
        /* process_vm_writev may stop short (it copies iovec by iovec): assist_copy goes on
         * from there; a large run is shared with the engine's copy assistants */
        int err = 0;
        uint64_t landed = assist_copy(e, dp->pid, liov, nl, riov, nr, run_bytes, &err);
        bytes += landed;
        if (landed < run_bytes) {
            if (err == EPERM && bytes == 0) {
                atomic_store(&dp->off, true); /* CMA not allowed: libfabric from now on */
                fallback = true;
            } else if (err == ESRCH) {
                atomic_store(&dp->off, true);
                atomic_store(&dp->dead, true);
                status = -AIOTE_E_PROVIDER;
                fi_err = FI_ECONNRESET;
            } else {
                status = -AIOTE_E_PROVIDER;
                fi_err = err == EFAULT ? FI_EFAULT : FI_EIO;
            }
            bad = first;
            /* the elements of this run that landed whole deliver their imms */
            uint64_t cum = 0;
            size_t whole = 0;
            for (size_t j = first; j < i; j++) {
                struct welem y;
                op_elem(op, j, &y);
                if (cum + y.len > landed || (y.len == 0 && cum == landed && landed < run_bytes))
                    break;
                cum += y.len;
                whole++;
            }
            if (!fallback && whole) {
                copied_elems += whole;
                if (op->has_imm)
                    acc_add(acc, &nacc, acc_cap, rd->peer, dp, whole);
            }
            if (!fallback && whole < i - first)
                bad = first + whole;
        }
        release_slot(dp, k);
        if (!status && !fallback && (on_thread || run_bytes >= (1u << 20))) {
            /* a long copy: did the target die meanwhile?  Its memory took the bytes while the
             * kernel held it, but nobody is there to use them: the chunk counts as failed */
            struct pollfd pf2 = {.fd = dp->pidfd, .events = POLLIN};
            if (!target_alive(dp) && poll(&pf2, 1, 0) != 0) { /* the word, else the pidfd (as above) */
                atomic_store(&dp->off, true);
                atomic_store(&dp->dead, true);
                status = -AIOTE_E_PROVIDER;
                fi_err = FI_ECONNRESET;
                bad = first;
            }
        }
        if (!status && !fallback) {
            copied_elems += i - first;
            if (op->has_imm)
                acc_add(acc, &nacc, acc_cap, rd->peer, dp, i - first);
        }
    }
    __atomic_fetch_add(&e->stats.direct_bytes, bytes, __ATOMIC_RELAXED);
    if (fallback) {
        if (acc != acc_small)
            free(acc);
        __atomic_fetch_add(&e->stats.direct_fallbacks, 1, __ATOMIC_RELAXED);
        return AIOTE_DIRECT_FALLBACK;
    }
    __atomic_fetch_add(&e->stats.direct_writes, copied_elems, __ATOMIC_RELAXED);
    if (on_thread)
        async_release(e, op); /* before anyone can hear of the op (its event, its imms) */
    int rc = 0;
    if (status) {
        /* what landed before the failure delivers its imms (as libfabric's
         * writes that completed would); the op itself fails */
        if (nacc)
            deliver_imms(e, 0, op->imm, acc, nacc, bytes);
        push_op_event(e, op->id, status, fi_err, bad);
        atomic_fetch_add(&e->direct_ops_failed, 1);
    } else if (nacc) {
        rc = deliver_imms(e, op->id, op->imm, acc, nacc, bytes);
        if (rc < 0) { /* the bytes are there but the imms can't go: fail the op (typed) */
            push_op_event(e, op->id, -AIOTE_E_PROVIDER, FI_ENOMEM, 0);
            atomic_fetch_add(&e->direct_ops_failed, 1);
            rc = 0;
        } else if (rc == 1) {
            rc = AIOTE_DIRECT_DONE; /* all in rings: complete now */
            atomic_fetch_add(&e->direct_ops_ok, 1);
        }
    } else {
        rc = AIOTE_DIRECT_DONE;
        atomic_fetch_add(&e->direct_ops_ok, 1);
    }
    if (acc != acc_small)
        free(acc);
    return rc;
}

int direct_run(aiote_engine *e, struct op *op) { return direct_copy(e, op, false); }

/* ---- copy threads: direct ops larger than direct_max ---------------------
 * The caller's thread (the event loop) only queues them; a copy thread of the
 * engine copies them with the same protocol (holds, generation check, pidfd)
 * and reports the op by event, as libfabric's completions are reported.  The
 * op keeps its local region referenced and its elements counted in
 * `outstanding` until then.  Cancellation and close are seen between chunks
 * (at most 1024 elements or 64 MiB): what is not copied yet is withdrawn and
 * the op fails (AIOTE_E_CLOSED); the imms of what landed are delivered. */
struct dcopier {
    pthread_mutex_t lock;
    pthread_cond_t cond;       /* work, stop, gate released */
    pthread_cond_t gate_cond;  /* a thread reached the gate */
    struct op *head, *tail;
    struct op **running;       /* per thread: the op it copies (cancel marks it) */
    pthread_t *threads;
    uint32_t nthreads;
    bool stop;
    int gate;                  /* tests: hold copy threads at their next checkpoint */
    int at_gate;
};

static inline bool op_cancelled(const struct op *op) { return __atomic_load_n(&op->cancelled, __ATOMIC_ACQUIRE); }

static bool async_checkpoint(aiote_engine *e, struct op *op)
{
    struct dcopier *c = e->dcp;
    if (__atomic_load_n(&c->gate, __ATOMIC_ACQUIRE)) {
        pthread_mutex_lock(&c->lock);
        if (c->gate && !c->stop) {
            c->at_gate++;
            pthread_cond_broadcast(&c->gate_cond);
            while (c->gate && !c->stop)
                pthread_cond_wait(&c->cond, &c->lock);
            c->at_gate--;
        }
        pthread_mutex_unlock(&c->lock);
    }
    return op_cancelled(op) || atomic_load(&e->stopping);
}

/* The op's local region reference and its room in the queue bound go back
 * before its event is pushed: whoever hears of it may deregister the region
 * or submit more at once. */
static void async_release(aiote_engine *e, struct op *op)
{
    pthread_mutex_lock(&e->mr_lock);
    e->mrs[op->mr_index].refs--;
    pthread_mutex_unlock(&e->mr_lock);
    atomic_fetch_sub(&e->outstanding, op->n_submitted);
}

static void async_fail(aiote_engine *e, struct op *op, int32_t status, int fi_err, uint64_t index)
{
    async_release(e, op);
    push_op_event(e, op->id, status, fi_err, index);
    atomic_fetch_add(&e->direct_ops_failed, 1);
    op_free(op);
}

struct copier_arg {
    aiote_engine *e;
    uint32_t idx;
};

static void *copier_main(void *arg)
{
    struct copier_arg *ca = arg;
    aiote_engine *e = ca->e;
    uint32_t me = ca->idx;
    free(ca);
    struct dcopier *c = e->dcp;
    pthread_mutex_lock(&c->lock);
    for (;;) {
        while (!c->head && !c->stop)
            pthread_cond_wait(&c->cond, &c->lock);
        struct op *op = c->head;
        if (!op)
            break; /* stopping, nothing queued */
        c->head = op->next;
        if (!c->head)
            c->tail = NULL;
        op->next = NULL;
        if (c->stop || op_cancelled(op)) { /* withdrawn before any byte moved */
            pthread_mutex_unlock(&c->lock);
            async_fail(e, op, -AIOTE_E_CLOSED, FI_ECANCELED, 0);
            pthread_mutex_lock(&c->lock);
            continue;
        }
        c->running[me] = op;
        pthread_mutex_unlock(&c->lock);
        int r = direct_copy(e, op, true);
        pthread_mutex_lock(&c->lock);
        c->running[me] = NULL;
        pthread_mutex_unlock(&c->lock);
        __atomic_fetch_add(&e->stats.direct_worker_ops, 1, __ATOMIC_RELAXED);
        if (r == AIOTE_DIRECT_FALLBACK) {
            /* nothing copied: libfabric takes it (its reservation and region reference go
             * with it); a closed engine refuses it, and it fails here */
            uint64_t id = op->id;
            if (engine_handoff(e, op) != 0) {
                push_op_event(e, id, -AIOTE_E_CLOSED, FI_ECANCELED, 0);
                atomic_fetch_add(&e->direct_ops_failed, 1);
            }
        } else {
            /* direct_copy gave back the region reference and the queue room already */
            if (r == AIOTE_DIRECT_DONE)
                push_op_event(e, op->id, 0, 0, 0);
            op_free(op);
        }
        pthread_mutex_lock(&c->lock);
    }
    pthread_mutex_unlock(&c->lock);
    return NULL;
}

static struct dcopier *copier_start(aiote_engine *e)
{
    pthread_mutex_lock(&e->dcp_lock);
    struct dcopier *c = e->dcp;
    if (c || atomic_load(&e->stopping)) {
        pthread_mutex_unlock(&e->dcp_lock);
        return c;
    }
    uint32_t n = e->cfg.direct_workers > 0 ? (uint32_t)e->cfg.direct_workers : 1;
    if (n > 16)
        n = 16;
    c = calloc(1, sizeof *c);
    if (c) {
        c->threads = calloc(n, sizeof *c->threads);
        c->running = calloc(n, sizeof *c->running);
    }
    if (!c || !c->threads || !c->running) {
        if (c) {
            free(c->threads);
            free(c->running);
        }
        free(c);
        pthread_mutex_unlock(&e->dcp_lock);
        return NULL;
    }
    pthread_mutex_init(&c->lock, NULL);
    pthread_cond_init(&c->cond, NULL);
    pthread_cond_init(&c->gate_cond, NULL);
    __atomic_store_n(&e->dcp, c, __ATOMIC_RELEASE); /* before the threads start: they read it */
    for (uint32_t i = 0; i < n; i++) {
        struct copier_arg *ca = malloc(sizeof *ca);
        if (!ca)
            break;
        *ca = (struct copier_arg){e, i};
        if (pthread_create(&c->threads[i], NULL, copier_main, ca) != 0) {
            free(ca);
            break;
        }
        pthread_setname_np(c->threads[i], "aiote-copier");
        c->nthreads++;
    }
    if (!c->nthreads) {
        e->dcp = NULL;
        pthread_cond_destroy(&c->cond);
        pthread_cond_destroy(&c->gate_cond);
        pthread_mutex_destroy(&c->lock);
        free(c->threads);
        free(c->running);
        free(c);
        c = NULL;
    }
    pthread_mutex_unlock(&e->dcp_lock);
    return c;
}

/* Queue a checked op (local region referenced, elements reserved) for a copy
 * thread.  0: queued (an event reports it); AIOTE_DIRECT_FALLBACK: no copy
 * thread (post it through libfabric); -AIOTE_E_CLOSED. */
int direct_async(aiote_engine *e, struct op *op)
{
    struct dcopier *c = __atomic_load_n(&e->dcp, __ATOMIC_ACQUIRE);
    if (!c)
        c = copier_start(e);
    if (!c)
        return atomic_load(&e->stopping) ? -AIOTE_E_CLOSED : AIOTE_DIRECT_FALLBACK;
    pthread_mutex_lock(&c->lock);
    if (c->stop || atomic_load(&e->stopping)) {
        pthread_mutex_unlock(&c->lock);
        aiote_set_error("engine is closed");
        return -AIOTE_E_CLOSED;
    }
    op->next = NULL;
    if (c->tail)
        c->tail->next = op;
    else
        c->head = op;
    c->tail = op;
    pthread_cond_signal(&c->cond);
    pthread_mutex_unlock(&c->lock);
    return 0;
}

/* aiote_cancel: mark the op if a copy thread has it (queued or copying). */
void direct_async_cancel(aiote_engine *e, uint64_t op_id)
{
    struct dcopier *c = __atomic_load_n(&e->dcp, __ATOMIC_ACQUIRE);
    if (!c)
        return;
    pthread_mutex_lock(&c->lock);
    for (struct op *op = c->head; op; op = op->next)
        if (op->id == op_id)
            __atomic_store_n(&op->cancelled, true, __ATOMIC_RELEASE);
    for (uint32_t i = 0; i < c->nthreads; i++)
        if (c->running[i] && c->running[i]->id == op_id)
            __atomic_store_n(&c->running[i]->cancelled, true, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&c->lock);
}

/* Engine shutdown (e->stopping is set): the threads finish the chunk they
 * copy, fail the rest (AIOTE_E_CLOSED) and exit. */
void direct_async_stop(aiote_engine *e)
{
    pthread_mutex_lock(&e->dcp_lock);
    struct dcopier *c = e->dcp;
    pthread_mutex_unlock(&e->dcp_lock);
    if (!c)
        return;
    pthread_mutex_lock(&c->lock);
    bool joined = c->stop;
    c->stop = true;
    pthread_cond_broadcast(&c->cond);
    pthread_mutex_unlock(&c->lock);
    if (!joined)
        for (uint32_t i = 0; i < c->nthreads; i++)
            pthread_join(c->threads[i], NULL);
    /* the struct stays until direct_async_free: a late submission finds it stopped */
}

/* aiote_engine_free: after shutdown. */
void direct_async_free(aiote_engine *e)
{
    struct dcopier *c = e->dcp;
    if (!c)
        return;
    e->dcp = NULL;
    pthread_cond_destroy(&c->cond);
    pthread_cond_destroy(&c->gate_cond);
    pthread_mutex_destroy(&c->lock);
    free(c->threads);
    free(c->running);
    free(c);
}

int aiote_direct_pause(aiote_engine *e, int on)
{
    struct dcopier *c = __atomic_load_n(&e->dcp, __ATOMIC_ACQUIRE);
    if (!c)
        c = copier_start(e);
    if (!c) {
        aiote_set_error("the engine has no direct-path copy threads");
        return -AIOTE_E_INVAL;
    }
    pthread_mutex_lock(&c->lock);
    __atomic_store_n(&c->gate, on ? 1 : 0, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&c->cond);
    pthread_mutex_unlock(&c->lock);
    return 0;
}

int aiote_direct_wait_paused(aiote_engine *e, uint32_t timeout_ms)
{
    struct dcopier *c = __atomic_load_n(&e->dcp, __ATOMIC_ACQUIRE);
    if (!c)
        return 0;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += timeout_ms / 1000;
    ts.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&c->lock);
    int rc = 0;
    while (!c->at_gate && rc == 0)
        rc = pthread_cond_timedwait(&c->gate_cond, &c->lock, &ts);
    int r = c->at_gate > 0;
    pthread_mutex_unlock(&c->lock);
    return r;
}
