#version 450
// chunk_prep: everything of one chunk that does not need the state entering it
// (ref/kla_ref.c section 4). Workgroup = (chunk, value head). With L <= C tokens:
//   G_i = g_0 + .. + g_i (chunk-local), gamma_i = exp(G_i)
//   A[i,j] = beta_i exp(G_i - G_j) k_i . k_j  (j < i),  Tm = (I + A)^-1 (unit lower)
//   w = Tm diag(beta gamma) K,  u = Tm diag(beta) V
// 256 invocations as 8 x 32 with register tiles as in chunk_out; Tm by forward
// substitution in place, one row per step (C <= 64).
layout(local_size_x = 256) in;
layout(constant_id = 1) const int K = 128;
layout(constant_id = 2) const int V = 128;
layout(constant_id = 3) const int C = 64;
#include "common.glsl"

const int RA = (C + 7) / 8;
const int CB = (C + 31) / 32;
const int KB = (K + 31) / 32;
const int NB = (V + 31) / 32;
const int T8 = 8;
shared float At[C * C];
shared float kt[C * (T8 + 1)];
shared float kr[T8 * K], vr[T8 * V];
shared float Gs[C], bs[C], bgs[C], arow[C]; // G, beta, beta gamma, a row of A
shared float red4[256];

void main()
{
    const uint cid = gl_WorkGroupID.x, hv = gl_WorkGroupID.y, l = gl_LocalInvocationID.x;
    const int tx = int(l % 32u), ty = int(l / 32u);
    const uint HV = uint(pc.HV), H = uint(pc.H), h = hv / uint(pc.grp);
    const int t0 = offs[2 * pc.N + 2 + 2 * int(cid)], t1 = offs[2 * pc.N + 3 + 2 * int(cid)];
    const int L = t1 - t0;
    if (l == 0) {
        float G = 0.0;
        for (int i = 0; i < L; i++) {
            const uint tv = uint(t0 + i) * HV + hv;
            G += (pc.flags & F_G) != 0 ? g_in[tv] : 0.0;
            Gs[i] = G;
            bs[i] = beta_buf[tv];
            bgs[i] = bs[i] * exp(G);
            G_buf[tv] = G;
        }
    }
    // K K^T, 8 columns of k at a time
    float pa[RA][CB];
    for (int a = 0; a < RA; a++)
        for (int b = 0; b < CB; b++) pa[a][b] = 0.0;
    for (int k0 = 0; k0 < K; k0 += T8) {
        barrier();
        for (int x = int(l); x < C * T8; x += 256) {
            const int i = x / T8, kk = x % T8;
            kt[i * (T8 + 1) + kk] = i < L && k0 + kk < K ? khat[(uint(t0 + i) * H + h) * uint(K) + uint(k0 + kk)] : 0.0;
        }
        barrier();
        for (int kk = 0; kk < T8; kk++) {
            float qv[RA];
            for (int a = 0; a < RA; a++) qv[a] = kt[(ty + 8 * a) * (T8 + 1) + kk];
            for (int b = 0; b < CB; b++) {
                const int j = tx + 32 * b;
                const float kv = j < C ? kt[j * (T8 + 1) + kk] : 0.0;
                for (int a = 0; a < RA; a++) pa[a][b] += qv[a] * kv;
            }
        }
    }
    barrier(); // Gs, bs of invocation 0
    for (int a = 0; a < RA; a++) {
        const int i = ty + 8 * a;
        for (int b = 0; b < CB; b++) {
            const int j = tx + 32 * b;
            if (i < C && j < C) At[i * C + j] = i < L && j < i ? bs[i] * exp(Gs[i] - Gs[j]) * pa[a][b] : 0.0;
        }
    }
    barrier();
    // Tm[i,j] = -(A[i,j] + sum_{j<m<i} A[i,m] Tm[m,j]), rows in order (row i needs rows
    // < i). Invocation (j, q) = (l % 64, l / 64) sums every fourth m: chains 4x shorter.
    const int jq = int(l % 64u), q4 = int(l / 64u);
    for (int i = 1; i < L; i++) {
        if (int(l) < i) arow[l] = At[i * C + int(l)];
        barrier();
        if (jq < i) {
            float s = 0.0;
            for (int m = jq + 1 + q4; m < i; m += 4) s += arow[m] * At[m * C + jq];
            red4[q4 * 64 + jq] = s;
        }
        barrier();
        if (q4 == 0 && jq < i)
            At[i * C + jq] = -(arow[jq] + red4[jq] + red4[64 + jq] + red4[128 + jq] + red4[192 + jq]);
        barrier();
    }
    // unit diagonal, for the products below
    for (int i = int(l); i < L; i += 256) At[i * C + i] = 1.0;
    // w = Tm diag(beta gamma) K and u = Tm diag(beta) V, 8 rows of k and v at a time
    float wa[RA][KB], ua[RA][NB];
    for (int a = 0; a < RA; a++) {
        for (int b = 0; b < KB; b++) wa[a][b] = 0.0;
        for (int b = 0; b < NB; b++) ua[a][b] = 0.0;
    }
    for (int j0 = 0; j0 < L; j0 += T8) {
        barrier();
        for (int x = int(l); x < T8 * K; x += 256) {
            const int jj = x / K, kk = x % K;
            kr[x] = j0 + jj < L ? bgs[j0 + jj] * khat[(uint(t0 + j0 + jj) * H + h) * uint(K) + uint(kk)] : 0.0;
        }
        for (int x = int(l); x < T8 * V; x += 256) {
            const int jj = x / V, c = x % V;
            vr[x] = j0 + jj < L ? bs[j0 + jj] * v_in[(uint(t0 + j0 + jj) * HV + hv) * uint(V) + uint(c)] : 0.0;
        }
        barrier();
        for (int jj = 0; jj < T8 && j0 + jj < C; jj++) {
            float tv[RA];
            for (int a = 0; a < RA; a++) tv[a] = ty + 8 * a < C ? At[(ty + 8 * a) * C + j0 + jj] : 0.0;
            for (int b = 0; b < KB; b++) {
                const int kk = tx + 32 * b;
                const float x = kk < K ? kr[jj * K + kk] : 0.0;
                for (int a = 0; a < RA; a++) wa[a][b] += tv[a] * x;
            }
            for (int b = 0; b < NB; b++) {
                const int c = tx + 32 * b;
                const float x = c < V ? vr[jj * V + c] : 0.0;
                for (int a = 0; a < RA; a++) ua[a][b] += tv[a] * x;
            }
        }
    }
    for (int a = 0; a < RA; a++) {
        const int i = ty + 8 * a;
        if (i >= L) continue;
        for (int b = 0; b < KB; b++) {
            const int kk = tx + 32 * b;
            if (kk < K) w_buf[(uint(t0 + i) * HV + hv) * uint(K) + uint(kk)] = wa[a][b];
        }
        for (int b = 0; b < NB; b++) {
            const int c = tx + 32 * b;
            if (c < V) u_buf[(uint(t0 + i) * HV + hv) * uint(V) + uint(c)] = ua[a][b];
        }
    }
    // the chunkwise backward reads Tm (unit lower, zero outside L x L) again
    if ((pc.flags & F_TM) != 0) {
        const uint tb = (cid * HV + hv) * uint(C * C);
        for (int x = int(l); x < C * C; x += 256) scr[tb + uint(x)] = At[x];
    }
}
