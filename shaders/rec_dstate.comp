#version 450
// rec_dstate: the backward recurrence of the state gradient alone, token by token from
// the end, one column j of dS per invocation (columns are independent):
//   dS <- alpha_t (I - beta_t k_t k_t^T) (dS + scale q_t do_t^T)
// It stores dS (the gradient with respect to the state after a segment's last token) at
// every segment end, so that rec_bwd can walk the segments in parallel, and writes dh0.
layout(local_size_x_id = 0) in;
layout(constant_id = 0) const uint WG = 32;
layout(constant_id = 1) const int K = 128;
layout(constant_id = 2) const int V = 128;
layout(constant_id = 3) const int CK = 16;
layout(constant_id = 4) const int TB = 8;
#include "common.glsl"

shared float sq[TB * K], sk[TB * K], sa[TB], sb[TB];

void main()
{
    const uint jl = gl_LocalInvocationID.x, j = gl_WorkGroupID.x * WG + jl;
    const uint hv = gl_WorkGroupID.y, n = gl_WorkGroupID.z;
    const uint HV = uint(pc.HV), h = hv / uint(pc.grp);
    const bool act = j < uint(V);
    const uint KV = uint(K * V), sbase = (n * HV + hv) * KV + j;
    const int t0 = offs[n], t1 = offs[n + 1], seg0 = offs[pc.N + 1 + n];
    // this dispatch's window (windows run last first); unless it holds the sequence's
    // last token, dS comes from dh0, where the window after it left it
    const int lo = t0 + pc.w0, hi = t0 + min(t1 - t0, pc.w1);
    if (lo >= t1 && pc.w0 > 0) return; // the sequence starts in a later-run window
    const bool first = hi == t1;
    float dS[K];
    for (int i = 0; i < K; i++)
        dS[i] = !act ? 0.0
              : !first ? dh0_out[sbase + uint(i * V)]
              : (pc.flags & F_DHT) != 0 ? dht_in[sbase + uint(i * V)] : 0.0;
    const float scale = pc.scale;
    // blocks of TB tokens, last first
    const int nblk = (hi - lo + TB - 1) / TB;
    for (int b = nblk - 1; b >= 0; b--) {
        const int tb = lo + b * TB, nt = min(TB, hi - tb);
        barrier();
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
        for (int m = nt - 1; m >= 0; m--) {
            const int t = tb + m;
            // t is the last token of its segment: save dS for rec_bwd
            if (((t - t0 + 1) % CK == 0 || t == t1 - 1) && act) {
                const uint slot = uint(seg0 + (t - t0) / CK);
                for (int i = 0; i < K; i++) dck[(slot * HV + hv) * KV + uint(i * V) + j] = dS[i];
            }
            const uint kb = uint(m * K);
            const float doj = act ? do_in[(uint(t) * HV + hv) * uint(V) + j] : 0.0;
            float kd = 0.0;
            for (int i = 0; i < K; i++) {
                dS[i] += scale * sq[kb + i] * doj;
                kd += sk[kb + i] * dS[i];
            }
            const float de = sb[m] * kd, alpha = sa[m];
            for (int i = 0; i < K; i++) dS[i] = alpha * (dS[i] - sk[kb + i] * de);
        }
    }
    if (act && (pc.flags & F_DH0) != 0)
        for (int i = 0; i < K; i++) dh0_out[sbase + uint(i * V)] = dS[i];
}
