// reduce.glsl: workgroup sum. With USE_SUBGROUP (device reports subgroup arithmetic)
// each subgroup reduces in registers first; else a shared-memory tree.
#if USE_SUBGROUP
#extension GL_KHR_shader_subgroup_arithmetic : require
shared float red_s[64]; // one per subgroup: subgroups have >= 4 lanes, WG <= 256
float wg_sum(float x)
{
    float s = subgroupAdd(x);
    barrier();
    if (subgroupElect()) red_s[gl_SubgroupID] = s;
    barrier();
    float r = 0.0;
    for (uint i = 0; i < gl_NumSubgroups; i++) r += red_s[i];
    return r;
}
#else
shared float red_s[WG];
float wg_sum(float x)
{
    uint l = gl_LocalInvocationID.x;
    barrier();
    red_s[l] = x;
    barrier();
    for (uint s = WG / 2; s > 0; s >>= 1) { // WG is a power of two
        if (l < s) red_s[l] += red_s[l + s];
        barrier();
    }
    return red_s[0];
}
#endif
