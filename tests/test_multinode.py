"""Multi-node DP: 2 "nodes" x 1 process give the same parameters and epsilon as 2 processes on one node.

Three launches of the same job (tests/ddp_dp_job.py), run side by side:

* torchrun: two agents with the command line of docs/scale/README.md (`torchrun --nnodes 2 --node_rank R` with a
  c10d rendezvous; node 0 hosts the store on 127.0.0.1:<free port>); Lightning detects ``TorchElasticEnvironment``;
* SLURM: two tasks with the environment `srun` gives each task of `sbatch --nodes 2 --ntasks-per-node 1` (SLURM_*
  variables; no SLURM installation here, so the launcher itself is simulated); Lightning detects ``SLURMEnvironment``;
* one node: Lightning's own launcher starting 2 processes.

With ``insecure_testing_seed`` the sampling and noise streams depend only on the global rank, so all three layouts
must draw the same batches and the same noise, and end with the same parameters and epsilon.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_privacy_callback import rdp_epsilon

HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_command(node_rank: int, port: int, script: list[str]) -> list[str]:
    """`torchrun --nnodes 2 --nproc_per_node 1 --node_rank R --rdzv_backend c10d --rdzv_endpoint HOST:PORT ...`."""
    return [
        sys.executable, "-m", "torch.distributed.run",  # = the `torchrun` console script
        "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node_rank}",
        "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=dplit-test",
        f"--rdzv_conf=is_host={int(node_rank == 0)}",  # node 0 hosts the store (both nodes are 127.0.0.1 here)
        "--max_restarts=0", *script,
    ]  # fmt: skip


def srun_environment(rank: int, port: int) -> dict[str, str]:
    """What `srun` sets for task ``rank`` of `--nodes 2 --ntasks-per-node 1` (the variables Lightning reads)."""
    return {
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "dplit", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": "2", "SLURM_NODELIST": "127.0.0.1", "SLURM_PROCID": str(rank), "SLURM_NODEID": str(rank),
        "SLURM_LOCALID": "0", "MASTER_PORT": str(port),
    }  # fmt: skip


def _start(out: Path, args: list[str], cwd: Path, launcher: str) -> list[subprocess.Popen]:
    path = os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")])  # this checkout's dplit
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
    port = _free_port()
    script = [str(HERE / "ddp_dp_job.py"), str(out), *args]
    if launcher == "local":
        commands, envs = [[sys.executable, *script]], [env]
    elif launcher == "torchrun":
        commands, envs = [torchrun_command(rank, port, [*script, "2"]) for rank in (0, 1)], [env, env]
    else:
        commands = [[sys.executable, *script, "2"]] * 2
        envs = [dict(env, **srun_environment(rank, port)) for rank in (0, 1)]
    return [
        subprocess.Popen(cmd, cwd=cwd, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for cmd, e in zip(commands, envs, strict=True)
    ]


def _wait(procs: list[subprocess.Popen]) -> None:
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=600)[0].decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-4000:]


@pytest.mark.ddp
def test_two_nodes_by_torchrun_and_srun_equal_two_processes_on_one_node(tmp_path):
    args = ["2.0", "3", "bookkeeping", "dpsgd"]
    launchers = ("torchrun", "srun", "local")
    started = [_start(tmp_path / name, args, tmp_path, name) for name in launchers]
    for procs in started:
        _wait(procs)
    runs = {
        name: [torch.load(f"{tmp_path / name}.rank{r}.pt", weights_only=False) for r in range(2)] for name in launchers
    }
    local = runs["local"]
    assert {r["node_rank"] for r in local} == {0}
    for launcher, cluster in (("torchrun", "TorchElasticEnvironment"), ("srun", "SLURMEnvironment")):
        nodes = runs[launcher]
        assert {r["cluster"] for r in nodes} == {cluster}  # Lightning really read the launcher's environment
        assert sorted(r["node_rank"] for r in nodes) == [0, 1] and all(r["world_size"] == 2 for r in nodes)
        for n, lo in zip(nodes, local, strict=True):
            assert len(n["steps"]) == len(lo["steps"]) == 3
            for sn, sl in zip(n["steps"], lo["steps"], strict=True):
                for a, b in zip(sn["batch"], sl["batch"], strict=True):  # the same Poisson draws, rank for rank
                    torch.testing.assert_close(a, b)
                torch.testing.assert_close(sn["after"], sl["after"])  # the same noisy updates
            assert n["accountant_steps"] == lo["accountant_steps"] == 3
            assert n["epsilon"] == lo["epsilon"] == pytest.approx(rdp_epsilon(0.1, 2.0, 3, 1e-3), rel=0.01)
        torch.testing.assert_close(nodes[0]["steps"][-1]["after"], nodes[1]["steps"][-1]["after"])  # in sync
