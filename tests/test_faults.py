"""Faults and bad input (issue #18), each reproduced against the real components: Spark in local mode, FITS
files made by dhs and then damaged, an S3 server (moto) and an HTTP server on 127.0.0.1, `dhs` run as a
command in its own process where the process boundary matters (locks, signals, the umask)."""
import functools, http.server, json, os, shutil, signal, subprocess, sys, threading, time
from dataclasses import replace
from pathlib import Path

import fitsio
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dhs import cli, inject, parent
from dhs.cache import CacheConfig, cache_bricks
from dhs.core import runs_dir
from dhs.toys import synthetic_stamp_table, write_tiny_sky
from dhs.guard import HOLDER_FILE, OUTPUT_RECORD, OutputMismatchError, UserError, claim_output, fingerprint
from dhs.models import LensFinder
from dhs.score import score_table
from dhs.stamps import decode_stamps, encode_stamps
from dhs.survey import brick_coadd_relpaths, coadd_relpath, sweep_relpath, to_sweep_array, write_sweep
from dhs.train import cpu_demo_config, save_checkpoint

DHS = str(Path(sys.executable).parent/'dhs')
FAKE_KEY, FAKE_SECRET = 'AKIAFAKEKEY0123456789', 'fake/Secret+Value/0123456789abcdef'


def run_dhs(*args, timeout=180, env=None, umask=None):
    "`dhs ARGS` in its own process."
    return subprocess.run([DHS, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env,
                          preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


def dhs_main(*args) -> int:
    "`dhs ARGS` in this process (the session's Spark, when a command needs one)."
    return cli.main([str(a) for a in args])


def dhs_lines(stderr: str) -> list:
    "The lines dhs itself printed (Spark and Java print their own)."
    return [l for l in stderr.splitlines() if l.startswith('dhs ')]


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    "Three tiny bricks (192x192, DR10 layout) and their 18 tasks: a coadd root, usable as the cache, and a manifest."
    d = tmp_path_factory.mktemp('faults')
    tasks = write_tiny_sky(d/'cache', n_bricks=3, pixels=192, hosts_per_brick=3, psf_hole=False)
    (d/'manifest'/'tasks').mkdir(parents=True)
    tasks.to_parquet(d/'manifest'/'tasks'/'part-0.parquet')
    return d, tasks


def inject_cfg(d, out, **kw):
    return inject.InjectConfig(manifest_uri=str(d/'manifest'), cache_uri=str(d/'cache'), out_uri=str(out), tasks_per_file=6, **kw)


# ------------------------------------------------------------------ 1. resume mixes runs

def test_resume_with_other_settings_or_another_manifest_is_refused(spark, tiny, tmp_path):
    d, tasks = tiny
    cfg = inject_cfg(d, tmp_path/'out')
    s = inject.run_inject(cfg, spark)
    parts = sorted((tmp_path/'out'/'stamps').glob('part-*.parquet'))
    before = {p: p.stat().st_mtime_ns for p in parts}
    with pytest.raises(OutputMismatchError, match=r'psf_model: "survey" -> "moffat".*--force'):
        inject.run_inject(replace(cfg, psf_model='moffat'), spark)
    tasks.iloc[:8].to_parquet(tmp_path/'other.parquet')
    with pytest.raises(OutputMismatchError, match=r'input manifest: 1 file\(s\)'):
        inject.run_inject(replace(cfg, manifest_uri=str(tmp_path/'other.parquet')), spark)
    assert {p: p.stat().st_mtime_ns for p in parts} == before                   # nothing written into the first run's table
    s2 = inject.run_inject(replace(cfg, psf_model='moffat'), spark, force=True)  # --force: the old table discarded
    t = pq.read_table(tmp_path/'out'/'stamps', columns=['task_id', 'psf_model']).to_pandas()
    assert s2['groups_skipped'] == 0 and set(t['psf_model']) == {'moffat'} and len(t) == len(tasks) and t['task_id'].is_unique
    rec = json.loads((tmp_path/'out'/OUTPUT_RECORD).read_text())
    assert rec['status'] == 'complete' and rec['settings']['psf_model'] == 'moffat'
    assert rec['inputs']['manifest'] == fingerprint(d/'manifest'/'tasks')


def test_a_second_writer_is_refused_at_once_naming_the_first(tiny, tmp_path):
    "Another process (this one) holds the output folder; `dhs inject` on it is refused at once, before any Spark, naming the holder."
    d, tasks = tiny
    out = tmp_path/'out'
    cfg = inject_cfg(d, out)
    with claim_output(out, 'inject', cfg, {'manifest': fingerprint(d/'manifest'/'tasks')}, ignore=inject.INJECT_IGNORE):
        second = run_dhs('inject', '--manifest', d/'manifest', '--cache', d/'cache', '--out', out, '--tasks-per-file', '6')
    assert second.returncode == 1 and 'Traceback' not in second.stderr
    (line,) = dhs_lines(second.stderr)
    assert 'busy' in line and f'pid {os.getpid()}' in line and 'dhs inject' in line
    assert 'log4j' not in second.stderr and not (out/'stamps').exists()        # refused before Spark started or anything was written


# ------------------------------------------------------------------ 2. secrets

@pytest.fixture(scope='module')
def s3(tiny):
    "A moto S3 server on 127.0.0.1 holding the tiny bricks under s3://sky/dr10, and an empty bucket `cache`."
    import boto3
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f'http://{host}:{port}'
    client = boto3.client('s3', endpoint_url=endpoint, aws_access_key_id='x', aws_secret_access_key='y', region_name='us-east-1')
    for bucket in ('sky', 'cache'): client.create_bucket(Bucket=bucket)
    d, _ = tiny
    for p in (d/'cache').rglob('*.fits.fz'): client.upload_file(str(p), 'sky', 'dr10/' + p.relative_to(d/'cache').as_posix())
    yield endpoint, client
    server.stop()


def test_storage_secrets_never_reach_a_file_a_log_or_an_error(s3, tiny, tmp_path, capsys, caplog):
    endpoint, client = s3
    d, tasks = tiny
    bricks = sorted(tasks['brickname'].unique())
    opts = json.dumps({'key': FAKE_KEY, 'secret': FAKE_SECRET, 'client_kwargs': {'endpoint_url': endpoint, 'region_name': 'us-east-1'}})
    caplog.set_level('DEBUG')
    rcs = [dhs_main('cache', '--bricks', *bricks, '0200m050', '--base-uri', 's3://sky/dr10', '--cache', tmp_path/'c1', '--storage-options', opts),
           dhs_main('cache', '--bricks', *bricks[:2], '--base-uri', d/'cache', '--cache', 's3://cache/c2', '--cache-storage-options', opts),
           dhs_main('cache', '--bricks', bricks[0], '--base-uri', 's3://no-such-bucket/dr10', '--cache', tmp_path/'c3',
                    '--storage-options', opts, '--retries', '0'),
           dhs_main('cache', '--bricks', bricks[0], '--base-uri', 's3://sky/dr10', '--cache', tmp_path/'c4', '--storage-options', opts[:-1])]
    cap = capsys.readouterr()
    assert rcs == [0, 0, 0, 2] and 'not a JSON object' in cap.err
    rec = json.loads((tmp_path/'c1'/'cache_report.json').read_text())
    so = rec['config']['storage_options']
    assert rec['summary']['copied'] == 30 and so['key'] == so['secret'] == '<redacted>' and so['client_kwargs']['endpoint_url'] == endpoint
    written = [p.read_bytes() for p in tmp_path.rglob('*') if p.is_file()]
    written += [client.get_object(Bucket='cache', Key=o['Key'])['Body'].read() for o in client.list_objects_v2(Bucket='cache')['Contents']]
    printed = (cap.out + cap.err + '\n'.join(r.getMessage() for r in caplog.records)).encode()
    assert len(written) > 60 and len(caplog.records) > 5
    for blob in written + [printed]:
        assert FAKE_KEY.encode() not in blob and FAKE_SECRET.encode() not in blob


# ------------------------------------------------------------------ 3. a corrupt coadd

def garbage_coadd(path: Path):
    "The file with its header intact and its compressed data bytes replaced by garbage."
    raw = bytearray(path.read_bytes())
    with fitsio.FITS(str(path)) as f: o = f[1].get_offsets()
    raw[o['data_start']:o['data_end']] = np.random.default_rng(0).integers(0, 256, o['data_end'] - o['data_start'], dtype=np.uint8).tobytes()
    path.write_bytes(bytes(raw))


def hanging_coadd(path: Path, seed: int = 30):
    "The file rewritten with GZIP tiles (valid header, same pixels' shape), a few hundred bytes of one tile garbage: cfitsio never returns."
    from astropy.io import fits
    hdr = fitsio.read_header(str(path), 1); hdr.clean()
    with fitsio.FITS(str(path)) as f: shape = f[1].get_dims()
    path.unlink()
    with fitsio.FITS(str(path), 'rw', clobber=True) as f:
        f.write(np.random.default_rng(0).normal(size=shape).astype('f4'), header=hdr, compress='GZIP_1', tile_dims=(64, 64), qlevel=None)
    with fits.open(path, disable_image_compression=True) as h: table_bytes = h[1].header['NAXIS1'] * h[1].header['NAXIS2']
    with fitsio.FITS(str(path)) as f: o = f[1].get_offsets()
    raw, r = bytearray(path.read_bytes()), np.random.default_rng(seed)
    a = int(r.integers(o['data_start'] + table_bytes, o['data_end'] - 10)); n = min(int(r.integers(1, 5000)), o['data_end'] - a)
    raw[a:a + n] = r.integers(0, 256, n, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(raw))


@pytest.fixture
def corrupt_sky(tiny, tmp_path):
    "A copy of the tiny bricks with one coadd of brick 0 garbage and one of brick 1 hanging the decoder."
    d, tasks = tiny
    sky = tmp_path/'sky'
    shutil.copytree(d/'cache', sky)
    b = sorted(tasks['brickname'].unique())
    bad, hang = coadd_relpath(b[0], 'image', 'r'), coadd_relpath(b[1], 'invvar', 'z')
    garbage_coadd(sky/bad); hanging_coadd(sky/hang)
    return sky, b, bad, hang


def test_the_corrupt_coadds_defeat_the_decoder(corrupt_sky):
    "The faults themselves: decoded in this process, one file raises and the other never returns."
    sky, _, bad, hang = corrupt_sky
    code = 'import fitsio, sys; print("imported", flush=True); fitsio.read(sys.argv[1], ext=1)'
    assert subprocess.run([sys.executable, '-c', code, str(sky/bad)], capture_output=True, timeout=60).returncode == 1
    p = subprocess.Popen([sys.executable, '-c', code, str(sky/hang)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == 'imported\n'
        with pytest.raises(subprocess.TimeoutExpired): p.wait(timeout=3)   # a decode of a 192x192 image takes milliseconds
    finally: p.kill(); p.wait()


def test_a_corrupt_coadd_is_marked_bad_by_the_cache_and_skipped_by_inject(spark, tiny, corrupt_sky, tmp_path, capsys):
    d, tasks = tiny
    sky, bricks, bad, hang = corrupt_sky
    cache = tmp_path/'cache'
    rep = cache_bricks(bricks, CacheConfig(base_uri=str(sky), cache_uri=str(cache), n_threads=2, decode_timeout_s=3,
                                           fail_fraction=0.2, backoff_s=0.01))
    f = rep.files.set_index('relpath')
    assert (f.loc[bad, 'status'], f.loc[hang, 'status']) == ('failed', 'failed') and rep.count('copied') == 28
    assert 'corrupt at the source' in f.loc[bad, 'error'] and str(sky/bad) in f.loc[bad, 'error']
    assert 'did not finish in 3 s' in f.loc[hang, 'error'] and str(sky/hang) in f.loc[hang, 'error']
    assert f.loc[bad, 'attempts'] == f.loc[hang, 'attempts'] == 2                 # its size, then one copy: a corrupt source is not retried
    assert not (cache/bad).exists() and not (cache/hang).exists() and not list(cache.rglob('.*.part'))
    # phase 4c reads the report: the bricks it marked are skipped, named with the command that fetches them again
    with inject.IsolatedDecoder(3) as dec:
        why = [inject.cached_brick_problem(str(cache), b, dec) for b in bricks]
        assert why[2] is None and dec._proc is None                                 # checked by the cache: not decoded again
    assert all(w.startswith('marked failed by dhs cache') and f'dhs cache --bricks {b}' in w for w, b in zip(why[:2], bricks))
    # files no cache run checked (the sky itself as the cache): decoded in a child process, the process stays alive
    rc = dhs_main('inject', '--manifest', d/'manifest', '--cache', sky, '--out', tmp_path/'out2', '--tasks-per-file', '6',
                  '--decode-timeout', '3')
    err = capsys.readouterr().err
    assert rc == 1 and 'Traceback' not in err
    assert f'{sky/bad}: does not decode' in err and f'{sky/hang}: the FITS decoder did not finish in 3 s' in err
    assert f'dhs cache --bricks {bricks[0]}' in err and f'dhs cache --bricks {bricks[1]}' in err
    t = pq.read_table(tmp_path/'out2'/'stamps', columns=['brickname', 'cutout_ok']).to_pandas()
    assert set(t[t.cutout_ok == 0].brickname) == set(bricks[:2]) and (t[t.brickname == bricks[2]].cutout_ok == 1).all()


# ------------------------------------------------------------------ 4, 5. bad arguments

BAD = [  # argv (OUT: a folder that must not appear), the lines dhs must print
    (['manifest', '--parent', 'P', '--out', 'OUT', '--control-frac', '5'], ['--control-frac: 5 is not a fraction in [0, 1)']),
    (['manifest', '--parent', 'P', '--out', 'OUT', '--control-frac', '1.0'], ['--control-frac: 1.0 is not a fraction in [0, 1)']),
    (['manifest', '--parent', 'P', '--out', 'OUT', '--control-frac', '-1'], ['--control-frac: -1 is not a fraction in [0, 1)']),
    (['manifest', '--parent', 'P', '--out', 'OUT', '--nside', '-3'], ['--nside: -3 is not a power of two']),
    (['manifest', '--parent', 'P', '--out', 'OUT', '--nside', '48'], ['--nside: 48 is not a power of two']),
    (['manifest', '--parent', 'P', '--out', 'OUT', '--tasks-per-host', '0'], ['--tasks-per-host: 0 is not an integer > 0']),
    (['manifest', '--parent', 'P', '--out', 'OUT', '--tasks-per-host', '-1'], ['--tasks-per-host: -1 is not an integer > 0']),
    (['manifest', '--parent', 'P', '--out', 'OUT', '--split-fractions', '0.5', '0.3', '0.3'], ['--split-fractions: [0.5, 0.3, 0.3] is not three fractions']),
    (['manifest', '--parent', 'P', '--out', 'OUT', '--nside', '-3', '--tasks-per-host', '0', '--control-frac', '5'],
     ['--nside: -3', '--tasks-per-host: 0', '--control-frac: 5']),                                       # one line per problem
    (['cache', '--bricks', '0001p000', '--base-uri', 'S', '--cache', 'OUT', '--threads', '0', '--max-fail-frac', '2'],
     ['--threads: 0 is not an integer > 0', '--max-fail-frac: 2 is not a fraction in [0, 1]']),
    (['inject', '--manifest', 'M', '--cache', 'C', '--out', 'OUT', '--tasks-per-file', '0'], ['--tasks-per-file: 0 is not an integer > 0']),
    (['parent', '--base-uri', 'S', '--out', 'OUT', '--max-fail-frac', '-0.1'], ['--max-fail-frac: -0.1 is not a fraction in [0, 1]']),
    (['train', 'S', '--out', 'OUT', '--epochs', '0'], ['--epochs: 0 is not an integer > 0']),
    (['train', 'S', '--out', 'OUT', '--set', 'patience=-2'], ['TrainConfig.patience: -2 is not an integer > 0']),
    (['score', 'S', '--checkpoint', 'CK', '--out', 'OUT', '--batch-size', '0'], ['--batch-size: 0 is not an integer > 0']),
    (['run', '--set', 'train.epochs=abc', '--dry-run', '--outputs', 'OUT'], ['--set train.epochs=abc: abc is not an integer']),
    (['run', '--set', 'manifest.control_frac=1.0', '--set', 'nside=-3', '--dry-run', '--outputs', 'OUT'],
     ['--set manifest.control_frac=1.0: 1.0 is not a fraction in [0, 1)', '--set nside=-3: -3 is not a power of two']),
]


@pytest.mark.parametrize('argv,expected', BAD, ids=[' '.join(a[:1] + a[5:] if a[0] != 'run' else a[1:3]) for a, _ in BAD])
def test_bad_arguments_are_refused_before_any_work_one_line_each(argv, expected, tmp_path, capsys):
    out = tmp_path/'out'
    rc = cli.main([str(out) if a == 'OUT' else a for a in argv])
    cap = capsys.readouterr()
    lines = [l for l in cap.err.splitlines() if l.strip()]
    assert rc == 2 and cap.out == '' and len(lines) == len(expected), cap.err
    assert all(l.startswith(f'dhs {argv[0]}') and e in l for l, e in zip(lines, expected)), cap.err
    assert not out.exists()


def test_a_fraction_of_one_no_longer_hangs_the_manifest(tmp_path):
    "In its own process (a hang would hit the timeout): refused before Spark, the output folder never made."
    p = run_dhs('manifest', '--parent', tmp_path/'p', '--out', tmp_path/'m', '--control-frac', '1.0', timeout=120)
    assert p.returncode == 2 and dhs_lines(p.stderr) == ['dhs manifest: --control-frac: 1.0 is not a fraction in [0, 1)']
    assert not (tmp_path/'m').exists()


# ------------------------------------------------------------------ 6. a sweep column of the wrong type

def test_a_sweep_column_of_the_wrong_type_is_named_and_skipped(spark, tmp_path, capsys):
    sky, rows = tmp_path/'sky', parent._example_rows()
    write_sweep(rows, sky/sweep_relpath(150, 0, 155, 5), fill_missing=True)
    arr = to_sweep_array(rows, fill_missing=True)
    bad = np.zeros(len(arr), [(n, 'S12') if n == 'FLUX_R' else (n, arr.dtype[n]) for n in arr.dtype.names])
    for n in arr.dtype.names: bad[n] = arr[n].astype('S12') if n == 'FLUX_R' else arr[n]
    badfile = sky/sweep_relpath(155, 0, 160, 5)
    fitsio.write(str(badfile), bad, extname='SWEEP')
    s = parent.run_parent(parent.ParentConfig(sky_uri=str(sky), out_uri=str(tmp_path/'p'), max_bad_fraction=0.5), spark)
    (skipped,) = s['skipped_files']
    assert s['n_files_read'] == 1 and skipped['file'] == str(badfile) and 'column FLUX_R holds text values' in skipped['error']
    records = [dict(file=str(badfile), status='error', error=skipped['error']), dict(file='good', status='ok')]
    with pytest.raises(RuntimeError) as e:          # what --on-bad-file fail says: one line, file and column
        parent._check_bad_files(records, parent.ParentConfig(sky_uri=str(sky), on_bad_file='fail'))
    (line,) = str(e.value).splitlines()
    assert str(badfile) in line and 'column FLUX_R holds text values where a DR10 sweep has float32' in line


# ------------------------------------------------------------------ 7. --set and the run notebooks' parameters

def test_set_values_are_checked_before_anything_runs(tmp_path):
    code = ('import sys; from dhs.cli import main; '
            "rc = main(['run', '--set', 'train.epochs=abc', '--dry-run', '--outputs', sys.argv[1]]); print('papermill' in sys.modules, rc)")
    p = subprocess.run([sys.executable, '-c', code, str(tmp_path/'o')], capture_output=True, text=True, timeout=120)
    assert p.stdout.split() == ['False', '2'], p.stdout + p.stderr        # no plan printed, papermill never imported
    assert p.stderr.splitlines() == ['dhs run: --set train.epochs=abc: abc is not an integer (train parameter epochs, default 0)']


def test_a_run_notebook_checks_its_parameters(tmp_path):
    import papermill as pm
    from dhs.runner import ensure_kernel
    with pytest.raises(pm.PapermillExecutionError, match=r'manifest\.control_frac: 5(\.0)? is not a fraction in \[0, 1\)'):
        pm.execute_notebook(str(runs_dir()/'03_manifest.ipynb'), str(tmp_path/'m.ipynb'), parameters=dict(run_dir=str(tmp_path), control_frac=5),
                            kernel_name=ensure_kernel(), progress_bar=False, cwd=str(tmp_path))
    assert not (tmp_path/'manifest').exists()


# ------------------------------------------------------------------ 8, 9. checkpoints, NaN stamps

@pytest.fixture(scope='module')
def small_table(tmp_path_factory):
    d = tmp_path_factory.mktemp('score')
    t = synthetic_stamp_table(24, seed=5)
    pq.write_table(t, d/'stamps.parquet')
    save_checkpoint(d/'ck.pt', LensFinder('small_cnn'), cpu_demo_config(), dict(epoch=0))
    return d, t


def test_a_text_file_given_as_checkpoint_is_named(small_table, tmp_path, capsys):
    d, _ = small_table
    (tmp_path/'notes.txt').write_text('best epoch: 3\n')
    rc = dhs_main('score', d/'stamps.parquet', '--checkpoint', tmp_path/'notes.txt', '--out', tmp_path/'s.parquet')
    err = capsys.readouterr().err
    (line,) = err.splitlines()
    assert rc == 1 and f'{tmp_path/"notes.txt"}: not a dhs checkpoint' in line and 'IndexError' not in err
    assert not (tmp_path/'s.parquet').exists()


def test_a_nan_stamp_marked_good_is_never_scored_silently(small_table, tmp_path, capsys):
    d, t = small_table
    imgs = decode_stamps(t['stamp']).copy()
    row = int(np.flatnonzero(np.asarray(t['cutout_ok']) == 1)[3])
    imgs[row, 1, 30, 30] = np.nan
    bad = t.set_column(t.schema.get_field_index('stamp'), 'stamp', encode_stamps(imgs))
    pq.write_table(bad, tmp_path/'nan.parquet')
    task = t['task_id'][row].as_py()
    with pytest.raises(UserError, match=f'1 row\\(s\\) marked good give a non-finite score.*{task}'):
        score_table(tmp_path/'nan.parquet', [d/'ck.pt'])
    rc = dhs_main('score', tmp_path/'nan.parquet', '--checkpoint', d/'ck.pt', '--out', tmp_path/'s.parquet')
    assert rc == 1 and task in capsys.readouterr().err and not (tmp_path/'s.parquet').exists()


# ------------------------------------------------------------------ 9. partial files, signals, the umask, one-line errors

class _Stalling(http.server.SimpleHTTPRequestHandler):
    "Serves the sky; while `stall` is set, a GET sends its headers and half the body, then nothing."
    stall = threading.Event()
    def log_message(self, *a): pass
    def do_GET(self):
        if not self.stall.is_set(): return super().do_GET()
        data = Path(self.translate_path(self.path)).read_bytes()
        self.send_response(200); self.send_header('Content-Length', str(len(data))); self.end_headers()
        self.wfile.write(data[:len(data) // 2]); self.wfile.flush()
        time.sleep(20)


@pytest.fixture
def stalling_server(tiny):
    d, _ = tiny
    handler = type('H', (_Stalling,), {'stall': threading.Event()})
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(handler, directory=str(d/'cache')))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{server.server_address[1]}', handler.stall
    server.shutdown(); server.server_close()


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGKILL])
def test_no_partial_file_survives_an_interrupted_cache(tiny, stalling_server, tmp_path, sig):
    d, tasks = tiny
    url, stall = stalling_server
    brick, cache = sorted(tasks['brickname'].unique())[0], tmp_path/'cache'
    stall.set()
    p = subprocess.Popen([DHS, 'cache', '--bricks', brick, '--base-uri', url, '--cache', str(cache), '--threads', '1', '--timeout', '3'],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(cache.rglob('.*.part')) and time.time() < deadline and p.poll() is None: time.sleep(0.05)
    assert list(cache.rglob('.*.part')), 'no download in progress to interrupt'
    p.send_signal(sig)
    p.communicate(timeout=120)
    left = list(cache.rglob('.*.part'))
    if sig == signal.SIGTERM: assert p.returncode == 143 and not left     # unwound: the temporary file removed, the lock released
    else: assert p.returncode == -9 and left                               # nothing runs on SIGKILL...
    stall.clear()
    rep = cache_bricks([brick], CacheConfig(base_uri=url, cache_uri=str(cache), n_threads=1))
    assert rep.count('copied') + rep.count('skipped') == 10 and not list(cache.rglob('.*.part'))   # ...and the next run removes it at once


def test_files_honour_the_umask(tiny, tmp_path):
    d, tasks = tiny
    brick = sorted(tasks['brickname'].unique())[0]
    for mask, mode in ((0o027, 0o640), (0o002, 0o664)):
        cache, old = tmp_path/f'cache-{mask:03o}', os.umask(mask)
        try: cache_bricks([brick], CacheConfig(base_uri=str(d/'cache'), cache_uri=str(cache), n_threads=1))
        finally: os.umask(old)
        files = [f for f in cache.rglob('*') if f.is_file() and f.name != '.dhs.lock']
        assert len(files) == 13 and {f.stat().st_mode & 0o777 for f in files} == {mode}   # 10 coadds, 3 reports


def test_user_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    absent = tmp_path/'absent.parquet'
    p = run_dhs('validate', absent)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and str(absent) in p.stderr and 'Traceback' not in p.stderr
    assert dhs_main('--debug', 'validate', absent) == 1 and 'Traceback (most recent call last)' in capsys.readouterr().err
    monkeypatch.setenv('DHS_DEBUG', '1')
    assert dhs_main('validate', absent) == 1 and 'Traceback (most recent call last)' in capsys.readouterr().err
