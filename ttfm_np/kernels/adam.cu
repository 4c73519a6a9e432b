// Fused Adam update: one thread per element reads p, g, m, v once and writes p, m, v.
// The CUDA version of optim.py's _adam_update_numpy. -DSCALAR=float|double.
//   m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
//   p = p - lr wd p;         p = p - lr (m / bc1) / (sqrt(v / bc2) + eps)
#ifndef SCALAR
#define SCALAR float
#endif

extern "C" __global__ void adam_update(SCALAR* __restrict__ p, const SCALAR* __restrict__ g,
                                       SCALAR* __restrict__ m, SCALAR* __restrict__ v, long long n,
                                       SCALAR lr, SCALAR b1, SCALAR b2, SCALAR eps, SCALAR wd,
                                       SCALAR bc1, SCALAR bc2)
{
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        SCALAR gi = g[i];
        SCALAR mi = b1 * m[i] + ((SCALAR)1 - b1) * gi;
        SCALAR vi = b2 * v[i] + ((SCALAR)1 - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        SCALAR pi = p[i] * ((SCALAR)1 - lr * wd);
        p[i] = pi - (lr / bc1) * mi / (sqrt(vi / bc2) + eps);
    }
}
