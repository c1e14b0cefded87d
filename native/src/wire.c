/* Wire formats that arrive from other processes: peer address lists (in
 * descriptors and message headers) and message headers.  Every length is
 * checked against the bytes actually there; aiote_check_* expose the same
 * parsers to tests and fuzzers. */
#include <string.h>

#include "internal.h"

/* count u8, then count x (u16 little-endian length, bytes) */
int parse_addrs(const uint8_t *b, size_t len, uint32_t *n, const uint8_t **addrs, size_t *lens)
{
    if (!b || len < 1)
        return -AIOTE_E_PEER;
    uint32_t count = b[0];
    if (count < 1 || count > AIOTE_MAX_NICS)
        return -AIOTE_E_PEER;
    size_t pos = 1;
    for (uint32_t i = 0; i < count; i++) {
        if (len - pos < 2)
            return -AIOTE_E_PEER;
        uint16_t l;
        memcpy(&l, b + pos, 2);
        pos += 2;
        if (l < 1 || l > AIOTE_ADDR_MAX || len - pos < l)
            return -AIOTE_E_PEER;
        addrs[i] = b + pos;
        lens[i] = l;
        pos += l;
    }
    if (pos != len)
        return -AIOTE_E_PEER;
    *n = count;
    return 0;
}

/* header: u32 magic|version<<16, u32 sender-address length, u32 payload
 * length, u32 reserved; then the sender's address list, then the payload. */
int parse_msg(const uint8_t *b, size_t len, struct msg_view *out)
{
    uint32_t hdr[4];
    if (!b || len < sizeof hdr)
        return -AIOTE_E_INVAL;
    memcpy(hdr, b, sizeof hdr);
    if ((hdr[0] & 0xffff) != MSG_MAGIC || (hdr[0] >> 16) != MSG_VERSION)
        return -AIOTE_E_INVAL;
    if (hdr[1] > MSG_SRC_MAX || (uint64_t)hdr[1] + hdr[2] != len - sizeof hdr)
        return -AIOTE_E_INVAL;
    /* the sender's addresses must parse: the reply goes there */
    const uint8_t *addrs[AIOTE_MAX_NICS];
    size_t lens[AIOTE_MAX_NICS];
    uint32_t count;
    if (parse_addrs(b + sizeof hdr, hdr[1], &count, addrs, lens))
        return -AIOTE_E_INVAL;
    out->src_off = sizeof hdr;
    out->src_len = hdr[1];
    out->payload_off = sizeof hdr + hdr[1];
    out->payload_len = hdr[2];
    return 0;
}

int aiote_check_addrs(const uint8_t *b, size_t len)
{
    const uint8_t *addrs[AIOTE_MAX_NICS];
    size_t lens[AIOTE_MAX_NICS];
    uint32_t count;
    int rc = parse_addrs(b, len, &count, addrs, lens);
    return rc ? rc : (int)count;
}

int aiote_check_message(const uint8_t *b, size_t len, uint64_t *payload_off, uint64_t *payload_len)
{
    struct msg_view v;
    int rc = parse_msg(b, len, &v);
    if (rc)
        return rc;
    *payload_off = v.payload_off;
    *payload_len = v.payload_len;
    return 0;
}
