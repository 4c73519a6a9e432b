// GroupNorm, optionally fused with SiLU: the CUDA versions of groupnorm.py's
// NumPy path. Compiled once per dtype with -DSCALAR=float|double.
//
//   x (N, C, HW) viewed as N*G groups of cpg = C/G channels each.
//   mu, rstd per (n, g):   xhat = (x - mu) * rstd,  rstd = 1 / sqrt(var + eps)
//   z = gamma[c] * xhat + beta[c];   y = silu(z) = z * sigmoid(z)   (or y = z)
//
// One thread block per (n, g) of BLOCK threads. BLOCK (a power of 2) is given at compile time by
// groupnorm.py (-DBLOCK=..., the same constant it launches with), so the two cannot disagree.
#ifndef SCALAR
#define SCALAR float
#endif
#ifndef BLOCK
#error "compile with -DBLOCK=<threads per block> (groupnorm.py passes its _BLOCK through cuda.get_kernel)"
#endif

// Sum of v over the block; every thread gets the result.
__device__ SCALAR block_sum(SCALAR v, SCALAR* shm)
{
    int t = threadIdx.x;
    shm[t] = v;
    __syncthreads();
    for (int s = BLOCK / 2; s > 0; s >>= 1) {
        if (t < s) shm[t] += shm[t + s];
        __syncthreads();
    }
    SCALAR r = shm[0];
    __syncthreads();             // shm is reused by the next call
    return r;
}

__device__ SCALAR sigmoid_of(SCALAR z) { return (SCALAR)1 / ((SCALAR)1 + exp(-z)); }

extern "C" __global__ void groupnorm_fwd(const SCALAR* __restrict__ x, const SCALAR* __restrict__ gamma,
                                         const SCALAR* __restrict__ beta, SCALAR* __restrict__ y,
                                         SCALAR* __restrict__ mean_out, SCALAR* __restrict__ rstd_out,
                                         int C, int HW, int G, SCALAR eps, int apply_silu)
{
    __shared__ SCALAR shm[BLOCK];
    int ng = blockIdx.x, n = ng / G, g = ng % G, cpg = C / G;
    long long base = ((long long)n * C + (long long)g * cpg) * HW;
    int count = cpg * HW;
    // two passes (mean, then centred variance): exact enough in float32, unlike E[x^2] - E[x]^2
    SCALAR s = 0;
    for (int k = threadIdx.x; k < count; k += BLOCK) s += x[base + k];
    SCALAR mu = block_sum(s, shm) / count;
    SCALAR s2 = 0;
    for (int k = threadIdx.x; k < count; k += BLOCK) { SCALAR d = x[base + k] - mu; s2 += d * d; }
    SCALAR rstd = (SCALAR)1 / sqrt(block_sum(s2, shm) / count + eps);
    if (threadIdx.x == 0) { mean_out[ng] = mu; rstd_out[ng] = rstd; }
    for (int k = threadIdx.x; k < count; k += BLOCK) {
        int c = g * cpg + k / HW;
        SCALAR z = (x[base + k] - mu) * rstd * gamma[c] + beta[c];
        y[base + k] = apply_silu ? z * sigmoid_of(z) : z;
    }
}

// Backward. With dz = dy * silu'(z) (or dz = dy) and dxhat = gamma * dz:
//   dx        = rstd * (dxhat - mean_g(dxhat) - xhat * mean_g(dxhat * xhat))
//   dgamma[c] = sum_{n,hw} dz * xhat,  dbeta[c] = sum_{n,hw} dz
// The per-(n, c) partial sums go to dgamma_part/dbeta_part (N, C); the caller sums over n.
extern "C" __global__ void groupnorm_bwd(const SCALAR* __restrict__ dy, const SCALAR* __restrict__ x,
                                         const SCALAR* __restrict__ gamma, const SCALAR* __restrict__ beta,
                                         const SCALAR* __restrict__ mean, const SCALAR* __restrict__ rstd,
                                         SCALAR* __restrict__ dx, SCALAR* __restrict__ dgamma_part,
                                         SCALAR* __restrict__ dbeta_part, int C, int HW, int G, int apply_silu)
{
    __shared__ SCALAR shm[BLOCK];
    int ng = blockIdx.x, n = ng / G, g = ng % G, cpg = C / G;
    long long base = ((long long)n * C + (long long)g * cpg) * HW;
    int count = cpg * HW;
    SCALAR mu = mean[ng], r = rstd[ng];
    SCALAR sum_dxhat = 0, sum_dxhat_xhat = 0;
    for (int ci = 0; ci < cpg; ++ci) {
        int c = g * cpg + ci;
        SCALAR a = 0, b = 0;
        for (int k = threadIdx.x; k < HW; k += BLOCK) {
            long long idx = base + (long long)ci * HW + k;
            SCALAR xhat = (x[idx] - mu) * r;
            SCALAR dz = dy[idx];
            if (apply_silu) {          // y = z * s(z)  =>  dy/dz = s (1 + z (1 - s))
                SCALAR z = xhat * gamma[c] + beta[c];
                SCALAR sg = sigmoid_of(z);
                dz *= sg * ((SCALAR)1 + z * ((SCALAR)1 - sg));
            }
            a += dz * xhat;
            b += dz;
        }
        a = block_sum(a, shm);
        b = block_sum(b, shm);
        if (threadIdx.x == 0) { dgamma_part[(long long)n * C + c] = a; dbeta_part[(long long)n * C + c] = b; }
        sum_dxhat += gamma[c] * b;
        sum_dxhat_xhat += gamma[c] * a;
    }
    SCALAR m1 = sum_dxhat / count, m2 = sum_dxhat_xhat / count;
    for (int k = threadIdx.x; k < count; k += BLOCK) {
        int c = g * cpg + k / HW;
        SCALAR xhat = (x[base + k] - mu) * r;
        SCALAR dz = dy[base + k];
        if (apply_silu) {
            SCALAR z = xhat * gamma[c] + beta[c];
            SCALAR sg = sigmoid_of(z);
            dz *= sg * ((SCALAR)1 + z * ((SCALAR)1 - sg));
        }
        dx[base + k] = r * (gamma[c] * dz - m1 - xhat * m2);
    }
}
