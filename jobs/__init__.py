"""Entry points that own the Dask client: ``python -m jobs.sweep``."""
import os

# Before TensorFlow is imported here or in a worker: no C++ info chatter in job logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
