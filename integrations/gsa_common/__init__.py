"""Small helpers several integrations share (benchmarks, training, distillation, the command line).

The lowest integration package: it imports nothing from the other ``gsa_*`` packages, so anything may
use it without creating a cycle.

- :mod:`~gsa_common.runinfo`: when a run happened and how busy the machine was (timestamps, load average);
- :mod:`~gsa_common.args`: command-line argument types (a JSON object) and range checks.
"""

from gsa_common.args import check_range, json_object_arg
from gsa_common.runinfo import load_average, utc_now

__all__ = ["check_range", "json_object_arg", "load_average", "utc_now"]
