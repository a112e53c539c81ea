#version 450
// chunk_dstate: the chunkwise backward's sequential pass, over the chunks of a sequence
// from the last (ref/kla_ref.c section 6). Workgroup = (V block, value head, sequence)
// with VB columns x R row groups, as chunk_state: invocation (j, r) holds rows
// r K/R .. (r+1) K/R - 1 of column j of the state gradient dS in registers (columns are
// independent). Per chunk, with dS the gradient with respect to the state leaving it:
//   dck[c]   = dS                                            (for chunk_bwd)
//   dvnew_i  = exp(G_L - G_i) dS^T k_i + dvi_i               (dvi = P^T do from chunk_out;
//                                                             in place in ckpt; the R
//                                                             row-group partials meet in
//                                                             shared memory)
//   dS      <- gamma_L dS + scale sum_i gamma_i q_i do_i^T - sum_i w_i dvnew_i^T
// and finally dh0 = dS. k, q and w stream through shared memory TI tokens at a time.
layout(local_size_x_id = 0) in;
layout(constant_id = 0) const uint WG = 128; // VB * R
layout(constant_id = 1) const int K = 128;
layout(constant_id = 2) const int V = 128;
layout(constant_id = 3) const int C = 64;
layout(constant_id = 4) const int R = 8;
#include "common.glsl"

const uint VB = WG / uint(R);
const int KR = K / R;
const int TI = 8; // tokens per tile
shared float ta[TI * K], tw[TI * K]; // k, then q and w, of TI tokens
shared float part[TI * R * VB];
shared float vn[C * VB], dof[C * VB]; // dvnew and scale gamma do of the chunk's tokens
shared float dec[C];

void main()
{
    const uint l = gl_LocalInvocationID.x, jl = l % VB, r = l / VB;
    const uint j = gl_WorkGroupID.x * VB + jl, hv = gl_WorkGroupID.y, n = gl_WorkGroupID.z;
    const uint HV = uint(pc.HV), H = uint(pc.H), h = hv / uint(pc.grp);
    const bool act = j < uint(V);
    const uint KV = uint(K * V), row0 = r * uint(KR);
    const uint sbase = (n * HV + hv) * KV + row0 * uint(V) + j;
    const float scale = pc.scale;
    float dS[KR];
    for (int x = 0; x < KR; x++)
        dS[x] = act && (pc.flags & F_DHT) != 0 ? dht_in[sbase + uint(x * V)] : 0.0;
    const int c0 = offs[pc.N + 1 + int(n)], c1 = offs[pc.N + 2 + int(n)];
    for (int cid = c1 - 1; cid >= c0; cid--) {
        const int t0 = offs[2 * pc.N + 2 + 2 * cid], t1 = offs[2 * pc.N + 3 + 2 * cid], L = t1 - t0;
        const uint db = (uint(cid) * HV + hv) * KV + row0 * uint(V) + j;
        if (act)
            for (int x = 0; x < KR; x++) dck[db + uint(x * V)] = dS[x];
        const float GL = G_buf[uint(t1 - 1) * HV + hv];
        barrier(); // dec, vn, dof of the previous chunk are read no more
        for (int i = int(l); i < L; i += int(WG)) dec[i] = exp(GL - G_buf[uint(t0 + i) * HV + hv]);
        // dvnew_i = exp(G_L - G_i) dS^T k_i + dvi_i
        for (int i0 = 0; i0 < L; i0 += TI) {
            const int nt = min(TI, L - i0);
            barrier();
            for (int x = int(l); x < nt * K; x += int(WG))
                ta[x] = khat[(uint(t0 + i0 + x / K) * H + h) * uint(K) + uint(x % K)];
            barrier();
            for (int i = 0; i < nt; i++) {
                float s = 0.0;
                for (int x = 0; x < KR; x++) s += ta[i * K + int(row0) + x] * dS[x];
                part[(uint(i * R) + r) * VB + jl] = s;
            }
            barrier();
            for (int i = int(r); i < nt; i += R) {
                float s = 0.0;
                for (int rr = 0; rr < R; rr++) s += part[uint(i * R + rr) * VB + jl];
                const uint t = uint(t0 + i0 + i), tvj = (t * HV + hv) * uint(V) + j;
                float x = 0.0, d = 0.0;
                if (act) {
                    x = dec[i0 + i] * s + ckpt[tvj];
                    ckpt[tvj] = x;
                    d = scale * exp(G_buf[t * HV + hv]) * do_in[tvj];
                }
                vn[uint(i0 + i) * VB + jl] = x;
                dof[uint(i0 + i) * VB + jl] = d;
            }
        }
        const float gL = exp(GL);
        for (int x = 0; x < KR; x++) dS[x] *= gL;
        // + scale sum_i gamma_i q_i do_i^T - sum_i w_i dvnew_i^T
        for (int i0 = 0; i0 < L; i0 += TI) {
            const int nt = min(TI, L - i0);
            barrier();
            for (int x = int(l); x < nt * K; x += int(WG)) {
                const uint t = uint(t0 + i0 + x / K), c = uint(x % K);
                ta[x] = qhat[(t * H + h) * uint(K) + c];
                tw[x] = w_buf[(t * HV + hv) * uint(K) + c];
            }
            barrier();
            for (int i = 0; i < nt; i++) {
                const float a = dof[uint(i0 + i) * VB + jl], b = vn[uint(i0 + i) * VB + jl];
                for (int x = 0; x < KR; x++)
                    dS[x] += ta[i * K + int(row0) + x] * a - tw[i * K + int(row0) + x] * b;
            }
        }
    }
    if (act && (pc.flags & F_DH0) != 0)
        for (int x = 0; x < KR; x++) dh0_out[sbase + uint(x * V)] = dS[x];
}
