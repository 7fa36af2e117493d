"""The cluster environment of a run: the one Lightning would pick, found without starting MPI when
no MPI launcher started the process.

Lightning asks TorchElastic, SLURM, LSF and then MPI whether they launched the process, and the MPI
check imports ``mpi4py``, which initialises MPI to read its world size: 0.6 to 0.9 s of every run
on the H200 image, which has mpi4py (docs/performance.md), and a hang on some machines (Lightning
issue #20049). A process that no MPI launcher started has an MPI world of one, so Lightning would end
with its default ``LightningEnvironment``; lgen hands it that one and MPI is never asked.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from lightning.fabric.plugins.environments import (
    ClusterEnvironment,
    LightningEnvironment,
    LSFEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
)

# what an MPI launcher puts in each process's environment: Open MPI; PMI (MPICH and Hydra, Intel MPI,
# Cray, srun --mpi=pmi2); PMIx (Open MPI 5, srun --mpi=pmix); MVAPICH and its mpirun_rsh; HPE PALS;
# any srun step (SLURM_PROCID: an MPI built on Slurm's own PMI sets nothing else, and Lightning's SLURM
# check says no in an interactive job). Settings such as PMIX_MCA_gds or OMPI_MCA_*, which images set
# for every process (NVIDIA's do), are not launches.
MPI_LAUNCH_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMI_SIZE", "PMI_FD", "PMI_ID",
                        "PMI_PORT", "PMIX_RANK", "PMIX_NAMESPACE", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK",
                        "MPIRUN_RANK", "MPI_LOCALNRANKS", "PALS_RANKID", "SLURM_PROCID")


def without_mpi_probe(plugins: Any, strategy: Any = None) -> list[Any] | None:
    """The Trainer's ``plugins`` (one, or an iterable of them, as the Trainer takes), as a list, with
    ``LightningEnvironment`` added where Lightning would end up with it anyway: no environment given
    (as a plugin or on the strategy), no launcher (MPI, TorchElastic, SLURM, LSF) started the process."""
    listed = [] if plugins is None else list(plugins) if isinstance(plugins, Iterable) else [plugins]
    if (any(isinstance(p, ClusterEnvironment) for p in listed) or getattr(strategy, "cluster_environment", None)
            or any(name in os.environ for name in MPI_LAUNCH_VARIABLES)
            or any(env.detect() for env in (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment))):
        return listed or None
    return [*listed, LightningEnvironment()]
