"What dhs.spark adds to a Spark session: Arrow batches, UTC, the shared session reused, a clear error without Java."
import os, subprocess, sys
import pyarrow as pa


def test_session_has_dhs_settings(spark):
    "get_spark's settings are what phase 4c and the manifest rely on: Arrow transfer on, timestamps in UTC."
    assert spark.conf.get('spark.sql.execution.arrow.pyspark.enabled') == 'true'
    assert spark.conf.get('spark.sql.session.timeZone') == 'UTC'


def test_get_spark_returns_active_session(spark):
    from dhs.spark import get_spark, SparkConfig
    assert get_spark() is spark and get_spark(SparkConfig(app_name='other')) is spark   # one session per process


def test_map_in_arrow_runs_dhs_code_on_executors(spark):
    "Executors import the package (phase 4c's mapInArrow bodies are dhs functions)."
    def seeds(batches):
        from dhs.core import task_seed, seed_to_int64
        for b in batches:
            yield pa.RecordBatch.from_pydict({'id': b.column('id'), 'seed': [seed_to_int64(task_seed(str(i))) for i in b.column('id').to_pylist()]})
    rows = sorted(spark.range(6).repartition(2).mapInArrow(seeds, 'id long, seed long').collect())
    from dhs.core import task_seed, seed_to_int64
    assert [r.seed for r in rows] == [seed_to_int64(task_seed(str(i))) for i in range(6)]


def test_no_java_is_a_clear_error(tmp_path):
    "Without Java on the PATH (and no JAVA_HOME), get_spark says what to install instead of a JVM traceback."
    env = {k: v for k, v in os.environ.items() if k not in ('JAVA_HOME',)}
    env['PATH'] = str(tmp_path)                      # an empty folder: no java
    code = 'from dhs.spark import get_spark, SparkConfig\ntry: get_spark(SparkConfig(master="local[1]"))\nexcept RuntimeError as e: print("ERR", e)'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=120)
    assert 'ERR Spark needs Java 17' in out.stdout, out.stdout + out.stderr
