/* tap.h: the TAP line of the C tests: check(ok, fmt, ...) prints "ok N - ..." or
 * "not ok N - ...", counting into n_test and n_fail for the plan and summary at the end. */
#ifndef KLA_TESTS_TAP_H
#define KLA_TESTS_TAP_H
#include <stdarg.h>
#include <stdio.h>

static int n_test, n_fail;

static void check(int ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void check(int ok, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    printf("%s %d - ", ok ? "ok" : "not ok", ++n_test);
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    if (!ok) n_fail++;
    fflush(stdout);
}
#endif
