/* NIC discovery: what libfabric offers on this host, one entry per
 * provider + domain.
 *
 * fi_getinfo is asked the way fi_info(1) asks it: hints that accept every
 * mode bit and every memory-registration mode, so that providers needing
 * FI_CONTEXT, FI_MR_LOCAL, FI_MR_PROV_KEY ... are listed too.  Entries of one
 * provider + domain (a provider lists a domain once per endpoint type and per
 * address family: tcp's "lo" comes as 127.0.0.1/32 and ::1/128) are merged:
 * capabilities and endpoint types are OR-ed, the scalar attributes come from
 * the first FI_EP_RDM entry (the endpoint type aiote uses), else the first.
 * The device facts (name, driver, PCI address, link) come from info->nic
 * where the provider fills it (efa, verbs, cxi, ...); sockets-style
 * providers (tcp, udp, sockets) leave it NULL, and the Python layer adds
 * what sysfs knows about their interface.
 *
 * FI_HMEM is only advertised by most providers when it is asked for, so a
 * second query with caps = FI_HMEM marks the domains that can do it.
 *
 * Nothing here touches an engine: it may be called from any thread. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define FI_VER FI_VERSION(1, 17)

/* the mr_mode bits of FI_VERSION >= 1.5: hints accepting all of them list
 * every provider, whatever it needs */
#define MR_MODE_ANY                                                                           \
    (FI_MR_LOCAL | FI_MR_RAW | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED | FI_MR_PROV_KEY |          \
     FI_MR_MMU_NOTIFY | FI_MR_RMA_EVENT | FI_MR_ENDPOINT | FI_MR_HMEM | FI_MR_COLLECTIVE)

static void copy_str(char *dst, size_t cap, const char *src)
{
    if (!src)
        src = "";
    snprintf(dst, cap, "%s", src);
}

static struct fi_info *discovery_hints(uint64_t caps)
{
    struct fi_info *h = fi_allocinfo();
    if (!h)
        return NULL;
    h->caps = caps;
    h->mode = ~0ULL;
    h->domain_attr->mode = ~0ULL;
    h->domain_attr->mr_mode = MR_MODE_ANY;
    h->ep_attr->type = FI_EP_UNSPEC;
    return h;
}

/* provider matches the filter: the whole name ("tcp;ofi_rxm") or one of its
 * ';'-separated layers ("tcp" matches "tcp" and "tcp;ofi_rxm"). */
static bool provider_matches(const char *prov, const char *filter)
{
    if (!filter || !*filter)
        return true;
    if (!prov)
        return false;
    if (strcmp(prov, filter) == 0)
        return true;
    size_t flen = strlen(filter);
    for (const char *p = prov; *p;) {
        size_t n = strcspn(p, ";");
        if (n == flen && strncmp(p, filter, n) == 0)
            return true;
        p += n;
        if (*p == ';')
            p++;
    }
    return false;
}

static int ep_type_bit(enum fi_ep_type t)
{
    switch (t) {
    case FI_EP_MSG:
        return AIOTE_NIC_EP_MSG;
    case FI_EP_RDM:
        return AIOTE_NIC_EP_RDM;
    case FI_EP_DGRAM:
        return AIOTE_NIC_EP_DGRAM;
    default:
        return 0;
    }
}

static const char *prov_name(const struct fi_info *it)
{
    return it->fabric_attr && it->fabric_attr->prov_name ? it->fabric_attr->prov_name : "";
}

static const char *domain_name(const struct fi_info *it)
{
    return it->domain_attr && it->domain_attr->name ? it->domain_attr->name : "";
}

static void fill_scalars(aiote_nic_info *o, const struct fi_info *it)
{
    copy_str(o->fabric, sizeof o->fabric, it->fabric_attr ? it->fabric_attr->name : NULL);
    if (it->domain_attr) {
        o->mr_mode = (uint64_t)it->domain_attr->mr_mode;
        o->mr_key_size = it->domain_attr->mr_key_size;
        o->cq_data_size = it->domain_attr->cq_data_size;
    }
    o->max_msg_size = it->ep_attr ? it->ep_attr->max_msg_size : 0;
    o->inject_size = it->tx_attr ? it->tx_attr->inject_size : 0;
    int mr_mode = it->domain_attr ? it->domain_attr->mr_mode : 0; /* fi_tostr reads an int */
    if (!fi_tostr_r(o->mr_mode_str, sizeof o->mr_mode_str, &mr_mode, FI_TYPE_MR_MODE))
        o->mr_mode_str[0] = 0;
}

static void fill_nic(aiote_nic_info *o, const struct fid_nic *nic)
{
    o->has_nic_attr = 1;
    if (nic->device_attr) {
        const struct fi_device_attr *d = nic->device_attr;
        copy_str(o->device, sizeof o->device, d->name);
        copy_str(o->driver, sizeof o->driver, d->driver);
        copy_str(o->vendor_id, sizeof o->vendor_id, d->vendor_id);
        copy_str(o->device_id, sizeof o->device_id, d->device_id);
        copy_str(o->firmware, sizeof o->firmware, d->firmware);
    }
    if (nic->bus_attr && nic->bus_attr->bus_type == FI_BUS_PCI) {
        const struct fi_pci_attr *p = &nic->bus_attr->attr.pci;
        snprintf(o->pci, sizeof o->pci, "%04x:%02x:%02x.%x", (unsigned)p->domain_id,
                 (unsigned)p->bus_id, (unsigned)p->device_id, (unsigned)p->function_id);
    }
    if (nic->link_attr) {
        const struct fi_link_attr *l = nic->link_attr;
        copy_str(o->link_address, sizeof o->link_address, l->address);
        copy_str(o->network_type, sizeof o->network_type, l->network_type);
        o->link_speed = (uint64_t)l->speed;
        o->mtu = (uint64_t)l->mtu;
        switch (l->state) {
        case FI_LINK_UP:
            o->link_state = AIOTE_LINK_UP;
            break;
        case FI_LINK_DOWN:
            o->link_state = AIOTE_LINK_DOWN;
            break;
        default:
            o->link_state = AIOTE_LINK_UNKNOWN;
            break;
        }
    }
}

static aiote_nic_info *find_entry(aiote_nic_info *v, size_t n, const char *prov, const char *dom)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(v[i].provider, prov) == 0 && strcmp(v[i].domain, dom) == 0)
            return &v[i];
    return NULL;
}

/* Mark the domains that answer a caps = FI_HMEM query.  A failure here only
 * means "not advertised": it never fails the listing. */
static void mark_hmem(aiote_nic_info *v, size_t n)
{
    struct fi_info *h = discovery_hints(FI_HMEM);
    if (!h)
        return;
    struct fi_info *res = NULL;
    int rc = fi_getinfo(FI_VER, NULL, NULL, 0, h, &res);
    fi_freeinfo(h);
    if (rc != 0) /* -FI_ENODATA: no provider offers FI_HMEM here */
        return;
    for (struct fi_info *it = res; it; it = it->next) {
        aiote_nic_info *o = find_entry(v, n, prov_name(it), domain_name(it));
        if (o && (it->caps & FI_HMEM)) {
            o->hmem = 1;
            o->caps |= FI_HMEM;
        }
    }
    fi_freeinfo(res);
}

int aiote_list_nics(const char *provider, aiote_nic_info *out, size_t max)
{
    if (max && !out) {
        aiote_set_error("aiote_list_nics: out is NULL but max is %zu", max);
        return -AIOTE_E_INVAL;
    }
    struct fi_info *h = discovery_hints(0);
    if (!h) {
        aiote_set_error("fi_allocinfo failed");
        return -AIOTE_E_NOMEM;
    }
    struct fi_info *res = NULL;
    int rc = fi_getinfo(FI_VER, NULL, NULL, 0, h, &res);
    fi_freeinfo(h);
    if (rc == -FI_ENODATA)
        return 0; /* no provider at all */
    if (rc != 0) {
        aiote_set_error("fi_getinfo failed: %s (%d)", fi_strerror(-rc), rc);
        return -AIOTE_E_PROVIDER;
    }
    size_t total = 0;
    for (struct fi_info *it = res; it; it = it->next)
        total++;
    aiote_nic_info *v = total ? calloc(total, sizeof *v) : NULL;
    if (total && !v) {
        fi_freeinfo(res);
        aiote_set_error("out of memory listing %zu libfabric entries", total);
        return -AIOTE_E_NOMEM;
    }
    size_t n = 0;
    for (struct fi_info *it = res; it; it = it->next) {
        const char *prov = prov_name(it);
        const char *dom = domain_name(it);
        if (!provider_matches(prov, provider))
            continue;
        enum fi_ep_type type = it->ep_attr ? it->ep_attr->type : FI_EP_UNSPEC;
        aiote_nic_info *o = find_entry(v, n, prov, dom);
        if (!o) {
            o = &v[n++];
            copy_str(o->provider, sizeof o->provider, prov);
            copy_str(o->domain, sizeof o->domain, dom);
            o->link_state = AIOTE_LINK_UNKNOWN;
            fill_scalars(o, it);
            o->from_rdm = type == FI_EP_RDM;
        } else if (!o->from_rdm && type == FI_EP_RDM) {
            fill_scalars(o, it);
            o->from_rdm = 1;
        }
        o->caps |= it->caps;
        o->ep_types |= ep_type_bit(type);
        o->entries++;
        if (it->nic && !o->has_nic_attr)
            fill_nic(o, it->nic);
    }
    fi_freeinfo(res);
    mark_hmem(v, n);
    for (size_t i = 0; i < n; i++) {
        aiote_nic_info *o = &v[i];
        o->hmem = (o->caps & FI_HMEM) != 0;
        o->rma = (o->caps & FI_RMA) != 0;
        uint64_t caps = o->caps;
        if (!fi_tostr_r(o->caps_str, sizeof o->caps_str, &caps, FI_TYPE_CAPS))
            o->caps_str[0] = 0;
    }
    size_t copy = n < max ? n : max;
    if (copy)
        memcpy(out, v, copy * sizeof *v);
    free(v);
    return (int)n;
}
