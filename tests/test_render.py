"""Renderer against lenstronomy (a test dependency only): SIE + SHEAR, SERSIC_ELLIPSE, supersampled, PSF-convolved.

Conventions matched here (and in `dhs.bench_inject`):
- pixel grid: lenstronomy `PixelGrid` with transform_pix2angle = diag(p, p) and the angle of pixel (0, 0) at
  ((-N//2 - dx) p, (-N//2 - dy) p): lenstronomy's first coordinate is our x (+x = west, increasing with the
  column), its image[row, col] is ours;
- Sérsic: lenstronomy uses the approximate b_n = 1.9992 n - 0.3271, ours is exact; the same profile has
  R_lt = R_e (b_lt / b_n)^n and amp = I_e exp(b_n - b_lt), with I_e from our analytic total flux;
- PSF: our kernel handed to lenstronomy as a PIXEL kernel, or lenstronomy's GAUSSIAN (a point-sampled kernel)
  against our point-sampled `gaussian_kernel(..., oversample=1)` of the same size.
"""
import numpy as np
import pytest
from dhs.lensing import Lens, sample_source_position
from dhs.sources import SersicSource
from dhs.psf import gaussian_kernel
from dhs.render import render_lensed

pytest.importorskip('lenstronomy')
pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')  # lenstronomy's numpy-2 FFT calls
N, P = 64, 0.262


def lenstronomy_model(supersampling, psf):
    from lenstronomy.Data.pixel_grid import PixelGrid
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.LightModel.light_model import LightModel
    from lenstronomy.ImSim.image_model import ImageModel
    grid = PixelGrid(nx=N, ny=N, transform_pix2angle=np.diag([P, P]), ra_at_xy_0=-N//2*P, dec_at_xy_0=-N//2*P)
    return ImageModel(grid, psf, LensModel(['SIE', 'SHEAR']), LightModel(['SERSIC_ELLIPSE']),
                      kwargs_numerics=dict(supersampling_factor=supersampling))


def lenstronomy_kwargs(lens, src, flux, dx, dy):
    "lenstronomy kwargs for our lens and source, shifted by the host offset (dx, dy) pixels (the bench's conversion)."
    from dhs.bench_inject import lenstronomy_kwargs as convert
    return convert(lens, src, flux, dx, dy, P)


def random_configs(n, seed):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        g, a = rng.uniform(0, 0.1), rng.uniform(0, np.pi)
        lens = Lens(rng.uniform(0.5, 2.5), rng.uniform(0.5, 1.0), rng.uniform(0, np.pi), g*np.cos(2*a), g*np.sin(2*a))
        xs, ys = sample_source_position(lens, rng)
        src = SersicSource(rng.uniform(0.05, 0.5), rng.uniform(0.5, 4.0), rng.uniform(0.5, 1.0), rng.uniform(0, np.pi), xs, ys)
        yield lens, src, rng.uniform(1.0, 2.0), rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5)


def test_same_sampling_as_lenstronomy_to_round_off():
    "Uniform 4 x 4 sampling: the same rays through the same model, so the stamps agree to ~1e-6 of the peak."
    from lenstronomy.Data.psf import PSF
    model = lenstronomy_model(4, PSF(psf_type='NONE'))
    for lens, src, fwhm, dx, dy in random_configs(6, 0):
        kernel = gaussian_kernel(fwhm)
        model.update_psf(PSF(psf_type='PIXEL', kernel_point_source=kernel))
        lt = model.image(*lenstronomy_kwargs(lens, src, 3.0, dx, dy))
        ours = render_lensed(src, lens, [3.0], [fwhm], dx=dx, dy=dy, supersample=4).stamp[0]
        assert np.abs(ours - lt).max() < 1e-5*lt.max(), (lens, src)


def test_adaptive_stamps_match_lenstronomy_supersampled():
    "Our adaptive renderer against lenstronomy at supersampling 16: <= 1% of the peak after the PSF."
    from lenstronomy.Data.psf import PSF
    model = lenstronomy_model(16, PSF(psf_type='NONE'))
    worst = 0.
    for lens, src, fwhm, dx, dy in random_configs(8, 1):
        kernel = gaussian_kernel(fwhm)
        model.update_psf(PSF(psf_type='PIXEL', kernel_point_source=kernel))
        lt = model.image(*lenstronomy_kwargs(lens, src, 2.0, dx, dy))
        r = render_lensed(src, lens, [2.0], [fwhm], dx=dx, dy=dy)
        err = np.abs(r.stamp[0] - lt).max()/lt.max()
        worst = max(worst, err)
        assert err <= 0.01, (err, lens, src)
        assert abs(r.flux_lensed[0] - lt.sum())/lt.sum() < 0.01  # flux in the stamp (PSF conserves it)
    assert worst > 0  # the comparison ran


def test_lenstronomy_gaussian_psf_type():
    "lenstronomy's own GAUSSIAN PSF (point-sampled, 5 sigma) against our point-sampled kernel of the same size."
    from lenstronomy.Data.psf import PSF
    model = lenstronomy_model(8, PSF(psf_type='NONE'))
    for lens, src, fwhm, dx, dy in random_configs(4, 2):
        model.update_psf(PSF(psf_type='GAUSSIAN', fwhm=fwhm))
        lt = model.image(*lenstronomy_kwargs(lens, src, 1.0, dx, dy))
        sigma_pix = fwhm/2.3548200450309493/P
        size = 2*int(5*sigma_pix + 0.5) + 1  # scipy.ndimage.gaussian_filter's radius at truncate=5
        kernel = gaussian_kernel(fwhm, P, size=size, oversample=1)
        ours = render_lensed(src, lens, [1.0], [fwhm], dx=dx, dy=dy, supersample=8, psf_kernels=[kernel]).stamp[0]
        assert np.abs(ours - lt).max() < 2e-3*lt.max(), (lens, src)
