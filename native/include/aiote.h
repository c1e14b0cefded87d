/* aiote native API: the whole surface that Python (cffi) sees.
 *
 * One engine = one libfabric provider endpoint set driven by one worker
 * thread.  Python submits operations (batches of RMA writes, sends), arms imm
 * thresholds, and drains an event queue when the engine's eventfd becomes
 * readable.  Every libfabric call on a live engine happens on the worker
 * thread, so providers can run with FI_THREAD_DOMAIN.
 *
 * Lines starting with '#' are stripped before cffi parses this file; keep the
 * declarations plain C.  Return codes: 0 (or a count) on success, a negative
 * AIOTE_E* code on failure; aiote_last_error() describes the latest failure
 * on the calling thread.
 */
#ifndef AIOTE_H
#define AIOTE_H
#include <stddef.h>
#include <stdint.h>

enum {
    AIOTE_ABI_VERSION = 2,

    /* polling modes */
    AIOTE_POLL_BUSY = 0,
    AIOTE_POLL_ADAPTIVE = 1,
    AIOTE_POLL_BLOCKING = 2,

    /* error codes (negative on return) */
    AIOTE_OK = 0,
    AIOTE_E_PROVIDER = 1,   /* libfabric call failed; see fi_errno/prov text */
    AIOTE_E_INVAL = 2,      /* bad argument */
    AIOTE_E_BOUNDS = 3,     /* offset/length outside a region; *bad_index names the element */
    AIOTE_E_NO_MR = 4,      /* unknown or closed memory region */
    AIOTE_E_BUSY = 5,       /* region in use by an operation */
    AIOTE_E_CLOSED = 6,     /* engine is closed */
    AIOTE_E_NOMEM = 7,
    AIOTE_E_PEER = 8,       /* bad peer address or unknown peer */
    AIOTE_E_TOO_BIG = 9,    /* message larger than the engine's message size */
    AIOTE_E_AGAIN = 10,     /* submission queue full: retry later */
    AIOTE_E_NOT_FOUND = 11,
    AIOTE_E_CUDA = 12,      /* a CUDA driver call or copy failed (or there is no usable driver) */

    /* event kinds */
    AIOTE_EV_OP = 1,        /* an operation finished (status 0 or error) */
    AIOTE_EV_IMM = 2,       /* an imm waiter's threshold was reached */
    AIOTE_EV_RECV = 3,      /* a message arrived: data/len/src/src_len */
    AIOTE_EV_PEER_DOWN = 4, /* id = peer index: its process exited or it stopped answering (fi_errno) */
    AIOTE_EV_WATCH = 6,     /* id = reaction id: a watched word reached its threshold (index = value seen) */
    AIOTE_EV_WEDGED = 5,    /* id = peer index: the worker is stuck inside the provider on that dead
                             * peer (shm: a lock its process died holding); the engine is unusable */

    /* imm layout: the top bits are reserved for the shard count of a
     * striped write, so the receiver counts whole logical writes. */
    AIOTE_IMM_BITS = 28,
    AIOTE_IMM_SHARD_SHIFT = 28,
    AIOTE_IMM_MAX_SHARD_LOG = 15,

    /* access flags for registration */
    AIOTE_ACCESS_LOCAL = 1,   /* source of writes / sends */
    AIOTE_ACCESS_REMOTE = 2,  /* target of remote writes */

    /* NICs */
    AIOTE_MAX_NICS = 16,
    AIOTE_ROUTE_ROUND_ROBIN = 0, /* stripe large writes, spread batch elements */
    AIOTE_ROUTE_PINNED = 1,      /* everything on one NIC (pinned_nic) */

    /* message flags (aiote_submit_send) */
    AIOTE_MSG_CTRL = 2,

    /* aiote_submit_writes / aiote_submit_paged returned this: the op is
     * complete already (direct path, no imm): no event will come for it */
    AIOTE_DONE = 1,
};

typedef struct aiote_engine aiote_engine;

typedef struct {
    const char *provider;     /* "shm", "tcp;ofi_rxm", "efa", ... or NULL for the first RMA-capable */
    const char *node;         /* address to bind (e.g. "127.0.0.1"), or NULL */
    const char *domain;       /* domain (NIC) names, comma-separated; cycled over the NICs; NULL = any */
    uint32_t nics;            /* NICs (domain + endpoint each); 0 = 1 */
    int routing;              /* AIOTE_ROUTE_* */
    uint32_t pinned_nic;
    uint64_t stripe_threshold;/* writes this large or larger are striped over NICs; 0 = 256 KiB */
    uint64_t stripe_min;      /* smallest shard; 0 = 64 KiB */
    int polling;              /* AIOTE_POLL_* */
    uint32_t spin_us;         /* adaptive: spin this long before sleeping */
    uint32_t msg_size;        /* largest send/recv payload */
    uint32_t recv_slots;      /* preposted receive buffers */
    uint32_t send_slots;      /* registered send buffers */
    uint32_t max_queued;      /* submission queue bound (elements), 0 = default */
    int delivery_complete;    /* 1: ask for FI_DELIVERY_COMPLETE on writes */
    uint32_t peer_timeout_ms; /* an op the provider refuses this long fails (ETIMEDOUT); 0 = 10 s */
    uint32_t max_inflight;    /* writes/sends in flight per NIC; 0 = the provider's queue size */
    int hmem;                 /* 1: ask for FI_HMEM (device memory registered directly: GPUDirect) */
    int direct_shm;           /* 1: shm peers on this host: copy with process_vm_writev ourselves
                               * (docs/reliability.md, "Direct same-host path"); 0: libfabric only */
    uint64_t direct_max;      /* ops up to this many bytes are copied on the calling thread; 0 = 4 MiB */
    int32_t direct_workers;   /* threads that copy larger direct ops (the caller is not held; the op
                               * completes by event): 0 = 1, < 0 = none (those go through libfabric) */
    int32_t direct_inline;    /* direct writes of at most this many bytes each go inline: copied into
                               * the target's shared-memory ring, applied by the target (0: default
                               * 256, < 0: off) */
    int32_t direct_assist;    /* threads that help copy one large direct run (>= 512 KiB, 2 MiB below 8 CPUs): the
                               * copying thread and they split it; 0 = 1, < 0 = none */
    int32_t carry_max;        /* not shm, one NIC: two or more consecutive writes of one op to one
                               * peer, each at most this many bytes, travel in one message that the
                               * target's worker applies and acknowledges (0: 8 KiB, < 0: off) */
} aiote_config;

typedef struct {
    char provider[64];
    char fabric[64];
    char domain[64];
    uint64_t mr_mode;
    uint64_t mr_key_size;
    uint64_t cq_data_size;
    uint64_t inject_size;
    uint64_t max_msg_size;
    uint64_t tx_size;
    uint64_t rx_size;
    int delivery_complete;    /* writes complete at the target (FI_DELIVERY_COMPLETE) */
    int wait_fd;              /* the CQ offers an fd to sleep on */
    int hmem;                 /* provider advertises FI_HMEM */
    int addr_len;
    int nics;
} aiote_info;

typedef struct {
    uint64_t id;              /* op id or waiter id */
    int32_t kind;             /* AIOTE_EV_* */
    int32_t status;           /* 0, or negative AIOTE_E_* / -fi_errno (see fi_errno) */
    int32_t fi_errno;         /* libfabric errno (positive) when the provider failed */
    int32_t prov_errno;
    uint64_t index;           /* failing element of a batch */
    int32_t nic;              /* failing NIC, -1 if none */
    int32_t _pad;
    void *data;               /* EV_RECV: message buffer (free with aiote_free) */
    uint64_t len;             /* EV_RECV: payload length */
    uint64_t src_off;         /* EV_RECV: sender address offset within data */
    uint64_t src_len;         /* EV_RECV: sender address length */
    uint64_t payload_off;     /* EV_RECV: payload offset within data */
    uint64_t time_ns;         /* EV_WATCH: when the worker saw the value (CLOCK_MONOTONIC) */
} aiote_event;

/* One write of a batch.  len == 0 with has_imm is an imm-only write. */
typedef struct {
    uint32_t rdesc;           /* remote region, from aiote_rdesc_insert */
    uint32_t _pad;
    uint64_t src_off;         /* offset in the local region */
    uint64_t dst_off;         /* offset in the remote region */
    uint64_t len;
} aiote_wr;

/* Per-NIC counters. */
typedef struct {
    uint64_t writes_posted;
    uint64_t bytes_written;
    uint64_t completions;
    uint64_t errors;
    uint64_t imms_received;
    int failed;               /* the NIC was taken out of service */
    int fi_errno;
} aiote_nic_counters;

/* Counters of one engine. */
typedef struct {
    uint64_t ops_submitted;
    uint64_t ops_completed;
    uint64_t ops_failed;
    uint64_t writes_posted;
    uint64_t bytes_written;
    uint64_t imms_received;
    uint64_t msgs_sent;
    uint64_t msgs_received;
    uint64_t eagain;
    uint64_t bad_msgs;
    uint64_t remote_errors;
    uint64_t wakeups;
    uint64_t spin_yields;      /* adaptive polling, not shm: sched_yield calls of the worker's idle
                                * spin (it gives its CPU to a thread woken onto it; only after it
                                * handed events to its loop or posted to a peer) */
    uint64_t direct_writes;    /* writes copied by the direct path */
    uint64_t direct_bytes;
    uint64_t direct_fallbacks; /* ops the direct path handed to libfabric */
    uint64_t direct_worker_ops; /* direct ops copied by the engine's copy threads (above direct_max) */
    uint64_t direct_syscalls;   /* process_vm_writev calls of the direct path */
    uint64_t loop_passes;      /* loop-spin mode: progress passes the event loop's thread ran */
    uint64_t loop_found;       /* ... of which found work (imms, completions) */
    uint64_t direct_inline;    /* direct writes carried inline in the target's ring */
    uint64_t direct_inline_full; /* ops that found that ring full (copied with process_vm_writev) */
    uint64_t direct_inline_late; /* inline ops whose ack came after the caller's budget (the worker
                                  * completed them) */
    uint64_t spin_window_ns;   /* adaptive polling: the worker's current spin window (adapts up to
                                * spin_us) */
    uint64_t writes_delivered; /* writes posted asking for delivery-complete (on an ordered
                                * connection only a batch's last write to a region asks) */
    uint64_t direct_assisted;  /* chunks of large direct runs copied by the copy assistants */
    uint64_t direct_assist_late; /* runs whose copier waited long for an assistant (not on a CPU:
                                  * the next runs are copied alone for a while) */
    uint64_t writes_carried;   /* small writes sent carried in messages (initiator; not shm) */
    uint64_t carried_msgs;     /* ... in this many messages */
    uint64_t carried_applied;  /* carried writes this engine applied as a target */
    uint64_t carried_refused;  /* carried messages it refused in part (closed region, bounds) */
    uint64_t carry_peers;      /* peers that said they take carried writes (hello answered) */
    uint64_t warm_msgs;        /* tcp;ofi_rxm: messages the worker sent itself at start, received
                                * (the provider's buffer pools grow then, not in the first exchange) */
    uint64_t retry_naps;       /* naps of the worker while every pending post was refused for a
                                * while and deferred (backoff instead of a hot retry loop) */
    uint64_t stream_spins;     /* adaptive polling, not shm: sleeps that bytes on a provider socket
                                * ended with nothing complete (a large write streaming): the worker
                                * then spun until a completion or 2 ms, instead of sleeping again */
} aiote_stats;

const char *aiote_last_error(void);
const char *aiote_fi_strerror(int fi_errno);
int aiote_abi_version(void);

int aiote_engine_open(const aiote_config *cfg, aiote_engine **out);
/* Stop the worker: in-flight and queued operations fail with AIOTE_E_CLOSED
 * events (drain them with aiote_poll_events), then the endpoint is closed. */
int aiote_engine_shutdown(aiote_engine *e);
/* Free everything; call after shutdown and after draining events. */
void aiote_engine_free(aiote_engine *e);
int aiote_engine_eventfd(aiote_engine *e);
int aiote_engine_info(aiote_engine *e, aiote_info *out);
/* One NIC's endpoint address; *len is in/out. */
int aiote_engine_address(aiote_engine *e, uint32_t nic, uint8_t *buf, size_t *len);
int aiote_engine_stats(aiote_engine *e, aiote_stats *out);
int aiote_nic_stats(aiote_engine *e, uint32_t nic, aiote_nic_counters *out);
/* Take a NIC out of service (as a NIC failure would): operations in flight
 * on it fail naming it; later work goes to the other NICs. */
int aiote_nic_fail(aiote_engine *e, uint32_t nic);

/* Memory registration on every NIC.  keys receives one key per NIC;
 * *base is the address remote writes target at offset 0 (the virtual
 * address, or 0 for offset-based providers). */
int aiote_mr_register(aiote_engine *e, void *addr, uint64_t len, int access,
                      uint64_t *mr_id, uint64_t *keys, uint64_t *base);
/* The same for CUDA device memory (needs an engine opened with hmem = 1):
 * the NIC reads and writes the GPU's memory directly. */
int aiote_mr_register_cuda(aiote_engine *e, void *addr, uint64_t len, int access, int device,
                           uint64_t *mr_id, uint64_t *keys, uint64_t *base);
/* AIOTE_E_BUSY while an operation uses the region. */
int aiote_mr_deregister(aiote_engine *e, uint64_t mr_id);

/* Resolve a peer's addresses to an index (cached: the same bytes give the
 * same peer).  addrs: count u8, then per NIC a u16 (little endian) length
 * and that many address bytes. */
int aiote_peer_insert(aiote_engine *e, const uint8_t *addrs, size_t len, uint32_t *peer);
/* Watch a peer (delta +1 / -1): while watched, the engine probes it with a
 * small message every ping interval and reports AIOTE_EV_PEER_DOWN when the
 * probe fails or times out (peer_timeout).  shm peers' processes are
 * watched without probes (pidfd) from insertion on. */
int aiote_peer_watch(aiote_engine *e, uint32_t peer, int delta);
/* A remote region of a peer: one key per peer NIC.  Returns an id for aiote_wr. */
int aiote_rdesc_insert(aiote_engine *e, uint32_t peer, uint64_t base, uint64_t len,
                       const uint64_t *keys, uint32_t nkeys, uint32_t *rdesc);

/* A batch of writes from one local region.  Every element is bounds-checked
 * before anything is posted; on AIOTE_E_BOUNDS *bad_index names the element.
 * One AIOTE_EV_OP event reports the batch, or the call returns AIOTE_DONE:
 * the direct path copied it all and there is no imm to deliver. */
int aiote_submit_writes(aiote_engine *e, uint64_t op_id, uint64_t mr_id,
                        const aiote_wr *wrs, size_t n, int has_imm, uint32_t imm,
                        uint64_t *bad_index);
/* One write, as aiote_submit_writes with a single element (no array for the
 * caller to fill: the latency path's write()). */
int aiote_submit_write(aiote_engine *e, uint64_t op_id, uint64_t mr_id, uint32_t rdesc,
                       uint64_t src_off, uint64_t dst_off, uint64_t len, int has_imm, uint32_t imm,
                       uint64_t *bad_index);
/* Paged writes: page i goes from src_off + src_pages[i]*src_stride to
 * dst_off + dst_pages[i]*dst_stride, page_len bytes each. */
int aiote_submit_paged(aiote_engine *e, uint64_t op_id, uint64_t mr_id,
                       uint32_t rdesc, uint64_t page_len,
                       const int64_t *src_pages, uint64_t src_stride, uint64_t src_off,
                       const int64_t *dst_pages, uint64_t dst_stride, uint64_t dst_off,
                       size_t n, int has_imm, uint32_t imm, uint64_t *bad_index);
/* Two-sided message (copied; the caller's buffer is free on return).
 * flags travel with it and come back in the receiver's event (.index):
 * AIOTE_MSG_CTRL marks aiote's own control messages (GPU staging). */
int aiote_submit_send(aiote_engine *e, uint64_t op_id, uint32_t peer,
                      const void *data, size_t len, uint32_t flags);
/* Fail the operation with AIOTE_E_CLOSED-like cancellation if it has not been
 * posted yet; returns 1 if it was withdrawn, 0 if already posted/finished. */
int aiote_cancel(aiote_engine *e, uint64_t op_id);

/* ImmCounter.  Returns 1 if satisfied now (count consumed), 0 if armed. */
int aiote_imm_wait(aiote_engine *e, uint64_t waiter_id, uint32_t imm, uint64_t count);
/* Returns 1 if the waiter was disarmed, 0 if it had already fired. */
int aiote_imm_cancel(aiote_engine *e, uint64_t waiter_id);
/* Give back count whole writes to imm (a fired waiter whose awaiter left). */
int aiote_imm_restore(aiote_engine *e, uint32_t imm, uint64_t count);
/* Count count whole writes of imm as arrived now (data that reached its
 * place by another route than the NIC's, e.g. a staged GPU copy). */
int aiote_imm_arrive(aiote_engine *e, uint32_t imm, uint64_t count);
/* Whole writes with this imm that landed and were not consumed yet. */
int aiote_imm_pending(aiote_engine *e, uint32_t imm, uint64_t *count);

/* Tests: publish one raw inline entry (forged fields; UINT32_MAX / UINT64_MAX:
 * the descriptor's own slot / state / key) to rdesc's peer and wait for it:
 * its status (0, -AIOTE_E_BOUNDS, -AIOTE_E_NO_MR, -AIOTE_E_INVAL) or an error. */
int aiote_direct_inline_raw(aiote_engine *e, uint32_t rdesc, uint32_t slot, uint64_t state, uint64_t key,
                            uint64_t off, uint32_t len, uint32_t payload_len, int has_imm, uint32_t imm);
/* Tests only: hold the direct path's copy threads after the next chunk (up to
 * 1024 elements) of the op they copy (on = 1) or let them go on (on = 0). */
int aiote_direct_pause(aiote_engine *e, int on);
/* Tests only: wait up to timeout_ms until a copy thread is held there: 1, or 0. */
int aiote_direct_wait_paused(aiote_engine *e, uint32_t timeout_ms);
/* Tests only (process-wide): only_assistants = 1: a large direct run's copier
 * leaves every chunk to the copy assistants (it waits for them); hold = 1:
 * assistants stop after each chunk until it is 0 again or the engine closes. */
int aiote_direct_assist_test(aiote_engine *e, int only_assistants, int hold);
/* Tests only: wait up to timeout_ms until an assistant is held: 1, or 0. */
int aiote_direct_assist_wait_held(aiote_engine *e, uint32_t timeout_ms);

/* Take up to max events; re-arms the eventfd when the queue is emptied. */
int aiote_poll_events(aiote_engine *e, aiote_event *out, size_t max);

/* ---- loop-spin mode: the event loop's thread spins instead of sleeping ----
 * For the lowest notification latency (TransferEngine(loop_spin_us=...)):
 * the thread that drains events spins on them for a while before it sleeps
 * on the eventfd, and drives progress itself meanwhile, so one thread per
 * process spins, not two.
 *
 * aiote_loop_spin(e, 1): the calling thread polls this engine from now on
 * (aiote_progress / aiote_spin); completions don't write the eventfd, a
 * direct-path imm to it doesn't wake its worker, and (not shm) work the
 * calling thread submits is posted right away by that thread (or by its
 * next aiote_progress, if the worker is in a pass).  The worker
 * rests while the loop's passes keep coming and steps in when they stop.
 * aiote_loop_spin(e, 0): before sleeping on the eventfd; wakes the worker.
 * Both return 1 when events are pending (drain them before sleeping).
 *
 * aiote_progress(e): one pass of the worker's work on the calling thread,
 * unless the worker is in one (a try-lock: never waits): direct-path imm
 * rings, and where the provider is not shm also queued posts and completion
 * queues (on shm libfabric stays on the worker: see worker.c).  Returns 1
 * when events are pending.
 * aiote_events_pending(e): 1 when events wait (an atomic read: no lock, no
 * syscall).
 * aiote_spin(engines, n, budget_ns): aiote_progress on each engine until one
 * has events or budget_ns has passed (0: one round); returns how many had
 * events. */
int aiote_loop_spin(aiote_engine *e, int on);
int aiote_progress(aiote_engine *e);
int aiote_events_pending(aiote_engine *e);
int aiote_spin(aiote_engine *const *engines, size_t n, uint64_t budget_ns);
/* 1 if fd is readable now (poll, no wait), 0 if not, -1 on error.  The
 * spinning loop asks this of its selector's epoll fd before it pays for a
 * select(0) from Python. */
int aiote_fd_readable(int fd);
void aiote_free(void *p);

/* Wire-format validators (the parsers the engine uses on bytes from other
 * processes), for tests and fuzzers: a peer address list (returns the NIC
 * count or a negative code) and a received message. */
int aiote_check_addrs(const uint8_t *b, size_t len);
int aiote_check_message(const uint8_t *b, size_t len, uint64_t *payload_off, uint64_t *payload_len);
/* a carried-writes payload (the message after its header): 0 and *count, or a negative code */
int aiote_check_carry(const uint8_t *b, size_t len, uint32_t *count);

/* ---- watchers: transfers triggered by a word in memory ---------------------
 * A watcher is a 64-bit word in memory the caller owns and keeps alive until
 * aiote_watch_remove (pinned, device-mapped host memory for a GPU writer; any
 * memory for a CPU writer).  While reactions are armed the worker reads it on
 * every turn of its loop (adaptive polling naps at most 5 us then).  A reaction
 * fires once, when the value is >= its threshold; reactions of one watcher fire
 * in threshold order (then arming order), every crossed one even if the value
 * jumped past several.  A reaction posts a prepared transfer (its completion
 * is an AIOTE_EV_OP event with the reaction's id) or, with prep 0, only
 * reports AIOTE_EV_WATCH (id = reaction id, index = the value seen). */
int aiote_watch_add(aiote_engine *e, const uint64_t *word, uint32_t *watch);
/* Armed reactions fail (their events carry AIOTE_E_CLOSED). */
int aiote_watch_remove(aiote_engine *e, uint32_t watch);
int aiote_watch_arm(aiote_engine *e, uint32_t watch, uint64_t threshold, uint32_t prep, uint64_t id);
/* Take back an armed reaction: 1 if it was still armed, 0 if it fired already. */
int aiote_watch_disarm(aiote_engine *e, uint32_t watch, uint64_t id);
/* A transfer checked and resolved once, posted each time a reaction fires.
 * It holds its local region (deregistration: AIOTE_E_BUSY) until freed.
 * Ids start at 1. */
int aiote_prepare_writes(aiote_engine *e, uint64_t mr_id, const aiote_wr *wrs, size_t n, int has_imm,
                         uint32_t imm, uint64_t *bad_index, uint32_t *prep);
int aiote_prepare_paged(aiote_engine *e, uint64_t mr_id, uint32_t rdesc, uint64_t page_len,
                        const int64_t *src_pages, uint64_t src_stride, uint64_t src_off,
                        const int64_t *dst_pages, uint64_t dst_stride, uint64_t dst_off,
                        size_t n, int has_imm, uint32_t imm, uint64_t *bad_index, uint32_t *prep);
/* AIOTE_E_BUSY while a reaction refers to it. */
int aiote_prepare_free(aiote_engine *e, uint32_t prep);
/* Post a prepared transfer now, as aiote_submit_writes / aiote_submit_paged
 * would post the same batch (one AIOTE_EV_OP event with op_id reports it, or
 * AIOTE_DONE), without checking or resolving it again.  imm_mode: 0 = the
 * prepared imm, 1 = no imm, 2 = imm instead (every element carries it). */
int aiote_post_prepared(aiote_engine *e, uint64_t op_id, uint32_t prep, int imm_mode, uint32_t imm);

/* ---- CUDA copies ahead of an operation (cuda_copy.c) ----------------------
 * libcuda.so.1 is dlopen'd at run time (no build-time CUDA).  Contexts,
 * streams and addresses are the driver's (CUcontext, CUstream, CUdeviceptr /
 * host pointers under unified addressing) passed as integers. */
typedef struct {
    uint64_t dst;             /* destination address */
    uint64_t src;             /* source address */
    uint64_t len;
} aiote_copy;

/* Load the driver: 0, or -AIOTE_E_CUDA (aiote_last_error says why). */
int aiote_cuda_load(void);
/* Writes that wait for copies: in ctx, queue on stream (after work already
 * queued on wait_stream, if wait) every copy, record an event; once the event
 * has completed the worker posts the writes exactly as aiote_submit_writes
 * would (n may be 0: then the op completes when the copies are done).  One
 * AIOTE_EV_OP event reports the whole; a failed copy fails it with
 * AIOTE_E_CUDA.  Arguments are checked before anything is queued; a failure
 * to queue returns -AIOTE_E_CUDA after waiting for what was queued. */
int aiote_submit_cuda(aiote_engine *e, uint64_t op_id, uint64_t ctx, uint64_t stream, int wait,
                      uint64_t wait_stream, const aiote_copy *copies, size_t ncopies, uint64_t mr_id,
                      const aiote_wr *wrs, size_t n, int has_imm, uint32_t imm, uint64_t *bad_index);
/* Like aiote_submit_cuda, the copies spread over streams of their own ("lanes",
 * one per destination GPU, say), so copies to different peers overlap on the
 * copy engines instead of running one after another on stream.  copy i goes on
 * lanes[2 * lane_of[i]] (a stream of ctx), lanes[2 * lane_of[i] + 1] being an
 * event of ctx owned by that lane (reused: recorded after its copies, stream
 * waits on it); with wait, every lane used first waits on fork_event recorded
 * on wait_stream.  The op's event is recorded on stream after the lanes'
 * copies, so later work on stream is ordered after them too. */
int aiote_submit_cuda_lanes(aiote_engine *e, uint64_t op_id, uint64_t ctx, uint64_t stream, int wait,
                            uint64_t wait_stream, const aiote_copy *copies, const uint8_t *lane_of,
                            size_t ncopies, const uint64_t *lanes, size_t nlanes, uint64_t fork_event,
                            uint64_t mr_id, const aiote_wr *wrs, size_t n, int has_imm, uint32_t imm,
                            uint64_t *bad_index);
/* The common case of the above, without arrays: one copy (dst, src, len),
 * then with has_imm one imm-only write to rdesc (a CUDA IPC write). */
int aiote_submit_cuda_one(aiote_engine *e, uint64_t op_id, uint64_t ctx, uint64_t stream, int wait,
                          uint64_t wait_stream, uint64_t dst, uint64_t src, uint64_t len, uint64_t mr_id,
                          uint32_t rdesc, int has_imm, uint32_t imm);
/* Copies, then count count whole writes of imm as arrived (the owner's side
 * of a staged commit: the imm is counted only once the bytes are in its GPU
 * memory).  No event of its own; count 0 only copies. */
int aiote_cuda_arrive(aiote_engine *e, uint64_t ctx, uint64_t stream, const aiote_copy *copies,
                      size_t ncopies, uint32_t imm, uint64_t count);

/* Copies on stream (a stream of ctx, 0 its legacy default stream: an
 * application's current stream, say) and nothing else: no event, no op, no
 * engine; later work on that stream runs after them.  For the small
 * device-side moves of an application's step (MoE dispatch) without a
 * framework call each.  Overlapping source and destination are refused. */
int aiote_cuda_copy(uint64_t ctx, uint64_t stream, const aiote_copy *copies, size_t n);

/* MoE routing on the host (aiote.moe): a stable counting sort of n (token, k)
 * pairs by destination.  ids[i]: pair i's expert id (pair i belongs to token
 * i / top_k); dest[e] (0..world-1) and lid[e]: expert e's destination, as the
 * caller numbers them, and its local id there.  Out: counts[world], pairs per
 * destination; order[n], the pairs grouped by destination 0, 1, ... (pair
 * order within a group); lid_out[n], the local id of each of those; tok[n],
 * their tokens, with the groups from first_group on first and the ones before
 * it behind (first_group 0: the same order).  Returns 0, or -AIOTE_E_INVAL
 * with *bad the first pair whose id is out of range (the outputs are then
 * not to be used). */
int aiote_moe_route(const int64_t *ids, size_t n, uint32_t top_k, const int16_t *dest, const int32_t *lid,
                    uint64_t num_experts, uint32_t world, uint32_t first_group, int64_t *counts, int64_t *order,
                    int32_t *lid_out, int64_t *tok, uint64_t *bad);

/* Tests only: on = 1 makes every CUDA copy of the C core a memcpy between
 * host addresses (done when queued) and needs no driver; the staging protocol
 * then runs on machines without a GPU (aiote.testing.fake_cuda).  0 turns it
 * off again (-AIOTE_E_BUSY while fake copies are still in flight). */
int aiote_cuda_fake(int on);

/* A CUDA host function (cuLaunchHostFunc) that wakes the event loop: arg is
 * an eventfd number cast to a pointer; it adds 1 to it.  No CUDA needed here. */
void aiote_host_notify(void *efd);

/* ---- NIC discovery --------------------------------------------------------
 * What libfabric offers on this host: one entry per provider + domain (the
 * entries libfabric lists per endpoint type and address family are merged).
 * Independent of any engine; callable from any thread. */
enum {
    AIOTE_LINK_UNKNOWN = 0,
    AIOTE_LINK_DOWN = 1,
    AIOTE_LINK_UP = 2,

    /* aiote_nic_info.ep_types bits */
    AIOTE_NIC_EP_MSG = 1,
    AIOTE_NIC_EP_RDM = 2,
    AIOTE_NIC_EP_DGRAM = 4,
};

typedef struct {
    char provider[64];        /* "efa", "verbs;ofi_rxm", "tcp;ofi_rxm", "shm", ... */
    char fabric[128];         /* fabric name (tcp: the interface's subnet) */
    char domain[64];          /* domain name: what TransferEngine(nics=[...]) takes */
    /* from info->nic where the provider fills it; "" / 0 otherwise */
    char device[64];          /* device name: "rdmap16s27", "mlx5_0" */
    char driver[64];
    char vendor_id[32];
    char device_id[32];
    char firmware[64];
    char pci[32];             /* "dddd:bb:dd.f" */
    char link_address[64];
    char network_type[32];    /* "InfiniBand", "Ethernet", ... */
    /* capabilities, merged over the provider + domain's entries */
    char caps_str[1024];      /* fi_tostr(caps, FI_TYPE_CAPS) */
    char mr_mode_str[256];    /* fi_tostr(mr_mode, FI_TYPE_MR_MODE) */
    uint64_t caps;            /* FI_* capability bits, OR-ed */
    uint64_t mr_mode;         /* FI_MR_* bits the provider needs */
    uint64_t mr_key_size;
    uint64_t cq_data_size;    /* bytes of remote CQ data (imm) a write can carry */
    uint64_t max_msg_size;
    uint64_t inject_size;
    uint64_t link_speed;      /* bits/s, 0 if unknown */
    uint64_t mtu;
    int32_t link_state;       /* AIOTE_LINK_* */
    int32_t ep_types;         /* AIOTE_NIC_EP_* bits */
    int32_t hmem;             /* FI_HMEM advertised (asked for explicitly) */
    int32_t rma;              /* FI_RMA advertised */
    int32_t has_nic_attr;     /* the provider filled info->nic */
    int32_t from_rdm;         /* the scalars come from an FI_EP_RDM entry */
    int32_t entries;          /* libfabric entries merged into this one */
    int32_t _pad;
} aiote_nic_info;

/* List what libfabric offers.  provider: NULL/"" for all, else a provider
 * name ("tcp;ofi_rxm") or one layer of it ("tcp" matches "tcp" and
 * "tcp;ofi_rxm"); a name nothing matches gives 0 entries.  Writes up to max
 * entries to out and returns how many there are (which may exceed max: call
 * again with a larger array), or a negative AIOTE_E_* code. */
int aiote_list_nics(const char *provider, aiote_nic_info *out, size_t max);

#endif
