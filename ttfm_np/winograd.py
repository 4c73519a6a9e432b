"""3x3 convolution, stride 1, padding 1, by Winograd minimal filtering F(2x2, 3x3) (NumPy).

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (CVPR 2016).

One dimension first. Two outputs of a 3-tap correlation, y_i = sum_p g_p d_{i+p}
(i = 0, 1), read 4 inputs d_0..d_3. Written as

    y = A^T [ (G g) ⊙ (B^T d) ]           (⊙: elementwise product of 4-vectors)

        B^T = [ 1  0 -1  0 ]       G = [  1    0    0  ]       A^T = [ 1  1  1  0 ]
              [ 0  1  1  0 ]           [ 1/2  1/2  1/2 ]             [ 0  1 -1 -1 ]
              [ 0 -1  1  0 ]           [ 1/2 -1/2  1/2 ]
              [ 0  1  0 -1 ]           [  0    0    1  ]

it takes 4 multiplications instead of 6 (m_1 = (d_0 - d_2) g_0, m_2 = (d_1 + d_2)(g_0 + g_1 + g_2)/2,
m_3 = (d_2 - d_1)(g_0 - g_1 + g_2)/2, m_4 = (d_1 - d_3) g_2; y_0 = m_1 + m_2 + m_3, y_1 = m_2 - m_3 - m_4:
expand and the extra terms cancel). Nesting it in both directions gives F(2x2, 3x3): a 4x4 input
tile d (tiles start every 2 pixels, so neighbours overlap by 2) and a 3x3 kernel g give the 2x2 outputs

    Y = A^T [ (G g G^T) ⊙ (B^T d B) ] A                         (4x4 ⊙ 4x4, then 2x4 . 4x4 . 4x2)

For a convolution the channel sum moves inside, since A is linear: with U = G g G^T per (o, c)
and V = B^T d B per (c, tile), for each of the 16 points xi = (a, b) of the 4x4 transform

    M[xi] = U[xi] @ V[xi]        (O, C) @ (C, tiles): one GEMM per point, 16 in all
    Y     = A^T M A              per tile and output channel

GEMM work: 16 (O x C x tiles) with tiles = H W / 4, against im2col's (O x 9C x H W): 16/4 = 4 against
9, 2.25x fewer FLOPs. The transforms are additions and subtractions only (B, A have entries 0, ±1;
G has ±1/2, ±1): whole-array slice arithmetic here, first along rows, then along columns
(separable: B^T d B = B^T (d B)), with no loop over tiles or pixels. The weights' transform U is
(16, O, C), tiny next to the activations.

Exactness: in exact arithmetic the identity above holds for every d and g, so Y IS the
correlation (this is an algebraic identity, not an approximation). In floating point the only
change is the rounding: the points of F(2, 3) are 0, 1, -1 (and infinity), so every coefficient is
0, ±1 or ±1/2 (a power of two: multiplying by it is exact) and the transforms add at most 4
terms of the input tile and 3x3 = 9 terms of the output tile. Each output is then a sum of terms
c * g * d with |c| <= 1 and at most C + 8 roundings on any path (1 for U, 2 for V, C in the GEMM's
dot product, 4 in A^T M A, 1 for the bias), so the classical bound applies to the whole chain:

    |y_computed - y| <= gamma_{C+8} * Yabs,     gamma_k = k u / (1 - k u),  u = 2^-24 (float32)

where Yabs is the same algorithm evaluated on |g|, |d| with |A|, |B|, |G| (no cancellation).
On random inputs Yabs is 7-9x (median; up to 15x) the im2col bound's sum_{c,p,q} |W| |x| (terms
that cancel in Y still count in Yabs), while the roundings count C + 8 instead of 9C + 1: the two
bounds, and the observed errors (3-7e-7 relative at C = 64-128 for both), are about the same:
F(2x2, 3x3) is as accurate as im2col (larger tiles, F(4x4, 3x3) with points ±1/2, ±2, lose digits;
that is why this file stops at 2x2). tests/test_winograd.py checks the float32 results against
this bound (with one more rounding for float64's own error in U).

The backward is the exact adjoint of the same linear algebra (each line names the forward line
it differentiates):

    dM = A dY A^T                      transpose of the output transform
    dU[xi] = dM[xi] @ V[xi]^T          dV[xi] = U[xi]^T @ dM[xi]        (16 GEMMs each)
    dd = B dV B^T, overlap-added        transpose of the input transform (tiles overlap by 2)
    dg = G^T dU G

Layout (one chunk of n samples; t_h = ceil(H/2), t_w = ceil(W/2) tiles, odd sizes padded up):
    x       (N, C, H, W)        input, NCHW
    P       (2, 2, C, n, t_h+1, t_w+1)   zero-padded chunk, rows and columns de-interleaved by parity:
                                P[e, f, c, m, i, j] = xpad[c, m, 2i+f, 2j+e], so that every tile
                                offset is a shift of whole contiguous blocks
    V       (4, 4, C, n, t_h (t_w+1)) = (16, C, tiles)   input transform, GEMM-ready; tile column
                                j = t_w is a spare (see input_transform), 1/t_w more GEMM columns
    U       (4, 4, O, C) = (16, O, C)                  weight transform
    M       (16, O, tiles)      the 16 GEMMs' results
    y       (N, O, H, W)        y[m, o, 2i+r, 2j+s] = Y[r, s, o, m, i, j] + b[o]

Why the spare tile column: NumPy pays ~10 ns per contiguous run of an elementwise operation, so
slicing rows of t_w = 4-16 tiles cost 5x the arithmetic; with the spare column each pass is one run
per (th, tw+1) block (the 64 ch 32x32 input transform: 12.3 -> 7.7 ms for a batch of 32). Better still,
the column pass runs over all (c, m) blocks at once as one shifted run of C n L values (the column
parity is the outermost axis of P and T, so even and odd columns are separate contiguous blocks): what
it computes across a block's end lands on the spare tile, which is zeroed. That made the input
transform 1.8-2.4x and its adjoint 1.7-2.0x faster (one chunk: 64 ch 32x32 248 -> 138 us, 128 ch 16x16
178 -> 92 us; adjoint 277 -> 164 and 191 -> 109 us; 1 thread, AVX-512).

conv.py dispatches the NumPy 3x3 / stride 1 / padding 1 convolutions of images from 16x16 up here in
fp32 (and float64) mode (conv.CONV3X3, conv.WINOGRAD_MIN_PIXELS); the GPU keeps im2col + cuBLAS, and --precision tf32 keeps im2col, whose emulation rounds the
operands x and W of the GPU's GEMM (here the GEMM operands would be U and V instead).
"""
from __future__ import annotations

import numpy as np

from . import parallel
from .precision import matmul as gemm   # stacked operands (16, ., .): one BLAS GEMM per point xi

# The F(2x2, 3x3) matrices (float64; the transforms below are these written out as slice arithmetic).
BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64)   # (4, 4)
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=np.float64)      # (4, 3)
AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64)                                 # (2, 4)

# Samples per chunk: the chunk's V (16 max(C, O) t_h (t_w + 1) floats per sample) and M are written and
# read back while they sit in the CPU's cache, and each chunk costs ~45 NumPy calls forward and ~90
# backward. Measured on the whole small U-Net step (forward + backward, 2-core AMD EPYC Zen 4, 1 MiB L2,
# 32 MiB L3, 2026-12-06, sizes alternated in one process, medians of 4-6 rounds): batch 32 on 2 threads
# (two workers of 16 samples) 1 / 2 / 4 / 8 MiB / whole block: 1.99 / 1.95 / 1.83-1.85 / 1.88 / 2.08 s;
# batch 16 on 1 thread 1 / 4 MiB: 1.74 / 1.72 s. With two workers every NumPy call also waits for the
# GIL more often (a 36 KB add: 1.3 us alone, 3.1-3.4 us with a second thread doing the same), so fewer,
# larger chunks pay off there, while one thread is flat. (Before the transforms' column pass ran as one
# shifted run, 1 MiB had measured best: 64 ch 32x32 91 vs 119 ms for 4 MiB, 1 thread, the other core loaded.)
CHUNK_BYTES = 4 * 2**20

# What the forward keeps for the backward: False = x only (the backward recomputes V, one more
# input transform), True = each chunk's V array itself (about 4x the activation, no copies). Measured
# over the small U-Net's 3x3 convolutions (weighted by their count, ms per step): 1 MiB chunks x 3559 /
# V 3669, 4 MiB x 3655 / V 3565 (V then copied into one array and out again). With the chunks kept as they
# are (2026-12-06, whole small U-Net step, batch 32, 1 thread, AVX-512, same process, alternated): median
# 0.93-0.94x of the recomputing step over 5-8 rounds, but single rounds from 0.68x to 1.20x on a noisy
# host, and benchmarks/unet_step.py --winograd-v keep against torch 1.25x [1.24, 1.35] vs recompute 1.22x
# [1.12, 1.27], with the step's memory 849 -> 1637 MiB. No gain shown beyond the noise for twice the
# memory: the default recomputes.
CACHE_V = False


def _chunks(N, per_sample_bytes):
    return parallel.chunk_range(N, per_sample_bytes, CHUNK_BYTES)


def weight_transform(W):
    """W (O, C, 3, 3) -> U (16, O, C) = G g G^T per (o, c), computed in float64 and rounded once.

    G's entries are 0, 1 and 1/2, so both passes are a few adds and halvings of whole (O, C) planes
    (an einsum over the same product took 5-10x longer: 1.5 ms for 128 x 256 channels, and it runs
    in every forward of every 3x3 layer).
    """
    O, C = W.shape[:2]
    g = np.ascontiguousarray(W.transpose(2, 3, 0, 1), dtype=np.float64)  # (3, 3, O, C): g[p, q] whole planes
    U = np.empty((4, 4, O, C), dtype=W.dtype)
    # rows: T[a] = sum_p G[a, p] g[p]:  T0 = g0,  T1 = (g0 + g1 + g2)/2,  T2 = (g0 - g1 + g2)/2,  T3 = g2
    for a, Ta in enumerate(_g_times(g[0], g[1], g[2])):                   # each (3, O, C)
        # columns, the same combinations: U[a, b] = sum_q G[b, q] T[a][q]; the float32 rounding
        # happens once, on assignment into U
        for b, Uab in enumerate(_g_times(Ta[0], Ta[1], Ta[2])):
            U[a, b] = Uab
    return U.reshape(16, O, C)


def _g_times(v0, v1, v2):
    """(v0, v1, v2) -> G (v0, v1, v2)^T = (v0, (v0 + v1 + v2)/2, (v0 - v1 + v2)/2, v2), elementwise."""
    s = v0 + v2
    return v0, (s + v1) * 0.5, (s - v1) * 0.5, v2


def _gt_times(d0, d1, d2, d3):
    """(d0..d3) -> G^T (d0..d3)^T = (d0 + (d1 + d2)/2, (d1 - d2)/2, (d1 + d2)/2 + d3), elementwise."""
    h = (d1 + d2) * 0.5
    return d0 + h, (d1 - d2) * 0.5, h + d3


def weight_transform_adjoint(dU, dtype):
    """dU (16, O, C) -> dW (O, C, 3, 3) = G^T dU G per (o, c) (U = G g G^T), in float64, rounded once."""
    _, O, C = dU.shape
    dUd = dU.astype(np.float64).reshape(4, 4, O, C)
    dg = np.empty((3, 3, O, C))                                            # float64, (p, q) planes
    # rows: R[p] = sum_a G[a, p] dU[a]  (each (4, O, C), over b);  then dg[p, q] = sum_b G[b, q] R[p][b]
    for p, Rp in enumerate(_gt_times(dUd[0], dUd[1], dUd[2], dUd[3])):
        for q, dgpq in enumerate(_gt_times(Rp[0], Rp[1], Rp[2], Rp[3])):
            dg[p, q] = dgpq
    return np.ascontiguousarray(dg.transpose(2, 3, 0, 1), dtype=dtype)   # (O, C, 3, 3), rounded once


def _parity(size, f):
    """Padded index 2i + f (padding 1) holds input index 2i + f - 1: -> (first i, input slice, count)."""
    return (0, slice(0, None, 2), (size + 1) // 2) if f == 1 else (1, slice(1, None, 2), size // 2)


def input_transform(xt, th, tw):
    """xt (C, n, H, W), any strides (a transposed view of x is fine) -> V (4, 4, C, n, th*(tw+1)) = B^T d B.

    d is the 4x4 tile of the zero-padded input at padded row 2i, column 2j. The tile grid is
    th x (tw+1): column j = tw is a spare tile (it reads the next row's first pixels) that lets every
    pass below run over whole contiguous (th, tw+1) blocks instead of rows of tw floats (NumPy's
    per-row overhead dominated those short runs, 8-32 floats). Its GEMM columns are dropped by
    output_transform, and the backward gives them zero gradient.
    """
    C, n, H, W = xt.shape
    dt = xt.dtype
    tw1 = tw + 1
    L = th * tw1
    # P[e, f, c, m, i, j] = xpad[c, m, 2i + f, 2j + e]: rows and columns de-interleaved by parity,
    # xpad[h, k] = x[h - 1, k - 1] inside, 0 on the border (and on the odd-size overhang). The column
    # parity e comes first, so that T's even and odd columns below are separate contiguous blocks.
    P = np.zeros((2, 2, C, n, th + 1, tw1), dtype=dt)
    for f in range(2):
        i0, rs, nr = _parity(H, f)
        for e in range(2):
            j0, cs, nc = _parity(W, e)
            P[e, f, :, :, i0:i0 + nr, j0:j0 + nc] = xt[:, :, rs, cs]
    # rows: T[a] = sum_k B^T[a, k] R_k,  R_k = padded rows 2i + k,  each (2, C, n, th, tw+1)
    R0, R2 = P[:, 0, :, :, :th], P[:, 0, :, :, 1:]        # rows 2i, 2i + 2
    R1, R3 = P[:, 1, :, :, :th], P[:, 1, :, :, 1:]        # rows 2i + 1, 2i + 3
    T = np.empty((4, 2, C, n, th, tw1), dtype=dt)
    np.subtract(R0, R2, out=T[0])                          # T0 = d0 - d2
    np.add(R1, R2, out=T[1])                               # T1 = d1 + d2
    np.subtract(R2, R1, out=T[2])                          # T2 = d2 - d1
    np.subtract(R1, R3, out=T[3])                          # T3 = d1 - d3
    # columns, the same combinations: tile column l = 0, 1, 2, 3 is E[k], O[k], E[k+1], O[k+1] with
    # k = i (tw+1) + j the flat index of the (th, tw+1) block. Each of E, O is one contiguous run of
    # C n L values per a, so every combination is ONE shifted operation over the whole run (4x faster
    # than one short run per (c, m) row); where k + 1 crosses into the next row's block the result is
    # junk, and that is exactly the spare tile k = L - 1, zeroed afterwards.
    E = T[:, 0].reshape(4, C * n * L)                      # even padded columns 2j   (views: T is contiguous)
    Od = T[:, 1].reshape(4, C * n * L)                     # odd padded columns 2j + 1
    V = np.empty((4, 4, C * n * L), dtype=dt)              # V[a, b]: (4, C n L) views, written in place
    np.subtract(E[:, :-1], E[:, 1:], out=V[:, 0, :-1])     # V[a, 0] = col 0 - col 2
    np.add(Od[:, :-1], E[:, 1:], out=V[:, 1, :-1])         # V[a, 1] = col 1 + col 2
    np.subtract(E[:, 1:], Od[:, :-1], out=V[:, 2, :-1])    # V[a, 2] = col 2 - col 1
    np.subtract(Od[:, :-1], Od[:, 1:], out=V[:, 3, :-1])   # V[a, 3] = col 1 - col 3
    V = V.reshape(4, 4, C, n, L)
    V[..., -1] = 0                                         # the spare tiles (junk above, or past the end)
    return V


def output_transform(M, y, b=None):
    """M (4, 4, O, n, th, tw+1) -> y (n, O, H, W) = A^T M A per tile (+ b), written into y (spare tiles dropped)."""
    _, _, O, n, th, tw1 = M.shape
    H, W = y.shape[2:]
    dt = M.dtype
    # rows: Mr[r] = sum_a A^T[r, a] M[a]:  Mr0 = M0 + M1 + M2,  Mr1 = M1 - M2 - M3     (2, 4, O, n, th, tw+1)
    Mr = np.empty((2, 4, O, n, th, tw1), dtype=dt)
    np.add(M[1], M[2], out=Mr[0])
    Mr[0] += M[0]
    np.subtract(M[1], M[2], out=Mr[1])
    Mr[1] -= M[3]
    # columns: Y[r, s] = sum_b A^T[s, b] Mr[r, b]:  Y0 = Mr0 + Mr1 + Mr2,  Y1 = Mr1 - Mr2 - Mr3
    Y = np.empty((2, 2, O, n, th, tw1), dtype=dt)
    np.add(Mr[:, 1], Mr[:, 2], out=Y[:, 0])
    Y[:, 0] += Mr[:, 0]
    np.subtract(Mr[:, 1], Mr[:, 2], out=Y[:, 1])
    Y[:, 1] -= Mr[:, 3]
    # y[m, o, 2i + r, 2j + s] = Y[r, s, o, m, i, j] (+ b[o]): the bias rides on this copy
    for r in range(2):
        for s in range(2):
            dst = y[:, :, r::2, s::2]                                      # (n, O, H_r, W_s), odd sizes cropped
            src = Y[r, s, :, :, :dst.shape[2], :dst.shape[3]].transpose(1, 0, 2, 3)
            if b is not None:
                np.add(src, b.reshape(1, O, 1, 1), out=dst)
            else:
                dst[...] = src
    return y


def winograd3x3_forward(x, W, b=None, cache_v: bool | None = None):
    """x (N, C, H, W), W (O, C, 3, 3), b (O,) or None -> y (N, O, H, W), cache. Stride 1, padding 1.

    cache_v (default CACHE_V): False keeps only x (by reference, as linear.py does) and the
    backward recomputes V; True also keeps every chunk's V (4, 4, C, n, th (tw+1)): about 4x the activation.
    """
    N, C, H, Wd = x.shape
    O = W.shape[0]
    if W.shape[1:] != (C, 3, 3):
        raise ValueError(f"winograd3x3: weight {W.shape} does not fit input {x.shape}")
    cache_v = CACHE_V if cache_v is None else cache_v
    th, tw = (H + 1) // 2, (Wd + 1) // 2
    L = th * (tw + 1)                                                      # tiles per sample, spare column included
    dt = np.result_type(x, W)
    U = weight_transform(W.astype(dt, copy=False))                        # (16, O, C)
    xt = x.astype(dt, copy=False).transpose(1, 0, 2, 3)                   # (C, N, H, W) view
    y = np.empty((N, O, H, Wd), dtype=dt)
    kept_v = {} if cache_v else None                                      # (n0, n1) -> that chunk's V

    def samples(lo, hi):
        """Samples lo..hi-1, in cache-sized chunks; each worker of parallel.run_split takes one block."""
        for c0, c1 in _chunks(hi - lo, 16 * max(C, O) * L * np.dtype(dt).itemsize):
            n0, n1 = lo + c0, lo + c1
            n = n1 - n0
            V = input_transform(xt[:, n0:n1], th, tw)                      # (4, 4, C, n, L)
            if cache_v:
                kept_v[n0, n1] = V             # the chunk's own array: kept, not copied (one dict entry per chunk)
            M = gemm(U, V.reshape(16, C, n * L))                           # M[xi] = U[xi] @ V[xi]   (16, O, n L)
            output_transform(M.reshape(4, 4, O, n, th, tw + 1), y[n0:n1], b)   # y = A^T M A + b
    parallel.run_split(samples, N)                                         # serial with one BLAS thread
    return y, (x, kept_v, W, U, x.shape, b is not None)


def winograd3x3_backward(dy, cache):
    """dy (N, O, H, W) -> dx (N, C, H, W), {"weight": dW (O, C, 3, 3)[, "bias": db (O,)]}."""
    x, kept_v, W, U, x_shape, has_bias = cache
    N, C, H, Wd = x_shape
    O = W.shape[0]
    th, tw = (H + 1) // 2, (Wd + 1) // 2
    L = th * (tw + 1)
    dt = U.dtype
    grads = {}
    UT = np.ascontiguousarray(U.transpose(0, 2, 1))                        # (16, C, O)
    dx = np.empty((N, C, H, Wd), dtype=dt)
    dxt = dx.transpose(1, 0, 2, 3)                                         # (C, N, H, W) view
    xt = x.astype(dt, copy=False).transpose(1, 0, 2, 3)                   # as the forward's xt

    def samples(lo, hi):
        """Samples lo..hi-1 in cache-sized chunks -> this block's parts of dU (16, O, C) and db (O,)."""
        # y = A^T M A + b  =>  db = sum of dy over samples and pixels (this block's samples)
        db = dy[lo:hi].reshape(hi - lo, O, H * Wd).sum(axis=2).sum(axis=0) if has_bias else None
        dU = None
        for c0, c1 in _chunks(hi - lo, 16 * max(C, O) * L * np.dtype(dt).itemsize):
            n0, n1 = lo + c0, lo + c1
            n = n1 - n0
            if kept_v is not None and (n0, n1) in kept_v:
                V = kept_v[n0, n1]                 # the forward's chunk (the same split: same N, same workers)
            else:                                  # (a worker count changed since the forward: other chunks)
                V = input_transform(xt[:, n0:n1], th, tw)                  # recomputed, as the forward
            dM = _output_transform_adjoint(dy[n0:n1], th, tw).reshape(16, O, n * L)
            # M[xi] = U[xi] @ V[xi]  =>  dU[xi] = dM[xi] @ V[xi]^T  (summed over chunks),  dV[xi] = U[xi]^T @ dM[xi]
            part = gemm(dM, V.reshape(16, C, n * L).transpose(0, 2, 1))   # (16, O, C)
            if dU is None:
                dU = part
            else:
                dU += part
            dV = gemm(UT, dM).reshape(4, 4, C, n, L)                       # (16, C, n L)
            _input_transform_adjoint(dV, th, tw, dxt[:, n0:n1])
        return dU, db
    # one block of samples per worker (parallel.run_split); their dU and db parts added in block order
    dU, db = parallel.sum_split(samples, N)
    if has_bias:
        grads["bias"] = db
    # U = G g G^T  =>  dg = G^T dU G   (float64, as the forward's U)
    grads["weight"] = weight_transform_adjoint(dU, W.dtype)
    return dx, grads


def _output_transform_adjoint(dy, th, tw):
    """dy (n, O, H, W) -> dM (4, 4, O, n, th, tw+1) = A dY A^T per tile (the transpose of output_transform);
    the spare tiles and the odd-size overhang, which output_transform drops, get zero gradient."""
    n, O, H, W = dy.shape
    dt = dy.dtype
    dM = np.empty((4, 4, O, n, th, tw + 1), dtype=dt)
    dMr0, dMr1 = dM[0], np.empty((4, O, n, th, tw + 1), dtype=dt)          # dMr0 is built in dM0's place
    # columns: Y0 = Mr0 + Mr1 + Mr2,  Y1 = Mr1 - Mr2 - Mr3                                (dMr = dY A^T)
    #   =>  dMr0 = dY0,  dMr3 = -dY1,  dMr1 = dY0 + dY1 = dMr0 - dMr3,  dMr2 = dY0 - dY1 = dMr0 + dMr3
    # with dY[r, s, o, m, i, j] = dy[m, o, 2i + r, 2j + s] (y[m, o, 2i + r, 2j + s] = Y[r, s, o, m, i, j])
    for r, dMr in enumerate((dMr0, dMr1)):
        for s, b in ((0, 0), (1, 3)):
            src = dy[:, :, r::2, s::2].transpose(1, 0, 2, 3)                # (O, n, H_r, W_s)
            hr, ws = src.shape[2:]
            dst = dMr[b]
            if s == 0:
                dst[:, :, :hr, :ws] = src
            else:
                np.negative(src, out=dst[:, :, :hr, :ws])
            dst[:, :, hr:] = 0                                              # odd-size overhang: no gradient
            dst[:, :, :hr, ws:] = 0                                         # spare column (and overhang)
        np.subtract(dMr[0], dMr[3], out=dMr[1])
        np.add(dMr[0], dMr[3], out=dMr[2])
    # rows: Mr0 = M0 + M1 + M2,  Mr1 = M1 - M2 - M3
    #   =>  dM0 = dMr0 (already in place),  dM1 = dMr0 + dMr1,  dM2 = dMr0 - dMr1,  dM3 = -dMr1   (dM = A dMr)
    np.add(dMr0, dMr1, out=dM[1])
    np.subtract(dMr0, dMr1, out=dM[2])
    np.negative(dMr1, out=dM[3])
    return dM


def _input_transform_adjoint(dV, th, tw, dxt):
    """dV (4, 4, C, n, th*(tw+1)) -> dxt (C, n, H, W) (a view into dx): B dV B^T per tile, overlap-added
    (tiles overlap by 2) into the padded grid, then cropped to the input: the transpose of input_transform."""
    _, _, C, n, L = dV.shape
    H, W = dxt.shape[2:]
    dt = dV.dtype
    # V[..., L - 1] = 0 in the forward  =>  the spare tiles' dV is ignored (zeroed here, in place: dV is
    # the caller's temporary); then the shifted runs below need no special case at the rows' ends
    dV[..., -1] = 0
    dVf = dV.reshape(4, 4, C * n * L)                                      # (4, C n L) runs per (a, b)
    dV0, dV1, dV2, dV3 = (dVf[:, b] for b in range(4))
    # columns: V0[k] = E[k] - E[k+1],  V1[k] = O[k] + E[k+1],  V2[k] = E[k+1] - O[k],  V3[k] = O[k] - O[k+1]
    # over the flat runs (the forward's shifted operations)  =>  dE[k] = dV0[k] + g[k-1],  g = dV1 + dV2 - dV0
    #                                                            dO[k] = h[k] - dV3[k-1],   h = dV1 - dV2 + dV3
    # (terms before the run's start: 0; across a row's end they meet the zeroed spare tile: 0 as well)
    dT = np.empty((4, 2, C * n * L), dtype=dt)
    dE, dO = dT[:, 0], dT[:, 1]                                            # (4, C n L) views
    g = np.add(dV1, dV2)
    g -= dV0
    dE[:, 0] = dV0[:, 0]
    np.add(dV0[:, 1:], g[:, :-1], out=dE[:, 1:])
    np.subtract(dV1, dV2, out=g)
    g += dV3                                                               # g is h now
    dO[:, 0] = g[:, 0]
    np.subtract(g[:, 1:], dV3[:, :-1], out=dO[:, 1:])
    # rows: T0 = R0 - R2,  T1 = R1 + R2,  T2 = R2 - R1,  T3 = R1 - R3  (R_k: padded rows 2i + k), so
    #   even rows 2i:     dP0[i] = dR0[i] + dR2[i-1],  dR0 = dT0,  dR2 = dT1 + dT2 - dT0
    #   odd rows 2i + 1:  dP1[i] = dR1[i] + dR3[i-1],  dR1 = dT1 - dT2 + dT3,  dR3 = -dT3
    dT = dT.reshape(4, 2, C, n, th, tw + 1)
    dP = np.empty((2, 2, C, n, th + 1, tw + 1), dtype=dt)                  # as P: [e, f, c, m, i, j]
    dP0, dP1 = dP[:, 0], dP[:, 1]                                          # (2, C, n, th + 1, tw + 1)
    h = np.add(dT[1], dT[2])
    h -= dT[0]                                                             # dR2
    dP0[:, :, :, 0] = dT[0][:, :, :, 0]
    np.add(dT[0][:, :, :, 1:], h[:, :, :, :-1], out=dP0[:, :, :, 1:th])
    dP0[:, :, :, th] = h[:, :, :, -1]
    np.subtract(dT[1], dT[2], out=h)
    h += dT[3]                                                             # dR1
    dP1[:, :, :, 0] = h[:, :, :, 0]
    np.subtract(h[:, :, :, 1:], dT[3][:, :, :, :-1], out=dP1[:, :, :, 1:th])
    np.negative(dT[3][:, :, :, -1], out=dP1[:, :, :, th])
    # P[e, f, c, m, i0 + .., j0 + ..] = x[rows of parity f, columns of parity e]: copy back, padding cropped
    for f in range(2):
        i0, rs, nr = _parity(H, f)
        for e in range(2):
            j0, cs, nc = _parity(W, e)
            dxt[:, :, rs, cs] = dP[e, f, :, :, i0:i0 + nr, j0:j0 + nc]
