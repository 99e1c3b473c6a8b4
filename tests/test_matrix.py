"`dhs run --matrix`: variants re-run from their first differing phase on links to the baseline, and one comparison table."
import hashlib, json, time
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
from dhs import runner


def _sha256(p:Path)->str: return hashlib.sha256(p.read_bytes()).hexdigest()


def _shared_files(run_dir:Path, phases:list)->dict:
    "sha256 of every file the baseline's `phases` created (from run.json outputs)."
    rec = json.loads((run_dir/'run.json').read_text())
    names = [n for e in rec['phases'] if e['phase'] in phases for n in e['outputs']]
    files = [p for n in names for p in ([run_dir/n] if (run_dir/n).is_file() else (run_dir/n).rglob('*')) if p.is_file()]
    return {str(p): _sha256(p) for p in files}


@pytest.mark.slow
def test_tiny_ablation_matrix(tiny_run, tmp_path):
    proc, base = tiny_run
    assert proc.returncode == 0, proc.stderr
    m = runner.MATRICES['tiny-ablation']
    shared_phases = m.phases[:m.phases.index('train')]
    before = _shared_files(base, shared_phases)
    assert len(before) > 20
    said, t0 = [], time.time()
    mdir = runner.run_matrix('tiny-ablation', tmp_path, 'm1', baseline_run=base, log=said.append)
    print(f'tiny-ablation matrix, 2 variants: {time.time() - t0:.1f} s')
    table = pd.read_csv(mdir/'comparison.csv', index_col='run')
    assert list(table.index) == ['baseline', 'residual', 'meta-fusion']
    assert np.isfinite(table.auroc).all() and np.isfinite(table['tpr@0.01']).all()
    assert list(table.first_phase.fillna('')) == ['', 'train', 'train']
    assert table.loc['residual', 'factor'] == 'train.residual=True'
    assert table.loc['residual', 'seconds'] < table.loc['baseline', 'seconds']     # only train and evaluate were its own
    base_scores = pd.read_parquet(base/'scores'/'scores.parquet').set_index('task_id').score
    for v, check in (('residual', lambda ck: ck['preprocess']['residual'] is True),
                     ('meta-fusion', lambda ck: ck['meta_columns'] == runner.FUSED_META)):
        vdir = mdir/v
        scores = pd.read_parquet(vdir/'scores'/'scores.parquet').set_index('task_id').score
        assert scores.index.sort_values().equals(base_scores.index.sort_values())   # the same stamps ...
        assert not np.allclose(scores.loc[base_scores.index], base_scores)          # ... scored differently
        import torch
        assert check(torch.load(vdir/'train'/'best.pt', map_location='cpu', weights_only=False))
        assert not (vdir/'train').is_symlink() and not (vdir/'train'/'best.pt').is_symlink()
        assert not (vdir/'stamps').is_symlink() and any(p.is_symlink() for p in (vdir/'stamps').rglob('*'))
        rec = json.loads((vdir/'run.json').read_text())
        assert [p['phase'] for p in rec['phases']] == m.phases
        assert [bool(p.get('shared')) for p in rec['phases']] == [p in shared_phases for p in m.phases]
        assert rec['matrix']['first_phase'] == 'train' and (vdir/'evaluation'/'summary.json').exists()
    assert _shared_files(base, shared_phases) == before            # the baseline was read, never written
    tex, md = (mdir/'comparison.tex').read_text(), (mdir/'comparison.md').read_text()
    assert r'\toprule' in tex and 'meta-fusion' in tex and '| residual |' in md
    prov = json.loads((mdir/'matrix.json').read_text())
    assert prov['baseline'] == str(base.resolve()) and prov['variants']['residual']['first_phase'] == 'train'
    assert any('re-runs from phase train' in s for s in said)


def test_unknown_variant_and_matrix_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"no variant\(s\) \['nope'\]"):
        runner.run_matrix('tiny-ablation', tmp_path, 'm', variants=['residual', 'nope'])
    with pytest.raises(ValueError, match='unknown matrix'):
        runner.run_matrix('no-such-matrix', tmp_path)
    assert not (tmp_path/'m').exists()                             # refused before anything ran


def test_variant_changing_nothing_is_refused(tmp_path, monkeypatch):
    same = runner.Matrix('test', 'tiny', runner.MATRICES['tiny-ablation'].phases,
                         {'residual': ['train.residual=True'], 'same': ['train.residual=False', 'evaluate.n_boot=200']})
    monkeypatch.setitem(runner.MATRICES, 'same-test', same)
    with pytest.raises(ValueError, match="variant 'same'.*changes nothing"):
        runner.run_matrix('same-test', tmp_path, 'm')
    assert not (tmp_path/'m').exists()


def test_baseline_without_outputs_is_refused(tmp_path):
    "A baseline recorded before run.json listed phase outputs cannot be linked: say so, run nothing."
    base = tmp_path/'old-run'
    base.mkdir()
    phases = runner.MATRICES['tiny-ablation'].phases
    plan = runner.resolve('tiny', phases)
    (base/'run.json').write_text(json.dumps(dict(phases=[dict(s, status='ok', params=dict(s['params'], run_dir=str(base))) for s in plan])))
    with pytest.raises(ValueError, match='lists no outputs'):
        runner.run_matrix('tiny-ablation', tmp_path, 'm', variants=['residual'], baseline_run=base, log=lambda *a: None)
    assert not (tmp_path/'m'/'residual'/'06_train.ipynb').exists()
    rec = json.loads((base/'run.json').read_text())
    (base/'run.json').write_text(json.dumps(dict(phases=[p for p in rec['phases'] if p['phase'] != 'evaluate'])))
    with pytest.raises(ValueError, match=r"baseline phase\(s\) \['evaluate'\] did not finish"):
        runner.run_matrix('tiny-ablation', tmp_path, 'm2', baseline_run=base)
