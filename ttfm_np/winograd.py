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
Yabs is a few times the im2col bound's sum_{c,p,q} |W| |x| (the terms cancel in Y but not in
Yabs), while the roundings count C + 8 instead of 9C: F(2x2, 3x3) is as accurate as im2col
(larger tiles, F(4x4, 3x3) with points ±1/2, ±2, lose digits; that is why this file stops at 2x2).
tests/test_winograd.py checks the float32 results against this bound.

The backward is the exact adjoint of the same linear algebra (each line names the forward line
it differentiates):

    dM = A dY A^T                      transpose of the output transform
    dU[xi] = dM[xi] @ V[xi]^T          dV[xi] = U[xi]^T @ dM[xi]        (16 GEMMs each)
    dd = B dV B^T, overlap-added        transpose of the input transform (tiles overlap by 2)
    dg = G^T dU G

Layout (one chunk of n samples; t_h = ceil(H/2), t_w = ceil(W/2) tiles, odd sizes padded up):
    x       (N, C, H, W)        input, NCHW
    P       (C, n, 2t_h+2, 2, t_w+1)   zero-padded chunk, columns de-interleaved: P[.., e, j] = column 2j+e,
                                so the column pass reads contiguous runs instead of every other element
    V       (4, 4, C, n, t_h, t_w) = (16, C, tiles)    input transform, GEMM-ready
    U       (4, 4, O, C) = (16, O, C)                  weight transform
    M       (16, O, tiles)      the 16 GEMMs' results
    y       (N, O, H, W)        y[m, o, 2i+r, 2j+s] = Y[r, s, o, m, i, j] + b[o]

conv.py dispatches the NumPy 3x3 / stride 1 / padding 1 convolutions here in fp32 (and float64)
mode; the GPU keeps im2col + cuBLAS, and --precision tf32 keeps im2col, whose emulation rounds the
operands x and W of the GPU's GEMM (here the GEMM operands would be U and V instead).
"""
from __future__ import annotations

import numpy as np

from .precision import matmul as gemm   # stacked operands (16, ., .): one BLAS GEMM per point xi

# The F(2x2, 3x3) matrices (float64; the transforms below are these written out as slice arithmetic).
BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64)   # (4, 4)
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=np.float64)      # (4, 3)
AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64)                                 # (2, 4)

# Samples per chunk: the chunk's V (16 C t_h t_w floats per sample) and M are written and read back
# while they sit in the CPU's cache. Measured with the small U-Net's shapes (see conv.py).
CHUNK_BYTES = 4 * 2**20


def _chunks(N, per_sample_bytes):
    from .conv import _sample_chunks        # conv imports this module: import late
    return _sample_chunks(N, per_sample_bytes, CHUNK_BYTES)


def weight_transform(W):
    """W (O, C, 3, 3) -> U (16, O, C) = G g G^T per (o, c), computed in float64 and rounded once."""
    U = np.einsum("ap,ocpq,bq->aboc", G, W.astype(np.float64, copy=False), G, optimize=True)   # (4, 4, O, C)
    return np.ascontiguousarray(U, dtype=W.dtype).reshape(16, W.shape[0], W.shape[1])


def input_transform(xt, th, tw, out=None):
    """xt (C, n, H, W), any strides (a transposed view of x is fine) -> V (4, 4, C, n, th, tw) = B^T d B.

    d is the 4x4 tile of the zero-padded input starting at padded row 2i, column 2j.
    """
    C, n, H, W = xt.shape
    dt = xt.dtype
    nw1, nw0 = (W + 1) // 2, W // 2          # x columns 0, 2, 4, ... and 1, 3, 5, ...
    # P[c, m, h, e, j] = xpad[c, m, h, 2j + e],  xpad[h, k] = x[h - 1, k - 1] inside, 0 on the border
    P = np.empty((C, n, 2 * th + 2, 2, tw + 1), dtype=dt)
    P[:, :, 0] = 0
    P[:, :, H + 1:] = 0
    body = P[:, :, 1:H + 1]
    body[:, :, :, 1, :nw1] = xt[:, :, :, 0::2]            # padded column 2j+1 = x column 2j
    body[:, :, :, 1, nw1:] = 0
    body[:, :, :, 0, 0] = 0                                # padded column 0
    body[:, :, :, 0, 1:nw0 + 1] = xt[:, :, :, 1::2]       # padded column 2j = x column 2j-1
    body[:, :, :, 0, nw0 + 1:] = 0
    # rows: T[a] = sum_k B^T[a, k] R_k,  R_k = padded rows 2i + k  (C, n, th, 2, tw+1)
    R0, R1, R2, R3 = (P[:, :, k:k + 2 * th - 1:2] for k in range(4))
    T = np.empty((4, C, n, th, 2, tw + 1), dtype=dt)
    np.subtract(R0, R2, out=T[0])                          # T0 = d0 - d2
    np.add(R1, R2, out=T[1])                               # T1 = d1 + d2
    np.subtract(R2, R1, out=T[2])                          # T2 = d2 - d1
    np.subtract(R1, R3, out=T[3])                          # T3 = d1 - d3
    # columns, the same combinations: tile column l = 0, 1, 2, 3 is E[j], O[j], E[j+1], O[j+1]
    E, Od = T[:, :, :, :, 0], T[:, :, :, :, 1]             # (4, C, n, th, tw+1): even / odd padded columns
    V = np.empty((4, 4, C, n, th, tw), dtype=dt) if out is None else out
    np.subtract(E[..., :tw], E[..., 1:], out=V[:, 0])      # V[a, 0] = T[a] col 0 - col 2
    np.add(Od[..., :tw], E[..., 1:], out=V[:, 1])          # V[a, 1] = col 1 + col 2
    np.subtract(E[..., 1:], Od[..., :tw], out=V[:, 2])     # V[a, 2] = col 2 - col 1
    np.subtract(Od[..., :tw], Od[..., 1:], out=V[:, 3])    # V[a, 3] = col 1 - col 3
    return V


def output_transform(M, y, b=None):
    """M (4, 4, O, n, th, tw) -> y (n, O, H, W) = A^T M A per tile (+ b), written into y."""
    _, _, O, n, th, tw = M.shape
    H, W = y.shape[2:]
    dt = M.dtype
    # rows: Mr[r] = sum_a A^T[r, a] M[a]:  Mr0 = M0 + M1 + M2,  Mr1 = M1 - M2 - M3     (2, 4, O, n, th, tw)
    Mr = np.empty((2, 4, O, n, th, tw), dtype=dt)
    np.add(M[1], M[2], out=Mr[0])
    Mr[0] += M[0]
    np.subtract(M[1], M[2], out=Mr[1])
    Mr[1] -= M[3]
    # columns: Y[r, s] = sum_b A^T[s, b] Mr[r, b], written interleaved: y[m, o, 2i+r, 2j+s]
    if H == 2 * th and W == 2 * tw:
        Z = y
    else:
        Z = np.empty((n, O, 2 * th, 2 * tw), dtype=dt)    # odd H or W: the tile grid overhangs by one; crop below
    Yv = Z.reshape(n, O, th, 2, tw, 2).transpose(3, 5, 1, 0, 2, 4)        # (r, s, O, n, th, tw) view of Z
    S = np.add(Mr[:, 1], Mr[:, 2])                                         # (2, O, n, th, tw)
    np.add(Mr[:, 0], S, out=Yv[:, 0])                                      # Y[r, 0] = Mr0 + Mr1 + Mr2
    np.subtract(Mr[:, 1], Mr[:, 2], out=S)
    np.subtract(S, Mr[:, 3], out=Yv[:, 1])                                 # Y[r, 1] = Mr1 - Mr2 - Mr3
    if Z is not y:
        y[...] = Z[:, :, :H, :W]
    if b is not None:
        y += b.reshape(1, O, 1, 1)                                         # bias on the final write
    return y


def winograd3x3_forward(x, W, b=None, cache_v: bool = False):
    """x (N, C, H, W), W (O, C, 3, 3), b (O,) or None -> y (N, O, H, W), cache. Stride 1, padding 1.

    cache_v=False keeps only x (by reference, as linear.py does) and the backward recomputes V;
    cache_v=True keeps V (16, C, N t_h t_w): 4x the activation. See CACHE_V.
    """
    N, C, H, Wd = x.shape
    O = W.shape[0]
    if W.shape[1:] != (C, 3, 3):
        raise ValueError(f"winograd3x3: weight {W.shape} does not fit input {x.shape}")
    th, tw = (H + 1) // 2, (Wd + 1) // 2
    dt = np.result_type(x, W)
    U = weight_transform(W.astype(dt, copy=False))                        # (16, O, C)
    xt = x.transpose(1, 0, 2, 3)                                           # (C, N, H, W) view
    y = np.empty((N, O, H, Wd), dtype=dt)
    Vs = np.empty((4, 4, C, N, th, tw), dtype=dt) if cache_v else None
    for n0, n1 in _chunks(N, 16 * max(C, O) * th * tw * np.dtype(dt).itemsize):
        n = n1 - n0
        V = input_transform(xt[:, n0:n1], th, tw)                          # (4, 4, C, n, th, tw)
        if cache_v:
            Vs[:, :, :, n0:n1] = V
        M = gemm(U, V.reshape(16, C, n * th * tw))                         # M[xi] = U[xi] @ V[xi]   (16, O, P)
        output_transform(M.reshape(4, 4, O, n, th, tw), y[n0:n1], b)       # y = A^T M A + b
    return y, (Vs if cache_v else x, W, U, x.shape, b is not None)


def winograd3x3_backward(dy, cache):
    """dy (N, O, H, W) -> dx (N, C, H, W), {"weight": dW (O, C, 3, 3)[, "bias": db (O,)]}."""
    saved, W, U, x_shape, has_bias = cache
    N, C, H, Wd = x_shape
    O = W.shape[0]
    th, tw = (H + 1) // 2, (Wd + 1) // 2
    dt = U.dtype
    grads = {}
    if has_bias:
        # y = A^T M A + b  =>  db = sum of dy over samples and pixels
        grads["bias"] = dy.reshape(N, O, H * Wd).sum(axis=2).sum(axis=0)
    UT = np.ascontiguousarray(U.transpose(0, 2, 1))                        # (16, C, O)
    cached_v = saved.ndim == 6
    dx = np.empty((N, C, H, Wd), dtype=dt)
    dxt = dx.transpose(1, 0, 2, 3)                                         # (C, N, H, W) view
    dU = None
    for n0, n1 in _chunks(N, 16 * max(C, O) * th * tw * np.dtype(dt).itemsize):
        n, P = n1 - n0, (n1 - n0) * th * tw
        if cached_v:
            V = saved[:, :, :, n0:n1]                                      # (4, 4, C, n, th, tw) view
            V = np.ascontiguousarray(V)
        else:
            V = input_transform(saved.transpose(1, 0, 2, 3)[:, n0:n1], th, tw)   # recomputed, as in the forward
        dM = _output_transform_adjoint(dy[n0:n1], th, tw)                  # (4, 4, O, n, th, tw)
        dM16 = dM.reshape(16, O, P)
        # M[xi] = U[xi] @ V[xi]  =>  dU[xi] = dM[xi] @ V[xi]^T  (summed over chunks),  dV[xi] = U[xi]^T @ dM[xi]
        part = gemm(dM16, V.reshape(16, C, P).transpose(0, 2, 1))         # (16, O, C)
        if dU is None:
            dU = part
        else:
            dU += part
        dV = gemm(UT, dM16).reshape(4, 4, C, n, th, tw)                    # (16, C, P)
        _input_transform_adjoint(dV, dxt[:, n0:n1])
    # U = G g G^T  =>  dg = G^T dU G   (float64, as the forward's U)
    dW = np.einsum("ap,aboc,bq->ocpq", G, dU.reshape(4, 4, O, C).astype(np.float64), G, optimize=True)
    grads["weight"] = np.ascontiguousarray(dW, dtype=W.dtype)
    return dx, grads


def _output_transform_adjoint(dy, th, tw):
    """dy (n, O, H, W) -> dM (4, 4, O, n, th, tw) = A dY A^T per tile (transpose of output_transform)."""
    n, O, H, W = dy.shape
    dt = dy.dtype
    if H != 2 * th or W != 2 * tw:
        dyp = np.zeros((n, O, 2 * th, 2 * tw), dtype=dt)                  # the cropped overhang gets no gradient
        dyp[:, :, :H, :W] = dy
        dy = dyp
    dYv = dy.reshape(n, O, th, 2, tw, 2).transpose(3, 5, 1, 0, 2, 4)      # (r, s, O, n, th, tw): dY[r, s]
    # columns: Y[r, 0] = Mr0 + Mr1 + Mr2, Y[r, 1] = Mr1 - Mr2 - Mr3
    #   =>  dMr0 = dY0,  dMr1 = dY0 + dY1,  dMr2 = dY0 - dY1,  dMr3 = -dY1     (dMr = dY A^T)
    dMr = np.empty((2, 4, O, n, th, tw), dtype=dt)
    dMr[:, 0] = dYv[:, 0]
    np.add(dYv[:, 0], dYv[:, 1], out=dMr[:, 1])
    np.subtract(dYv[:, 0], dYv[:, 1], out=dMr[:, 2])
    np.negative(dYv[:, 1], out=dMr[:, 3])
    # rows: Mr0 = M0 + M1 + M2, Mr1 = M1 - M2 - M3
    #   =>  dM0 = dMr0,  dM1 = dMr0 + dMr1,  dM2 = dMr0 - dMr1,  dM3 = -dMr1     (dM = A dMr)
    dM = np.empty((4, 4, O, n, th, tw), dtype=dt)
    dM[0] = dMr[0]
    np.add(dMr[0], dMr[1], out=dM[1])
    np.subtract(dMr[0], dMr[1], out=dM[2])
    np.negative(dMr[1], out=dM[3])
    return dM


def _input_transform_adjoint(dV, dxt):
    """dV (4, 4, C, n, th, tw) -> dxt (C, n, H, W) (a view into dx): B dV B^T per tile, overlap-added
    into the padded grid (stride 2), then cropped to the input: the transpose of input_transform."""
    _, _, C, n, th, tw = dV.shape
    H, W = dxt.shape[2:]
    dt = dV.dtype
    # columns: V[a,0] = E[j] - E[j+1], V[a,1] = O[j] + E[j+1], V[a,2] = E[j+1] - O[j], V[a,3] = O[j] - O[j+1]
    #   =>  dE[j] += dV0,  dE[j+1] += dV1 + dV2 - dV0,  dO[j] += dV1 - dV2 + dV3,  dO[j+1] -= dV3
    dT = np.empty((4, C, n, th, 2, tw + 1), dtype=dt)
    dE, dO = dT[:, :, :, :, 0], dT[:, :, :, :, 1]                          # (4, C, n, th, tw+1)
    dE[..., :tw] = dV[:, 0]
    dE[..., tw] = 0
    g = np.add(dV[:, 1], dV[:, 2])                                         # (4, C, n, th, tw)
    g -= dV[:, 0]
    dE[..., 1:] += g
    np.subtract(dV[:, 1], dV[:, 2], out=g)
    np.add(g, dV[:, 3], out=dO[..., :tw])
    dO[..., tw] = 0
    dO[..., 1:] -= dV[:, 3]
    # rows: T0 = R0 - R2, T1 = R1 + R2, T2 = R2 - R1, T3 = R1 - R3  (R_k: padded rows 2i + k)
    #   =>  dR0 = dT0,  dR1 = dT1 - dT2 + dT3,  dR2 = dT1 + dT2 - dT0,  dR3 = -dT3
    # D[:, :, i, f] = gradient of padded row 2i + f (f = 0: even rows R0/R2, f = 1: odd rows R1/R3)
    D = np.empty((C, n, th + 1, 2, 2, tw + 1), dtype=dt)
    D[:, :, :th, 0] = dT[0]                                                # dR0 -> row 2i
    D[:, :, th, 0] = 0
    h = np.add(dT[1], dT[2])
    h -= dT[0]
    D[:, :, 1:, 0] += h                                                    # dR2 -> row 2(i+1)
    np.subtract(dT[1], dT[2], out=h)
    np.add(h, dT[3], out=D[:, :, :th, 1])                                  # dR1 -> row 2i+1
    D[:, :, th, 1] = 0
    D[:, :, 1:, 1] -= dT[3]                                                # dR3 -> row 2(i+1)+1
    dP = D.reshape(C, n, 2 * th + 2, 2, tw + 1)                            # dP[c, m, h, e, j]: padded pixel (h, 2j+e)
    # crop the padding: x[h, k] = xpad[h+1, k+1];  column 2j of x is (e=1, j), column 2j+1 is (e=0, j+1)
    nw1, nw0 = (W + 1) // 2, W // 2
    dxt[:, :, :, 0::2] = dP[:, :, 1:H + 1, 1, :nw1]
    dxt[:, :, :, 1::2] = dP[:, :, 1:H + 1, 0, 1:nw0 + 1]
