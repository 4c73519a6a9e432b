// Fused Adam update (kernel adam_update): one grid-stride pass over a flat tensor that
// reads p, g, m, v once and writes p, m, v once. The CUDA version of optim.py's
// _adam_update_arrays; compile with -DSCALAR=float or -DSCALAR=double.
//
// The scalars are computed once on the host in double precision (optim._coefficients)
// and rounded to SCALAR, the same values the NumPy path uses:
//   one_minus_b1 = 1 - b1, one_minus_b2 = 1 - b2,
//   step_size = lr / bc1, bc2_sqrt = sqrt(bc2)    (bias corrections bc1 = 1 - b1^k, bc2 = 1 - b2^k)
//   decay = 1 - lr wd   (decoupled weight decay, AdamW; 1 otherwise)
//   l2 = wd             (weight decay added to the gradient, torch.optim.Adam; 0 otherwise)
// Per element:
//   g <- g + l2 p
//   p <- decay p
//   m <- m + (1 - b1)(g - m)                  (= b1 m + (1 - b1) g)
//   v <- b2 v + (1 - b2) g^2
//   p <- p - step_size m / (sqrt(v) / bc2_sqrt + eps)
#ifndef SCALAR
#define SCALAR float
#endif

extern "C" __global__ void adam_update(SCALAR* __restrict__ p, const SCALAR* __restrict__ g,
                                       SCALAR* __restrict__ m, SCALAR* __restrict__ v, long long n,
                                       SCALAR one_minus_b1, SCALAR b2, SCALAR one_minus_b2, SCALAR eps,
                                       SCALAR step_size, SCALAR bc2_sqrt, SCALAR decay, SCALAR l2)
{
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        SCALAR pi = p[i];
        SCALAR gi = g[i] + l2 * pi;                          // g + wd p (L2 mode; l2 = 0 otherwise)
        SCALAR mi = m[i];
        mi = mi + one_minus_b1 * (gi - mi);                  // m = b1 m + (1 - b1) g
        SCALAR vi = b2 * v[i] + one_minus_b2 * (gi * gi);    // v = b2 v + (1 - b2) g^2
        SCALAR denom = sqrt(vi) / bc2_sqrt + eps;            // sqrt(v_hat) + eps, v_hat = v / bc2
        m[i] = mi;
        v[i] = vi;
        p[i] = decay * pi - step_size * (mi / denom);        // p (1 - lr wd) - lr m_hat / denom
    }
}
