// im2col / col2im for conv2d (NCHW), the CUDA versions of conv.py's
// im2col_numpy / col2im_numpy. Compiled once per dtype with -DSCALAR=float|double.
//
//   cols[(c, p, q), (n, i, j)] = xpad[n, c, i*stride + p, j*stride + q]   (padding ph, pw)
//   shapes: x (N, C, H, W), cols (C*kh*kw, N*Ho*Wo)   (batch folded into the GEMM's N)
#ifndef SCALAR
#define SCALAR float
#endif

// Index math: a 2-D launch (cuda.launch_2d). Rows of cols, (c, p, q), loop over blockIdx.y;
// the columns, (n, i, j) in [0, N*Ho*Wo), over the x threads. conv.py checks that N*Ho*Wo and
// N*C*H*W fit in an int, so every division is a 32-bit one (about 20 instructions each, a 64-bit
// division about 70); the row's (c, p, q) are split once per row, not once per element.
// Only the final addresses are 64-bit products (no division).

// Consecutive threads write consecutive (i, j), so the stores are coalesced and the loads are
// strided by `stride`.
extern "C" __global__ void im2col(const SCALAR* __restrict__ x, SCALAR* __restrict__ cols,
                                  int N, int C, int H, int W,
                                  int kh, int kw, int stride, int ph, int pw, int Ho, int Wo)
{
    int npix = N * Ho * Wo;                        // length of one cols row
    int nrows = C * kh * kw;
    for (int row = blockIdx.y; row < nrows; row += gridDim.y) {
        // row = (c*kh + p)*kw + q
        int q = row % kw, cp = row / kw;
        int p = cp % kh, c = cp / kh;
        SCALAR* out = cols + (long long)row * npix;
        for (int col = blockIdx.x * blockDim.x + threadIdx.x; col < npix; col += blockDim.x * gridDim.x) {
            // col = (n*Ho + i)*Wo + j
            int j = col % Wo, ni = col / Wo;
            int i = ni % Ho, n = ni / Ho;
            int h = i * stride + p - ph;           // row in the unpadded input
            int w = j * stride + q - pw;
            SCALAR v = (SCALAR)0;
            if (h >= 0 && h < H && w >= 0 && w < W)
                v = x[((long long)(n * C + c) * H + h) * W + w];
            out[col] = v;
        }
    }
}

// Adjoint of im2col. One thread per input pixel (n, c, h, w) gathers every cols entry that
// copied it: kernel offset p with i*stride + p = h + pad, so no two threads write the same
// address and no atomics are needed. Rows (n, c) loop over blockIdx.y, pixels (h, w) over x.
extern "C" __global__ void col2im(const SCALAR* __restrict__ dcols, SCALAR* __restrict__ dx,
                                  int N, int C, int H, int W,
                                  int kh, int kw, int stride, int ph, int pw, int Ho, int Wo)
{
    int npix = N * Ho * Wo;                        // length of one cols row
    int hw = H * W;
    for (int nc = blockIdx.y; nc < N * C; nc += gridDim.y) {
        int c = nc % C, n = nc / C;
        SCALAR* out = dx + (long long)nc * hw;
        for (int pix = blockIdx.x * blockDim.x + threadIdx.x; pix < hw; pix += blockDim.x * gridDim.x) {
            int h = pix / W, w = pix - h * W;
            int hp = h + ph, wp = w + pw;          // position in the padded input
            SCALAR acc = (SCALAR)0;
            for (int p = 0; p < kh; ++p) {
                int hi = hp - p;
                if (hi < 0) break;                 // hi only shrinks as p grows
                int i = hi / stride;
                if (i * stride != hi || i >= Ho) continue;
                for (int q = 0; q < kw; ++q) {
                    int wj = wp - q;
                    if (wj < 0) break;
                    int j = wj / stride;
                    if (j * stride != wj || j >= Wo) continue;
                    long long row = (long long)(c * kh + p) * kw + q;
                    acc += dcols[row * npix + (n * Ho + i) * Wo + j];
                }
            }
            out[pix] = acc;
        }
    }
}
