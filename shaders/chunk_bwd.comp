#version 450
// chunk_bwd: the chunkwise backward of one chunk, chunk_backward_one of ref/kla_ref.c,
// once chunk_dstate (dS leaving each chunk in dck, dvnew in ckpt) and chunk_bwdv (du2 in
// u_buf, vt = v - gamma S0^T k in ckpt, the dbeta and dG terms of u and w in dsc_part)
// have run. Workgroup = (chunk, value head), 256 invocations. Two C x C matrices live in
// shared memory; K- and V-sized rows are read from global memory.
//   dTm[i,j] = beta_j dvnew_i . vt_j (j <= i);  X = dTm Tm^T;  dA = -Tm^T X (j < i)
//   dP[i,j]  = do_i . vnew_j (j <= i);  E[i,j] = exp(G_i - G_j)
//   dq_i = scale gamma_i S0 do_i + sum_{j<=i} scale E[i,j] dP[i,j] k_j
//   dk_j = exp(G_L - G_j) dS vnew_j - beta_j gamma_j S0 du2_j + sum_{i>=j} scale E dP[i,j] q_i
//          + sum_{m<j} dA[j,m] beta_j E[j,m] k_m + sum_{i>j} dA[i,j] beta_i E[i,j] k_i
//   dbeta, dG as in the reference; dg = the reverse cumulative sum of dG in the chunk.
// dq, dk go to dq_part, dk_part and dbeta, dg to dsc_part (bwd_post sums the value heads
// of a key head and applies the chain rules of beta and l2norm).
// Shared layout after the dTm/X/dA phase: Bs holds dP on and below the diagonal and dA
// transposed above it; Ts holds Q K^T on and below the diagonal and K K^T transposed
// above it.
layout(local_size_x = 256) in;
layout(constant_id = 1) const int K = 128;
layout(constant_id = 2) const int V = 128;
layout(constant_id = 3) const int C = 64;
#include "common.glsl"

const int NL = 256 / C;               // lanes per row (C is a power of two <= 64)
const int RE = (C * C + 255) / 256;   // C x C elements per invocation
const int KPL = (K + NL - 1) / NL;    // K elements per lane
shared float Ts[C * C], Bs[C * C];
shared float Gs[C], bs[C], gs[C], ds[C], dGs[C], dbs[C], qsd[C], bjs[C];
shared float red[256], red2[256];

void main()
{
    const uint cid = gl_WorkGroupID.x, hv = gl_WorkGroupID.y, l = gl_LocalInvocationID.x;
    const int r = int(l) / NL, lane = int(l) % NL;
    const uint HV = uint(pc.HV), H = uint(pc.H), h = hv / uint(pc.grp), uV = uint(V), uK = uint(K);
    const int t0 = offs[2 * pc.N + 2 + 2 * int(cid)], t1 = offs[2 * pc.N + 3 + 2 * int(cid)];
    const int L = t1 - t0;
    const uint KV = uint(K * V), hb = (uint(cid) * HV + hv) * KV, NV = uint(pc.total) * HV * uV;
    const uint tb = (cid * HV + hv) * uint(C * C);
    const float scale = pc.scale;
    const float GL = G_buf[uint(t1 - 1) * HV + hv];
    if (int(l) < L) {
        const uint tv = uint(t0 + int(l)) * HV + hv;
        Gs[l] = G_buf[tv];
        bs[l] = beta_buf[tv];
        gs[l] = exp(Gs[l]);
        ds[l] = exp(GL - Gs[l]);
    }
    for (int x = int(l); x < C * C; x += 256) Ts[x] = scr[tb + uint(x)];
    barrier();
    // dTm
    for (int x = int(l); x < C * C; x += 256) {
        const int i = x / C, j = x % C;
        float s = 0.0;
        if (i < L && j <= i) {
            const uint ai = (uint(t0 + i) * HV + hv) * uV, aj = NV + (uint(t0 + j) * HV + hv) * uV;
            for (int c = 0; c < V; c++) s += ckpt[ai + uint(c)] * ckpt[aj + uint(c)];
            s *= bs[j];
        }
        Bs[x] = s;
    }
    barrier();
    // X = dTm Tm^T, in place through registers
    float xr[RE];
    for (int e = 0; e < RE; e++) {
        const int x = int(l) + 256 * e, i = x / C, j = x % C;
        float s = 0.0;
        if (x < C * C)
            for (int m = 0; m < C; m++) s += Bs[i * C + m] * Ts[j * C + m];
        xr[e] = s;
    }
    barrier();
    for (int e = 0; e < RE; e++) {
        const int x = int(l) + 256 * e;
        if (x < C * C) Bs[x] = xr[e];
    }
    barrier();
    // dA = -Tm^T X below the diagonal
    for (int e = 0; e < RE; e++) {
        const int x = int(l) + 256 * e, i = x / C, j = x % C;
        float s = 0.0;
        if (x < C * C && j < i)
            for (int m = 0; m < C; m++) s -= Ts[m * C + i] * Bs[m * C + j];
        xr[e] = s;
    }
    barrier();
    // Bs: dP (i >= j), dA transposed (i < j);  Ts: Q K^T (i >= j), K K^T transposed (i < j)
    for (int e = 0; e < RE; e++) {
        const int x = int(l) + 256 * e, i = x / C, j = x % C;
        if (x >= C * C || j > i) continue;
        float dp = 0.0, qk = 0.0, kk = 0.0;
        if (i < L) {
            const uint ai = (uint(t0 + i) * HV + hv) * uV, aj = (uint(t0 + j) * HV + hv) * uV;
            for (int c = 0; c < V; c++) dp += do_in[ai + uint(c)] * vnew_buf[aj + uint(c)];
            const uint qi = (uint(t0 + i) * H + h) * uK, kj = (uint(t0 + j) * H + h) * uK;
            for (int m = 0; m < K; m++) {
                const float kv = khat[kj + uint(m)];
                qk += qhat[qi + uint(m)] * kv;
                kk += khat[qi + uint(m)] * kv;
            }
        }
        Bs[x] = dp;
        Ts[x] = qk;
        if (j < i) {
            Bs[j * C + i] = xr[e];
            Ts[j * C + i] = kk;
        }
    }
    barrier();
    // per row: the dG terms of P and A (row sum minus column sum), the dbeta term of A
    if (int(l) < L) {
        const int a = int(l);
        float dg = 0.0, db = 0.0;
        for (int j = 0; j <= a; j++) {
            const float E = exp(Gs[a] - Gs[j]);
            dg += Bs[a * C + j] * scale * E * Ts[a * C + j];
            if (j < a) {
                const float dA = Bs[j * C + a], kk = Ts[j * C + a];
                dg += dA * bs[a] * E * kk;
                db += dA * E * kk;
            }
        }
        for (int i = a; i < L; i++) {
            const float E = exp(Gs[i] - Gs[a]);
            dg -= Bs[i * C + a] * scale * E * Ts[i * C + a];
            if (i > a) dg -= Bs[a * C + i] * bs[i] * E * Ts[a * C + i];
        }
        dGs[a] = dg;
        dbs[a] = db;
    }
    // dq and dk: row r, elements m = lane + NL x
    float pq = 0.0, pb = 0.0;
    if (r < L) {
        const uint tv = uint(t0 + r) * HV + hv, qr = (uint(t0 + r) * H + h) * uK;
        float dqa[KPL], dka[KPL];
        for (int x = 0; x < KPL; x++) {
            const int m = lane + NL * x;
            dqa[x] = 0.0;
            dka[x] = 0.0;
            if (m >= K) continue;
            float a1 = 0.0, a2 = 0.0, a3 = 0.0;
            for (int c = 0; c < V; c++) {
                const float s0 = hs_buf[hb + uint(m * V + c)];
                a1 += s0 * do_in[tv * uV + uint(c)];
                a2 += dck[hb + uint(m * V + c)] * vnew_buf[tv * uV + uint(c)];
                a3 += s0 * u_buf[tv * uV + uint(c)];
            }
            a1 *= scale * gs[r];
            a2 *= ds[r];
            pq += qhat[qr + uint(m)] * a1;
            pb += khat[qr + uint(m)] * a2;
            dqa[x] = a1;
            dka[x] = a2 - bs[r] * gs[r] * a3;
        }
        for (int j = 0; j < L; j++) {
            const uint rj = (uint(t0 + j) * H + h) * uK;
            float cq = 0.0, ck = 0.0, cqk = 0.0; // dq += cq k_j;  dk += ck k_j + cqk q_j
            if (j <= r) {
                const float E = exp(Gs[r] - Gs[j]);
                cq = Bs[r * C + j] * scale * E;
                if (j < r) ck = Bs[j * C + r] * bs[r] * E;
            }
            if (j >= r) {
                const float E = exp(Gs[j] - Gs[r]);
                cqk = Bs[j * C + r] * scale * E;
                if (j > r) ck = Bs[r * C + j] * bs[j] * E;
            }
            for (int x = 0; x < KPL; x++) {
                const int m = lane + NL * x;
                if (m >= K) continue;
                const float kv = khat[rj + uint(m)];
                dqa[x] += cq * kv;
                dka[x] += ck * kv + cqk * qhat[rj + uint(m)];
            }
        }
        for (int x = 0; x < KPL; x++) {
            const int m = lane + NL * x;
            if (m >= K) continue;
            dq_part[tv * uK + uint(m)] = dqa[x];
            dk_part[tv * uK + uint(m)] = dka[x];
        }
    }
    red[l] = pq;
    red2[l] = pb;
    barrier();
    if (lane == 0 && r < L) {
        float a = 0.0, b = 0.0;
        for (int x = 0; x < NL; x++) a += red[l + uint(x)], b += red2[l + uint(x)];
        qsd[r] = a;
        bjs[r] = b;
    }
    // <S0, dS>
    float s = 0.0;
    for (uint x = l; x < KV; x += 256) s += hs_buf[hb + x] * dck[hb + x];
    barrier();
    red[l] = s;
    barrier();
    if (l == 0) {
        float s0ds = 0.0, bsum = 0.0;
        for (int x = 0; x < 256; x++) s0ds += red[x];
        for (int i = 0; i < L; i++) bsum += bjs[i];
        float acc = 0.0;
        for (int i = L - 1; i >= 0; i--) {
            const uint tv = uint(t0 + i) * HV + hv;
            float dG = dsc_part[tv * 2 + 1] + dGs[i] + qsd[i] - bjs[i];
            if (i == L - 1) dG += gs[i] * s0ds + bsum;
            acc += dG;
            dsc_part[tv * 2] += dbs[i];
            dsc_part[tv * 2 + 1] = acc;
        }
    }
}
