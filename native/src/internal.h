/* Internal structures of the aiote native core (not part of the cffi API). */
#ifndef AIOTE_INTERNAL_H
#define AIOTE_INTERNAL_H

#include <sys/uio.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <stdbool.h>

#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_eq.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>

#include "aiote.h"

#define AIOTE_ADDR_MAX 256
#define MSG_MAGIC 0x6169u /* "ai" */
#define MSG_VERSION 1u
#define IMM_UNIT_SHIFT AIOTE_IMM_MAX_SHARD_LOG /* one whole write = 1 << 15 units */

void aiote_set_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ---- contexts handed to libfabric ------------------------------------ */
enum ctx_kind { CTX_TX = 1, CTX_RECV = 2 };

struct ctx_hdr {
    struct fi_context2 fi; /* must stay first: providers in FI_CONTEXT mode use it */
    int kind;
};

struct op;
struct nic;
#define BIG_WRITE (256u * 1024) /* see big_inflight */

struct tx_ctx {
    struct ctx_hdr h;
    struct op *op;
    struct nic *nic;
    int send_slot; /* -1 for RMA */
    uint32_t peer;  /* whom it went to: a dead peer's contexts are failed */
    uint64_t index; /* element of the op */
    uint64_t carry; /* carried-writes message: its sequence number + 1 (carry.c), else 0 */
    bool big;       /* an RMA write of at least BIG_WRITE bytes (counted in big_inflight) */
    struct tx_ctx *next_free;
};

struct recv_slot {
    struct ctx_hdr h;
    uint8_t *buf;
};

/* ---- memory regions --------------------------------------------------- */
struct mr_slot {
    struct fid_mr *mr[AIOTE_MAX_NICS];
    void *desc[AIOTE_MAX_NICS];
    uint8_t *addr;
    uint64_t len;
    uint32_t gen;
    bool used;
    bool device; /* CUDA memory (FI_HMEM): never copied by the direct path */
    bool closing; /* being deregistered (direct-path drain, mr_lock not held): unknown to lookups */
    bool remote;  /* registered for remote writes */
    uint64_t key0; /* its key on NIC 0 (carried writes name regions by it, carry.c) */
    uint64_t base; /* the address remote writes name its first byte by (0 or addr) */
    int64_t refs; /* operations using it; deregistration is refused while > 0 */
};

/* ---- operations -------------------------------------------------------- */
enum op_kind { OP_WRITES = 1, OP_PAGED = 2, OP_SEND = 3, OP_CTRL = 4, OP_PING = 5, OP_ARRIVE = 6, OP_IMMS = 7,
               OP_NOTE = 8 /* carry.c: a message of the engine's own that nobody waits for (acknowledgement, hello) */ };
#define CONN_TRIED 1u /* struct peer.conn */
#define CONN_TAKEN 2u
#define MSG_FLAG_PING 1u /* message header flag: a liveness probe, dropped by the receiver */
#define MSG_FLAG_IMMS 4u /* message header flag: imms of direct writes (direct.c), counted in C */
#define IMMS_MAGIC 0x534d4d49u /* "IMMS" */
#define MSG_FLAG_CARRY 8u  /* message header flag: small writes carried in the message (carry.c) */
#define MSG_FLAG_CACK 16u  /* message header flag: the target's acknowledgement of them */
#define MSG_FLAG_CHELLO 32u /* message header flag: "I take carried writes" (a hello or its answer) */
/* direct.c: what aiote_submit_* return when the direct path did the op */
#define AIOTE_DIRECT_DONE 1
#define AIOTE_DIRECT_FALLBACK 2

typedef int (*ctrl_fn)(aiote_engine *e, void *arg);

/* A remote region; immutable once made, never freed before the engine, so
 * queued elements can point at it. */
struct dpeer;
struct dtable;
struct rdesc {
    uint32_t peer;
    uint64_t base, len;
    uint64_t keys[AIOTE_MAX_NICS];
    /* direct path (direct.c): the target's key table, the slot and state the
     * region was found with (dslot UINT32_MAX: not there, i.e. stale); dp NULL:
     * libfabric only */
    struct dpeer *dp;
    uint32_t dslot;
    uint64_t dstate;
};

/* One element of a write batch, resolved at submission. */
struct welem {
    const struct rdesc *rd;
    uint64_t src_off, dst_off, len;
};

struct op {
    struct op *next;                  /* submission / pending list */
    struct op *live_prev, *live_next; /* every op the worker owns */
    uint64_t id;
    int kind;
    bool cancelled;
    bool posted_all;       /* every element posted (or posting stopped) */
    uint64_t eagain_since; /* when the provider started refusing it (ns), 0 if not */
    uint64_t retry_at;     /* refused for a while: not offered again before this (ns), 0: now */

    /* writes */
    uint32_t mr_index; /* local region (refs held) */
    uint8_t *local_base;
    bool local_device; /* the local region is CUDA memory */
    void *local_desc[AIOTE_MAX_NICS];
    int has_imm;
    uint32_t imm;
    size_t n;           /* elements still to post (cut short on error/cancel) */
    size_t n_submitted; /* elements submitted (backpressure accounting) */
    size_t next_post;   /* first element not fully posted yet */
    uint32_t next_shard; /* of element next_post */
    size_t inflight;    /* posted shards, not completed */
    struct welem *wrs;  /* OP_WRITES */
    /* OP_PAGED: element i computed on the fly */
    const struct rdesc *rd;
    uint64_t page_len;
    uint64_t src_stride, src_off, dst_stride, dst_off;
    int64_t *src_pages, *dst_pages;

    /* send */
    uint32_t peer;
    uint8_t *msg;
    size_t msg_len;
    uint32_t msg_flags;

    /* OP_IMMS: element i tells peer ipeers[i] that icounts[i] writes of imm landed */
    uint32_t *ipeers;
    uint64_t *icounts;

    /* control (runs on the worker; the caller waits on done) */
    ctrl_fn fn;
    void *arg;
    int ctrl_rc;
    char err[256];
    sem_t done;

    /* CUDA gate (cuda_copy.c): not posted before this event has completed */
    void *cu_ctx, *cu_event;
    uint64_t arrive_count; /* OP_ARRIVE: whole writes of imm to count then */

    /* outcome */
    int32_t status, fi_errno, prov_errno, nic;
    uint64_t bad_index;
};

/* Element i of a writes or paged op (a paged one's are computed on the fly). */
static inline void op_elem(const struct op *op, size_t i, struct welem *w)
{
    if (op->kind == OP_WRITES) {
        *w = op->wrs[i];
        return;
    }
    w->rd = op->rd;
    w->len = op->page_len;
    w->src_off = op->src_off + (uint64_t)op->src_pages[i] * op->src_stride;
    w->dst_off = op->dst_off + (uint64_t)op->dst_pages[i] * op->dst_stride;
}

/* ---- watchers ------------------------------------------------------------ */
struct reaction {
    uint64_t threshold, id, seq;
    uint32_t prep; /* 0: notify only */
    struct reaction *next; /* sorted by (threshold, seq) */
};

struct watch {
    const volatile uint64_t *word; /* NULL: free slot */
    struct reaction *head;
};

struct prepared {
    struct op *tmpl; /* NULL: free slot */
    uint32_t armed;  /* reactions referring to it */
    uint32_t posting; /* aiote_post_prepared calls using it now (free waits for none) */
};

/* ---- ImmCounter table --------------------------------------------------- */
struct imm_waiter {
    uint64_t id;
    uint32_t imm;
    uint64_t units; /* needed */
    struct imm_waiter *next;  /* FIFO on the entry */
    struct imm_waiter *hnext; /* id hash chain */
};

struct imm_entry {
    uint32_t imm;
    uint64_t units; /* arrived, not consumed */
    struct imm_waiter *head, *tail;
    struct imm_entry *hnext;
};

struct imm_table {
    pthread_mutex_t lock;
    struct imm_entry **buckets;
    size_t nbuckets, nentries;
    struct imm_waiter **wbuckets;
    size_t nwbuckets, nwaiters;
};

int imm_table_init(struct imm_table *t);
void imm_table_destroy(struct imm_table *t);
/* Worker: add arrivals (wire imm values); fired waiters become events. */
struct event_buf;
void imm_table_arrive(struct imm_table *t, const uint32_t *wire, size_t n, struct event_buf *out);
int imm_table_wait(struct imm_table *t, uint64_t waiter_id, uint32_t imm, uint64_t count);
int imm_table_cancel(struct imm_table *t, uint64_t waiter_id, struct event_buf *out);
int imm_table_restore(struct imm_table *t, uint32_t imm, uint64_t count, struct event_buf *out);
uint64_t imm_table_pending(struct imm_table *t, uint32_t imm);

/* ---- event queue -------------------------------------------------------- */
struct event_buf {
    aiote_event *ev;
    size_t n, cap;
};
int event_buf_push(struct event_buf *b, const aiote_event *ev);

struct event_queue {
    pthread_mutex_t lock;
    struct event_buf q;
    size_t head; /* first undelivered in q */
    int efd;
    bool armed; /* the loop is waiting: the next push must write the eventfd */
    _Atomic size_t avail; /* events waiting (aiote_events_pending: read without the lock) */
    atomic_bool spinning; /* a spinning event loop polls avail (aiote_loop_spin): no eventfd writes */
    _Atomic uint64_t flushes; /* flushes with events: the worker's idle spin yields only after one (worker.c) */
};

int event_queue_init(struct event_queue *q);
void event_queue_destroy(struct event_queue *q);
/* Move all of b into the queue (b is emptied); one eventfd write at most. */
void event_queue_flush(struct event_queue *q, struct event_buf *b);
size_t event_queue_take(struct event_queue *q, aiote_event *out, size_t max);

/* ---- NICs and peers ----------------------------------------------------- */
struct local_ep;

struct nic {
    int index;
    struct fi_info *fi;
    struct fid_fabric *fabric;
    struct fid_domain *domain;
    struct fid_av *av;
    struct fid_cq *cq;
    struct fid_ep *ep;
    int cq_fd; /* -1 if the CQ has no fd wait object */
    uint8_t addr[AIOTE_ADDR_MAX];
    size_t addr_len;
    struct local_ep *local; /* this endpoint, if shm */
    struct tx_ctx *tx_ctxs, *tx_free;
    size_t ntx;
    size_t inflight, max_inflight;
    atomic_bool failed;
    aiote_nic_counters stats;
};

struct peer {
    uint32_t nnics;
    fi_addr_t fi[AIOTE_MAX_NICS][AIOTE_MAX_NICS]; /* [our NIC][their NIC] */
    struct local_ep *local[AIOTE_MAX_NICS];       /* their NIC j, if a same-process shm endpoint */
    /* shm: our own endpoint per NIC for traffic to this peer.  The provider
     * completes an endpoint's operations in order, so a dead peer's writes
     * (which never complete) would stall every later one; on its own
     * endpoint they stall nothing else and die with it.  NULL: the NIC's. */
    struct fid_ep *ep[AIOTE_MAX_NICS];
    /* shm: per [our NIC][their NIC], CONN_TRIED once a post was attempted,
     * CONN_TAKEN once one was accepted.  libfabric 1.17's shm refuses posts
     * (-FI_EAGAIN) until the peer's progress has taken our connection request;
     * TRIED without TAKEN means a request of ours may still wait in its queue
     * (see conn_requests_pending, worker.c). */
    uint8_t conn[AIOTE_MAX_NICS][AIOTE_MAX_NICS];
    int pid;      /* shm: the peer's process (from its address), 0 if unknown */
    int pidfd;    /* readable once that process has exited; -1 if none */
    atomic_bool gone; /* its process exited: everything to it fails from now on */
    atomic_int watch;      /* armed waits that need to hear of its death (aiote_peer_watch) */
    struct dpeer *dpeer;   /* its direct-path key table (direct.c), NULL if none */
    bool dpeer_tried;
    bool ping_inflight;
    uint8_t carry; /* carry.c: CARRY_PEER_* (worker) */
    uint64_t next_ping_ns;
    size_t blob_len;
    uint8_t blob[]; /* the address bytes it was inserted with (cache key) */
};

/* ---- the engine --------------------------------------------------------- */
struct aiote_engine {
    aiote_config cfg;
    aiote_info info;
    uint64_t peer_timeout_ns;
    bool is_shm;
    /* writes on one connection are placed in order (FI_ORDER_WAW, unbounded
     * max_order_waw_size, one NIC): only a batch's last write to a region asks
     * for delivery-complete (worker.c, dc_needed) */
    bool waw_ordered;
    uint64_t local_seq; /* shm: when it opened (local_peers.c), 0 if not counted */
    bool defer_teardown; /* shm: same-process peers may still answer into our regions */

    struct nic nics[AIOTE_MAX_NICS];
    uint32_t nnics;
    uint32_t rr; /* round-robin cursor (worker) */
    uint8_t self_blob[1 + AIOTE_MAX_NICS * (2 + AIOTE_ADDR_MAX)]; /* MSG_SRC_MAX */
    size_t self_blob_len;

    /* memory regions */
    pthread_mutex_t mr_lock;
    struct mr_slot *mrs;
    size_t nmrs, cap_mrs;

    /* peers (grown by the worker; submitters read npeers under peer_lock) and
     * remote regions (stable pointers) */
    pthread_mutex_t peer_lock;
    struct peer **peers;
    size_t npeers, cap_peers;
    struct rdesc **rdescs;
    size_t nrdescs, cap_rdescs;

    /* submission queue: many producers, the worker consumes */
    pthread_mutex_t sub_lock;
    struct op *sub_head, *sub_tail;
    uint64_t *cancel_ids;
    size_t ncancel, cap_cancel;
    atomic_size_t outstanding; /* elements submitted, not finished: backpressure */
    int sub_efd;
    atomic_bool worker_sleeping;
    atomic_bool sub_pending; /* submissions or cancels wait in the queue */
    size_t nctrl;            /* control ops in the queue (under sub_lock) */
    atomic_bool stopping;
    bool worker_started;
    pthread_t worker;

    /* Loop-spin mode (aiote_loop_spin, aiote_progress): the event loop's thread
     * does part of the worker's work between its own spins.  progress_lock
     * makes the worker's passes and the loop's exclusive (the loop only
     * try-locks); the state below marked "worker-private" is touched only
     * under it.  progress_seq counts the loop's passes, so a worker that
     * rests while the loop drives can tell when the loop stopped driving
     * (busy in Python) and step in. */
    pthread_mutex_t progress_lock;
    atomic_uint_fast64_t progress_seq;
    uint64_t seen_seq;   /* worker: progress_seq at its last look */
    uint64_t fab_seen_ns; /* worker: when its last pass found libfabric completions */
    pthread_t driver;    /* the thread that turned loop-spin on */
    atomic_bool has_driver;

    /* worker-private state */
    struct op *pend_head, *pend_tail; /* submitted, not fully posted */
    struct op *live;                  /* all ops the worker owns */
    struct op *gated_head, *gated_tail; /* waiting for their CUDA copies (linked by next) */
    struct recv_slot *recv_slots;     /* messages use NIC 0 */
    struct fid_mr *recv_mr, *send_mr;
    uint8_t *recv_arena, *send_arena;
    size_t slot_size;
    int *send_free;
    size_t nsend_free;
    struct event_buf pending_events;

    struct imm_table imms;
    struct event_queue events;

    uint64_t next_liveness_ns; /* worker: next check of peers' processes and pings */

    /* watchers (under watch_lock; the worker polls while narmed > 0) */
    pthread_mutex_t watch_lock;
    struct watch *watches;
    size_t nwatches;
    struct prepared *preps;
    size_t npreps;
    uint64_t reaction_seq;
    atomic_size_t narmed;
    bool fine_slack; /* worker: 1 us timer slack while reactions are armed */

    /* watchdog (shm): a peer killed inside libfabric shm's critical section
     * leaves a spin lock in its region held forever, and whoever posts to it
     * next spins forever.  The worker says whom it posts to; a thread notices
     * the worker stuck there with that peer dead and declares the engine
     * wedged (Python fails everything; shutdown leaves the thread behind). */
    atomic_uint posting_peer;   /* peer index + 1 during a provider post to it, else 0 */
    atomic_uint_fast64_t post_seq;
    atomic_bool wedged;
    bool watchdog_started;
    pthread_t watchdog;
    pthread_mutex_t wd_lock;
    pthread_cond_t wd_cond;
    uint64_t ping_interval_ns;

    /* direct path (direct.c): our key table as a target; the largest op it copies */
    struct dtable *dtab;
    uint64_t direct_max;
    uint64_t inline_max; /* direct writes up to this size go inline (0: never) */
    bool inline_wake;    /* ... even to a sleeping target (AIOTE_DIRECT_INLINE_WAKE=1; experimental) */
    pthread_mutex_t ipend_lock;  /* inline batches handed to the worker for their ack (direct.c) */
    struct ipend *ipend;
    atomic_uint ipend_n;
    atomic_uint_fast64_t direct_ops_ok, direct_ops_failed; /* finished on callers' or copy threads */
    struct dcopier *dcp; /* the copy threads for direct ops above direct_max (NULL: none started) */
    struct assist *assist; /* copy assistants (copy_assist.c; NULL: none started) */
    bool assist_off;       /* none to be started (stopping, or they could not start) */
    pthread_mutex_t dcp_lock;

    /* carried writes (carry.c): the initiator's records of messages awaiting their
     * acknowledgement (a ring indexed by sequence number), and the target's index of
     * its regions by key (rebuilt under mr_lock when regions changed) */
    uint64_t carry_max;
    struct carry_rec *carry_recs;
    uint64_t carry_seq;   /* next sequence number */
    uint64_t carry_acked; /* records below this are settled */
    uint32_t *mrkeys;
    size_t mrkeys_cap;
    bool mrkeys_dirty;
    bool hello_wanted; /* some peer's carry state is CARRY_PEER_WANTED */
    /* RMA writes of at least BIG_WRITE bytes in flight: while any are, the worker keeps
     * driving progress even when the event loop spins (await-spin): the provider feeds
     * their bytes to the socket on every progress call, and a loop that runs Python
     * between its calls fed 1 MiB tcp streams ~15 % slower than a worker beside it */
    uint32_t big_inflight;
    /* after post_pending: ns until the first refused op may be offered again; 0 when some
     * op can be tried at once (or the scan stopped early): the worker naps only if > 0 */
    uint64_t retry_wait_ns;

    /* statistics: written by the worker, read racily (monotonic counters) */
    aiote_stats stats;
};

/* cuda_copy.c */
const char *cu_error_name(int rc);
int cu_issue(void *ctx, void *stream, int wait, void *wait_stream, const aiote_copy *copies, size_t n,
             void **event_out);
/* lanes for cu_issue_lanes: copies[i] on lanes[2*lane_of[i]] (stream, event pairs) */
struct cu_lanes {
    const uint8_t *lane_of;
    const uint64_t *lanes;
    size_t nlanes;
    void *fork_event;
};
int cu_issue_lanes(void *ctx, void *stream, int wait, void *wait_stream, const aiote_copy *copies, size_t n,
                   const struct cu_lanes *lanes, void **event_out);
int cu_poll(void *ctx, void *event);
void cu_release(void *ctx, void *event, bool sync);

/* local_peers.c: same-process shm engines (see there) */
struct local_ep {
    uint8_t addr[AIOTE_ADDR_MAX];
    size_t len;
    atomic_bool open;
    int refs;
    struct local_ep *next;
};
struct local_ep *local_register(const uint8_t *addr, size_t len);
struct local_ep *local_lookup(const uint8_t *addr, size_t len);
void local_unref(struct local_ep *l);
void local_read_lock(void);
void local_read_unlock(void);
void local_close_begin(void);
void local_close_end(void);
/* Teardown of a closed shm engine's libfabric objects, deferred while other
 * engines of the process that may still touch its regions live (see there). */
struct deferred;
struct deferred *deferred_new(void);
void deferred_fid(struct deferred *d, struct fid *f);   /* fi_close, in the order added */
void deferred_info(struct deferred *d, struct fi_info *fi);
void deferred_free(struct deferred *d, void *p);
uint64_t local_engine_opened(aiote_engine *e);
/* Under local_close_begin(): does another engine of the process wait for x? */
bool local_others_inflight_to(aiote_engine *x);
bool drain_local_inflight(aiote_engine *e, uint64_t budget_ns); /* worker.c */
bool conn_requests_pending(aiote_engine *e);                     /* worker.c */
/* Under local_close_begin(): the engine is closed; d's objects (NULL: closed
 * already) are kept for the life of the process (see there). */
void local_engine_closed(aiote_engine *e, uint64_t open_seq, struct deferred *d);
/* Under local_close_begin(), after a drain: the other engines forget e. */
void local_detach(aiote_engine *x);

/* wire.c */
#define MSG_SRC_MAX (1 + AIOTE_MAX_NICS * (2 + AIOTE_ADDR_MAX))
struct msg_view {
    size_t src_off, src_len, payload_off, payload_len;
};
int parse_addrs(const uint8_t *b, size_t len, uint32_t *n, const uint8_t **addrs, size_t *lens);
int parse_msg(const uint8_t *b, size_t len, struct msg_view *out);
#define CARRY_MAGIC 0x59525243u /* "CRRY" */
#define CACK_MAGIC 0x4b434143u  /* "CACK" */
#define CARRY_HDR 24
#define CARRY_ENT 20
#define CARRY_MAX_ENTS 1024
#define CARRY_F_IMM 1u
#define CACK_LEN 24
struct carry_view {
    uint64_t seq;
    uint32_t count, imm;
    bool has_imm;
    const uint8_t *ents, *data;
};
struct cack_view {
    uint64_t seq;
    uint32_t applied, fi_errno;
    int32_t status;
};
int parse_carry(const uint8_t *b, size_t len, struct carry_view *out);
int parse_cack(const uint8_t *b, size_t len, struct cack_view *out);

/* fabric.c */
struct mr_reg_arg {
    void *addr;
    uint64_t len;
    int access;
    int cuda_device; /* -1: host memory */
    uint64_t mr_id, base;
    uint64_t keys[AIOTE_MAX_NICS];
};
struct peer_arg {
    const uint8_t *addrs;
    size_t len;
    uint32_t peer;
};
struct mr_close_arg {
    struct fid_mr *mr[AIOTE_MAX_NICS];
};

int fabric_open(aiote_engine *e);
void fabric_close(aiote_engine *e);
int fabric_post_recv(aiote_engine *e, struct recv_slot *s);
int ctrl_nic_fail(aiote_engine *e, void *arg);
int ctrl_mr_register(aiote_engine *e, void *arg);
int ctrl_mr_close(aiote_engine *e, void *arg);
int ctrl_peer_insert(aiote_engine *e, void *arg);

/* worker.c */
void *worker_main(void *arg);
void loop_post_now(aiote_engine *e); /* loop-spin mode, not shm: post queued work from the calling thread */
void *watchdog_main(void *arg);
bool poll_watches(aiote_engine *e);
struct op *op_clone(const struct op *tmpl, uint64_t id);
void op_free(struct op *op);
void fail_nic_inflight(aiote_engine *e, struct nic *n, int fi_err);
void peer_down(aiote_engine *e, uint32_t idx, int fi_err);

/* engine.c */
int enqueue_op(aiote_engine *e, struct op *op);

/* carry.c: small writes carried in one message that the target applies (not shm).
 * carry_post: CARRY_SKIP when op's element i does not start a carried run (post it
 * through libfabric), else as post_shard (0 posted: *adv elements, 1 -FI_EAGAIN, 2 no
 * context or record free, < 0 -fi_errno). */
#define CARRY_SKIP 1000
#define CARRY_PEER_UNKNOWN 0 /* no carried writes to it yet */
#define CARRY_PEER_ASKED 1   /* our hello is on its way */
#define CARRY_PEER_READY 2   /* it said it takes them (and its messages reach us) */
#define CARRY_PEER_WANTED 3  /* a hello is to be sent (not from inside post_pending: it queues an op) */
struct tx_ctx;
struct recv_slot;
int carry_open(aiote_engine *e);
void carry_free(aiote_engine *e);
bool carry_follows(const aiote_engine *e, const struct op *op, size_t i); /* element i would be carried */
int carry_post(aiote_engine *e, struct op *op, size_t i, size_t *adv, int *nic_out);
void carry_sent(aiote_engine *e, struct tx_ctx *c);        /* its send completed */
void carry_send_failed(aiote_engine *e, struct tx_ctx *c); /* its record gets no acknowledgement */
/* messages: a target applies (and acknowledges) carried writes; an initiator takes acknowledgements */
void carry_apply(aiote_engine *e, const uint8_t *msg, const struct msg_view *v);
void carry_ack(aiote_engine *e, const uint8_t *msg, const struct msg_view *v);
void carry_hello(aiote_engine *e, const uint8_t *msg, const struct msg_view *v);
void carry_send_hellos(aiote_engine *e); /* the hellos carry_post asked for (e->hello_wanted) */
void carry_fail_peer(aiote_engine *e, uint32_t peer, int fi_err); /* its records fail (it is down) */
void carry_check(aiote_engine *e, uint64_t now); /* records older than peer_timeout fail */
void carry_close(aiote_engine *e);               /* engine closing: records are dropped */
/* worker.c, for carry.c */
void op_settle(aiote_engine *e, struct op *op); /* one in-flight unit of op ended */
void op_fail(struct op *op, int32_t status, int fi_err, uint64_t index);
void queue_internal_send(aiote_engine *e, uint32_t peer, void *msg, size_t len, uint32_t flags);

/* direct.c */
int direct_table_open(aiote_engine *e);
void direct_table_close(aiote_engine *e, uint64_t timeout_ns);
void direct_worker_begin(aiote_engine *e); /* the worker holds the table's liveness word */
void direct_worker_end(aiote_engine *e);
void direct_publish(aiote_engine *e, size_t idx, uint32_t gen, uint64_t key, uint64_t base, uint64_t len);
int direct_unpublish(aiote_engine *e, size_t idx, uint64_t timeout_ns);
void direct_resolve(aiote_engine *e, struct peer *p, struct rdesc *rd);
void direct_peers_free(aiote_engine *e);
/* 0: libfabric; 1: copy on the calling thread (direct_run); 2: a copy thread (direct_async) */
int direct_mode(aiote_engine *e, const struct op *op);
int direct_run(aiote_engine *e, struct op *op);
int direct_async(aiote_engine *e, struct op *op);
void direct_async_cancel(aiote_engine *e, uint64_t op_id);
void direct_async_stop(aiote_engine *e);
/* copy_assist.c: copy a run of iovecs into process pid (the arrays may be
 * modified); a large one (copy_assist.c: 512 KiB on hosts of 8 or more CPUs,
 * else 2 MiB) is shared with the engine's copy assistants.  Returns the contiguous prefix that landed; *err:
 * 0 or the errno that ended it. */
uint64_t assist_copy(aiote_engine *e, int pid, struct iovec *liov, size_t nl, struct iovec *riov, size_t nr,
                     uint64_t total, int *err);
void assist_stop(aiote_engine *e);
void assist_free(aiote_engine *e);
void direct_async_free(aiote_engine *e);
/* engine.c: hand a reserved, region-referencing op to the worker (libfabric); on failure it is freed */
int engine_handoff(aiote_engine *e, struct op *op);
bool direct_poll_imms(aiote_engine *e);
bool direct_inline_pending(aiote_engine *e); /* inline batches wait for their target's ack */
void direct_inline_close(aiote_engine *e);
bool direct_sleep_begin(aiote_engine *e);
void direct_imm_armed(aiote_engine *e);
void direct_imms_settle(aiote_engine *e, bool only_lazy);
void direct_sleep_end(aiote_engine *e);

/* fabric.c: per-peer endpoints (shm) */
int peer_open_eps(aiote_engine *e, struct peer *p);
void peer_close(aiote_engine *e, struct peer *p);
bool peer_process_gone(struct peer *p);

#endif
