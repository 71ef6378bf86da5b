"""The one SparkSession of the test run (``local[2,2]``: two workers, each task tried twice), or a skip that says
what to install."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from conftest import _USER_CACHE


@pytest.fixture(scope="session")
def spark():
    if importlib.util.find_spec("pyspark") is None:
        pytest.skip("Spark tests need pyspark: pip install -e '.[spark]' (./dev install does)")
    from dolly_langchain.batch.spark import java_available

    if not java_available():
        pytest.skip("Spark tests need a Java runtime: sudo apt-get install -y openjdk-17-jre-headless")
    from pyspark.sql import SparkSession

    with pytest.MonkeyPatch.context() as mp:
        # Python workers inherit the environment the JVM starts with: the user's model cache (the embedded model is
        # converted there once), not a temporary one a test fixture may have set.
        if _USER_CACHE is None:
            mp.delenv("DOLLY_LANGCHAIN_CACHE", raising=False)
        else:
            mp.setenv("DOLLY_LANGCHAIN_CACHE", _USER_CACHE)
        mp.setenv("PYSPARK_PYTHON", sys.executable)
        session = (SparkSession.builder.master("local[2,2]").appName("dolly-langchain tests")
                   .config("spark.pyspark.python", sys.executable)
                   .config("spark.ui.enabled", "false")
                   .config("spark.ui.showConsoleProgress", "false")
                   .config("spark.sql.shuffle.partitions", "4")
                   .config("spark.sql.execution.arrow.pyspark.enabled", "true")
                   .getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()
