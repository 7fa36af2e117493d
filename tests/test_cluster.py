"""A run that no MPI launcher started never starts MPI: lgen hands Lightning the environment it would
pick (importing mpi4py initialises MPI, about a second, or a hang); any launch is left to Lightning."""

from __future__ import annotations

import os
import sys
import types

import pytest
from conftest import base_args, lgen, read
from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment
from lightning.pytorch import Trainer
from lightning.pytorch.plugins import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lgen.api import LLM
from lgen.cluster import MPI_LAUNCH_VARIABLES, without_mpi_probe


@pytest.fixture
def mpi_asked(monkeypatch) -> list[int]:
    """An installed mpi4py with a world of one, and how often it was asked for its size; no launcher
    variables (MPI, SLURM, TorchElastic) in the environment."""
    asked: list[int] = []

    class World:
        def Get_size(self) -> int:
            asked.append(1)
            return 1

    mpi4py = types.ModuleType("mpi4py")
    mpi4py.MPI = types.SimpleNamespace(COMM_WORLD=World())
    monkeypatch.setitem(sys.modules, "mpi4py", mpi4py)
    monkeypatch.setattr("lightning.fabric.plugins.environments.mpi._MPI4PY_AVAILABLE", True)
    for name in list(os.environ):
        if name in MPI_LAUNCH_VARIABLES or name.startswith(("SLURM_", "LSB_", "JSM_", "TORCHELASTIC_")):
            monkeypatch.delenv(name)
    return asked


def test_lightning_alone_asks_mpi(mpi_asked):
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    assert mpi_asked == [1] and type(trainer.strategy.cluster_environment) is LightningEnvironment


def test_lgen_predict_and_the_api_do_not(mpi_asked, tiny_model, code_jsonl, tmp_path):
    assert lgen(*base_args(tiny_model, code_jsonl, tmp_path / "cli")) == 0
    assert len(read(tmp_path / "cli")) == len(code_jsonl.read_text().splitlines())
    records = LLM(str(tiny_model), max_new_tokens=8, trainer={"accelerator": "cpu"}).generate(["int f() {"])
    assert len(records) == 1
    assert mpi_asked == []


def test_the_same_environment_lightning_would_pick(mpi_asked):
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, plugins=without_mpi_probe(None))
    assert type(trainer.strategy.cluster_environment) is LightningEnvironment and mpi_asked == []


@pytest.mark.parametrize("variable", MPI_LAUNCH_VARIABLES)
def test_an_mpi_launch_is_left_to_lightning(mpi_asked, monkeypatch, variable):
    monkeypatch.setenv("PMIX_MCA_gds", "hash")  # a setting, not a launch
    monkeypatch.setenv("OMPI_MCA_coll_hcoll_enable", "0")
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, plugins=without_mpi_probe(None))
    assert mpi_asked == [] and type(trainer.strategy.cluster_environment) is LightningEnvironment
    monkeypatch.setenv(variable, "1")
    assert without_mpi_probe(None) is None
    Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, plugins=without_mpi_probe(None))
    assert mpi_asked == [1]


def test_plugins_are_kept_in_any_form_the_trainer_takes(mpi_asked):
    precision = Precision()
    for given in (precision, [precision], (precision,), iter([precision])):
        plugins = without_mpi_probe(given)
        assert plugins[0] is precision and type(plugins[1]) is LightningEnvironment and len(plugins) == 2
    assert type(without_mpi_probe(None, DDPStrategy())[0]) is LightningEnvironment  # a strategy without one


def test_given_environments_and_other_launchers_are_left_to_lightning(mpi_asked, monkeypatch):
    slurm = SLURMEnvironment(auto_requeue=False)
    assert without_mpi_probe(slurm) == [slurm] and without_mpi_probe((slurm,)) == [slurm]
    with pytest.raises(MisconfigurationException, match="set through both"):  # Lightning's own check stays
        Trainer(accelerator="cpu", devices=2, logger=False, plugins=without_mpi_probe(slurm),
                strategy=DDPStrategy(cluster_environment=LightningEnvironment()))
    assert without_mpi_probe(None, DDPStrategy(cluster_environment=LightningEnvironment())) is None
    for launch in ({"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "lgen"}, {"TORCHELASTIC_RUN_ID": "1"},
                   {"LSB_JOBID": "1", "LSB_DJOB_RANKFILE": "f", "JSM_NAMESPACE_LOCAL_RANK": "0",
                    "JSM_NAMESPACE_SIZE": "1"}):
        with monkeypatch.context() as env:
            for name, value in launch.items():
                env.setenv(name, value)
            assert without_mpi_probe(None) is None, launch
    assert mpi_asked == []
