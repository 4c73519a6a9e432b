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
//
// Rounding: every product and sum is rounded on its own (mul/add/sub below are the _rn
// intrinsics, which the compiler never contracts into a fused multiply-add). Left to itself
// nvcc/NVRTC turns g + l2 * p into one FMA (one rounding), while NumPy rounds twice, and the
// two paths drifted apart by 3e-5 relative after a few steps. With explicit rounding the
// kernel does the NumPy path's operations in the NumPy path's order: the results agree to the
// last bit, except that CuPy compiles with -ftz=true, so float32 subnormals (|x| < 1.2e-38)
// become 0 here and not in NumPy.
#ifndef SCALAR
#define SCALAR float
#endif

__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double sub(double a, double b) { return __dsub_rn(a, b); }

extern "C" __global__ void adam_update(SCALAR* __restrict__ p, const SCALAR* __restrict__ g,
                                       SCALAR* __restrict__ m, SCALAR* __restrict__ v, long long n,
                                       SCALAR one_minus_b1, SCALAR b2, SCALAR one_minus_b2, SCALAR eps,
                                       SCALAR step_size, SCALAR bc2_sqrt, SCALAR decay, SCALAR l2)
{
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        SCALAR pi = p[i];
        SCALAR gi = add(g[i], mul(l2, pi));                  // g + wd p (L2 mode; l2 = 0 otherwise)
        SCALAR mi = m[i];
        mi = add(mi, mul(one_minus_b1, sub(gi, mi)));        // m = b1 m + (1 - b1) g
        SCALAR vi = add(mul(b2, v[i]), mul(one_minus_b2, mul(gi, gi)));   // v = b2 v + (1 - b2) g^2
        SCALAR denom = add(sqrt(vi) / bc2_sqrt, eps);        // sqrt(v_hat) + eps, v_hat = v / bc2
        m[i] = mi;
        v[i] = vi;
        p[i] = sub(mul(decay, pi), mul(step_size, mi / denom));   // p (1 - lr wd) - lr m_hat / denom
    }
}
