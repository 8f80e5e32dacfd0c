"""One live run per run directory.

Global rank 0 claims the run directory before any work, so a second start on a directory in use
stops at once, naming the host and process that hold it, instead of training beside the first
and mixing their checkpoints and metrics. Other ranks do not take part.

The claim is made for a filesystem that several nodes share, where flock is unreliable (NFS):
- claims are files <run_dir>/owner/claim_<n>.json, and the highest n holds. A claim is written
  whole to a file of its own, then hard-linked to its name: link fails when the name exists, so
  of two starters that race for the same n, one wins and the other looks again;
- the holder rewrites its claim every HEARTBEAT_S seconds and marks it released at exit;
- a claim no longer holds once released; on its own host, once its process is gone (the pid and
  the process's start time, so a reused pid is not taken for it); on another host, once its
  heartbeat is older than STALE_AFTER_S (the hosts' clocks must agree to well within that); and
  when it was made by an earlier attempt of this same run (a torchrun restart, a SLURM requeue),
  which may have died on another node. A claim that no longer holds is taken over with n + 1.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from train.runtime import launch_env

HEARTBEAT_S = 30.0
STALE_AFTER_S = 120.0
# Schedulers that restart a run under one id: (id variable, restart count variable).
ATTEMPT_COUNTERS = {
    "slurm": ("SLURM_JOB_ID", "SLURM_RESTART_COUNT"),
    "torchrun": ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"),
}


class RunDirectoryInUse(RuntimeError):
    pass


@dataclass(frozen=True)
class Claim:
    host: str
    pid: int
    process_start: int | None  # clock ticks after boot (/proc/<pid>/stat); tells reused pids apart
    started: float  # unix time
    heartbeat: float  # unix time of the last refresh
    attempts: dict[str, list]  # scheduler -> [run id, restart count], as ATTEMPT_COUNTERS reads
    released: bool = False


def process_start(pid: int) -> int | None:
    """When the process started, in clock ticks after boot; None when there is no such process.
    Without /proc (macOS), 0 for any live process: there the pid alone identifies it."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # another user's live process
    return 0


def this_process() -> Claim:
    attempts = {
        scheduler: [os.environ[run_id], int(os.environ.get(count, 0))]
        for scheduler, (run_id, count) in ATTEMPT_COUNTERS.items()
        if run_id in os.environ
    }
    now = time.time()
    pid = os.getpid()
    return Claim(socket.gethostname(), pid, process_start(pid), now, now, attempts)


def earlier_attempt(claim: Claim, mine: Claim) -> bool:
    """Made by an earlier attempt of the run `mine` belongs to (that attempt has ended)."""
    return any(
        claim.attempts.get(scheduler, [None])[0] == run_id and claim.attempts[scheduler][1] < count
        for scheduler, (run_id, count) in mine.attempts.items()
    )


def holds(claim: Claim, mine: Claim, now: float) -> bool:
    """Whether `claim` still holds against a start described by `mine`."""
    if claim.released or earlier_attempt(claim, mine):
        return False
    if claim.host == mine.host:
        return process_start(claim.pid) == claim.process_start
    return now - claim.heartbeat < STALE_AFTER_S


def claim_run_dir(run_dir: Path) -> None:
    """Make this process (global rank 0) the owner of `run_dir` until it exits, or raise
    RunDirectoryInUse naming the live run that owns it."""
    if launch_env()[0] != 0:
        return
    folder = run_dir / "owner"
    folder.mkdir(parents=True, exist_ok=True)
    mine = this_process()
    while True:
        numbers = sorted(int(path.stem.split("_")[1]) for path in folder.glob("claim_*.json"))
        latest = numbers[-1] if numbers else 0
        held = read_claim(claim_path(folder, latest)) if latest else None
        if held is not None:
            same_process = (held.host, held.pid) == (mine.host, mine.pid)  # an earlier run()
            if not same_process and holds(held, mine, time.time()):
                raise RunDirectoryInUse(in_use_message(run_dir, held))
        path = claim_path(folder, latest + 1)
        if create(path, mine):
            break
    for number in numbers:  # claims that no longer hold
        claim_path(folder, number).unlink(missing_ok=True)
    keep_alive(path, mine)


def in_use_message(run_dir: Path, held: Claim) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.started))
    return (
        f"{run_dir} is in use by the run of pid {held.pid} on host {held.host} (started "
        f"{started}, last seen {time.time() - held.heartbeat:.0f} s ago). Stop that run or "
        f"choose another train.run_dir; a run that died on another host is taken over once "
        f"it has been silent for {STALE_AFTER_S:.0f} s."
    )


def claim_path(folder: Path, number: int) -> Path:
    return folder / f"claim_{number:08d}.json"


def read_claim(path: Path) -> Claim | None:
    """The claim in `path`; None when a new owner has just removed it."""
    try:
        return Claim(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as error:
        raise RunDirectoryInUse(
            f"the run directory's claim {path} is unreadable ({error}); delete it if no run "
            f"uses this directory"
        ) from error


def write_whole(path: Path, claim: Claim) -> Path:
    """`claim` in a new file beside `path`, complete before anyone can see it under `path`."""
    temporary = path.with_name(f".{path.name}.{claim.host}.{claim.pid}.{time.monotonic_ns()}")
    temporary.write_text(json.dumps(asdict(claim)))
    return temporary


def create(path: Path, claim: Claim) -> bool:
    """Publish `claim` as `path` unless that name exists (another starter got there first)."""
    temporary = write_whole(path, claim)
    try:
        os.link(temporary, path)
        return True
    except FileExistsError:
        return False
    finally:
        temporary.unlink()


def refresh(path: Path, claim: Claim) -> None:
    os.replace(write_whole(path, claim), path)


def keep_alive(path: Path, claim: Claim) -> None:
    """Refresh the claim's heartbeat until the process exits, then mark it released. A later
    run() of this process that claims the directory again ends the previous heartbeat."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S) and path.exists():
            try:
                refresh(path, replace(claim, heartbeat=time.time()))
            except OSError as error:  # a passing filesystem error: the next beat tries again
                warnings.warn(f"could not refresh {path}: {error}", stacklevel=1)

    def release() -> None:
        stop.set()
        heartbeat.join()
        if path.exists():
            refresh(path, replace(claim, heartbeat=time.time(), released=True))

    heartbeat = threading.Thread(target=beat, name=f"claim of {path.parent.parent}", daemon=True)
    heartbeat.start()
    atexit.register(release)
