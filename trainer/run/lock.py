"""One training per run directory: `RUN/lock.json`, held by the main process for the run's whole life.

Why this mechanism: clusters keep run directories on NFS or Lustre, where `flock`/`fcntl` locks are
unreliable (not forwarded, or lost silently when a client reconnects). Creating a file with `O_CREAT | O_EXCL`
is atomic on local filesystems, NFSv3+ and Lustre: exactly one of two simultaneous starts creates it. The file
holds who holds it (host, PID, the process's start time, since when, the SLURM job), and a daemon thread of the
holder touches it every `heartbeat` seconds. A lock is stale, and the next start takes it over, when

- its holder ran on this host (in this PID namespace) and that process is gone, or its PID now belongs to
  another process: a holder killed by SIGKILL never blocks the next start (a live one on this host always holds);
- it holds this SLURM job's id from an earlier run of the job (another restart count): a requeued job takes
  over from its predecessor, which Slurm has ended before requeueing;
- its heartbeat is older than `stale_after` seconds (measured against the filesystem's own clock, so skewed
  node clocks do not matter): a holder on another host that died.

Taking over renames the stale file to a unique name first (one rename wins), so two starts never both take
over one stale lock. The holder's heartbeat also checks that the file still names it; if another start took it
over (a heartbeat stalled past `stale_after`), the holder stops at the next step without writing.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import UserError

LOCK_FILE = "lock.json"


@dataclass
class Holder:
    """Who holds a run directory: what `lock.json` records."""

    host: str
    pid: int
    since: float                      # Unix time of acquisition
    token: str                        # random: tells this holder from any other with the same host and PID
    pid_start: str | None = None      # the process's start time on its host (/proc), against PID reuse
    pid_ns: str | None = None         # its PID namespace (containers on one host share the host name)
    heartbeat: float = 30.0           # seconds between the holder's touches of the file
    slurm_job_id: str | None = None
    slurm_restart_count: str | None = None

    @staticmethod
    def of_this_process(heartbeat: float) -> "Holder":
        """The holder record of this process (host, PID and its start, namespace, SLURM job) with a new token."""
        return Holder(host=socket.gethostname(), pid=os.getpid(), since=time.time(), token=secrets.token_hex(8),
                      pid_start=process_start(os.getpid()), pid_ns=pid_namespace(), heartbeat=heartbeat,
                      slurm_job_id=os.environ.get("SLURM_JOB_ID"),
                      slurm_restart_count=os.environ.get("SLURM_RESTART_COUNT", "0"))

    def as_dict(self) -> dict:
        """The record as JSON-ready values, with the acquisition time also in UTC text."""
        return {"host": self.host, "pid": self.pid, "since": self.since, "token": self.token,
                "pid_start": self.pid_start, "pid_ns": self.pid_ns, "heartbeat": self.heartbeat,
                "slurm_job_id": self.slurm_job_id, "slurm_restart_count": self.slurm_restart_count,
                "since_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))}

    @staticmethod
    def parse(text: str) -> "Holder | None":
        """The holder a lock file names, or None when it is empty or garbled (a start that died mid-write)."""
        try:
            data = json.loads(text)
            return Holder(host=str(data["host"]), pid=int(data["pid"]), since=float(data["since"]),
                          token=str(data["token"]), pid_start=data.get("pid_start"), pid_ns=data.get("pid_ns"),
                          heartbeat=float(data.get("heartbeat", 30.0)), slurm_job_id=data.get("slurm_job_id"),
                          slurm_restart_count=data.get("slurm_restart_count"))
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        """The holder in words for messages: host, PID, SLURM job, since when."""
        job = f", SLURM job {self.slurm_job_id}" if self.slurm_job_id else ""
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        return f"host {self.host}, PID {self.pid}{job}, since {since}"


def process_start(pid: int) -> str | None:
    """The start time of process `pid` on this host (Linux: field 22 of /proc/PID/stat), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # fields after the command name; starttime is field 22


def pid_namespace() -> str | None:
    """This process's PID namespace (Linux), so PIDs are compared only where they mean the same process."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def process_alive(pid: int) -> bool:
    """True if a process with this PID exists on this host (even if owned by another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


class RunLock:
    """The lock of one run directory, held by this process. `acquire` takes it; `release` gives it back."""

    def __init__(self, path: Path, holder: Holder):
        self.path, self.holder = path, holder
        self.lost: str | None = None   # set by the heartbeat when another start took the lock over
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def acquire(run_dir: Path, stale_after: float = 300.0, log=None) -> "RunLock":
        """Take `RUN/lock.json`, taking over a stale one; UserError naming the holder when it is held."""
        path = Path(run_dir) / LOCK_FILE
        heartbeat = max(1.0, min(30.0, stale_after / 4))
        me = Holder.of_this_process(heartbeat)
        for _ in range(3):
            if _create(path, me):
                lock = RunLock(path, me)
                lock._start_heartbeat()
                return lock
            text, modified = _read(path)
            if text is None:
                continue  # released meanwhile: try again
            holder = Holder.parse(text)
            reason = stale_reason(holder, modified, _filesystem_now(path.parent), stale_after, me)
            if reason is None:
                who = holder.describe() if holder else "a start still writing its lock"
                raise UserError(f"run directory '{run_dir}' is in use by another training ({who}); wait for it "
                                f"to end or stop it (touch {Path(run_dir) / 'STOP'}), or use another --run-dir")
            if _take_over(path, text) and log is not None:
                log(f"took over the run directory from a stale lock ({holder.describe() if holder else 'unreadable'}"
                    f": {reason})")
        raise UserError(f"run directory '{run_dir}' is being taken over by another start; try again")

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="run-dir-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.holder.heartbeat):
            text, _ = _read(self.path)
            holder = Holder.parse(text) if text is not None else None
            if holder is None or holder.token != self.holder.token:
                self.lost = holder.describe() if holder else "nobody (the lock file was removed)"
                return
            try:
                os.utime(self.path)  # the heartbeat: NFS sets the server's time
            except OSError:
                pass  # a full or flaky filesystem: the next beat tries again

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it still names this process."""
        self._stop.set()
        text, _ = _read(self.path)
        holder = Holder.parse(text) if text is not None else None
        if holder is not None and holder.token == self.holder.token:
            self.path.unlink(missing_ok=True)


def stale_reason(holder: Holder | None, modified: float, now: float, stale_after: float,
                 me: Holder) -> str | None:
    """Why a lock held by `holder` (file last touched at `modified`, filesystem time `now`) is stale, or None
    when it is live. `me` is the starting process."""
    age = now - modified
    if holder is None:
        return f"unreadable for {age:.0f} s" if age > stale_after else None
    if holder.host == me.host and holder.pid_ns == me.pid_ns:  # PIDs mean the same processes here
        if not process_alive(holder.pid):
            return f"process {holder.pid} is gone"
        if holder.pid_start is not None and process_start(holder.pid) not in (None, holder.pid_start):
            return f"PID {holder.pid} now belongs to another process"
        return None  # a live process on this host holds it, however long its heartbeat has been silent
    if holder.slurm_job_id is not None and holder.slurm_job_id == me.slurm_job_id \
            and holder.slurm_restart_count != me.slurm_restart_count:
        return f"SLURM job {holder.slurm_job_id} was requeued (restart {me.slurm_restart_count})"
    if age > max(stale_after, 3 * holder.heartbeat):
        return f"no heartbeat for {age:.0f} s"
    return None


def _create(path: Path, holder: Holder) -> bool:
    """Atomically create the lock file holding `holder`; False when it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        json.dump(holder.as_dict(), handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    return True


def _read(path: Path) -> tuple[str | None, float]:
    """(text, modification time) of the lock file, or (None, 0) when there is none."""
    try:
        with open(path, "rb") as handle:
            modified = os.fstat(handle.fileno()).st_mtime
            return handle.read(1 << 16).decode("utf-8", errors="replace"), modified
    except FileNotFoundError:
        return None, 0.0


def _filesystem_now(folder: Path) -> float:
    """The current time by the clock that stamps files in `folder` (the file server's, on NFS)."""
    probe = folder / f".lock-clock-{socket.gethostname()}-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        return probe.stat().st_mtime
    except OSError:
        return time.time()
    finally:
        probe.unlink(missing_ok=True)


def _take_over(path: Path, seen: str) -> bool:
    """Remove the stale lock whose text was `seen`. The rename makes one start the winner; a start that renamed a
    lock other than the one it judged (another start's fresh lock) puts it back."""
    grave = path.with_name(f".{path.name}.stale-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.rename(path, grave)
    except FileNotFoundError:
        return False  # another start took it over first
    text, _ = _read(grave)
    if text != seen:
        try:
            os.link(grave, path)  # fails if a third start holds the path now; its heartbeat sorts that out
        except OSError:
            pass
        grave.unlink(missing_ok=True)
        return False
    grave.unlink(missing_ok=True)
    return True
