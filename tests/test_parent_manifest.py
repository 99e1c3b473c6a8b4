"Phases 3 and 4a on Spark: sweeps with real FITS files -> parent sample -> manifest."
import json
import numpy as np
import pandas as pd
import pytest
from dhs import parent, manifest
from dhs.survey import write_sweep, read_sweep, sweep_relpath, sweep_bounds_for


def _synthetic_sweep_rows(n_lrg, n_star, rng, ra0, dec0):
    "LRG-like and star rows scattered over a 5x5 deg box (the LRGs vary around a passing template)."
    base = parent._example_rows()
    lrg = base.iloc[[0] * n_lrg].reset_index(drop=True)
    star = base.iloc[[1] * n_star].reset_index(drop=True)
    df = pd.concat([lrg, star], ignore_index=True)
    df['OBJID'] = np.arange(len(df))
    df['RA'] = ra0 + rng.uniform(0.05, 4.95, len(df)); df['DEC'] = dec0 + rng.uniform(0.05, 4.95, len(df))
    dm = rng.uniform(-0.3, 0.3, len(df))  # brightness jitter keeps colours, so LRGs still pass
    for b in ('G', 'R', 'Z', 'W1'): df[f'FLUX_{b}'] *= 10 ** (-0.4 * dm)
    df['FIBERFLUX_Z'] *= 10 ** (-0.4 * dm); df['FIBERTOTFLUX_Z'] *= 10 ** (-0.4 * dm)
    df['PSFSIZE_R'] = rng.uniform(1.0, 2.0, len(df)); df['GALDEPTH_R'] = rng.uniform(300, 3000, len(df))
    df['SHAPE_R'] = np.where(df['TYPE'] == 'DEV', rng.uniform(0.5, 2.5, len(df)), 0.0)
    df['SHAPE_E1'] = rng.uniform(-0.3, 0.3, len(df)); df['SHAPE_E2'] = rng.uniform(-0.3, 0.3, len(df))
    return df


@pytest.fixture(scope='module')
def sky(tmp_path_factory):
    root = tmp_path_factory.mktemp('sky')
    rng = np.random.default_rng(1)
    for ra0, dec0 in [(150, 0), (155, 0), (150, 5)]:
        rows = _synthetic_sweep_rows(150, 30, rng, ra0, dec0)
        write_sweep(rows, root/sweep_relpath(ra0, dec0, ra0 + 5, dec0 + 5), fill_missing=True)
    bad = root/sweep_relpath(160, 0, 165, 5)
    bad.write_bytes(b'SIMPLE  =                    T' + b' ' * 50)   # a truncated FITS header
    return root


@pytest.fixture(scope='module')
def parent_out(spark, sky, tmp_path_factory):
    out = tmp_path_factory.mktemp('parent')/'parent'
    summary = parent.run_parent(parent.ParentConfig(sky_uri=str(sky), out_uri=str(out), on_bad_file='skip',
                                                    max_bad_fraction=0.5), spark)
    return out, summary


def test_parent_keeps_lrgs_rejects_stars_and_reports_bad_file(parent_out):
    out, s = parent_out
    hosts = pd.read_parquet(out/'hosts')
    assert s['n_files'] == 4 and s['n_files_read'] == 3
    assert len(s['skipped_files']) == 1 and 'sweep-160p000-165p005' in s['skipped_files'][0]['file']
    assert s['counts_after_cut']['input'] == 3 * 180
    assert len(hosts) == s['n_hosts'] == 3 * 150 == s['counts_after_cut']['sliding']
    assert set(hosts['type']) == {'DEV'}
    assert json.loads((out/'parent_summary.json').read_text())['lenscat_sha256']


def test_parent_fails_on_bad_file_when_asked(spark, sky, tmp_path):
    cfg = parent.ParentConfig(sky_uri=str(sky), out_uri=str(tmp_path/'p'), on_bad_file='fail')
    with pytest.raises(RuntimeError, match='sweep-160p000-165p005.fits'):
        parent.run_parent(cfg, spark)


def test_known_lens_hosts_are_flagged(spark, tmp_path):
    lenses, _ = parent.known_lenses()
    lens = lenses[(lenses.type == 'galaxy')].iloc[0]
    rows = parent._example_rows().iloc[[0, 0]].reset_index(drop=True)
    rows['OBJID'] = [0, 1]
    rows['RA'] = [lens.ra + 1.0 / 3600 / np.cos(np.deg2rad(lens.dec)), lens.ra + 0.1]; rows['DEC'] = [lens.dec, lens.dec]
    ra0, dec0, ra1, dec1 = sweep_bounds_for(lens.ra, lens.dec)
    write_sweep(rows, tmp_path/'sky'/sweep_relpath(ra0, dec0, ra1, dec1), fill_missing=True)
    s = parent.run_parent(parent.ParentConfig(sky_uri=str(tmp_path/'sky'), out_uri=str(tmp_path/'p')), spark)
    hosts = pd.read_parquet(tmp_path/'p'/'hosts').sort_values('objid')
    assert hosts['near_known_lens'].tolist() == [True, False] and s['n_near_known_lens'] == 1
    assert hosts['known_lens_name'].iloc[0] == lens['name']


def _unique_parent(parent_out, tmp_path):
    "The synthetic files reuse objids: give every host a unique id for the manifest."
    out, _ = parent_out
    hosts = pd.read_parquet(out/'hosts')
    hosts['host_id'] = [f'h{i}' for i in range(len(hosts))]
    hosts.to_parquet(tmp_path/'parent.parquet')
    return hosts


@pytest.fixture(scope='module')
def manifest_out(spark, parent_out, tmp_path_factory):
    tmp = tmp_path_factory.mktemp('man')
    hosts = _unique_parent(parent_out, tmp)
    cfg = manifest.ManifestConfig(parent_uri=str(tmp/'parent.parquet'), out_uri=str(tmp/'manifest'), tasks_per_host=2,
                                  nside=16, partitions=2)
    s = manifest.run_manifest(cfg, spark)
    return cfg, s, pd.read_parquet(tmp/'manifest'/'tasks'), hosts


def test_no_region_in_two_splits(manifest_out):
    cfg, s, tasks, _ = manifest_out
    assert tasks.groupby('region_id')['region_split'].nunique().max() == 1
    assert set(tasks['region_split']) == {'train', 'val', 'test'}
    assert abs(sum(v['host_fraction'] for v in s['by_split'].values()) - 1) < 1e-3


def test_controls_half_and_unpaired_match_bins(manifest_out):
    cfg, s, tasks, hosts = manifest_out
    assert len(tasks) == s['n_tasks']
    pos = tasks[tasks.is_control == 0]
    assert len(pos) == 2 * len(hosts)
    frac = tasks.is_control.mean()
    assert 0.4 < frac < 0.6
    ctrl = tasks[tasks.is_control == 1].merge(pos[['task_id', 'host_id'] + list(manifest.BIN_COLUMNS) + ['region_split']],
                                              left_on='partner_task_id', right_on='task_id', suffixes=('', '_pos'))
    unp = ctrl[ctrl.control_kind == 'unpaired']
    assert len(unp) > 0.3 * len(ctrl)
    for b in list(manifest.BIN_COLUMNS) + ['region_split']: assert (unp[b] == unp[b + '_pos']).all(), b
    assert (unp['host_id'] != unp['host_id_pos']).all()
    paired = ctrl[ctrl.control_kind == 'paired']
    assert (paired['host_id'] == paired['host_id_pos']).all()


def test_manifest_is_the_same_whatever_the_partitioning(spark, manifest_out, tmp_path):
    "Bin edges are exact quantiles: another partitioning gives the same edges, cells and unpaired control hosts."
    cfg, s, tasks, _ = manifest_out
    import dataclasses
    s2 = manifest.run_manifest(dataclasses.replace(cfg, out_uri=str(tmp_path/'m2'), partitions=5), spark)
    assert s2['bin_edges'] == s['bin_edges'] and s2['counts'] == s['counts']
    again = pd.read_parquet(tmp_path/'m2'/'tasks').set_index('task_id').sort_index()
    first = tasks.set_index('task_id').sort_index()
    assert (again.index == first.index).all() and (again.host_id == first.host_id).all()
    assert (again.task_seed64 == first.task_seed64).all()


def test_controls_carry_shadow_parameters_and_seed_rebuilds(manifest_out):
    cfg, s, tasks, hosts = manifest_out
    ctrl = tasks[tasks.is_control == 1]
    assert ctrl['theta_e_arcsec'].notna().all() and (ctrl['lens_model'] == 'CONTROL').all()
    row = tasks.iloc[7]
    again = manifest.draw_task(row.task_id, cfg.experiment_id, row[['shape_e1', 'shape_e2', 'mag_r']].to_dict(),
                               row.region_split, cfg.draw)
    for k, v in again.items(): assert row[k] == v, k


def test_filter_removes_both_classes(spark, manifest_out, tmp_path):
    cfg, s, tasks, _ = manifest_out
    cut = 1.0
    cfg2 = manifest.ManifestConfig(**{**cfg.__dict__, 'out_uri': str(tmp_path/'m2'), 'min_theta_over_psf': cut})
    manifest.run_manifest(cfg2, spark)
    kept = pd.read_parquet(tmp_path/'m2'/'tasks')
    expect = tasks[tasks.theta_over_psf >= cut]
    assert set(kept.task_id) == set(expect.task_id)
    for c in (0, 1):  # both classes lose rows
        assert (tasks.is_control == c).sum() > (kept.is_control == c).sum() > 0
    assert (kept.theta_over_psf >= cut).all()


def test_splits_are_reused_and_extra_negatives_keep_split(spark, manifest_out, tmp_path):
    cfg, s, tasks, hosts = manifest_out
    neg = tasks[tasks.is_control == 1].drop_duplicates('host_id').head(12)[['host_id', 'region_split']]
    neg.to_parquet(tmp_path/'hn.parquet')
    cfg2 = manifest.ManifestConfig(**{**cfg.__dict__, 'out_uri': str(tmp_path/'m3'), 'extra_negatives_uri': str(tmp_path/'hn.parquet'),
                                      'splits_uri': cfg.out_uri + '/splits.parquet', 'split_salt': 'another-salt'})
    manifest.run_manifest(cfg2, spark)
    t2 = pd.read_parquet(tmp_path/'m3'/'tasks')
    hn = t2[t2.control_kind == 'hard_negative']
    assert len(hn) == 12 and (hn.is_control == 1).all()
    assert dict(zip(hn.host_id, hn.region_split)) == dict(zip(neg.host_id, neg.region_split))
    r1 = tasks.groupby('region_id').region_split.first(); r2 = t2.groupby('region_id').region_split.first()
    assert (r1 == r2.loc[r1.index]).all()     # a different salt, yet the kept table decides
    bad = neg.assign(region_split=neg.region_split.map({'train': 'test', 'val': 'train', 'test': 'train'}))
    bad.to_parquet(tmp_path/'bad.parquet')
    cfg3 = manifest.ManifestConfig(**{**cfg2.__dict__, 'out_uri': str(tmp_path/'m4'), 'extra_negatives_uri': str(tmp_path/'bad.parquet')})
    with pytest.raises(ValueError, match='splits never change'):
        manifest.run_manifest(cfg3, spark)


def test_parent_on_the_mock_sky_keeps_lrgs_and_flags_lenscat_hosts(spark, tiny_sky, tmp_path):
    "Checked against the mock's truth table: our DESI cuts (dhs.parent) and the mock's design of its LRGs agree."
    sky, rec = tiny_sky
    s = parent.run_parent(parent.ParentConfig(sky_uri=str(sky), out_uri=str(tmp_path/'p')), spark)
    hosts = pd.read_parquet(tmp_path/'p'/'hosts')
    truth = pd.read_parquet(sky/'mock_truth.parquet')
    sweeps = pd.concat([read_sweep(f, columns=['BRICKNAME', 'OBJID', 'MASKBITS']) for f in sorted(sky.glob('south/sweep/10.1/*.fits'))])
    sweeps.columns = ['brickname', 'objid', 'maskbits']
    cat = truth[truth['catalogued'] & truth['primary']].merge(sweeps, on=['brickname', 'objid'])
    cat = cat.merge(hosts[['brickname', 'objid']].assign(selected=1), on=['brickname', 'objid'], how='left')
    cat['selected'] = cat['selected'].fillna(0).astype(bool)
    masked = (cat['maskbits'].astype(int) & (1 << 1 | 1 << 12 | 1 << 13)) != 0   # BRIGHT, GALAXY, CLUSTER
    lrg = cat[cat['cls'] == 'lrg']
    assert lrg.loc[~masked, 'selected'].mean() > 0.95           # the mock's LRG hosts are kept...
    assert not cat.loc[masked, 'selected'].any()                 # ...except those inside bright-star masks
    for cls in ('star', 'bright_star', 'companion', 'disk', 'edgeon', 'spiral'):
        assert not cat.loc[cat['cls'] == cls, 'selected'].any(), cls   # stars and blue galaxies are rejected
    # object by object, our cuts agree with the mock's own evaluation of the colour cuts on sweep fluxes
    assert (cat.loc[~masked, 'selected'] == cat.loc[~masked, 'lrg_cut_pass_sweep']).mean() > 0.99
    lens_hosts = truth[truth['is_lens'] & truth['catalogued']][['brickname', 'objid', 'lenscat_name']]
    flagged = hosts.merge(lens_hosts, on=['brickname', 'objid'])
    assert len(flagged) > 0 and flagged['near_known_lens'].all()
    assert (flagged['known_lens_name'] == flagged['lenscat_name']).all()
    assert s['n_near_known_lens'] >= len(flagged)


def test_census_gives_each_eval_host_its_own_cutout_once(spark, manifest_out, tmp_path):
    "eval_controls='census': every val/test host is one paired negative (distinct cutouts) beside eval_tasks_per_host positives; train is unchanged."
    import dataclasses
    cfg, s, tasks, hosts = manifest_out
    manifest.run_manifest(dataclasses.replace(cfg, out_uri=str(tmp_path/'mc'), eval_controls='census', eval_tasks_per_host=1, splits_uri=str(cfg.out_uri) + '/splits.parquet'), spark)
    got = pd.read_parquet(tmp_path/'mc'/'tasks')
    ev, ev0 = got[got.region_split != 'train'], tasks[tasks.region_split != 'train']
    neg, pos = ev[ev.is_control == 1], ev[ev.is_control == 0]
    assert set(neg.host_id) == set(ev0.host_id) and neg.host_id.is_unique            # each eval host exactly once
    assert (neg.control_kind == 'paired').all() and len(pos) == len(neg)             # eval_tasks_per_host = 1 positive beside it
    partner = neg.merge(pos[['task_id', 'host_id', 'theta_e_arcsec']], left_on='partner_task_id', right_on='task_id', suffixes=('', '_pos'))
    assert len(partner) == len(neg) and (partner.host_id == partner.host_id_pos).all()
    assert neg.theta_e_arcsec.notna().all() and (neg.lens_model == 'CONTROL').all()  # shadow parameters, drawn as for any control
    assert ev0[ev0.is_control == 1].host_id.duplicated().any()                         # the planned controls repeat hosts: census differs
    train = lambda t: t[t.region_split == 'train'].sort_values('task_id', ignore_index=True)
    pd.testing.assert_frame_equal(train(got)[['task_id', 'host_id', 'control_kind']], train(tasks)[['task_id', 'host_id', 'control_kind']])
