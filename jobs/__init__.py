"""Entry points that own the Dask client: ``python -m jobs.sweep``."""
