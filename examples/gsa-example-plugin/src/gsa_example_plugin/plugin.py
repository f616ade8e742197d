"""The entry point's target: registers this package's strategies, its command and its benchmark by name."""

from gsa_core import hookimpl
from gsa_example_plugin.strategies import CentroidSeedBirth, GeometricScheduler


@hookimpl
def gsa_register(registry):
    registry.register("birth", "centroid-seed", CentroidSeedBirth)
    registry.register("scheduler", "geometric", GeometricScheduler)


@hookimpl
def gsa_register_commands(cli):
    # targets are "module:attribute", imported only when the command runs (gsa --help stays fast)
    cli.command("example-schedule", "gsa_example_plugin.command:add_arguments",
                help="print the steps at which a registered scheduler refines")
    cli.benchmark("schedulers", "gsa_example_plugin.benchmark:BENCHMARK",
                  help="how often each registered scheduler refines in a run of N steps")
