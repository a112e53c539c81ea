#version 450
// rec_bwd: back-propagation through time for the recurrence, one column j of S per
// invocation as in rec_fwd. The segments of CK tokens are independent once the forward
// pass saved the state entering each (ckpt) and rec_dstate the state gradient leaving
// each (dck): workgroup (V block, value head, worker) walks segments worker, worker +
// workers, ... For each, the state before every token is replayed into scr (this
// worker's slice), then the tokens are walked backwards with dS[:, j] in registers.
// dq and dk need sums over the columns: each invocation writes its K terms to shared
// memory, the workgroup sums them and writes one partial per V block (bwd_post adds the
// blocks and the value heads of a group). dbeta and dg partials likewise.
layout(local_size_x_id = 0) in;
layout(constant_id = 0) const uint WG = 32;
layout(constant_id = 1) const int K = 128;
layout(constant_id = 2) const int V = 128;
layout(constant_id = 3) const int CK = 16;
#include "common.glsl"

const uint RS = WG + 1; // padded row of the reduction tile
shared float sq[CK * K], sk[CK * K], sa[CK], sb[CK];
shared float red[K * RS];
shared float red2[2 * WG];

// sum over the workgroup's columns of red[i, :] -> dq_part or dk_part [base + i]
void reduce_rows(uint base, bool to_k)
{
    barrier();
    const uint jl = gl_LocalInvocationID.x;
    for (uint i = jl; i < uint(K); i += WG) {
        float s = 0.0;
        for (uint c = 0; c < WG; c++) s += red[i * RS + c];
        if (to_k) dk_part[base + i] = s;
        else dq_part[base + i] = s;
    }
    barrier();
}

void main()
{
    const uint jl = gl_LocalInvocationID.x, vb = gl_WorkGroupID.x, j = vb * WG + jl;
    const uint hv = gl_WorkGroupID.y, wk = gl_WorkGroupID.z, NW = gl_NumWorkGroups.z;
    const uint HV = uint(pc.HV), H = uint(pc.H), h = hv / uint(pc.grp), nvb = uint(pc.nvb);
    const bool act = j < uint(V);
    const uint KV = uint(K * V);
    // this worker's replay slice: [CK][K][WG]
    const uint sc0 = ((wk * HV + hv) * nvb + vb) * uint(CK * K) * WG + jl;
    const float scale = pc.scale;
    float dS[K];

    const uint s1 = uint(min(pc.nchunk, pc.w1));
    for (uint s = uint(pc.w0) + wk; s < s1; s += NW) {
        const int ts = offs[2 * pc.N + 2 + 2 * int(s)], L = offs[2 * pc.N + 3 + 2 * int(s)] - ts;
        barrier();
        for (uint x = jl; x < uint(L * K); x += WG) {
            uint m = x / uint(K), i = x % uint(K);
            uint src = ((uint(ts) + m) * H + h) * uint(K) + i;
            sq[x] = qhat[src];
            sk[x] = khat[src];
        }
        for (uint m = jl; m < uint(L); m += WG) {
            uint tv = (uint(ts) + m) * HV + hv;
            sa[m] = (pc.flags & F_G) != 0 ? exp(g_in[tv]) : 1.0;
            sb[m] = beta_buf[tv];
        }
        barrier();
        // replay: scr[m] = state before token m of the segment, stepped in registers
        for (int i = 0; i < K; i++) dS[i] = act ? ckpt[(s * HV + hv) * KV + uint(i * V) + j] : 0.0;
        for (int m = 0; m < L; m++) {
            const uint p0 = sc0 + uint(m * K) * WG, kb = uint(m * K);
            for (int i = 0; i < K; i++) scr[p0 + uint(i) * WG] = dS[i];
            if (m + 1 == L) break;
            const float alpha = sa[m];
            float kS = 0.0;
            for (int i = 0; i < K; i++) {
                dS[i] *= alpha;
                kS += dS[i] * sk[kb + i];
            }
            const float be = sb[m] * ((act ? v_in[(uint(ts + m) * HV + hv) * uint(V) + j] : 0.0) - kS);
            for (int i = 0; i < K; i++) dS[i] += sk[kb + i] * be;
        }
        // the state gradient leaving the segment
        for (int i = 0; i < K; i++) dS[i] = act ? dck[(s * HV + hv) * KV + uint(i * V) + j] : 0.0;
        for (int m = L - 1; m >= 0; m--) {
            const int t = ts + m;
            const uint p0 = sc0 + uint(m * K) * WG, kb = uint(m * K);
            const uint tv = uint(t) * HV + hv, tvj = tv * uint(V) + j;
            const float alpha = sa[m], beta = sb[m];
            const float doj = act ? do_in[tvj] : 0.0;
            // Sp = alpha S_{t-1};  e = v - Sp^T k
            float kS = 0.0;
            for (int i = 0; i < K; i++) kS += scr[p0 + uint(i) * WG] * sk[kb + i];
            const float e = (act ? v_in[tvj] : 0.0) - alpha * kS;
            // o = S_t^T (scale q): dq += scale S_t do;  dS += scale q do^T
            float kdS = 0.0;
            for (int i = 0; i < K; i++) {
                float St = alpha * scr[p0 + uint(i) * WG] + beta * sk[kb + i] * e;
                red[uint(i) * RS + jl] = scale * St * doj;
                dS[i] += scale * sq[kb + i] * doj;
                kdS += sk[kb + i] * dS[i];
            }
            reduce_rows((tv * nvb + vb) * uint(K), false);
            // S_t = Sp + beta k e^T: dbeta = e . (dS^T k); dk += beta dS e; de = beta dS^T k
            const float de = beta * kdS;
            if (act) dv_out[tvj] = de;
            // e = v - Sp^T k: dSp = dS - k de^T; dk -= Sp de;  Sp = alpha S: dg = <Sp, dSp>
            float dg = 0.0;
            for (int i = 0; i < K; i++) {
                float Sp = alpha * scr[p0 + uint(i) * WG];
                red[uint(i) * RS + jl] = beta * dS[i] * e - Sp * de;
                float dSp = dS[i] - sk[kb + i] * de;
                dg += Sp * dSp;
                dS[i] = alpha * dSp;
            }
            red2[jl] = e * kdS;
            red2[WG + jl] = dg;
            reduce_rows((tv * nvb + vb) * uint(K), true);
            if (jl == 0) {
                float s0 = 0.0, s1 = 0.0;
                for (uint c = 0; c < WG; c++) {
                    s0 += red2[c];
                    s1 += red2[WG + c];
                }
                dsc_part[(tv * nvb + vb) * 2] = s0;
                dsc_part[(tv * nvb + vb) * 2 + 1] = s1;
            }
        }
    }
}
