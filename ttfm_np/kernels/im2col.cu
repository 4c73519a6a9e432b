// im2col / col2im for conv2d (NCHW), the CUDA versions of conv.py's
// im2col_numpy / col2im_numpy. Compiled once per dtype with -DSCALAR=float|double.
//
//   cols[(c, p, q), (n, i, j)] = xpad[n, c, i*stride + p, j*stride + q]   (padding ph, pw)
//   shapes: x (N, C, H, W), cols (C*kh*kw, N*Ho*Wo)   (batch folded into the GEMM's N)
#ifndef SCALAR
#define SCALAR float
#endif

// One thread per cols entry; consecutive threads write consecutive (i, j), so
// the stores are coalesced and the loads are strided by `stride`.
extern "C" __global__ void im2col(const SCALAR* __restrict__ x, SCALAR* __restrict__ cols,
                                  long long total, int N, int C, int H, int W,
                                  int kh, int kw, int stride, int ph, int pw, int Ho, int Wo)
{
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        // idx = ((((c*kh + p)*kw + q)*N + n)*Ho + i)*Wo + j
        int j = (int)(idx % Wo);
        long long r = idx / Wo;
        int i = (int)(r % Ho);  r /= Ho;
        int n = (int)(r % N);   r /= N;
        int q = (int)(r % kw);  r /= kw;
        int p = (int)(r % kh);
        long long c = r / kh;
        int h = i * stride + p - ph;      // row in the unpadded input
        int w = j * stride + q - pw;
        SCALAR v = (SCALAR)0;
        if (h >= 0 && h < H && w >= 0 && w < W)
            v = x[(((long long)n * C + c) * H + h) * W + w];
        cols[idx] = v;
    }
}

// Adjoint of im2col. One thread per input pixel (n, c, h, w) gathers every
// cols entry that copied it: kernel offset p with i*stride + p = h + pad, so
// no two threads write the same address and no atomics are needed.
extern "C" __global__ void col2im(const SCALAR* __restrict__ dcols, SCALAR* __restrict__ dx,
                                  long long total, int N, int C, int H, int W,
                                  int kh, int kw, int stride, int ph, int pw, int Ho, int Wo)
{
    long long npix = (long long)N * Ho * Wo;            // length of one cols row
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        int w = (int)(idx % W);
        long long r = idx / W;
        int h = (int)(r % H);  r /= H;
        int c = (int)(r % C);
        long long n = r / C;
        int hp = h + ph, wp = w + pw;     // position in the padded input
        SCALAR acc = (SCALAR)0;
        for (int p = 0; p < kh; ++p) {
            int hi = hp - p;
            if (hi < 0 || hi % stride != 0) continue;
            int i = hi / stride;
            if (i >= Ho) continue;
            for (int q = 0; q < kw; ++q) {
                int wj = wp - q;
                if (wj < 0 || wj % stride != 0) continue;
                int j = wj / stride;
                if (j >= Wo) continue;
                long long row = ((long long)c * kh + p) * kw + q;
                acc += dcols[row * npix + (n * Ho + i) * Wo + j];
            }
        }
        dx[idx] = acc;
    }
}
