#version 450
// chunk_bwdv: the chunkwise backward's V-sized rows of one chunk, after chunk_dstate has
// left dvnew in ckpt. Workgroup = (chunk, value head), 256 invocations as C rows x NL
// lanes (row r = token of the chunk, lanes over the columns). With Tm = (I + A)^-1 from
// chunk_prep and S0 the state entering the chunk (hs):
//   du2_r  = sum_{i>=r} Tm[i,r] dvnew_i       -> u_buf
//   dv_r   = beta_r du2_r
//   vt_r   = v_r - gamma_r S0^T k_r            -> ckpt[total*HV*V + ..] (chunk_bwd's dTm)
//   dbeta_r  = vt_r . du2_r                     (v_r . du2_r + gamma_r k_r . dw2_r,
//   dG_r     = beta_r (vt_r - v_r) . du2_r       dw2_r = -S0 du2_r)   -> dsc_part
layout(local_size_x = 256) in;
layout(constant_id = 1) const int K = 128;
layout(constant_id = 2) const int V = 128;
layout(constant_id = 3) const int C = 64;
#include "common.glsl"

const int NL = 256 / C; // C is a power of two <= 64
shared float Ts[C * C];
shared float red[256], red2[256];

void main()
{
    const uint cid = gl_WorkGroupID.x, hv = gl_WorkGroupID.y, l = gl_LocalInvocationID.x;
    const int r = int(l) / NL, lane = int(l) % NL;
    const uint HV = uint(pc.HV), H = uint(pc.H), h = hv / uint(pc.grp);
    const int t0 = offs[2 * pc.N + 2 + 2 * int(cid)], t1 = offs[2 * pc.N + 3 + 2 * int(cid)];
    const int L = t1 - t0;
    const uint KV = uint(K * V), hb = (uint(cid) * HV + hv) * KV, NV = uint(pc.total) * HV * uint(V);
    const uint tb = (cid * HV + hv) * uint(C * C);
    for (int x = int(l); x < C * C; x += 256) Ts[x] = scr[tb + uint(x)];
    barrier();
    float s1 = 0.0, s2 = 0.0;
    if (r < L) {
        const uint tv = uint(t0 + r) * HV + hv, kb = (uint(t0 + r) * H + h) * uint(K);
        const float be = beta_buf[tv], ga = exp(G_buf[tv]);
        for (int c = lane; c < V; c += NL) {
            float du = 0.0;
            for (int i = r; i < L; i++) du += Ts[i * C + r] * ckpt[(uint(t0 + i) * HV + hv) * uint(V) + uint(c)];
            float ks = 0.0;
            for (int m = 0; m < K; m++) ks += khat[kb + uint(m)] * hs_buf[hb + uint(m * V + c)];
            const uint o = tv * uint(V) + uint(c);
            const float vv = v_in[o], vt = vv - ga * ks;
            u_buf[o] = du;
            dv_out[o] = be * du;
            ckpt[NV + o] = vt;
            s1 += vt * du;
            s2 += (vt - vv) * du;
        }
    }
    red[l] = s1;
    red2[l] = s2;
    barrier();
    if (lane == 0 && r < L) {
        float a = 0.0, b = 0.0;
        for (int x = 0; x < NL; x++) a += red[l + uint(x)], b += red2[l + uint(x)];
        const uint tv = uint(t0 + r) * HV + hv;
        dsc_part[tv * 2] = a;
        dsc_part[tv * 2 + 1] = beta_buf[tv] * b;
    }
}
