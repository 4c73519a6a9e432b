#!/bin/bash
# Run one benchmark command at both CPU SIMD levels, one after the other:
#   1. native (AVX-512 where the CPU has it: NumPy's X86_V4 / AVX512_ICL loops, torch's AVX512 kernels);
#   2. AVX2 only, emulated on an AVX-512 CPU (skipped on a CPU without AVX-512, where 1 already is AVX2):
#        NPY_DISABLE_CPU_FEATURES  NumPy 2.x ufunc dispatch without the AVX-512 groups
#        OPENBLAS_CORETYPE=Haswell OpenBLAS's AVX2 kernels (ttfm_np/blas.py already picks them on AMD)
#        ATEN_CPU_CAPABILITY=avx2  PyTorch's ATen kernels
#        ONEDNN_MAX_CPU_ISA=AVX2   PyTorch's oneDNN convolutions and GEMMs
# docs/benchmarks.md quotes both levels for every table.
#
#   bash benchmarks/simd_levels.sh python benchmarks/unet_step.py --against torch --threads 1 --rounds 3
set -euo pipefail
if [ $# -eq 0 ]; then
    echo "usage: bash benchmarks/simd_levels.sh COMMAND [ARGS...]" >&2
    exit 2
fi
echo "== level: native ($(grep -q avx512f /proc/cpuinfo && echo AVX-512 || echo 'no AVX-512'))  load: $(cut -d' ' -f1-3 /proc/loadavg)"
"$@"
if grep -q avx512f /proc/cpuinfo; then
    echo "== level: AVX2 (emulated)  load: $(cut -d' ' -f1-3 /proc/loadavg)"
    NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512_ICL AVX512_SPR" OPENBLAS_CORETYPE=Haswell \
        ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 "$@"
else
    echo "== level: AVX2 is the native level of this CPU (no AVX-512): nothing to emulate"
fi
