"Hard negatives: mined from train/val controls only, and round-tripped through phase 4a's --extra-negatives without crossing splits."
import numpy as np
import pandas as pd
import pytest


@pytest.fixture(scope='module')
def manifest(tiny_hosts, spark, tmp_path_factory):
    "Parent hosts of the tiny sky (no Spark) and their phase 4a manifest."
    from dhs.manifest import ManifestConfig, run_manifest
    d, hosts = tmp_path_factory.mktemp('hardneg'), tiny_hosts
    (d/'hosts').mkdir(); hosts.to_parquet(d/'hosts'/'part-0.parquet')
    run_manifest(ManifestConfig(parent_uri=str(d/'hosts'), out_uri=str(d/'m0'), partitions=2), spark)
    return d, hosts, pd.read_parquet(d/'m0'/'tasks')


def _scores(tasks, seed=0):
    "A score table of every manifest task (as dhs score writes it), scores random, the test split's controls highest."
    rng = np.random.default_rng(seed)
    s = tasks[['task_id', 'host_id', 'region_split', 'is_control', 'control_kind', 'brickname']].copy()
    s['score'] = rng.uniform(0, 1, len(s)) + 2.0 * (s.region_split == 'test')   # a miner that looked at test would take these
    s['score_logit'] = np.log(s.score)
    return s


def test_mine_never_takes_test(manifest, tmp_path):
    from dhs.hardneg import HardNegConfig, run_hardneg
    d, hosts, tasks = manifest
    assert {'train', 'val', 'test'} <= set(tasks.region_split)
    _scores(tasks).to_parquet(tmp_path/'scores.parquet')
    s = run_hardneg(HardNegConfig(scores_uri=str(tmp_path/'scores.parquet'), stamps_uri='', out_uri=str(tmp_path/'hn'), n_top=10,
                                  parent_uri=str(d/'hosts')), log=lambda *a: None)
    neg = pd.read_parquet(tmp_path/'hn'/'hard_negatives.parquet')
    test_hosts = set(tasks.loc[tasks.region_split == 'test', 'host_id'])
    assert len(neg) == 10 and neg.host_id.is_unique and not (set(neg.host_id) & test_hosts)
    assert set(neg.region_split) <= {'train', 'val'}
    ctl = tasks.set_index('task_id')
    assert (ctl.loc[neg.task_id, 'is_control'] == 1).all()
    # the top of the train/val controls, one per host, in score order
    sc = _scores(tasks); sc = sc[(sc.is_control == 1) & sc.region_split.isin(['train', 'val'])]
    want = sc.sort_values('score', ascending=False).drop_duplicates('host_id').head(10)
    assert neg.host_id.tolist() == want.host_id.tolist() and np.allclose(neg.score, want.score)
    assert s['n_negatives'] == 10


def test_round_trip_through_manifest(manifest, spark, tmp_path, tiny_sky):
    from dhs.hardneg import HardNegConfig, run_hardneg
    from dhs.manifest import ManifestConfig, run_manifest
    d, hosts, tasks = manifest
    _scores(tasks, seed=1).to_parquet(tmp_path/'scores.parquet')
    run_hardneg(HardNegConfig(scores_uri=str(tmp_path/'scores.parquet'), stamps_uri='', out_uri=str(tmp_path/'hn'), n_top=8,
                              parent_uri=str(d/'hosts'), truth_uri=str(tiny_sky[0]/'mock_truth.parquet')), log=lambda *a: None)
    neg = pd.read_parquet(tmp_path/'hn'/'hard_negatives.parquet')
    assert neg.truth_class.notna().all() and 'objid' in neg
    run_manifest(ManifestConfig(parent_uri=str(d/'hosts'), out_uri=str(tmp_path/'m1'), partitions=2,
                                splits_uri=str(d/'m0'/'splits.parquet'), extra_negatives_uri=str(tmp_path/'hn'/'hard_negatives.parquet')), spark)
    t1 = pd.read_parquet(tmp_path/'m1'/'tasks')
    hn = t1[t1.control_kind == 'hard_negative']
    assert sorted(hn.host_id) == sorted(neg.host_id) and (hn.is_control == 1).all()
    split_of = neg.set_index('host_id').region_split
    assert (hn.set_index('host_id').region_split == split_of.loc[hn.host_id].to_numpy()).all()     # no split crossed
    assert 'test' not in set(hn.region_split)
    # every other task is unchanged: same ids, same splits
    base = tasks.set_index('task_id').region_split
    rest = t1[t1.control_kind != 'hard_negative'].set_index('task_id').region_split
    assert set(rest.index) == set(base.index) and (rest == base.loc[rest.index]).all()
    # a table that moves a host into another split is refused
    bad = neg.copy(); bad.loc[0, 'region_split'] = 'val' if bad.region_split[0] == 'train' else 'train'
    bad.to_parquet(tmp_path/'bad.parquet')
    with pytest.raises(Exception, match='splits never change'):
        run_manifest(ManifestConfig(parent_uri=str(d/'hosts'), out_uri=str(tmp_path/'m2'), partitions=2,
                                    splits_uri=str(d/'m0'/'splits.parquet'), extra_negatives_uri=str(tmp_path/'bad.parquet')), spark)
