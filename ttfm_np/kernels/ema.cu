// Fused EMA of parameters (kernel ema_update): one grid-stride pass
//   e <- decay e + (1 - decay) p
// The CUDA version of optim.py's ema_update NumPy path; compile with -DSCALAR=float|double.
// one_minus_decay = 1 - decay is computed on the host in double precision and rounded to
// SCALAR, as the NumPy path does (1 - decay rounded in float32 would differ in the last bits).
#ifndef SCALAR
#define SCALAR float
#endif

extern "C" __global__ void ema_update(SCALAR* __restrict__ e, const SCALAR* __restrict__ p,
                                      long long n, SCALAR decay, SCALAR one_minus_decay)
{
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x)
        e[i] = decay * e[i] + one_minus_decay * p[i];
}
