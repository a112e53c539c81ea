#version 450
// chunk_prep: everything of one chunk that does not need the state entering it
// (ref/kla_ref.c section 4). Workgroup = (chunk, value head), 256 invocations. With L <= C
// tokens:
//   G_i = g_0 + .. + g_i (chunk-local), gamma_i = exp(G_i)
//   A[i,j] = beta_i exp(G_i - G_j) k_i . k_j  (j < i),  Tm = (I + A)^-1 (unit lower)
//   w = Tm diag(beta gamma) K,  u = Tm diag(beta) V
// and under F_TM Tm into scr (chunkwise backward).
// Products register-tiled as in chunk_out: rows padded to CP (16, 32 or 64), invocation
// (ty, tx) owns a 4 x 4 block (vec4 accumulators) of rows 4ty.. and columns 4tx.. of a
// block of VB = 4096 / CP columns, operands from padded shared tiles of 16 read as vec4,
// the next tile's global loads (constant trip counts, coalesced) in flight while the
// current one is used. A and then Tm live transposed in shared memory (TT[j][i] = Tm[i,j]).
// The inverse is blocked by 16 (as flash-linear-attention's solve_tril): the 16 x 16
// diagonal blocks of I + A are inverted in parallel, one column per invocation in
// registers (forward substitution, no barriers), then the blocks below the diagonal, one
// block row at a time: Tm_IJ = -Tm_II (sum_{J<=k<I} A_Ik Tm_kJ), 2 barriers per block row.
#extension GL_EXT_control_flow_attributes : require
layout(local_size_x = 256) in;
layout(constant_id = 1) const int K = 128;
layout(constant_id = 2) const int V = 128;
layout(constant_id = 3) const int C = 64;
#include "common.glsl"

const int CP = C <= 16 ? 16 : (C <= 32 ? 32 : 64); // rows, padded
const int NBK = CP / 16;        // 16 x 16 blocks per side
const int RT = CP / 4;          // row groups of 4
const int CT = 256 / RT;        // column groups of 4
const int VB = 4 * CT;          // output columns per block
const int TK = 16;              // tile depth
const int SA = CP / 4 + 1;      // vec4 stride of a row of TT
const int SB = VB / 4 + 1;      // vec4 stride of a row of Bt
const int NA = CP * TK / 256;   // k tile elements per invocation (<= 4)
const int NBT = TK * VB / 256;  // k / v row tile elements per invocation (<= 16)
const int KT = (K + TK - 1) / TK;
const int NKB = (K + VB - 1) / VB, NVB = (V + VB - 1) / VB;
const int NR = NBK > 1 ? (NBK - 1) * 256 : 1;

shared vec4 TT[CP * SA];        // TT[j][i/4][i%4] = A[i,j], then Tm[i,j]
shared vec4 Bt[TK * SB];        // k tile Bt[kk][j/4][j%4] = k[j, k0+kk]; then rows of k or v
shared float Rs[NR];            // sum_k A_Ik Tm_kJ of one block row
shared float Gs[CP], bs[CP], bgs[CP]; // G, beta, beta gamma

int t0, L;
uint hv, h, HVu, Hu;
float rb[16];                   // the next tile, in flight

void ld_k(int k0)
{
    [[unroll]] for (int r = 0; r < NA; r++) {
        const int e = int(gl_LocalInvocationID.x) + 256 * r, i = e / TK, kk = e % TK;
        float x = 0.0;
        if (i < L && k0 + kk < K) x = khat[(uint(t0 + i) * Hu + h) * uint(K) + uint(k0 + kk)];
        rb[r] = x;
    }
}

void st_k()
{
    [[unroll]] for (int r = 0; r < NA; r++) {
        const int e = int(gl_LocalInvocationID.x) + 256 * r, i = e / TK, kk = e % TK;
        Bt[kk * SB + i / 4][i % 4] = rb[r];
    }
}

// rows j0.. of diag(beta gamma) K (isw) or diag(beta) V, columns c0..c0+VB-1
void ld_b(bool isw, int j0, int c0)
{
    [[unroll]] for (int r = 0; r < NBT; r++) {
        const int e = int(gl_LocalInvocationID.x) + 256 * r, j = j0 + e / VB, c = c0 + e % VB;
        float x = 0.0;
        if (j < L) {
            if (isw) {
                if (c < K) x = bgs[j] * khat[(uint(t0 + j) * Hu + h) * uint(K) + uint(c)];
            } else if (c < V) {
                x = bs[j] * v_in[(uint(t0 + j) * HVu + hv) * uint(V) + uint(c)];
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

// VB columns from c0 of w = Tm diag(beta gamma) K (isw) or u = Tm diag(beta) V, TK rows of
// k or v at a time (tiles right of the invocation's rows are zero)
void wu(bool isw, int c0)
{
    const int l = int(gl_LocalInvocationID.x), tx = l % CT, ty = l / CT, i0 = 4 * ty;
    vec4 acc[4];
    [[unroll]] for (int a = 0; a < 4; a++) acc[a] = vec4(0.0);
    ld_b(isw, 0, c0);
    for (int j0 = 0; j0 < L; j0 += TK) {
        barrier();
        st_b();
        barrier();
        if (j0 + TK < L) ld_b(isw, j0 + TK, c0);
        if (j0 <= i0 + 3) {
            [[unroll]] for (int jj = 0; jj < TK; jj++) {
                const vec4 ta = TT[(j0 + jj) * SA + ty], xb = Bt[jj * SB + tx];
                acc[0] += ta.x * xb, acc[1] += ta.y * xb, acc[2] += ta.z * xb, acc[3] += ta.w * xb;
            }
        }
    }
    const int NC = isw ? K : V;
    [[unroll]] for (int a = 0; a < 4; a++) {
        const int i = i0 + a;
        if (i >= L) continue;
        const uint ob = (uint(t0 + i) * HVu + hv) * uint(NC);
        [[unroll]] for (int b = 0; b < 4; b++) {
            const int c = c0 + 4 * tx + b;
            if (c < NC) {
                if (isw) w_buf[ob + uint(c)] = acc[a][b];
                else u_buf[ob + uint(c)] = acc[a][b];
            }
        }
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
    const int i0 = 4 * ty;
    const bool pw = tx < CP / 4; // owns a block of A

    ld_k(0);
    // G by a prefix sum over g (summed in token order, as the reference), beta, beta gamma
    float bt = 0.0;
    if (int(l) < CP) {
        float gx = 0.0;
        if (int(l) < L) {
            const uint tv = uint(t0 + int(l)) * HVu + hv;
            if ((pc.flags & F_G) != 0) gx = g_in[tv];
            bt = beta_buf[tv];
        }
        Gs[l] = gx;
    }
    barrier();
    float G = 0.0;
    if (int(l) < CP) {
        [[unroll]] for (int m = 0; m < CP; m++)
            if (m <= int(l)) G += Gs[m];
    }
    barrier();
    if (int(l) < CP) {
        Gs[l] = G;
        bs[l] = bt;
        bgs[l] = bt * exp(G);
        if (int(l) < L) G_buf[uint(t0 + int(l)) * HVu + hv] = G;
    }

    // K K^T over K, TK at a time (both operands from the one tile)
    vec4 acc[4];
    [[unroll]] for (int a = 0; a < 4; a++) acc[a] = vec4(0.0);
    for (int kt = 0; kt < KT; kt++) {
        barrier();
        st_k();
        barrier();
        if (kt + 1 < KT) ld_k((kt + 1) * TK);
        if (pw) {
            [[unroll]] for (int kk = 0; kk < TK; kk++) {
                const vec4 ka = Bt[kk * SB + ty], kb = Bt[kk * SB + tx];
                acc[0] += ka.x * kb, acc[1] += ka.y * kb, acc[2] += ka.z * kb, acc[3] += ka.w * kb;
            }
        }
    }
    // A with beta, the decay and the strict causal mask, transposed
    if (pw) {
        [[unroll]] for (int b = 0; b < 4; b++) {
            const int j = 4 * tx + b;
            vec4 p;
            [[unroll]] for (int a = 0; a < 4; a++) {
                const int i = i0 + a;
                p[a] = i < L && j < i ? bs[i] * exp(Gs[i] - Gs[j]) * acc[a][b] : 0.0;
            }
            TT[j * SA + ty] = p;
        }
    }
    barrier();
    // diagonal blocks: invocation l < CP owns column j = l of its block (bb = j / 16), rows
    // in registers: t_r = [r == jl] - sum_{m<r} A[r,m] t_m within the block
    {
        float t[16];
        const int jl = int(l) % 16, bb = int(l) / 16;
        if (int(l) < CP) {
            [[unroll]] for (int r = 0; r < 16; r++) t[r] = r == jl ? 1.0 : 0.0;
            [[unroll]] for (int m = 0; m < 15; m++) {
                const int row = (16 * bb + m) * SA + 4 * bb; // column m of the block of A
                vec4 col[4];
                [[unroll]] for (int q = 0; q < 4; q++) col[q] = TT[row + q];
                [[unroll]] for (int r = m + 1; r < 16; r++) t[r] -= col[r / 4][r % 4] * t[m];
            }
        }
        barrier();
        if (int(l) < CP) {
            [[unroll]] for (int q = 0; q < 4; q++)
                TT[int(l) * SA + 4 * bb + q] = vec4(t[4 * q], t[4 * q + 1], t[4 * q + 2], t[4 * q + 3]);
        }
    }
    // blocks below the diagonal, block row I = 1.. in turn; invocation (r, c) = (l/16, l%16)
    {
        const int r = int(l) / 16, c = int(l) % 16;
        [[unroll]] for (int I = 1; I < NBK; I++) {
            barrier(); // rows < I of Tm complete
            [[unroll]] for (int J = 0; J < I; J++) {
                // R[r,c] = sum_{16J <= k < 16I} A[16I+r, k] Tm[k, 16J+c]
                float s = 0.0;
                [[unroll]] for (int kq = 4 * J; kq < 4 * I; kq++) {
                    const vec4 tk = TT[(16 * J + c) * SA + kq]; // Tm[4kq.., 16J+c]
                    [[unroll]] for (int z = 0; z < 4; z++)
                        s += TT[(4 * kq + z) * SA + 4 * I + r / 4][r % 4] * tk[z];
                }
                Rs[(J * 16 + r) * 16 + c] = s;
            }
            barrier();
            // Tm[16I+r, 16J+c] = -sum_{s<=r} Tm_II[r,s] R[s,c]
            [[unroll]] for (int J = 0; J < I; J++) {
                float s = 0.0;
                [[unroll]] for (int z = 0; z < 16; z++)
                    if (z <= r) s += TT[(16 * I + z) * SA + 4 * I + r / 4][r % 4] * Rs[(J * 16 + z) * 16 + c];
                TT[(16 * J + c) * SA + 4 * I + r / 4][r % 4] = -s;
            }
        }
    }
    barrier();
    // the chunkwise backward reads Tm (unit lower, zero outside L x L) again
    if ((pc.flags & F_TM) != 0) {
        const uint tb = (cid * HVu + hv) * uint(C * C);
        [[unroll]] for (int r = 0; r < (C * C + 255) / 256; r++) {
            const int x = int(l) + 256 * r, i = x / C, j = x % C;
            if (x < C * C) scr[tb + uint(x)] = i < L && j <= i ? TT[j * SA + i / 4][i % 4] : 0.0;
        }
    }
    // w = Tm diag(beta gamma) K and u = Tm diag(beta) V
    for (int cb = 0; cb < NKB; cb++) wu(true, cb * VB);
    for (int cb = 0; cb < NVB; cb++) wu(false, cb * VB);
}
