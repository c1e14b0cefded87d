/* libfabric set-up: provider choice and one domain + endpoint per NIC, the
 * message slots, and the control operations (registration, peers, NIC
 * failure) that the worker runs. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <signal.h>
#include <sys/random.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "internal.h"

#define FI_VER FI_VERSION(1, 17)

/* mr_mode bits we know how to honour; providers needing others are skipped. */
#define MR_MODE_SUPPORTED \
    (FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED | FI_MR_PROV_KEY | FI_MR_ENDPOINT | FI_MR_HMEM)

#define FI_CHECK(call)                                                                 \
    do {                                                                               \
        int _rc = (int)(call);                                                         \
        if (_rc) {                                                                     \
            aiote_set_error("%s failed: %s (%d)", #call, fi_strerror(-_rc), _rc);      \
            return -AIOTE_E_PROVIDER;                                                  \
        }                                                                              \
    } while (0)

static struct fi_info *make_hints(const aiote_config *cfg, const char *domain, bool dc)
{
    struct fi_info *h = fi_allocinfo();
    if (!h)
        return NULL;
    h->caps = FI_RMA | FI_MSG | FI_WRITE | FI_REMOTE_WRITE | FI_SEND | FI_RECV;
    if (cfg->hmem)
        h->caps |= FI_HMEM; /* device memory registered directly (GPUDirect RDMA) */
    h->ep_attr->type = FI_EP_RDM;
    /* we hand providers a fi_context2 per operation */
    h->mode = FI_CONTEXT | FI_CONTEXT2;
    h->domain_attr->mr_mode = MR_MODE_SUPPORTED;
    /* only the worker thread touches the endpoints */
    h->domain_attr->threading = FI_THREAD_DOMAIN;
    h->domain_attr->resource_mgmt = FI_RM_ENABLED;
    if (dc)
        h->tx_attr->op_flags = FI_DELIVERY_COMPLETE;
    if (cfg->provider && *cfg->provider)
        h->fabric_attr->prov_name = strdup(cfg->provider);
    if (domain && *domain)
        h->domain_attr->name = strdup(domain);
    return h;
}

/* The domain name for NIC i: the i-th of the comma-separated list, cycled. */
static void domain_for(const char *list, uint32_t i, char *out, size_t cap)
{
    out[0] = 0;
    if (!list || !*list)
        return;
    size_t count = 1;
    for (const char *p = list; *p; p++)
        count += *p == ',';
    size_t want = i % count;
    const char *p = list;
    for (size_t k = 0; k < want; k++)
        p = strchr(p, ',') + 1;
    size_t n = strcspn(p, ",");
    if (n >= cap)
        n = cap - 1;
    memcpy(out, p, n);
    out[n] = 0;
}

static int get_info(aiote_engine *e, struct nic *n, const char *domain, bool want_dc, bool *got_dc)
{
    const aiote_config *cfg = &e->cfg;
    int last = -FI_ENODATA;
    for (int attempt = want_dc ? 0 : 1; attempt < 2; attempt++) {
        bool dc = attempt == 0;
        struct fi_info *h = make_hints(cfg, domain, dc);
        if (!h)
            return -AIOTE_E_NOMEM;
        struct fi_info *res = NULL;
        const char *node = cfg->node && *cfg->node ? cfg->node : NULL;
        int rc = fi_getinfo(FI_VER, node, NULL, node ? FI_SOURCE : 0, h, &res);
        fi_freeinfo(h);
        if (rc) {
            last = rc;
            continue;
        }
        /* first entry that needs only mr_mode bits we honour and carries >= 4 imm bytes */
        for (struct fi_info *it = res; it; it = it->next) {
            if ((it->domain_attr->mr_mode & ~(uint64_t)(MR_MODE_SUPPORTED | FI_MR_HMEM)) != 0)
                continue;
            if (it->domain_attr->cq_data_size < 4)
                continue;
            n->fi = fi_dupinfo(it);
            *got_dc = dc;
            break;
        }
        fi_freeinfo(res);
        if (n->fi)
            return 0;
        last = -FI_ENODATA;
    }
    aiote_set_error("no libfabric provider matches provider=%s node=%s domain=%s: %s",
                    cfg->provider ? cfg->provider : "(any)", cfg->node ? cfg->node : "(none)",
                    domain && *domain ? domain : "(any)", fi_strerror(-last));
    return -AIOTE_E_PROVIDER;
}

static uint64_t random_key(const struct fi_info *fi)
{
    uint64_t key = 0;
    if (getrandom(&key, sizeof key, 0) != sizeof key)
        key = 0;
    size_t ksz = fi->domain_attr->mr_key_size;
    if (ksz && ksz < 8)
        key &= (1ull << (8 * ksz)) - 1;
    return key ? key : 0x5eed;
}

static int nic_mr_reg(struct nic *n, void *buf, size_t len, uint64_t access, int cuda_device, struct fid_mr **mr)
{
    bool prov_key = n->fi->domain_attr->mr_mode & FI_MR_PROV_KEY;
    int rc = -FI_ENOKEY;
    /* Requested keys are random 64-bit values (never sequential): on tcp and
     * shm the requested key is the key, and guessing it would let any peer
     * write here.  Retry on the rare collision. */
    for (int tries = 0; tries < 8 && rc == -FI_ENOKEY; tries++) {
        struct iovec iov = {.iov_base = buf, .iov_len = len};
        struct fi_mr_attr attr = {
            .mr_iov = &iov,
            .iov_count = 1,
            .access = access,
            .requested_key = prov_key ? 0 : random_key(n->fi),
            .iface = cuda_device >= 0 ? FI_HMEM_CUDA : FI_HMEM_SYSTEM,
        };
        if (cuda_device >= 0)
            attr.device.cuda = cuda_device;
        rc = fi_mr_regattr(n->domain, &attr, 0, mr);
    }
    if (rc) {
        aiote_set_error("fi_mr_reg(%p, %zu) on NIC %d failed: %s (%d)", buf, len, n->index,
                        fi_strerror(-rc), rc);
        return -AIOTE_E_PROVIDER;
    }
    if (n->fi->domain_attr->mr_mode & FI_MR_ENDPOINT) {
        if ((rc = fi_mr_bind(*mr, &n->ep->fid, 0)) || (rc = fi_mr_enable(*mr))) {
            fi_close(&(*mr)->fid);
            *mr = NULL;
            aiote_set_error("binding region to NIC %d failed: %s", n->index, fi_strerror(-rc));
            return -AIOTE_E_PROVIDER;
        }
    }
    return 0;
}

int fabric_post_recv(aiote_engine *e, struct recv_slot *s)
{
    void *desc = fi_mr_desc(e->recv_mr);
    return (int)fi_recv(e->nics[0].ep, s->buf, e->slot_size, desc, FI_ADDR_UNSPEC, &s->h.fi);
}

static int nic_open(aiote_engine *e, struct nic *n, bool want_dc, bool *got_dc)
{
    char domain[128];
    domain_for(e->cfg.domain, (uint32_t)n->index, domain, sizeof domain);
    int rc = get_info(e, n, domain, want_dc, got_dc);
    if (rc)
        return rc;
    struct fi_info *fi = n->fi;
    FI_CHECK(fi_fabric(fi->fabric_attr, &n->fabric, NULL));
    FI_CHECK(fi_domain(n->fabric, fi, &n->domain, NULL));

    /* Prefer a CQ with an fd to sleep on; fall back to none (timed sleeps). */
    struct fi_cq_attr ca = {.format = FI_CQ_FORMAT_DATA, .size = 0, .wait_obj = FI_WAIT_NONE};
    n->cq_fd = -1;
    if (e->cfg.polling != AIOTE_POLL_BUSY) {
        ca.wait_obj = FI_WAIT_FD;
        if (fi_cq_open(n->domain, &ca, &n->cq, NULL) == 0) {
            int fd = -1;
            if (fi_control(&n->cq->fid, FI_GETWAIT, &fd) == 0 && fd >= 0)
                n->cq_fd = fd;
        } else {
            n->cq = NULL;
        }
    }
    if (!n->cq) {
        ca.wait_obj = FI_WAIT_NONE;
        FI_CHECK(fi_cq_open(n->domain, &ca, &n->cq, NULL));
    }
    struct fi_av_attr aa = {.type = FI_AV_TABLE};
    FI_CHECK(fi_av_open(n->domain, &aa, &n->av, NULL));
    FI_CHECK(fi_endpoint(n->domain, fi, &n->ep, NULL));
    FI_CHECK(fi_ep_bind(n->ep, &n->cq->fid, FI_TRANSMIT | FI_RECV));
    FI_CHECK(fi_ep_bind(n->ep, &n->av->fid, 0));
    FI_CHECK(fi_enable(n->ep));
    n->addr_len = sizeof n->addr;
    FI_CHECK(fi_getname(&n->ep->fid, n->addr, &n->addr_len));
    if (e->is_shm && !(n->local = local_register(n->addr, n->addr_len)))
        return -AIOTE_E_NOMEM;

    /* Transmit contexts bound what is in flight to what the queue can hold. */
    n->ntx = fi->tx_attr->size ? fi->tx_attr->size : 1024;
    if (n->ntx > 8192)
        n->ntx = 8192;
    n->tx_ctxs = calloc(n->ntx, sizeof *n->tx_ctxs);
    if (!n->tx_ctxs)
        return -AIOTE_E_NOMEM;
    for (size_t i = 0; i < n->ntx; i++) {
        n->tx_ctxs[i].h.kind = CTX_TX;
        n->tx_ctxs[i].nic = n;
        n->tx_ctxs[i].next_free = i + 1 < n->ntx ? &n->tx_ctxs[i + 1] : NULL;
    }
    n->tx_free = &n->tx_ctxs[0];
    n->max_inflight = e->cfg.max_inflight && e->cfg.max_inflight < n->ntx ? e->cfg.max_inflight : n->ntx;
    return 0;
}

int fabric_open(aiote_engine *e)
{
    e->nnics = e->cfg.nics ? e->cfg.nics : 1;
    if (e->nnics > AIOTE_MAX_NICS) {
        aiote_set_error("at most %d NICs per engine", AIOTE_MAX_NICS);
        return -AIOTE_E_INVAL;
    }
    e->is_shm = e->cfg.provider && strcmp(e->cfg.provider, "shm") == 0;
    bool dc = e->cfg.delivery_complete;
    for (uint32_t i = 0; i < e->nnics; i++) {
        struct nic *n = &e->nics[i];
        n->index = (int)i;
        n->cq_fd = -1;
        bool got_dc = false;
        int rc = nic_open(e, n, dc, &got_dc);
        if (rc)
            return rc;
        if (i == 0) {
            e->is_shm = strcmp(n->fi->fabric_attr->prov_name, "shm") == 0;
            dc = got_dc; /* every NIC gets the same completion semantics */
        }
    }
    if (e->is_shm)
        e->local_seq = local_engine_opened(e);
    /* the provider facts come from NIC 0 (all NICs use one provider) */
    struct fi_info *fi = e->nics[0].fi;
    snprintf(e->info.provider, sizeof e->info.provider, "%s", fi->fabric_attr->prov_name);
    snprintf(e->info.fabric, sizeof e->info.fabric, "%s", fi->fabric_attr->name);
    snprintf(e->info.domain, sizeof e->info.domain, "%s", fi->domain_attr->name);
    e->info.mr_mode = fi->domain_attr->mr_mode;
    e->info.mr_key_size = fi->domain_attr->mr_key_size;
    e->info.cq_data_size = fi->domain_attr->cq_data_size;
    e->info.inject_size = fi->tx_attr->inject_size;
    e->info.max_msg_size = fi->ep_attr->max_msg_size;
    e->info.tx_size = fi->tx_attr->size;
    e->info.rx_size = fi->rx_attr->size;
    e->info.hmem = (fi->caps & FI_HMEM) != 0;
    e->info.delivery_complete = dc;
    /* The provider places the data of writes on one connection in submission
     * order, whatever their size (tcp;ofi_rxm: one TCP stream per peer): a
     * delivered write means the earlier ones to that peer are in place too. */
    e->waw_ordered = !e->is_shm && e->nnics == 1 && (fi->tx_attr->msg_order & FI_ORDER_WAW) &&
                     fi->ep_attr->max_order_waw_size == SIZE_MAX;
    e->info.wait_fd = e->nics[0].cq_fd >= 0;
    e->info.addr_len = (int)e->nics[0].addr_len;
    e->info.nics = (int)e->nnics;

    /* our addresses as peers see them (also the sender field of messages) */
    uint8_t *b = e->self_blob;
    *b++ = (uint8_t)e->nnics;
    for (uint32_t i = 0; i < e->nnics; i++) {
        uint16_t l = (uint16_t)e->nics[i].addr_len;
        memcpy(b, &l, 2);
        memcpy(b + 2, e->nics[i].addr, l);
        b += 2 + l;
    }
    e->self_blob_len = (size_t)(b - e->self_blob);

    /* message slots on NIC 0: header + sender addresses + payload */
    struct nic *n0 = &e->nics[0];
    e->slot_size = sizeof(uint32_t) * 4 + sizeof e->self_blob + e->cfg.msg_size;
    size_t nrecv = e->cfg.recv_slots, nsend = e->cfg.send_slots;
    if (posix_memalign((void **)&e->recv_arena, 4096, e->slot_size * nrecv) ||
        posix_memalign((void **)&e->send_arena, 4096, e->slot_size * nsend))
        return -AIOTE_E_NOMEM;
    int rc = nic_mr_reg(n0, e->recv_arena, e->slot_size * nrecv, FI_RECV, -1, &e->recv_mr);
    if (rc)
        return rc;
    rc = nic_mr_reg(n0, e->send_arena, e->slot_size * nsend, FI_SEND, -1, &e->send_mr);
    if (rc)
        return rc;
    e->recv_slots = calloc(nrecv, sizeof *e->recv_slots);
    e->send_free = calloc(nsend, sizeof *e->send_free);
    if (!e->recv_slots || !e->send_free)
        return -AIOTE_E_NOMEM;
    for (size_t i = 0; i < nsend; i++)
        e->send_free[i] = (int)(nsend - 1 - i);
    e->nsend_free = nsend;
    for (size_t i = 0; i < nrecv; i++) {
        e->recv_slots[i].h.kind = CTX_RECV;
        e->recv_slots[i].buf = e->recv_arena + i * e->slot_size;
        FI_CHECK(fabric_post_recv(e, &e->recv_slots[i]));
    }
    return 0;
}

static void nic_close_ep(struct nic *n)
{
    if (n->ep)
        fi_close(&n->ep->fid);
    n->ep = NULL;
}

static void nic_close_rest(struct nic *n)
{
    if (n->av)
        fi_close(&n->av->fid);
    if (n->cq)
        fi_close(&n->cq->fid);
    if (n->domain)
        fi_close(&n->domain->fid);
    if (n->fabric)
        fi_close(&n->fabric->fid);
    n->av = NULL;
    n->cq = NULL;
    n->domain = NULL;
    n->fabric = NULL;
    if (n->fi)
        fi_freeinfo(n->fi);
    n->fi = NULL;
    free(n->tx_ctxs);
    n->tx_ctxs = NULL;
}

void fabric_close(aiote_engine *e)
{
    direct_table_close(e, e->peer_timeout_ns); /* peers stop copying into our regions */
    if (e->is_shm)
        local_close_begin(); /* see local_peers.c */
    for (uint32_t i = 0; i < AIOTE_MAX_NICS; i++)
        if (e->nics[i].local)
            atomic_store(&e->nics[i].local->open, false);
    /* A shm engine whose operations to same-process peers didn't all complete
     * (drain_local_inflight) may be answered into after it closed: its objects
     * go to local_peers.c, which closes them once those engines are gone. */
    struct deferred *d = e->is_shm && e->local_seq && e->defer_teardown ? deferred_new() : NULL;
    if (e->is_shm && e->local_seq && !e->defer_teardown)
        local_detach(e);
    /* Endpoints first: they stop the NICs touching any buffer. */
    pthread_mutex_lock(&e->peer_lock);
    for (size_t i = 0; i < e->npeers; i++) {
        struct peer *p = e->peers[i];
        if (d)
            for (uint32_t k = 0; k < AIOTE_MAX_NICS; k++) {
                deferred_fid(d, p->ep[k] ? &p->ep[k]->fid : NULL);
                p->ep[k] = NULL;
            }
        peer_close(e, p);
    }
    pthread_mutex_unlock(&e->peer_lock);
    for (uint32_t i = 0; i < AIOTE_MAX_NICS; i++) {
        if (d) {
            deferred_fid(d, e->nics[i].ep ? &e->nics[i].ep->fid : NULL);
            e->nics[i].ep = NULL;
        }
        nic_close_ep(&e->nics[i]);
    }
    pthread_mutex_lock(&e->mr_lock);
    for (size_t i = 0; i < e->nmrs; i++) {
        for (uint32_t k = 0; k < AIOTE_MAX_NICS; k++) {
            if (e->mrs[i].used && e->mrs[i].mr[k])
                fi_close(&e->mrs[i].mr[k]->fid);
            e->mrs[i].mr[k] = NULL;
        }
        e->mrs[i].used = false;
    }
    pthread_mutex_unlock(&e->mr_lock);
    if (d) {
        deferred_fid(d, e->recv_mr ? &e->recv_mr->fid : NULL);
        deferred_fid(d, e->send_mr ? &e->send_mr->fid : NULL);
    } else {
        if (e->recv_mr)
            fi_close(&e->recv_mr->fid);
        if (e->send_mr)
            fi_close(&e->send_mr->fid);
    }
    e->recv_mr = e->send_mr = NULL;
    for (uint32_t i = 0; i < AIOTE_MAX_NICS; i++) {
        struct nic *n = &e->nics[i];
        if (d) {
            deferred_fid(d, n->av ? &n->av->fid : NULL);
            deferred_fid(d, n->cq ? &n->cq->fid : NULL);
            deferred_fid(d, n->domain ? &n->domain->fid : NULL);
            deferred_fid(d, n->fabric ? &n->fabric->fid : NULL);
            deferred_info(d, n->fi);
            deferred_free(d, n->tx_ctxs);
            n->av = NULL;
            n->cq = NULL;
            n->domain = NULL;
            n->fabric = NULL;
            n->fi = NULL;
            n->tx_ctxs = NULL;
        }
        nic_close_rest(n);
    }
    if (d) {
        deferred_free(d, e->recv_arena);
        deferred_free(d, e->send_arena);
        deferred_free(d, e->recv_slots);
        e->recv_arena = e->send_arena = NULL;
        e->recv_slots = NULL;
        local_engine_closed(e, e->local_seq, d);
        e->local_seq = 0;
    } else if (e->is_shm && e->local_seq) {
        /* no memory for the record: torn down at once above (the old behaviour) */
        local_engine_closed(e, e->local_seq, NULL);
        e->local_seq = 0;
    }
    if (e->is_shm)
        local_close_end();
    free(e->recv_arena);
    free(e->send_arena);
    free(e->recv_slots);
    free(e->send_free);
    e->recv_arena = e->send_arena = NULL;
    e->recv_slots = NULL;
    e->send_free = NULL;
}

/* ---- control operations (run on the worker thread) -------------------- */

int ctrl_mr_register(aiote_engine *e, void *argp)
{
    struct mr_reg_arg *a = argp;
    uint64_t acc = 0;
    if (a->access & AIOTE_ACCESS_LOCAL)
        acc |= FI_WRITE | FI_SEND;
    if (a->access & AIOTE_ACCESS_REMOTE)
        acc |= FI_REMOTE_WRITE;
    struct fid_mr *mrs[AIOTE_MAX_NICS] = {0};
    for (uint32_t i = 0; i < e->nnics; i++) {
        int rc = nic_mr_reg(&e->nics[i], a->addr, a->len, acc, a->cuda_device, &mrs[i]);
        if (rc) {
            for (uint32_t k = 0; k < i; k++)
                fi_close(&mrs[k]->fid);
            return rc;
        }
    }
    pthread_mutex_lock(&e->mr_lock);
    size_t idx = e->nmrs;
    for (size_t i = 0; i < e->nmrs; i++)
        if (!e->mrs[i].used) {
            idx = i;
            break;
        }
    if (idx == e->nmrs) {
        if (e->nmrs == e->cap_mrs) {
            size_t cap = e->cap_mrs ? e->cap_mrs * 2 : 64;
            struct mr_slot *n = realloc(e->mrs, cap * sizeof *n);
            if (!n) {
                pthread_mutex_unlock(&e->mr_lock);
                for (uint32_t k = 0; k < e->nnics; k++)
                    fi_close(&mrs[k]->fid);
                return -AIOTE_E_NOMEM;
            }
            memset(n + e->cap_mrs, 0, (cap - e->cap_mrs) * sizeof *n);
            e->mrs = n;
            e->cap_mrs = cap;
        }
        e->nmrs++;
    }
    struct mr_slot *s = &e->mrs[idx];
    for (uint32_t k = 0; k < e->nnics; k++) {
        s->mr[k] = mrs[k];
        s->desc[k] = fi_mr_desc(mrs[k]);
        a->keys[k] = fi_mr_key(mrs[k]);
    }
    s->addr = a->addr;
    s->len = a->len;
    s->gen++;
    s->used = true;
    s->device = a->cuda_device >= 0;
    s->closing = false;
    s->refs = 0;
    a->mr_id = ((uint64_t)s->gen << 32) | idx;
    a->base = (e->nics[0].fi->domain_attr->mr_mode & FI_MR_VIRT_ADDR) ? (uint64_t)(uintptr_t)a->addr : 0;
    s->base = a->base;
    s->key0 = a->keys[0];
    s->remote = (a->access & AIOTE_ACCESS_REMOTE) != 0;
    e->mrkeys_dirty = true;
    if (!s->device && (a->access & AIOTE_ACCESS_REMOTE))
        direct_publish(e, idx, s->gen, a->keys[0], (uint64_t)(uintptr_t)a->addr, a->len);
    pthread_mutex_unlock(&e->mr_lock);
    return 0;
}

int ctrl_mr_close(aiote_engine *e, void *argp)
{
    struct mr_close_arg *a = argp;
    int first = 0;
    for (uint32_t k = 0; k < AIOTE_MAX_NICS; k++) {
        if (!a->mr[k])
            continue;
        int rc = fi_close(&a->mr[k]->fid);
        if (rc && !first)
            first = rc;
    }
    if (first) {
        aiote_set_error("fi_close(mr) failed: %s", fi_strerror(-first));
        return -AIOTE_E_PROVIDER;
    }
    return 0;
}

int ctrl_peer_insert(aiote_engine *e, void *argp)
{
    struct peer_arg *a = argp;
    const uint8_t *addrs[AIOTE_MAX_NICS];
    size_t lens[AIOTE_MAX_NICS];
    uint32_t count = 0;
    if (parse_addrs(a->addrs, a->len, &count, addrs, lens)) {
        aiote_set_error("malformed peer address list (%zu bytes)", a->len);
        return -AIOTE_E_PEER;
    }
    for (size_t i = 0; i < e->npeers; i++) {
        struct peer *p = e->peers[i];
        /* a dead process's address may come back (pid reuse): a new peer then */
        if (!p->gone && p->blob_len == a->len && memcmp(p->blob, a->addrs, a->len) == 0) {
            a->peer = (uint32_t)i;
            return 0;
        }
    }
    struct peer *p = calloc(1, sizeof *p + a->len);
    if (!p)
        return -AIOTE_E_NOMEM;
    p->nnics = count;
    p->pidfd = -1;
    p->blob_len = a->len;
    memcpy(p->blob, a->addrs, a->len);
    /* The AV copies what it needs; pad each address to the provider's size. */
    for (uint32_t j = 0; j < count; j++) {
        uint8_t buf[AIOTE_ADDR_MAX] = {0};
        memcpy(buf, addrs[j], lens[j]);
        for (uint32_t i = 0; i < e->nnics; i++) {
            fi_addr_t fa = FI_ADDR_NOTAVAIL;
            int r = fi_av_insert(e->nics[i].av, buf, 1, &fa, 0, NULL);
            if (r != 1 || fa == FI_ADDR_NOTAVAIL) {
                for (uint32_t k = 0; k < j; k++)
                    local_unref(p->local[k]);
                free(p);
                aiote_set_error("NIC %u rejected peer address %u (%zu bytes): %s", i, j, lens[j],
                                r < 0 ? fi_strerror(-r) : "not inserted");
                return -AIOTE_E_PEER;
            }
            p->fi[i][j] = fa;
        }
        p->local[j] = e->is_shm ? local_lookup(addrs[j], lens[j]) : NULL;
    }
    if (e->is_shm && !p->local[0]) {
        int rc = peer_open_eps(e, p);
        if (rc) {
            peer_close(e, p);
            for (uint32_t k = 0; k < count; k++)
                local_unref(p->local[k]);
            free(p);
            return rc;
        }
    }
    pthread_mutex_lock(&e->peer_lock);
    if (e->npeers == e->cap_peers) {
        size_t cap = e->cap_peers ? e->cap_peers * 2 : 16;
        struct peer **np = realloc(e->peers, cap * sizeof *np);
        if (!np) {
            pthread_mutex_unlock(&e->peer_lock);
            peer_close(e, p);
            for (uint32_t k = 0; k < count; k++)
                local_unref(p->local[k]);
            free(p);
            return -AIOTE_E_NOMEM;
        }
        e->peers = np;
        e->cap_peers = cap;
    }
    a->peer = (uint32_t)e->npeers;
    e->peers[e->npeers++] = p;
    pthread_mutex_unlock(&e->peer_lock);
    return 0;
}

/* Take a NIC out of service: what is in flight on it fails naming it and
 * the router skips it from now on.  The endpoint stays open and its CQ is
 * still read: imms peers already sent through it keep counting, and late
 * completions of the failed contexts are dropped (worker.c).  Closing it
 * would tear down shm state other endpoints of the process rely on. */
int ctrl_nic_fail(aiote_engine *e, void *arg)
{
    struct nic *n = &e->nics[*(uint32_t *)arg];
    if (atomic_exchange(&n->failed, true))
        return 0;
    n->stats.failed = 1;
    n->stats.fi_errno = FI_ECANCELED;
    fail_nic_inflight(e, n, FI_ECANCELED);
    return 0;
}

/* ---- shm peers: their processes and our endpoints to them -------------- */

/* libfabric shm names endpoints "fi_shm://<pid>:..." (or "<pid>:..."). */
static int shm_addr_pid(const uint8_t *a, size_t len)
{
    static const char pre[] = "fi_shm://";
    size_t i = 0;
    if (len >= sizeof pre - 1 && memcmp(a, pre, sizeof pre - 1) == 0)
        i = sizeof pre - 1;
    long pid = 0;
    size_t start = i;
    while (i < len && a[i] >= '0' && a[i] <= '9' && pid < (1L << 22))
        pid = pid * 10 + (a[i++] - '0');
    if (i == start || i >= len || a[i] != ':' || pid <= 0 || pid >= (1L << 22))
        return 0;
    return (int)pid;
}

/* An endpoint of our own per NIC for this peer, and a pidfd on its process
 * so its death is seen at once (shm itself never reports it). */
int peer_open_eps(aiote_engine *e, struct peer *p)
{
    const uint8_t *addrs[AIOTE_MAX_NICS];
    size_t lens[AIOTE_MAX_NICS];
    uint32_t count;
    if (parse_addrs(p->blob, p->blob_len, &count, addrs, lens))
        return -AIOTE_E_PEER;
    p->pid = shm_addr_pid(addrs[0], lens[0]);
    if (p->pid && p->pid != getpid()) {
#ifdef SYS_pidfd_open
        p->pidfd = (int)syscall(SYS_pidfd_open, p->pid, 0);
        if (p->pidfd < 0 && errno == ESRCH)
            p->gone = true; /* already exited */
#endif
    }
    for (uint32_t i = 0; i < e->nnics; i++) {
        struct nic *n = &e->nics[i];
        FI_CHECK(fi_endpoint(n->domain, n->fi, &p->ep[i], NULL));
        FI_CHECK(fi_ep_bind(p->ep[i], &n->cq->fid, FI_TRANSMIT | FI_RECV));
        FI_CHECK(fi_ep_bind(p->ep[i], &n->av->fid, 0));
        FI_CHECK(fi_enable(p->ep[i]));
    }
    return 0;
}

void peer_close(aiote_engine *e, struct peer *p)
{
    (void)e;
    for (uint32_t i = 0; i < AIOTE_MAX_NICS; i++) {
        if (p->ep[i])
            fi_close(&p->ep[i]->fid);
        p->ep[i] = NULL;
    }
    if (p->pidfd >= 0)
        close(p->pidfd);
    p->pidfd = -1;
}

/* Has the peer's process exited?  pidfd where the kernel has it, else kill(0). */
bool peer_process_gone(struct peer *p)
{
    if (p->gone)
        return true;
    if (p->pidfd >= 0) {
        struct pollfd f = {.fd = p->pidfd, .events = POLLIN};
        return poll(&f, 1, 0) > 0;
    }
    if (p->pid && p->pid != getpid())
        return kill(p->pid, 0) != 0 && errno == ESRCH;
    return false;
}
