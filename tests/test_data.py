"Phase 5 data: sharding over ranks and workers (each row once), filters on both classes, S3, NPZ, preprocessing, bench loader."
import hashlib, json
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader
from dhs.data import (Filters, Preprocess, StampDataset, batches_per_rank, preprocess, select_rows)
from dhs.toys import synthetic_stamp_table
from dhs.stamps import decode_stamps, theta_over_psf, write_stamp_table

torch.set_num_threads(1)


@pytest.fixture(scope='module')
def table():
    return synthetic_stamp_table(200, seed=11)


@pytest.fixture(scope='module')
def folder(table, tmp_path_factory):
    "Three files with uneven row groups, the last written by the project's own writer."
    d = tmp_path_factory.mktemp('stamps')
    pq.write_table(table.slice(0, 70), d / 'a.parquet', row_group_size=25)
    pq.write_table(table.slice(70, 61), d / 'b.parquet', row_group_size=17)
    write_stamp_table(table.slice(131), d / 'c.parquet')
    return d


def _key(img):
    return hashlib.blake2b(np.ascontiguousarray(img).tobytes(), digest_size=12).digest()


@pytest.fixture(scope='module')
def row_of(table):
    "Pixel content -> row of the table (every synthetic stamp is distinct)."
    keys = {_key(im): i for i, im in enumerate(decode_stamps(table['stamp']))}
    assert len(keys) == table.num_rows
    return keys


def _run(folder, world, workers, bs, drop, epoch=0, **kw):
    "Batches per rank of one epoch, each rank with its own DataLoader of `workers` processes."
    out = []
    for r in range(world):
        ds = StampDataset(folder, bs, rank=r, world_size=world, shuffle=True, drop_last=drop, seed=3, shuffle_rows=40, **kw)
        ds.set_epoch(epoch)
        out.append((len(ds), list(DataLoader(ds, batch_size=None, num_workers=workers))))
    return out


def _seen(per_rank, row_of, table):
    "Table rows of all valid stamps; checks labels against the table on the way."
    ctl = table['is_control'].to_numpy()
    rows = []
    for _, batches in per_rank:
        for b in batches:
            for img, lab, v in zip(b['image'].numpy(), b['label'].numpy(), b['valid'].numpy()):
                if not v: continue
                i = row_of[_key(img)]
                assert lab == 1 - ctl[i]
                rows.append(i)
    return np.array(rows)


@pytest.mark.parametrize('drop', [False, True])
def test_two_ranks_two_workers_each_row_once(folder, table, row_of, drop):
    bs, world = 16, 2
    per_rank = _run(folder, world, 2, bs, drop, epoch=1)
    counts = [len(b) for _, b in per_rank]
    assert counts[0] == counts[1] == per_rank[0][0] == batches_per_rank(200, bs, world, drop)   # equal batch counts
    assert all(b['image'].shape[0] == bs for _, bs_ in per_rank for b in bs_)                   # whole batches only
    seen = _seen(per_rank, row_of, table)
    assert len(np.unique(seen)) == len(seen)                                                     # nothing twice
    if drop: assert len(seen) == world * counts[0] * bs and 200 - len(seen) < world * bs          # a documented tail dropped
    else: assert sorted(seen) == list(range(200))                                                # nothing dropped


def test_filters_select_the_same_rows_on_both_classes(folder, table, row_of):
    f = Filters(min_theta_over_psf=0.8, min_arc_snr=20, control_kinds=['paired'])
    per_rank = _run(folder, 2, 2, 8, False, splits=['train', 'val'], filters=f)
    df = table.drop(['stamp']).to_pandas()
    expect = np.flatnonzero(select_rows(df, ['train', 'val'], f))
    seen = _seen(per_rank, row_of, table)
    assert sorted(seen) == sorted(expect)
    sel = df.iloc[seen]
    assert (sel.arc_snr >= 20).all() and (theta_over_psf(sel) >= 0.8).all()
    assert set(sel.region_split) == {'train', 'val'}
    assert set(sel[sel.is_control == 1].control_kind) == {'paired'} and (sel.is_control == 0).sum() > 0


def test_epochs_reshuffle_reproducibly(folder, row_of, table):
    order = lambda e: _seen(_run(folder, 1, 1, 20, False, epoch=e), row_of, table)
    a, b, a2 = order(0), order(1), order(0)
    assert np.array_equal(a, a2) and not np.array_equal(a, b) and sorted(a) == sorted(b)


def test_npz_table_reads_like_the_fast_one(table, tmp_path):
    pq.write_table(synthetic_stamp_table(24, seed=11, npz=True).drop(['stamp']), tmp_path / 'n.parquet', row_group_size=10)
    ds = StampDataset(tmp_path / 'n.parquet', 8, meta_columns=['ebv'])
    got = torch.cat([b['image'] for b in DataLoader(ds, batch_size=None, num_workers=2)])
    assert torch.equal(got.sort(0).values, torch.from_numpy(decode_stamps(table['stamp'])[:24].copy()).sort(0).values)


def test_stream_from_s3(folder, table, row_of):
    import boto3
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        opts = dict(endpoint_url=f'http://{host}:{port}', key='testing', secret='testing', client_kwargs={'region_name': 'us-east-1'})
        s3 = boto3.client('s3', endpoint_url=opts['endpoint_url'], aws_access_key_id='testing', aws_secret_access_key='testing',
                          region_name='us-east-1')
        s3.create_bucket(Bucket='dhs-stamps')
        for p in folder.iterdir(): s3.upload_file(str(p), 'dhs-stamps', f'run1/stamps/{p.name}')
        per_rank = _run('s3://dhs-stamps/run1/stamps', 2, 2, 16, False, storage_options=opts)
        assert sorted(_seen(per_rank, row_of, table)) == list(range(200))
    finally:
        server.stop()


@pytest.mark.parametrize('opts', [Preprocess(), Preprocess(clip='hard', clip_value=5), Preprocess(residual=True),
                                  Preprocess(residual=True, clip='none')])
def test_preprocessing_ignores_a_constant_sky_offset(table, opts):
    x = torch.from_numpy(decode_stamps(table['stamp'])[:16].copy()).double()
    offset = torch.tensor([0.05, -0.03, 0.08], dtype=torch.float64)[None, :, None, None]     # ~10x the sky noise
    a, b = preprocess(x, opts), preprocess(x + offset, opts)
    assert (a - b).abs().max() < 1e-9
    bump = torch.zeros_like(x); bump[..., 32, 56] = 0.1                    # a compact source on the sky (~20 sigma), not an offset
    assert (preprocess(x + bump, opts) - a)[..., 32, 56].abs().min() > 0.1


def test_bench_loader_reports_every_encoding(capsys):
    "The benchmark runs and reports rates and ratios for each encoding (speed targets live in the bench, not in tests)."
    from dhs.bench_loader import main
    assert main(['--json', '--rows', '1024', '--npz-rows', '256', '--seconds', '0.5', '--batch-size', '128']) == 0
    r = json.loads(capsys.readouterr().out)
    for stage in ('decode', 'dataset'):
        for enc in ('fast_plain', 'npz'):
            assert r[stage][enc] > 0
        assert r['speedup_vs_npz'][stage]['fast_plain'] == pytest.approx(r[stage]['fast_plain'] / r[stage]['npz'], rel=1e-6)
