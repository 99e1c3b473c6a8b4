"Shortcut gates: a core-shortcut toy set fails, a clean one passes; the CLI on a real Parquet stamp table."
import json, subprocess, sys
from pathlib import Path
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from dhs.gates import GateConfig, run_gates, core_radii, noise_sigma, suppress_annulus, annulus_mask, main
from dhs.toys import toy_gate_set, toy_score_fn, toy_stamp_table, manifest_gate_set


def _halves(s):
    n = len(s['labels']); first = np.arange(n) < n // 2
    cut = lambda m: {k: (v[m].reset_index(drop=True) if isinstance(v, pd.DataFrame) else v[m]) for k, v in s.items()}
    return cut(first), cut(~first)


@pytest.fixture(scope='module')
def toys():
    return {k: _halves(toy_gate_set(400, k, seed=11)) for k in ('clean', 'core')}


def _report(toy, kind, inj=True):
    fit, ev = toy
    fn = toy_score_fn('arc' if kind == 'clean' else 'core', fit['images'], fit['labels'])
    return run_gates(ev['images'], ev['labels'], GateConfig(), ev['theta_e'], ev['psf_fwhm'], ev['inj'] if inj else None,
                     ev['sigma'], ev['controls'], fn, ev['meta'], population=f'toy {kind}')


def test_shortcut_set_fails(toys):
    rep = _report(toys['core'], 'core')
    assert rep.passed is False
    for gate in ('core_only_auc', 'arc_suppressed_score', 'core_masked_auroc_drop'):
        assert rep[gate].passed is False, (gate, rep[gate].value)
    assert rep['core_only_auc'].value > 0.9
    # the radial profile sees the core flux too, more weakly (rings meeting the arc annulus are left out,
    # and for small theta_E/PSF the annulus covers the core): 0.67 on this seed, 0.82 on the notebook's
    assert rep['radial_profile_auc'].value > 0.6
    assert rep['core_only_auc'].detail['rule'] == 'injection'


def test_clean_set_passes(toys):
    rep = _report(toys['clean'], 'clean')
    assert rep.passed is True, rep.to_frame()
    assert rep.not_run == ['flux_excess_ratio', 'psf_swap_ks']      # no unresolved toy lenses (theta_E >= 1.5"); no cache to re-render from
    assert abs(rep['core_only_auc'].value - 0.5) < 0.12
    assert rep['arc_suppressed_score'].detail['mean_score_pos'] > 0.6      # the toy arc model does see the arcs
    assert rep['radial_profile_auc_full'].value > 0.9 and rep['radial_profile_auc_full'].passed is None   # reported only


def test_geometric_core_rule_agrees(toys):
    for kind, verdict in (('clean', True), ('core', False)):
        _, ev = toys[kind]
        rep = run_gates(ev['images'], ev['labels'], GateConfig(), ev['theta_e'], ev['psf_fwhm'])
        assert rep['core_only_auc'].detail['rule'] == 'geometric'
        assert rep['core_only_auc'].passed is verdict


def test_core_rule_same_for_both_classes():
    s = toy_gate_set(20, 'clean', seed=3)
    inj = s['inj'].copy(); inj[s['labels'] == 0] = 0     # negatives without shadow injections
    r, rule = core_radii(20, s['theta_e'], s['psf_fwhm'], inj, s['sigma'])
    assert rule == 'geometric'                           # not injection for lenses and geometry for negatives
    r_inj, rule = core_radii(20, s['theta_e'], s['psf_fwhm'], s['inj'], s['sigma'])
    assert rule == 'injection'
    # the true injection is below 0.1 sigma everywhere inside the injection-rule core
    rad = np.hypot(*(np.indices((64, 64)) - 32))
    for i in range(20):
        core = rad < r_inj[i]
        assert (np.abs(s['inj'][i][:, core]) < 0.1 * s['sigma'][i][:, None]).all()


def test_annulus_suppression_removes_the_arc():
    "The annulus around theta_E holds the lensed light: suppressing it leaves < 10% of the arc's flux, and nothing else changes."
    s = toy_gate_set(10, 'clean', seed=4)
    pos = s['labels'] == 1
    img, ctl, arc = s['images'][pos], s['controls'][pos], s['inj'][pos]
    sup = suppress_annulus(img, s['theta_e'][pos], s['psf_fwhm'][pos], s['sigma'][pos], ctl)
    left = (sup - ctl).sum((1, 2, 3)) / arc.sum((1, 2, 3))       # arc flux still in the image, per stamp
    assert (left < 0.1).all(), left
    ann = np.broadcast_to(annulus_mask(s['theta_e'][pos], s['psf_fwhm'][pos], 64)[:, None], img.shape)
    assert (sup[~ann] == img[~ann]).all()                         # outside the annulus the image is untouched
    # an annulus at the wrong radius would leave most of the arc: the test above can fail
    wrong = suppress_annulus(img, 0.3 * s['theta_e'][pos], s['psf_fwhm'][pos], s['sigma'][pos], ctl)
    assert ((wrong - ctl).sum((1, 2, 3)) / arc.sum((1, 2, 3))).mean() > 0.3
    # without a paired control the annulus is refilled with the azimuthal median plus noise of the stamp's sigma
    fill = suppress_annulus(img, s['theta_e'][pos], s['psf_fwhm'][pos], s['sigma'][pos], None)
    assert np.allclose(noise_sigma(fill), s['sigma'][pos], rtol=0.25)


def test_metadata_leak_is_caught():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(300), np.ones(300)].astype(int)
    meta = pd.DataFrame(dict(psfsize_r=rng.normal(1.3, 0.2, 600), theta_e_arcsec=rng.uniform(0.5, 2.5, 600)))
    # theta_E/PSF >= 1 applied to the lenses only (the earlier pipeline's mistake)
    keep_pos = meta.theta_e_arcsec / meta.psfsize_r >= 1.0
    meta = meta.assign(theta_over_psf=meta.theta_e_arcsec / meta.psfsize_r)
    sel = (y == 0) | keep_pos.to_numpy()
    rep = run_gates(np.zeros((sel.sum(), 3, 16, 16), 'f4') + rng.normal(0, 1e-3, (sel.sum(), 3, 16, 16)).astype('f4'), y[sel],
                    GateConfig(min_core_stamps=10**6), theta_e=meta.theta_e_arcsec[sel].to_numpy(), psf_fwhm=meta.psfsize_r[sel].to_numpy(),
                    meta=meta[sel].reset_index(drop=True))
    assert rep['metadata_auc'].passed is False and rep['metadata_auc'].value > 0.62
    assert rep['core_only_auc'].value is None and 'core' in rep['core_only_auc'].note    # not run, said why, never passed


def test_cli_on_parquet_stamp_tables(toys, tmp_path):
    for kind, code in (('clean', 0), ('core', 1)):
        _, ev = toys[kind]
        pq.write_table(toy_stamp_table(ev), tmp_path/f'{kind}.parquet')
        out = tmp_path/f'gates-{kind}'
        assert main([str(tmp_path/f'{kind}.parquet'), '--out', str(out), '--max-stamps', '200']) == code
        rep = json.loads((out/'gates.json').read_text())
        verdicts = {g['name']: g['passed'] for g in rep['gates']}
        assert verdicts['core_only_auc'] is (kind == 'clean')
        assert verdicts['arc_suppressed_score'] is None                # no scorer given: not run
        assert rep['provenance']['dhs_version'] and (out/'gates.csv').exists() and (out/'gates.tex').exists()


def test_cli_scorer_and_scores(toys, tmp_path, monkeypatch):
    fit, ev = toys['core']
    pq.write_table(toy_stamp_table(ev), tmp_path/'core.parquet')
    # a scorer factory importable as module:function, and a score table joined on task_id
    (tmp_path/'toyscorer.py').write_text(
        'import numpy as np\nfrom dhs.toys import toy_gate_set, toy_score_fn\n'
        'def factory(checkpoint):\n    s = toy_gate_set(200, "core", seed=int(checkpoint))\n'
        '    return toy_score_fn("core", s["images"], s["labels"])\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    t = pq.read_table(tmp_path/'core.parquet').to_pandas()
    pd.DataFrame(dict(task_id=t.task_id, score=1.0 - t.is_control)).to_parquet(tmp_path/'scores.parquet')
    code = main([str(tmp_path/'core.parquet'), '--out', str(tmp_path/'g'), '--max-stamps', '200', '--scorer', 'toyscorer:factory',
                 '--checkpoint', '5', '--scores', str(tmp_path/'scores.parquet')])
    rep = json.loads((tmp_path/'g'/'gates.json').read_text())
    v = {g['name']: g for g in rep['gates']}
    assert code == 1 and v['arc_suppressed_score']['passed'] is False and v['core_masked_auroc_drop']['passed'] is False
    assert v['model_auroc']['value'] == 1.0


def test_dhs_gates_console_script(toys, tmp_path):
    _, ev = toys['clean']
    pq.write_table(toy_stamp_table(ev), tmp_path/'clean.parquet')
    exe = Path(sys.executable).parent/'dhs'
    cmd = [str(exe)] if exe.exists() else [sys.executable, '-m', 'dhs.cli']
    out = subprocess.run(cmd + ['gates', str(tmp_path/'clean.parquet'), '--out', str(tmp_path/'g'), '--max-stamps', '200'],
                         capture_output=True, text=True, timeout=300, env={**__import__('os').environ, 'PYTHONPATH': str(Path(__file__).parents[1])})
    assert out.returncode == 0, out.stderr[-2000:]
    assert 'gates: PASS' in out.stdout and (tmp_path/'g'/'gates.json').exists()


def _psf_swap_sky(tmp_path):
    "A tiny brick with a coadd PSF (Moffat core 1.5 x psfsize, a wing), one lens injected through it on 64 hosts by phase 4c."
    from dhs.inject import InjectConfig, run_group
    from dhs.psf import moffat_wing_sb, pixelise_psf
    from dhs.survey import BANDS, PIXSCALE_ARCSEC, copsf_relpath, write_copsf
    from dhs.toys import write_tiny_sky
    tasks = write_tiny_sky(tmp_path/'sky', n_bricks=1, pixels=160, hosts_per_brick=32, tasks_per_host=2, psf_hole=False, masks=False)
    # one bright lens (theta_E 1.2") on every host: what differs between the injections is the host, the noise and the PSF
    pos = tasks.is_control == 0
    first = tasks[pos & (tasks.source_kind == 'sersic')].iloc[0]
    same = [c for c in tasks if c.startswith('src_') or c in ('source_kind', 'template_id', 'lens_q', 'lens_phi_rad', 'gamma1', 'gamma2', 'shear', 'shear_phi_rad', 'lens_e')]
    for c in same: tasks.loc[pos, c] = first[c]
    tasks.loc[pos, 'theta_e_arcsec'], tasks.loc[pos, 'src_mag_r'] = 1.2, 20.5
    brick = tasks.brickname[0]
    for b in BANDS:
        f = 1.5 * float(tasks[f'psfsize_{b}'][0]) / PIXSCALE_ARCSEC
        write_copsf(tmp_path/'sky'/copsf_relpath(brick, b), pixelise_psf(lambda x, y: moffat_wing_sb(x, y, f, 2.8, 0.05, 0.3, 0.02, 2 * f), 63), brick, b)
    run_group(tasks, InjectConfig(manifest_uri='', cache_uri=str(tmp_path/'sky'), out_uri=str(tmp_path/'st')),
              str(tmp_path/'st'/'stamps'/'part-00000-of-00001.parquet'))
    (tmp_path/'psfscorers.py').write_text(
        'import numpy as np\n'
        'R = np.hypot(*(np.indices((64, 64)) - 32))\n'
        'def _r(im): return im[:, 1] - np.median(im[:, 1, :8], axis=(1, 2))[:, None, None]\n'
        'def sharp():   # the Laplacian per unit flux in 4 < r < 16 pixels: a PSF detector\n'
        '    def f(im):\n        r, m = _r(im), (R > 4) & (R < 16)\n'
        '        L = 4 * r[:, 1:-1, 1:-1] - r[:, :-2, 1:-1] - r[:, 2:, 1:-1] - r[:, 1:-1, :-2] - r[:, 1:-1, 2:]\n'
        '        x = np.abs(L * m[1:-1, 1:-1]).sum(axis=(1, 2)) / np.abs(r * m).sum(axis=(1, 2))\n'
        '        return 1 / (1 + np.exp(-(x - 3)))\n'
        '    return f\n'
        'def flux():    # the aperture flux: blind to the PSF\n'
        '    def f(im):\n        r = _r(im)\n'
        '        x = np.abs((r * (R < 24)).sum(axis=(1, 2)))\n        return x / (x + 50)\n'
        '    return f\n')
    return tmp_path/'st'/'stamps'


def test_psf_swap_gate_from_the_cache(tmp_path, monkeypatch):
    "dhs gates --cache re-makes the injections through each PSF: bit-identical through the survey PSF, a PSF detector fails, a flux scorer passes."
    stamps = _psf_swap_sky(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    gates = {}
    for name in ('sharp', 'flux'):
        main([str(stamps), '--split', '', '--out', str(tmp_path/name), '--scorer', f'psfscorers:{name}', '--max-stamps', '0'])
        gates[name] = {g['name']: g for g in json.loads((tmp_path/name/'gates.json').read_text())['gates']}['psf_swap_ks']
    sharp, flux = gates['sharp'], gates['flux']
    assert sharp['detail']['n'] == 64 and sharp['detail']['stored_model'] == 'survey' and sharp['detail']['stored_max_abs_diff'] == 0.0
    assert sharp['passed'] is False and sharp['value'] > 0.3, sharp
    assert flux['passed'] is True and flux['value'] < 0.1, flux
    # no cache: the gate says so and is not run; a named cache that is not there is an error naming it
    import shutil; shutil.move(tmp_path/'sky', tmp_path/'moved')
    main([str(stamps), '--split', '', '--out', str(tmp_path/'nocache'), '--scorer', 'psfscorers:flux'])
    g = {g['name']: g for g in json.loads((tmp_path/'nocache'/'gates.json').read_text())['gates']}['psf_swap_ks']
    assert g['value'] is None and 'cache' in g['note']
    with pytest.raises(FileNotFoundError, match='--cache'):
        main([str(stamps), '--split', '', '--out', str(tmp_path/'x'), '--scorer', 'psfscorers:flux', '--cache', str(tmp_path/'sky')])
    main([str(stamps), '--split', '', '--out', str(tmp_path/'moved-cache'), '--scorer', 'psfscorers:flux', '--cache', str(tmp_path/'moved')])
    g = {g['name']: g for g in json.loads((tmp_path/'moved-cache'/'gates.json').read_text())['gates']}['psf_swap_ks']
    assert g['passed'] is True and g['detail']['stored_max_abs_diff'] == 0.0


# --- toy finders on the manifest's own draws (phase 4a's v4_sota grid, phase 4c's renderer, the sky's Moffat PSF) ---
ARC_R_MIN_PIX = 10.0        # the arc toy sees rings beyond ~2 median psfsize (2 x 1.3"): the arc, not the lens's PSF core

def _manifest_halves(s):
    "First half to fit a toy finder, second half to gate it (with the PSF variants of its own lenses)."
    a, b = _halves({k: v for k, v in s.items() if k != 'psf_variants'})
    keep = np.arange(len(s['labels']))[s['labels'] == 1] >= len(s['labels']) // 2
    b['psf_variants'] = dict(images={k: v[keep] for k, v in s['psf_variants']['images'].items()},
                             psf_source_r={k: list(np.asarray(v)[keep]) for k, v in s['psf_variants']['psf_source_r'].items()})
    return a, b


@pytest.fixture(scope='module')
def manifest_toys():
    sets = {k: manifest_gate_set(400, k, seed=11) for k in ('clean', 'core')}
    sets['gaussian'] = manifest_gate_set(400, 'clean', seed=11, injection_psf='gaussian')   # injections through a Gaussian, the sky a Moffat
    return {k: _manifest_halves(v) for k, v in sets.items()}


def _gate(manifest_toys, evaluate_on, finder, fit_on=None, **kw):
    fit, _ = manifest_toys[fit_on or evaluate_on]
    _, ev = manifest_toys[evaluate_on]
    fn = toy_score_fn(finder, fit['images'], fit['labels'], **kw)
    # 8 unresolved lenses (theta_E/psfsize_r < 0.5) in the half: enough to tell 0 found from all found
    return run_gates(ev['images'], ev['labels'], GateConfig(min_flux_excess=8), ev['theta_e'], ev['psf_fwhm'], None, ev['sigma'],
                     ev['controls'], fn, ev['meta'], population=f'{evaluate_on}/{finder}', psf_swap=ev['psf_variants'])


def test_manifest_set_is_the_manifests_distribution(manifest_toys):
    _, ev = manifest_toys['clean']
    m = ev['meta']
    from dhs.manifest import GRIDS
    assert set(m.theta_e_arcsec) <= set(GRIDS['v4_sota']['theta_e_arcsec']) and set(m.src_dmag) <= set(GRIDS['v4_sota']['src_dmag'])
    lens = m.is_control == 0
    assert ((m.theta_over_psf < 0.5) & lens).sum() >= 8 and ((m.theta_over_psf >= 1) & lens).sum() >= 50


def test_arc_toy_passes_every_gate(manifest_toys):
    rep = _gate(manifest_toys, 'clean', 'arc', r_min_pix=ARC_R_MIN_PIX)
    assert rep.passed is True and rep.not_run == [], rep.to_frame()
    assert rep['core_only_auc'].detail['rule'] == 'images'                  # the core around the predicted images and light
    fe = rep['flux_excess_ratio'].detail
    assert fe['k_resolved'] / fe['n_resolved'] > 0.8 and fe['k_unresolved'] / fe['n_unresolved'] < 0.3


def test_core_toy_fails_the_core_gates(manifest_toys):
    rep = _gate(manifest_toys, 'core', 'core')
    assert rep.passed is False
    assert rep['core_only_auc'].passed is False and rep['core_masked_auroc_drop'].passed is False, rep.to_frame()
    assert _gate(manifest_toys, 'core', 'arc', r_min_pix=ARC_R_MIN_PIX)['core_masked_auroc_drop'].passed is True   # the arc toy does not use it


def test_unresolved_flux_toy_fails_flux_excess(manifest_toys):
    rep = _gate(manifest_toys, 'clean', 'colour')      # blue flux in the central aperture: finds a lens whether or not it is resolved
    assert rep['flux_excess_ratio'].passed is False and rep['flux_excess_ratio'].value > 1.0, rep['flux_excess_ratio']
    assert rep['psf_swap_ks'].passed is True and rep['core_only_auc'].passed is True


def test_psf_shape_toy_fails_psf_swap(manifest_toys):
    rep = _gate(manifest_toys, 'clean', 'psf', fit_on='gaussian')   # trained on Gaussian-PSF injections, the sky's PSF a Moffat
    assert rep['psf_swap_ks'].passed is False and rep['psf_swap_ks'].value > 0.25, rep['psf_swap_ks']
    arc = _gate(manifest_toys, 'clean', 'arc', fit_on='gaussian', r_min_pix=ARC_R_MIN_PIX)
    assert arc['psf_swap_ks'].passed is True                        # the same training set, a finder that looks at arcs
