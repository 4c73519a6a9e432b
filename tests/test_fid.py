"""Frechet distance against closed forms; streaming statistics; the fid and
fid-stats commands end to end on PNG folders (random Inception weights).

The end-to-end tests run the whole 2048-feature Inception but keep only the
first 64 features (`_few_features`): scipy's sqrtm of a 2048 x 2048 matrix
takes 30-100 s on 2 CPU cores, and the statistics code is the same at any
dimension (it is checked on its own below)."""
import os
import re
import warnings

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ttfm_np import fid, recipes


def test_identical_statistics_give_zero(rng):
    a = rng.standard_normal((500, 6))
    st = fid.FeatureStats(6)
    st.update(a)
    assert abs(fid.frechet_distance(st.mu, st.sigma, st.mu, st.sigma)) < 1e-9


def test_commuting_covariances_closed_form(rng):
    """Diagonal covariances commute: FID = |mu1 - mu2|^2 + sum (sqrt(d1) - sqrt(d2))^2."""
    d1, d2 = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum()
    assert fid.frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(expected, rel=1e-10)
    Q, _ = np.linalg.qr(rng.standard_normal((8, 8)))           # same rotation of both: still commuting
    got = fid.frechet_distance(Q @ mu1, Q @ np.diag(d1) @ Q.T, Q @ mu2, Q @ np.diag(d2) @ Q.T)
    assert got == pytest.approx(expected, rel=1e-8)


def test_matches_an_eigenvalue_formula_for_general_covariances(rng):
    """tr sqrtm(s1 s2) = sum sqrt(eig(s1^1/2 s2 s1^1/2)) (a symmetric PSD matrix similar to s1 s2)."""
    a, b = rng.standard_normal((40, 12)), rng.standard_normal((12, 12))
    s1, s2 = np.cov(a, rowvar=False), b @ b.T / 12 + 0.1 * np.eye(12)
    mu1, mu2 = rng.standard_normal(12), rng.standard_normal(12)
    w, V = np.linalg.eigh(s1)
    r1 = (V * np.sqrt(w)) @ V.T
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) \
        - 2 * np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    # one dimension: (m1 - m2)^2 + (sqrt v1 - sqrt v2)^2
    assert fid.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)


def test_large_imaginary_part_is_a_clear_error():
    # not covariances (negative definite): sqrtm(s1 s2) = sqrtm(-I) = i I
    with pytest.raises(ValueError, match="imaginary component"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), -np.eye(3))


def test_streaming_stats_are_exact_for_a_large_mean(rng):
    """Shifted sums: a mean of 1e6 with unit spread must not cancel to garbage."""
    a = rng.standard_normal((1000, 4)) + 1e6
    st = fid.FeatureStats()
    for chunk in np.array_split(a, 3):
        st.update(chunk)
    np.testing.assert_allclose(st.sigma, np.cov(a, rowvar=False), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="dimensions"):
        st.update(np.zeros((2, 5)))


def test_images_enter_as_8_bit_pngs_would():
    x = np.array([-1.5, -1.0, 0.0, 0.999, 2.0], np.float32).reshape(1, 1, 1, 5)
    u = fid.to_unit_range_8bit(x)
    assert u.shape == (1, 3, 1, 5) and u.dtype == np.float32         # gray repeated to RGB
    np.testing.assert_allclose(u[0, 0, 0] * 255, [0, 0, 128, 255, 255], atol=1e-4)


class _PixelFeatures:
    """Stands in for Inception: the first 8 pixel values as features."""
    def features(self, x):
        return np.asarray(x).reshape(len(x), -1)[:, :8].astype(np.float64)


def test_stats_of_samples_equal_stats_of_their_pngs(tmp_path, rng):
    x = np.clip(rng.standard_normal((5, 3, 4, 4)) * 0.7, -1.2, 1.2).astype(np.float32)   # some out of range
    for i, img in enumerate(x):
        v = np.rint((np.clip(img, -1, 1) + 1) * 127.5).astype(np.uint8).transpose(1, 2, 0)
        Image.fromarray(v).save(tmp_path / f"{i:03d}.png")
    direct = fid.stats_of_images(_PixelFeatures(), [x[:2], x[2:]])
    files = fid.png_files(str(tmp_path))
    from_pngs = fid.stats_of_images(_PixelFeatures(), fid.iter_png_batches(files, 3))
    np.testing.assert_allclose(direct.mu, from_pngs.mu, atol=1e-6)
    np.testing.assert_allclose(direct.sigma, from_pngs.sigma, atol=1e-6)
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "999.png")       # another size
    with pytest.raises(ValueError, match="different sizes"):
        fid.stats_of_images(_PixelFeatures(), fid.iter_png_batches(fid.png_files(str(tmp_path)), 3))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no PNG"):
        fid.png_files(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        fid.png_files(str(tmp_path / "nowhere"))


def test_streaming_stats_match_numpy(rng):
    a = rng.standard_normal((301, 5)) * [1, 2, 3, 4, 5] + 7
    st = fid.FeatureStats(5)
    for chunk in np.array_split(a, 7):
        st.update(chunk)
    np.testing.assert_allclose(st.mu, a.mean(0), rtol=1e-12)
    np.testing.assert_allclose(st.sigma, np.cov(a, rowvar=False), rtol=1e-9)


def test_near_singular_covariances_do_not_give_nan(rng):
    a = rng.standard_normal((10, 50))                           # 10 samples in 50 dims: rank 9
    b = rng.standard_normal((10, 50)) + 0.5
    sa, sb = fid.FeatureStats(50), fid.FeatureStats(50)
    sa.update(a)
    sb.update(b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = fid.frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
    assert np.isfinite(d) and d > 0
    with pytest.warns(UserWarning, match="biased upward"):
        fid.warn_if_few(10)


def test_stats_file_round_trip_and_errors(tmp_path, rng):
    p = tmp_path / "s.npz"
    fid.save_stats(str(p), np.ones(3), np.eye(3), 5, "x")
    mu, sigma, n = fid.load_stats(str(p))
    assert n == 5 and (sigma == np.eye(3)).all()
    with pytest.raises(FileNotFoundError, match="fid-stats"):
        fid.load_stats(str(tmp_path / "none.npz"))
    with pytest.raises(ValueError, match="different shapes"):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def _score(output):
    line = [l for l in output.splitlines() if re.match(r"FID -?\d", l)][-1]
    return float(line.split()[1])


def _few_features(monkeypatch, dims=64):
    """The real network, but only its first `dims` pool3 features (keeps sqrtm cheap, see the docstring)."""
    from ttfm_np import inception
    full = inception.InceptionV3FID.features
    monkeypatch.setattr(inception.InceptionV3FID, "features", lambda self, x, chunk=32: full(self, x, chunk)[:, :dims])
    on_device = inception.InceptionV3FID.device_features               # what stats_of_images calls
    monkeypatch.setattr(inception.InceptionV3FID, "device_features",
                        lambda self, x, chunk=32: on_device(self, x, chunk)[:, :dims])


def _random_inception_in_data_dir(tmp_path, monkeypatch, seed):
    """data/ -> tmp_path, holding inception_fid.h5 with random weights (no torch needed)."""
    from ttfm_np import inception
    monkeypatch.setattr(recipes, "DATA_DIR", str(tmp_path))         # the data root (recipes.data_root)
    units = inception.fold_batchnorm(inception.random_weights(seed))
    inception.save_units(units, str(tmp_path / inception.WEIGHTS_H5), source="random")
    _few_features(monkeypatch)


@pytest.mark.torch
def test_convert_inception_command(tmp_path, monkeypatch):
    """A .pth written by torch -> convert-inception -> HDF5 with the folded units; a .pth left in data/
    is converted on first use."""
    torch = pytest.importorskip("torch", reason="PyTorch not installed: cannot write a random Inception .pth")
    import cli
    from test_inception import random_fid_inception
    from ttfm_np import inception
    monkeypatch.setattr(recipes, "DATA_DIR", str(tmp_path))
    sd = random_fid_inception(1).state_dict()
    torch.save(sd, tmp_path / "inception.pth", _use_new_zipfile_serialization=False)      # legacy, like the real file
    r = CliRunner()
    res = r.invoke(cli.cli, ["convert-inception", str(tmp_path / "inception.pth")])
    assert res.exit_code == 0, res.output
    model = inception.load_inception(str(tmp_path / inception.WEIGHTS_H5), np)
    expected = inception.fold_batchnorm({k: v.numpy() for k, v in sd.items()})
    assert set(model.units) == set(expected)
    for name, (W, b) in expected.items():
        np.testing.assert_array_equal(model.units[name][0], W, err_msg=name)
        np.testing.assert_array_equal(model.units[name][1], b, err_msg=name)
    res = r.invoke(cli.cli, ["convert-inception", str(tmp_path / "nowhere.pth")])
    assert res.exit_code != 0 and "github.com/mseitzer/pytorch-fid" in res.output
    os.remove(tmp_path / inception.WEIGHTS_H5)
    torch.save(sd, tmp_path / inception.WEIGHTS_PTH)
    inception.load_inception(xp=np)
    assert os.path.exists(tmp_path / inception.WEIGHTS_H5)


def test_fid_commands_on_png_folders(tmp_path, rng, monkeypatch):
    import cli
    _random_inception_in_data_dir(tmp_path, monkeypatch, 1)
    r = CliRunner()
    for name, shift in (("a", 0), ("c", 120)):
        (tmp_path / name).mkdir()
        for i in range(2):
            img = np.clip(rng.integers(0, 136, (16, 16, 3)) + shift, 0, 255).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / name / f"{i}.png")
    same = r.invoke(cli.cli, ["fid", "--folder", str(tmp_path / "a"), "--ref", str(tmp_path / "a")])
    assert same.exit_code == 0, same.output
    assert abs(_score(same.output)) < 1e-3
    far = r.invoke(cli.cli, ["fid", "--folder", str(tmp_path / "a"), "--ref", str(tmp_path / "c")])
    assert far.exit_code == 0, far.output
    assert _score(far.output) > 0.1                          # brighter images: clearly apart (same: 0)
    res = r.invoke(cli.cli, ["fid-stats", "--data", str(tmp_path / "c"), "--out", str(tmp_path / "c.npz")])
    assert res.exit_code == 0, res.output
    res = r.invoke(cli.cli, ["fid", "--folder", str(tmp_path / "a"), "--ref", str(tmp_path / "c.npz")])
    assert res.exit_code == 0 and _score(res.output) == pytest.approx(_score(far.output), abs=2e-3), res.output
    res = r.invoke(cli.cli, ["fid", "--folder", str(tmp_path / "a")])
    assert res.exit_code != 0 and "--ref" in res.output
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a" / "9.png")    # a different size
    res = r.invoke(cli.cli, ["fid", "--folder", str(tmp_path / "a"), "--ref", str(tmp_path / "c"), "--batch-size", "2"])
    assert res.exit_code != 0 and "different sizes" in res.output and "Traceback" not in res.output


def test_missing_weights_error_names_file_and_address(tmp_path, monkeypatch):
    import cli
    from ttfm_np import inception
    monkeypatch.setattr(recipes, "DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        inception.load_inception()
    assert inception.WEIGHTS_PTH in str(e.value) and "github.com/mseitzer/pytorch-fid" in str(e.value)
    (tmp_path / "a").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a" / "0.png")
    res = CliRunner().invoke(cli.cli, ["fid", "--folder", str(tmp_path / "a"), "--ref", str(tmp_path / "a")])
    assert res.exit_code != 0 and inception.WEIGHTS_URL in res.output and "Traceback" not in res.output


def test_fid_of_a_checkpoint_against_dataset_stats(tmp_path, rng, monkeypatch):
    """train (tiny U-Net, 2 steps) -> fid-stats of its imagefolder data -> fid --ckpt, end to end."""
    import cli
    from ttfm_np import fid as fid_mod
    _random_inception_in_data_dir(tmp_path, monkeypatch, 2)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)).save(imgs / f"{i}.png")
    data = f"imagefolder:{imgs}"
    r = CliRunner()
    res = r.invoke(cli.cli, ["train", "--data", data, "--model", "tiny", "--steps", "2", "--batch-size", "2",
                             "--resolution", "16", "--out", str(tmp_path / "t")])
    assert res.exit_code == 0, res.output
    res = r.invoke(cli.cli, ["fid-stats", "--data", data, "--resolution", "16"])
    assert res.exit_code == 0, res.output
    assert os.path.exists(fid_mod.default_stats_path(data, "train"))
    res = r.invoke(cli.cli, ["fid", "--ckpt", str(tmp_path / "t"), "--steps", "2", "--n", "3", "--batch-size", "2"])
    assert res.exit_code == 0, res.output
    assert np.isfinite(_score(res.output))
