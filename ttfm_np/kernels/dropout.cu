// Counter-based inverted dropout (kernel dropout_apply): one grid-stride pass
//   z    = splitmix64(key + (first + i + 1) * GOLDEN)  i = flat index of the element, first = counter start
//   keep = (z >> 11) * 2^-53 >= p                      (compared in double)
//   y[i] = keep ? x[i] * scale : 0                     scale = 1 / (1 - p) rounded to SCALAR on the host
// The CUDA version of dropout.py's NumPy path, bit for bit: the same 64-bit integer hash
// (unsigned long long arithmetic wraps mod 2^64 exactly as NumPy's uint64 arrays do), so a
// GPU run drops the same units as a CPU run. key = splitmix64(splitmix64(seed) ^ site) is
// computed on the host. The backward is the same kernel applied to dy.
// Compile with -DSCALAR=float|double.
#ifndef SCALAR
#define SCALAR float
#endif

#define GOLDEN 0x9E3779B97F4A7C15ULL

__device__ __forceinline__ unsigned long long splitmix64(unsigned long long z)
{
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

extern "C" __global__ void dropout_apply(const SCALAR* __restrict__ x, SCALAR* __restrict__ y,
                                         long long n, unsigned long long key, unsigned long long first,
                                         double p, SCALAR scale)
{
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        unsigned long long z = splitmix64(key + (first + (unsigned long long)(i + 1)) * GOLDEN);
        double u = (double)(z >> 11) * 0x1.0p-53;       // exact: 53-bit integer times a power of two
        y[i] = (u >= p) ? x[i] * scale : (SCALAR)0;
    }
}
