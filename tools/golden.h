/*
 * golden.h: `kla golden generate DIR` and `kla golden check` (docs/golden.md).
 */
#ifndef KLA_TOOLS_GOLDEN_H
#define KLA_TOOLS_GOLDEN_H

/* argv[0] is "golden"; argv[1] the subcommand. Returns the exit code (0, 1, or 2 for a
 * usage error). */
int golden_main(int argc, char **argv);

#endif
