#version 450
// chunk_state: the sequential pass over the chunks of a sequence. Workgroup = (V block,
// value head, sequence): VB = 2 NC columns of S, NR row groups x NC column pairs of
// invocations. Invocation (c, r) holds, in registers, columns c and c + NC of S, rows in
// the quads (4 rows) r, r + NR, ... (neighbouring row groups read neighbouring quads of a
// shared row: no bank conflicts). Per chunk:
//   hs[c] = S0 (for chunk_out and a backward pass)
//   vnew  = u - w S0                     (S0 transposed in shared memory; an invocation
//                                         computes 2 tokens x its 2 columns over all K:
//                                         no partial sums to reduce)
//   S     = gamma_L S0 + sum_i k_i (exp(G_L - G_i) vnew_i)^T
// w and k pass through one shared tile of TT tokens (the whole chunk where it fits). The
// next job's tile (and u, G) is loaded into registers (constant trip count, coalesced, all
// in flight at once) while the current one is computed on: per chunk two jobs (w, k) of
// two barriers each, and no load latency on the critical path. Shared memory:
// 16 KS (TT + VB) + 4 NT TT VB bytes (cstate_fit in vulkan/vk_backend.c).
#extension GL_EXT_control_flow_attributes : require
layout(local_size_x_id = 0) in;
layout(constant_id = 0) const uint WG = 256; // NR * NC
layout(constant_id = 1) const int K = 128;
layout(constant_id = 2) const int V = 128;
layout(constant_id = 3) const int C = 64;
layout(constant_id = 4) const int TT = 64; // tokens per shared tile
#include "common.glsl"

const int Q = (K + 3) / 4;            // row quads
const int QPT = (Q + 31) / 32;        // quads per invocation
const int NR = (Q + QPT - 1) / QPT;   // row groups
const int NC = int(WG) / NR;          // column pairs
const int VB = 2 * NC;                // columns per workgroup
const int KS = (NR * QPT) | 1;        // tile row stride in quads: odd, >= Q + 1
const int NT = (C + TT - 1) / TT;     // tiles per chunk
const int MI = (TT + NR - 1) / NR;    // tokens per invocation in vnew = u - w S0
const int NPF = (TT * 4 * Q + int(WG) - 1) / int(WG); // tile elements per invocation
const int DTI = int(WG) / (4 * Q);    // tile rows loaded at once
const bool PAIR = ((NC | NR) & 1) == 0;
const bool FAST = ((int(WG) % (4 * Q)) | ((TT * 4 * Q) % int(WG))) == 0; // whole tile rows per load round
shared vec4 tile[TT * KS];            // w or k of TT tokens (zero beyond the chunk and K)
shared vec4 s0t[VB * KS];             // S0 transposed
shared vec2 vns[NT * TT * NC];        // exp(G_L - G_i) vnew_i, columns (c, c + NC) paired

uint l, cg, rg, hv, h, HV, H;
uint jc[2];                           // the invocation's columns
float pf[NPF];                        // the next job's tile
vec2 uu[MI];                          // the next w job's u, G of its tokens, G_L
float gg[MI], gl;

// loads tile s of the chunk [t0, t0 + L) of w (sel 0) or k (sel 1) into pf. FAST (the
// workgroup covers whole rows of the tile): an invocation loads one column of every DTI-th
// row, its addresses one stride apart
void load_tile(const int sel, const int t0, const int L, const int s)
{
    const int i0 = s * TT;
    const uint hh = sel == 0 ? HV : H, hd = sel == 0 ? hv : h;
    if (FAST && i0 + TT <= L) {
        const int cl = int(l) % (4 * Q);
        const uint b = (uint(t0 + i0 + int(l) / (4 * Q)) * hh + hd) * uint(K) + uint(min(cl, K - 1));
        const uint st = uint(DTI) * hh * uint(K);
        [[unroll]] for (int m = 0; m < NPF; m++) {
            const float x = sel == 0 ? w_buf[b + uint(m) * st] : khat[b + uint(m) * st];
            pf[m] = K % 4 == 0 || cl < K ? x : 0.0;
        }
    } else {
        // ragged: clamped addresses (every load is issued), zero beyond the chunk and K
        [[unroll]] for (int m = 0; m < NPF; m++) {
            const int e = m * int(WG) + int(l), ti = e / (4 * Q), col = e - ti * 4 * Q;
            const uint a = (uint(t0 + min(i0 + ti, L - 1)) * hh + hd) * uint(K) + uint(min(col, K - 1));
            const float x = sel == 0 ? w_buf[a] : khat[a];
            pf[m] = ti < TT && i0 + ti < L && col < K ? x : 0.0;
        }
    }
}

// the next job's loads: its tile; for a w job also u and G of the invocation's tokens, G_L
void issue(const bool isk, const int t0, const int L, const int s)
{
    load_tile(isk ? 1 : 0, t0, L, s);
    if (!isk) {
        const int i0 = s * TT;
        [[unroll]] for (int m = 0; m < MI; m++) {
            const int ii = int(rg) + NR * m;
            const bool ok = ii < TT && i0 + ii < L;
            const uint t = uint(t0 + min(i0 + ii, L - 1)), b = (t * HV + hv) * uint(V);
            const float x0 = u_buf[b + min(jc[0], uint(V - 1))], x1 = u_buf[b + min(jc[1], uint(V - 1))];
            uu[m] = vec2(ok && jc[0] < uint(V) ? x0 : 0.0, ok && jc[1] < uint(V) ? x1 : 0.0);
            gg[m] = G_buf[t * HV + hv];
        }
        gl = G_buf[uint(t0 + L - 1) * HV + hv];
    }
}

// pf into the shared tile
void put()
{
    if (FAST) {
        const int b = (int(l) / (4 * Q)) * KS + (int(l) % (4 * Q)) / 4, c = int(l) % 4;
        [[unroll]] for (int m = 0; m < NPF; m++) tile[b + m * DTI * KS][c] = pf[m];
    } else {
        [[unroll]] for (int m = 0; m < NPF; m++) {
            const int e = m * int(WG) + int(l), ti = e / (4 * Q), col = e - ti * 4 * Q;
            if (ti < TT) tile[ti * KS + col / 4][col % 4] = pf[m];
        }
    }
}

void main()
{
    l = gl_LocalInvocationID.x;
    if (PAIR) {
        // lane bit 0 picks the column pair, bit 1 the row group: lanes l and l ^ 1 read the
        // same quad of a tile row, l and l ^ 2 the same columns (paired shared loads return
        // at twice the rate)
        const uint x = l >> 2;
        cg = (l & 1u) | ((x % uint(NC / 2)) << 1);
        rg = ((l >> 1) & 1u) | ((x / uint(NC / 2)) << 1);
    } else {
        cg = l % uint(NC);
        rg = l / uint(NC);
    }
    hv = gl_WorkGroupID.y;
    HV = uint(pc.HV);
    H = uint(pc.H);
    h = hv / uint(pc.grp);
    const uint n = gl_WorkGroupID.z, KV = uint(K * V);
    jc[0] = gl_WorkGroupID.x * uint(VB) + cg;
    jc[1] = jc[0] + uint(NC);
    int qd[QPT], qc[QPT]; // the invocation's quads; clamped for reading
    [[unroll]] for (int q = 0; q < QPT; q++) {
        qd[q] = int(rg) + NR * q;
        qc[q] = min(qd[q], Q - 1);
    }
    const uint sbase = (n * HV + hv) * KV;
    // this dispatch's window of the sequence's chunks [cs, ce) (common.glsl); past the
    // first window the state comes from ht, where the previous one left it
    const int c0 = offs[pc.N + 1 + int(n)], c1 = offs[pc.N + 2 + int(n)];
    const int cs = c0 + pc.w0, ce = c0 + min(c1 - c0, pc.w1);
    if (pc.w0 > 0 && cs >= c1) return; // the sequence ended in an earlier window
    vec4 S[2 * QPT];
    [[unroll]] for (int q = 0; q < QPT; q++)
        [[unroll]] for (int c = 0; c < 2; c++)
            [[unroll]] for (int e = 0; e < 4; e++) {
                const int row = 4 * qd[q] + e;
                const bool inb = row < K && jc[c] < uint(V);
                S[2 * q + c][e] = inb && pc.w0 > 0 ? ht_out[sbase + uint(row * V) + jc[c]]
                                : inb && (pc.flags & F_H0) != 0 ? h0_in[sbase + uint(row * V) + jc[c]] : 0.0;
            }
    int tn = 0, Ln = 0; // the next chunk (offsets loaded a chunk ahead)
    if (cs < ce) {
        tn = offs[2 * pc.N + 2 + 2 * cs];
        Ln = offs[2 * pc.N + 3 + 2 * cs] - tn;
        issue(false, tn, Ln, 0);
    }
    for (int cid = cs; cid < ce; cid++) {
        const int t0 = tn, L = Ln, cn = min(cid + 1, ce - 1);
        tn = offs[2 * pc.N + 2 + 2 * cn];
        Ln = offs[2 * pc.N + 3 + 2 * cn] - tn;
        float glc = 0.0;
        // vnew = u - w S0, tile by tile
        for (int s = 0; s < NT; s++) {
            barrier(); // the tile (and s0t, vns) are read no more
            put();
            if (s == 0) {
                const uint hb = (uint(cid) * HV + hv) * KV;
                [[unroll]] for (int q = 0; q < QPT; q++)
                    [[unroll]] for (int c = 0; c < 2; c++) {
                        s0t[(int(cg) + c * NC) * KS + qd[q]] = S[2 * q + c];
                        [[unroll]] for (int e = 0; e < 4; e++) {
                            const int row = 4 * qd[q] + e;
                            if (row < K && jc[c] < uint(V)) hs_buf[hb + uint(row * V) + jc[c]] = S[2 * q + c][e];
                        }
                    }
                glc = gl;
            }
            vec2 u[MI];
            float dg[MI];
            [[unroll]] for (int m = 0; m < MI; m++) {
                u[m] = uu[m];
                dg[m] = exp(glc - gg[m]);
            }
            if (s + 1 < NT) issue(false, t0, L, s + 1);
            else issue(true, t0, L, 0);
            barrier();
            vec4 acc[2 * MI]; // four partial sums per output: plain FMAs
            int row[MI];
            [[unroll]] for (int m = 0; m < MI; m++) {
                acc[2 * m] = acc[2 * m + 1] = vec4(0.0);
                row[m] = min(int(rg) + NR * m, TT - 1) * KS;
            }
            const int a0 = int(cg) * KS, a1 = (int(cg) + NC) * KS;
            for (int k4 = 0; k4 < Q; k4++) {
                const vec4 x0 = s0t[a0 + k4], x1 = s0t[a1 + k4];
                [[unroll]] for (int m = 0; m < MI; m++) {
                    const vec4 wv = tile[row[m] + k4];
                    acc[2 * m] += wv * x0;
                    acc[2 * m + 1] += wv * x1;
                }
            }
            [[unroll]] for (int m = 0; m < MI; m++) {
                const int ii = int(rg) + NR * m, i = s * TT + ii;
                if (ii < TT) {
                    const bool ok = i < L;
                    const vec2 x = u[m] - vec2(dot(acc[2 * m], vec4(1.0)), dot(acc[2 * m + 1], vec4(1.0)));
                    const uint t = uint(t0 + i);
                    if (ok && jc[0] < uint(V)) vnew_buf[(t * HV + hv) * uint(V) + jc[0]] = x.x;
                    if (ok && jc[1] < uint(V)) vnew_buf[(t * HV + hv) * uint(V) + jc[1]] = x.y;
                    vns[i * NC + int(cg)] = ok ? dg[m] * vec2(jc[0] < uint(V) ? x.x : 0.0, jc[1] < uint(V) ? x.y : 0.0)
                                               : vec2(0.0);
                }
            }
        }
        // S = gamma_L S0 + sum_i k_i (exp(G_L - G_i) vnew_i)^T, tile by tile
        for (int s = 0; s < NT; s++) {
            barrier(); // the tile is read no more, vns is complete
            put();
            if (s + 1 < NT) issue(true, t0, L, s + 1);
            else if (cid + 1 < ce) issue(false, tn, Ln, 0);
            if (s == 0) {
                const float gL = exp(glc);
                [[unroll]] for (int q = 0; q < 2 * QPT; q++) S[q] *= gL;
            }
            barrier();
            for (int ii = 0; ii < TT; ii++) {
                const vec2 d = vns[(s * TT + ii) * NC + int(cg)];
                [[unroll]] for (int q = 0; q < QPT; q++) {
                    const vec4 kv = tile[ii * KS + qc[q]];
                    S[2 * q] += kv * d.x;
                    S[2 * q + 1] += kv * d.y;
                }
            }
        }
    }
    if ((pc.flags & F_HT) != 0)
        [[unroll]] for (int q = 0; q < QPT; q++)
            [[unroll]] for (int c = 0; c < 2; c++)
                [[unroll]] for (int e = 0; e < 4; e++) {
                    const int row = 4 * qd[q] + e;
                    if (row < K && jc[c] < uint(V)) ht_out[sbase + uint(row * V) + jc[c]] = S[2 * q + c][e];
                }
}
