#!/bin/sh
# tests/neon.sh: cross-build libkla for aarch64 (NEON level of the simd backend) into
# build-aarch64 and run the reference tests (operator and training step) and checkkla under qemu-aarch64, printing
# their TAP. Needs gcc-aarch64-linux-gnu, libc6-dev-arm64-cross and qemu-user.
# Usage: sh tests/neon.sh [checkkla options, e.g. --seed N]. Exit status: 0 when all pass.
set -u
cd "$(dirname "$0")/.." || exit 2
BUILD=${BUILD_AARCH64:-build-aarch64}
QEMU="qemu-aarch64 -L /usr/aarch64-linux-gnu"
for tool in aarch64-linux-gnu-gcc qemu-aarch64 meson ninja; do
    command -v "$tool" >/dev/null 2>&1 || { echo "1..0 # SKIP $tool not installed"; exit 0; }
done

# OpenMP only when the cross toolchain links it (libgomp for arm64 is in the gcc cross package)
omp=disabled
if printf 'int main(void){return 0;}\n' | aarch64-linux-gnu-gcc -fopenmp -x c - -o /tmp/kla-omp-$$ 2>/dev/null; then
    omp=enabled
fi
rm -f /tmp/kla-omp-$$

if [ ! -f "$BUILD/build.ninja" ]; then
    meson setup "$BUILD" --cross-file tests/cross/aarch64-linux-gnu.txt -Dopenblas=disabled \
        -Dvulkan=disabled -Dsimd=enabled -Dopenmp=$omp >"${TMPDIR:-/tmp}/kla-neon-setup.$$" 2>&1 ||
        { cat "${TMPDIR:-/tmp}/kla-neon-setup.$$"; echo "Bail out! meson setup failed"; exit 1; }
fi
ninja -C "$BUILD" tests/test_ref tests/test_model tests/test_family tests/checkkla >/dev/null || { echo "Bail out! build failed"; exit 1; }

status=0
echo "# test_ref (aarch64, qemu)"
$QEMU "$BUILD/tests/test_ref" || status=1
echo "# test_model (aarch64, qemu): the training step's reference"
$QEMU "$BUILD/tests/test_model" || status=1
echo "# test_family (aarch64, qemu): the delta-rule family's reference"
$QEMU "$BUILD/tests/test_family" || status=1
echo "# checkkla (aarch64, qemu): levels c and neon"
$QEMU "$BUILD/tests/checkkla" "$@" || status=1
exit $status
