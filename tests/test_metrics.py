"TPR at fixed FPR with ties, exact intervals, measurability, val -> test thresholds, calibration, surfaces."
import numpy as np
import pandas as pd
import pytest
from scipy import stats
from dhs.metrics import (clopper_pearson, roc_table, fit_thresholds, apply_thresholds, tpr_at_fpr, bootstrap_tpr_at_fpr,
                         auroc, ece, fit_temperature, apply_temperature, sigmoid, logit, rates_at_prevalence, evaluate_split,
                         Population, headline)
from dhs.toys import synthetic_score_table
from dhs.selection import completeness_surface, apply_surface, save_surface, load_surface, stratified_tables, rate_by


def test_ties_all_negatives_tied_with_some_positives():
    # 6 negatives all at 0.4; positives: 3 tied at 0.4, then 0.6, 0.7, 0.9.
    s = np.r_[np.full(6, 0.4), [0.4, 0.4, 0.4, 0.6, 0.7, 0.9]]
    y = np.r_[np.zeros(6), np.ones(6)].astype(int)
    # by hand: at t = 0.4 (score >= t) every negative and every positive is in: FPR 6/6, TPR 6/6;
    # just above, at t = 0.6, no negative and 3 positives. The tied block can never be split.
    t = fit_thresholds(s, y, [0.5, 0.99, 1.0])
    assert t.threshold.tolist() == [0.6, 0.6, 0.4]
    assert t.n_fp_val.tolist() == [0, 0, 6]
    np.testing.assert_allclose(t.tpr_val, [0.5, 0.5, 1.0])
    # the same threshold counts ties the same way on another set: a negative at exactly 0.6 is a false positive
    m = apply_thresholds([0.6, 0.59, 0.6, 0.61], [0, 0, 1, 1], t.iloc[[0]])
    assert (m.n_fp.iloc[0], m.n_tp.iloc[0]) == (1, 2)
    # ROC counts
    r = roc_table(s, y)
    assert r.n_fp.tolist() == [0, 0, 0, 0, 6] and r.n_tp.tolist() == [0, 1, 2, 3, 6]


def test_known_answer_by_hand():
    # 10 negatives 0.0..0.9, 5 positives 0.55, 0.75, 0.85, 0.95, 0.99; target FPR 0.2 allows 2 negatives (0.8, 0.9):
    # lowest threshold with <= 2 negatives at or above it is 0.75 (a positive score above 0.7): TPR 4/5
    neg, pos = np.arange(10) / 10, np.array([0.55, 0.75, 0.85, 0.95, 0.99])
    s, y = np.r_[neg, pos], np.r_[np.zeros(10), np.ones(5)].astype(int)
    m = tpr_at_fpr(s, y, [0.2, 0.1])
    assert m.threshold.tolist() == [0.75, 0.85]
    assert m.n_fp.tolist() == [2, 1] and m.n_tp.tolist() == [4, 3]
    np.testing.assert_allclose(m.tpr, [0.8, 0.6]); np.testing.assert_allclose(m.fpr, [0.2, 0.1])


@pytest.mark.parametrize('k,n,cl', [(0, 65000, 0.95), (6, 65000, 0.95), (37, 50, 0.68), (50, 50, 0.95), (1, 3, 0.9)])
def test_intervals_equal_scipy_binomtest(k, n, cl):
    ci = stats.binomtest(k, n).proportion_ci(method='exact', confidence_level=cl)
    # scipy root-finds the same Clopper-Pearson bounds that beta.ppf gives in closed form: agree to ~1e-8
    np.testing.assert_allclose(clopper_pearson(k, n, cl), (ci.low, ci.high), rtol=1e-7, atol=1e-14)


def test_measured_intervals_are_scipys():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(3000), np.ones(500)].astype(int)
    s = rng.normal(1.5 * y, 1)
    m = tpr_at_fpr(s, y, [1e-2])
    r = m.iloc[0]
    fci = stats.binomtest(int(r.n_fp), int(r.n_neg)).proportion_ci(method='exact')
    tci = stats.binomtest(int(r.n_tp), int(r.n_pos)).proportion_ci(method='exact')
    np.testing.assert_allclose([r.fpr_lo, r.fpr_hi, r.tpr_lo, r.tpr_hi], [fci.low, fci.high, tci.low, tci.high], rtol=1e-7)


def test_unmeasurable_where_few_expected_false_positives():
    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(2000), np.ones(200)].astype(int)
    s = rng.normal(2 * y, 1)
    m = tpr_at_fpr(s, y, [1e-2, 5e-3, 4e-3, 1e-4])
    # N_neg x FPR = 20, 10, 8, 0.2: measurable only when >= 10
    assert m.measurable.tolist() == [True, True, False, False]
    assert (m.n_neg == 2000).all()
    assert 'UNMEASURABLE' in headline(m.iloc[2], 'toy') and 'UNMEASURABLE' not in headline(m.iloc[1], 'toy')
    # the validation split's size counts too: a big test set does not rescue a threshold fitted on few negatives
    val = lambda n_neg: (np.r_[rng.normal(0, 1, n_neg), rng.normal(2, 1, 100)], np.r_[np.zeros(n_neg), np.ones(100)].astype(int))
    thr = fit_thresholds(*val(1000), [1e-2])           # 1000 val negatives at 1e-2: 10 expected -> measurable
    big = np.r_[rng.normal(0, 1, 100000), rng.normal(2, 1, 100)]
    by = np.r_[np.zeros(100000), np.ones(100)].astype(int)
    assert apply_thresholds(big, by, thr).measurable.iloc[0]
    thr = fit_thresholds(*val(600), [1e-2])            # 600 val negatives: 6 expected -> unmeasurable
    assert not apply_thresholds(big, by, thr).measurable.iloc[0]


def test_threshold_fitted_on_val_applied_to_test():
    rng = np.random.default_rng(2)
    def split(n, shift):
        y = (rng.random(n) < 0.5).astype(int)
        return rng.normal(2 * y + shift * (1 - y), 1), y
    vs, vy = split(20000, 0.0)
    ts, ty = split(20000, 0.5)          # test negatives score higher: the fixed threshold must show it
    thr = fit_thresholds(vs, vy, [1e-2])
    m = apply_thresholds(ts, ty, thr)
    assert m.threshold.iloc[0] == thr.threshold.iloc[0]
    assert abs(thr.fpr_val.iloc[0] - 1e-2) < 1e-3
    assert m.fpr.iloc[0] > 2.5e-2           # measured on test, not re-fitted (a re-fit would give ~1e-2)
    assert abs(tpr_at_fpr(ts, ty, [1e-2]).fpr.iloc[0] - 1e-2) < 1e-3
    # the split protocol on a table: threshold from val rows only
    df = synthetic_score_table(6000, seed=5)
    m, thr = evaluate_split(df, Population(), [1e-2])
    val = df[df.region_split == 'val']
    assert thr.threshold.iloc[0] == fit_thresholds(val.score, 1 - val.is_control, [1e-2]).threshold.iloc[0]
    assert m.n_neg.iloc[0] == ((df.region_split == 'test') & (df.is_control == 1)).sum()


def test_bootstrap_refits_threshold():
    rng = np.random.default_rng(3)
    vy, ty = (rng.random(3000) < 0.5).astype(int), (rng.random(3000) < 0.5).astype(int)
    vs, ts = rng.normal(2 * vy, 1), rng.normal(2 * ty, 1)
    b = bootstrap_tpr_at_fpr(vs, vy, ts, ty, [1e-2], n_boot=30, seed=1)
    assert (b.fpr_boot_hi > b.fpr_boot_lo).all() and b.n_boot.iloc[0] == 30
    # with the threshold re-fitted per draw the FPR of the test draws scatters around the target
    assert b.fpr_boot_lo.iloc[0] < 1e-2 < b.fpr_boot_hi.iloc[0]


def test_auroc_and_partial():
    s, y = [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.8, 0.9], [0, 0, 0, 0, 1, 1, 1, 1]
    assert auroc(s, y) == pytest.approx(0.75)
    rng = np.random.default_rng(4)
    yy = (rng.random(5000) < 0.5).astype(int)
    ss = rng.normal(yy, 1)
    assert 0.5 < auroc(ss, yy, max_fpr=0.01) < auroc(ss, yy) < 1


def test_prevalence():
    t = pd.DataFrame(dict(tpr=[0.9], tpr_lo=[0.85], tpr_hi=[0.95], fpr=[1e-4], fpr_lo=[5e-5], fpr_hi=[2e-4]))
    r = rates_at_prevalence(t, prevalence=1e-3, n_lrg=1e6).iloc[0]
    assert r.expected_fp == pytest.approx(99.9)
    assert r.purity == pytest.approx(0.9e-3 / (0.9e-3 + 0.999e-4))


def test_temperature_scaling_improves_ece():
    rng = np.random.default_rng(5)
    def toy(n):
        z = rng.normal(0, 1.5, n)
        y = (rng.random(n) < sigmoid(z)).astype(int)
        return sigmoid(4 * z), y               # an overconfident model reporting probabilities
    pv, yv = toy(20000)
    pt, yt = toy(20000)
    T = fit_temperature(logit(pv), yv)
    assert 3.5 < T < 4.5
    before, after = ece(pt, yt), ece(apply_temperature(logit(pt), T), yt)
    assert after < 0.5 * before and after < 0.02
    assert auroc(apply_temperature(logit(pt), T), yt) == pytest.approx(auroc(pt, yt))   # ranking unchanged


def test_apply_surface_on_toy_population(tmp_path):
    # injections on a 2 x 2 grid of (theta_E, FWHM): completeness 0.2, 0.6 (small theta_E), 0.9, 1.0 (large)
    rows = []
    for te, fw, c in [(0.7, 1.0, 0.2), (0.7, 1.6, 0.6), (1.6, 1.0, 0.9), (1.6, 1.6, 1.0)]:
        rows += [dict(theta_e_arcsec=te, psfsize_r=fw, is_control=0, score=float(i < round(10 * c))) for i in range(10)]
    S = completeness_surface(pd.DataFrame(rows), 0.5, x_edges=[0.5, 1.0, 2.0], y_edges=[0.8, 1.3, 2.0], target_fpr=1e-3, population='toy grid')
    save_surface(S, tmp_path/'s.parquet')
    S = load_surface(tmp_path/'s.parquet')
    pop = pd.DataFrame(dict(theta_e_arcsec=[0.6, 0.9, 1.2, 1.9, 1.5, 2.5], psfsize_r=[0.9, 1.5, 1.1, 1.9, 1.5, 1.0]))
    c, summary = apply_surface(S, pop)
    np.testing.assert_allclose(c.completeness, [0.2, 0.6, 0.9, 1.0, 1.0, np.nan])
    assert summary['n_covered'] == 5 and summary['expected_completeness'] == pytest.approx((0.2 + 0.6 + 0.9 + 1.0 + 1.0) / 5)
    assert summary['expected_detected'] == pytest.approx(3.7) and summary['surface_population'] == 'toy grid'
    assert ((c.lo <= c.completeness) & (c.completeness <= c.hi))[:5].all()
    lin, _ = apply_surface(S, pop.iloc[[2]], method='linear')      # theta_E 1.2 (centres 0.75, 1.5), FWHM 1.1 (centres 1.05, 1.65)
    tx, ty = (1.2 - 0.75) / 0.75, (1.1 - 1.05) / 0.6
    expect = (1 - ty) * ((1 - tx) * 0.2 + tx * 0.9) + ty * ((1 - tx) * 0.6 + tx * 1.0)
    assert lin.completeness.iloc[0] == pytest.approx(expect)
    clip, _ = apply_surface(S, pop, outside='clip')
    assert clip.completeness.iloc[5] == pytest.approx(0.9)


def test_stratified_counts_add_up():
    df = synthetic_score_table(5000, seed=6)
    m, _ = evaluate_split(df, fprs=[1e-2])
    test = df[df.region_split == 'test']
    t = stratified_tables(test, m.threshold.iloc[0], 1e-2, m.population.iloc[0])
    c = t[(t.quantity == 'completeness') & (t.axis == 'source_kind')]
    assert (c.n.sum(), c.k.sum()) == (m.n_pos.iloc[0], m.n_tp.iloc[0])
    assert t.population.eq(m.population.iloc[0]).all()


def _hosts_table(n_hosts, rows_per_host, seed=0):
    "Each host: `rows_per_host` injections with one score (a hard host fails them all) and as many paired controls of its own score."
    rng = np.random.default_rng(seed)
    h = np.repeat([f'1000_7_{i}' for i in range(n_hosts)], rows_per_host)
    pos, neg = np.repeat(rng.normal(1.0, 1.0, n_hosts), rows_per_host), np.repeat(rng.normal(-1.0, 1.0, n_hosts), rows_per_host)
    return pd.DataFrame(dict(host_id=np.r_[h, h], score=np.r_[pos, neg], is_control=np.r_[np.zeros(len(h)), np.ones(len(h))].astype(int)))


def test_host_bootstrap_widens_by_sqrt_rows_per_host():
    from dhs.metrics import host_clusters
    thr = pd.DataFrame(dict(target_fpr=[0.1], threshold=[0.0]))
    width = lambda m, q, s: float((m[f'{q}{s}_hi'] - m[f'{q}{s}_lo']).iloc[0])
    for rows, expect in ((1, 1.0), (10, np.sqrt(10))):
        df = _hosts_table(600, rows)
        m = apply_thresholds(df.score, 1 - df.is_control, thr, clusters=host_clusters(df))
        assert (m.n_host_pos.iloc[0], m.n_host_neg.iloc[0]) == (600, 600)      # a positive and its paired controls: one cluster
        for q in ('tpr', 'fpr'):
            assert width(m, q, '_host') / width(m, q, '') == pytest.approx(expect, rel=0.15), (rows, q)
    again = apply_thresholds(df.score, 1 - df.is_control, thr, clusters=host_clusters(df))
    pd.testing.assert_frame_equal(m, again)                                     # seeded: the same draws
    other = apply_thresholds(df.score, 1 - df.is_control, thr, clusters=host_clusters(df), seed=1)
    assert other.tpr_host_lo.iloc[0] != m.tpr_host_lo.iloc[0]


def test_host_clusters_need_a_host_column():
    from dhs.metrics import host_clusters
    with pytest.raises(KeyError, match='no host identifier to cluster rows by: need column host_id or brickname\\+objid'):
        host_clusters(pd.DataFrame(dict(score=[0.5], is_control=[0])))
    assert host_clusters(pd.DataFrame(dict(region_id=[5, 9, 5])), by='region').tolist() == [0, 1, 0]
    m, _ = evaluate_split(synthetic_score_table(3000, seed=2).drop(columns='host_id'), fprs=[1e-2])
    assert 'tpr_host_lo' not in m and 'host_id' in m.attrs['host_clusters']     # CP only, and the table says why


def test_completeness_by_magnification_and_stretch():
    # hits depend on magnification only: 10% of the lenses below mu = 3 are found, 90% above; stretch = mu / 1.25
    rng = np.random.default_rng(4)
    mu = np.exp(rng.uniform(np.log(1.2), np.log(40), 3000))
    hit = rng.random(3000) < np.where(mu < 3, 0.1, 0.9)
    df = pd.DataFrame(dict(is_control=np.r_[np.zeros(3000, int), np.ones(10, int)], magnification=np.r_[mu, np.full(10, 5.0)],
                           tangential_stretch=np.r_[mu / 1.25, np.full(10, 4.0)], score=np.r_[hit, np.ones(10)].astype(float)))
    t = stratified_tables(df, 0.5, completeness_axes=('magnification', 'tangential_stretch'), fpr_axes=())
    m = t[t.axis == 'magnification'].set_index('bin')
    for b, lo, hi in [('[1, 2)', 1, 2), ('[2, 3)', 2, 3), ('[10, 20)', 10, 20)]:
        inside = (mu >= lo) & (mu < hi)
        assert (m.n[b], m.k[b]) == (inside.sum(), hit[inside].sum())
    assert m.rate['[1, 2)'] < 0.2 and m.rate['[3, 5)'] > 0.8 and m.rate_hi['[2, 3)'] < m.rate_lo['[3, 5)']
    assert m.n.sum() == 3000 and m.n['[50, inf)'] == 0                # controls never counted; no mu >= 40
    s = t[t.axis == 'tangential_stretch']
    assert s.n.sum() == (mu / 1.25 >= 1).sum() and s.rate.iloc[0] < 0.2 and s.rate.iloc[-2] > 0.8
    old = df.drop(columns='tangential_stretch')                       # a table from before phase 4c wrote the column
    with pytest.raises(KeyError, match="axis 'tangential_stretch' needs column 'tangential_stretch'"):
        rate_by(old, 0.5, 'tangential_stretch')
    t = stratified_tables(old, 0.5, completeness_axes=('magnification', 'tangential_stretch'), fpr_axes=())
    assert set(t.axis) == {'magnification'} and "needs column 'tangential_stretch'" in t.attrs['skipped'][0]
