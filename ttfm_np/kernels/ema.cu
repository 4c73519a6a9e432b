// Fused EMA of parameters (kernel ema_update): one grid-stride pass
//   e <- decay e + (1 - decay) p
// The CUDA version of optim.py's ema_update NumPy path; compile with -DSCALAR=float|double.
// one_minus_decay = 1 - decay is computed on the host in double precision and rounded to
// SCALAR, as the NumPy path does (1 - decay rounded in float32 would differ in the last bits).
// Each product and the sum are rounded on their own (__fmul_rn/__fadd_rn are never fused into
// an FMA), as the NumPy path computes them, so both agree to the last bit (up to CuPy's -ftz=true).
#ifndef SCALAR
#define SCALAR float
#endif

__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double add(double a, double b) { return __dadd_rn(a, b); }

extern "C" __global__ void ema_update(SCALAR* __restrict__ e, const SCALAR* __restrict__ p,
                                      long long n, SCALAR decay, SCALAR one_minus_decay)
{
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x)
        e[i] = add(mul(decay, e[i]), mul(one_minus_decay, p[i]));
}
