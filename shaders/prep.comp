#version 450
// prep: per (token, key head) row: qhat, khat (optionally l2-normalised), their norms,
// nk = ||khat||^2 + eps, and the step size beta of every value head reading this key head.
layout(local_size_x_id = 0) in;
layout(constant_id = 0) const uint WG = 64;
layout(constant_id = 1) const int K = 128;
#include "common.glsl"
#include "reduce.glsl"

void main()
{
    const uint row = flat_group(); // t * H + h
    if (row >= uint(pc.total * pc.H)) return; // uniform per workgroup
    const uint l = gl_LocalInvocationID.x, TH = uint(pc.total * pc.H);
    const uint base = row * uint(K);
    float sq = 0.0, sk = 0.0;
    for (uint i = l; i < uint(K); i += WG) {
        float a = q_in[base + i], b = k_in[base + i];
        sq += a * a;
        sk += b * b;
    }
    sq = wg_sum(sq);
    sk = wg_sum(sk);
    const float rq = (pc.flags & F_L2Q) != 0 ? sqrt(sq + 1e-6) : 1.0;
    const float rk = (pc.flags & F_L2K) != 0 ? sqrt(sk + 1e-6) : 1.0;
    for (uint i = l; i < uint(K); i += WG) {
        qhat[base + i] = q_in[base + i] / rq;
        khat[base + i] = k_in[base + i] / rk;
    }
    // ||khat||^2 = ||k||^2 / rk^2, as the reference computes it from khat (rounding aside)
    const float nk = sk / (rk * rk) + pc.eps;
    if (l == 0) {
        nrm[row] = rq;
        nrm[TH + row] = rk;
        nrm[2 * TH + row] = nk;
        const uint t = row / uint(pc.H), h = row % uint(pc.H);
        for (uint c = 0; c < uint(pc.grp); c++) {
            uint tv = t * uint(pc.HV) + h * uint(pc.grp) + c;
            beta_buf[tv] = pc.mode == 0 ? a_in[tv] / nk : a_in[tv];
        }
    }
}
