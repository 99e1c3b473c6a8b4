"""Heavier checks of dhs.sources and dhs.psf: lenstronomy agreement, flux normalisation over a grid of
shapes, the Tractor shape convention on a rendered galaxy, clumpy-source bookkeeping, PSF centring."""
import json
import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.special import gammainc
from dhs.sources import (sersic_sb, sersic_bn, sersic_total_flux, elliptical_radius, SersicSource, ClumpySource,
                         tractor_shape_to_q_phi, q_phi_to_tractor_shape, band_fluxes_from_mag, nmgy_to_mag,
                         draw_source_colours, _enclosed_numeric, _grid)
from dhs.psf import (gaussian_kernel, moffat_kernel, convolve, psf_noise_equivalent_area, moffat_fwhm_from_psfsize,
                     FWHM_PER_SIGMA)


@pytest.mark.parametrize('seed', range(4))
def test_sersic_matches_lenstronomy_geometry(seed):
    "Same SERSIC_ELLIPSE surface brightness as lenstronomy (with its approximate b_n) for random shapes."
    from lenstronomy.LightModel.light_model import LightModel
    import lenstronomy.Util.param_util as param_util
    rng = np.random.default_rng(seed)
    q, phi, n, re = rng.uniform(0.2, 1.0), rng.uniform(0, np.pi), rng.uniform(0.5, 4), rng.uniform(0.05, 1.0)
    cx, cy = rng.uniform(-0.3, 0.3, 2)
    e1, e2 = param_util.phi_q2_ellipticity(phi, q)
    phi_back, q_back = param_util.ellipticity2phi_q(e1, e2)
    assert np.isclose(q_back, q) and np.isclose(np.mod(phi_back, np.pi), phi)
    x, y = rng.uniform(-2, 2, (2, 500))
    theirs = LightModel(['SERSIC_ELLIPSE']).surface_brightness(x, y, [dict(amp=1.7, R_sersic=re, n_sersic=n, e1=e1, e2=e2,
                                                                        center_x=cx, center_y=cy)])
    bn = 1.9992 * n - 0.3271
    ours = 1.7 * np.exp(-bn * ((elliptical_radius(x, y, q, phi, cx, cy) / re) ** (1 / n) - 1))
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize('n', [0.5, 1.0, 1.5, 2.5, 4.0, 6.0])
@pytest.mark.parametrize('q', [0.3, 1.0])
def test_sersic_flux_normalisation(n, q):
    "Flux inside 4 R_e on a fine grid equals the analytic enclosed fraction to 0.1%, for many n and q."
    re, phi = 0.25, 0.9
    r_max = 4 * re
    core = re / 8
    num = _enclosed_numeric(lambda x, y: sersic_sb(x, y, 2.0, re, n, q, phi), r_max, q, phi,
                            step=re / 60, core=core, core_step=re / (400 if n < 3 else 2000))
    exact = 2.0 * gammainc(2 * n, sersic_bn(n) * (r_max / re) ** (1 / n))
    assert abs(num / exact - 1) < 1e-3


def test_sersic_total_flux_whole_plane():
    "For n = 1 the whole plane (box of 30 R_e) holds the requested total flux to 0.1%."
    x, y, a = _grid(15 * 0.2, 0.2 / 60)
    assert abs(sersic_sb(x, y, 5.0, 0.2, 1.0, 0.6, 0.3).sum() * a / 5.0 - 1) < 1e-3
    assert np.isclose(sersic_total_flux(1.0, 0.2, 1.0) * (sersic_sb(0.2, 0.0, 1.0, 0.2, 1.0) / 1.0), 1.0)


@pytest.mark.parametrize('e1,e2', [(0.3, 0.0), (-0.2, 0.1), (0.05, -0.4), (0.25, 0.25)])
def test_tractor_shape_on_rendered_galaxy(e1, e2):
    """A galaxy rendered with our (q, phi) from SHAPE_E1/E2 has, measured from its pixels, the position
    angle east of north theta = atan2(e2, e1)/2 and axis ratio (1-|e|)/(1+|e|) of Tractor's EllipseE."""
    q, phi = tractor_shape_to_q_phi(e1, e2)
    N, pix = 201, 0.05
    col, row = np.meshgrid(np.arange(N), np.arange(N))
    x, y = (col - N // 2) * pix, (row - N // 2) * pix          # +x = west, +y = north
    img = sersic_sb(x, y, 1.0, 0.25, 1.0, q, phi)
    east, north = -x, y
    f = img.sum()
    cov = np.array([[(img * east * east).sum(), (img * east * north).sum()],
                    [(img * east * north).sum(), (img * north * north).sum()]]) / f
    lam, vec = np.linalg.eigh(cov)
    major = vec[:, 1]                                           # (east, north) components
    pa = np.mod(np.arctan2(major[0], major[1]), np.pi)          # from north through east
    theta = np.mod(0.5 * np.arctan2(e2, e1), np.pi)
    assert abs(np.angle(np.exp(2j * (pa - theta)))) / 2 < 1e-3
    e = np.hypot(e1, e2)
    assert np.isclose(np.sqrt(lam[0] / lam[1]), (1 - e) / (1 + e), atol=2e-3)
    back = q_phi_to_tractor_shape(q, phi)
    np.testing.assert_allclose(back, (e1, e2), atol=1e-12)


@pytest.mark.parametrize('seed', range(5))
def test_clumpy_source_bookkeeping(seed):
    "Unit flux, requested clump fraction, band totals, bluer clumps, deterministic and serialisable params."
    rng = np.random.default_rng(seed)
    frac = rng.uniform(0.05, 0.4)
    src = ClumpySource(0.3, np.random.default_rng(100 + seed), q=rng.uniform(0.4, 1), phi=rng.uniform(0, np.pi),
                       x0=0.1, clump_frac=frac)
    x, y, a = _grid(2.5, 0.004)
    assert abs(src.sb(x, y).sum() * a - 1) < 1e-3
    assert abs(frac * src.clumps_sb(x, y).sum() * a - frac) < 1e-3
    F = band_fluxes_from_mag(21.5, *draw_source_colours(rng))
    sbb = src.sb_bands(x, y, F)
    np.testing.assert_allclose(sbb.sum((1, 2)) * a, F, rtol=1e-3)
    # colour of the clump light alone vs the disk light alone (separate by subtracting the disk)
    fb = src.band_clump_fractions()
    clump = [F[b] * fb[b] for b in range(3)]; disk = [F[b] * (1 - fb[b]) for b in range(3)]
    gr_c, gr_d = nmgy_to_mag(clump[0]) - nmgy_to_mag(clump[1]), nmgy_to_mag(disk[0]) - nmgy_to_mag(disk[1])
    assert np.isclose(gr_d - gr_c, src.clump_dgr)
    p = src.params()
    json.dumps(p)
    assert p == ClumpySource(0.3, np.random.default_rng(100 + seed), q=src.disk.q, phi=src.disk.phi, x0=0.1,
                             clump_frac=frac).params()


def test_convolve_matches_direct_convolution():
    "FFT convolution equals scipy.ndimage's direct convolution (zero boundary) on a random image."
    rng = np.random.default_rng(0)
    img = rng.uniform(size=(3, 40, 40))
    ks = np.stack([gaussian_kernel(f) for f in (1.0, 1.3, 1.6)][:1] * 3)
    out = convolve(img, ks)
    for b in range(3):
        direct = ndi.convolve(img[b], ks[b], mode='constant', cval=0.0)
        np.testing.assert_allclose(out[b], direct, atol=1e-12)


@pytest.mark.parametrize('fwhm', [0.8, 1.3, 2.2])
def test_gaussian_through_gaussian_stays_centred(fwhm):
    "A pixel-integrated point convolved twice stays at its pixel with variance adding up."
    img = np.zeros((64, 64)); img[32, 32] = 1.0
    out = convolve(convolve(img, gaussian_kernel(fwhm)), gaussian_kernel(fwhm))
    yy, xx = np.indices(out.shape)
    assert abs((out * yy).sum() / out.sum() - 32) < 1e-6 and abs((out * xx).sum() / out.sum() - 32) < 1e-6
    var = (out * (xx - 32) ** 2).sum() / out.sum()
    s = fwhm / FWHM_PER_SIGMA / 0.262
    assert np.isclose(var, 2 * (s**2 + 1 / 12), rtol=2e-3)


def test_kernel_larger_than_stack():
    "A (3, 16, 16) stack with a (3, 51, 51) Moffat stack: no crash, same shape, centred."
    img = np.zeros((3, 16, 16)); img[:, 8, 8] = 1.0
    ks = np.stack([moffat_kernel(2.0, size=51)] * 3)
    out = convolve(img, ks)
    assert out.shape == (3, 16, 16)
    np.testing.assert_allclose(out[1], ks[1][25 - 8:25 + 8, 25 - 8:25 + 8], atol=1e-12)


@pytest.mark.parametrize('psfsize', [0.9, 1.4, 2.0])
def test_moffat_0811_noise_equivalent_area(psfsize):
    "A beta = 3.5 Moffat of FWHM 0.811 psfsize has the NEA of a Gaussian of FWHM psfsize (fine pixels, 0.2%)."
    ps = 0.03
    g = psf_noise_equivalent_area(gaussian_kernel(psfsize, ps), ps)
    m = psf_noise_equivalent_area(moffat_kernel(moffat_fwhm_from_psfsize(psfsize), pixscale=ps, flux_frac=0.99999,
                                                oversample=3), ps)
    assert abs(m / g - 1) < 2e-3
