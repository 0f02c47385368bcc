"""One file per variant; VARIANTS maps the CLI name to its module.

A variant module defines NAME, OP_NAME, PARAMS (key -> default), `reference`, `op`
(the registered attnrewrite::<OP_NAME> overload), `op_args(site, options)` (the
variant parameters passed after the normal form) and `diagnostics(...)`.
"""
from . import exact

VARIANTS = {exact.NAME: exact}
