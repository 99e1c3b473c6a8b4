"`dhs inspect`: the grading page on a real server, driven by a real headless Chromium (selenium); grades in SQLite, export, truth hidden until graded."
import dataclasses, http.client, json, os, socket, sqlite3, subprocess, sys, threading, urllib.error, urllib.request
from contextlib import closing
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
from dhs import inspection as I
from dhs.toys import example_search_run
from dhs.guard import InvalidInput

CHROMIUM, CHROMEDRIVER = '/usr/bin/chromium', '/usr/bin/chromedriver'   # Debian's chromium and chromium-driver
FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--window-size=1400,950']


@pytest.fixture(scope='module')
def browser(tmp_path_factory):
    "One headless Chromium for this module, with a fresh profile and no background networking."
    assert Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists(), \
        'the browser tests need Debian chromium and chromium-driver: apt-get install -y chromium chromium-driver (.ci/run does)'
    o = webdriver.ChromeOptions()
    o.binary_location = CHROMIUM
    for a in FLAGS + [f'--user-data-dir={tmp_path_factory.mktemp("chromium-profile")}']: o.add_argument(a)
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=o)
    yield d
    d.quit()


@pytest.fixture
def page(browser):
    "The browser with no grader cookie left by another test."
    browser.delete_all_cookies()
    return browser


@pytest.fixture
def example(tmp_path):
    "A small self-made run (12 synthetic candidates, mock truth) served on a free port of 127.0.0.1: (run folder, URL)."
    run = example_search_run(tmp_path/'run', n=12)
    srv, url = I.serve(run, grader='ann')
    yield run, url
    srv.shutdown()


def _key(d, keys):
    "Press `keys` once the page's script has bound its keys (a key sent before that is lost, as a user's would be)."
    WebDriverWait(d, 20).until(lambda d: d.execute_script('return document.body.dataset.ready') == '1', f'no key handler on {d.current_url}')
    ActionChains(d).send_keys(keys).perform()

def _at(d, suffix:str):
    "Wait (up to 20 s, as a browser does) until the page's URL ends with `suffix`."
    WebDriverWait(d, 20).until(lambda d: d.current_url.endswith(suffix), f'never reached {suffix}; at {d.current_url}')

def _post(url:str, **body)->tuple[int, dict]:
    "POST a JSON body; (status, JSON answer), 4xx included."
    req = urllib.request.Request(url, json.dumps(body).encode(), {'Content-Type': 'application/json'}, method='POST')
    try:
        with urllib.request.urlopen(req, timeout=30) as r: return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e: return e.code, json.loads(e.read())

def _raw_get(url:str, path:str)->int:
    "Status of a GET sent with the path exactly as given (no client-side normalisation of `..`)."
    host, port = url.split('//')[1].rstrip('/').split(':')
    with closing(http.client.HTTPConnection(host, int(port), timeout=30)) as c:
        c.putrequest('GET', path, skip_accept_encoding=True); c.endheaders()
        return c.getresponse().status

def _ids(run)->list: return I.run_sources(run)['search'].rows.index.tolist()


def test_grade_five_with_the_keyboard_then_reload(page, example):
    run, url = example
    d, ids = page, _ids(run)
    d.get(url); _at(d, '/search/1')
    for i, g in enumerate('ABCXB'):
        assert d.find_element(By.ID, 'grader').text == 'ann' and d.find_element(By.ID, 'n-graded').text == str(i)
        _key(d, g.lower()); _at(d, f'/search/{i + 2}')              # saved, then on to the next
    assert d.find_element(By.ID, 'n-graded').text == '5'
    for i, g in enumerate('ABCXB'):                                 # reloaded, each page shows its saved grade
        d.get(url + f'search/{i + 1}')
        assert d.find_element(By.CSS_SELECTOR, '#grades button.on').get_attribute('data-grade') == g
    d.get(url + 'search/'); _at(d, '/search/6')                     # resumes where the grader stopped
    _key(d, 'n'); _key(d, 'faint arc to the NE, a counter-image?'); _key(d, Keys.ESCAPE); _key(d, 'c'); _at(d, '/search/7')
    g = I.read_grades(I.grades_path(run)).set_index('task_id')
    assert g.loc[ids[:6], 'grade'].tolist() == list('ABCXBC') and set(g.grader) == {'ann'}
    assert g.loc[ids[5], 'notes'] == 'faint arc to the NE, a counter-image?'     # typed letters did not grade
    d.get(url + 'search/1')
    assert 'truth lens' in d.find_element(By.ID, 'truth').text       # mock sky: shown, since graded
    if os.environ.get('DHS_SCREENSHOT'): d.save_screenshot(os.environ['DHS_SCREENSHOT'])
    _key(d, 'x'); _at(d, '/search/2')                                # an edit: a new version, history kept
    h = I.read_grades(I.grades_path(run), history=True)
    assert h[h.task_id == ids[0]].sort_values('version').grade.tolist() == ['A', 'X']
    assert I.read_grades(I.grades_path(run)).set_index('task_id').loc[ids[0], 'grade'] == 'X'
    d.get(url + 'search/grid')
    tiles = {t.get_attribute('data-task-id'): t for t in d.find_elements(By.CSS_SELECTOR, '.tile')}
    assert len(tiles) == 12 and tiles[ids[1]].find_element(By.CSS_SELECTOR, '.badge').text == 'B'


def test_two_graders_at_once_keep_every_grade(example):
    "Three graders on two servers over the same run, all at once, each editing every grade three times."
    run, url = example
    srv2, url2 = I.serve(run, grader='bob')
    ids, errors = _ids(run), []
    def grade_all(base, who, grades):
        for n in range(3):
            for t, g in zip(ids, grades):
                status, ans = _post(base + 'search/grade', task_id=t, grade=g, grader=who, notes=f'{who} pass {n}')
                if status != 200: errors.append((who, status, ans))
    plan = [(url, 'ann', 'ABCX' * 3), (url2, 'bob', 'XCBA' * 3), (url, 'cy', 'AXAX' * 3)]
    threads = [threading.Thread(target=grade_all, args=p) for p in plan]
    for t in threads: t.start()
    for t in threads: t.join()
    srv2.shutdown()
    assert not errors, errors[:3]
    g, h = I.read_grades(I.grades_path(run)), I.read_grades(I.grades_path(run), history=True)
    assert len(g) == 36 and len(h) == 108
    for _, who, grades in plan:
        mine = g[g.grader == who].set_index('task_id')
        assert mine.loc[ids, 'grade'].tolist() == list(grades) and (mine.version == 3).all() and (mine.notes == f'{who} pass 2').all()
        assert sorted(h[h.grader == who].version) == sorted([1, 2, 3] * 12)
    with closing(sqlite3.connect(I.grades_path(run))) as con:
        assert con.execute('PRAGMA integrity_check').fetchone()[0] == 'ok' and con.execute('PRAGMA journal_mode').fetchone()[0] == 'wal'


def test_bad_requests_get_a_4xx_and_write_nothing(example, tmp_path):
    run, url = example
    tid = _ids(run)[0]
    outside = lambda: sorted(str(p) for p in tmp_path.rglob('*') if (run/'inspect') not in p.parents)
    before = outside()
    status, ans = _post(url + 'search/grade', task_id=tid, grade='Q')
    assert status == 400 and 'expected one of A, B, C, X' in ans['error']
    assert _post(url + 'search/grade', task_id='search-nobody', grade='A')[0] == 404
    assert _post(url + 'search/grade', task_id=tid, grade='A', grader='../../etc')[0] == 400
    assert _post(url + 'elsewhere/grade', task_id=tid, grade='A')[0] == 404
    form = urllib.request.Request(url + 'search/grade', f'task_id={tid}&grade=A'.encode(), method='POST')   # a form another site could post
    with pytest.raises(urllib.error.HTTPError) as e: urllib.request.urlopen(form, timeout=30)
    assert e.value.code == 400 and 'send the grade as JSON' in json.loads(e.value.read())['error']
    for path in ('/static/../../../setup.py', '/static/..%2f..%2f..%2fsetup.py', '/static/%2e%2e/%2e%2e/dhs/inspect.py',
                 '/search/img/..%2f..%2fcandidates.parquet/asinh.png', '/search/img/../../search/candidates.parquet',
                 '/../../../../etc/passwd', f'/search/img/{tid}/log.png', '/search/99', '/search/0', '/search/grid?page=7',
                 '/search/1?grader=..%2F..%2Fx'):
        status = _raw_get(url, path)
        assert 400 <= status < 500, (path, status)
    assert outside() == before and len(I.read_grades(I.grades_path(run))) == 0
    assert _post(url + 'search/grade', task_id=tid, grade='A')[0] == 200      # still serving


def test_truth_hidden_until_that_grader_grades(page, example):
    run, url = example
    d, c = page, I.run_sources(run)['search']
    pos = int(c.rows.pos[c.truth.truth_class == 'spiral'].iloc[0])
    tid = c.rows.index[pos - 1]
    d.get(url + f'search/{pos}?grader=dee')
    assert 'spiral' not in d.page_source and d.find_element(By.ID, 'truth').text == 'truth hidden until you grade'
    d.get(url + 'search/grid'); assert 'spiral' not in d.page_source
    d.get(url + f'search/{pos}'); _key(d, 'x'); _at(d, f'/search/{pos + 1}')
    assert 'truth spiral (agrees)' in d.find_element(By.ID, 'status').text       # what the last one was
    _key(d, Keys.ARROW_LEFT); _at(d, f'/search/{pos}')
    assert d.find_element(By.ID, 'truth').text == 'truth spiral · your X agrees'
    d.get(url + 'search/grid')
    assert d.find_element(By.CSS_SELECTOR, f'.tile[data-task-id="{tid}"] .truthcap').text == 'spiral'
    assert 'vs truth 1/1' in d.find_element(By.TAG_NAME, 'header').text
    d.get(url + f'search/{pos}?grader=eve')                       # another grader has not graded it: still hidden
    assert d.find_element(By.ID, 'grader').text == 'eve' and 'spiral' not in d.page_source


def _dhs(*args, **kw):
    return subprocess.run([str(Path(sys.executable).parent/'dhs'), *args], capture_output=True, text=True, timeout=300, **kw)


def test_export_gives_the_expected_rows(example, tmp_path, capsys):
    from sklearn.metrics import cohen_kappa_score
    from statsmodels.stats.inter_rater import aggregate_raters, fleiss_kappa
    run, url = example
    ids = _ids(run)
    ann, bob = dict(zip(ids[:6], 'AABXXC')), dict(zip(ids[2:8], 'BXXCAA'))
    for who, grades in (('ann', ann), ('bob', bob)):
        for t, g in grades.items(): assert _post(url + 'search/grade', task_id=t, grade=g, grader=who)[0] == 200
    out = _dhs('inspect', str(run), '--export', str(tmp_path/'grades.csv'))
    assert out.returncode == 0, out.stderr
    t = pd.read_csv(tmp_path/'grades.csv').set_index('task_id')
    assert sorted(t.index) == sorted(ids[:8]) and (t.source == 'search').all()
    for k in ids[:8]:
        want = [x for x in (ann.get(k), bob.get(k)) if x]
        assert t.loc[k, 'n_grades'] == len(want) and np.isclose(t.loc[k, 'mean_grade'], np.mean([I.GRADES[x] for x in want]))
        assert [x for x in (t.loc[k, 'grade_ann'], t.loc[k, 'grade_bob']) if isinstance(x, str)] == want
    cand = pd.read_parquet(run/'search'/'candidates.parquet').set_index('task_id')
    assert (t['rank'] == cand.loc[t.index, 'rank']).all() and set(t.truth_class) <= {'lens', 'spiral', 'ring', 'merger'}
    s = json.loads((tmp_path/'grades_summary.json').read_text())
    both = ids[2:6]
    assert s['n_all_graded'] == 4 and s['grade_values'] == {'A': 3, 'B': 2, 'C': 1, 'X': 0}
    assert np.isclose(s['cohen_kappa']['ann|bob'], cohen_kappa_score([ann[k] for k in both], [bob[k] for k in both], labels=list('ABCX')))
    codes = np.array([[I.GRADES[ann[k]], I.GRADES[bob[k]]] for k in both])
    assert np.isclose(s['fleiss_kappa'], fleiss_kappa(aggregate_raters(codes, n_cat=4)[0]))
    assert I.main([str(run), '--export', str(tmp_path/'grades.parquet')]) == 0
    assert pd.read_parquet(tmp_path/'grades.parquet').set_index('task_id').sort_index().mean_grade.equals(t.sort_index().mean_grade)
    # X from everyone who graded it, train/val only: the next hard-negative round's extra controls
    assert _dhs('inspect', str(run), '--export-negatives', str(tmp_path/'hn.parquet')).returncode == 0
    hn = pd.read_parquet(tmp_path/'hn.parquet')
    split = cand.region_split
    want = [k for k in ids[:8] if {ann.get(k), bob.get(k)} - {None} == {'X'} and split[k] in ('train', 'val')]
    assert sorted(hn.task_id) == sorted(want) and set(hn.region_split) <= {'train', 'val'}
    with pytest.raises(InvalidInput, match='export to a .csv or .parquet file'):   # one line for the user (exit 2 from `dhs inspect`)
        I.main([str(run), '--export', str(tmp_path/'grades.xlsx')])


def _free_port()->int:
    with closing(socket.socket()) as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def _answers(url:str)->bool:
    try:
        with urllib.request.urlopen(url, timeout=5): return True
    except OSError: return False


@pytest.mark.slow
def test_dhs_inspect_on_the_tiny_run(tiny_run, page, tmp_path, spark):
    "What the pipeline writes, served by the command a user types; X grades go through phase 4a as hard negatives."
    proc, run = tiny_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    cand = pd.read_parquet(run/'search'/'candidates.parquet')
    port, d = _free_port(), page
    server = subprocess.Popen([str(Path(sys.executable).parent/'dhs'), 'inspect', str(run), '--port', str(port), '--grader', 'tess'],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f'http://127.0.0.1:{port}/'
    try:
        WebDriverWait(d, 120).until(lambda _: server.poll() is None and _answers(url), 'dhs inspect did not start')
        d.get(url); _at(d, '/search/1')
        assert d.find_element(By.ID, 'n-total').text == str(int((cand.cutout_ok == 1).sum()))
        loaded = d.execute_script("return [...document.images].map(i => i.complete ? i.naturalWidth : -1)")
        assert loaded == [64, 64, 3 * 64 + 2 * 2]                     # asinh, residual, g|r|z strip
        text = d.find_element(By.TAG_NAME, 'aside').text
        assert 'psfsize g/r/z' in text and '5σ depth g/r/z' in text and f'{cand.ra.iloc[0]:.5f}' in text
        assert 'Legacy Surveys' not in d.page_source                   # a mock sky: no sky-viewer link
        for i, g in enumerate('XXBX'): _key(d, g.lower()); _at(d, f'/search/{i + 2}')
        lens = cand.dropna(subset=['known_lens_name']).iloc[0]
        d.get(url + f'search/{int(lens["rank"])}')
        assert lens.known_lens_name in d.find_element(By.CSS_SELECTOR, '.lenscat').text
        for src in ('known', 'hardneg'):
            d.get(url + f'{src}/1'); assert d.find_elements(By.CSS_SELECTOR, '#grades button') and 'not a lens' in d.page_source
    finally:
        server.terminate(); server.wait(timeout=30)
    g = I.read_grades(I.grades_path(run))
    assert sorted(g.task_id) == sorted(cand.task_id.iloc[:4]) and list(g.sort_values('graded_utc').grade) == list('XXBX')
    hn = I.graded_negatives(run)
    x = cand.set_index('task_id').loc[[t for t, gr in zip(cand.task_id.iloc[:4], 'XXBX') if gr == 'X']]
    assert sorted(hn.host_id) == sorted(x[x.region_split.isin(['train', 'val']) & x.known_lens_name.isna()].host_id)
    if not len(hn): return
    # the table phase 4a takes: the run's manifest plus these hosts as hard-negative controls, splits unchanged
    from dhs.core import config_from_dict
    from dhs.manifest import ManifestConfig, DrawConfig, run_manifest
    hn.to_parquet(tmp_path/'graded.parquet', index=False)
    m0 = json.loads((run/'manifest'/'manifest_summary.json').read_text())['config']
    mcfg = config_from_dict(ManifestConfig, {k: v for k, v in m0.items() if k not in ('draw', 'split_fractions')})
    mcfg.draw, mcfg.split_fractions = config_from_dict(DrawConfig, m0['draw']), tuple(m0['split_fractions'])
    run_manifest(dataclasses.replace(mcfg, out_uri=str(tmp_path/'m1'), splits_uri=str(run/'manifest'/'splits.parquet'),
                                     extra_negatives_uri=str(tmp_path/'graded.parquet')), spark)
    t1 = pd.read_parquet(tmp_path/'m1'/'tasks')
    added = t1[t1.control_kind == 'hard_negative'].set_index('host_id')
    assert sorted(added.index) == sorted(hn.host_id) and (added.is_control == 1).all()
    assert (added.region_split == hn.set_index('host_id').region_split.loc[added.index]).all()
