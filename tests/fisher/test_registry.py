"""The registry mechanism (fisher.registry): registration, typed configs, one-line errors, plugins."""
import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
import torch.nn as nn

from fisher.errors import FisherError
from fisher.registry import Registry


class Base(nn.Module):
    pass


def test_register_build_and_validate():
    reg = Registry("widget", Base)

    @dataclasses.dataclass
    class Cfg:
        width: int = 3
        rate: float = 0.5
        name: str | None = None

        def __post_init__(self):
            if self.width < 1:
                raise ValueError(f"width={self.width} must be >= 1")

    @reg.register("w", Cfg)
    class W(Base):
        def __init__(self, arg, width=3, rate=0.5, name=None):
            super().__init__()
            self.arg, self.width, self.rate = arg, width, rate

    w = reg.build("w", "A", width=4, rate=1)
    assert (w.arg, w.width, w.rate) == ("A", 4, 1) and w.config == Cfg(4, 1) and W.registered_name == "w"
    assert reg.names() == ["w"] and "w" in reg and reg["w"] is W
    with pytest.raises(FisherError, match=r"unknown widget 'v'; registered widgets: w"):
        reg.build("v", "A")
    with pytest.raises(FisherError, match="unknown option.*depth"):
        reg.build("w", "A", depth=2)
    with pytest.raises(FisherError, match="width='4' has the wrong type"):
        reg.build("w", "A", width="4")
    with pytest.raises(FisherError, match="width=0 must be >= 1"):
        reg.build("w", "A", width=0)
    with pytest.raises(TypeError, match="must subclass"):
        reg.register("lin")(nn.Linear)


def test_config_derived_from_the_constructor():
    reg = Registry("widget", Base, arg_names=("z",))

    @reg.register("d")
    class D(Base):
        def __init__(self, z, scale: float = 1.0, depth: int = 2):
            super().__init__()
            self.scale, self.depth = scale, depth

    fields = {f.name: f.default for f in reg.get("d").fields()}
    assert fields == {"scale": 1.0, "depth": 2}
    assert reg.build("d", 0, depth=5).depth == 5
    with pytest.raises(FisherError, match="wrong type"):
        reg.build("d", 0, depth=1.5)


def test_plugins_register_families_on_import(tmp_path):
    """$FISHER_PLUGINS modules are imported with the registries, in any process (Ray workers too)."""
    (tmp_path / "my_family.py").write_text(textwrap.dedent('''
        from fisher.priors import PRIORS, PixelCNN
        @PRIORS.register("my_pixelcnn")
        class Mine(PixelCNN):
            pass
    '''))
    env = {**os.environ, "FISHER_PLUGINS": "my_family", "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-c", "from fisher.priors import PRIORS; print(PRIORS.names())"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert "my_pixelcnn" in out and "pixelcnn" in out
    bad = subprocess.run([sys.executable, "-c", "import fisher.priors"], env={**env, "FISHER_PLUGINS": "nope_mod"},
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "FISHER_PLUGINS: cannot import 'nope_mod'" in bad.stderr


@pytest.mark.parametrize("first", ["fisher.decoders", "fisher.priors", "fisher.embedding"])
def test_a_plugin_that_imports_both_families_loads_whichever_package_comes_first(first):
    """$FISHER_PLUGINS is imported when fisher.priors or fisher.decoders is; a plugin defining a prior and a
    decoder (tests/raycluster/toy_families.py) must find both packages whole, whatever a process imports
    first (a Ray Train worker of train-decoder starts with fisher.decoders, which reaches fisher.priors)."""
    from pathlib import Path
    env = {**os.environ, "FISHER_PLUGINS": "toy_families",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "raycluster"), os.environ.get("PYTHONPATH", "")])}
    code = (f"import {first}\nfrom fisher.decoders import DECODERS\nfrom fisher.priors import PRIORS\n"
            "assert 'toy_linear' in DECODERS and 'toy' in PRIORS, (DECODERS.names(), PRIORS.names())")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
