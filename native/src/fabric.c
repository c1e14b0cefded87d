/* libfabric set-up: provider choice, endpoint, CQ, AV, message slots, and
 * the control operations (registration, peer insertion) that the worker runs. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "internal.h"

#define FI_VER FI_VERSION(1, 17)

/* mr_mode bits we know how to honour; providers needing others are skipped. */
#define MR_MODE_SUPPORTED \
    (FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED | FI_MR_PROV_KEY | FI_MR_ENDPOINT)

static struct fi_info *make_hints(const aiote_config *cfg, bool dc)
{
    struct fi_info *h = fi_allocinfo();
    if (!h)
        return NULL;
    h->caps = FI_RMA | FI_MSG | FI_WRITE | FI_REMOTE_WRITE | FI_SEND | FI_RECV;
    h->ep_attr->type = FI_EP_RDM;
    /* we hand providers a fi_context2 per operation */
    h->mode = FI_CONTEXT | FI_CONTEXT2;
    h->domain_attr->mr_mode = MR_MODE_SUPPORTED;
    /* only the worker thread touches the endpoint */
    h->domain_attr->threading = FI_THREAD_DOMAIN;
    h->domain_attr->resource_mgmt = FI_RM_ENABLED;
    if (dc)
        h->tx_attr->op_flags = FI_DELIVERY_COMPLETE;
    if (cfg->provider && *cfg->provider)
        h->fabric_attr->prov_name = strdup(cfg->provider);
    if (cfg->domain && *cfg->domain)
        h->domain_attr->name = strdup(cfg->domain);
    return h;
}

static int get_info(aiote_engine *e)
{
    const aiote_config *cfg = &e->cfg;
    int last = -FI_ENODATA;
    for (int attempt = 0; attempt < 2; attempt++) {
        bool dc = cfg->delivery_complete && attempt == 0;
        if (!cfg->delivery_complete && attempt == 0)
            continue;
        struct fi_info *h = make_hints(cfg, dc);
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
            e->fi = fi_dupinfo(it);
            e->info.delivery_complete = dc;
            break;
        }
        fi_freeinfo(res);
        if (e->fi)
            return 0;
        last = -FI_ENODATA;
    }
    aiote_set_error("no libfabric provider matches provider=%s node=%s domain=%s: %s",
                    cfg->provider ? cfg->provider : "(any)", cfg->node ? cfg->node : "(none)",
                    cfg->domain ? cfg->domain : "(any)", fi_strerror(-last));
    return -AIOTE_E_PROVIDER;
}

#define FI_CHECK(call)                                                                 \
    do {                                                                               \
        int _rc = (int)(call);                                                         \
        if (_rc) {                                                                     \
            aiote_set_error("%s failed: %s (%d)", #call, fi_strerror(-_rc), _rc);      \
            return -AIOTE_E_PROVIDER;                                                  \
        }                                                                              \
    } while (0)

static int register_arena(aiote_engine *e, uint8_t *buf, size_t len, uint64_t access,
                          struct fid_mr **mr)
{
    uint64_t key = 0;
    if (!(e->fi->domain_attr->mr_mode & FI_MR_PROV_KEY) && getrandom(&key, sizeof key, 0) != sizeof key)
        key = (uint64_t)(uintptr_t)buf ^ 0x9e3779b97f4a7c15ull;
    FI_CHECK(fi_mr_reg(e->domain, buf, len, access, 0, key, 0, mr, NULL));
    if (e->fi->domain_attr->mr_mode & FI_MR_ENDPOINT) {
        FI_CHECK(fi_mr_bind(*mr, &e->ep->fid, 0));
        FI_CHECK(fi_mr_enable(*mr));
    }
    return 0;
}

int fabric_post_recv(aiote_engine *e, struct recv_slot *s)
{
    void *desc = fi_mr_desc(e->recv_mr);
    return (int)fi_recv(e->ep, s->buf, e->slot_size, desc, FI_ADDR_UNSPEC, &s->h.fi);
}

int fabric_open(aiote_engine *e)
{
    int rc = get_info(e);
    if (rc)
        return rc;
    struct fi_info *fi = e->fi;
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
    e->is_shm = strcmp(fi->fabric_attr->prov_name, "shm") == 0;

    FI_CHECK(fi_fabric(fi->fabric_attr, &e->fabric, NULL));
    FI_CHECK(fi_domain(e->fabric, fi, &e->domain, NULL));

    /* Prefer a CQ with an fd to sleep on; fall back to none (timed sleeps). */
    struct fi_cq_attr ca = {.format = FI_CQ_FORMAT_DATA, .size = 0, .wait_obj = FI_WAIT_NONE};
    e->cq_fd = -1;
    if (e->cfg.polling != AIOTE_POLL_BUSY) {
        ca.wait_obj = FI_WAIT_FD;
        if (fi_cq_open(e->domain, &ca, &e->cq, NULL) == 0) {
            int fd = -1;
            if (fi_control(&e->cq->fid, FI_GETWAIT, &fd) == 0 && fd >= 0)
                e->cq_fd = fd;
        } else {
            e->cq = NULL;
        }
    }
    if (!e->cq) {
        ca.wait_obj = FI_WAIT_NONE;
        FI_CHECK(fi_cq_open(e->domain, &ca, &e->cq, NULL));
    }
    e->info.wait_fd = e->cq_fd >= 0;

    struct fi_av_attr aa = {.type = FI_AV_TABLE};
    FI_CHECK(fi_av_open(e->domain, &aa, &e->av, NULL));
    FI_CHECK(fi_endpoint(e->domain, fi, &e->ep, NULL));
    FI_CHECK(fi_ep_bind(e->ep, &e->cq->fid, FI_TRANSMIT | FI_RECV));
    FI_CHECK(fi_ep_bind(e->ep, &e->av->fid, 0));
    FI_CHECK(fi_enable(e->ep));
    e->addr_len = sizeof e->addr;
    FI_CHECK(fi_getname(&e->ep->fid, e->addr, &e->addr_len));
    e->info.addr_len = (int)e->addr_len;
    if (e->is_shm && !(e->local = local_register(e->addr, e->addr_len)))
        return -AIOTE_E_NOMEM;

    /* Transmit contexts bound what is in flight to what the queue can hold. */
    e->ntx = fi->tx_attr->size ? fi->tx_attr->size : 1024;
    if (e->ntx > 8192)
        e->ntx = 8192;
    e->tx_ctxs = calloc(e->ntx, sizeof *e->tx_ctxs);
    if (!e->tx_ctxs)
        return -AIOTE_E_NOMEM;
    for (size_t i = 0; i < e->ntx; i++) {
        e->tx_ctxs[i].h.kind = CTX_TX;
        e->tx_ctxs[i].next_free = i + 1 < e->ntx ? &e->tx_ctxs[i + 1] : NULL;
    }
    e->tx_free = &e->tx_ctxs[0];

    /* message slots: header + sender address + payload */
    e->slot_size = sizeof(uint32_t) * 4 + AIOTE_ADDR_MAX + e->cfg.msg_size;
    size_t nrecv = e->cfg.recv_slots, nsend = e->cfg.send_slots;
    if (posix_memalign((void **)&e->recv_arena, 4096, e->slot_size * nrecv) ||
        posix_memalign((void **)&e->send_arena, 4096, e->slot_size * nsend))
        return -AIOTE_E_NOMEM;
    rc = register_arena(e, e->recv_arena, e->slot_size * nrecv, FI_RECV, &e->recv_mr);
    if (rc)
        return rc;
    rc = register_arena(e, e->send_arena, e->slot_size * nsend, FI_SEND, &e->send_mr);
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

void fabric_close(aiote_engine *e)
{
    /* Endpoint first: it stops the NIC touching any buffer. */
    if (e->ep)
        fi_close(&e->ep->fid);
    e->ep = NULL;
    pthread_mutex_lock(&e->mr_lock);
    for (size_t i = 0; i < e->nmrs; i++) {
        if (e->mrs[i].used && e->mrs[i].mr)
            fi_close(&e->mrs[i].mr->fid);
        e->mrs[i].mr = NULL;
        e->mrs[i].used = false;
    }
    pthread_mutex_unlock(&e->mr_lock);
    if (e->recv_mr)
        fi_close(&e->recv_mr->fid);
    if (e->send_mr)
        fi_close(&e->send_mr->fid);
    e->recv_mr = e->send_mr = NULL;
    if (e->av)
        fi_close(&e->av->fid);
    if (e->cq)
        fi_close(&e->cq->fid);
    if (e->domain)
        fi_close(&e->domain->fid);
    if (e->fabric)
        fi_close(&e->fabric->fid);
    e->av = NULL;
    e->cq = NULL;
    e->domain = NULL;
    e->fabric = NULL;
    if (e->fi)
        fi_freeinfo(e->fi);
    e->fi = NULL;
    free(e->recv_arena);
    free(e->send_arena);
    free(e->recv_slots);
    free(e->send_free);
    free(e->tx_ctxs);
    e->recv_arena = e->send_arena = NULL;
    e->recv_slots = NULL;
    e->send_free = NULL;
    e->tx_ctxs = NULL;
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
    bool prov_key = e->fi->domain_attr->mr_mode & FI_MR_PROV_KEY;
    size_t ksz = e->fi->domain_attr->mr_key_size;
    struct fid_mr *mr = NULL;
    int rc = -FI_ENOKEY;
    /* Requested keys are random 64-bit values (never sequential): on tcp and
     * shm the requested key is the key, and guessing it would let any peer
     * write here.  Retry on the rare collision. */
    for (int tries = 0; tries < 8 && rc == -FI_ENOKEY; tries++) {
        uint64_t key = 0;
        if (!prov_key) {
            if (getrandom(&key, sizeof key, 0) != sizeof key) {
                aiote_set_error("getrandom failed: %s", strerror(errno));
                return -AIOTE_E_PROVIDER;
            }
            if (ksz && ksz < 8)
                key &= (1ull << (8 * ksz)) - 1;
            if (key == 0)
                key = 0x5eed;
        }
        rc = fi_mr_reg(e->domain, a->addr, a->len, acc, 0, key, 0, &mr, NULL);
    }
    if (rc) {
        aiote_set_error("fi_mr_reg(%p, %llu) failed: %s (%d)", a->addr,
                        (unsigned long long)a->len, fi_strerror(-rc), rc);
        return -AIOTE_E_PROVIDER;
    }
    if (e->fi->domain_attr->mr_mode & FI_MR_ENDPOINT) {
        if ((rc = fi_mr_bind(mr, &e->ep->fid, 0)) || (rc = fi_mr_enable(mr))) {
            fi_close(&mr->fid);
            aiote_set_error("binding region to endpoint failed: %s", fi_strerror(-rc));
            return -AIOTE_E_PROVIDER;
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
                fi_close(&mr->fid);
                return -AIOTE_E_NOMEM;
            }
            memset(n + e->cap_mrs, 0, (cap - e->cap_mrs) * sizeof *n);
            e->mrs = n;
            e->cap_mrs = cap;
        }
        e->nmrs++;
    }
    struct mr_slot *s = &e->mrs[idx];
    s->mr = mr;
    s->desc = fi_mr_desc(mr);
    s->addr = a->addr;
    s->len = a->len;
    s->key = fi_mr_key(mr);
    s->gen++;
    s->used = true;
    s->refs = 0;
    a->mr_id = ((uint64_t)s->gen << 32) | idx;
    a->key = s->key;
    a->base = (e->fi->domain_attr->mr_mode & FI_MR_VIRT_ADDR) ? (uint64_t)(uintptr_t)a->addr : 0;
    pthread_mutex_unlock(&e->mr_lock);
    return 0;
}

int ctrl_mr_close(aiote_engine *e, void *arg)
{
    (void)e;
    struct fid_mr *mr = arg;
    int rc = fi_close(&mr->fid);
    if (rc) {
        aiote_set_error("fi_close(mr) failed: %s", fi_strerror(-rc));
        return -AIOTE_E_PROVIDER;
    }
    return 0;
}

int ctrl_peer_insert(aiote_engine *e, void *argp)
{
    struct peer_arg *a = argp;
    pthread_mutex_lock(&e->peer_lock);
    for (size_t i = 0; i < e->npeers; i++) {
        if (e->peer_addr_len[i] == a->len && memcmp(e->peer_addr[i], a->addr, a->len) == 0) {
            a->peer = (uint32_t)i;
            pthread_mutex_unlock(&e->peer_lock);
            return 0;
        }
    }
    pthread_mutex_unlock(&e->peer_lock);
    /* The AV copies what it needs; pad the address to the provider's size. */
    uint8_t buf[AIOTE_ADDR_MAX] = {0};
    memcpy(buf, a->addr, a->len);
    fi_addr_t fa = FI_ADDR_NOTAVAIL;
    int n = fi_av_insert(e->av, buf, 1, &fa, 0, NULL);
    if (n != 1 || fa == FI_ADDR_NOTAVAIL) {
        aiote_set_error("fi_av_insert rejected the peer address (%zu bytes): %s", a->len,
                        n < 0 ? fi_strerror(-n) : "not inserted");
        return -AIOTE_E_PEER;
    }
    pthread_mutex_lock(&e->peer_lock);
    if (e->npeers == e->cap_peers) {
        size_t cap = e->cap_peers ? e->cap_peers * 2 : 16;
        fi_addr_t *pf = realloc(e->peer_fi, cap * sizeof *pf);
        if (pf)
            e->peer_fi = pf;
        struct local_ep **pl2 = realloc(e->peer_local, cap * sizeof *pl2);
        if (pl2)
            e->peer_local = pl2;
        uint8_t(*pa)[AIOTE_ADDR_MAX] = realloc(e->peer_addr, cap * sizeof *pa);
        if (pa)
            e->peer_addr = pa;
        size_t *pl = realloc(e->peer_addr_len, cap * sizeof *pl);
        if (pl)
            e->peer_addr_len = pl;
        if (!pf || !pa || !pl || !pl2) {
            pthread_mutex_unlock(&e->peer_lock);
            return -AIOTE_E_NOMEM;
        }
        e->cap_peers = cap;
    }
    size_t i = e->npeers;
    e->peer_fi[i] = fa;
    e->peer_local[i] = e->is_shm ? local_lookup(a->addr, a->len) : NULL;
    memcpy(e->peer_addr[i], a->addr, a->len);
    e->peer_addr_len[i] = a->len;
    e->npeers++;
    a->peer = (uint32_t)i;
    pthread_mutex_unlock(&e->peer_lock);
    return 0;
}
