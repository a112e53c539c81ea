/*
 * half.h: 16-bit reals (half.c), for the library and its own tools: exact widening,
 * narrowing rounded once to nearest even, element access to a real tensor of any dtype.
 */
#ifndef KLA_HALF_H
#define KLA_HALF_H

#include <stdint.h>

#include "kla.h"

float kla__f16_to_f32(uint16_t h);
float kla__bf16_to_f32(uint16_t h);
uint16_t kla__f64_to_f16(double x);
uint16_t kla__f64_to_bf16(double x);
/* element i of a real tensor of dtype d (F32, F64, F16, BF16), as a double; and back */
double kla__get_real(const void *p, KlaDtype d, int64_t i);
void kla__put_real(void *p, KlaDtype d, int64_t i, double x);

#endif
