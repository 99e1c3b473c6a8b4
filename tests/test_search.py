"Lens search on the tiny mock sky: every parent host of the bricks scored once, ranked by score, lenscat lenses found and counted."
import numpy as np
import pandas as pd
import pytest
import torch


@pytest.fixture(scope='module')
def tiny_parent(tiny_hosts, tmp_path_factory):
    "Phase 3 hosts of the tiny sky (process_sweep per file, no Spark) and an untrained small CNN checkpoint."
    from dhs.models import LensFinder
    from dhs.train import save_checkpoint, cpu_demo_config
    d, hosts = tmp_path_factory.mktemp('search'), tiny_hosts
    hosts.to_parquet(d/'hosts.parquet')
    torch.manual_seed(0)
    save_checkpoint(d/'cnn.pt', LensFinder('small_cnn'), cpu_demo_config(), dict(epoch=0))
    return d, hosts


def _cfg(sky, d, **kw):
    from dhs.search import SearchConfig
    kw = dict(dict(engine='local', device='cpu'), **kw)
    return SearchConfig(parent_uri=str(d/'hosts.parquet'), cache_uri=str(sky), checkpoints=[str(d/'cnn.pt')],
                        truth_uri=str(sky/'mock_truth.parquet'), **kw)


@pytest.fixture(scope='module')
def searched(tiny_sky, tiny_parent):
    from dhs.search import run_search
    sky, _ = tiny_sky
    d, hosts = tiny_parent
    th = {0.01: 0.5, 0.001: 0.52}
    s = run_search(_cfg(sky, d, out_uri=str(d/'out'), thresholds=th), log=lambda *a: None)
    return s, pd.read_parquet(d/'out'/'candidates.parquet'), d/'out', th


def test_every_host_scored_once_and_ranked(searched, tiny_parent):
    s, cand, out, th = searched
    hosts = tiny_parent[1]
    assert sorted(cand.host_id) == sorted(hosts.host_id) and cand.host_id.is_unique
    assert cand.score.notna().all() and s['n_failed'] == 0
    assert (np.diff(cand.score.to_numpy()) <= 0).all()
    assert cand['rank'].tolist() == list(range(1, len(cand) + 1))
    # scores equal those of dhs.score on the written stamps, row for row
    sc = pd.read_parquet(out/'search'/'scores.parquet').set_index('task_id').score
    assert np.allclose(cand.set_index('task_id').score, sc.loc[cand.task_id])
    for fpr, t in th.items(): assert cand[f'pass_fpr_{fpr:.0e}'].sum() == (cand.score >= t).sum()
    csv = pd.read_csv(out/'candidates.csv')
    assert len(csv) == len(cand) and (out/'candidates_gallery.png').stat().st_size > 10_000


def test_lenscat_matches_and_truth(searched, tiny_parent, tiny_sky):
    s, cand, out, th = searched
    hosts = tiny_parent[1].set_index('host_id')
    flagged = cand.dropna(subset=['known_lens_name'])
    assert len(flagged) == hosts.near_known_lens.sum() > 0
    assert (flagged.set_index('host_id').known_lens_name == hosts.known_lens_name.loc[flagged.host_id]).all()
    truth = pd.read_parquet(tiny_sky[0]/'mock_truth.parquet')
    lens_hosts = truth[truth.is_lens & (truth.objid >= 0)]
    is_lens = cand.set_index(['brickname', 'objid']).truth_is_lens
    assert is_lens.loc[list(zip(lens_hosts.brickname, lens_hosts.objid))].all() and is_lens.sum() == len(lens_hosts)
    assert (cand.truth_class == 'lens').sum() == len(lens_hosts)


def test_known_lens_recovery(searched, tiny_sky):
    s, cand, out, th = searched
    known = pd.read_parquet(out/'known_lenses.parquet')
    rec = pd.read_csv(out/'known_lens_recovery.csv')
    truth = pd.read_parquet(tiny_sky[0]/'mock_truth.parquet')
    # the footprint cross-match finds every lens placed in the mock sky, cut at its catalogue position
    assert set(known.lens_name) >= set(truth.loc[truth.is_lens & (truth.lenscat_name != ''), 'lenscat_name']) and known.truth_is_lens.any()
    assert known.score.notna().all()
    for fpr, t in th.items():
        for grade, g in [('all', known), *known.groupby('known_lens_grading')]:
            r = rec[(rec.grading == grade) & np.isclose(rec.target_fpr, fpr)].iloc[0]
            assert r.n == len(g) and r.n_recovered == int((g.score >= t).sum())
    assert (out/'known_lenses_gallery.png').stat().st_size > 5_000


def test_spark_engine_matches_local(tiny_sky, tiny_parent, searched, spark):
    "The Spark path (phase 4c's run_inject) cuts the same stamps: same scores on two bricks."
    from dhs.search import run_search
    sky, _ = tiny_sky
    d, hosts = tiny_parent
    bricks = sorted(hosts.brickname.unique())[:2]
    run_search(_cfg(sky, d, out_uri=str(d/'spark'), bricks=bricks, engine='spark', known_lenses=False), spark, log=lambda *a: None)
    a = pd.read_parquet(d/'spark'/'candidates.parquet').set_index('host_id').score
    b = searched[1].set_index('host_id').score.loc[a.index]
    assert set(pd.read_parquet(d/'spark'/'candidates.parquet').brickname) == set(bricks)
    assert np.allclose(a, b, atol=1e-6)


def test_thresholds_from_validation_only(tmp_path):
    from dhs.search import SearchConfig, operating_thresholds
    pd.DataFrame(dict(score=[0.1, 0.9], is_control=[1, 0], region_split=['val', 'test'])).to_parquet(tmp_path/'v.parquet')
    with pytest.raises(ValueError, match='validation split only'):
        operating_thresholds(SearchConfig(val_scores_uri=str(tmp_path/'v.parquet')))
