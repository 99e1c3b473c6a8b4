"A Spark phase through `spark-submit --master local[2]`, with the package shipped as a --py-files zip."
import json, os, subprocess, sys
from pathlib import Path
import numpy as np
from dhs import parent
from dhs.submit import build_zip
from dhs.survey import write_sweep, sweep_relpath


def test_parent_phase_runs_under_spark_submit_with_zipped_package(tmp_path):
    rows = parent._example_rows().iloc[[0] * 20 + [1] * 5].reset_index(drop=True)
    rows['OBJID'] = np.arange(len(rows)); rows['RA'] = 150 + np.linspace(0.1, 4.9, len(rows)); rows['DEC'] = 1.0
    write_sweep(rows, tmp_path/'sky'/sweep_relpath(150, 0, 155, 5), fill_missing=True)
    zip_path = build_zip(tmp_path/'dist'/'dhs.zip')
    entry = Path(sys.executable).parent/'spark-submit'
    script = Path(parent.__file__).with_name('submit.py')
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable, SPARK_LOCAL_IP='127.0.0.1')
    out = subprocess.run([str(entry), '--master', 'local[2]', '--conf', 'spark.ui.enabled=false', '--py-files', str(zip_path),
                          str(script), 'parent', '--sky', str(tmp_path/'sky'), '--out', str(tmp_path/'parent')],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path/'parent'/'parent_summary.json').read_text())
    assert summary['n_hosts'] == 20 and summary['n_files_read'] == 1
    paths = summary['executor_dhs_paths']
    assert paths and all('dhs.zip' in p for p in paths), paths   # executors imported dhs from the shipped zip
