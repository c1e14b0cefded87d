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

/* Carried writes (carry.c): u32 magic, u32 count, u64 seq, u32 imm, u32 flags, then
 * count x (u64 key, u64 remote address, u32 length), then the lengths' bytes in
 * order, nothing after. */
int parse_carry(const uint8_t *b, size_t len, struct carry_view *out)
{
    if (!b || len < CARRY_HDR)
        return -AIOTE_E_INVAL;
    uint32_t magic, count, flags;
    memcpy(&magic, b, 4);
    memcpy(&count, b + 4, 4);
    memcpy(&flags, b + 20, 4);
    if (magic != CARRY_MAGIC || count < 1 || count > CARRY_MAX_ENTS || (flags & ~CARRY_F_IMM))
        return -AIOTE_E_INVAL;
    if ((len - CARRY_HDR) / CARRY_ENT < count)
        return -AIOTE_E_INVAL;
    uint64_t data = 0;
    for (uint32_t i = 0; i < count; i++) {
        uint32_t l;
        memcpy(&l, b + CARRY_HDR + (size_t)i * CARRY_ENT + 16, 4);
        data += l;
    }
    if (data != len - CARRY_HDR - (uint64_t)count * CARRY_ENT)
        return -AIOTE_E_INVAL;
    memcpy(&out->seq, b + 8, 8);
    memcpy(&out->imm, b + 16, 4);
    out->count = count;
    out->has_imm = (flags & CARRY_F_IMM) != 0;
    out->ents = b + CARRY_HDR;
    out->data = b + CARRY_HDR + (size_t)count * CARRY_ENT;
    return 0;
}

/* Their acknowledgement: u32 magic, u32 entries applied, u64 seq, i32 status, u32 fi_errno. */
int parse_cack(const uint8_t *b, size_t len, struct cack_view *out)
{
    if (!b || len != CACK_LEN)
        return -AIOTE_E_INVAL;
    uint32_t magic;
    memcpy(&magic, b, 4);
    if (magic != CACK_MAGIC)
        return -AIOTE_E_INVAL;
    memcpy(&out->applied, b + 4, 4);
    memcpy(&out->seq, b + 8, 8);
    memcpy(&out->status, b + 16, 4);
    memcpy(&out->fi_errno, b + 20, 4);
    if (out->status > 0 || (out->status == 0 && out->fi_errno != 0))
        return -AIOTE_E_INVAL;
    return 0;
}

int aiote_check_carry(const uint8_t *b, size_t len, uint32_t *count)
{
    struct carry_view v;
    int rc = parse_carry(b, len, &v);
    if (!rc)
        *count = v.count;
    return rc;
}
