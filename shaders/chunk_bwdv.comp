#version 450
// chunk_bwdv: the chunkwise backward's V-sized rows of one chunk, after chunk_dstate has
// left dvnew in ckpt. Workgroup = (chunk, value head), 256 invocations. With Tm = (I + A)^-1
// from chunk_prep and S0 the state entering the chunk (hs):
//   du2_r  = sum_{i>=r} Tm[i,r] dvnew_i       -> u_buf
//   dv_r   = beta_r du2_r
//   vt_r   = v_r - gamma_r S0^T k_r            -> ckpt[total*HV*V + ..] (chunk_bwd's dTm)
//   dbeta_r  = vt_r . du2_r                     (v_r . du2_r + gamma_r k_r . dw2_r,
//   dG_r     = beta_r (vt_r - v_r) . du2_r       dw2_r = -S0 du2_r)   -> dsc_part
// Two GEMMs over the chunk: du2 (C x V) = Tm^T dvnew (inner: the C tokens) and
// ks (C x V) = Khat S0 (inner: K). Invocation (rg, cg) holds a TR x TCV register tile:
// rows rg TR .. rg TR + TR - 1, columns cg + NCG x. The inner dimension streams through
// shared memory in slabs of KB: an A slab (C x KB, Tm^T or khat) and a B slab (KB x V,
// dvnew or S0 rows), loaded with constant trip counts into registers one slab ahead of
// the compute (2 barriers per slab).
#extension GL_EXT_control_flow_attributes : require
layout(local_size_x = 256) in;
layout(constant_id = 1) const int K = 128;
layout(constant_id = 2) const int V = 128;
layout(constant_id = 3) const int C = 64;
#include "common.glsl"

const int TR = C < 4 ? C : 4;            // rows per invocation
const int NRG = C / TR;                  // row groups
const int NCG = 256 / NRG;               // column groups
const int TCV = (V + NCG - 1) / NCG;     // columns per invocation
const int VW = TCV * NCG;                // columns of a B slab row (>= V; zero beyond V)
const int KB = V > 256 ? 4 : 16;         // inner slab
const int AP = KB + 1, VP = VW + 4;      // padded rows (bank conflicts)
const int NS1 = (C + KB - 1) / KB, NS2 = (K + KB - 1) / KB;
const int NA = (C * KB + 255) / 256, NB = (KB * VW + 255) / 256; // loads per invocation
// host (vk_backward_chunk): 4 * (C * AP + KB * VP + 2 * C * NCG) bytes
shared float As[C * AP];
shared float Bs[KB * VP];
shared float red[2 * C * NCG];

void main()
{
    const uint cid = gl_WorkGroupID.x, hv = gl_WorkGroupID.y;
    const int l = int(gl_LocalInvocationID.x), rg = l / NCG, cg = l % NCG;
    const uint HV = uint(pc.HV), H = uint(pc.H), h = hv / uint(pc.grp);
    const int t0 = offs[2 * pc.N + 2 + 2 * int(cid)], t1 = offs[2 * pc.N + 3 + 2 * int(cid)];
    const int L = t1 - t0;
    const uint KV = uint(K * V), hb = (uint(cid) * HV + hv) * KV, NV = uint(pc.total) * HV * uint(V);
    const uint tb = (cid * HV + hv) * uint(C * C);

    float du[TR * TCV], ks[TR * TCV], pa[NA], pb[NB];
    [[unroll]] for (int e = 0; e < TR * TCV; e++) du[e] = 0.0, ks[e] = 0.0;

    for (int s = 0; s <= NS1 + NS2; s++) {
        // store the slab loaded last step, then load the next one into registers
        if (s > 0) {
            barrier();
            [[unroll]] for (int e = 0; e < NA; e++) {
                const int x = l + 256 * e;
                if (x < C * KB) {
                    // Tm^T slabs: x = kk C + r (coalesced over r); khat slabs: x = r KB + kk
                    const int r = s <= NS1 ? x % C : x / KB, kk = s <= NS1 ? x / C : x % KB;
                    As[r * AP + kk] = pa[e];
                }
            }
            [[unroll]] for (int e = 0; e < NB; e++) {
                const int x = l + 256 * e;
                if (x < KB * VW) Bs[(x / VW) * VP + x % VW] = pb[e];
            }
            barrier();
        }
        if (s < NS1 + NS2) {
            const bool first = s < NS1;
            const int i0 = first ? s * KB : (s - NS1) * KB;
            [[unroll]] for (int e = 0; e < NA; e++) {
                const int x = l + 256 * e;
                float val = 0.0;
                if (x < C * KB) {
                    if (first) {
                        const int r = x % C, i = i0 + x / C;
                        if (i < L && r <= i) val = scr[tb + uint(i * C + r)];
                    } else {
                        const int r = x / KB, m = i0 + x % KB;
                        if (r < L && m < K) val = khat[(uint(t0 + r) * H + h) * uint(K) + uint(m)];
                    }
                }
                pa[e] = val;
            }
            [[unroll]] for (int e = 0; e < NB; e++) {
                const int x = l + 256 * e, i = i0 + x / VW, c = x % VW;
                float val = 0.0;
                if (x < KB * VW && c < V) {
                    if (first) {
                        if (i < L) val = ckpt[(uint(t0 + i) * HV + hv) * uint(V) + uint(c)];
                    } else if (i < K)
                        val = hs_buf[hb + uint(i * V + c)];
                }
                pb[e] = val;
            }
        }
        if (s > 0) {
            // compute on the slab in shared memory (s - 1)
            if (s - 1 < NS1) {
                // Tm[i][r] = 0 for i < r: nothing to add while the slab ends before row rg TR
                if ((s - 1) * KB + KB > rg * TR) {
                    [[unroll]] for (int kk = 0; kk < KB; kk++) {
                        float a[TR], b[TCV];
                        [[unroll]] for (int i = 0; i < TR; i++) a[i] = As[(rg * TR + i) * AP + kk];
                        [[unroll]] for (int x = 0; x < TCV; x++) b[x] = Bs[kk * VP + cg + NCG * x];
                        [[unroll]] for (int i = 0; i < TR; i++)
                            [[unroll]] for (int x = 0; x < TCV; x++) du[i * TCV + x] += a[i] * b[x];
                    }
                }
            } else {
                [[unroll]] for (int kk = 0; kk < KB; kk++) {
                    float a[TR], b[TCV];
                    [[unroll]] for (int i = 0; i < TR; i++) a[i] = As[(rg * TR + i) * AP + kk];
                    [[unroll]] for (int x = 0; x < TCV; x++) b[x] = Bs[kk * VP + cg + NCG * x];
                    [[unroll]] for (int i = 0; i < TR; i++)
                        [[unroll]] for (int x = 0; x < TCV; x++) ks[i * TCV + x] += a[i] * b[x];
                }
            }
        }
    }

    [[unroll]] for (int i = 0; i < TR; i++) {
        const int r = rg * TR + i;
        float s1 = 0.0, s2 = 0.0;
        if (r < L) {
            const uint tv = uint(t0 + r) * HV + hv;
            const float be = beta_buf[tv], ga = exp(G_buf[tv]);
            [[unroll]] for (int x = 0; x < TCV; x++) {
                const int c = cg + NCG * x;
                if (c < V) {
                    const uint o = tv * uint(V) + uint(c);
                    const float d = du[i * TCV + x], vv = v_in[o], vt = vv - ga * ks[i * TCV + x];
                    u_buf[o] = d;
                    dv_out[o] = be * d;
                    ckpt[NV + o] = vt;
                    s1 += vt * d;
                    s2 += (vt - vv) * d;
                }
            }
        }
        red[r * NCG + cg] = s1;
        red[(C + r) * NCG + cg] = s2;
    }
    barrier();
    if (l < L) {
        float a = 0.0, b = 0.0;
        for (int x = 0; x < NCG; x++) a += red[l * NCG + x], b += red[(C + l) * NCG + x];
        const uint tv = uint(t0 + l) * HV + hv;
        dsc_part[tv * 2] = a;
        dsc_part[tv * 2 + 1] = beta_buf[tv] * b;
    }
}
