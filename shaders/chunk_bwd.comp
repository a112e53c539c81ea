#version 450
// chunk_bwd: the chunkwise backward of one chunk, chunk_backward_one of ref/kla_ref.c,
// once chunk_dstate (dS leaving each chunk in dck, dvnew in ckpt) and chunk_bwdv (du2 in
// u_buf, vt = v - gamma S0^T k in ckpt, the dbeta and dG terms of u and w in dsc_part)
// have run. Workgroup = (chunk, value head), 256 invocations.
//   dTm[i,j] = beta_j dvnew_i . vt_j (j <= i);  X = dTm Tm^T;  dA = -Tm^T X (j < i)
//   dP[i,j]  = do_i . vnew_j (j <= i);  E[i,j] = exp(G_i - G_j)
//   Pq[i,j]  = scale E dP (j <= i);  B[i,j] = dA beta_i E (j < i)
//   dq = diag(scale gamma) dO S0^T + Pq K
//   dk = diag(exp(G_L - G)) vnew dS^T - diag(beta gamma) du2 S0^T + Pq^T Q + (B + B^T) K
//   dbeta, dG as in the reference; dg = the reverse cumulative sum of dG in the chunk.
// dq, dk go to dq_part, dk_part and dbeta, dg to dsc_part (bwd_post sums the value heads
// of a key head and applies the chain rules of beta and l2norm).
// Everything is a register-tiled product: invocation (rg, cg) owns rows rg TR .. + TR - 1
// and columns cg + NCG x of a C x C (TR x TCC) or C x K (TR x TCK) result; the operands
// stream through shared memory in slabs loaded one slab ahead into registers, with
// constant trip counts (2 barriers per slab).
//   1. Gram: dvnew vt^T, dO vnew^T (inner V), Q K^T, K K^T (inner K), 4 C x C in registers.
//   2. Tm and dTm to shared; X = dTm Tm^T; dA = -Tm^T X; then the packed matrix M
//      (Pq on and below the diagonal, B transposed above it) and the dG/dbeta row and
//      column sums.
//   3. dq += dO' S0^T, dk += vnew' dS^T (inner V; <S0, dS> on the side), then the row dots
//      q . dq and k . dk; dk += du2' S0^T (inner V); dq += Pq K, dk += Pq^T Q + (B + B^T) K
//      (inner: the chunk's tokens).
#extension GL_EXT_control_flow_attributes : require
layout(local_size_x = 256) in;
layout(constant_id = 1) const int K = 128;
layout(constant_id = 2) const int V = 128;
layout(constant_id = 3) const int C = 64;
#include "common.glsl"

const int TR = C < 4 ? C : 4;            // rows per invocation
const int NRG = C / TR;                  // row groups
const int NCG = 256 / NRG;               // column groups
const int TCC = (C + NCG - 1) / NCG;     // columns per invocation, C x C results
const int TCK = (K + NCG - 1) / NCG;     // columns per invocation, C x K results
const int KW = TCK * NCG;                // columns of a K-wide slab row (zero beyond K)
const int CP = C + 1;                    // padded row of a C x C matrix
const int KG = 16, GP = KG + 1;          // Gram slabs: 4 x (C x KG)
const int KB = C < 8 ? C : 8, AP = KB + 1, KP = KW + 4; // phase 3 slabs: 3 x (C x KB), 2 x (KB x KW)
const int NGV = (V + KG - 1) / KG, NGK = (K + KG - 1) / KG;
const int NS1 = (V + KB - 1) / KB, NS3 = (C + KB - 1) / KB;
const int NGL = (C * KG + 255) / 256;    // Gram loads per slot and invocation
const int NAL = (C * KB + 255) / 256, NBL = (KB * KW + 255) / 256;
// shared layout (floats): the union of
//   phase 1: 4 Gram slots at 0, C x GP each
//   phase 2: Tm at 0 and dTm / X at C CP (C x CP each), then M at 0
//   phase 3: M at 0, A slots at C CP (3 x C x AP), B slots after (2 x KB x KP)
// then the reduction area (RED) and the per-token arrays.
const int SZ_GR = 4 * C * GP, SZ_MM = 2 * C * CP, SZ_SW = C * CP + 3 * C * AP + 2 * KB * KP;
const int SZ_U0 = SZ_GR > SZ_MM ? SZ_GR : SZ_MM;
const int SZ_U = SZ_U0 > SZ_SW ? SZ_U0 : SZ_SW;
const int RED = SZ_U;                    // 2 x C x NCG row partials + C x NRG column partials
const int NRED = 2 * C * NCG + C * NRG;
const int A0 = C * CP, A1 = A0 + C * AP, A2 = A1 + C * AP, B0 = A2 + C * AP, B1 = B0 + KB * KP;
// host (vk_backward_chunk): 4 * (SZ_U + NRED + 8 C + 256) bytes
shared float sm[SZ_U + NRED];
shared float Gs[C], bs[C], gs[C], ds[C], dGs[C], dbs[C], bjs[C], fin[C];
shared float red[256];

void main()
{
    const uint cid = gl_WorkGroupID.x, hv = gl_WorkGroupID.y;
    const int l = int(gl_LocalInvocationID.x), rg = l / NCG, cg = l % NCG;
    const uint HV = uint(pc.HV), H = uint(pc.H), h = hv / uint(pc.grp), uV = uint(V), uK = uint(K);
    const int t0 = offs[2 * pc.N + 2 + 2 * int(cid)], t1 = offs[2 * pc.N + 3 + 2 * int(cid)];
    const int L = t1 - t0;
    const uint KV = uint(K * V), hb = (uint(cid) * HV + hv) * KV, NV = uint(pc.total) * HV * uV;
    const uint tb = (cid * HV + hv) * uint(C * C);
    const float scale = pc.scale;
    const float GL = G_buf[uint(t1 - 1) * HV + hv];
    if (l < C) {
        float G = 0.0, b = 0.0, ga = 0.0, d = 0.0;
        if (l < L) {
            const uint tv = uint(t0 + l) * HV + hv;
            G = G_buf[tv];
            b = beta_buf[tv];
            ga = exp(G);
            d = exp(GL - G);
        }
        Gs[l] = G, bs[l] = b, gs[l] = ga, ds[l] = d;
    }

    // ---- 1. Gram products (slots: dvnew, vt, dO, vnew; then -, -, q, k) ----
    float tm[TR * TCC], dp[TR * TCC], qk[TR * TCC], kk2[TR * TCC];
    [[unroll]] for (int e = 0; e < TR * TCC; e++) tm[e] = 0.0, dp[e] = 0.0, qk[e] = 0.0, kk2[e] = 0.0;
    {
        float pg[4 * NGL];
        for (int s = 0; s <= NGV + NGK; s++) {
            if (s > 0) {
                barrier();
                [[unroll]] for (int q = 0; q < 4; q++)
                    [[unroll]] for (int e = 0; e < NGL; e++) {
                        const int x = l + 256 * e;
                        if (x < C * KG) sm[q * C * GP + (x / KG) * GP + x % KG] = pg[q * NGL + e];
                    }
                barrier();
            }
            if (s < NGV + NGK) {
                const bool vpart = s < NGV;
                const int c0 = vpart ? s * KG : (s - NGV) * KG;
                [[unroll]] for (int e = 0; e < NGL; e++) {
                    const int x = l + 256 * e, r = x / KG, c = c0 + x % KG;
                    float v0 = 0.0, v1 = 0.0, v2 = 0.0, v3 = 0.0;
                    if (x < C * KG && r < L) {
                        if (vpart) {
                            if (c < V) {
                                const uint o = (uint(t0 + r) * HV + hv) * uV + uint(c);
                                v0 = ckpt[o];
                                v1 = ckpt[NV + o];
                                v2 = do_in[o];
                                v3 = vnew_buf[o];
                            }
                        } else if (c < K) {
                            const uint o = (uint(t0 + r) * H + h) * uK + uint(c);
                            v2 = qhat[o];
                            v3 = khat[o];
                        }
                    }
                    pg[e] = v0, pg[NGL + e] = v1, pg[2 * NGL + e] = v2, pg[3 * NGL + e] = v3;
                }
            }
            if (s > 0) {
                if (s - 1 < NGV) {
                    [[unroll]] for (int k = 0; k < KG; k++) {
                        float a0[TR], a2[TR], b1[TCC], b3[TCC];
                        [[unroll]] for (int i = 0; i < TR; i++) {
                            a0[i] = sm[(rg * TR + i) * GP + k];
                            a2[i] = sm[2 * C * GP + (rg * TR + i) * GP + k];
                        }
                        [[unroll]] for (int x = 0; x < TCC; x++) {
                            const int j = min(cg + NCG * x, C - 1);
                            b1[x] = sm[C * GP + j * GP + k];
                            b3[x] = sm[3 * C * GP + j * GP + k];
                        }
                        [[unroll]] for (int i = 0; i < TR; i++)
                            [[unroll]] for (int x = 0; x < TCC; x++) {
                                tm[i * TCC + x] += a0[i] * b1[x];
                                dp[i * TCC + x] += a2[i] * b3[x];
                            }
                    }
                } else {
                    [[unroll]] for (int k = 0; k < KG; k++) {
                        float a2[TR], a3[TR], b3[TCC];
                        [[unroll]] for (int i = 0; i < TR; i++) {
                            a2[i] = sm[2 * C * GP + (rg * TR + i) * GP + k];
                            a3[i] = sm[3 * C * GP + (rg * TR + i) * GP + k];
                        }
                        [[unroll]] for (int x = 0; x < TCC; x++)
                            b3[x] = sm[3 * C * GP + min(cg + NCG * x, C - 1) * GP + k];
                        [[unroll]] for (int i = 0; i < TR; i++)
                            [[unroll]] for (int x = 0; x < TCC; x++) {
                                qk[i * TCC + x] += a2[i] * b3[x];
                                kk2[i * TCC + x] += a3[i] * b3[x];
                            }
                    }
                }
            }
        }
    }

    // ---- 2. Tm (at 0) and dTm (at C CP), X = dTm Tm^T, dA = -Tm^T X ----
    {
        const int NT = (C * C + 255) / 256;
        float pt[NT];
        [[unroll]] for (int e = 0; e < NT; e++) {
            const int x = l + 256 * e, i = x / C, j = x % C;
            pt[e] = 0.0;
            if (x < C * C && i < L && j <= i) pt[e] = scr[tb + uint(x)];
        }
        barrier();
        [[unroll]] for (int e = 0; e < NT; e++) {
            const int x = l + 256 * e;
            if (x < C * C) sm[(x / C) * CP + x % C] = pt[e];
        }
    }
    [[unroll]] for (int i = 0; i < TR; i++)
        [[unroll]] for (int x = 0; x < TCC; x++) {
            const int r = rg * TR + i, j = cg + NCG * x;
            if (j < C) sm[C * CP + r * CP + j] = r < L && j <= r ? bs[j] * tm[i * TCC + x] : 0.0;
        }
    barrier();
    [[unroll]] for (int e = 0; e < TR * TCC; e++) tm[e] = 0.0;
    for (int m = 0; m < rg * TR + TR; m++) { // dTm[i][m] = 0 for m > i
        float a[TR], b[TCC];
        [[unroll]] for (int i = 0; i < TR; i++) a[i] = sm[C * CP + (rg * TR + i) * CP + m];
        [[unroll]] for (int x = 0; x < TCC; x++) b[x] = sm[min(cg + NCG * x, C - 1) * CP + m];
        [[unroll]] for (int i = 0; i < TR; i++)
            [[unroll]] for (int x = 0; x < TCC; x++) tm[i * TCC + x] += a[i] * b[x];
    }
    barrier();
    [[unroll]] for (int i = 0; i < TR; i++)
        [[unroll]] for (int x = 0; x < TCC; x++) {
            const int j = cg + NCG * x;
            if (j < C) sm[C * CP + (rg * TR + i) * CP + j] = tm[i * TCC + x];
        }
    barrier();
    [[unroll]] for (int e = 0; e < TR * TCC; e++) tm[e] = 0.0; // now -dA
    for (int m = rg * TR; m < C; m++) { // Tm[m][i] = 0 for m < i
        float a[TR], b[TCC];
        [[unroll]] for (int i = 0; i < TR; i++) a[i] = sm[m * CP + rg * TR + i];
        [[unroll]] for (int x = 0; x < TCC; x++) b[x] = sm[C * CP + m * CP + min(cg + NCG * x, C - 1)];
        [[unroll]] for (int i = 0; i < TR; i++)
            [[unroll]] for (int x = 0; x < TCC; x++) tm[i * TCC + x] += a[i] * b[x];
    }
    barrier();
    // M at 0: Pq on and below the diagonal, B transposed above it; the dG and dbeta sums
    {
        float cs[TCC];
        [[unroll]] for (int x = 0; x < TCC; x++) cs[x] = 0.0;
        [[unroll]] for (int i = 0; i < TR; i++) {
            const int r = rg * TR + i;
            float rs = 0.0, rb = 0.0;
            [[unroll]] for (int x = 0; x < TCC; x++) {
                const int j = cg + NCG * x;
                if (j < C && j <= r && r < L) {
                    const float E = exp(Gs[r] - Gs[j]);
                    const float pq = scale * E * dp[i * TCC + x];
                    const float dA = -tm[i * TCC + x];
                    const float bm = j < r ? dA * bs[r] * E : 0.0;
                    const float R = pq * qk[i * TCC + x] + bm * kk2[i * TCC + x];
                    rs += R;
                    cs[x] += R;
                    if (j < r) rb += dA * E * kk2[i * TCC + x];
                    sm[r * CP + j] = pq;
                    if (j < r) sm[j * CP + r] = bm;
                } else if (j < C) {
                    // not on or below the diagonal of a valid row: M[r][j] = 0 where it is
                    // not B transposed (owned by (j, r)), M[j][r] = 0 where j > r
                    if (j <= r) sm[r * CP + j] = 0.0;
                    if (j < r) sm[j * CP + r] = 0.0;
                }
            }
            sm[RED + r * NCG + cg] = rs;
            sm[RED + (C + r) * NCG + cg] = rb;
        }
        [[unroll]] for (int x = 0; x < TCC; x++) {
            const int j = cg + NCG * x;
            if (j < C) sm[RED + 2 * C * NCG + j * NRG + rg] = cs[x];
        }
    }
    barrier();
    if (l < C) {
        float a = 0.0, b = 0.0;
        for (int x = 0; x < NCG; x++) a += sm[RED + l * NCG + x], b += sm[RED + (C + l) * NCG + x];
        for (int x = 0; x < NRG; x++) a -= sm[RED + 2 * C * NCG + l * NRG + x];
        dGs[l] = a;
        dbs[l] = b;
    }

    // ---- 3. dq, dk ----
    float dq[TR * TCK], dk[TR * TCK], pa[2 * NAL], pb[2 * NBL];
    [[unroll]] for (int e = 0; e < TR * TCK; e++) dq[e] = 0.0, dk[e] = 0.0;
    float s0ds = 0.0;
    for (int s = 0; s <= 2 * NS1 + NS3; s++) {
        if (s > 0) {
            barrier();
            // the slab loaded last step (s - 1): A slots at A0 (and A1), B slots at B0, B1
            [[unroll]] for (int q = 0; q < 2; q++)
                [[unroll]] for (int e = 0; e < NAL; e++) {
                    const int x = l + 256 * e;
                    if (x < C * KB && s - 1 < 2 * NS1) sm[A0 + q * C * AP + (x / KB) * AP + x % KB] = pa[q * NAL + e];
                }
            [[unroll]] for (int q = 0; q < 2; q++)
                [[unroll]] for (int e = 0; e < NBL; e++) {
                    const int x = l + 256 * e;
                    if (x < KB * KW) {
                        // S0 / dS slabs: x = m KB + kk (runs of KB along a state row);
                        // q / k slabs: x = kk KW + m
                        const int m = s - 1 < 2 * NS1 ? x / KB : x % KW, k = s - 1 < 2 * NS1 ? x % KB : x / KW;
                        sm[B0 + q * KB * KP + k * KP + m] = pb[q * NBL + e];
                    }
                }
            barrier();
        }
        if (s < 2 * NS1 + NS3) {
            if (s < 2 * NS1) {
                const bool one = s < NS1;
                const int c0 = (one ? s : s - NS1) * KB;
                [[unroll]] for (int e = 0; e < NAL; e++) {
                    const int x = l + 256 * e, r = x / KB, c = c0 + x % KB;
                    float v0 = 0.0, v1 = 0.0;
                    if (x < C * KB && r < L && c < V) {
                        const uint o = (uint(t0 + r) * HV + hv) * uV + uint(c);
                        if (one) {
                            v0 = scale * gs[r] * do_in[o];
                            v1 = ds[r] * vnew_buf[o];
                        } else
                            v0 = -bs[r] * gs[r] * u_buf[o];
                    }
                    pa[e] = v0, pa[NAL + e] = v1;
                }
                [[unroll]] for (int e = 0; e < NBL; e++) {
                    const int x = l + 256 * e, m = x / KB, c = c0 + x % KB;
                    float v0 = 0.0, v1 = 0.0;
                    if (x < KB * KW && m < K && c < V) {
                        v0 = hs_buf[hb + uint(m * V + c)];
                        if (one) {
                            v1 = dck[hb + uint(m * V + c)];
                            s0ds += v0 * v1;
                        }
                    }
                    pb[e] = v0, pb[NBL + e] = v1;
                }
            } else {
                const int j0 = (s - 2 * NS1) * KB;
                [[unroll]] for (int e = 0; e < NBL; e++) {
                    const int x = l + 256 * e, j = j0 + x / KW, m = x % KW;
                    float v0 = 0.0, v1 = 0.0;
                    if (x < KB * KW && j < L && m < K) {
                        const uint o = (uint(t0 + j) * H + h) * uK + uint(m);
                        v0 = qhat[o];
                        v1 = khat[o];
                    }
                    pb[e] = v0, pb[NBL + e] = v1;
                }
            }
        }
        if (s == NS1 + 1) {
            // dq holds scale gamma S0 do, dk exp(G_L - G) dS vnew: the row dots q . dq, k . dk
            [[unroll]] for (int i = 0; i < TR; i++) {
                const int r = rg * TR + i;
                float a = 0.0, b = 0.0;
                if (r < L) {
                    [[unroll]] for (int x = 0; x < TCK; x++) {
                        const int m = cg + NCG * x;
                        if (m < K) {
                            const uint o = (uint(t0 + r) * H + h) * uK + uint(m);
                            a += qhat[o] * dq[i * TCK + x];
                            b += khat[o] * dk[i * TCK + x];
                        }
                    }
                }
                sm[RED + r * NCG + cg] = a;
                sm[RED + (C + r) * NCG + cg] = b;
            }
        }
        if (s > 0) {
            const int p = s - 1;
            if (p < NS1) {
                [[unroll]] for (int k = 0; k < KB; k++) {
                    float a0[TR], a1[TR], b0[TCK], b1[TCK];
                    [[unroll]] for (int i = 0; i < TR; i++) {
                        a0[i] = sm[A0 + (rg * TR + i) * AP + k];
                        a1[i] = sm[A1 + (rg * TR + i) * AP + k];
                    }
                    [[unroll]] for (int x = 0; x < TCK; x++) {
                        b0[x] = sm[B0 + k * KP + cg + NCG * x];
                        b1[x] = sm[B1 + k * KP + cg + NCG * x];
                    }
                    [[unroll]] for (int i = 0; i < TR; i++)
                        [[unroll]] for (int x = 0; x < TCK; x++) {
                            dq[i * TCK + x] += a0[i] * b0[x];
                            dk[i * TCK + x] += a1[i] * b1[x];
                        }
                }
            } else if (p < 2 * NS1) {
                [[unroll]] for (int k = 0; k < KB; k++) {
                    float a0[TR], b0[TCK];
                    [[unroll]] for (int i = 0; i < TR; i++) a0[i] = sm[A0 + (rg * TR + i) * AP + k];
                    [[unroll]] for (int x = 0; x < TCK; x++) b0[x] = sm[B0 + k * KP + cg + NCG * x];
                    [[unroll]] for (int i = 0; i < TR; i++)
                        [[unroll]] for (int x = 0; x < TCK; x++) dk[i * TCK + x] += a0[i] * b0[x];
                }
            } else {
                const int j0 = (p - 2 * NS1) * KB;
                [[unroll]] for (int k = 0; k < KB; k++) {
                    const int j = j0 + k;
                    float pq[TR], pt[TR], bb[TR], bq[TCK], bk[TCK];
                    [[unroll]] for (int i = 0; i < TR; i++) {
                        const int r = rg * TR + i;
                        const float ma = sm[r * CP + j], mb = sm[j * CP + r];
                        pq[i] = j <= r ? ma : 0.0;                  // Pq[r][j]
                        pt[i] = r <= j ? mb : 0.0;                  // Pq[j][r]
                        bb[i] = j < r ? mb : (j > r ? ma : 0.0);    // B[r][j] + B[j][r]
                    }
                    [[unroll]] for (int x = 0; x < TCK; x++) {
                        bq[x] = sm[B0 + k * KP + cg + NCG * x];
                        bk[x] = sm[B1 + k * KP + cg + NCG * x];
                    }
                    [[unroll]] for (int i = 0; i < TR; i++)
                        [[unroll]] for (int x = 0; x < TCK; x++) {
                            dq[i * TCK + x] += pq[i] * bk[x];
                            dk[i * TCK + x] += pt[i] * bq[x] + bb[i] * bk[x];
                        }
                }
            }
        }
    }
    [[unroll]] for (int i = 0; i < TR; i++) {
        const int r = rg * TR + i;
        if (r < L) {
            const uint tv = uint(t0 + r) * HV + hv;
            [[unroll]] for (int x = 0; x < TCK; x++) {
                const int m = cg + NCG * x;
                if (m < K) {
                    dq_part[tv * uK + uint(m)] = dq[i * TCK + x];
                    dk_part[tv * uK + uint(m)] = dk[i * TCK + x];
                }
            }
        }
    }
    red[l] = s0ds;
    barrier();
    if (l < L) {
        float a = 0.0, b = 0.0;
        for (int x = 0; x < NCG; x++) a += sm[RED + l * NCG + x], b += sm[RED + (C + l) * NCG + x];
        const uint tv = uint(t0 + l) * HV + hv;
        bjs[l] = b;
        fin[l] = dsc_part[tv * 2 + 1] + dGs[l] + a - b;
    }
    barrier();
    if (l < L) {
        float s0 = 0.0, bsum = 0.0, acc = 0.0, r4[4] = float[4](0.0, 0.0, 0.0, 0.0);
        [[unroll]] for (int x = 0; x < 256; x += 4)
            [[unroll]] for (int y = 0; y < 4; y++) r4[y] += red[x + y];
        s0 = (r4[0] + r4[1]) + (r4[2] + r4[3]);
        for (int i = 0; i < L; i++) bsum += bjs[i];
        for (int i = l; i < L; i++) acc += fin[i];
        const uint tv = uint(t0 + l) * HV + hv;
        dsc_part[tv * 2] += dbs[l];
        dsc_part[tv * 2 + 1] = acc + gs[L - 1] * s0 + bsum;
    }
}
