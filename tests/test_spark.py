"The shared local Spark session works, including Arrow batches (what phase 4c uses)."
import pyarrow as pa


def test_spark_session_counts(spark):
    assert spark.range(100).count() == 100
    assert spark.conf.get('spark.sql.execution.arrow.pyspark.enabled') == 'true'


def test_map_in_arrow_runs_python_on_executors(spark):
    def double(batches):
        for b in batches:
            yield pa.RecordBatch.from_pydict({'id': b.column('id'), 'twice': pa.compute.multiply(b.column('id'), 2)})
    df = spark.range(10).repartition(2).mapInArrow(double, 'id long, twice long')
    rows = sorted(df.collect())
    assert [r.twice for r in rows] == [2 * i for i in range(10)]


def test_get_spark_returns_active_session(spark):
    from dhs.spark import get_spark
    assert get_spark() is spark
