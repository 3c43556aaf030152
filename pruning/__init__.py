"""The pruning defense against backdoored networks.

Liu, Dolan-Gavitt & Garg, "Fine-Pruning: Defending Against Backdooring Attacks on Deep
Neural Networks", RAID 2018 (https://arxiv.org/abs/1805.12185).

The stages, one module each: ``data`` (lab HDF5 sets), ``models`` (loading B, finding the
layer), ``profile`` (channel order), ``prune`` (B'_k, literal and fast), ``counts`` (the
tallies per prefix), ``select`` (thresholds), ``goodnet`` (G), ``report`` (files in the output
folder), and ``inputs``, ``sweep`` and ``defense`` put them together: ``pruning.defend(model, sets...)``
runs the whole defense in one call (docs/api.md). ``demo`` builds the synthetic BadNet the project runs and tests on, ``deepid`` the
lab's architecture; ``backend`` imports Keras quietly; ``files`` writes every file whole (atomic
writes, the demo's lock). Nothing here creates a Dask cluster.
"""

__all__ = ["defend", "Defense"]


def __getattr__(name):
    # ``pruning.defend`` without TensorFlow loading for every ``import pruning.data``
    if name in __all__:
        from pruning import defense
        return getattr(defense, name)
    raise AttributeError(f"module 'pruning' has no attribute {name!r}")
