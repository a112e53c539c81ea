// common.glsl: bindings and push constants shared by every KLA compute shader.
// One descriptor-set layout serves all pipelines, so binding numbers are global.
// restrict: no two bindings a shader writes through overlap (decode binds the state as
// both h0 and ht, but each invocation reads its part once before writing it).
#extension GL_GOOGLE_include_directive : require

layout(push_constant) uniform PC {
    int N, H, HV, total;   // sequences, key heads, value heads, tokens
    int grp, nvb, mode, flags; // HV/H, V blocks per head, 0 = kla / 1 = gdn, F_* bits
    float scale, eps;
    int nchunk, pad;       // chunks (segments) in all sequences
    // The window of a sequential pass: tokens (rec_fwd, rec_dstate; counted from each
    // sequence's start), chunks (chunk_state, chunk_dstate; likewise) or segments
    // (rec_bwd; global) [w0, w1). The host splits a long pass into several dispatches on
    // devices that cap the loop iterations of an invocation (llvmpipe: 65535); the state
    // is carried between them in ht (forward passes) or dh0 (state-gradient passes).
    int w0, w1;
} pc;

#define F_G 1       // g present
#define F_H0 2      // h0 present
#define F_HT 4      // write ht
#define F_L2Q 8
#define F_L2K 16
#define F_DHT 32    // dht present
#define F_DH0 64    // write dh0
#define F_DG 128    // write dg
#define F_CKPT 256  // forward: save checkpoints
#define F_TM 512    // chunk_prep: store Tm = (I + A)^-1 of each chunk in scr (chunkwise backward)
#define F_DVI 1024  // chunk_out: also P^T do into ckpt (chunkwise backward)

layout(std430, binding = 0) restrict readonly buffer Bq { float q_in[]; };
layout(std430, binding = 1) restrict readonly buffer Bk { float k_in[]; };
layout(std430, binding = 2) restrict readonly buffer Bv { float v_in[]; };
layout(std430, binding = 3) restrict readonly buffer Bg { float g_in[]; };
layout(std430, binding = 4) restrict readonly buffer Ba { float a_in[]; };
layout(std430, binding = 5) restrict readonly buffer Bh0 { float h0_in[]; };
// offs[0..N] = cu_seqlens, offs[N+1+n] = first checkpoint slot (or chunk) of sequence n,
// chunk kernels: offs[2N+2+2c], offs[2N+3+2c] = first and end token of chunk c
layout(std430, binding = 6) restrict readonly buffer Boffs { int offs[]; };
layout(std430, binding = 7) restrict buffer Bo { float o_out[]; };
layout(std430, binding = 8) restrict buffer Bht { float ht_out[]; };
layout(std430, binding = 9) restrict buffer Bqh { float qhat[]; };
layout(std430, binding = 10) restrict buffer Bkh { float khat[]; };
layout(std430, binding = 11) restrict buffer Bnrm { float nrm[]; };   // [3][total*H]: rq, rk, nk
layout(std430, binding = 12) restrict buffer Bbeta { float beta_buf[]; }; // [total*HV]
layout(std430, binding = 13) restrict buffer Bckpt { float ckpt[]; };
layout(std430, binding = 14) restrict readonly buffer Bdo { float do_in[]; };
layout(std430, binding = 15) restrict readonly buffer Bdht { float dht_in[]; };
layout(std430, binding = 16) restrict buffer Bscr { float scr[]; };
layout(std430, binding = 17) restrict buffer Bdqp { float dq_part[]; };
layout(std430, binding = 18) restrict buffer Bdkp { float dk_part[]; };
layout(std430, binding = 19) restrict buffer Bdsp { float dsc_part[]; }; // [total*HV*nvb][2]: dbeta, dg
layout(std430, binding = 20) restrict buffer Bdv { float dv_out[]; };
layout(std430, binding = 21) restrict buffer Bdq { float dq_out[]; };
layout(std430, binding = 22) restrict buffer Bdk { float dk_out[]; };
layout(std430, binding = 23) restrict buffer Bdg { float dg_out[]; };
layout(std430, binding = 24) restrict buffer Bda { float da_out[]; };
layout(std430, binding = 25) restrict buffer Bdh0 { float dh0_out[]; };
// chunkwise forward: w [total, HV, K], u and vnew [total, HV, V], the state entering each
// chunk [nchunk, HV, K, V], chunk-local cumulative log decay G [total, HV]
layout(std430, binding = 26) restrict buffer Bw { float w_buf[]; };
layout(std430, binding = 27) restrict buffer Bu { float u_buf[]; };
layout(std430, binding = 28) restrict buffer Bvn { float vnew_buf[]; };
layout(std430, binding = 29) restrict buffer Bhs { float hs_buf[]; };
layout(std430, binding = 30) restrict buffer BG { float G_buf[]; };
// backward: dS with respect to the state after each segment's last token [nseg, HV, K, V]
// (chunkwise backward: after each chunk's last token). The chunkwise backward reuses
// bindings the recurrent one leaves idle (the device may allow only 32): scr holds Tm
// [nchunk, HV, C, C], ckpt holds dvnew [total, HV, V] then vt = v - gamma S0^T k
// [total, HV, V], u_buf is overwritten by du2 = Tm^T dvnew; dq_part, dk_part, dsc_part
// have one V block (nvb = 1).
layout(std430, binding = 31) restrict buffer Bdck { float dck[]; };

// Large 1-D grids are folded into x and y (maxComputeWorkGroupCount[0] may be 65535).
uint flat_group() { return gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x; }
