/* Carried writes: small writes that travel inside one message.
 *
 * Over tcp;ofi_rxm (and any provider that moves each RMA write as a message of
 * its own) every write costs the initiator one sendmsg and the target one
 * receive path: a batch of 32 writes of 64 B is 32 system calls a side, the
 * provider's floor (docs/benchmarks.md).  Here two or more consecutive small
 * writes of one op to one peer go as the entries of one message: key, remote
 * address, length, bytes.  The target's worker checks each entry against its
 * own regions (by key, under mr_lock, so a region being deregistered is never
 * written), copies it, counts the imms once every byte is in place, and
 * acknowledges how many entries it applied.  The op completes on that
 * acknowledgement: as with a delivery-complete write, the bytes are in the
 * target's memory when its future resolves.
 *
 * Failures: the target applies a prefix, stopping at the first entry it
 * refuses (no such region: EKEYREJECTED; outside it, not remotely writable,
 * device memory: EACCES); the op fails naming that element.  A message the
 * provider can't send fails at the send.  While records are open their peer
 * is watched: pinged, and a ping or any other operation to it that fails
 * with a connection error fails its records at once (PeerUnreachable).  A
 * dead target whose connection the provider keeps re-trying (tcp;ofi_rxm
 * answers -FI_EAGAIN) is declared down when its ping has been refused for
 * peer_timeout.  A record unanswered for peer_timeout after its send
 * completed fails with ETIMEDOUT (a stopped target may still apply it when
 * it runs again, as with inline shm writes).  Closing the engine fails their
 * ops with everything else (EngineClosed).
 *
 * A peer is asked first: the first carriable run to it goes as RMA writes and
 * queues a hello; runs are carried once it answered (an aiote without carried
 * writes drops the hello and keeps getting RMA writes).  While the connection is
 * still being set up, the run's RMA writes wait and the hello may be answered
 * before they are posted: they are carried then. */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h"

#define CARRY_RING 1024 /* messages awaiting acknowledgement per engine */

struct carry_rec {
    struct op *op; /* NULL: free */
    bool sent;     /* the message's send completed (delivered, where the provider can tell) */
    uint64_t seq, sent_ns;
    uint32_t peer;
    uint32_t first, count; /* elements first .. first + count - 1 of op */
};

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

int carry_open(aiote_engine *e)
{
    if (e->is_shm || e->cfg.carry_max < 0 || e->nnics != 1 || e->cfg.hmem)
        return 0; /* off: shm has its own inline path; several NICs stripe instead */
    uint64_t room = e->slot_size - 16 - e->self_blob_len - CARRY_HDR;
    e->carry_max = e->cfg.carry_max ? (uint64_t)e->cfg.carry_max : 8192;
    if (e->carry_max > (room - 2 * CARRY_ENT) / 2)
        e->carry_max = (room - 2 * CARRY_ENT) / 2; /* two must fit in a message */
    e->carry_recs = calloc(CARRY_RING, sizeof *e->carry_recs);
    if (!e->carry_recs)
        return -AIOTE_E_NOMEM;
    return 0;
}

void carry_free(aiote_engine *e)
{
    free(e->carry_recs);
    e->carry_recs = NULL;
    free(e->mrkeys);
    e->mrkeys = NULL;
}

static inline bool carriable(const aiote_engine *e, const struct op *op)
{
    return e->carry_max && (op->kind == OP_WRITES || op->kind == OP_PAGED) && !op->local_device;
}

bool carry_follows(const aiote_engine *e, const struct op *op, size_t i)
{
    if (!carriable(e, op) || i >= op->n)
        return false;
    struct welem w;
    op_elem(op, i, &w);
    return w.len <= e->carry_max && e->peers[w.rd->peer]->carry == CARRY_PEER_READY;
}

#define HELLO_MAGIC 0x4f4c4843u /* "CHLO" */

/* kind 0: a hello (answer me); 1: the answer */
static bool send_hello(aiote_engine *e, uint32_t peer, uint32_t kind)
{
    uint32_t *m = malloc(8);
    if (!m)
        return false;
    m[0] = HELLO_MAGIC;
    m[1] = kind;
    queue_internal_send(e, peer, m, 8, MSG_FLAG_CHELLO);
    return true;
}

void carry_send_hellos(aiote_engine *e)
{
    e->hello_wanted = false;
    for (size_t i = 0; i < e->npeers; i++)
        if (e->peers[i]->carry == CARRY_PEER_WANTED)
            e->peers[i]->carry = send_hello(e, (uint32_t)i, 0) ? CARRY_PEER_ASKED : CARRY_PEER_UNKNOWN;
}

/* A peer takes carried writes: a hello (answered, and it is taken at its word: its
 * own connection to us exists) or the answer to ours. */
void carry_hello(aiote_engine *e, const uint8_t *msg, const struct msg_view *v)
{
    uint32_t m[2];
    if (v->payload_len != sizeof m) {
        e->stats.bad_msgs++;
        return;
    }
    memcpy(m, msg + v->payload_off, sizeof m);
    struct peer_arg pa = {.addrs = msg + v->src_off, .len = v->src_len};
    if (m[0] != HELLO_MAGIC || m[1] > 1 || ctrl_peer_insert(e, &pa)) {
        e->stats.bad_msgs++;
        return;
    }
    struct peer *p = e->peers[pa.peer];
    if (m[1] == 0)
        send_hello(e, pa.peer, 1);
    if (p->carry != CARRY_PEER_READY && e->carry_max) {
        p->carry = CARRY_PEER_READY;
        e->stats.carry_peers++;
    }
}

int carry_post(aiote_engine *e, struct op *op, size_t i, size_t *adv, int *nic_out)
{
    if (!carriable(e, op))
        return CARRY_SKIP;
    struct welem w;
    op_elem(op, i, &w);
    uint32_t peer = w.rd->peer;
    struct peer *p = e->peers[peer];
    if (w.len > e->carry_max || p->nnics != 1)
        return CARRY_SKIP;
    /* the run: consecutive elements to the same peer that fit one message */
    uint64_t room = e->slot_size - 16 - e->self_blob_len - CARRY_HDR, used = 0;
    size_t n = 0;
    for (size_t j = i; j < op->n && n < CARRY_MAX_ENTS; j++, n++) {
        struct welem x;
        op_elem(op, j, &x);
        if (x.rd->peer != peer || x.len > e->carry_max || used + CARRY_ENT + x.len > room)
            break;
        used += CARRY_ENT + x.len;
    }
    if (n < 2)
        return CARRY_SKIP;
    if (p->carry != CARRY_PEER_READY) {
        /* Not before the peer said it takes them (an older aiote would drop the message)
         * and its messages reach us (over tcp;ofi_rxm its first message to us sets up
         * a connection: ~10 ms here, which the first acknowledgement would otherwise
         * wait for).  Until then: RMA writes. */
        if (p->carry == CARRY_PEER_UNKNOWN) {
            p->carry = CARRY_PEER_WANTED; /* sent after this posting pass (carry_send_hellos) */
            e->hello_wanted = true;
        }
        return CARRY_SKIP;
    }
    struct nic *nc = &e->nics[0];
    *nic_out = 0;
    if (atomic_load(&nc->failed))
        return -FI_ENETDOWN;
    if (p->gone)
        return -FI_ECONNRESET;
    struct tx_ctx *c = nc->tx_free;
    struct carry_rec *r = &e->carry_recs[e->carry_seq % CARRY_RING];
    if (!c || !e->nsend_free || nc->inflight >= nc->max_inflight || r->op)
        return 2;
    int slot = e->send_free[e->nsend_free - 1];
    uint8_t *buf = e->send_arena + (size_t)slot * e->slot_size;
    uint64_t seq = e->carry_seq;
    uint32_t hdr[4] = {MSG_MAGIC | (MSG_VERSION << 16), (uint32_t)e->self_blob_len,
                       (uint32_t)(CARRY_HDR + used), MSG_FLAG_CARRY};
    memcpy(buf, hdr, sizeof hdr);
    memcpy(buf + sizeof hdr, e->self_blob, e->self_blob_len);
    uint8_t *pl = buf + sizeof hdr + e->self_blob_len;
    uint32_t magic = CARRY_MAGIC, count = (uint32_t)n, imm = op->imm, flags = op->has_imm ? CARRY_F_IMM : 0;
    memcpy(pl, &magic, 4);
    memcpy(pl + 4, &count, 4);
    memcpy(pl + 8, &seq, 8);
    memcpy(pl + 16, &imm, 4);
    memcpy(pl + 20, &flags, 4);
    uint8_t *ent = pl + CARRY_HDR, *data = ent + n * CARRY_ENT;
    for (size_t k = 0; k < n; k++, ent += CARRY_ENT) {
        struct welem x;
        op_elem(op, i + k, &x);
        uint64_t raddr = x.rd->base + x.dst_off;
        uint32_t len = (uint32_t)x.len;
        memcpy(ent, &x.rd->keys[0], 8);
        memcpy(ent + 8, &raddr, 8);
        memcpy(ent + 16, &len, 4);
        memcpy(data, op->local_base + x.src_off, len);
        data += len;
    }
    /* (not delivery-complete: tcp;ofi_rxm completes a send so asked while the target is
     * stopped all the same, so it would not tell a dead target any sooner) */
    ssize_t rc = fi_send(nc->ep, buf, sizeof hdr + e->self_blob_len + CARRY_HDR + used, fi_mr_desc(e->send_mr),
                         p->fi[0][0], &c->h.fi);
    if (rc == -FI_EAGAIN)
        return 1;
    if (rc)
        return (int)rc;
    e->nsend_free--;
    nc->tx_free = c->next_free;
    nc->inflight++;
    c->op = op;
    c->send_slot = slot;
    c->peer = peer;
    c->index = i;
    c->carry = seq + 1;
    op->inflight += 2; /* the send, and the acknowledgement */
    *r = (struct carry_rec){.op = op, .seq = seq, .sent_ns = now_ns(), .peer = peer, .first = (uint32_t)i,
                            .count = (uint32_t)n};
    e->carry_seq++;
    atomic_fetch_add(&p->watch, 1); /* pinged while it owes us acknowledgements */
    e->stats.writes_carried += n;
    e->stats.carried_msgs++;
    e->stats.writes_posted += n;
    e->stats.bytes_written += used - n * CARRY_ENT;
    e->stats.msgs_sent++;
    nc->stats.writes_posted += n;
    nc->stats.bytes_written += used - n * CARRY_ENT;
    *adv = n;
    return 0;
}

/* The record's acknowledgement unit of its op ends (the send's is the tx context's). */
static void settle(aiote_engine *e, struct carry_rec *r)
{
    struct op *op = r->op;
    r->op = NULL;
    struct peer *p = e->peers[r->peer];
    if (atomic_fetch_sub(&p->watch, 1) <= 0)
        atomic_store(&p->watch, 0);
    op_settle(e, op);
}

void carry_sent(aiote_engine *e, struct tx_ctx *c)
{
    uint64_t seq = c->carry - 1;
    struct carry_rec *r = &e->carry_recs[seq % CARRY_RING];
    if (r->op && r->seq == seq) {
        r->sent = true;
        r->sent_ns = now_ns();
    }
}

void carry_send_failed(aiote_engine *e, struct tx_ctx *c)
{
    uint64_t seq = c->carry - 1;
    struct carry_rec *r = &e->carry_recs[seq % CARRY_RING];
    c->carry = 0;
    if (r->op && r->seq == seq)
        settle(e, r); /* the op holds its send's unit: it is not finished here */
}

void carry_ack(aiote_engine *e, const uint8_t *msg, const struct msg_view *v)
{
    struct cack_view a;
    if (!e->carry_recs || parse_cack(msg + v->payload_off, v->payload_len, &a)) {
        e->stats.bad_msgs++;
        return;
    }
    struct carry_rec *r = &e->carry_recs[a.seq % CARRY_RING];
    struct peer *p = r->op ? e->peers[r->peer] : NULL;
    /* only the peer it went to answers for a record (a late answer, after a
     * timeout, finds the record settled) */
    if (!r->op || r->seq != a.seq || a.applied > r->count || p->blob_len != v->src_len ||
        memcmp(p->blob, msg + v->src_off, v->src_len) != 0) {
        e->stats.bad_msgs++;
        return;
    }
    if (a.status) {
        int fe = a.fi_errno == FI_EKEYREJECTED || a.fi_errno == FI_EACCES ? (int)a.fi_errno : FI_EIO;
        op_fail(r->op, -AIOTE_E_PROVIDER, fe, r->first + a.applied);
    }
    settle(e, r);
}

void carry_fail_peer(aiote_engine *e, uint32_t peer, int fi_err)
{
    if (!e->carry_recs)
        return;
    for (uint64_t s = e->carry_acked; s < e->carry_seq; s++) {
        struct carry_rec *r = &e->carry_recs[s % CARRY_RING];
        if (r->op && r->seq == s && r->peer == peer) {
            op_fail(r->op, -AIOTE_E_PROVIDER, fi_err ? fi_err : FI_ECONNRESET, r->first);
            settle(e, r);
        }
    }
}

void carry_check(aiote_engine *e, uint64_t now)
{
    if (!e->carry_recs)
        return;
    while (e->carry_acked < e->carry_seq) {
        struct carry_rec *r = &e->carry_recs[e->carry_acked % CARRY_RING];
        if (r->op && r->seq == e->carry_acked) {
            /* one still being sent is the provider's to time (as an RMA write is) */
            if (!r->sent || now - r->sent_ns <= e->peer_timeout_ns)
                return;
            op_fail(r->op, -AIOTE_E_PROVIDER, FI_ETIMEDOUT, r->first);
            settle(e, r);
        }
        e->carry_acked++;
    }
}

void carry_close(aiote_engine *e)
{
    if (!e->carry_recs)
        return;
    for (size_t k = 0; k < CARRY_RING; k++)
        e->carry_recs[k].op = NULL; /* their ops are failed with every live op */
}

/* ---- target side -------------------------------------------------------- */

static inline size_t key_hash(uint64_t key, size_t cap) { return (size_t)((key * 0x9e3779b97f4a7c15ull) >> 32) & (cap - 1); }

/* Under mr_lock: the index of regions by key, rebuilt after registrations. */
static int mrkeys_rebuild(aiote_engine *e)
{
    size_t cap = 64;
    while (cap < 2 * e->nmrs)
        cap *= 2;
    if (cap != e->mrkeys_cap) {
        uint32_t *k = realloc(e->mrkeys, cap * sizeof *k);
        if (!k)
            return -AIOTE_E_NOMEM;
        e->mrkeys = k;
        e->mrkeys_cap = cap;
    }
    memset(e->mrkeys, 0, cap * sizeof *e->mrkeys);
    for (size_t i = 0; i < e->nmrs; i++) {
        if (!e->mrs[i].used)
            continue;
        size_t h = key_hash(e->mrs[i].key0, cap);
        while (e->mrkeys[h])
            h = (h + 1) & (cap - 1);
        e->mrkeys[h] = (uint32_t)i + 1;
    }
    e->mrkeys_dirty = false;
    return 0;
}

static struct mr_slot *mrkey_find(aiote_engine *e, uint64_t key)
{
    if ((e->mrkeys_dirty || !e->mrkeys) && mrkeys_rebuild(e))
        return NULL;
    for (size_t h = key_hash(key, e->mrkeys_cap);; h = (h + 1) & (e->mrkeys_cap - 1)) {
        uint32_t v = e->mrkeys[h];
        if (!v)
            return NULL;
        struct mr_slot *s = &e->mrs[v - 1];
        if (s->used && s->key0 == key)
            return s->closing ? NULL : s;
    }
}

void carry_apply(aiote_engine *e, const uint8_t *msg, const struct msg_view *v)
{
    struct carry_view cv;
    if (parse_carry(msg + v->payload_off, v->payload_len, &cv)) {
        e->stats.bad_msgs++;
        return;
    }
    /* the sender, to answer it (it is inserted if new) */
    struct peer_arg pa = {.addrs = msg + v->src_off, .len = v->src_len};
    if (ctrl_peer_insert(e, &pa)) {
        e->stats.bad_msgs++;
        return;
    }
    uint32_t imms[CARRY_MAX_ENTS];
    size_t nimm = 0;
    uint32_t applied = 0, fe = 0;
    const uint8_t *ent = cv.ents, *data = cv.data;
    pthread_mutex_lock(&e->mr_lock);
    for (; applied < cv.count; applied++, ent += CARRY_ENT) {
        uint64_t key, raddr;
        uint32_t len;
        memcpy(&key, ent, 8);
        memcpy(&raddr, ent + 8, 8);
        memcpy(&len, ent + 16, 4);
        struct mr_slot *s = mrkey_find(e, key);
        if (!s) {
            fe = FI_EKEYREJECTED; /* closed (or never ours): libfabric's stale-key error */
            break;
        }
        if (!s->remote || s->device || raddr < s->base || raddr - s->base > s->len ||
            len > s->len - (raddr - s->base)) {
            fe = FI_EACCES;
            break;
        }
        memcpy(s->addr + (raddr - s->base), data, len);
        data += len;
        if (cv.has_imm)
            imms[nimm++] = cv.imm;
    }
    pthread_mutex_unlock(&e->mr_lock);
    if (nimm) {
        e->stats.imms_received += nimm;
        e->nics[0].stats.imms_received += nimm;
        imm_table_arrive(&e->imms, imms, nimm, &e->pending_events);
    }
    e->stats.carried_applied += applied;
    e->stats.carried_refused += fe != 0;
    uint8_t *ack = malloc(CACK_LEN);
    if (!ack)
        return; /* the initiator's record times out */
    uint32_t magic = CACK_MAGIC;
    int32_t status = fe ? -AIOTE_E_PROVIDER : 0;
    memcpy(ack, &magic, 4);
    memcpy(ack + 4, &applied, 4);
    memcpy(ack + 8, &cv.seq, 8);
    memcpy(ack + 16, &status, 4);
    memcpy(ack + 20, &fe, 4);
    queue_internal_send(e, pa.peer, ack, CACK_LEN, MSG_FLAG_CACK);
}
