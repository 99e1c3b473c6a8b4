"""Renderer against lenstronomy (a test dependency only): SIE + SHEAR, SERSIC_ELLIPSE, supersampled, PSF-convolved.

Conventions matched here (and in `dhs.bench_inject`):
- pixel grid: lenstronomy `PixelGrid` with transform_pix2angle = diag(p, p) and the angle of pixel (0, 0) at
  ((-N//2 - dx) p, (-N//2 - dy) p): lenstronomy's first coordinate is our x (+x = west, increasing with the
  column), its image[row, col] is ours;
- Sérsic: lenstronomy uses the approximate b_n = 1.9992 n - 0.3271, ours is exact; the same profile has
  R_lt = R_e (b_lt / b_n)^n and amp = I_e exp(b_n - b_lt), with I_e from our analytic total flux;
- PSF: the reference is physical: lenstronomy evaluates the source on a grid 16x finer, convolves it there with the
  point-sampled PSF (`supersampling_convolution=True`) and bins to pixels, so the pixel is integrated once and
  nothing is shared with dhs, which gets the pixelised PSF (the PSF integrated over a pixel, as a survey's is).
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


def physical_reference(lens, src, flux, fwhm, dx, dy, supersampling=16):
    "lenstronomy's physically convolved image: the source on a 16x finer grid, convolved there with the (point-sampled) Gaussian, then binned."
    from lenstronomy.Data.psf import PSF
    from lenstronomy.Data.pixel_grid import PixelGrid
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.LightModel.light_model import LightModel
    from lenstronomy.ImSim.image_model import ImageModel
    grid = PixelGrid(nx=N, ny=N, transform_pix2angle=np.diag([P, P]), ra_at_xy_0=-N//2*P, dec_at_xy_0=-N//2*P)
    model = ImageModel(grid, PSF(psf_type='GAUSSIAN', fwhm=fwhm, truncation=6), LensModel(['SIE', 'SHEAR']), LightModel(['SERSIC_ELLIPSE']),
                       kwargs_numerics=dict(supersampling_factor=supersampling, supersampling_convolution=True))
    return model.image(*lenstronomy_kwargs(lens, src, flux, dx, dy))


def compact_configs(n, seed):
    "Random lenses as `random_configs`, a third of them with the grids' most compact sources (R_e 0.05\")."
    for k, (lens, src, fwhm, dx, dy) in enumerate(random_configs(n, seed)):
        yield lens, (src if k % 3 else SersicSource(0.05, src.n, src.q, src.phi, src.x0, src.y0)), fwhm, dx, dy


def test_matches_a_physically_convolved_reference():
    "20 random lenses, R_e down to 0.05\": dhs (pixelised PSF, the pixel integrated once) within 1% of the peak of lenstronomy's "
    "physically convolved image; integrating over the pixel twice (the pixel-averaged source convolved with the pixelised PSF) is not."
    from dhs.psf import convolve
    worst, worst_double = 0., 0.
    for lens, src, fwhm, dx, dy in compact_configs(20, 7):
        ref = physical_reference(lens, src, 1.0, fwhm, dx, dy)
        r = render_lensed(src, lens, [1.0], [fwhm], dx=dx, dy=dy)
        worst = max(worst, np.abs(r.stamp[0] - ref).max()/ref.max())
        double = convolve(r.unconvolved[0], gaussian_kernel(fwhm))
        worst_double = max(worst_double, np.abs(double - ref).max()/ref.max())
        assert abs(r.stamp[0].sum() - ref.sum()) < 0.01*ref.sum()           # flux in the stamp
    assert worst <= 0.01, worst
    assert worst_double > 0.02, worst_double                                   # the old discretisation fails this test


def test_survey_like_pixelised_psf_matches_reference():
    "An elliptical Moffat + wing given pixelised, against lenstronomy convolving with it point-sampled on its 16x grid."
    from dhs.bench_inject import bench_configs, bench_kernel, lenstronomy_renderer
    ref_render = lenstronomy_renderer(16)
    for lens, src, psf, dx, dy in bench_configs(6, 11):
        ref = ref_render(lens, src, 1.0, psf, dx, dy)[0]
        ours = render_lensed(src, lens, [1.0], [1.0], dx=dx, dy=dy, psf_kernels=[bench_kernel(psf)]).stamp[0]
        assert np.abs(ours - ref).max() <= 0.01*ref.max(), (lens, src, psf)


@pytest.mark.parametrize('r_eff', [0.05, 0.02])
def test_compact_source_centroid_at_every_subpixel_offset(r_eff):
    "A compact round source, barely lensed, lands where its image is: centroid within 0.05 px at eleven sub-pixel host offsets."
    from dhs.lensing import image_positions
    lens, xs, ys = Lens(0.2, 0.9, 0.3), 1.0, 0.3
    xi, yi, mu = image_positions(xs, ys, lens); j = int(np.argmax(np.abs(mu)))
    rows, cols = np.indices((N, N))
    for off in np.linspace(-0.5, 0.49, 11):
        st = render_lensed(SersicSource(r_eff, 1.0, 1.0, 0.0, xs, ys), lens, [1.0], [1.2], dx=off, dy=-off/2).stamp[0]
        cx, cy = xi[j]/P + N//2 + off, yi[j]/P + N//2 - off/2                 # col = x / p + N//2 + dx (DESIGN.md)
        w = np.hypot(cols - cx, rows - cy) < 8                                 # the bright image alone
        mx, my = (st*w*cols).sum()/(st*w).sum(), (st*w*rows).sum()/(st*w).sum()
        assert np.hypot(mx - cx, my - cy) < 0.05, (off, mx - cx, my - cy)
