"Phase 5 scoring: reproducible scores, ensembles of different architectures, TTA invariance, the CLI."
import json
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from dhs import cli
from dhs.data import Preprocess, dihedral
from dhs.toys import synthetic_stamp_table
from dhs.models import LensFinder
from dhs.score import score_table
from dhs.stamps import decode_stamps, encode_stamps
from dhs.train import cpu_demo_config, fit, save_checkpoint

torch.set_num_threads(1)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    "A stamp table and a small CNN trained on it for two epochs."
    d = tmp_path_factory.mktemp('score')
    t = synthetic_stamp_table(64, seed=31)
    pq.write_table(t, d / 'stamps.parquet', row_group_size=20)
    cfg = cpu_demo_config(stamps=str(d / 'stamps.parquet'), out_dir=str(d / 'run'), epochs=2, batch_size=8, progress=False,
                          preprocess=Preprocess(residual=True))
    fit(cfg, log=lambda *a: None)
    return d, t


def test_scoring_twice_gives_the_same_scores(trained):
    d, t = trained
    ck = d / 'run' / 'last.pt'
    a = score_table(d / 'stamps.parquet', [ck], batch_size=16)
    b = score_table(d / 'stamps.parquet', [ck], d / 'scores.parquet', batch_size=16, num_workers=2)
    assert a['task_id'].tolist() == t['task_id'].to_pylist()
    assert np.array_equal(a.score_logit.to_numpy(), b.score_logit.to_numpy())
    assert a.score.std() > 0                                                   # not a constant
    back = pq.read_table(d / 'scores.parquet').to_pandas()
    assert np.array_equal(back.score.to_numpy(), a.score.to_numpy())
    binary = {f.name for f in t.schema if pa.types.is_binary(f.type) or pa.types.is_fixed_size_binary(f.type)}
    assert set(back.columns) == {'score', 'score_logit'} | (set(t.column_names) - binary)      # all metadata passes through


def test_ensemble_detects_each_architecture(trained, tmp_path):
    d, t = trained
    torch.manual_seed(1)
    save_checkpoint(tmp_path / 'resnet.pt', LensFinder('resnet18'), cpu_demo_config(), dict(epoch=0))   # config says small_cnn
    torch.save(LensFinder('efficientnet_b0').state_dict(), tmp_path / 'effnet_bare.pt')
    cks = [d / 'run' / 'best.pt', tmp_path / 'resnet.pt', tmp_path / 'effnet_bare.pt']
    s = score_table(d / 'stamps.parquet', cks, tmp_path / 'ens.parquet', splits=['test'], batch_size=8)
    prov = json.loads(pq.read_schema(tmp_path / 'ens.parquet').metadata[b'dhs_provenance'])
    assert prov['archs'] == ['small_cnn', 'resnet18', 'efficientnet_b0']
    members = s[['score_0', 'score_1', 'score_2']].to_numpy()
    assert np.allclose(members.mean(1), s.score.to_numpy()) and len(s) == t['region_split'].to_pylist().count('test')
    ck = torch.load(tmp_path / 'resnet.pt', weights_only=True)
    ck['arch'] = 'small_cnn'
    torch.save(ck, tmp_path / 'mislabelled.pt')
    with pytest.raises(ValueError, match="arch='small_cnn' but its weights are a 'resnet18'"):
        score_table(d / 'stamps.parquet', [tmp_path / 'mislabelled.pt'])


def test_tta_scores_are_invariant_under_flips_and_rotations(trained, tmp_path):
    d, t = trained
    imgs = torch.from_numpy(decode_stamps(t['stamp']).copy())
    turned = t.set_column(t.schema.get_field_index('stamp'), 'stamp', encode_stamps(dihedral(imgs, 5).numpy()))
    pq.write_table(turned, tmp_path / 'turned.parquet')
    ck = [d / 'run' / 'last.pt']
    plain, rot = score_table(d / 'stamps.parquet', ck, batch_size=32), score_table(tmp_path / 'turned.parquet', ck, batch_size=32)
    tta, rot_tta = (score_table(p, ck, tta=True, batch_size=32) for p in (d / 'stamps.parquet', tmp_path / 'turned.parquet'))
    assert np.abs(tta.score_logit - rot_tta.score_logit).max() < 1e-4            # the 8-fold average does not care
    assert np.abs(plain.score_logit - rot.score_logit).max() > 1e-3             # a single orientation does


def test_dhs_score_cli(trained, tmp_path):
    d, t = trained
    out = tmp_path / 'cli.parquet'
    assert cli.main(['score', str(d / 'stamps.parquet'), '--checkpoint', str(d / 'run' / 'last.pt'), '--out', str(out), '--split', 'val',
                     '--tta']) == 0
    s = pq.read_table(out).to_pandas()
    assert len(s) == t['region_split'].to_pylist().count('val') and set(s.region_split) == {'val'}
