// Fused EMA of parameters: e = decay e + (1 - decay) p, one pass.
// The CUDA version of optim.py's ema_update NumPy path. -DSCALAR=float|double.
#ifndef SCALAR
#define SCALAR float
#endif

extern "C" __global__ void ema_update(SCALAR* __restrict__ e, const SCALAR* __restrict__ p,
                                      long long n, SCALAR decay)
{
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x)
        e[i] = decay * e[i] + ((SCALAR)1 - decay) * p[i];
}
