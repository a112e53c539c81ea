/*
 * train.h: the training-step commands (kla-spec.md 8.3): `kla layer backward`, `kla model
 * step` (tools/train.c) and `kla train` (tools/mqar.c), and the parameter-file helpers
 * they share.
 */
#ifndef KLA_TOOLS_TRAIN_H
#define KLA_TOOLS_TRAIN_H

#include "kla.h"
#include "safetensors.h"

/* argv[0] is "layer" / "model" / "train"; returns the exit status (0, 1, 2 usage). */
int layer_main(int argc, char **argv);
int model_main(int argc, char **argv);
int train_main(int argc, char **argv);

/* The model's configuration from a file's parameter shapes, checked against its
 * __metadata__ keys where present (vocab d_model n_layer n_head d_k d_v d_ff norm_eps
 * mixer). layer: one mixer's attn.* names. Returns 0 or -1 with a message on stderr. */
int train_config_from_file(const char *path, const KlaFile *f, int layer, KlaModelConfig *c);

/* Sets every parameter of m from the file's tensors of the same names (all required; a
 * name that is neither a parameter nor in `allowed` is an error with a hint). */
int train_params_from_file(const char *path, const KlaFile *f, KlaModel *m, KlaContext *ctx,
                           const char *const *allowed);

/* Adds tensor `name` (copied name) of the given shape and dtype to an output list; data
 * allocated zeroed. NULL on failure (message printed). */
typedef struct OutList {
    st_tensor *t;
    int n, cap;
} OutList;
void *outlist_add(OutList *o, const char *name, st_dtype dt, int ndim, const int64_t *shape);
void outlist_free(OutList *o);

/* The parameters (or gradients, moments) of m into o under prefix + name, in m's dtype dt. */
int outlist_add_params(OutList *o, KlaModel *m, KlaModelPart part, const char *prefix, st_dtype dt);

/* The metadata of a model's configuration, "key=value" pairs into keys/vals (static
 * strings in buf); returns the count. */
int config_meta(const KlaModelConfig *c, int layer, const char **keys, const char **vals, char buf[][32]);

#endif
