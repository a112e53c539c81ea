#version 450
// bwd_post: per (token, key head) row, from the core's partial gradients (per value head
// and V block) to the gradients of the raw inputs: sums the partials, applies the KLA
// step-size chain rule (beta = eta / nk: deta = dbeta / nk, dkhat += -2 dbeta eta / nk^2
// khat) and the l2norm backward (dx = (dy - y (y . dy)) / r).
layout(local_size_x_id = 0) in;
layout(constant_id = 0) const uint WG = 64;
layout(constant_id = 1) const int K = 128;
#include "common.glsl"
#include "reduce.glsl"

const uint PER = (uint(K) + WG - 1) / WG;

void main()
{
    const uint row = flat_group();
    if (row >= uint(pc.total * pc.H)) return;
    const uint l = gl_LocalInvocationID.x, TH = uint(pc.total * pc.H);
    const uint t = row / uint(pc.H), h = row % uint(pc.H), HV = uint(pc.HV), nvb = uint(pc.nvb);
    const float rq = nrm[row], rk = nrm[TH + row], nk = nrm[2 * TH + row];
    const uint base = row * uint(K);
    // the KLA chain rule coefficient, summed over the value heads of this key head
    float c = 0.0;
    for (uint gi = 0; gi < uint(pc.grp); gi++) {
        const uint tv = t * HV + h * uint(pc.grp) + gi;
        float dbeta = 0.0, dg = 0.0;
        for (uint b = 0; b < nvb; b++) {
            dbeta += dsc_part[(tv * nvb + b) * 2];
            dg += dsc_part[(tv * nvb + b) * 2 + 1];
        }
        if (pc.mode == 0) c += -2.0 * dbeta * a_in[tv] / (nk * nk);
        if (l == 0) {
            da_out[tv] = pc.mode == 0 ? dbeta / nk : dbeta;
            if ((pc.flags & F_DG) != 0) dg_out[tv] = dg;
        }
    }
    float dqh[PER], dkh[PER];
    float sqd = 0.0, skd = 0.0;
    for (uint x = 0; x < PER; x++) {
        const uint i = l + x * WG;
        dqh[x] = 0.0;
        dkh[x] = 0.0;
        if (i >= uint(K)) continue;
        for (uint gi = 0; gi < uint(pc.grp); gi++) {
            const uint tv = t * HV + h * uint(pc.grp) + gi;
            for (uint b = 0; b < nvb; b++) {
                dqh[x] += dq_part[(tv * nvb + b) * uint(K) + i];
                dkh[x] += dk_part[(tv * nvb + b) * uint(K) + i];
            }
        }
        dkh[x] += c * khat[base + i];
        sqd += qhat[base + i] * dqh[x];
        skd += khat[base + i] * dkh[x];
    }
    const bool l2q = (pc.flags & F_L2Q) != 0, l2k = (pc.flags & F_L2K) != 0;
    sqd = wg_sum(sqd);
    skd = wg_sum(skd);
    for (uint x = 0; x < PER; x++) {
        const uint i = l + x * WG;
        if (i >= uint(K)) continue;
        dq_out[base + i] = l2q ? (dqh[x] - qhat[base + i] * sqd) / rq : dqh[x];
        dk_out[base + i] = l2k ? (dkh[x] - khat[base + i] * skd) / rk : dkh[x];
    }
}
