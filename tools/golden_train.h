/*
 * golden_train.h: golden cases of the layer and the training step (tools/golden_train.c),
 * generated and checked by `kla golden` beside the operator's (tools/golden.c).
 */
#ifndef KLA_TOOLS_GOLDEN_TRAIN_H
#define KLA_TOOLS_GOLDEN_TRAIN_H

#include "kla.h"

/* The number of layer and model-step cases, and case i's name. */
int gtrain_count(void);
const char *gtrain_name(int i);

/* Writes DIR/NAME.safetensors and its MANIFEST entry (a JSON object, indented for the
 * "cases" list, no trailing comma) into *json (malloc'd). 0 or -1 with a message. */
int gtrain_generate(int i, const char *dir, KlaContext *c64, KlaContext *c32, char **json);

/* 1 if the file is a layer or model case (metadata kind). */
int gtrain_is_case(const KlaFile *f);

/* Runs ctx's backend on a layer or model case and compares every expected tensor with
 * the case's float32 tolerances, printing a line each; adds to *pass / *fail. */
void gtrain_check(KlaContext *ctx, const KlaFile *f, const char *cname, int *pass, int *fail);

#endif
