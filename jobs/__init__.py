"""Entry points that own the Dask client: ``python -m jobs.sweep``.

This package is the application: its processes (the sweep and the Dask workers that import its
tasks) keep TensorFlow's C++ notices off their logs, unless TF_CPP_MIN_LOG_LEVEL says otherwise.
Set before any of them imports TensorFlow; the core (``pruning``) leaves the environment alone.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
