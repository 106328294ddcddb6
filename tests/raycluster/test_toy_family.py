"""A new family is one class and one registration: a toy prior and a toy decoder, defined outside
the package (tests/raycluster/toy_families.py, loaded through $FISHER_PLUGINS), are trained, embedded,
decoded, loaded and reported by the existing commands with no other edit.

The commands run in a fresh process whose local Ray (and so every Ray worker) inherits
FISHER_PLUGINS, as a user's would."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

SCRIPT = textwrap.dedent('''
    import json, sys
    from raycluster import cli
    out, src = sys.argv[1], sys.argv[2]
    ray = ["--num-cpus", "2"]
    def run(*argv):
        code = cli.main([*argv, *ray] if argv[0] != "prepare" else list(argv))
        print("EXIT", argv[0], code, flush=True)
        return code
    assert run("prepare", "mnist", "--src", src, "--out", f"{out}/data", "--limit", "64") == 0
    assert run("train-prior", "--prior", "toy", "--width", "3", "--data", f"{out}/data", "--out", f"{out}/prior",
               "--epochs", "1", "--batch-size", "32", "--cpus-per-worker", "0.5") == 0
    # an option of another prior is refused before any work
    assert run("train-prior", "--prior", "toy", "--layers", "2", "--data", f"{out}/data", "--out", f"{out}/x") == 2
    for kind in ("fisher", "activation"):
        assert run("embed", "--prior", f"{out}/prior", "--data", f"{out}/data", "--out", f"{out}/emb-{kind}",
                   "--kind", kind, "--dim", "16", "--batch-size", "32", "--chunk-size", "16") == 0
    assert run("train-decoder", "--decoder", "toy_linear", "--scale", "0.5", "--embeddings", f"{out}/emb-fisher",
               "--data", f"{out}/data", "--out", f"{out}/dec", "--epochs", "1", "--batch-size", "32",
               "--cpus-per-worker", "0.5") == 0
    assert run("interpolate", "--decoder", f"{out}/dec", "--embeddings", f"{out}/emb-fisher", "--data",
               f"{out}/data", "--out", f"{out}/interp", "--pairs", "2", "--alphas", "0,0.5,1") == 0

    from fisher.decoders import load_decoder
    from fisher.io import read_manifest
    from fisher.priors import load_prior
    from fisher.reports.run import prior_description
    prior, dec = load_prior(f"{out}/prior"), load_decoder(f"{out}/dec")
    manifest = read_manifest(f"{out}/prior", "train-prior")
    print("RESULT", json.dumps({"prior": type(prior).__name__, "decoder": type(dec).__name__,
                                "scale": dec.scale, "width": prior.config.width,
                                "description": prior_description(manifest["config"]),
                                "nll": manifest["metrics"]["test_nll_nats"]}))
''')


@pytest.mark.slow
def test_toy_prior_and_decoder_through_the_commands(tmp_path, mnist_dir):
    env = {**os.environ, "FISHER_PLUGINS": "toy_families",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(mnist_dir)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "not an option of prior 'toy'" in proc.stderr
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["prior"] == "ToyPrior" and result["decoder"] == "ToyLinearDecoder"
    assert result["width"] == 3 and result["scale"] == 0.5
    assert "toy" in result["description"] and result["nll"] > 0
    emb = json.loads((tmp_path / "emb-fisher" / "manifest.json").read_text())
    # free parameters: 3x3 mask A keeps 4 of 9 taps (1 -> 3 maps: 12) + 3 biases, the 1x1 output 3 + 1,
    # the temperature 1
    assert emb["config"]["n_features"] == 12 + 3 + 3 + 1 + 1 and emb["columns"]["z"]["dim"] == 16
    act = json.loads((tmp_path / "emb-activation" / "manifest.json").read_text())
    assert act["config"]["n_features"] == 3 * 28 * 28              # hidden(): 3 maps of 28 x 28
    assert (tmp_path / "interp" / "interpolations.png").stat().st_size > 0
