"""``fisher priors``: the registered prior families and the builtin priors shipped with the package
(usable as ``--prior builtin:<name>`` wherever a prior directory is accepted)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(kw_only=True)
class PriorsOptions:
    pass


def register(sub) -> None:
    p = sub.add_parser("priors", help="list the prior families and the builtin priors",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=run, options=PriorsOptions)


def run(args: PriorsOptions) -> None:
    from fisher.priors import PRIORS, builtin
    print("prior families (fisher train-prior --prior NAME): " + ", ".join(PRIORS.names()))
    rows = builtin.describe()
    if not rows:
        print("builtin priors: none")
        return
    print("builtin priors (--prior NAME):")
    for r in rows:
        config = ", ".join(f"{k}={v}" for k, v in r["config"].items())
        bound = PRIORS[r["arch"]].bound if r["arch"] in PRIORS else None
        print(f"  {r['name']}: {r['arch']} ({config}); {r['epochs']} epochs; test NLL"
              + (f" ({bound} bound)" if bound else "") + f" {r['test_nll_nats']:.2f} nats/image "
              f"({r['test_bits_per_dim']:.4f} bits/dim)")
        if r["command"]:
            print(f"    made by: {r['command']}")
