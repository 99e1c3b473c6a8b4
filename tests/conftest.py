"Shared fixtures: one local Spark session for the whole test run (it takes ~10 s to start)."
import os, sys
import pytest

os.environ.setdefault('PYSPARK_PYTHON', sys.executable)
os.environ.setdefault('SPARK_LOCAL_IP', '127.0.0.1')


@pytest.fixture(scope='session')
def spark():
    from dhs.spark import get_spark, SparkConfig
    s = get_spark(SparkConfig(master='local[2]', app_name='dhs-tests', driver_memory='2g', shuffle_partitions=4))
    yield s
    s.stop()


@pytest.fixture(scope='session')
def tiny_sky(tmp_path_factory):
    "The `tiny` mock sky, generated once per test session: (root folder, mock_sky.json record)."
    from dhs.mocksky import generate_mock_sky, mock_sky_config
    out = tmp_path_factory.mktemp('tiny-sky')/'sky'
    rec = generate_mock_sky(mock_sky_config('tiny', out=str(out)), log=lambda *a: None)
    return out, rec


@pytest.fixture(scope='session')
def tiny_hosts(tiny_sky):
    "Phase 3 hosts of the tiny sky, selected file by file without Spark (process_sweep)."
    import pandas as pd
    from dhs.parent import known_lenses, process_sweep
    sky, _ = tiny_sky
    lenses = known_lenses()[0]
    parts = [process_sweep(str(p), 'desi_lrg', lenses, 5.0)[0] for p in sorted((sky/'south'/'sweep'/'10.1').glob('sweep-*.fits'))]
    return pd.concat([p for p in parts if p is not None], ignore_index=True)


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory):
    "The README's main command at its smallest, run once per session: `dhs run --preset tiny` -> (CompletedProcess, run folder)."
    import subprocess
    from pathlib import Path
    out = tmp_path_factory.mktemp('tiny-run')
    proc = subprocess.run([str(Path(sys.executable).parent/'dhs'), 'run', '--preset', 'tiny', '--outputs', str(out), '--run-id', 'r1'],
                          capture_output=True, text=True, timeout=600)
    return proc, out/'r1'


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test` runs `-n 2 --dist loadgroup`) each test file runs in one worker, so its module
    fixtures are built once, and every test of the `tiny_run` fixture runs in one worker, so the tiny run happens once."""
    for item in items:
        group = 'tiny_run' if 'tiny_run' in getattr(item, 'fixturenames', ()) else item.path.name
        item.add_marker(pytest.mark.xdist_group(group))
