"""Phase 4b coadd cache against real servers on 127.0.0.1: an HTTP server that fails requests on
purpose (500s, bodies cut short, wrong Content-Length, stalls) and misses a brick, an S3-compatible
server (moto in server mode), and plain local folders."""
import hashlib, json, re, socket, threading, time, urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from dhs.cache import CacheConfig, CacheError, cache_bricks, main
from dhs.survey import BANDS, brick_coadd_relpaths, brick_wcs, coadd_relpath, write_coadd

PRESENT = ['0001p000', '0002m003', '1234p567', '2447p120', '3599m010']  # complete at the source
PARTIAL = '0150p020'   # its maskbits file is missing at the source: the whole brick is missing
ABSENT = '0200m050'    # not at the source at all (404 for every file)
REPORTS = {'cache_report.parquet', 'missing_bricks.csv', 'cache_report.json'}


def _write_brick(root: Path, brick: str, seed: int):
    "The 10 coadds of a brick, 64x64 pixels, written by dhs.survey.write_coadd (DR10 headers, tile-compressed HDU1)."
    rng, wcs = np.random.default_rng(seed), brick_wcs(int(brick[:4]) / 10, (1 if brick[4] == 'p' else -1) * int(brick[5:]) / 10, npix=64)
    for band in BANDS:
        write_coadd(root / coadd_relpath(brick, 'image', band), rng.normal(0, 0.05, (64, 64)), wcs, 'image', band)
        write_coadd(root / coadd_relpath(brick, 'invvar', band), rng.uniform(50, 200, (64, 64)), wcs, 'invvar', band)
        write_coadd(root / coadd_relpath(brick, 'psfsize', band), 1.3 + 0.05 * rng.normal(size=(64, 64)), wcs, 'psfsize', band)
    write_coadd(root / coadd_relpath(brick, 'maskbits'), (rng.random((64, 64)) < 0.05).astype(np.int32) * 2, wcs, 'maskbits')


@pytest.fixture(scope='module')
def sky(tmp_path_factory) -> Path:
    "A mock sky folder with the coadds of PRESENT and PARTIAL (minus its maskbits) in the DR10 layout."
    root = tmp_path_factory.mktemp('sky')
    for i, brick in enumerate(PRESENT + [PARTIAL]):
        _write_brick(root, brick, i)
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob('*.fits.fz')) == sorted(
        r for b in PRESENT + [PARTIAL] for r in brick_coadd_relpaths(b))
    (root / brick_coadd_relpaths(PARTIAL)[-1]).unlink()
    return root


def present_rels():
    return [r for b in PRESENT for r in brick_coadd_relpaths(b)]


def cache_contents(cache: Path) -> set:
    "Relative paths of every file under the cache (temporary files included; the cache's lock file, .dhs.lock, left out)."
    return {p.relative_to(cache).as_posix() for p in cache.rglob('*') if p.is_file() and p.name != '.dhs.lock'}


def assert_identical(sky: Path, cache: Path, rels):
    for rel in rels:
        assert (cache / rel).read_bytes() == (sky / rel).read_bytes(), rel


# ---------------------------------------------------------------- a faulty HTTP server

def _u(*parts) -> float:
    "Deterministic uniform [0, 1) from blake2b of the parts."
    h = hashlib.blake2b('|'.join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, 'little') / 2**64


class FaultyServer(ThreadingHTTPServer):
    "Serves a folder over HTTP/1.1 on 127.0.0.1; `plan(method, relpath)` lists the faults of its first requests."
    daemon_threads = True

    def __init__(self, root: Path, plan):
        super().__init__(('127.0.0.1', 0), FaultyHandler)
        self.root, self.plan, self.lock = Path(root).resolve(), plan, threading.Lock()
        self.requests, self.faults_served = {}, {}

    def next_fault(self, method: str, rel: str):
        with self.lock:
            n = self.requests[(method, rel)] = self.requests.get((method, rel), 0) + 1
            faults = self.plan(method, rel)
            fault = faults[n - 1] if n <= len(faults) else None
            if fault: self.faults_served[fault] = self.faults_served.get(fault, 0) + 1
            return fault

    def handle_error(self, request, client_address):
        pass  # clients that time out close connections under a stalled handler: expected here

    @property
    def url(self) -> str:
        return f'http://127.0.0.1:{self.server_address[1]}/dr10'


class FaultyHandler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'

    def log_message(self, *args):
        pass

    def _reply(self, status: int, body: bytes = b'', length: int | None = None, send_body: bool = True):
        self.send_response(status)
        self.send_header('Content-Type', 'application/octet-stream')
        self.send_header('Content-Length', str(len(body) if length is None else length))
        self.end_headers()
        if send_body and self.command != 'HEAD': self.wfile.write(body)  # a HEAD reply has no body (RFC 9110)

    def _serve(self, method: str):
        rel = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        rel = rel[len('/dr10/'):] if rel.startswith('/dr10/') else None
        path = (self.server.root / rel).resolve() if rel else None
        if path is None or self.server.root not in path.parents or not path.is_file():
            return self._reply(404, b'not found')
        data, fault = path.read_bytes(), self.server.next_fault(method, rel)
        half = len(data) // 2
        if fault == '500':
            return self._reply(500, b'server error')
        if fault == 'cut':  # announces the whole file, sends half, drops the connection
            self._reply(200, data[:half], length=len(data))
            self.wfile.flush(); self.close_connection = True
            return self.connection.shutdown(socket.SHUT_RDWR)
        if fault == 'short':  # a wrong Content-Length: half the file, looking complete
            return self._reply(200, data[:half])
        if fault == 'stall':  # headers, then nothing for longer than the client's read timeout
            self._reply(200, b'', length=len(data), send_body=False); self.wfile.flush()
            time.sleep(1.5); self.close_connection = True
            return
        self._reply(200, data)

    def do_GET(self):
        self._serve('GET')

    def do_HEAD(self):
        self._serve('HEAD')


@pytest.fixture
def serve():
    "Start FaultyServer(root, plan) in a thread; stopped after the test."
    servers = []

    def start(root, plan=lambda method, rel: []):
        server = FaultyServer(root, plan)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server
    yield start
    for s in servers:
        s.shutdown(); s.server_close()


def flaky_plan(method: str, rel: str) -> list:
    "About 40% of the files fail their first GET(s) in one of four ways; a few others fail their first HEAD."
    if method == 'GET' and _u('get', rel) < 0.4:
        return [['500'], ['cut'], ['short'], ['500', 'cut'], ['cut', 'short', '500'], ['stall']][int(_u('mode', rel) * 6)]
    if method == 'HEAD' and _u('get', rel) >= 0.4 and _u('head', rel) < 0.2:
        return ['500', '500']  # HEAD fails; fsspec then asks for the size with a GET, which succeeds
    return []


# ---------------------------------------------------------------- tests

def test_http_cache_survives_faults_and_missing_bricks(sky, serve, tmp_path):
    server = serve(sky, flaky_plan)
    cache = tmp_path / 'cache'
    cfg = CacheConfig(psf=False, base_uri=server.url, cache_uri=str(cache), n_threads=4, max_retries=4, backoff_s=0.01, timeout_s=0.5)
    bricks = [ABSENT] + PRESENT[:3] + [PARTIAL] + PRESENT[3:]
    t0 = time.perf_counter()
    rep = cache_bricks(bricks, cfg)
    first_s = time.perf_counter() - t0
    # the faults really happened, in every flavour, and were retried
    assert {'500', 'cut', 'short', 'stall'} <= set(server.faults_served), server.faults_served
    assert any(server.requests.get(('HEAD', r), 0) and flaky_plan('HEAD', r) for r in present_rels())
    assert (rep.files['attempts'] > 1).sum() >= 10
    s = rep.summary()
    assert (s['copied'], s['skipped'], s['failed'], s['missing'], s['missing_bricks']) == (50, 0, 0, 20, 2), s
    assert s['bytes_copied'] == sum((sky / r).stat().st_size for r in present_rels())
    # complete, byte-identical, nothing else: no temporary or partial files, nothing of the missing bricks
    assert_identical(sky, cache, present_rels())
    assert cache_contents(cache) == set(present_rels()) | REPORTS
    missing = pd.read_csv(cache / 'missing_bricks.csv', dtype=str)
    assert missing['brickname'].tolist() == sorted([ABSENT, PARTIAL])
    assert 'maskbits.fits.fz not found' in missing.set_index('brickname').loc[PARTIAL, 'reason']
    table = pq.read_table(cache / 'cache_report.parquet')
    assert table.num_rows == 70 and json.loads(table.schema.metadata[b'dhs'])['summary']['copied'] == 50

    # a second run copies nothing
    rep2 = cache_bricks(bricks, cfg)
    assert (rep2.count('copied'), rep2.count('skipped'), rep2.count('missing')) == (0, 50, 20)

    # a truncated file in the cache (same name, half the bytes) is found and fetched again
    victim = present_rels()[7]
    (cache / victim).write_bytes((sky / victim).read_bytes()[:2880])
    rep3 = cache_bricks(PRESENT, cfg)
    assert rep3.files.set_index('relpath').loc[victim, 'status'] == 'copied'
    assert (rep3.count('copied'), rep3.count('skipped')) == (1, 49)
    assert_identical(sky, cache, present_rels())
    print(f'\nhttp: first run {first_s:.2f} s ({s["copied"]} files, {s["bytes_copied"]} bytes, faults {server.faults_served})')


def test_http_fail_fraction(sky, serve, tmp_path):
    broken = {r for r in present_rels()[:20] if r.endswith(('-image-r.fits.fz', '-maskbits.fits.fz'))}
    assert len(broken) == 4
    cut = set(sorted(broken)[:2])  # these always drop the connection half way, the other two always answer 500
    server = serve(sky, lambda method, rel: ([] if method != 'GET' or rel not in broken else ['cut'] * 100 if rel in cut else ['500'] * 100))
    cache = tmp_path / 'cache'
    cfg = CacheConfig(psf=False, base_uri=server.url, cache_uri=str(cache), n_threads=2, max_retries=2, backoff_s=0.01, fail_fraction=0.1)
    with pytest.raises(CacheError) as err:
        cache_bricks(PRESENT[:2], cfg)  # 4 of 20 files fail: more than 10%
    msg = str(err.value)
    assert 'more than fail_fraction=0.1' in msg and 'rerun to resume' in msg
    named = [r for r in broken if r in msg]
    assert len(named) >= 3, msg  # the run stops as soon as a third file has failed
    # 3 tries each (2 retries), fewer for a file whose retries the stopping run cut short
    assert len(re.findall(r'transient after [123] attempt\(s\)', msg)) == len(named) and 'transient after 3 attempt(s)' in msg
    assert 'ClientResponseError: 500' in msg and 'ClientPayloadError' in msg
    # what is in the cache is complete; no temporary files
    done = cache_contents(cache) - REPORTS
    assert not done & broken and all(not Path(p).name.startswith('.') for p in done)
    assert_identical(sky, cache, done)
    rep = pq.read_table(cache / 'cache_report.parquet').to_pandas()
    assert (rep['status'] == 'failed').sum() == len(named)
    # with a looser tolerance the same run finishes, reporting the 4 failures
    rep = cache_bricks(PRESENT[:2], CacheConfig(**{**cfg.__dict__, 'fail_fraction': 0.25}))
    assert rep.count('failed') == 4 and rep.count('copied') + rep.count('skipped') == 16
    assert set(rep.failed_files['relpath']) == broken
    assert not (cache_contents(cache) - REPORTS) & broken  # half-received files never reached their final names


def test_local_to_local_and_cli(sky, tmp_path, capsys):
    pd.DataFrame({'brickname': PRESENT[:2] + [ABSENT, PRESENT[0]], 'row': range(4)}).to_parquet(tmp_path / 'manifest.parquet')
    cache = tmp_path / 'cache'
    args = ['--manifest', str(tmp_path / 'manifest.parquet'), '--base-uri', str(sky), '--cache-uri', str(cache), '--threads', '2', '--json']
    assert main(args) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s['copied'], s['missing_bricks'], s['failed']) == (20, 1, 0)
    assert_identical(sky, cache, brick_coadd_relpaths(PRESENT[0]) + brick_coadd_relpaths(PRESENT[1]))
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)['skipped'] == 20
    with pytest.raises(ValueError, match='malformed brick name'):
        main(['--bricks', 'nonsense', '--base-uri', str(sky), '--cache-uri', str(cache)])


# ---------------------------------------------------------------- S3 (moto server)

@pytest.fixture(scope='module')
def s3(sky):
    "A moto S3 server on 127.0.0.1 holding the mock sky under s3://dhs-sky/dr10; yields fsspec storage options."
    import boto3  # test dependencies (moto[server], boto3): a missing one fails loudly rather than skipping
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f'http://{host}:{port}'
    client = boto3.client('s3', endpoint_url=endpoint, aws_access_key_id='testing', aws_secret_access_key='testing', region_name='us-east-1')
    for bucket in ('dhs-sky', 'dhs-cache'):
        client.create_bucket(Bucket=bucket)
    for p in sky.rglob('*.fits.fz'):
        client.upload_file(str(p), 'dhs-sky', 'dr10/' + p.relative_to(sky).as_posix())
    yield dict(client=client, options=dict(endpoint_url=endpoint, key='testing', secret='testing',
                                           client_kwargs={'region_name': 'us-east-1'}))
    server.stop()


def test_s3_to_local(sky, s3, tmp_path):
    cache = tmp_path / 'cache'
    cfg = CacheConfig(psf=False, base_uri='s3://dhs-sky/dr10', cache_uri=str(cache), n_threads=4, backoff_s=0.01, verify='size+header',
                      storage_options=s3['options'])
    rep = cache_bricks(PRESENT[:3] + [ABSENT, PARTIAL], cfg)
    assert (rep.count('copied'), rep.count('missing'), rep.count('failed')) == (30, 20, 0)
    rels = [r for b in PRESENT[:3] for r in brick_coadd_relpaths(b)]
    assert_identical(sky, cache, rels)
    assert cache_contents(cache) == set(rels) | REPORTS
    assert cache_bricks(PRESENT[:3], cfg).count('skipped') == 30
    (cache / rels[4]).write_bytes((sky / rels[4]).read_bytes()[:-2880])  # the last block lost
    rep = cache_bricks(PRESENT[:3], cfg)
    assert (rep.count('copied'), rep.count('skipped')) == (1, 29)
    assert_identical(sky, cache, rels)


@pytest.mark.parametrize('verify', ['size', 'size+fits'])
def test_local_to_s3(sky, s3, verify):
    client, prefix = s3['client'], f'cache-{verify.replace("+", "-")}'
    cfg = CacheConfig(psf=False, base_uri=str(sky), cache_uri=f's3://dhs-cache/{prefix}', n_threads=4, backoff_s=0.01,
                      verify=verify, cache_storage_options=s3['options'])
    rep = cache_bricks(PRESENT[:2] + [ABSENT], cfg)
    assert (rep.count('copied'), rep.count('missing')) == (20, 10)
    rels = [r for b in PRESENT[:2] for r in brick_coadd_relpaths(b)]
    keys = {o['Key'] for o in client.list_objects_v2(Bucket='dhs-cache', Prefix=prefix + '/')['Contents']}
    assert keys == {f'{prefix}/{r}' for r in set(rels) | REPORTS}  # nothing temporary left behind
    for rel in rels:
        assert client.get_object(Bucket='dhs-cache', Key=f'{prefix}/{rel}')['Body'].read() == (sky / rel).read_bytes()
    # an object cut short in the cache is fetched again; the rest is skipped
    client.put_object(Bucket='dhs-cache', Key=f'{prefix}/{rels[3]}', Body=(sky / rels[3]).read_bytes()[:2880])
    rep2 = cache_bricks(PRESENT[:2], cfg)
    assert (rep2.count('copied'), rep2.count('skipped')) == (1, 19)
    assert client.get_object(Bucket='dhs-cache', Key=f'{prefix}/{rels[3]}')['Body'].read() == (sky / rels[3]).read_bytes()


def test_local_to_missing_bucket_fails_clearly(sky, s3):
    cfg = CacheConfig(psf=False, base_uri=str(sky), cache_uri='s3://no-such-bucket/cache', backoff_s=0.01, cache_storage_options=s3['options'])
    with pytest.raises(CacheError, match=r'cannot write s3://no-such-bucket/cache/south/.*\(does the bucket exist\?\)'):
        cache_bricks(PRESENT[:1], cfg)
