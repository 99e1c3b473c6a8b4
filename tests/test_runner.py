"`dhs run`: papermill executes the run notebooks, records run.json, honours parameters."
import json, subprocess, sys
from pathlib import Path
import nbformat
import pytest
from dhs import runner


def _injected_source(nb_path):
    nb = nbformat.read(str(nb_path), as_version=4)
    cells = [c for c in nb.cells if 'injected-parameters' in c.metadata.get('tags', [])]
    assert len(cells) == 1, 'papermill should add exactly one injected-parameters cell'
    return cells[0].source


@pytest.mark.slow
def test_tiny_preset_cli_records_run(tiny_run):
    "The README's main command, at its smallest: every phase of the pipeline on the tiny mock sky (run once, in conftest)."
    out, run_dir = tiny_run
    assert out.returncode == 0, out.stderr
    record = json.loads((run_dir/'run.json').read_text())
    assert record['preset'] == 'tiny' and record['dhs_version']
    assert [p['phase'] for p in record['phases']] == runner.PRESETS['tiny'].phases
    assert all(p['status'] == 'ok' and p['seconds'] > 0 for p in record['phases'])
    for p in record['phases']: assert Path(p['executed']).exists()
    outputs = {p['phase']: p['outputs'] for p in record['phases']}
    assert {'sky', '01_mocksky.ipynb'} <= set(outputs['mocksky']) and 'stamps' in outputs['inject'] and 'train' in outputs['train']
    named = [n for names in outputs.values() for n in names]
    assert len(named) == len(set(named)), 'each top-level name belongs to the phase that created it'
    # beside the phases' names only run.json, and inspect/ if a test graded the run's candidates in `dhs inspect` (a person's grades, not a phase's)
    assert set(named) == {p.name for p in run_dir.iterdir()} - {'run.json', 'inspect'}
    where = {p['phase']: p.get('spark', []) for p in record['phases']}
    for ph in ('parent', 'manifest', 'inject', 'hardneg', 'search'):   # where each Spark phase ran, copied from its summaries
        assert where[ph] and all(a['master'] == 'local[2]' and a['app_id'].startswith('local-') for a in where[ph]), (ph, where[ph])
    assert not where['train'] and not where['cache']


def test_parameter_overrides_default(tmp_path):
    run_dir = runner.run_preset('tiny', tmp_path, 'r2', only=['environment'], sets=['environment.note=from-the-command-line'],
                               log=lambda *a: None)
    src = _injected_source(run_dir/'00_environment.ipynb')
    assert "note = 'from-the-command-line'" in src or 'note = "from-the-command-line"' in src
    env = json.loads((run_dir/'environment.json').read_text())
    assert env['note'] == 'from-the-command-line'     # the notebook used the value, not its default 'default'
    entry = json.loads((run_dir/'run.json').read_text())['phases'][0]
    assert {'00_environment.ipynb', 'environment.json'} <= set(entry['outputs']) and 'run.json' not in entry['outputs']
    run_dir = runner.run_preset('tiny', tmp_path, 'r3', only=['environment'], log=lambda *a: None)
    assert json.loads((run_dir/'environment.json').read_text())['note'] == 'default'


def test_resume_skips_finished_phases(tmp_path):
    runner.run_preset('tiny', tmp_path, 'r4', only=['environment'], log=lambda *a: None)
    first = json.loads((tmp_path/'r4'/'run.json').read_text())['phases'][0]
    said = []
    runner.run_preset('tiny', tmp_path, 'r4', only=['environment'], resume=True, log=said.append)
    again = json.loads((tmp_path/'r4'/'run.json').read_text())['phases'][0]
    assert any('skipped' in s for s in said)
    assert again['started_utc'] == first['started_utc']


def test_failed_phase_is_recorded(tmp_path):
    import shutil
    nb_dir = tmp_path/'nbs'
    shutil.copytree(runner.runs_dir(), nb_dir)
    nb = nbformat.read(str(runner.runs_dir()/'00_environment.ipynb'), as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("raise ValueError('brick 0001p000 is broken')"))
    nbformat.write(nb, str(nb_dir/'00_environment.ipynb'))
    with pytest.raises(RuntimeError, match="phase 'environment' failed"):
        runner.run_preset('tiny', tmp_path/'out', 'r5', only=['environment'], nb_dir=nb_dir, log=lambda *a: None)
    record = json.loads((tmp_path/'out'/'r5'/'run.json').read_text())
    assert record['phases'][0]['status'] == 'failed'
    assert 'brick 0001p000 is broken' in record['phases'][0]['error']


def test_unknown_parameter_is_refused():
    with pytest.raises(ValueError, match='no selected phase declares it'):
        runner.resolve('mock', sets=['environment.nott=1'])


def test_every_preset_resolves():
    for name in runner.PRESETS:
        plan = runner.resolve(name)
        assert plan and all(Path(s['notebook']).exists() for s in plan)


@pytest.mark.slow
def test_tiny_run_leaves_the_paper_outputs(tiny_run):
    "Evaluation with the run's model in the score gates, FPR by mock contaminant class, the fine-tuned hard-negative round, the paper folder."
    out, run_dir = tiny_run
    assert out.returncode == 0, out.stderr
    s = json.loads((run_dir/'evaluation'/'summary.json').read_text())
    gates = s['gates']['values']
    for g in ('arc_suppressed_score', 'ring_counterfactual'):          # the score gates (tiny: too few stamps for the CV gates)
        assert gates[g]['value'] is not None, f'{g} did not run with the trained checkpoint'
    c = s['criterion']                                                 # the success criterion: 1e-2, 1e-3, 1e-4; far too few negatives to judge
    assert [r['target_fpr'] for r in c['rows']] == [1e-2, 1e-3, 1e-4] and c['target_fpr'] == 1e-3 and c['verdict'] == c['rows'][1]['verdict']
    assert all(r['verdict'] == 'UNMEASURABLE' and r['measurable'] is False and r['n_neg'] == s['n_test']['neg'] for r in c['rows'])
    assert c['rows'][1]['n_pos'] <= s['n_test']['pos'] and s['criterion_headline'].startswith('Criterion FPR <= 1e-03')
    fe = s['gates']['flux_excess']                                     # unresolved beside resolved, at the validation threshold
    assert fe['threshold_from'].startswith('validation, FPR') and {'n_unresolved', 'completeness_resolved_lo'} <= set(fe)
    swap = json.loads((run_dir/'evaluation'/'gates.json').read_text())
    swap = next(g for g in swap['gates'] if g['name'] == 'psf_swap_ks')
    assert swap['detail']['n_rows'] > 0 and swap['detail']['stored_model'] == 'survey'   # test injections re-made from the run's cache...
    assert swap['detail']['stored_max_abs_diff'] == 0.0                                   # ...are the stored stamps, bit for bit
    assert s['provenance']['config']['scorer'] == 'dhs.score:image_scorer' and s['provenance']['config']['truth'].endswith('mock_truth.parquet')
    import pandas as pd
    by_class = pd.read_csv(run_dir/'evaluation'/'tables'/'fpr_truth_class.csv')
    assert by_class.n.sum() == s['n_test']['neg'] and 'lrg' in set(by_class['bin'])   # every test negative has a truth class
    hn = json.loads((run_dir/'hardneg'/'hardneg_round.json').read_text())
    assert hn['retrain']['mode'] == 'finetune' and hn['retrain']['n_new_stamps'] > 0
    paper = run_dir/'paper'
    for f in ('figures/fig_roc.pdf', 'figures/fig_completeness.pdf', 'figures/fig_scores.pdf', 'tables/tpr_at_fpr.tex', 'tables/criterion.tex',
              'tables/known_lenses.tex', 'tables/hardneg.tex', 'macros.tex', 'README.md'):
        assert (paper/f).exists(), f
    macros = (paper/'macros.tex').read_text()
    assert '\\newcommand{\\dhsCriterionVerdict}{UNMEASURABLE}' in macros and f"\\newcommand{{\\dhsCriterionFP}}{{{c['rows'][1]['n_fp']}/{c['rows'][1]['n_neg']}}}" in macros
    assert f"\\newcommand{{\\dhsNneg}}{{{s['n_test']['neg']}}}" in macros and '$$' not in (paper/'tables'/'tpr_at_fpr.tex').read_text()


def test_mock_large_plan_resolves_with_checked_parameters(capsys):
    "The mock-large preset: its plan resolves, every parameter passes its notebook's checks, and its sky size exists."
    from dhs.cli import main
    from dhs.mocksky import mock_sky_config
    assert main(['run', '--preset', 'mock-large', '--dry-run']) == 0
    plan = {p['phase']: p['params'] for p in json.loads(capsys.readouterr().out)}
    assert plan['mocksky']['size'] == 'large' and mock_sky_config('large').brick_pixels == 1024
    assert plan['manifest']['eval_controls'] == 'census' and abs(sum(plan['manifest']['split_fractions']) - 1) < 1e-9
    assert plan['evaluate']['headline_fpr'] == 1e-3
    with pytest.raises(ValueError, match='summing to 1'): runner.check_param('manifest', 'split_fractions', [0.2, 0.4, 0.5], [0.7, 0.15, 0.15])
