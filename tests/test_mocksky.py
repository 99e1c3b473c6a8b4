"""The mock DR10 sky, measured: one small sky is generated per test session and checked against
the DR10 format (with astropy alone) and against its own catalogs and truth (PSF, noise, depth,
astrometry, photometry, contaminant rates, lenscat positions, HEALPix coverage)."""
import json, time
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from dhs import survey
from dhs.mocksky import MockSkyConfig, generate_mock_sky, plan_bricks, simulate_brick, object_model
from dhs.mockpop import CONTAMINANT_KINDS
from dhs.mockrender import bright_star_radius_arcsec

PIX = 0.262
FWHM_PER_SIGMA = 2 * np.sqrt(2 * np.log(2))
# 21 random bricks of 160 px + 3 lens bricks (grown to hold their lens); boosted densities and contaminant
# rates give enough objects to measure (about 100 LRG hosts, 70 stars) in ~20 s on 2 cores.
CFG = dict(n_bricks=24, brick_pixels=160, n_lenses=3, n_workers=2, lrg_per_arcmin2=20.0, star_per_arcmin2=8.0,
           bright_stars_per_brick=0.3, bad_regions_per_band=0.5, no_coverage_prob=0.1,
           rate_ring=0.2, rate_arm=0.2, rate_tidal=0.2, rate_merger=0.2, rate_companion=0.2)


@pytest.fixture(scope='session')
def sky(tmp_path_factory):
    "Generate the test sky once; yields (cfg, base folder, mock_sky.json record, truth, sweep)."
    out = tmp_path_factory.mktemp('mocksky')/'sky'
    cfg = MockSkyConfig(out=str(out), **CFG)
    t0 = time.time()
    rec = generate_mock_sky(cfg, log=lambda *a: None)
    rec['test_seconds'] = time.time() - t0
    truth = pd.read_parquet(out/'mock_truth.parquet')
    sweep = pd.concat([survey.read_sweep(out/p) for p in rec['sweeps']], ignore_index=True)
    return cfg, out, rec, truth, sweep


@pytest.fixture(scope='session')
def others(sky):
    "others(brick, objid) -> (3, P, P) noise-free model of everything in the brick but that object (re-simulated from its seed)."
    cfg, base, rec, truth, sweep = sky
    plan, cache = plan_bricks(cfg).set_index('BRICKNAME', drop=False), {}
    def f(brick, objid):
        if brick not in cache: cache[brick] = simulate_brick(cfg, dict(plan.loc[brick]))
        sim = cache[brick]
        i = int(np.flatnonzero((sim.truth.objid == objid).to_numpy())[0])
        return sim.model - object_model(sim, i)
    return f


def _planes(base, brick, kind):
    "(3, P, P) pixels of a per-band coadd kind, read with astropy only."
    return np.stack([fits.getdata(base/survey.coadd_relpath(brick, kind, b), 1).astype(float) for b in 'grz'])


def _brick(base, brick):
    "image, invvar, psfsize (3, P, P), maskbits (P, P) and the WCS of a brick, read with astropy."
    hdr = fits.getheader(base/survey.coadd_relpath(brick, 'image', 'r'), 1)
    mb = fits.getdata(base/survey.coadd_relpath(brick, 'maskbits'), 1)
    return _planes(base, brick, 'image'), _planes(base, brick, 'invvar'), _planes(base, brick, 'psfsize'), mb, WCS(hdr)


def test_generation_counts(sky):
    "Counts per class of the test sky (its generation time is printed, never asserted: speed lives in benchmarks)."
    cfg, base, rec, truth, sweep = sky
    print(f"test sky generated in {rec['test_seconds']:.0f} s")
    c = rec['counts']
    assert c['lrg_hosts'] >= 60 and c['true_lenses'] == 3
    assert {'lrg', 'disk', 'spiral', 'edgeon', 'sersic', 'compact', 'star'} <= set(c['per_class'])
    assert len(sweep) == rec['sweep_rows'] == truth.catalogued.sum()


def test_dr10_layout_and_headers_with_astropy(sky):
    cfg, base, rec, truth, sweep = sky
    bricks = fits.getdata(base/'survey-bricks.fits.gz', 1)
    assert set(np.char.strip(bricks['BRICKNAME'].astype(str))) == set(truth.brickname)
    for name in truth.brickname.unique()[:4]:
        row = bricks[np.char.strip(bricks['BRICKNAME'].astype(str)) == name][0]
        for rel in survey.brick_coadd_relpaths(name):
            assert rel.startswith(f'south/coadd/{name[:3]}/{name}/legacysurvey-{name}-') and rel.endswith('.fits.fz')
            with fits.open(base/rel) as hl:
                assert len(hl) == 2 and hl[0].data is None and isinstance(hl[1], fits.CompImageHDU)
                h, kind = hl[1].header, hl[1].data.dtype.kind
            with fits.open(base/rel, disable_image_compression=True) as raw:   # the tile-compressed table itself
                assert raw[1].header['ZIMAGE'] and raw[1].header['ZCMPTYPE'] == 'RICE_1'
            P = h['NAXIS1']
            assert h['NAXIS2'] == P and h['CTYPE1'] == 'RA---TAN' and h['CTYPE2'] == 'DEC--TAN'
            assert h['CRPIX1'] == h['CRPIX2'] == (P + 1) / 2
            assert np.isclose(h['CD1_1'], -PIX / 3600) and np.isclose(h['CD2_2'], PIX / 3600) and h['CD1_2'] == h['CD2_1'] == 0
            assert np.isclose(h['CRVAL1'], row['RA']) and np.isclose(h['CRVAL2'], row['DEC'])
            if '-image-' in rel: assert h['BUNIT'] == 'nanomaggy' and h['MAGZERO'] == 22.5 and kind == 'f'
            if '-invvar-' in rel: assert h['BUNIT'] == '1/nanomaggy^2'
            if '-psfsize-' in rel: assert h['BUNIT'] == 'arcsec'
            if 'maskbits' in rel: assert kind == 'i'
    for rel in rec['sweeps']:
        assert rel.startswith('south/sweep/10.1/sweep-') and rel.endswith('.fits')
        with fits.open(base/rel) as hl:
            assert hl[1].name == 'SWEEP'
            names = [n for n, _ in survey.SWEEP_COLUMNS]
            assert hl[1].columns.names == names
            for (n, dt), fmt in zip(survey.SWEEP_COLUMNS, hl[1].data.dtype.descr):
                assert fmt[1] == dt.replace('S', '|S'), (n, fmt, dt)   # big-endian numbers, as DR10 writes them
            t = hl[1].data
            assert set(np.char.strip(t['TYPE'].astype(str))) <= {'PSF', 'REX', 'DEV', 'EXP', 'SER'}
            assert (t['RELEASE'] >= 10000).all()


def _bright_stars(truth, sweep, min_snr):
    "Catalogued unsaturated stars on clean pixels (no mask bit), S/N > min_snr in r, away from bright stars' halos."
    s = sweep.merge(truth[truth.catalogued][['brickname', 'objid', 'cls', 'x', 'y']].rename(columns=dict(brickname='BRICKNAME', objid='OBJID')),
                    on=['BRICKNAME', 'OBJID'])
    s = s[(s.cls == 'star') & (s.MASKBITS == 0) & (s.FLUX_R * np.sqrt(s.FLUX_IVAR_R) > min_snr) & (s.NOBS_R > 0)]
    keep = []
    for _, r in s.iterrows():
        t = truth[(truth.brickname == r.BRICKNAME) & (truth.gaia_g > 0) & (truth.gaia_g < 16)]
        keep.append(not (np.hypot(t.x - r.x, t.y - r.y) * PIX < 1.5 * bright_star_radius_arcsec(t.gaia_g)).any())
    return s[np.array(keep, bool)]


def test_star_fwhm_matches_psfsize(sky, others):
    "Noise-equivalent-area FWHM of bright stars (neighbours' true models subtracted) = psfsize at their position, within 3%."
    cfg, base, rec, truth, sweep = sky
    stars = _bright_stars(truth, sweep, min_snr=150)
    assert len(stars) >= 8, f'only {len(stars)} bright isolated stars'
    ratios = []
    for name, g in stars.groupby('BRICKNAME'):
        img, iv, ps, mb, wcs = _brick(base, name)
        for _, s in g.iterrows():
            clean = img - others(name, s.OBJID)
            ix, iy = int(np.floor(s.x + 0.5)), int(np.floor(s.y + 0.5))
            h = 16
            if min(ix, iy) < h or max(ix, iy) >= img.shape[-1] - h: continue
            for b in range(3):
                cut, ivc = clean[b, iy - h:iy + h + 1, ix - h:ix + h + 1], iv[b, iy - h:iy + h + 1, ix - h:ix + h + 1]
                if (ivc <= 0).any(): continue
                nea = cut.sum() ** 2 / ((cut ** 2).sum() - (1 / ivc).sum())          # noise-bias corrected
                fwhm = np.sqrt(nea / (4 * np.pi)) * FWHM_PER_SIGMA * PIX
                ratios.append(fwhm / ps[b, iy, ix])
    ratios = np.array(ratios)
    assert len(ratios) >= 20
    assert abs(np.median(ratios) - 1) < 0.03, np.median(ratios)
    assert (np.abs(ratios - 1) < 0.06).mean() > 0.9, np.sort(ratios)


def test_blank_sky_rms_matches_invvar(sky):
    "Pixels far from every drawn object and unmasked: (image * sqrt(invvar)) has unit RMS within 2%."
    cfg, base, rec, truth, sweep = sky
    pulls = [[], [], []]
    for name in truth.brickname.unique():
        img, iv, ps, mb, wcs = _brick(base, name)
        P = img.shape[-1]
        yy, xx = np.mgrid[:P, :P]
        far = np.ones((P, P), bool)
        t = truth[truth.brickname == name]
        for r in t.itertuples():
            rad = 4 + 10 * r.r_eff / np.sqrt(r.q) + (np.nan_to_num(r.feat_radius) * 3 if r.cls in ('ring', 'arm', 'tidal') else 0)
            if r.cls in ('star', 'bright_star'): rad = max(6.0, 2 * bright_star_radius_arcsec(22.5 - 2.5 * np.log10(r.flux_r)) / 3)
            if r.cls == 'lensed_source': rad = 12.0
            far &= (xx - r.x) ** 2 + (yy - r.y) ** 2 > (rad / PIX) ** 2
        far &= (mb & survey.BAD_MASKBITS) == 0
        for b in range(3):
            ok = far & (iv[b] > 0)
            pulls[b].append((img[b] * np.sqrt(iv[b]))[ok])
    for b, p in enumerate(pulls):
        p = np.concatenate(p)
        assert len(p) > 20000
        assert abs(p.std() - 1) < 0.02, ('grz'[b], p.std(), len(p))
        assert abs(p.mean()) < 0.02


def test_psfdepth_and_galdepth_consistent_with_invvar_and_psf(sky):
    "Sweep PSFDEPTH = invvar / NEA(psfsize) at the object (5%); stars' FLUX_IVAR (their true profile) agrees too."
    cfg, base, rec, truth, sweep = sky
    got = []
    for name, g in sweep.groupby('BRICKNAME'):
        img, iv, ps, mb, wcs = _brick(base, name)
        x, y = wcs.world_to_pixel_values(g.RA.to_numpy(), g.DEC.to_numpy())
        ix, iy = np.clip(np.floor(x + 0.5).astype(int), 0, ps.shape[-1] - 1), np.clip(np.floor(y + 0.5).astype(int), 0, ps.shape[-1] - 1)
        for b, B in enumerate('GRZ'):
            nea = 4 * np.pi * (ps[b, iy, ix] / FWHM_PER_SIGMA / PIX) ** 2
            ok = (ps[b, iy, ix] > 0) & (iv[b, iy, ix] > 0)
            got.append(g[f'PSFDEPTH_{B}'].to_numpy()[ok] / (iv[b, iy, ix][ok] / nea[ok]))
            assert (g[f'GALDEPTH_{B}'].to_numpy()[ok] < g[f'PSFDEPTH_{B}'].to_numpy()[ok]).all()   # a galaxy is harder to detect
    got = np.concatenate(got)
    assert np.abs(got - 1).max() < 0.05, np.abs(got - 1).max()
    stars = _bright_stars(truth, sweep, min_snr=20)
    for B in 'GRZ':
        r = stars[f'FLUX_IVAR_{B}'] / stars[f'PSFDEPTH_{B}']
        assert abs(np.median(r) - 1) < 0.05, (B, np.median(r))
    depth = -2.5 * (np.log10(5 / np.sqrt(sweep.PSFDEPTH_R[sweep.PSFDEPTH_R > 0])) - 9)
    assert 23.3 < np.median(depth) < 25.3


def _centroid(img, x, y, sigma, iters=8):
    "Gaussian-weighted (adaptive) centroid [pixels] starting at (x, y)."
    h = int(4 * sigma) + 2
    ix, iy = int(round(x)), int(round(y))
    cut = img[iy - h:iy + h + 1, ix - h:ix + h + 1]
    yy, xx = np.mgrid[iy - h:iy + h + 1, ix - h:ix + h + 1]
    for _ in range(iters):
        w = np.exp(-0.5 * ((xx - x) ** 2 + (yy - y) ** 2) / sigma ** 2) * cut
        x, y = (w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()
    return x, y


def test_bright_source_centroids_at_catalogue_positions(sky, others):
    "Bright catalogued sources (stars and round-ish galaxies, neighbours subtracted): centroid = WCS pixel of the sweep RA/Dec within 0.05 px."
    cfg, base, rec, truth, sweep = sky
    s = sweep.merge(truth[truth.catalogued][['brickname', 'objid', 'cls']].rename(columns=dict(brickname='BRICKNAME', objid='OBJID')), on=['BRICKNAME', 'OBJID'])
    g_r = s.BRICKNAME.map({br['brick']: br['psf']['r']['g_eff'] for br in rec['bricks']})
    snr = s.FLUX_R / np.sqrt(1 / s.FLUX_IVAR_R.where(s.FLUX_IVAR_R > 0) + 4 / 3 * s.FLUX_R.clip(lower=0) / g_r)   # sky and the object's shot noise
    s = s[(s.MASKBITS == 0) & (snr > 250) & s.TYPE.isin(['PSF', 'REX', 'DEV', 'EXP', 'SER']) & (s.cls != 'spiral')]
    n = 0
    for name, g in s.groupby('BRICKNAME'):
        img, iv, ps, mb, wcs = _brick(base, name)
        x, y = wcs.world_to_pixel_values(g.RA.to_numpy(), g.DEC.to_numpy())
        for objid, xi, yi in zip(g.OBJID, x, y):
            if min(xi, yi) < 12 or max(xi, yi) > img.shape[-1] - 13: continue
            clean = img - others(name, objid)
            sigma = ps[1, int(round(yi)), int(round(xi))] / FWHM_PER_SIGMA / PIX
            cx, cy = _centroid(clean[1] + clean[2], xi, yi, sigma)
            assert np.hypot(cx - xi, cy - yi) < 0.05, (name, objid, xi, yi, cx, cy, g[g.OBJID == objid][['TYPE', 'FLUX_R', 'FLUX_IVAR_R', 'SHAPE_R']].to_dict('records'))
            n += 1
    assert n >= 6


def test_sweep_fluxes_are_truth_times_transmission_plus_noise(sky):
    cfg, base, rec, truth, sweep = sky
    t = truth[truth.catalogued].set_index(['brickname', 'objid'])
    s = sweep.set_index(['BRICKNAME', 'OBJID'])
    t = t.loc[s.index]
    g_eff = {(br['brick'], b): br['psf'][b]['g_eff'] for br in rec['bricks'] for b in 'grz'}
    for B, b in zip('GRZ', 'grz'):
        ok = (s[f'FLUX_IVAR_{B}'] > 0).to_numpy()
        f_true = t[f'flux_{b}'].to_numpy() * s[f'MW_TRANSMISSION_{B}']
        # DR10's FLUX_IVAR holds the sky noise only; the objects' own shot noise adds (4/3) F / g_eff (a point source, optimal weights)
        g = np.array([g_eff[(brick, b)] for brick in s.index.get_level_values(0)])
        var = 1 / np.where(ok, s[f'FLUX_IVAR_{B}'], 1) + 4 / 3 * np.clip(f_true, 0, None) / g
        pull = ((s[f'FLUX_{B}'] - f_true) / np.sqrt(var)).to_numpy()[ok]
        assert len(pull) > 150
        assert abs(pull.mean()) < 0.2 and 0.8 < pull.std() < 1.25, (B, pull.mean(), pull.std())
        np.testing.assert_allclose(s[f'MW_TRANSMISSION_{B}'], 10 ** (-0.4 * dict(G=3.214, R=2.165, Z=1.211)[B] * s.EBV), rtol=1e-5)
    w1 = (s.FLUX_W1 - t.flux_w1.to_numpy() * s.MW_TRANSMISSION_W1) * np.sqrt(s.FLUX_IVAR_W1)
    assert abs(w1.mean()) < 0.2 and 0.8 < w1.std() < 1.25
    assert (s.FLUX_I == 0).all() and (s.FLUX_IVAR_I == 0).all()


def test_lrg_hosts_pass_the_desi_cuts_on_sweep_fluxes(sky):
    "Catalogued LRG hosts are DEV and pass the DESI LRG south cuts measured on their sweep rows."
    from dhs.parent import desi_lrg_south
    cfg, base, rec, truth, sweep = sky
    s = sweep.merge(truth[truth.catalogued][['brickname', 'objid', 'cls']], left_on=['BRICKNAME', 'OBJID'], right_on=['brickname', 'objid'])
    d = {B: s[f'FLUX_{B}'] / s[f'MW_TRANSMISSION_{B}'] for B in ('G', 'R', 'Z', 'W1')}
    ok = desi_lrg_south(d['G'], d['R'], d['Z'], d['W1'], s.FIBERFLUX_Z / s.MW_TRANSMISSION_Z, s.FIBERTOTFLUX_Z / s.MW_TRANSMISSION_Z, s.GAIA_PHOT_G_MEAN_MAG)
    lrg = (s.cls == 'lrg').to_numpy()
    assert (s.TYPE[lrg] == 'DEV').all()
    assert ok[lrg].mean() > 0.9, ok[lrg].mean()
    assert ok[s.cls.isin(['star', 'bright_star']).to_numpy()].mean() < 0.05
    assert (s.FIBERTOTFLUX_Z >= s.FIBERFLUX_Z * 0.999).all(), s[s.FIBERTOTFLUX_Z < s.FIBERFLUX_Z * 0.999][['cls', 'FIBERFLUX_Z', 'FIBERTOTFLUX_Z']]   # (a fibre at a brick edge loses a little of its total)
    assert (s.FIBERFLUX_Z[lrg] < s.FLUX_Z[lrg]).all(), s[lrg & (s.FIBERFLUX_Z >= s.FLUX_Z).to_numpy()][['FIBERFLUX_Z', 'FLUX_Z', 'FLUX_IVAR_Z', 'MASKBITS']]


def test_contaminant_rates_on_lrg_hosts(sky):
    cfg, base, rec, truth, sweep = sky
    hosts = truth[truth.cls == 'lrg']
    n = len(hosts)
    for kind in CONTAMINANT_KINDS:
        rate = CFG[f'rate_{kind}']
        c = truth[truth.cls == kind]
        assert c.host_objid.ge(0).all()
        assert (hosts.set_index(['brickname', 'objid']).loc[list(zip(c.brickname, c.host_objid))].index.size == len(c))
        k = len(c[['brickname', 'host_objid']].drop_duplicates())
        assert k == len(c)                                                   # at most one of each kind per host
        assert abs(k / n - rate) < 4 * np.sqrt(rate * (1 - rate) / n), (kind, k, n)
        sep = c.sep_arcsec
        assert sep.between(1, 5).all()
    near = truth[truth.cls.isin(CONTAMINANT_KINDS) & (truth.sep_arcsec <= 5)][['brickname', 'host_objid']].drop_duplicates()
    assert len(near) / n >= 0.05
    cat = truth[truth.cls.isin(['merger', 'companion'])]
    assert (cat.catalogued == cat.primary).all() and not truth[truth.cls.isin(['ring', 'arm', 'tidal'])].catalogued.any()


def test_lenscat_lenses_where_the_catalog_says(sky):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        import lenscat
    cfg, base, rec, truth, sweep = sky
    cat = lenscat.catalog
    names, ra, dec = np.asarray(cat['name']).astype(str), np.asarray(cat['RA'], float), np.asarray(cat['DEC'], float)
    hosts = truth[(truth.cls == 'lrg') & truth.is_lens]
    assert len(hosts) == 3 and hosts.catalogued.all()
    for h in hosts.itertuples():
        k = np.flatnonzero(names == h.lenscat_name)
        assert len(k) >= 1
        assert np.isclose(h.ra, ra[k[0]], atol=1e-9) and np.isclose(h.dec, dec[k[0]], atol=1e-9)
        img, iv, ps, mb, wcs = _brick(base, h.brickname)
        x, y = wcs.world_to_pixel_values(ra[k[0]], dec[k[0]])
        P = img.shape[-1]
        assert 32 <= x <= P - 33 and 32 <= y <= P - 33                       # inside the image, in the primary region
        src = truth[(truth.cls == 'lensed_source') & (truth.brickname == h.brickname) & (truth.host_objid == h.objid)]
        assert len(src) == 1 and 1.0 <= src.theta_e.iloc[0] <= 2.0 and src.magnification.iloc[0] > 4
        s = sweep[(sweep.BRICKNAME == h.brickname) & (sweep.OBJID == h.objid)]
        sep = np.hypot((s.RA.iloc[0] - h.ra) * np.cos(np.radians(h.dec)), s.DEC.iloc[0] - h.dec) * 3600
        assert len(s) == 1 and sep < 0.2                                     # the sweep's centroid noise of a bright host
    assert {l['lens_name'] for l in rec['lenses']} == set(hosts.lenscat_name) and rec['lenscat_version']


def test_psfsize_maps_are_the_coadd_psfsize_where_covered(sky):
    cfg, base, rec, truth, sweep = sky
    n_uncovered = 0
    for name in truth.brickname.unique():
        img, iv, ps, mb, wcs = _brick(base, name)
        for b in range(3):
            cov = ps[b] > 0
            n_uncovered += (~cov).any()
            assert cov.mean() > 0.75
            assert (iv[b][~cov] == 0).all() and (img[b][~cov] == 0).all()   # no coverage: no data
            p = ps[b][cov]                                                   # one coadd PSF per band: one psfsize, the exposures'
            summary = next(br for br in rec['bricks'] if br['brick'] == name)
            assert np.ptp(p) < 1e-3 * p[0] and abs(p[0] - summary['psf']['grz'[b]]['psfsize']) < 1e-3   # (lossy compression) and 0.6 < p.min() and p.max() < 3.5
    assert n_uncovered >= 1                                                  # the test sky has a missing strip somewhere


def test_healpix_coverage(sky):
    from astropy_healpix import HEALPix
    import astropy.units as u
    cfg, base, rec, truth, sweep = sky
    b = fits.getdata(base/'survey-bricks.fits.gz', 1)
    pix = HEALPix(nside=64, order='nested').lonlat_to_healpix(b['RA'] * u.deg, b['DEC'] * u.deg)
    assert len(set(pix.tolist())) >= 20
    assert (b['DEC'] > -15.2).all() and (b['DEC'] < 30.2).all()


def test_shape_convention_on_a_rendered_galaxy(sky, others):
    "Tractor SHAPE_E1/E2 of elongated bright isolated galaxies give the position angle measured on the image via the WCS."
    cfg, base, rec, truth, sweep = sky
    s = sweep.merge(truth[truth.catalogued][['brickname', 'objid', 'cls', 'x', 'y', 'q', 'r_eff']],
                    left_on=['BRICKNAME', 'OBJID'], right_on=['brickname', 'objid'])
    s = s[s.TYPE.isin(['DEV', 'EXP', 'SER']) & (s.q < 0.6) & (s.FLUX_R * np.sqrt(s.FLUX_IVAR_R) > 50) & (s.MASKBITS == 0)]
    checked = 0
    for r in s.itertuples():
        img, iv, ps, mb, wcs = _brick(base, r.BRICKNAME)
        img = img - others(r.BRICKNAME, r.OBJID)
        h = 14
        ix, iy = int(round(r.x)), int(round(r.y))
        if min(ix, iy) < h or max(ix, iy) >= img.shape[-1] - h: continue
        cut = img[:, iy - h:iy + h + 1, ix - h:ix + h + 1].sum(0)
        yy, xx = np.mgrid[-h:h + 1, -h:h + 1] + 0.0
        w = cut * np.exp(-0.5 * (xx ** 2 + yy ** 2) / 6.0 ** 2)
        ixx, iyy, ixy = (w * xx * xx).sum(), (w * yy * yy).sum(), (w * xx * yy).sum()
        theta_pix = 0.5 * np.arctan2(2 * ixy, ixx - iyy)                      # major axis in pixel coordinates
        (ra0, ra1), (de0, de1) = wcs.pixel_to_world_values([r.x, r.x + np.cos(theta_pix)], [r.y, r.y + np.sin(theta_pix)])
        pa = np.arctan2((ra1 - ra0) * np.cos(np.radians(de0)), de1 - de0)    # east of north
        pa_tractor = 0.5 * np.arctan2(r.SHAPE_E2, r.SHAPE_E1)                # Tractor: e1 + i e2 = e exp(2 i PA)
        dpa = np.angle(np.exp(2j * (pa - pa_tractor))) / 2
        assert abs(np.degrees(dpa)) < 10, (r.BRICKNAME, r.OBJID, np.degrees(pa), np.degrees(pa_tractor))   # the PSF's own ellipticity (< 0.08) biases it a little
        checked += 1
    assert checked >= 3


def test_rerun_reuses_and_repairs(sky, tmp_path):
    "A re-run reuses complete bricks; a damaged brick is re-rendered identically."
    cfg, base, rec, truth, sweep = sky
    name = truth.brickname.iloc[-1]
    f = base/survey.coadd_relpath(name, 'image', 'g')
    before = f.read_bytes()
    f.write_bytes(before[:1000])
    rec2 = generate_mock_sky(cfg, log=lambda *a: None)
    assert rec2['bricks_rendered'] == 1 and rec2['bricks_reused'] == len(rec['bricks']) - 1
    assert f.read_bytes() == before
    assert rec2['counts'] == rec['counts']
    assert json.loads((base/'mock_sky.json').read_text())['bricks_reused'] == len(rec['bricks']) - 1
