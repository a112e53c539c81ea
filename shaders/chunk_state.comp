#version 450
// chunk_state: the sequential pass over the chunks of a sequence. Workgroup = (V block,
// value head, sequence) with VB columns x R row groups; invocation (j, r) holds rows
// r K/R .. (r+1) K/R - 1 of column j of S in registers. Per chunk:
//   hs[c] = S0 (for chunk_out and a backward pass)
//   vnew  = u - w S0                    (the R row-group partials meet in shared memory)
//   S     = gamma_L S0 + sum_j exp(G_L - G_j) k_j vnew_j^T
// w and k stream through shared memory TI tokens at a time, loaded by the whole
// workgroup at once: with few workgroups per SM this pass is bound by load latency.
layout(local_size_x_id = 0) in;
layout(constant_id = 0) const uint WG = 128; // VB * R
layout(constant_id = 1) const int K = 128;
layout(constant_id = 2) const int V = 128;
layout(constant_id = 3) const int C = 64;
layout(constant_id = 4) const int R = 8;
#include "common.glsl"

const uint VB = WG / uint(R);
const int KR = K / R;
const int TI = 16; // tokens per tile
shared float tile[TI * K]; // w, then exp(G_L - G_i) k_i, of TI tokens
shared float part[TI * R * VB];
shared float vn[C * VB];
shared float dec[C];

void main()
{
    const uint l = gl_LocalInvocationID.x, jl = l % VB, r = l / VB;
    const uint j = gl_WorkGroupID.x * VB + jl, hv = gl_WorkGroupID.y, n = gl_WorkGroupID.z;
    const uint HV = uint(pc.HV), H = uint(pc.H), h = hv / uint(pc.grp);
    const bool act = j < uint(V);
    const uint KV = uint(K * V), row0 = r * uint(KR);
    const uint sbase = (n * HV + hv) * KV + row0 * uint(V) + j;
    float S[KR];
    for (int x = 0; x < KR; x++)
        S[x] = act && (pc.flags & F_H0) != 0 ? h0_in[sbase + uint(x * V)] : 0.0;
    const int c0 = offs[pc.N + 1 + int(n)], c1 = offs[pc.N + 2 + int(n)];
    for (int cid = c0; cid < c1; cid++) {
        const int t0 = offs[2 * pc.N + 2 + 2 * cid], t1 = offs[2 * pc.N + 3 + 2 * cid], L = t1 - t0;
        const uint hb = (uint(cid) * HV + hv) * KV + row0 * uint(V) + j;
        if (act)
            for (int x = 0; x < KR; x++) hs_buf[hb + uint(x * V)] = S[x];
        const float GL = G_buf[uint(t1 - 1) * HV + hv];
        for (int i = int(l); i < L; i += int(WG)) dec[i] = exp(GL - G_buf[uint(t0 + i) * HV + hv]);
        // vnew = u - w S0
        for (int i0 = 0; i0 < L; i0 += TI) {
            const int nt = min(TI, L - i0);
            barrier();
            for (int x = int(l); x < nt * K; x += int(WG))
                tile[x] = w_buf[(uint(t0 + i0 + x / K) * HV + hv) * uint(K) + uint(x % K)];
            barrier();
            for (int i = 0; i < nt; i++) {
                float s = 0.0;
                for (int x = 0; x < KR; x++) s += tile[i * K + int(row0) + x] * S[x];
                part[(uint(i * R) + r) * VB + jl] = s;
            }
            barrier();
            for (int i = int(r); i < nt; i += R) {
                float s = 0.0;
                for (int rr = 0; rr < R; rr++) s += part[uint(i * R + rr) * VB + jl];
                const uint ui = (uint(t0 + i0 + i) * HV + hv) * uint(V) + j;
                const float x = act ? u_buf[ui] - s : 0.0;
                vn[uint(i0 + i) * VB + jl] = x;
                if (act) vnew_buf[ui] = x;
            }
        }
        // S = gamma_L S0 + sum_i exp(G_L - G_i) k_i vnew_i^T
        const float gL = exp(GL);
        for (int x = 0; x < KR; x++) S[x] *= gL;
        for (int i0 = 0; i0 < L; i0 += TI) {
            const int nt = min(TI, L - i0);
            barrier();
            for (int x = int(l); x < nt * K; x += int(WG))
                tile[x] = dec[i0 + x / K] * khat[(uint(t0 + i0 + x / K) * H + h) * uint(K) + uint(x % K)];
            barrier();
            for (int i = 0; i < nt; i++) {
                const float d = vn[uint(i0 + i) * VB + jl];
                for (int x = 0; x < KR; x++) S[x] += tile[i * K + int(row0) + x] * d;
            }
        }
        barrier(); // tile, vn and dec are reused by the next chunk
    }
    if (act && (pc.flags & F_HT) != 0)
        for (int x = 0; x < KR; x++) ht_out[sbase + uint(x * V)] = S[x];
}
