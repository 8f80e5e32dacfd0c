"""A real single-node SLURM cluster on this machine, for tests: Debian's slurm-wlm and munge,
installed with apt-get when missing, configured in a temporary folder on free ports, started
without systemd and stopped afterwards. Needs root."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from launching import reserved_ports


class SlurmUnavailable(RuntimeError):
    pass


def install() -> None:
    """apt-get install slurm-wlm and munge, unless their daemons are already here."""
    if shutil.which("slurmctld") and shutil.which("munged"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable("slurm-wlm is not installed and apt-get as root is not available")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "slurm-wlm", "munge"]):
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(command)} failed: {result.stderr[-2000:]}")


def munge_works() -> bool:
    encoded = subprocess.run(["munge", "-n"], capture_output=True)
    return (
        encoded.returncode == 0
        and subprocess.run(["unmunge"], input=encoded.stdout).returncode == 0
    )


def slurm_conf(folder: Path, host: str, cpus: int, ports: list[int]) -> str:
    return f"""ClusterName=tessera-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
SlurmUser=root
AuthType=auth/munge
# Requeued jobs wait out the credential lifetime (default 120 s) before they run again.
AuthInfo=cred_expire=10
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """slurmctld + slurmd (and munged when none runs) with their own config in `folder`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.conf = folder / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._pid_files: list[Path] = []

    def start(self) -> SlurmCluster:
        install()
        for sub in ("state", "spool"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        if not munge_works():
            self._start_munged()
        with reserved_ports(2) as ports:  # held until the daemons listen on them
            host, cpus = socket.gethostname(), os.cpu_count() or 1
            self.conf.write_text(slurm_conf(self.folder, host, cpus, ports))
            for daemon in ("slurmctld", "slurmd"):
                command = [f"/usr/sbin/{daemon}", "-f", str(self.conf)]
                subprocess.run(command, env=self.env, check=True)
                self._pid_files.append(self.folder / f"{daemon}.pid")
            self._wait_idle()
        return self

    def _start_munged(self) -> None:
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
        self._pid_files.append(Path("/run/munge/munged.pid"))

    def _wait_idle(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.2)
        raise RuntimeError(f"the SLURM node is not idle after {timeout} s (sinfo: {state!r})")

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(command, env=self.env, capture_output=True, text=True)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {result.stderr}")
        return result

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as key=value pairs (empty once the job is forgotten)."""
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def stop(self) -> None:
        for pid_file in reversed(self._pid_files):  # slurmd, slurmctld, then munged
            if pid_file.exists():
                pid = int(pid_file.read_text().split()[0])
                subprocess.run(["kill", str(pid)], check=False)
                _wait_gone(pid)


def _wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.1)
