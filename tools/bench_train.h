/* bench_train.h: `kla bench --op train` (tools/bench_train.c). */
#ifndef KLA_BENCH_TRAIN_H
#define KLA_BENCH_TRAIN_H

#include "kla.h"

/* Times reps training steps of the model c at B x T on ctx and prints the figures (JSON
 * with json); scaling also times one step at T/2, 2T and B/2, 2B. Returns the exit status. */
int bench_train(KlaContext *ctx, const KlaModelConfig *c, int64_t B, int64_t T, int reps, int json, int scaling);

#endif
