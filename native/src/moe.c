/* MoE routing on the host (aiote.moe): one pass instead of a dozen numpy calls,
 * each of which costs microseconds of interpreter and dispatch overhead on a
 * busy host, on the path of every dispatch. */
#include <stdlib.h>

#include "internal.h"

int aiote_moe_route(const int64_t *ids, size_t n, uint32_t top_k, const int16_t *dest, const int32_t *lid,
                    uint64_t num_experts, uint32_t world, uint32_t first_group, int64_t *counts, int64_t *order,
                    int32_t *lid_out, int64_t *tok, uint64_t *bad)
{
    *bad = 0;
    if ((n && (!ids || !order || !lid_out || !tok)) || !dest || !lid || !counts || !top_k || !world ||
        first_group >= world) {
        aiote_set_error("MoE routing: null array, zero top_k or world, or first_group %u of %u", first_group,
                        world);
        return -AIOTE_E_INVAL;
    }
    for (uint32_t g = 0; g < world; g++)
        counts[g] = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t e = (uint64_t)ids[i]; /* a negative id wraps: out of range too */
        if (e >= num_experts || dest[e] < 0 || (uint32_t)dest[e] >= world) {
            *bad = i;
            aiote_set_error("MoE routing: pair %zu has expert id %lld (%llu experts)", i, (long long)ids[i],
                            (unsigned long long)num_experts);
            return -AIOTE_E_INVAL;
        }
        counts[dest[e]]++;
    }
    int64_t small[2 * 64];
    int64_t *at = world <= 64 ? small : malloc(2 * world * sizeof *at);
    if (!at)
        return -AIOTE_E_NOMEM;
    int64_t *tat = at + world, pos = 0, tpos = 0;
    for (uint32_t g = 0; g < world; g++) {
        at[g] = pos;
        pos += counts[g];
    }
    for (uint32_t k = 0; k < world; k++) {
        uint32_t g = (first_group + k) % world;
        tat[g] = tpos;
        tpos += counts[g];
    }
    for (size_t i = 0; i < n; i++) {
        uint64_t e = (uint64_t)ids[i];
        int16_t g = dest[e];
        int64_t p = at[g]++;
        order[p] = (int64_t)i;
        lid_out[p] = lid[e];
        tok[tat[g]++] = (int64_t)(i / top_k);
    }
    if (at != small)
        free(at);
    return 0;
}
