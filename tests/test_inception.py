"""The Inception port against PyTorch: the same FID Inception-v3 written with
torch.nn layers as pytorch-fid defines it (FIDInceptionA/C/E with
count_include_pad=False and the max-pool E), the same random weights in a
state dict with the real key names, saved by torch and read back through our
torch-free reader. pool3 features must agree to relative error < 1e-4.

pytorch-fid itself imports torchvision, which does not install beside the
local CPU torch wheel, so the reference network is re-declared below from
pytorch-fid's definitions; `test_inception_matches_pytorch_fid` compares with
pytorch-fid's own `InceptionV3` whenever it imports (see docs/fid.md for the
recorded run). Pooling and resizing are also checked without torch (loops),
and the CuPy path against the NumPy one on a GPU."""
import numpy as np
import pytest

from ttfm_np import backend, inception, pool, resize

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError:                  # the torch-free tests of this file still run
    torch = F = nn = None

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch not installed: comparison with torch skipped")
needs_torch = lambda f, _skip=needs_torch: pytest.mark.torch(_skip(f))     # every torch test carries the marker
_Module = nn.Module if nn is not None else object      # the reference classes are only built when torch exists


class BasicConv2d(_Module):
    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class A(_Module):
    def __init__(self, cin, pf):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pf, kernel_size=1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(F.avg_pool2d(x, 3, 1, 1, count_include_pad=False))], 1)


class B(_Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, 2)], 1)


class C(_Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for m in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = m(bd)
        return torch.cat([self.branch1x1(x), b7, bd,
                          self.branch_pool(F.avg_pool2d(x, 3, 1, 1, count_include_pad=False))], 1)


class D(_Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, 2)], 1)


class E(_Module):
    def __init__(self, cin, pool_kind):
        super().__init__()
        self.pool_kind = pool_kind
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = (F.avg_pool2d(x, 3, 1, 1, count_include_pad=False) if self.pool_kind == "avg"
                  else F.max_pool2d(x, 3, 1, 1))
        return torch.cat([self.branch1x1(x), torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1),
                          torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1),
                          self.branch_pool(pooled)], 1)


class FIDInception(_Module):
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = A(192, 32), A(256, 64), A(288, 64)
        self.Mixed_6a = B(288)
        self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e = C(768, 128), C(768, 160), C(768, 160), C(768, 192)
        self.Mixed_7a = D(768)
        self.Mixed_7b, self.Mixed_7c = E(1280, "avg"), E(2048, "max")
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x):               # x in [0, 1]
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, 2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, 2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return x.mean(dim=(2, 3))


def _pool_by_loops(x, k, stride, pad, kind):
    """Direct definition: max / mean over the real pixels of each window."""
    N, C, H, W = x.shape
    Ho, Wo = (H + 2 * pad - k) // stride + 1, (W + 2 * pad - k) // stride + 1
    y = np.empty((N, C, Ho, Wo), x.dtype)
    for i in range(Ho):
        for j in range(Wo):
            h0, w0 = i * stride - pad, j * stride - pad
            win = x[:, :, max(h0, 0):h0 + k, max(w0, 0):w0 + k]
            y[:, :, i, j] = win.max(axis=(2, 3)) if kind == "max" else win.mean(axis=(2, 3))
    return y


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k,stride,pad", [(3, 2, 0), (3, 1, 1), (3, 2, 1), (2, 2, 0), (5, 1, 2)])
def test_pooling_matches_loops(rng, dtype, k, stride, pad):
    x = rng.standard_normal((2, 3, 9, 8)).astype(dtype)
    got = pool.max_pool2d(x, k, stride, pad)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, _pool_by_loops(x, k, stride, pad, "max"))
    got = pool.avg_pool2d(x, k, stride, pad)
    assert got.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(got, _pool_by_loops(x, k, stride, pad, "avg"), **tol)


def test_pooling_rejects_bad_arguments(rng):
    x = rng.standard_normal((1, 1, 4, 4))
    with pytest.raises(ValueError, match="pad"):
        pool.avg_pool2d(x, 3, 1, 2)
    with pytest.raises(ValueError, match="does not fit"):
        pool.max_pool2d(x[:, :, :2, :2], 3, 1, 0)


def test_resize_by_its_formula(rng):
    """src = (i + 0.5) n_in / n_out - 0.5 clamped at 0; linear between floor(src) and the next pixel."""
    x = rng.standard_normal((1, 2, 5, 4))
    got = resize.resize_bilinear(x, 11, 3)

    def taps(i, n_in, n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(np.floor(src)), n_in - 1)
        return i0, min(i0 + 1, n_in - 1), src - i0

    for i in range(11):
        h0, h1, a = taps(i, 5, 11)
        for j in range(3):
            w0, w1, b = taps(j, 4, 3)
            ref = ((1 - a) * ((1 - b) * x[..., h0, w0] + b * x[..., h0, w1])
                   + a * ((1 - b) * x[..., h1, w0] + b * x[..., h1, w1]))
            np.testing.assert_allclose(got[..., i, j], ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(resize.resize_bilinear(x, 5, 4), x, rtol=1e-15)          # same size: identity
    assert resize.resize_bilinear(x.astype(np.float32), 7, 7).dtype == np.float32


def test_architecture_table_and_weight_checks(rng):
    shapes = inception.unit_shapes()
    assert len(shapes) == 94
    assert shapes["Mixed_5b.branch_pool"] == (32, 192, 1, 1) and shapes["Mixed_7c.branch1x1"] == (320, 2048, 1, 1)
    sd = inception.random_weights(0)
    units = inception.fold_batchnorm(sd)
    u = "Mixed_6b.branch7x7_2"                      # folding: W' = W g / sqrt(v + eps), b' = beta - m g / sqrt(v + eps)
    scale = sd[f"{u}.bn.weight"].astype(np.float64) / np.sqrt(sd[f"{u}.bn.running_var"] + 1e-3)
    np.testing.assert_allclose(units[u][0], sd[f"{u}.conv.weight"] * scale[:, None, None, None], rtol=1e-6)
    np.testing.assert_allclose(units[u][1], sd[f"{u}.bn.bias"] - sd[f"{u}.bn.running_mean"] * scale, rtol=1e-6, atol=1e-7)
    bad = dict(sd)
    bad["Mixed_6b.branch7x7_2.conv.weight"] = np.zeros((128, 128, 7, 1), np.float32)
    with pytest.raises(ValueError, match="branch7x7_2.conv.weight has shape"):
        inception.fold_batchnorm(bad)
    del bad["Mixed_7c.branch_pool.conv.weight"]
    with pytest.raises(ValueError, match="missing 1 of 94"):
        inception.fold_batchnorm(bad)


def test_features_without_torch(rng):
    """One image through the whole network on random weights: 2048 finite, non-negative, input-dependent features."""
    model = inception.InceptionV3FID(inception.fold_batchnorm(inception.random_weights(0)), np)
    images = rng.uniform(0, 1, (2, 3, 16, 16)).astype(np.float32)
    f = model.features(images, chunk=1)                 # chunking: two passes of one image
    assert f.shape == (2, 2048) and f.dtype == np.float64
    assert np.isfinite(f).all() and (f >= 0).all() and np.abs(f[0] - f[1]).max() > 0
    with pytest.raises(ValueError, match="RGB"):
        model.features(images[:, :1])


@needs_torch
def test_pooling_and_resize_match_torch(rng):
    x = rng.standard_normal((2, 3, 11, 10))
    tx = torch.tensor(x)
    for k, s, p in ((3, 2, 0), (3, 1, 1)):
        np.testing.assert_allclose(pool.max_pool2d(x, k, s, p), F.max_pool2d(tx, k, s, p).numpy(), rtol=1e-12)
        np.testing.assert_allclose(pool.avg_pool2d(x, k, s, p),
                                   F.avg_pool2d(tx, k, s, p, count_include_pad=False).numpy(), rtol=1e-12)
    for size in ((299, 299), (5, 7)):
        ref = F.interpolate(tx, size=size, mode="bilinear", align_corners=False).numpy()
        np.testing.assert_allclose(resize.resize_bilinear(x, *size), ref, rtol=1e-10, atol=1e-12)


def random_fid_inception(seed=0):
    """Random weights and random BatchNorm statistics (so folding is really exercised)."""
    torch.manual_seed(seed)
    net = FIDInception().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):      # He init keeps the signal alive through ~50 layers
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.8, 1.2)
                m.weight.uniform_(0.8, 1.2)
                m.bias.uniform_(-0.1, 0.1)
    return net


@needs_torch
def test_inception_features_match_torch(tmp_path, rng):
    net = random_fid_inception(0)
    path = tmp_path / "inception.pth"
    torch.save(net.state_dict(), path)
    h5 = inception.convert_weights(str(path), str(tmp_path / "inception.h5"))
    ours = inception.load_inception(h5)
    images = rng.uniform(0, 1, (2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.tensor(images)).numpy().astype(np.float64)
    got = ours.features(images)
    assert got.shape == (2, 2048)
    # the features must depend on the input, or the comparison would test only the biases:
    # the two images' features differ by a few percent, and that difference must match too
    d_ref, d_got = ref[0] - ref[1], got[0] - got[1]
    assert np.linalg.norm(d_ref) > 0.01 * np.linalg.norm(ref[0])
    assert np.linalg.norm(d_got - d_ref) / np.linalg.norm(d_ref) < 1e-3
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    print(f"pool3 relative error vs torch: {rel:.2e}")
    assert rel < 1e-4, rel


def _import_pytorch_fid():
    try:
        import pytorch_fid.inception as pfi
    except Exception as exc:           # ImportError, or torchvision failing to load its operators
        pytest.skip(f"pytorch-fid is not importable ({exc.__class__.__name__}: {str(exc)[:120]}); "
                    "`pip install pytorch-fid` with a torchvision matching torch to run this comparison")
    return pfi


@needs_torch
def test_inception_matches_pytorch_fid(tmp_path, rng, monkeypatch):
    """pytorch-fid's own InceptionV3 (FID blocks, resize, [-1, 1] scaling), loading our random state dict
    strictly in place of the downloaded weights: so the key names are the real ones too."""
    pfi = _import_pytorch_fid()
    sd = random_fid_inception(3).state_dict()
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *args, **kwargs: sd)
    net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    torch.save(sd, tmp_path / "w.pth")
    ours = inception.load_inception(inception.convert_weights(str(tmp_path / "w.pth"), str(tmp_path / "w.h5")), np)
    images = rng.uniform(0, 1, (2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.tensor(images))[0].reshape(2, -1).double().numpy()
    got = ours.features(images)
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    print(f"pool3 relative error vs pytorch-fid InceptionV3: {rel:.2e}")
    assert rel < 1e-4, rel


needs_gpu = pytest.mark.skipif(not backend.gpu_available(), reason=f"no usable GPU: {backend.gpu_problem()}")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pooling_and_resize_cupy_match_numpy(rng, dtype):
    import cupy as cp
    x = rng.standard_normal((2, 5, 17, 16)).astype(dtype)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)
    for k, s, p in ((3, 2, 0), (3, 1, 1), (3, 2, 1), (5, 1, 2)):
        for f in (pool.max_pool2d, pool.avg_pool2d):
            got = f(cp.asarray(x), k, s, p)
            assert got.dtype == dtype
            np.testing.assert_allclose(cp.asnumpy(got), f(x, k, s, p), **tol, err_msg=f"{f.__name__} {k},{s},{p}")
    got = resize.resize_bilinear(cp.asarray(x), 299, 299)
    np.testing.assert_allclose(cp.asnumpy(got), resize.resize_bilinear(x, 299, 299), **tol)


@pytest.mark.gpu
@needs_gpu
def test_features_cupy_match_numpy(rng):
    import cupy as cp
    units = inception.fold_batchnorm(inception.random_weights(0))
    images = rng.uniform(0, 1, (2, 3, 32, 32)).astype(np.float32)
    cpu = inception.InceptionV3FID(units, np).features(images)
    gpu = inception.InceptionV3FID(units, cp).features(cp.asarray(images))
    assert isinstance(gpu, np.ndarray) and gpu.shape == (2, 2048)
    assert np.linalg.norm(gpu - cpu) / np.linalg.norm(cpu) < 1e-4
