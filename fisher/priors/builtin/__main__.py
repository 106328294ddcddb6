"""``python -m fisher.priors.builtin CHECKPOINT DATA NAME --command "..."``: package a trained prior."""
import argparse
import json

from fisher.priors.builtin import package

p = argparse.ArgumentParser(prog="python -m fisher.priors.builtin", description=package.__doc__)
p.add_argument("checkpoint", help="a train-prior output directory or one of its Ray checkpoints")
p.add_argument("data", help="the prepared data directory it was trained on")
p.add_argument("name", help="the builtin name (used as builtin:NAME)")
p.add_argument("--command", required=True, help="the exact command that trained it")
a = p.parse_args()
m = package(a.checkpoint, a.data, a.name, a.command)
print(json.dumps({k: m[k] for k in ("metrics", "builtin")}, indent=2))
