"""The entry point's target: registers this package's strategies by name."""

from gsa_core import hookimpl
from gsa_example_plugin.strategies import CentroidSeedBirth, GeometricScheduler


@hookimpl
def gsa_register(registry):
    registry.register("birth", "centroid-seed", CentroidSeedBirth)
    registry.register("scheduler", "geometric", GeometricScheduler)
