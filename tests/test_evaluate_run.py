"The phase 6 run notebook (nbs/runs/07_evaluate.ipynb) under papermill: standalone, and on a score table + stamp table."
import json
from pathlib import Path
import pandas as pd
import pyarrow.parquet as pq
from dhs.toys import synthetic_score_table, toy_gate_set, toy_stamp_table

NB = Path(__file__).parents[1]/'nbs'/'runs'/'07_evaluate.ipynb'


def _run(run_dir, **params):
    import papermill as pm
    from dhs.runner import ensure_kernel
    pm.execute_notebook(str(NB), str(run_dir/'07_evaluate.ipynb'), parameters=dict(run_dir=str(run_dir), **params),
                        kernel_name=ensure_kernel(), cwd=str(run_dir), progress_bar=False)
    return json.loads((run_dir/'evaluation'/'summary.json').read_text())


def test_standalone_run_writes_every_output(tmp_path):
    s = _run(tmp_path, n_boot=10, min_theta_over_psf=0.5)
    ev = tmp_path/'evaluation'
    assert s['synthetic_scores'] is True and 'SYNTHETIC' in s['population'] and 'theta_E/psfsize_r >= 0.5' in s['population']
    for f in ('figures/roc.png', 'figures/roc.pdf', 'tables/tpr_at_fpr.csv', 'tables/tpr_at_fpr.tex', 'tables/stratified.csv',
              'tables/completeness_theta_e.tex', 'tables/fpr_truth_class.csv', 'tables/completeness_theta_over_psf.tex',
              'tables/completeness_psfsize_r.csv', 'tables/fpr_psfsize_r.tex', 'tables/completeness_magnification.csv',
              'tables/completeness_magnification.tex', 'tables/completeness_tangential_stretch.csv', 'tables/completeness_tangential_stretch.tex',
              'figures/completeness_magnification.png', 'figures/completeness_tangential_stretch.pdf',
              'surfaces/theta_e-psf.parquet', 'surfaces/theta_e-depth.parquet',
              'figures/surface_theta_e-psf.pdf', 'figures/calibration.png', 'gates.json', 'gates.tex', 'summary.json',
              'tables/criterion.csv', 'tables/criterion.tex'):
        assert (ev/f).exists(), f
    t = pd.read_csv(ev/'tables'/'tpr_at_fpr.csv')
    assert t.target_fpr.tolist() == [1e-2, 1e-3, 1e-4, 1e-5] and (t.n_neg > 0).all()
    assert t.measurable.tolist() == [bool(n * f >= 10) for n, f in zip(t.n_neg, t.target_fpr)]
    mu = pd.read_csv(ev/'tables'/'completeness_magnification.csv')     # the synthetic magnifications (2-10) all fall inside the edges
    assert mu.n.sum() == t.n_pos.iloc[0] and mu.bin.tolist()[-1] == '[50, inf)' and not (ev/'tables'/'completeness_psf_fwhm_r.csv').exists()
    assert s['calibration']['ece_after'] < s['calibration']['ece_before']
    assert s['gates']['passed'] is True and s['gate_stamps'] == 'toy'
    assert s['provenance']['config']['min_theta_over_psf'] == 0.5
    c = s['criterion']                                                 # the success criterion: three rows, the verdict of the 1e-3 one
    assert [r['target_fpr'] for r in c['rows']] == [1e-2, 1e-3, 1e-4] and c['verdict'] == c['rows'][1]['verdict']
    assert (c['target_fpr'], c['target_tpr'], c['min_theta_over_psf']) == (1e-3, 0.8, 1.0)
    for r in c['rows']:
        assert r['measurable'] == (min(r['n_neg_val'], r['n_neg']) * r['target_fpr'] >= 10) and r['n_neg'] == s['n_test']['neg']
        assert r['verdict'] == ('UNMEASURABLE' if not r['measurable'] else 'PASS' if r['fpr'] <= r['target_fpr'] and r['tpr'] >= 0.8 else 'FAIL')
        assert r['n_pos'] < s['n_test']['pos'] and r['tpr_cp'] == [r['tpr_lo'], r['tpr_hi']] and None not in r['tpr_host_boot']
    assert c['rows'][2]['verdict'] == 'UNMEASURABLE'                   # 1e-4 from ~12k negatives
    assert s['criterion_headline'].startswith('Criterion FPR <= 1e-03 at TPR >= 0.80 on resolved lenses') and c['verdict'] in s['criterion_headline']


def test_run_on_score_and_stamp_tables(tmp_path):
    (tmp_path/'scores').mkdir(); (tmp_path/'stamps').mkdir()
    synthetic_score_table(8000, seed=9).to_parquet(tmp_path/'scores'/'scores.parquet')
    pq.write_table(toy_stamp_table(toy_gate_set(160, 'core', seed=9)), tmp_path/'stamps'/'part-0.parquet')
    s = _run(tmp_path, n_boot=10, gate_max_stamps=400, fprs='1e-2,1e-3', population='my population', criterion_tpr=0.5, criterion_min_theta_over_psf=1.5)
    assert s['synthetic_scores'] is False and s['population'] == 'my population'
    assert [r['target_fpr'] for r in s['criterion']['rows']] == [1e-2, 1e-3, 1e-4] and 'TPR >= 0.50' in s['criterion_headline']
    assert s['criterion']['min_theta_over_psf'] == 1.5 and 'theta_E/psfsize_r >= 1.5' in s['criterion']['positives']
    assert [r['target_fpr'] for r in s['tpr_at_fpr']] == [1e-2, 1e-3]
    assert s['gate_stamps'].endswith('stamps') and s['gates']['passed'] is False
    assert s['gates']['values']['core_only_auc']['passed'] is False
