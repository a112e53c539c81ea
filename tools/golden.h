/*
 * golden.h: `kla golden generate DIR` and `kla golden check` (docs/golden.md).
 */
#ifndef KLA_TOOLS_GOLDEN_H
#define KLA_TOOLS_GOLDEN_H

#include <stddef.h>

/* argv[0] is "golden"; argv[1] the subcommand. Returns the exit code (0, 1, or 2 for a
 * usage error). */
int golden_main(int argc, char **argv);

/* The smallest of 1, 2, 5 times a power of ten that is >= x (x <= 10): tolerances. */
double golden_up125(double x);
/* The shortest decimal that reads back as x. */
void golden_fmt_num(char *buf, size_t n, double x);

#endif
