"The renderer with every kind of source of `dhs.sources` / `dhs.templates` (no lenstronomy needed)."
import numpy as np
from dhs.lensing import Lens
from dhs.render import render_lensed, render_lensed_batch
from dhs.sources import SersicSource, ClumpySource
from dhs.templates import template_from_stamp, TemplateSource


def _template_source():
    yy, xx = np.mgrid[:41, :41] - 20.
    stamp = np.exp(-(xx**2/30 + yy**2/12)) + 0.3*np.exp(-((xx - 6)**2 + (yy - 3)**2)/4)
    return TemplateSource(template_from_stamp(1, stamp), 0.25, 0.8, 0.3, 0.05, 0.02)


def test_every_source_kind_matches_uniform_supersampling():
    lens = Lens(1.2, 0.8, 0.4, 0.02, 0.01)
    sources = [SersicSource(0.1, 3.0, 0.7, 0.2, 0.05, 0.02),
               ClumpySource(0.3, np.random.default_rng(1), n=1.0, q=0.8, x0=0.05, y0=0.02, n_clumps=3),
               _template_source()]
    fluxes, fwhm = [1., 2., 3.], [1.3, 1.2, 1.1]
    adaptive = render_lensed_batch(sources, [lens]*3, fluxes, fwhm, dx=0.2, dy=-0.3)
    for src, r in zip(sources, adaptive):
        ref = render_lensed(src, lens, fluxes, fwhm, dx=0.2, dy=-0.3, supersample=16)
        assert np.abs(r.stamp - ref.stamp).max() < 3e-3*ref.stamp.max(), src
        assert r.multiplicity == ref.multiplicity == 4
        assert abs(r.magnification/ref.magnification - 1) < 3e-3
        assert r.n_rays < ref.n_rays/10
