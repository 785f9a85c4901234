"""Every launcher docs/where-it-runs.md shows, run for real on CPU (gloo): torchrun, two accelerate "nodes" on
loopback, the SLURM script under a fake SLURM (scontrol and srun as shell scripts on PATH), and every
accelerate config in launch/ read by accelerate's own loader. Each 2-rank run must end with the
checkpoint a 2-process `accelerate launch` on one machine ends with."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, accelerate_command, assert_same_checkpoint, free_port

LAUNCH = REPO / "launch"


def train_args(shards: Path, out: Path) -> list[str]:
    # dropout and a DataLoader worker: each rank's RNG and stream position reach the checkpoint
    return ["train", "configs/digits/fixmatch.yaml", f"data.shards={shards}", f"train.output_dir={out}", "data.batch_size=20",
            "data.unlabeled_batch_ratio=2", "train.epochs=2", "train.steps_per_epoch=3", "data.workers=1", "model.dropout=0.3"]


def run(command: list[str], env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {})))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def finished(out: Path, world: int = 2) -> Path:
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == world and results["launch"]["distributed_type"] == "MULTI_CPU", results
    return out / "checkpoints" / "step-6"


@pytest.fixture(scope="module")
def one_machine(digits_shards, tmp_path_factory) -> Path:
    """The reference: `accelerate launch --multi_gpu --num_processes 2` on one machine."""
    out = tmp_path_factory.mktemp("one_machine") / "run"
    run(accelerate_command(2, *train_args(digits_shards, out)))
    return finished(out)


@pytest.mark.slow
def test_torchrun_trains_like_accelerate_launch(digits_shards, tmp_path, one_machine):
    """docs/where-it-runs.md: torchrun --nproc_per_node 2 -m dist_ssl train CONFIG ..."""
    out = tmp_path / "run"
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "dist_ssl", *train_args(digits_shards, out)])
    assert_same_checkpoint(one_machine, finished(out))


@pytest.mark.slow
def test_two_machines_on_loopback_form_one_group(digits_shards, tmp_path, one_machine):
    """Two `accelerate launch --num_machines 2` commands, one rank each, as on two nodes (docs/where-it-runs.md)."""
    out, port = tmp_path / "run", str(free_port())
    machines = [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2", "--num_processes", "2",
         "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port,
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dist_ssl", *train_args(digits_shards, out)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
    ) for rank in (0, 1)]
    for machine in machines:
        output, _ = machine.communicate(timeout=600)
        assert machine.returncode == 0, output[-4000:]
    assert_same_checkpoint(one_machine, finished(out))


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def fake_slurm(bin_dir: Path, log: Path) -> None:
    """scontrol answers `show hostnames` and records `requeue`; srun starts SLURM_NTASKS local tasks
    with SLURM_PROCID/SLURM_LOCALID set (or exits FAKE_SRUN_EXIT without starting any) and returns
    their highest exit code, as srun does."""
    bin_dir.mkdir()
    executable(bin_dir / "scontrol", f"""#!/bin/bash
echo "scontrol $*" >> {log}
if [ "$1 $2" = "show hostnames" ]; then printf 'localhost\\nnode-b\\n'; fi
""")
    executable(bin_dir / "srun", f"""#!/bin/bash
echo "srun $*" >> {log}
while [[ "$1" == --* ]]; do shift; done
if [ -n "${{FAKE_SRUN_EXIT:-}}" ]; then exit "$FAKE_SRUN_EXIT"; fi
pids=()
for ((task = 0; task < SLURM_NTASKS; task++)); do
    SLURM_PROCID=$task SLURM_LOCALID=$task "$@" &
    pids+=($!)
done
code=0
for pid in "${{pids[@]}}"; do wait "$pid"; c=$?; (( c > code )) && code=$c; done
exit $code
""")


def slurm_env(bin_dir: Path, job_id: int, python: Path) -> dict:
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": str(job_id), "SLURM_JOB_NODELIST": "localhost,node-b",
            "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NUM_NODES": "1", "PYTHON": str(python)}


def slurm_job_id() -> int:
    """A job id whose port (train.sbatch: 20000 + id % 20000) is free here."""
    for _ in range(100):
        port = free_port()
        if 20000 <= port < 40000:
            return 100000 + port - 20000
    pytest.skip("no free port in 20000-39999")


@pytest.mark.slow
def test_the_slurm_script_sets_ranks_and_the_address_and_requeues_on_75(digits_shards, tmp_path, one_machine):
    log = tmp_path / "calls.log"
    fake_slurm(tmp_path / "bin", log)
    # each rank records the environment train.sbatch gave it, then runs dist-ssl
    python = executable(tmp_path / "python", f"""#!/bin/bash
echo "rank $RANK local $LOCAL_RANK world $WORLD_SIZE local_world $LOCAL_WORLD_SIZE master $MASTER_ADDR:$MASTER_PORT" >> {tmp_path}/ranks.log
exec {sys.executable} "$@"
""")
    job_id = slurm_job_id()
    out = tmp_path / "run"
    script = str(LAUNCH / "slurm" / "train.sbatch")
    done = run(["bash", script, *train_args(digits_shards, out)[1:]], env=slurm_env(tmp_path / "bin", job_id, python))
    port = 20000 + job_id % 20000
    assert f"2 ranks on 1 node(s), master localhost:{port}" in done.stderr
    assert sorted((tmp_path / "ranks.log").read_text().splitlines()) == [
        f"rank {r} local {r} world 2 local_world 2 master localhost:{port}" for r in (0, 1)]
    assert_same_checkpoint(one_machine, finished(out))
    assert "requeue" not in log.read_text()

    # the ranks committed a checkpoint and exited 75: the script requeues its job and passes 75 on
    stopped = subprocess.run(["bash", script, "configs/digits/fixmatch.yaml"], cwd=REPO, capture_output=True, text=True, timeout=60,
                             env=dict(os.environ, FAKE_SRUN_EXIT="75", **slurm_env(tmp_path / "bin", job_id, python)))
    assert stopped.returncode == 75
    assert log.read_text().splitlines()[-1] == f"scontrol requeue {job_id}"
    crashed = subprocess.run(["bash", script, "configs/digits/fixmatch.yaml"], cwd=REPO, capture_output=True, text=True, timeout=60,
                             env=dict(os.environ, FAKE_SRUN_EXIT="1", **slurm_env(tmp_path / "bin", job_id, python)))
    assert crashed.returncode == 1 and log.read_text().count("requeue") == 1


@pytest.mark.parametrize("path", sorted((LAUNCH / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_every_accelerate_config_loads_with_accelerates_own_loader(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    assert DistributedType(config.distributed_type) in (DistributedType.MULTI_GPU, DistributedType.DEEPSPEED)
    assert config.num_processes >= 1 and config.num_machines >= 1 and config.num_processes % config.num_machines == 0
    if config.distributed_type == DistributedType.DEEPSPEED:
        assert config.deepspeed_config["zero_stage"] == 2  # the stage dist-ssl supports (engine/accelerator.py)


def test_every_file_in_launch_is_checked():
    """A new launcher gets a test above: the accelerate configs load, the SLURM script runs."""
    files = sorted(str(p.relative_to(LAUNCH)) for p in LAUNCH.rglob("*") if p.is_file())
    assert [f for f in files if not f.startswith("accelerate/") or not f.endswith(".yaml")] == ["slurm/train.sbatch"]
