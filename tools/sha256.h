/* sha256.h: SHA-256 (FIPS 180-4), for the MANIFEST of `kla golden`. */
#ifndef KLA_TOOLS_SHA256_H
#define KLA_TOOLS_SHA256_H

#include <stddef.h>
#include <stdint.h>

typedef struct Sha256 {
    uint32_t h[8];
    uint64_t len;      /* bytes hashed so far */
    unsigned char buf[64];
    size_t nbuf;
} Sha256;

void sha256_init(Sha256 *s);
void sha256_update(Sha256 *s, const void *data, size_t n);
/* Writes 64 lowercase hex digits and a NUL to hex. */
void sha256_final_hex(Sha256 *s, char hex[65]);

/* Hash of a whole file as hex; 0, or -1 if it cannot be read. */
int sha256_file_hex(const char *path, char hex[65]);

#endif
