"Phase 5 training: overfitting a tiny set, exact resume, early stopping, bf16/channels_last/metadata on CPU, torchrun DDP with gloo."
import json, os, subprocess, sys
from pathlib import Path
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from dhs.data import Augment, Filters, batches_per_rank
from dhs.toys import synthetic_stamp_table
from dhs.train import cpu_demo_config, fit, load_checkpoint, model_from_checkpoint

torch.set_num_threads(1)
QUIET = dict(progress=False)


@pytest.fixture(scope='module')
def stamps(tmp_path_factory):
    d = tmp_path_factory.mktemp('train')
    t = synthetic_stamp_table(96, seed=21)
    pq.write_table(t, d / 'stamps.parquet', row_group_size=24)
    return d / 'stamps.parquet', t.drop(['stamp']).to_pandas()


def test_tiny_model_overfits_tiny_set(stamps, tmp_path):
    path, df = stamps
    everything = ['train', 'val', 'test']
    cfg = cpu_demo_config(stamps=str(path), out_dir=str(tmp_path / 'run'), epochs=16, batch_size=8, lr=3e-3, train_splits=everything,
                          val_splits=everything, filters=Filters(min_arc_snr=30), augment=Augment(dihedral=False), patience=100, **QUIET)
    n = int(((df.arc_snr >= 30)).sum())
    r = fit(cfg, log=lambda *a: None)
    h = r['history']
    assert len(h) == 16 and h[-1]['val_n_pos'] + h[-1]['val_n_neg'] == n
    assert h[-1]['train_loss'] < 0.3 * h[0]['train_loss']                     # the loss falls
    assert max(x['val_auroc'] for x in h[-3:]) > 0.99                          # and it separates what it has seen


def _weights(path):
    return load_checkpoint(path)


def test_resume_continues_the_same_run(stamps, tmp_path):
    path, _ = stamps
    aug = Augment(dihedral=True, shift_pix=0.5, degrade_prob=0.5)            # augmentations are seeded per step too
    kw = dict(stamps=str(path), epochs=3, batch_size=8, augment=aug, early_stop_metric='loss', **QUIET)
    full = fit(cpu_demo_config(out_dir=str(tmp_path / 'full'), **kw), log=lambda *a: None)
    cut = cpu_demo_config(out_dir=str(tmp_path / 'cut'), **kw)
    assert fit(cut, stop_after=1, log=lambda *a: None)['epochs_done'] == 1       # "interrupted" twice
    assert fit(cut, resume=True, stop_after=1, log=lambda *a: None)['epochs_done'] == 2
    again = fit(cut, resume=True, log=lambda *a: None)
    assert again['epochs_done'] == full['epochs_done'] == 3
    a, b = _weights(tmp_path / 'full' / 'last.pt'), _weights(tmp_path / 'cut' / 'last.pt')
    assert a['step'] == b['step'] and a['epoch'] == b['epoch'] == 3
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])                     # identical final weights
    sa, sb = a['optimizer']['state'], b['optimizer']['state']
    assert all(torch.equal(sa[i]['exp_avg_sq'], sb[i]['exp_avg_sq']) for i in sa)                 # and optimizer state
    assert [h['train_loss'] for h in a['history']] == [h['train_loss'] for h in b['history']]
    steps = (tmp_path / 'cut' / 'steps.csv').read_text().splitlines()[1:]
    assert [int(s.split(',')[0]) for s in steps] == sorted({int(s.split(',')[0]) for s in steps})  # no step logged twice


def test_early_stopping_and_resume_after_it(stamps, tmp_path):
    path, _ = stamps
    cfg = cpu_demo_config(stamps=str(path), out_dir=str(tmp_path / 'es'), epochs=6, batch_size=16, lr=0.0, early_stop_metric='loss',
                          patience=1, **QUIET)
    r = fit(cfg, log=lambda *a: None)                                         # lr 0: nothing improves after epoch 0
    assert r['stopped_early'] and r['epochs_done'] == 2 and r['best_epoch'] == 0
    assert fit(cfg, resume=True, log=lambda *a: None)['epochs_done'] == 2     # a finished run stays finished
    assert load_checkpoint(tmp_path / 'es' / 'best.pt')['epoch'] == 1


def test_bf16_channels_last_and_metadata_fusion_on_cpu(stamps, tmp_path):
    path, _ = stamps
    cfg = cpu_demo_config(stamps=str(path), out_dir=str(tmp_path / 'bf'), epochs=1, batch_size=16, precision='bf16', channels_last=True,
                          meta_columns=['psf_fwhm_used_r', 'psfdepth_r', 'ebv'], loss='focal', **QUIET)
    r = fit(cfg, log=lambda *a: None)
    assert np.isfinite(r['history'][0]['train_loss']) and np.isfinite(r['history'][0]['val_loss'])
    ck = load_checkpoint(tmp_path / 'bf' / 'last.pt')
    m = model_from_checkpoint(ck)
    assert (m.arch, m.n_meta, ck['meta_columns'], ck['config']['precision']) == ('small_cnn', 3, cfg.meta_columns, 'bf16')
    leak = json.loads((tmp_path / 'bf' / 'metadata_leakage.json').read_text())                   # reported beside the fused model
    assert leak['columns'] == cfg.meta_columns and 0.3 < leak['auc_logistic'] < 0.7


def test_torchrun_two_ranks_gloo(stamps, tmp_path):
    path, df = stamps
    out = tmp_path / 'ddp'
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', '-m', 'dhs.train', str(path),
           '--out', str(out), '--preset', 'cpu-demo', '--epochs', '2', '--batch-size', '8', '--num-workers', '1', '--population', 'all', '--set', 'progress=False']
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])                  # rank 0 prints one summary line
    assert summary['epochs_done'] == 2
    assert json.loads((out / 'config.json').read_text())['world_size'] == 2
    ck = load_checkpoint(out / 'last.pt')
    n_train = int((df.region_split == 'train').sum())
    assert ck['step'] == 2 * batches_per_rank(n_train, 8, 2, True)           # each rank stepped through its half
    h = json.loads((out / 'metrics.json').read_text())
    assert h[-1]['val_n_pos'] + h[-1]['val_n_neg'] == int((df.region_split == 'val').sum())   # validation gathered over ranks


def test_run_notebook_trains_scores_and_plots(tmp_path):
    import papermill as pm
    from dhs.runner import ensure_kernel
    nb = Path(__file__).resolve().parents[1] / 'nbs' / 'runs' / '06_train.ipynb'
    params = pm.inspect_notebook(str(nb))
    assert {'run_dir', 'stamps', 'arch', 'epochs', 'batch_size', 'device', 'preset'} <= set(params)
    run = tmp_path / 'run'
    pm.execute_notebook(str(nb), str(tmp_path / 'out.ipynb'), parameters=dict(run_dir=str(run), n_synthetic=120, epochs=2, batch_size=16),
                        kernel_name=ensure_kernel(), cwd=str(tmp_path), progress_bar=False)
    for split in ('val', 'test'):
        s = pq.read_table(run / 'scores' / f'{split}.parquet').to_pandas()
        assert len(s) > 0 and set(s.region_split) == {split} and s.score.between(0, 1).all()
    assert (run / 'figures' / 'loss_curve.png').read_bytes()[:4] == b'\x89PNG'
    summary = json.loads((run / 'train_summary.json').read_text())
    assert summary['config']['arch'] == 'small_cnn' and summary['config']['epochs'] == 2
    assert len(json.loads((run / 'train' / 'metrics.json').read_text())) == 2
