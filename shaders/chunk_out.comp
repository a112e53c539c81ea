#version 450
// chunk_out: outputs of one chunk from the state entering it. Workgroup = (chunk, value
// head), 256 invocations.
//   P[i,j] = exp(G_i - G_j) q_i . k_j   (j <= i)
//   o_i    = scale (gamma_i S0^T q_i + sum_{j<=i} P[i,j] vnew_j)
// and under F_DVI dvi_j = scale sum_{i>=j} P[i,j] do_i into ckpt (chunkwise backward).
// Register tiling: the chunk's rows are padded to CP (16, 32 or 64); invocation (ty, tx)
// owns rows 4ty..4ty+3 and columns 4tx..4tx+3 of a block of VB = 4096 / CP output
// columns (64 at C = 64), as vec4 accumulators; operands stream through padded shared
// tiles of 16 (read as vec4: one A and one B vec4 feed 16 FMAs). The output columns are
// done VB at a time, so registers do not grow with V (V = 192: 3 blocks of 64). Global
// loads: constant trip counts, coalesced along the row, the next tile prefetched into
// registers while the current one is used. P is formed once (with the first column block)
// and kept transposed in shared memory.
#extension GL_EXT_control_flow_attributes : require
layout(local_size_x = 256) in;
layout(constant_id = 1) const int K = 128;
layout(constant_id = 2) const int V = 128;
layout(constant_id = 3) const int C = 64;
#include "common.glsl"

const int CP = C <= 16 ? 16 : (C <= 32 ? 32 : 64); // rows, padded
const int RT = CP / 4;          // row groups of 4
const int CT = 256 / RT;        // column groups of 4
const int VB = 4 * CT;          // output columns per block
const int TK = 16;              // tile depth
const int SA = CP / 4 + 1;      // vec4 stride of a row of PT, Qt, Kt
const int SB = VB / 4 + 1;      // vec4 stride of a row of Bt
const int NA = CP * TK / 256;   // q (k) tile elements per invocation (<= 4)
const int NBT = TK * VB / 256;  // S0 / vnew / do tile elements per invocation (<= 16)
const int KT = (K + TK - 1) / TK;
const int NVB = (V + VB - 1) / VB;

shared vec4 PT[CP * SA];        // PT[j][i/4][i%4] = P[i,j]
shared vec4 Qt[TK * SA];        // q tile: Qt[kk][i/4][i%4] = q[i, k0 + kk]
shared vec4 Kt[TK * SA];        // k tile, likewise
shared vec4 Bt[TK * SB];        // S0 rows k, vnew rows j or do rows i: Bt[r][c/4][c%4]
shared float Gs[CP];

int t0, L;
uint hv, h, HVu, Hu;
float rq[4], rk[4], rb[16];     // the next tile, in flight

void ld_qk(int k0, bool wantk)
{
    [[unroll]] for (int r = 0; r < NA; r++) {
        const int e = int(gl_LocalInvocationID.x) + 256 * r, i = e / TK, kk = e % TK;
        const uint src = (uint(t0 + i) * Hu + h) * uint(K) + uint(k0 + kk);
        float x = 0.0, y = 0.0;
        if (i < L && k0 + kk < K) {
            x = qhat[src];
            if (wantk) y = khat[src];
        }
        rq[r] = x;
        rk[r] = y;
    }
}

void st_qk(bool wantk)
{
    [[unroll]] for (int r = 0; r < NA; r++) {
        const int e = int(gl_LocalInvocationID.x) + 256 * r, i = e / TK, kk = e % TK;
        Qt[kk * SA + i / 4][i % 4] = rq[r];
        if (wantk) Kt[kk * SA + i / 4][i % 4] = rk[r];
    }
}

// rows k0.. of S0 (which = 0), of vnew (1) or of do (2), columns c0..c0+VB-1
void ld_b(int which, int r0, int c0)
{
    const uint hb = (uint(gl_WorkGroupID.x) * HVu + hv) * uint(K * V);
    [[unroll]] for (int r = 0; r < NBT; r++) {
        const int e = int(gl_LocalInvocationID.x) + 256 * r, rr = r0 + e / VB, c = c0 + e % VB;
        float x = 0.0;
        if (c < V) {
            if (which == 0) {
                if (rr < K) x = hs_buf[hb + uint(rr * V + c)];
            } else if (rr < L) {
                const uint src = (uint(t0 + rr) * HVu + hv) * uint(V) + uint(c);
                x = which == 1 ? vnew_buf[src] : do_in[src];
            }
        }
        rb[r] = x;
    }
}

void st_b()
{
    [[unroll]] for (int r = 0; r < NBT; r++) {
        const int e = int(gl_LocalInvocationID.x) + 256 * r, rr = e / VB, c = e % VB;
        Bt[rr * SB + c / 4][c % 4] = rb[r];
    }
}

void main()
{
    const uint cid = gl_WorkGroupID.x, l = gl_LocalInvocationID.x;
    hv = gl_WorkGroupID.y;
    HVu = uint(pc.HV), Hu = uint(pc.H), h = hv / uint(pc.grp);
    const int tx = int(l) % CT, ty = int(l) / CT;
    t0 = offs[2 * pc.N + 2 + 2 * int(cid)];
    L = offs[2 * pc.N + 3 + 2 * int(cid)] - t0;
    if (int(l) < CP) Gs[l] = int(l) < L ? G_buf[uint(t0 + int(l)) * HVu + hv] : 0.0;
    const bool pw = tx < CP / 4; // owns a block of P
    const int txp = pw ? tx : 0;
    const int i0 = 4 * ty;

    for (int vb = 0; vb < NVB; vb++) {
        const int c0 = vb * VB;
        const bool first = vb == 0;
        vec4 acc[4], pacc[4];
        [[unroll]] for (int a = 0; a < 4; a++) acc[a] = vec4(0.0), pacc[a] = vec4(0.0);
        // Q S0 (and with the first block Q K^T) over K, TK at a time
        ld_qk(0, first);
        ld_b(0, 0, c0);
        for (int kt = 0; kt < KT; kt++) {
            barrier();
            st_qk(first);
            st_b();
            barrier();
            if (kt + 1 < KT) {
                ld_qk((kt + 1) * TK, first);
                ld_b(0, (kt + 1) * TK, c0);
            }
            if (first) {
                // invocations right of P (C < 64) compute a copy of column block 0, unused
                [[unroll]] for (int kk = 0; kk < TK; kk++) {
                    const vec4 qa = Qt[kk * SA + ty], sb = Bt[kk * SB + tx], kb = Kt[kk * SA + txp];
                    acc[0] += qa.x * sb, acc[1] += qa.y * sb, acc[2] += qa.z * sb, acc[3] += qa.w * sb;
                    pacc[0] += qa.x * kb, pacc[1] += qa.y * kb, pacc[2] += qa.z * kb, pacc[3] += qa.w * kb;
                }
            } else {
                [[unroll]] for (int kk = 0; kk < TK; kk++) {
                    const vec4 qa = Qt[kk * SA + ty], sb = Bt[kk * SB + tx];
                    acc[0] += qa.x * sb, acc[1] += qa.y * sb, acc[2] += qa.z * sb, acc[3] += qa.w * sb;
                }
            }
        }
        // P with the decay and the causal mask, stored transposed (read after the next barrier)
        if (first && pw) {
            [[unroll]] for (int b = 0; b < 4; b++) {
                const int j = 4 * tx + b;
                vec4 p;
                [[unroll]] for (int a = 0; a < 4; a++) {
                    const int i = i0 + a;
                    p[a] = i < L && j <= i ? exp(Gs[i] - Gs[j]) * pacc[a][b] : 0.0;
                }
                PT[j * SA + ty] = p;
            }
        }
        // the S0 term scaled by gamma_i
        [[unroll]] for (int a = 0; a < 4; a++) acc[a] *= exp(Gs[i0 + a]);
        // + P vnew, TK rows of vnew at a time (tiles above the invocation's rows are zero)
        ld_b(1, 0, c0);
        for (int j0 = 0; j0 < L; j0 += TK) {
            barrier();
            st_b();
            barrier();
            if (j0 + TK < L) ld_b(1, j0 + TK, c0);
            if (j0 <= i0 + 3) {
                [[unroll]] for (int jj = 0; jj < TK; jj++) {
                    const vec4 pa = PT[(j0 + jj) * SA + ty], vv = Bt[jj * SB + tx];
                    acc[0] += pa.x * vv, acc[1] += pa.y * vv, acc[2] += pa.z * vv, acc[3] += pa.w * vv;
                }
            }
        }
        [[unroll]] for (int a = 0; a < 4; a++) {
            const int i = i0 + a;
            if (i >= L) continue;
            const uint ob = (uint(t0 + i) * HVu + hv) * uint(V);
            [[unroll]] for (int b = 0; b < 4; b++) {
                const int c = c0 + 4 * tx + b;
                if (c < V) o_out[ob + uint(c)] = pc.scale * acc[a][b];
            }
        }
        // chunkwise backward: dvi_j = scale sum_{i>=j} P[i,j] do_i (the part of dvnew that
        // does not need the state gradient) into ckpt; rows j = i0..i0+3 of this invocation
        if ((pc.flags & F_DVI) != 0) {
            [[unroll]] for (int a = 0; a < 4; a++) acc[a] = vec4(0.0);
            ld_b(2, 0, c0);
            for (int r0 = 0; r0 < L; r0 += TK) {
                barrier();
                st_b();
                barrier();
                if (r0 + TK < L) ld_b(2, r0 + TK, c0);
                if (r0 + TK - 1 >= i0) {
                    [[unroll]] for (int q = 0; q < TK / 4; q++) {
                        // P[r0+4q..r0+4q+3, i0+a] for a = 0..3
                        vec4 pj[4];
                        [[unroll]] for (int a = 0; a < 4; a++) pj[a] = PT[(i0 + a) * SA + r0 / 4 + q];
                        [[unroll]] for (int s = 0; s < 4; s++) {
                            const vec4 dv = Bt[(4 * q + s) * SB + tx];
                            acc[0] += pj[0][s] * dv, acc[1] += pj[1][s] * dv;
                            acc[2] += pj[2][s] * dv, acc[3] += pj[3][s] * dv;
                        }
                    }
                }
            }
            [[unroll]] for (int a = 0; a < 4; a++) {
                const int j = i0 + a;
                if (j >= L) continue;
                const uint ob = (uint(t0 + j) * HVu + hv) * uint(V);
                [[unroll]] for (int b = 0; b < 4; b++) {
                    const int c = c0 + 4 * tx + b;
                    if (c < V) ckpt[ob + uint(c)] = pc.scale * acc[a][b];
                }
            }
        }
    }
}
