/*
 * cpu.c: runtime CPU feature detection. On x86-64 AVX levels count only when the OS
 * saves the wider registers (OSXSAVE and XGETBV), not merely when cpuid lists them.
 */
#include "kla_internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>

static unsigned long long xgetbv0(void)
{
    unsigned eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return ((unsigned long long)edx << 32) | eax;
}

unsigned kla_cpu_flags(void)
{
    unsigned a, b, c, d, flags = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    const int fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1;
    if (!osxsave || !avx) return 0;
    const unsigned long long xcr0 = xgetbv0();
    const int ymm_os = (xcr0 & 0x6) == 0x6;     /* SSE and AVX state */
    const int zmm_os = (xcr0 & 0xe6) == 0xe6;   /* plus opmask and ZMM state */
    if (__get_cpuid_max(0, NULL) < 7) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    const int avx2 = (b >> 5) & 1, avx512f = (b >> 16) & 1;
    if (ymm_os && avx2 && fma) flags |= KLA_CPU_AVX2;
    if (zmm_os && avx512f && (flags & KLA_CPU_AVX2)) flags |= KLA_CPU_AVX512;
    return flags;
}
#elif defined(__aarch64__)
unsigned kla_cpu_flags(void) { return KLA_CPU_NEON; } /* Advanced SIMD is mandatory */
#else
unsigned kla_cpu_flags(void) { return 0; }
#endif
