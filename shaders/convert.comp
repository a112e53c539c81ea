#version 450
// convert: a 16-bit tensor (IEEE binary16 or bfloat16, two per 32-bit word) to float32,
// or float32 to 16 bits rounded to nearest even, in integer arithmetic (exact widening;
// the same rounding as the host's src/half.c, so a 16-bit output is the float32 output
// rounded, bit for bit). One invocation per 32-bit word of the 16-bit side: with an odd
// count the last word's upper half is read and written back unchanged.
// Its own descriptor set (binding 0: 16-bit words, binding 1: float32) and push
// constants, not common.glsl's. The float32 side is read and written as uint bits: Vulkan
// leaves float32 subnormal handling to the implementation (NVIDIA's flushes them to zero
// in arithmetic), bf16 has float32's exponent range so its subnormals are float32
// subnormals, and moving bits keeps them whatever the device does with floats.
layout(local_size_x = 64) in;
layout(std430, binding = 0) restrict buffer B16 { uint w16[]; };
layout(std430, binding = 1) restrict buffer B32 { uint f32[]; }; // float32 bits
layout(push_constant) uniform PC {
    uint n;    // elements
    uint mode; // 0: f16 -> f32, 1: bf16 -> f32, 2: f32 -> f16, 3: f32 -> bf16
} pc;

uint f16_to_f32(uint h) // float32 bits
{
    const uint s = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0u) { // zero, subnormal: m 2^-24, a normal float32 (or zero), exact
        if (m == 0u) return s;
        const int p = findMSB(m); // m = 2^p (1 + f), value 2^(p-24) (1 + f)
        return s | (uint(p + 103) << 23) | (((m << (23 - p)) & 0x7fffffu));
    }
    if (e == 31u) return s | 0x7f800000u | (m << 13); // Inf, NaN
    return s | ((e + 112u) << 23) | (m << 13);
}

uint f32_to_f16(uint x) // from float32 bits
{
    const uint sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return sign | 0x7e00u;  // NaN
    if (ax >= 0x477ff000u) return sign | 0x7c00u; // >= 65520 (Inf included): Inf
    if (ax < 0x38800000u) {                       // below 2^-14: subnormal or zero
        if (ax <= 0x33000000u) return sign;       // <= 2^-25: 0 (2^-25, a tie, to even 0)
        const uint e = ax >> 23, mm = (ax & 0x7fffffu) | 0x800000u, sh = 126u - e; // units of 2^-24
        uint q = mm >> sh;
        const uint rem = mm & ((1u << sh) - 1u), hw = 1u << (sh - 1u);
        if (rem > hw || (rem == hw && (q & 1u) != 0u)) q++;
        return sign | q;
    }
    const uint r = ax - 0x38000000u; // exponent rebiased 127 -> 15
    uint q = r >> 13;
    const uint rem = r & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (q & 1u) != 0u)) q++; // a carry moves into the exponent
    return sign | q;
}

uint f32_to_bf16(uint x) // from float32 bits
{
    if ((x & 0x7fffffffu) > 0x7f800000u) return (x >> 16) | 0x40u; // NaN stays NaN
    return (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
}

void main()
{
    const uint w = (gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x) * 64u + gl_LocalInvocationID.x;
    const uint i = 2u * w;
    if (i >= pc.n) return;
    const bool two = i + 1u < pc.n;
    if (pc.mode < 2u) {
        const uint v = w16[w];
        const bool bf = pc.mode == 1u;
        f32[i] = bf ? v << 16 : f16_to_f32(v & 0xffffu);
        if (two) f32[i + 1u] = bf ? v & 0xffff0000u : f16_to_f32(v >> 16);
    } else {
        const bool bf = pc.mode == 3u;
        const uint lo = bf ? f32_to_bf16(f32[i]) : f32_to_f16(f32[i]);
        const uint hi = two ? (bf ? f32_to_bf16(f32[i + 1u]) : f32_to_f16(f32[i + 1u])) : (w16[w] >> 16);
        w16[w] = lo | (hi << 16);
    }
}
