/* bench.h: `kla bench`, throughput of forward, backward and decode (tools/bench.c). */
#ifndef KLA_BENCH_H
#define KLA_BENCH_H

/* argv[0] is "bench"; returns the process exit status (0, 1 on failure, 2 on usage). */
int kla_bench_main(int argc, char **argv);

#endif
