#version 450
// rec_fwd: the recurrence token by token (also decode: one token per sequence, with the
// state buffer bound as h0 and ht). Workgroup = (V block, value head, sequence); each
// invocation owns one column j of S (K floats in registers), so a step needs no
// cross-invocation reduction: e_j = v_j - S[:,j].k and o_j = S[:,j].q are private dots.
// q and k of TB tokens at a time are staged in shared memory.
layout(local_size_x_id = 0) in;
layout(constant_id = 0) const uint WG = 32;
layout(constant_id = 1) const int K = 128;
layout(constant_id = 2) const int V = 128;
layout(constant_id = 3) const int CK = 16; // checkpoint interval (with F_CKPT)
layout(constant_id = 4) const int TB = 8;  // tokens staged at once
#include "common.glsl"

shared float sq[TB * K], sk[TB * K], sa[TB], sb[TB];

void main()
{
    const uint jl = gl_LocalInvocationID.x, j = gl_WorkGroupID.x * WG + jl;
    const uint hv = gl_WorkGroupID.y, n = gl_WorkGroupID.z;
    const uint HV = uint(pc.HV), h = hv / uint(pc.grp);
    const bool act = j < uint(V);
    const uint sbase = (n * HV + hv) * uint(K * V) + j; // S[i, j] at sbase + i V
    const int t0 = offs[n], t1 = offs[n + 1];
    // this dispatch's window of the sequence; past the first, the state comes from ht
    const int lo = t0 + pc.w0, hi = t0 + min(t1 - t0, pc.w1);
    if (pc.w0 > 0 && lo >= t1) return; // the sequence ended in an earlier window
    float S[K];
    for (int i = 0; i < K; i++) S[i] = 0.0;
    if (act && pc.w0 > 0)
        for (int i = 0; i < K; i++) S[i] = ht_out[sbase + uint(i * V)];
    else if (act && (pc.flags & F_H0) != 0)
        for (int i = 0; i < K; i++) S[i] = h0_in[sbase + uint(i * V)];
    const int seg0 = offs[pc.N + 1 + n];
    const float scale = pc.scale;
    for (int tb = lo; tb < hi; tb += TB) {
        const int nt = min(TB, hi - tb);
        barrier(); // the previous block is consumed
        for (uint x = jl; x < uint(nt * K); x += WG) {
            uint m = x / uint(K), i = x % uint(K);
            uint src = ((uint(tb) + m) * uint(pc.H) + h) * uint(K) + i;
            sq[x] = qhat[src];
            sk[x] = khat[src];
        }
        for (uint m = jl; m < uint(nt); m += WG) {
            uint tv = (uint(tb) + m) * HV + hv;
            sa[m] = (pc.flags & F_G) != 0 ? exp(g_in[tv]) : 1.0;
            sb[m] = beta_buf[tv];
        }
        barrier();
        for (int m = 0; m < nt; m++) {
            const int t = tb + m;
            if ((pc.flags & F_CKPT) != 0 && (t - t0) % CK == 0 && act) {
                uint slot = uint(seg0 + (t - t0) / CK);
                for (int i = 0; i < K; i++) ckpt[(slot * HV + hv) * uint(K * V) + uint(i * V) + j] = S[i];
            }
            const float alpha = sa[m], beta = sb[m];
            const uint kb = uint(m * K);
            // S <- alpha S;  e = v - S^T k
            float kS = 0.0;
            for (int i = 0; i < K; i++) {
                S[i] *= alpha;
                kS += S[i] * sk[kb + i];
            }
            const uint tvj = (uint(t) * HV + hv) * uint(V) + j;
            const float e = (act ? v_in[tvj] : 0.0) - kS;
            // S <- S + beta k e^T;  o = S^T (scale q)
            const float be = beta * e;
            float oq = 0.0;
            for (int i = 0; i < K; i++) {
                S[i] += sk[kb + i] * be;
                oq += S[i] * sq[kb + i];
            }
            if (act) o_out[tvj] = scale * oq;
        }
    }
    if (act && (pc.flags & F_HT) != 0)
        for (int i = 0; i < K; i++) ht_out[sbase + uint(i * V)] = S[i];
}
