#version 450
// chunk_out: outputs of one chunk from the state entering it. Workgroup = (chunk, value
// head), 256 invocations as 8 x 32: invocation (ty, tx) owns rows i = ty + 8a and
// columns tx + 32b of each result and keeps them in registers (register tiling; the
// operands stream through shared memory in tiles of 8).
//   P[i,j] = exp(G_i - G_j) q_i . k_j   (j <= i)
//   o_i    = scale (gamma_i S0^T q_i + sum_{j<=i} P[i,j] vnew_j)
layout(local_size_x = 256) in;
layout(constant_id = 1) const int K = 128;
layout(constant_id = 2) const int V = 128;
layout(constant_id = 3) const int C = 64;
#include "common.glsl"

const int RA = (C + 7) / 8;   // rows per invocation
const int CB = (C + 31) / 32; // P columns per invocation / 32
const int NB = (V + 31) / 32; // output columns per invocation / 32
const int T8 = 8;             // tile depth
shared float P[C * C];
shared float qt[C * (T8 + 1)], kt[C * (T8 + 1)];
shared float st[T8 * V];
shared float Gs[C];

void main()
{
    const uint cid = gl_WorkGroupID.x, hv = gl_WorkGroupID.y, l = gl_LocalInvocationID.x;
    const int tx = int(l % 32u), ty = int(l / 32u);
    const uint HV = uint(pc.HV), H = uint(pc.H), h = hv / uint(pc.grp);
    const int t0 = offs[2 * pc.N + 2 + 2 * int(cid)], t1 = offs[2 * pc.N + 3 + 2 * int(cid)];
    const int L = t1 - t0;
    const uint KV = uint(K * V), hb = (uint(cid) * HV + hv) * KV;
    for (int i = int(l); i < L; i += 256) Gs[i] = G_buf[uint(t0 + i) * HV + hv];

    float pa[RA][CB], oa[RA][NB];
    for (int a = 0; a < RA; a++) {
        for (int b = 0; b < CB; b++) pa[a][b] = 0.0;
        for (int b = 0; b < NB; b++) oa[a][b] = 0.0;
    }
    // Q K^T and Q S0 over K, 8 at a time
    for (int k0 = 0; k0 < K; k0 += T8) {
        barrier();
        for (int x = int(l); x < C * T8; x += 256) {
            const int i = x / T8, kk = x % T8;
            const bool ok = i < L && k0 + kk < K;
            const uint src = (uint(t0 + i) * H + h) * uint(K) + uint(k0 + kk);
            qt[i * (T8 + 1) + kk] = ok ? qhat[src] : 0.0;
            kt[i * (T8 + 1) + kk] = ok ? khat[src] : 0.0;
        }
        for (int x = int(l); x < T8 * V; x += 256) {
            const int kk = x / V, c = x % V;
            st[x] = k0 + kk < K ? hs_buf[hb + uint((k0 + kk) * V + c)] : 0.0;
        }
        barrier();
        for (int kk = 0; kk < T8; kk++) {
            float qv[RA];
            for (int a = 0; a < RA; a++) qv[a] = qt[(ty + 8 * a) * (T8 + 1) + kk];
            for (int b = 0; b < CB; b++) {
                const int j = tx + 32 * b;
                const float kv = j < C ? kt[j * (T8 + 1) + kk] : 0.0;
                for (int a = 0; a < RA; a++) pa[a][b] += qv[a] * kv;
            }
            for (int b = 0; b < NB; b++) {
                const int c = tx + 32 * b;
                const float sv = c < V ? st[kk * V + c] : 0.0;
                for (int a = 0; a < RA; a++) oa[a][b] += qv[a] * sv;
            }
        }
    }
    // P with the decay and the causal mask; the S0 term scaled by gamma_i
    for (int a = 0; a < RA; a++) {
        const int i = ty + 8 * a;
        if (i >= C) continue;
        const float Gi = i < L ? Gs[i] : 0.0;
        for (int b = 0; b < CB; b++) {
            const int j = tx + 32 * b;
            if (j < C) P[i * C + j] = i < L && j <= i ? exp(Gi - Gs[j]) * pa[a][b] : 0.0;
        }
        for (int b = 0; b < NB; b++) oa[a][b] *= exp(Gi);
    }
    // + P vnew, 8 rows of vnew at a time
    for (int j0 = 0; j0 < L; j0 += T8) {
        barrier();
        for (int x = int(l); x < T8 * V; x += 256) {
            const int jj = x / V, c = x % V;
            st[x] = j0 + jj < L ? vnew_buf[(uint(t0 + j0 + jj) * HV + hv) * uint(V) + uint(c)] : 0.0;
        }
        barrier();
        for (int jj = 0; jj < T8; jj++) {
            float pv[RA];
            for (int a = 0; a < RA; a++) pv[a] = j0 + jj < C && ty + 8 * a < C ? P[(ty + 8 * a) * C + j0 + jj] : 0.0;
            for (int b = 0; b < NB; b++) {
                const int c = tx + 32 * b;
                const float vv = c < V ? st[jj * V + c] : 0.0;
                for (int a = 0; a < RA; a++) oa[a][b] += pv[a] * vv;
            }
        }
    }
    for (int a = 0; a < RA; a++) {
        const int i = ty + 8 * a;
        if (i >= L) continue;
        for (int b = 0; b < NB; b++) {
            const int c = tx + 32 * b;
            if (c < V) o_out[(uint(t0 + i) * HV + hv) * uint(V) + uint(c)] = pc.scale * oa[a][b];
        }
    }
    // chunkwise backward: dvi_j = sum_{i>=j} scale P[i,j] do_i (the part of dvnew that
    // does not need the state gradient) into ckpt, 8 rows of do at a time
    if ((pc.flags & F_DVI) != 0) {
        for (int a = 0; a < RA; a++)
            for (int b = 0; b < NB; b++) oa[a][b] = 0.0;
        for (int i0 = 0; i0 < L; i0 += T8) {
            barrier();
            for (int x = int(l); x < T8 * V; x += 256) {
                const int ii = x / V, c = x % V;
                st[x] = i0 + ii < L ? do_in[(uint(t0 + i0 + ii) * HV + hv) * uint(V) + uint(c)] : 0.0;
            }
            barrier();
            for (int ii = 0; ii < T8; ii++) {
                float pv[RA];
                for (int a = 0; a < RA; a++) pv[a] = i0 + ii < C && ty + 8 * a < C ? P[(i0 + ii) * C + ty + 8 * a] : 0.0;
                for (int b = 0; b < NB; b++) {
                    const int c = tx + 32 * b;
                    const float dv = c < V ? st[ii * V + c] : 0.0;
                    for (int a = 0; a < RA; a++) oa[a][b] += pv[a] * dv;
                }
            }
        }
        for (int a = 0; a < RA; a++) {
            const int j = ty + 8 * a;
            if (j >= L) continue;
            for (int b = 0; b < NB; b++) {
                const int c = tx + 32 * b;
                if (c < V) ckpt[(uint(t0 + j) * HV + hv) * uint(V) + uint(c)] = pc.scale * oa[a][b];
            }
        }
    }
}
