#version 450
// chunk_dstate: the chunkwise backward's sequential pass, over the chunks of a sequence
// from the last (ref/kla_ref.c section 6). Workgroup = (V block, value head, sequence) and
// invocations as chunk_state: invocation (c, r) holds columns c and c + NC of the state
// gradient dS, rows in the quads r, r + NR, ... in registers (columns are independent). Per
// chunk, with dS the gradient with respect to the state leaving it:
//   dck[c]   = dS                                            (for chunk_bwd)
//   dvnew_i  = exp(G_L - G_i) dS^T k_i + dvi_i               (dvi = P^T do from chunk_out;
//                                                             in place in ckpt; dS
//                                                             transposed in shared memory)
//   dS      <- gamma_L dS - sum_i w_i dvnew_i^T + sum_i q_i (scale gamma_i do_i)^T
// and finally dh0 = dS. k, w and q pass through one shared tile of TT tokens (the whole
// chunk where it fits), the next job's tile (and dvi or do, G) loaded into registers while
// the current one is computed on: three jobs of two barriers per chunk. The coefficients
// of the update (-dvnew, then scale gamma do) share one C x VB array, so the shared memory
// is chunk_state's: 16 KS (TT + VB) + 4 NT TT VB bytes (cstate_fit in vulkan/vk_backend.c).
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
const int MI = (TT + NR - 1) / NR;    // tokens per invocation in dvnew
const int NPF = (TT * 4 * Q + int(WG) - 1) / int(WG); // tile elements per invocation
const int DTI = int(WG) / (4 * Q);    // tile rows loaded at once
const bool PAIR = ((NC | NR) & 1) == 0;
const bool FAST = ((int(WG) % (4 * Q)) | ((TT * 4 * Q) % int(WG))) == 0; // whole tile rows per load round
shared vec4 tile[TT * KS];            // k, w or q of TT tokens (zero beyond the chunk and K)
shared vec4 s0t[VB * KS];             // dS transposed
shared vec2 cf[NT * TT * NC];         // -dvnew_i, then scale gamma_i do_i; columns (c, c + NC)

const int JK = 0, JW = 1, JQ = 2;     // jobs: k (dvnew), w and q (the update)
uint l, cg, rg, hv, h, HV, H;
uint jc[2];
float pf[NPF];                        // the next job's tile
vec2 xx[MI];                          // the next job's dvi (k job) or do (q job)
float gg[MI], gl;                     // G of its tokens, G_L

// loads tile s of the chunk [t0, t0 + L) of w (sel JW), k (JK) or q (JQ) into pf. FAST
// (the workgroup covers whole rows of the tile): an invocation loads one column of every
// DTI-th row, its addresses one stride apart
float ld(const int sel, const uint a)
{
    return sel == JW ? w_buf[a] : sel == JK ? khat[a] : qhat[a];
}
void load_tile(const int sel, const int t0, const int L, const int s)
{
    const int i0 = s * TT;
    const uint hh = sel == JW ? HV : H, hd = sel == JW ? hv : h;
    if (FAST && i0 + TT <= L) {
        const int cl = int(l) % (4 * Q);
        const uint b = (uint(t0 + i0 + int(l) / (4 * Q)) * hh + hd) * uint(K) + uint(min(cl, K - 1));
        const uint st = uint(DTI) * hh * uint(K);
        [[unroll]] for (int m = 0; m < NPF; m++) {
            const float x = ld(sel, b + uint(m) * st);
            pf[m] = K % 4 == 0 || cl < K ? x : 0.0;
        }
    } else {
        // ragged: clamped addresses (every load is issued), zero beyond the chunk and K
        [[unroll]] for (int m = 0; m < NPF; m++) {
            const int e = m * int(WG) + int(l), ti = e / (4 * Q), col = e - ti * 4 * Q;
            const float x = ld(sel, (uint(t0 + min(i0 + ti, L - 1)) * hh + hd) * uint(K) + uint(min(col, K - 1)));
            pf[m] = ti < TT && i0 + ti < L && col < K ? x : 0.0;
        }
    }
}

// the next job's loads: its tile; for a k or q job also dvi or do and G of the
// invocation's tokens, G_L
void issue(const int jb, const int t0, const int L, const int s)
{
    load_tile(jb, t0, L, s);
    if (jb == JW) return;
    const int i0 = s * TT;
    [[unroll]] for (int m = 0; m < MI; m++) {
        const int ii = int(rg) + NR * m;
        const bool ok = ii < TT && i0 + ii < L;
        const uint t = uint(t0 + min(i0 + ii, L - 1)), b = (t * HV + hv) * uint(V);
        const uint b0 = b + min(jc[0], uint(V - 1)), b1 = b + min(jc[1], uint(V - 1));
        const vec2 x = jb == JK ? vec2(ckpt[b0], ckpt[b1]) : vec2(do_in[b0], do_in[b1]);
        xx[m] = vec2(ok && jc[0] < uint(V) ? x.x : 0.0, ok && jc[1] < uint(V) ? x.y : 0.0);
        gg[m] = G_buf[t * HV + hv];
    }
    gl = G_buf[uint(t0 + L - 1) * HV + hv];
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
    jc[0] = gl_WorkGroupID.x * uint(VB) + cg;
    jc[1] = jc[0] + uint(NC);
    const uint n = gl_WorkGroupID.z, KV = uint(K * V);
    const float scale = pc.scale;
    int qd[QPT], qc[QPT]; // the invocation's quads; clamped for reading
    [[unroll]] for (int q = 0; q < QPT; q++) {
        qd[q] = int(rg) + NR * q;
        qc[q] = min(qd[q], Q - 1);
    }
    const uint sbase = (n * HV + hv) * KV;
    // this dispatch's window of the sequence's chunks [cs, ce) (common.glsl; windows run
    // last first): unless it holds the last chunk, dS comes from dh0, where the window
    // after it left it
    const int c0 = offs[pc.N + 1 + int(n)], c1 = offs[pc.N + 2 + int(n)];
    const int cs = c0 + pc.w0, ce = c0 + min(c1 - c0, pc.w1);
    if (pc.w0 > 0 && cs >= c1) return; // the sequence starts in a later-run window
    const bool first = ce == c1;
    vec4 dS[2 * QPT];
    [[unroll]] for (int q = 0; q < QPT; q++)
        [[unroll]] for (int c = 0; c < 2; c++)
            [[unroll]] for (int e = 0; e < 4; e++) {
                const int row = 4 * qd[q] + e;
                const bool inb = row < K && jc[c] < uint(V);
                dS[2 * q + c][e] = inb && !first ? dh0_out[sbase + uint(row * V) + jc[c]]
                                 : inb && (pc.flags & F_DHT) != 0 ? dht_in[sbase + uint(row * V) + jc[c]] : 0.0;
            }
    int tn = 0, Ln = 0; // the next chunk to run (offsets loaded a chunk ahead)
    if (cs < ce) {
        tn = offs[2 * pc.N + 2 + 2 * (ce - 1)];
        Ln = offs[2 * pc.N + 3 + 2 * (ce - 1)] - tn;
        issue(JK, tn, Ln, 0);
    }
    for (int cid = ce - 1; cid >= cs; cid--) {
        const int t0 = tn, L = Ln, cn = max(cid - 1, cs);
        tn = offs[2 * pc.N + 2 + 2 * cn];
        Ln = offs[2 * pc.N + 3 + 2 * cn] - tn;
        float glc = 0.0;
        // dvnew_i = exp(G_L - G_i) dS^T k_i + dvi_i, tile by tile
        for (int s = 0; s < NT; s++) {
            barrier(); // the tile (and s0t, cf) are read no more
            put();
            if (s == 0) {
                const uint db = (uint(cid) * HV + hv) * KV;
                [[unroll]] for (int q = 0; q < QPT; q++)
                    [[unroll]] for (int c = 0; c < 2; c++) {
                        s0t[(int(cg) + c * NC) * KS + qd[q]] = dS[2 * q + c];
                        [[unroll]] for (int e = 0; e < 4; e++) {
                            const int row = 4 * qd[q] + e;
                            if (row < K && jc[c] < uint(V)) dck[db + uint(row * V) + jc[c]] = dS[2 * q + c][e];
                        }
                    }
                glc = gl;
            }
            vec2 dvi[MI];
            float dg[MI];
            [[unroll]] for (int m = 0; m < MI; m++) {
                dvi[m] = xx[m];
                dg[m] = exp(glc - gg[m]);
            }
            if (s + 1 < NT) issue(JK, t0, L, s + 1);
            else issue(JW, t0, L, 0);
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
                    const vec4 kv = tile[row[m] + k4];
                    acc[2 * m] += kv * x0;
                    acc[2 * m + 1] += kv * x1;
                }
            }
            [[unroll]] for (int m = 0; m < MI; m++) {
                const int ii = int(rg) + NR * m, i = s * TT + ii;
                if (ii < TT) {
                    const bool ok = i < L;
                    const vec2 x = dg[m] * vec2(dot(acc[2 * m], vec4(1.0)), dot(acc[2 * m + 1], vec4(1.0))) + dvi[m];
                    const uint b = (uint(t0 + i) * HV + hv) * uint(V);
                    if (ok && jc[0] < uint(V)) ckpt[b + jc[0]] = x.x;
                    if (ok && jc[1] < uint(V)) ckpt[b + jc[1]] = x.y;
                    cf[i * NC + int(cg)] = ok ? -vec2(jc[0] < uint(V) ? x.x : 0.0, jc[1] < uint(V) ? x.y : 0.0)
                                              : vec2(0.0);
                }
            }
        }
        // dS <- gamma_L dS - sum_i w_i dvnew_i^T (job w), + sum_i q_i (scale gamma_i do_i)^T (job q)
        [[unroll]] for (int jb = JW; jb <= JQ; jb++)
            for (int s = 0; s < NT; s++) {
                barrier(); // the tile is read no more, cf is complete (w) or read no more (q)
                put();
                if (jb == JQ) {
                    [[unroll]] for (int m = 0; m < MI; m++) {
                        const int ii = int(rg) + NR * m, i = s * TT + ii;
                        if (ii < TT) cf[i * NC + int(cg)] = i < L ? scale * exp(gg[m]) * xx[m] : vec2(0.0);
                    }
                }
                if (s + 1 < NT) issue(jb, t0, L, s + 1);
                else if (jb == JW) issue(JQ, t0, L, 0);
                else if (cid > cs) issue(JK, tn, Ln, 0);
                if (jb == JW && s == 0) {
                    const float gL = exp(glc);
                    [[unroll]] for (int q = 0; q < 2 * QPT; q++) dS[q] *= gL;
                }
                barrier();
                for (int ii = 0; ii < TT; ii++) {
                    const vec2 d = cf[(s * TT + ii) * NC + int(cg)];
                    [[unroll]] for (int q = 0; q < QPT; q++) {
                        const vec4 tv = tile[ii * KS + qc[q]];
                        dS[2 * q] += tv * d.x;
                        dS[2 * q + 1] += tv * d.y;
                    }
                }
            }
    }
    if ((pc.flags & F_DH0) != 0)
        [[unroll]] for (int q = 0; q < QPT; q++)
            [[unroll]] for (int c = 0; c < 2; c++)
                [[unroll]] for (int e = 0; e < 4; e++) {
                    const int row = 4 * qd[q] + e;
                    if (row < K && jc[c] < uint(V)) dh0_out[sbase + uint(row * V) + jc[c]] = dS[2 * q + c][e];
                }
}
