"""DR10 file formats of `dhs.survey`: bricks, coadds, sweeps and stamps, written and read back with real FITS files."""
import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from dhs import survey as sv

BRICK = '2447p120'
RA_C, DEC_C = 244.723404, 12.0  # real DR10 centre of brick 2447p120
NPIX = 200


def _toy_arrays(npix=NPIX, seed=0):
    "Noise-only coadds (image, invvar, psfsize per band, maskbits) with a no-coverage strip and a bright-star patch."
    rng = np.random.default_rng(seed)
    sigma = np.array([0.004, 0.006, 0.015], np.float32)  # sky noise per pixel g, r, z [nmgy]
    invvar = np.broadcast_to((1 / sigma**2)[:, None, None], (3, npix, npix)).copy()
    invvar[:, :, :5] = 0
    image = (rng.normal(size=invvar.shape) * sigma[:, None, None]).astype(np.float32)
    image[invvar == 0] = 0
    psfsize = np.broadcast_to(np.array([1.31, 1.18, 1.07], np.float32)[:, None, None], (3, npix, npix)).copy()
    maskbits = np.zeros((npix, npix), np.int32)
    maskbits[90:100, 90:110] = sv.maskbits_value('BRIGHT')
    maskbits[10:20, 10:20] = sv.maskbits_value('SUB_BLOB', 'ALLMASK_I')
    return image, invvar, psfsize, maskbits


@pytest.fixture(scope='module')
def sky(tmp_path_factory):
    "A 200x200-pixel brick at the real centre of 2447p120, written under a DR10-like base."
    base = tmp_path_factory.mktemp('sky')
    wcs = sv.brick_wcs(RA_C, DEC_C, NPIX)
    arrays = _toy_arrays()
    sv.write_brick_coadds(base, BRICK, wcs, *arrays)
    return base, wcs, arrays


# ---------------------------------------------------------------- paths

def test_paths_and_names():
    assert sv.brickname(244.723404, 12.0) == '2447p120'
    assert sv.brickname(10.0, -0.05) == '0100m000'
    assert sv.coadd_relpath(BRICK, 'psfsize', 'z') == 'south/coadd/244/2447p120/legacysurvey-2447p120-psfsize-z.fits.fz'
    rel = sv.brick_coadd_relpaths(BRICK)
    assert len(rel) == 10 and sum(p.endswith('maskbits.fits.fz') for p in rel) == 1
    assert sv.sweep_relpath(0, -10, 5, -5) == 'south/sweep/10.1/sweep-000m010-005m005.fits'
    assert sv.sweep_relpath(*sv.sweep_bounds_for(244.72, 12.01)) == 'south/sweep/10.1/sweep-240p010-245p015.fits'
    with pytest.raises(ValueError, match="unknown coadd kind 'depth'"):
        sv.coadd_relpath(BRICK, 'depth', 'g')


# ---------------------------------------------------------------- bricks

@pytest.fixture(scope='module')
def bricks():
    return sv.make_bricks_table()


def test_known_dr10_brick_row(bricks):
    row = sv.brick_for_position(bricks, 244.72, 12.01)
    assert (row.BRICKNAME, row.BRICKID, row.BRICKROW, row.BRICKCOL) == ('2447p120', 400014, 408, 958)
    np.testing.assert_allclose([row.RA, row.DEC, row.RA1, row.RA2, row.DEC1, row.DEC2],
                               [244.723404, 12.0, 244.595745, 244.851064, 11.875, 12.125], atol=1e-6)


def test_bricks_table_round_trip(bricks, tmp_path):
    path = tmp_path / sv.BRICKS_RELPATH
    sv.write_bricks(bricks, path)
    with open(path, 'rb') as f: assert f.read(2) == b'\x1f\x8b'  # gzip magic
    back = sv.read_bricks(path)
    pd.testing.assert_frame_equal(back, bricks, check_dtype=False)
    row = sv.brick_for_position(back, 244.72, 12.01)
    assert (row.BRICKNAME, row.BRICKID, row.BRICKROW, row.BRICKCOL) == ('2447p120', 400014, 408, 958)
    with fits.open(path) as hl:  # astropy alone, DR10 names and FITS types
        assert hl[1].columns.names == [n for n, _ in sv.BRICK_COLUMNS]
        assert hl[1].data.dtype['RA1'] == np.dtype('>f8') and hl[1].data.dtype['BRICKNAME'] == np.dtype('S8')


def test_bricks_lower_case_columns_are_read(bricks, tmp_path):
    "A bricks file whose column names are lower case (as some DR releases ship) reads with upper-case names."
    sub = bricks.iloc[400000:400030]
    arr = sv._table_array(sub, sv.BRICK_COLUMNS, 'test')
    tform = {'S8': '8A', '>i4': 'J', '>f8': 'D'}
    cols = fits.ColDefs([fits.Column(name=n.lower(), format=tform[dt], array=arr[n]) for n, dt in sv.BRICK_COLUMNS])
    path = tmp_path / 'lower.fits'
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(cols)]).writeto(path)
    back = sv.read_bricks(path)
    assert list(back.columns) == [n for n, _ in sv.BRICK_COLUMNS]
    assert list(back.BRICKNAME) == list(sub.BRICKNAME)


def test_brick_lookup_vectorised(bricks):
    rng = np.random.default_rng(5)
    ra, dec = rng.uniform(0, 360, 5000), np.degrees(np.arcsin(rng.uniform(-1, 1, 5000)))
    names = sv.bricks_for_positions(bricks, ra, dec)
    got = bricks.set_index('BRICKNAME').loc[names]
    assert ((got.RA1 <= ra) & (ra < got.RA2) & (got.DEC1 <= dec) & (dec <= got.DEC2)).all()


def test_truncated_bricks_file(bricks, tmp_path):
    path = tmp_path / sv.BRICKS_RELPATH
    sv.write_bricks(bricks.iloc[:5000], path)
    bad = tmp_path / 'cut-survey-bricks.fits.gz'
    bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(sv.SurveyFileError, match='cut-survey-bricks.fits.gz'):
        sv.read_bricks(bad)


# ---------------------------------------------------------------- coadds

def test_coadd_headers_wcs_units(sky):
    base, wcs, arrays = sky
    for kind, unit in (('image', 'nanomaggy'), ('invvar', '1/nanomaggy^2'), ('psfsize', 'arcsec')):
        for band in sv.BANDS:
            data, hdr = sv.read_coadd(base / sv.coadd_relpath(BRICK, kind, band))
            assert data.shape == (NPIX, NPIX) and data.dtype == np.float32
            assert hdr['BUNIT'] == unit and hdr['BAND'] == band and hdr['BANDS'] == 'grz'
            assert hdr['BRICKNAM'] == BRICK and hdr['BRICK'] == BRICK
            assert (hdr['CTYPE1'], hdr['CTYPE2']) == ('RA---TAN', 'DEC--TAN')
            assert (hdr['CRPIX1'], hdr['CRPIX2']) == (100.5, 100.5)
            assert (hdr['CRVAL1'], hdr['CRVAL2']) == (RA_C, DEC_C)
            np.testing.assert_allclose([hdr['CD1_1'], hdr['CD1_2'], hdr['CD2_1'], hdr['CD2_2']], [-0.262 / 3600, 0, 0, 0.262 / 3600], rtol=1e-12, atol=0)
            assert ('MAGZERO' in hdr) == (kind == 'image')
    assert sv.read_coadd(base / sv.coadd_relpath(BRICK, 'image', 'g'))[1]['MAGZERO'] == 22.5
    mb, hdr = sv.read_coadd(base / sv.coadd_relpath(BRICK, 'maskbits'))
    assert mb.dtype == np.int32 and np.array_equal(mb, arrays[3]) and 'BAND' not in hdr


def test_full_size_wcs_centre():
    w = sv.brick_wcs(RA_C, DEC_C)
    assert list(w.wcs.crpix) == [1800.5, 1800.5]
    # the brick centre lies between the two middle pixels 1799 and 1800 (0-based)
    np.testing.assert_allclose(w.pixel_to_world_values(1799.5, 1799.5), [RA_C, DEC_C], atol=1e-10)
    corner = w.pixel_to_world_values(-0.5, -0.5)   # lower-left pixel edge: east (larger RA) and south
    assert corner[0] > RA_C and corner[1] < DEC_C
    edge = w.pixel_to_world_values(1799.5, -0.5)   # bottom edge below the centre: 1800 pixels south along the meridian
    gnomonic = np.degrees(np.arctan(np.radians(1800 * 0.262 / 3600))) * 3600   # TAN: angle = atan(projected distance)
    np.testing.assert_allclose((DEC_C - edge[1]) * 3600, gnomonic, rtol=1e-9)
    np.testing.assert_allclose(edge[0], RA_C, atol=1e-10)


def test_astropy_alone_sees_dr10_structure(sky):
    base = sky[0]
    for rel in sv.brick_coadd_relpaths(BRICK):
        with fits.open(base / rel) as hl:
            assert len(hl) == 2
            assert isinstance(hl[0], fits.PrimaryHDU) and hl[0].header['NAXIS'] == 0 and hl[0].data is None
            assert isinstance(hl[1], fits.CompImageHDU) and hl[1].compression_type == 'RICE_1'
            assert hl[1].data.shape == (NPIX, NPIX)
            w = WCS(hl[1].header)
            np.testing.assert_allclose(w.pixel_to_world_values(99.5, 99.5), [RA_C, DEC_C], atol=1e-10)


def test_quantisation_keeps_noise_and_zeros(tmp_path):
    rng = np.random.default_rng(7)
    sigma = 0.0052
    image = rng.normal(0, sigma, (1000, 1000)).astype(np.float32)
    image[:, :20] = 0
    wcs = sv.brick_wcs(RA_C, DEC_C, 1000)
    path = tmp_path / sv.coadd_relpath(BRICK, 'image', 'r')
    sv.write_coadd(path, image, wcs, 'image', 'r')
    back = sv.read_coadd(path)[0]
    ratio = back[:, 20:].std() / image[:, 20:].std()
    assert abs(ratio - 1) < 5e-3, ratio
    assert (back[:, :20] == 0).all()
    err = (back - image)[:, 20:]
    assert abs(err.mean()) < 1e-3 * sigma          # dithered quantisation is unbiased
    assert err.std() < 0.03 * sigma                # step ~ sigma/16 -> error RMS ~ sigma/55
    assert path.stat().st_size < 0.4 * image.nbytes  # it is compressed


def test_coadd_write_is_deterministic_and_atomic(sky, tmp_path):
    base, wcs, arrays = sky
    path = tmp_path / sv.coadd_relpath(BRICK, 'image', 'g')
    sv.write_coadd(path, arrays[0][0], wcs, 'image', 'g')
    assert path.read_bytes() == (base / sv.coadd_relpath(BRICK, 'image', 'g')).read_bytes()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_truncated_corrupt_missing_coadd(sky, tmp_path):
    src = sky[0] / sv.coadd_relpath(BRICK, 'image', 'z')
    raw = src.read_bytes()
    for name, content in (('trunc', raw[: len(raw) - 100]), ('half', raw[: len(raw) // 2]),
                          ('head', raw[:2000]), ('junk', bytes(np.random.default_rng(1).integers(0, 256, 9000, dtype=np.uint8)))):
        bad = tmp_path / f'legacysurvey-{BRICK}-image-{name}.fits.fz'
        bad.write_bytes(content)
        with pytest.raises(sv.SurveyFileError, match=str(bad)) as err:
            sv.read_coadd(bad)
        assert 'dhs cache' in str(err.value)
    with pytest.raises(sv.SurveyFileError, match='nothing-here.fits.fz: file is missing'):
        sv.read_coadd(tmp_path / 'nothing-here.fits.fz')


# ---------------------------------------------------------------- sweeps

def test_sweep_round_trip_with_astropy(tmp_path):
    n = 50
    rng = np.random.default_rng(11)
    arr = sv.empty_sweep(n)
    arr['RA'], arr['DEC'] = rng.uniform(240, 245, n), rng.uniform(10, 15, n)
    arr['TYPE'] = rng.choice(['PSF', 'REX', 'DEV', 'EXP', 'SER'], n)
    arr['BRICKNAME'], arr['OBJID'], arr['RELEASE'] = BRICK, np.arange(n), 10000
    arr['FLUX_Z'], arr['MW_TRANSMISSION_Z'], arr['MASKBITS'] = rng.uniform(1, 50, n), 0.98, rng.integers(0, 2**16, n)
    path = tmp_path / sv.sweep_relpath(240, 10, 245, 15)
    sv.write_sweep(arr, path)
    with fits.open(path) as hl:
        assert hl[1].name == 'SWEEP'
        tab = hl[1].data
        for name, dt in sv.SWEEP_COLUMNS:
            assert tab.dtype[name] == np.dtype(dt), name
        np.testing.assert_array_equal(tab['RA'], arr['RA'])
        assert [t.strip() for t in tab['TYPE']] == [t.decode() for t in arr['TYPE']]
    df = sv.read_sweep(path)
    assert list(df.columns) == [n for n, _ in sv.SWEEP_COLUMNS]
    assert all(df[c].dtype.isnative for c in df.columns if df[c].dtype != object)
    assert df.TYPE.tolist() == [t.decode() for t in arr['TYPE']] and set(df.BRICKNAME) == {BRICK}
    np.testing.assert_array_equal(df.MASKBITS.to_numpy(), arr['MASKBITS'])
    sub = sv.read_sweep(path, columns=['flux_z', 'RA'])
    assert list(sub.columns) == ['FLUX_Z', 'RA']


def test_sweep_errors_name_the_file(tmp_path):
    path = tmp_path / 'sweep-240p010-245p015.fits'
    sv.write_sweep(sv.empty_sweep(2000), path)
    with pytest.raises(sv.SurveyFileError, match=r"sweep-240p010-245p015.fits: sweep catalogue lacks column\(s\) \['LOGMSTAR'\]"):
        sv.read_sweep(path, ['RA', 'LOGMSTAR'])
    bad = tmp_path / 'sweep-cut.fits'
    bad.write_bytes(path.read_bytes()[:-5000])
    with pytest.raises(sv.SurveyFileError, match='sweep-cut.fits: file is truncated'):
        sv.read_sweep(bad)
    with pytest.raises(sv.SurveyFileError, match='sweep-missing.fits: file is missing'):
        sv.read_sweep(tmp_path / 'sweep-missing.fits')


# ---------------------------------------------------------------- stamps

def test_stamp_at_known_pixel(sky):
    base, wcs, arrays = sky
    ra, dec = wcs.pixel_to_world_values(100.3, 80.7)
    c = sv.cut_stamp(base, BRICK, ra, dec, size=64)
    assert c.image.shape == c.invvar.shape == (3, 64, 64) and c.maskbits.shape == (64, 64)
    np.testing.assert_allclose([c.x_pix, c.y_pix, c.dx, c.dy], [100.3, 80.7, 0.3, -0.3], atol=1e-8)
    ys, xs = slice(81 - 32, 81 + 32), slice(100 - 32, 100 + 32)
    for i, band in enumerate(sv.BANDS):
        np.testing.assert_array_equal(c.image[i], sv.read_coadd(base / sv.coadd_relpath(BRICK, 'image', band))[0][ys, xs])
        np.testing.assert_array_equal(c.invvar[i], sv.read_coadd(base / sv.coadd_relpath(BRICK, 'invvar', band))[0][ys, xs])
        # and close to what was written (quantised, step ~ sigma/16)
        assert np.abs(c.image[i] - arrays[0][i][ys, xs]).max() < 0.1 * arrays[0][i].std()
    np.testing.assert_array_equal(c.maskbits, arrays[3][ys, xs])
    np.testing.assert_allclose(c.psfsize, [1.31, 1.18, 1.07], atol=1e-4)
    # the stamp's pixel (32 + dx, 32 + dy) is the requested position
    np.testing.assert_allclose(wcs.pixel_to_world_values(100 - 32 + 32 + c.dx, 81 - 32 + 32 + c.dy), [ra, dec], atol=1e-10)
    assert c.bad.sum() == 3 * 200  # the BRIGHT patch, in every band; the SUB_BLOB|ALLMASK_I patch is outside


def test_stamp_half_pixel_and_odd_sizes(sky):
    base, wcs, _ = sky
    with sv.BrickImages(base, BRICK, preload=True) as bi:
        c = bi.cutout(*wcs.pixel_to_world_values(99.5, 120.5), size=64)
        assert round(c.x_pix - c.dx) == 100 and round(c.y_pix - c.dy) == 121
        assert -0.5 <= c.dx < 0.5 and -0.5 <= c.dy < 0.5
        c5 = bi.cutout(*wcs.pixel_to_world_values(10.2, 10.2), size=5)
        assert c5.image.shape == (3, 5, 5)
        np.testing.assert_array_equal(c5.maskbits, sv.read_coadd(base / sv.coadd_relpath(BRICK, 'maskbits'))[0][8:13, 8:13])
        assert c5.bad[:, 2, 2].all() and not c5.bad[:, 0, 0].any()  # ALLMASK_I masks at (10,10); (8,8) is clean


def test_off_brick_stamp_names_brick(sky):
    base, wcs, _ = sky
    with sv.BrickImages(base, BRICK) as bi:
        for x, y in ((20.0, 100.0), (100.0, 180.0), (-40.0, -40.0)):
            with pytest.raises(ValueError, match=r'brick 2447p120: a 64x64 stamp at \(ra, dec\)') as err:
                bi.cutout(*wcs.pixel_to_world_values(x, y), size=64)
            assert 'brick_for_position' in str(err.value)
        bi.cutout(*wcs.pixel_to_world_values(32.0, 32.0), size=64)        # touches the edge: fine
        bi.cutout(*wcs.pixel_to_world_values(167.49, 167.49), size=64)


def test_brick_images_bad_files(sky, tmp_path):
    base = sky[0]
    with pytest.raises(sv.SurveyFileError, match='legacysurvey-2447p120-image-i.fits.fz: file is missing'):
        sv.BrickImages(base, BRICK, bands=('g', 'r', 'i'))
    # a copy of the brick with one truncated invvar file: the error names it at open, before any stamp
    import shutil
    copy = tmp_path / 'sky'
    shutil.copytree(base, copy)
    victim = copy / sv.coadd_relpath(BRICK, 'invvar', 'r')
    victim.write_bytes(victim.read_bytes()[:-3000])
    with pytest.raises(sv.SurveyFileError, match=str(victim)):
        sv.BrickImages(copy, BRICK)
    # a file with the wrong size
    sv.write_coadd(copy / sv.coadd_relpath(BRICK, 'invvar', 'r'), np.ones((100, 100)), sv.brick_wcs(RA_C, DEC_C, 100), 'invvar', 'r')
    with pytest.raises(sv.SurveyFileError, match='is 100x100 pixels but brick 2447p120 is 200x200'):
        sv.BrickImages(copy, BRICK)
