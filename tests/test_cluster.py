"""A real Spark standalone cluster (one master, one worker, on 127.0.0.1, from pyspark's own classes): phases 3, 4a and 4c
through `spark-submit --master spark://...` with the package shipped as the --py-files zip, on a driver and executors whose
Python has no `dhs`; the master's own JSON status page must list the applications, and the outputs must equal local mode's."""
import json, os, re, shutil, signal, subprocess, sys, sysconfig, time, urllib.request
from pathlib import Path
from types import SimpleNamespace
import pandas as pd
import pytest
import pyspark
import dhs.submit
from dhs.cli import main as dhs_main
from dhs.submit import build_zip

SPARK_HOME = Path(pyspark.__file__).parent
START_TIMEOUT_S = 180    # a master and a worker JVM on a busy 2-core machine
SUBMIT_TIMEOUT_S = 600   # one phase through spark-submit
CLEAN_ENV = ('PYTHONPATH', 'SPARK_CONF_DIR', 'MASTER', 'PYSPARK_SUBMIT_ARGS', 'PYSPARK_GATEWAY_PORT', 'PYSPARK_GATEWAY_SECRET')


def _wait_for(what:str, probe, log:Path, procs:list, timeout_s:float=START_TIMEOUT_S):
    "Poll `probe()` until it returns something truthy; fail naming `what` with the tail of `log` after `timeout_s` or when a process exits."
    t_end = time.monotonic() + timeout_s
    while time.monotonic() < t_end and all(p.poll() is None for p in procs):
        try:
            if got := probe(): return got
        except OSError: pass   # the web UI is not up yet
        time.sleep(0.5)
    pytest.fail(f'{what}: not seen within {timeout_s} s (or a JVM exited); end of {log}:\n' + log.read_text()[-3000:])


def _log_match(log:Path, pattern:str):
    m = re.search(pattern, log.read_text()) if log.exists() else None
    return m and m.group(1)


def _status(ui_port:int)->dict:
    "The JSON status page of a master or worker web UI."
    with urllib.request.urlopen(f'http://127.0.0.1:{ui_port}/json/', timeout=10) as r: return json.loads(r.read())


@pytest.fixture(scope='module')
def cluster(tmp_path_factory):
    "A standalone master and a 2-core worker on 127.0.0.1; the OS picks free ports (port 0), read back from their logs."
    d = tmp_path_factory.mktemp('cluster')
    (d/'conf').mkdir()   # an empty SPARK_CONF_DIR: no spark-defaults.conf of this machine leaks in
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
    env.update(SPARK_HOME=str(SPARK_HOME), SPARK_LOCAL_IP='127.0.0.1', SPARK_CONF_DIR=str(d/'conf'))
    procs = []
    def start(name, *args):
        log = d/f'{name}.log'
        with open(log, 'w') as f:   # its own process group, so that teardown also stops the executors it starts
            procs.append(subprocess.Popen([str(SPARK_HOME/'bin'/'spark-class'), *args], stdout=f, stderr=subprocess.STDOUT,
                                          env=env, cwd=d, start_new_session=True))
        return log
    try:
        mlog = start('master', 'org.apache.spark.deploy.master.Master', '--host', '127.0.0.1', '--port', '0', '--webui-port', '0')
        url = _wait_for('master URL', lambda: _log_match(mlog, r'Starting Spark master at (spark://\S+)'), mlog, procs)
        mui = int(_wait_for('master web UI', lambda: _log_match(mlog, r'MasterWebUI.*started at http://\S+:(\d+)'), mlog, procs))
        wlog = start('worker', 'org.apache.spark.deploy.worker.Worker', url, '--host', '127.0.0.1', '--cores', '2', '--memory', '2g',
                     '--webui-port', '0', '--work-dir', str(d/'work'))
        wui = int(_wait_for('worker web UI', lambda: _log_match(wlog, r'WorkerWebUI.*started at http://\S+:(\d+)'), wlog, procs))
        _wait_for('an ALIVE worker on the master', lambda: [w for w in _status(mui)['workers'] if w['state'] == 'ALIVE'], wlog, procs)
        yield SimpleNamespace(url=url, status=lambda: _status(mui), worker_status=lambda: _status(wui), dir=d)
    finally:
        for p in procs:
            try: os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError: continue
            try: p.wait(timeout=30)
            except subprocess.TimeoutExpired: os.killpg(p.pid, signal.SIGKILL); p.wait(timeout=30)


@pytest.fixture(scope='module')
def bare_python(tmp_path_factory):
    """A Python for the driver and executors that has every third-party package of this environment but not `dhs`: a venv
    whose one .pth line puts a folder of links to this site-packages' entries (less dhs and its editable finder) on sys.path.
    A plain path in a .pth is not itself scanned for .pth files, so the editable install's hook never runs."""
    d = tmp_path_factory.mktemp('bare-python')
    subprocess.run([sys._base_executable, '-m', 'venv', '--without-pip', str(d/'venv')], check=True, timeout=120)
    deps = d/'deps'; deps.mkdir()
    for p in Path(sysconfig.get_paths()['purelib']).iterdir():
        if not re.match(r'(dhs\b|dhs-|__editable__)', p.name): (deps/p.name).symlink_to(p)
    py = d/'venv'/'bin'/'python'
    purelib = subprocess.run([str(py), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, 'deps.pth').write_text(f'{deps}\n')
    probe = lambda code: subprocess.run([str(py), '-c', code], capture_output=True, text=True, cwd=d, timeout=120)
    assert probe('import numpy, pandas, pyarrow, fitsio, astropy, scipy, pyspark').returncode == 0
    no_dhs = probe('import dhs')
    assert no_dhs.returncode != 0 and "No module named 'dhs'" in no_dhs.stderr, no_dhs   # the zip is all the executors have
    return py


@pytest.fixture(scope='module')
def small_sky(tmp_path_factory):
    "A 4-brick mock sky (about a dozen LRG hosts, 4 sweep files), also its own coadd cache."
    from dhs.mocksky import generate_mock_sky, mock_sky_config
    out = tmp_path_factory.mktemp('cluster-sky')/'sky'
    generate_mock_sky(mock_sky_config('tiny', n_bricks=4, n_lenses=1, out=str(out)), log=lambda *a: None)
    return out


PHASES = {'parent': 'parent/parent_summary.json', 'manifest': 'manifest/manifest_summary.json', 'inject': 'stamps/inject_summary.json'}

def _phases(sky:Path, out:Path)->list:
    "The dhs command lines of phases 3, 4a and 4c, writing under `out`."
    return [['parent', '--sky', str(sky), '--out', str(out/'parent')],
            ['manifest', '--parent', str(out/'parent'/'hosts'), '--out', str(out/'manifest')],
            ['inject', '--manifest', str(out/'manifest'), '--cache', str(sky), '--out', str(out/'stamps'), '--tasks-per-file', '10']]


def _spark_submit(cluster, python:Path, zip_path:Path, entry:Path, argv:list, cwd:Path):
    "One phase through spark-submit on the cluster; fails with the driver's and the executors' logs."
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
    env.update(SPARK_HOME=str(SPARK_HOME), SPARK_LOCAL_IP='127.0.0.1', SPARK_CONF_DIR=str(cluster.dir/'conf'),
               PYSPARK_PYTHON=str(python), PYSPARK_DRIVER_PYTHON=str(python))
    cmd = [str(SPARK_HOME/'bin'/'spark-submit'), '--master', cluster.url, '--py-files', str(zip_path),
           '--conf', 'spark.ui.enabled=false', '--conf', 'spark.sql.shuffle.partitions=3', str(entry), *argv]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=SUBMIT_TIMEOUT_S, env=env, cwd=cwd)
    if out.returncode != 0:
        executor_logs = ''.join(p.read_text()[-1500:] for p in sorted((cluster.dir/'work').glob('*/*/stderr')))
        pytest.fail(f'spark-submit {argv[0]} exited {out.returncode}:\n{out.stderr[-3000:]}\nexecutors:\n{executor_logs[-3000:]}')


def _table(path:Path, key:str)->pd.DataFrame:
    return pd.read_parquet(path).sort_values(key, ignore_index=True)


def test_phases_on_a_standalone_cluster_register_there_and_match_local_mode(cluster, bare_python, small_sky, spark, tmp_path):
    zip_path = build_zip(tmp_path/'dist'/'dhs.zip')
    entry = Path(shutil.copy(dhs.submit.__file__, tmp_path/'submit.py'))   # the entry script alone, as uploaded to EMR
    on_cluster, local, apps = tmp_path/'cluster', tmp_path/'local', set()
    for argv in _phases(small_sky, on_cluster):
        _spark_submit(cluster, bare_python, zip_path, entry, argv, tmp_path)
        where = json.loads((on_cluster/PHASES[argv[0]]).read_text())['spark']
        assert where['master'] == cluster.url and where['n_executors'] >= 1, (argv[0], where)
        master, worker = cluster.status(), cluster.worker_status()
        seen = {a['id'] for a in master['completedapps'] + master['activeapps']}
        assert where['app_id'] in seen, (argv[0], where['app_id'], sorted(seen))   # the master's own page lists the application
        ran = {e['appid'] for e in worker['finishedexecutors'] + worker['executors']}
        assert where['app_id'] in ran, (argv[0], where['app_id'], sorted(ran))     # ... and the worker ran an executor for it
        apps.add(where['app_id'])
    assert len(apps) == 3
    parent_paths = json.loads((on_cluster/PHASES['parent']).read_text())['executor_dhs_paths']
    assert parent_paths and all('dhs.zip' in p for p in parent_paths), parent_paths   # executors imported the shipped zip

    for argv in _phases(small_sky, local): assert dhs_main(argv) == 0   # local mode: the session of the `spark` fixture
    assert json.loads((local/PHASES['parent']).read_text())['spark']['master'].startswith('local')
    for sub, key in (('parent/hosts', 'host_id'), ('manifest/tasks', 'task_id'), ('stamps/stamps', 'task_id')):
        there, here = _table(on_cluster/sub, key), _table(local/sub, key)
        assert len(there) > 0
        pd.testing.assert_frame_equal(there, here, obj=sub)
