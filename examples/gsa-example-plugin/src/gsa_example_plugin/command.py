"""``gsa example-schedule``: the steps at which a registered scheduler refines (a plugin's own command)."""

from gsa_common import json_object_arg


def add_arguments(parser):
    parser.add_argument("--scheduler", default="geometric", help="a registered scheduler (default geometric)")
    parser.add_argument("--params", type=json_object_arg, default={}, help="its params as a JSON object")
    parser.add_argument("--steps", type=int, default=1000, help="steps to look at (default 1000)")
    parser.set_defaults(handler=run)


def run(args):
    from gsa_core.registry import get_registry

    scheduler = get_registry().build("scheduler", args.scheduler, args.params)  # unknown names: one clear error
    print(" ".join(str(step) for step in range(args.steps) if scheduler.should_refine(step)))
    return 0
