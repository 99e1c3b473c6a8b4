"Phase 4c on Spark: mock sky -> parent -> manifest (real phases 3 and 4a) -> stamps, checked against the stamp contract."
import json, os, shutil
from pathlib import Path
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dhs import cache, inject, manifest, parent, stamps
from dhs.psf import moffat_fwhm_from_psfsize
from dhs.render import render_lensed
from dhs.sources import band_fluxes_from_mag
from dhs.survey import BrickImages, coadd_relpath, copsf_relpath, read_copsf, read_coadd, stamp_slice, write_coadd
from dhs.templates import hdf_template_bank
from astropy.wcs import WCS

BANDS = ('g', 'r', 'z')


@pytest.fixture(scope='session')
def sky(tiny_sky):
    "The session's tiny mock DR10 sky (conftest), whose root is laid out like the coadd cache."
    return tiny_sky[0]


@pytest.fixture(scope='session')
def work(tmp_path_factory):
    return tmp_path_factory.mktemp('inject')


@pytest.fixture(scope='session')
def tasks_uri(spark, sky, work):
    "Phase 3 and 4a on the mock sky: the manifest's tasks (Sérsic, clumpy and template sources)."
    parent.run_parent(parent.ParentConfig(sky_uri=str(sky), out_uri=str(work/'parent')), spark)
    bank = hdf_template_bank()
    draw = manifest.DrawConfig(source_kinds={'sersic': 0.4, 'clumpy': 0.3, 'template': 0.3},
                               n_templates_train=len(bank.split_ids('train')), n_templates_test=len(bank.split_ids('test')))
    manifest.run_manifest(manifest.ManifestConfig(parent_uri=str(work/'parent'/'hosts'), out_uri=str(work/'manifest'),
                                                  nside=256, partitions=2, draw=draw), spark)
    return work/'manifest'/'tasks'


@pytest.fixture(scope='session')
def job(spark, sky, work, tasks_uri):
    "Phase 4b (coadds and the coadd PSF of each brick, built from its ccds table and PSFEx files) and the injection job on the mock sky."
    bricks = sorted(pd.read_parquet(tasks_uri, columns=['brickname']).brickname.unique())
    rep = cache.cache_bricks(bricks, cache.CacheConfig(base_uri=str(sky), cache_uri=str(work/'cache'), n_threads=2), write_report=False)
    assert rep.count('built') == 3 * len(bricks) and rep.count('failed') == 0
    cfg = inject.InjectConfig(manifest_uri=str(tasks_uri), cache_uri=str(work/'cache'), out_uri=str(work/'stamps'),
                              tasks_per_file=30, encoding='npz', write_masks=True)
    summary = inject.run_inject(cfg, spark)
    images, meta = stamps.read_stamps(str(work/'stamps'/'stamps'))
    tasks = pd.read_parquet(tasks_uri).set_index('task_id')
    return cfg, summary, images, meta, tasks


def _cutout(sky, row, size=64):
    with BrickImages(sky, row['brickname']) as bi: return bi.cutout(row['ra'], row['dec'], size)


def test_job_covers_manifest_and_validates(job, capsys):
    cfg, s, images, meta, tasks = job
    assert s['n_rows'] == len(tasks) == len(meta) and meta['task_id'].is_unique
    assert s['n_groups'] >= 2 and len(list(Path(cfg.out_uri, 'stamps').glob('part-*.parquet'))) == s['n_groups']
    assert set(meta['source_kind']) == {'sersic', 'clumpy', 'template'}
    assert set(meta['control_kind']) >= {'none', 'paired', 'unpaired'}
    test_ids, tmpl = set(hdf_template_bank().split_ids('test')), meta[meta.source_kind == 'template']
    assert (tmpl.template_bank_id.isin(test_ids) == (tmpl.region_split == 'test')).all()   # no galaxy crosses the splits
    assert (meta.loc[meta.source_kind != 'template', 'template_bank_id'] == -1).all()
    assert meta['cutout_ok'].mean() > 0.9 and meta['pipeline_version'].eq(inject.dhs.__version__).all()
    ok = meta['cutout_ok'] == 1
    assert np.isfinite(images[ok.to_numpy()]).all()
    seen = ok & (meta['bad_pixel_frac'] < 1)   # a stamp wholly under a MEDIUM/BRIGHT star mask has arc S/N 0
    assert (meta.loc[seen, 'arc_snr'] > 0).all() and (meta.loc[ok & ~seen, 'arc_snr'] == 0).all()
    assert (meta.loc[ok, 'magnification'] > 1).mean() > 0.95 and (meta.loc[ok, 'n_images'] >= 2).all()
    assert stamps.main([str(Path(cfg.out_uri)/'stamps')]) == 0
    assert 'OK' in capsys.readouterr().out
    t = pq.read_table(Path(cfg.out_uri)/'stamps')
    assert {'stamp_npz', 'invvar', 'maskbits'} <= set(t.column_names)
    np.testing.assert_array_equal(stamps.decode_npz(t['stamp_npz'][0].as_py()), images[0])


def test_injected_flux_is_renderer_flux_times_mw_transmission(job):
    "Without shot noise, stamp - cutout is the renderer's image through the brick's cached coadd PSF, times the MW transmission."
    cfg, _, images, meta, tasks = job
    quiet = inject.InjectConfig(**{**cfg.__dict__, 'shot_noise': False})
    # achromatic sources only: a clumpy source's adaptive sampling weighs the bands by their fluxes
    pos = meta[(meta.is_control == 0) & (meta.cutout_ok == 1) & meta.source_kind.isin(['sersic', 'template'])].head(6)
    assert set(pos.source_kind) == {'sersic', 'template'} and (pos.psf_source_r == 'copsf').all()
    for i, row in pos.iterrows():
        task = {**tasks.loc[row.task_id].to_dict(), 'task_id': row.task_id}
        raw = _cutout(cfg.cache_uri, task)
        with BrickImages(cfg.cache_uri, task['brickname']) as bi: stamp, m = inject.inject_task(task, bi, quiet)
        assert m['arc_snr'] == row.arc_snr                     # arc S/N of the noiseless injection: shot noise or not
        inj = stamp.astype(float) - raw.image
        kernels = [read_copsf(Path(cfg.cache_uri)/copsf_relpath(task['brickname'], b))[0] for b in BANDS]
        fwhm = [row[f'psf_fwhm_used_{b}'] for b in BANDS]
        r = render_lensed(inject.task_source(task), inject.task_lens(task),
                          band_fluxes_from_mag(task['src_mag_r'], task['src_gr'], task['src_rz']), fwhm,
                          64, 0.262, raw.dx, raw.dy, psf_kernels=kernels)
        mw = np.array([task[f'mw_transmission_{b}'] for b in BANDS])
        # float32 rounding: of image + injection in the stamp, and of the renderer's float32 arithmetic (~1e-7)
        tol = 2.0**-23 * np.abs(stamp.astype(float)) + 1e-6 * np.abs(r.stamp).max()
        assert (np.abs(inj - r.stamp * mw[:, None, None]) <= tol).all()
        np.testing.assert_allclose(inj.sum((1, 2)), r.stamp.sum((1, 2)) * mw, rtol=0, atol=tol.sum())
        assert tol.sum() < 1e-3 * r.stamp.sum()   # far below the 2-12% the MW transmission makes
        assert mw.min() < 1   # the mock's hosts have extinction: the test would see a missing factor


def test_one_task_rebuilds_bit_for_bit(job):
    cfg, _, images, meta, tasks = job
    for kind in ('sersic', 'clumpy', 'template'):
        i = meta.index[(meta.source_kind == kind) & (meta.is_control == 0) & (meta.cutout_ok == 1)][0]
        task = {**tasks.loc[meta.task_id[i]].to_dict(), 'task_id': meta.task_id[i]}
        with BrickImages(cfg.cache_uri, task['brickname']) as bi: stamp, m = inject.inject_task(task, bi, cfg)
        assert stamp.tobytes() == images[i].tobytes(), kind
        assert m['arc_snr'] == meta.arc_snr[i]
    assert cfg.shot_noise                                   # on by default: the stored stamps carry it, seeded by the task
    quiet = inject.InjectConfig(**{**cfg.__dict__, 'shot_noise': False})
    with BrickImages(cfg.cache_uri, task['brickname']) as bi:
        a, _ = inject.inject_task(task, bi, quiet)
    with BrickImages(cfg.cache_uri, task['brickname']) as bi:
        b, _ = inject.inject_task(task, bi, quiet)
    assert a.tobytes() == b.tobytes() and a.tobytes() != stamp.tobytes()


def test_ring_centroid_on_host_wcs_pixel(job):
    "q = 1, no shear, source on the lens centre: the injection's centroid is the host's WCS position."
    cfg, _, _, meta, tasks = job
    for tid in meta.task_id[meta.is_control == 0][:5]:
        task = {**tasks.loc[tid].to_dict(), 'task_id': tid, 'lens_q': 1.0, 'gamma1': 0.0, 'gamma2': 0.0,
                'src_x_arcsec': 0.0, 'src_y_arcsec': 0.0, 'source_kind': 'sersic', 'src_q': 1.0}
        with BrickImages(cfg.cache_uri, task['brickname']) as bi:
            stamp, m = inject.inject_task(task, bi, cfg)
            raw = bi.cutout(task['ra'], task['dec'])
            x, y = WCS(bi.header).world_to_pixel_values(task['ra'], task['dec'])   # independent of the cutout's own numbers
        diff = stamp.astype(float) - raw.image
        yy, xx = np.indices(diff.shape[1:])
        w = diff[1]
        cx, cy = (w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()
        assert abs(cx - (x - stamp_slice(x, 64)[0])) < 0.05 and abs(cy - (y - stamp_slice(y, 64)[0])) < 0.05, (cx, cy, x, y)


def test_controls_are_the_raw_cutout_with_shadow_metrics(job):
    cfg, _, images, meta, tasks = job
    ctl = meta[(meta.is_control == 1) & (meta.cutout_ok == 1)]
    assert len(ctl) > 5
    for i, row in ctl.head(8).iterrows():
        raw = _cutout(cfg.cache_uri, row)
        assert images[i].tobytes() == raw.image.astype('<f4').tobytes()
    assert (ctl.loc[ctl.bad_pixel_frac < 1, 'arc_snr'] > 0).all() and (ctl['magnification'] > 1).all()
    assert (ctl['lens_model'] == 'CONTROL').all() and ctl['theta_e_arcsec'].notna().all()


def _copy_brick(sky, brick, dest):
    for kind in ('image', 'invvar', 'psfsize'):
        for b in BANDS:
            p = dest/coadd_relpath(brick, kind, b); p.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(sky/coadd_relpath(brick, kind, b), p)
    shutil.copy(sky/coadd_relpath(brick, 'maskbits'), dest/coadd_relpath(brick, 'maskbits'))


def _set_pixels(path, rows, cols, value):
    "Rewrite a per-band coadd file with pixels [rows, cols] set to `value`."
    data, hdr = read_coadd(path)
    data[rows, cols] = value
    _, brick, kind, band = path.name.split('.')[0].split('-')
    write_coadd(path, data, WCS(hdr), kind, band, brick)


def test_psf_hole_falls_back_to_sweep_and_nan_pixel_fails_the_row(job, tmp_path):
    cfg, _, _, meta, tasks = job
    rows = meta[meta.cutout_ok == 1]
    pix = {}
    for brick in rows.brickname.unique():
        with BrickImages(cfg.cache_uri, brick) as bi:
            for r in rows[rows.brickname == brick].itertuples(): pix[r.task_id] = np.round(bi.pixel(r.ra, r.dec)).astype(int)
    a, b = next((a, b) for _, a in rows.iterrows() for _, b in rows.iterrows()   # hosts whose stamps do not overlap
                if a.brickname == b.brickname and np.abs(pix[a.task_id] - pix[b.task_id]).max() > 40)
    (xa, ya), (xb, yb) = pix[a.task_id], pix[b.task_id]
    _copy_brick(Path(cfg.cache_uri), a.brickname, tmp_path)
    for band in BANDS: _set_pixels(tmp_path/coadd_relpath(a.brickname, 'psfsize', band), slice(ya - 2, ya + 3), slice(xa - 2, xa + 3), 0.0)
    _set_pixels(tmp_path/coadd_relpath(a.brickname, 'image', 'r'), yb + 5, xb + 5, np.nan)
    local = inject.InjectConfig(**{**cfg.__dict__, 'cache_uri': str(tmp_path)})
    ta, tb = [{**tasks.loc[t.task_id].to_dict(), 'task_id': t.task_id} for t in (a, b)]
    status = inject.run_group(pd.DataFrame([ta, tb]), local, str(tmp_path/'out.parquet'))
    out = pq.read_table(tmp_path/'out.parquet').to_pandas().set_index('task_id')
    fa = out.loc[a.task_id]
    assert fa.cutout_ok == 1 and fa.psf_fallback and 'psf_fallback' in fa.physics_warnings
    assert [fa[f'psf_source_{b}'] for b in BANDS] == ['sweep'] * 3 and fa.psfsize_stamp_r == 0
    assert fa.psf_fwhm_used_r == pytest.approx(moffat_fwhm_from_psfsize(ta['psfsize_r']))   # no coadd PSF in this copy: a Moffat of the sweep's psfsize
    fb = out.loc[b.task_id]
    assert fb.cutout_ok == 0 and fb.failure_reason.startswith('nonfinite') and fb.psf_source_r == 'coadd'   # its psfsize is there
    assert status.set_index('task_id').loc[b.task_id, 'cutout_ok'] == 0


def test_validate_catches_nan_missing_column_and_leaked_split(job, tmp_path):
    cfg, *_ = job
    t = pq.read_table(Path(cfg.out_uri)/'stamps')
    assert stamps.validate_stamps(str(Path(cfg.out_uri)/'stamps'))['ok']
    imgs = stamps.decode_stamps(t['stamp']).copy()
    i = int(np.flatnonzero(t['cutout_ok'].to_numpy() == 1)[0]); imgs[i, 1, 10, 10] = np.nan
    bad = t.set_column(t.schema.get_field_index('stamp'), 'stamp', stamps.encode_stamps(imgs))
    pq.write_table(bad, tmp_path/'nan.parquet')
    r = stamps.validate_stamps(str(tmp_path/'nan.parquet'))
    assert not r['ok'] and any('NaN' in p for p in r['problems'])
    pq.write_table(t.drop(['psfdepth_r']), tmp_path/'missing.parquet')
    r = stamps.validate_stamps(str(tmp_path/'missing.parquet'))
    assert not r['ok'] and any("missing required column 'psfdepth_r'" in p for p in r['problems'])
    split = t['region_split'].to_pylist(); split[0] = next(s for s in ('train', 'val', 'test') if s != split[0])
    pq.write_table(t.set_column(t.schema.get_field_index('region_split'), 'region_split', pa.array(split)), tmp_path/'leak.parquet')
    r = stamps.validate_stamps(str(tmp_path/'leak.parquet'))
    assert not r['ok'] and any('more than one split' in p for p in r['problems'])
    assert stamps.main([str(tmp_path/'leak.parquet')]) == 1


def test_failure_threshold_names_bricks(job, tmp_path, capsys):
    cfg, _, _, meta, _ = job
    counts = meta.groupby('brickname').size()
    gone = counts.index[0]
    cache = tmp_path/'cache'
    for brick in counts.index[1:]: _copy_brick(Path(cfg.cache_uri), brick, cache)
    args = ['--manifest', cfg.manifest_uri, '--cache', str(cache), '--out', str(tmp_path/'out'), '--tasks-per-file', '30',
            '--max-fail-frac', '0.01']
    assert inject.main(args) == 1
    err = capsys.readouterr().err
    assert f'brick {gone}: {counts[gone]}/{counts[gone]} failed' in err and 'file is missing' in err
    rep = json.loads((tmp_path/'out'/'inject_failures.json').read_text())
    assert rep['worst_bricks'][0]['brickname'] == gone and rep['n_failed'] == counts[gone]
    with pytest.raises(inject.InjectionFailedError, match=gone):   # the same check reruns on the finished output
        inject.run_inject(inject.InjectConfig(**{**cfg.__dict__, 'cache_uri': str(cache), 'out_uri': str(tmp_path/'out'),
                                                 'encoding': 'fast', 'write_masks': False}))   # the settings of the CLI run above


def test_resume_after_crash_has_no_duplicates(spark, job, tmp_path):
    cfg, s, _, meta, _ = job
    out = tmp_path/'out'
    shutil.copytree(Path(cfg.out_uri)/'stamps', out/'stamps')
    files = sorted((out/'stamps').glob('part-*.parquet'))
    lost = files[1]; lost.unlink()                                     # the crash: one group never finished...
    (out/'stamps'/f'.{lost.name}.x1y2.part').write_bytes(b'PAR1 half')  # ...and left its temporary file
    before = {f.name: f.stat().st_mtime_ns for f in files if f != lost}
    s2 = inject.run_inject(inject.InjectConfig(**{**cfg.__dict__, 'out_uri': str(out)}), spark)
    assert s2['groups_skipped'] == s['n_groups'] - 1 and s2['groups_run'] == 1
    again = pq.read_table(out/'stamps', columns=['task_id']).to_pandas()
    assert len(again) == len(meta) and again['task_id'].is_unique
    assert {f.name: f.stat().st_mtime_ns for f in files if f != lost} == before and lost.exists()
    assert not list((out/'stamps').glob('.*.part'))
    with pytest.raises(ValueError, match='another brick grouping'):
        inject.run_inject(inject.InjectConfig(**{**cfg.__dict__, 'out_uri': str(out), 'tasks_per_file': 7}), spark)


def test_unexpected_errors_fail_loudly(job, monkeypatch):
    "A bug (or an import that fails on an executor) stops the job; only expected data problems become failed rows."
    cfg, _, _, meta, tasks = job
    task = {**tasks.loc[meta.task_id[0]].to_dict(), 'task_id': meta.task_id[0]}
    def broken(*a, **k): raise ImportError('No module named dhs.render')
    monkeypatch.setattr(inject, 'render_task', broken)
    with pytest.raises(ImportError):
        inject.run_group(pd.DataFrame([task]), cfg)
    off = {**task, 'ra': task['ra'] + 1.0}
    with BrickImages(cfg.cache_uri, task['brickname']) as bi: stamp, m = inject.inject_task(off, bi, cfg)
    assert m['cutout_ok'] == 0 and m['failure_reason'].startswith('cutout:') and np.isnan(stamp).all()
