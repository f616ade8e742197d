"""``gsa bench schedulers``: how often each registered scheduler refines in a run of ``--steps`` steps.

A benchmark is a :class:`gsa_bench.scaffold.Benchmark`: its options, a ``measure`` function returning the
report, and a markdown table; the scaffold adds ``--out``, ``--threads``, ``--quiet``, ``--from-json``
and ``--markdown``, the run's metadata, and writes ``schedulers.json`` and ``schedulers.md``.
"""

from gsa_bench.scaffold import Benchmark


def options(parser):
    parser.add_argument("--steps", type=int, default=1000, help="training steps to simulate (default 1000)")


def measure(args, run):
    from gsa_core.registry import get_registry

    registry = get_registry()
    counts = {}
    for name in registry.names("scheduler"):
        scheduler = registry.build("scheduler", name)  # default params
        steps = [s for s in range(args.steps) if scheduler.should_refine(s)]
        counts[name] = {"refines": len(steps), "first": steps[0] if steps else None}
    return {"schema": "gsa-example-schedulers/1", "steps": args.steps, "schedulers": counts}


def markdown(report):
    lines = [f"| scheduler | refines in {report['steps']} steps | first refine |", "|---|---:|---:|"]
    lines += [f"| {name} | {c['refines']} | {c['first']} |" for name, c in report["schedulers"].items()]
    return "\n".join(lines)


BENCHMARK = Benchmark("schedulers", __doc__.splitlines()[0], options, measure, markdown=markdown)
