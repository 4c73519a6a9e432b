// Max and average pooling (forward), the CUDA versions of pool.py.
// One thread per output element (n, c, i, j). -DSCALAR=float|double.
//   y[n, c, i, j] = max / mean over the real pixels of window
//                   rows i*stride - pad .. + k-1, cols j*stride - pad .. + k-1
// The average counts only real pixels (count_include_pad=False).
// A NaN in the window makes the max NaN, as NumPy's np.maximum (and torch) do.
#ifndef SCALAR
#define SCALAR float
#endif

extern "C" __global__ void max_pool2d(const SCALAR* __restrict__ x, SCALAR* __restrict__ y, long long total,
                                      int H, int W, int k, int stride, int pad, int Ho, int Wo)
{
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        int j = (int)(idx % Wo);
        int i = (int)((idx / Wo) % Ho);
        long long nc = idx / ((long long)Wo * Ho);
        const SCALAR* plane = x + nc * H * W;
        // The max starts at the window's first real pixel, not at a "smallest value" constant: 1e300
        // is out of float's range (undefined behaviour when converted) and above -1e308 in double,
        // and NVRTC knows no INFINITY macro. pool.py requires pad <= k / 2, so every window has a real pixel.
        SCALAR best = (SCALAR)0;
        bool seen = false;
        for (int p = 0; p < k; ++p) {
            int h = i * stride - pad + p;
            if (h < 0 || h >= H) continue;
            for (int q = 0; q < k; ++q) {
                int w = j * stride - pad + q;
                if (w < 0 || w >= W) continue;
                SCALAR v = plane[h * W + w];
                best = (!seen || v > best || isnan(v)) ? v : best;   // NaN propagates: once best is NaN, v > best is false
                seen = true;
            }
        }
        y[idx] = best;
    }
}

extern "C" __global__ void avg_pool2d(const SCALAR* __restrict__ x, SCALAR* __restrict__ y, long long total,
                                      int H, int W, int k, int stride, int pad, int Ho, int Wo)
{
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        int j = (int)(idx % Wo);
        int i = (int)((idx / Wo) % Ho);
        long long nc = idx / ((long long)Wo * Ho);
        const SCALAR* plane = x + nc * H * W;
        SCALAR acc = 0;
        int count = 0;
        for (int p = 0; p < k; ++p) {
            int h = i * stride - pad + p;
            if (h < 0 || h >= H) continue;
            for (int q = 0; q < k; ++q) {
                int w = j * stride - pad + q;
                if (w < 0 || w >= W) continue;
                acc += plane[h * W + w];
                ++count;
            }
        }
        y[idx] = acc / (SCALAR)count;
    }
}
