"""A real, private, single-node SLURM cluster for tests (no mocks).

``slurm_cluster(root)`` is a context manager that

1. installs Debian's ``slurmctld``, ``slurmd``, ``slurm-client`` and ``munge`` with apt when
   they are missing (root only),
2. takes a machine-wide lock (one test cluster at a time) and clears what a crashed earlier
   run may have left,
3. makes sure a ``munged`` answers (starting one as the ``munge`` user when none does),
4. writes ``slurm.conf`` (and ``gres.conf`` for stand-in GPUs) into ``root``, starts
   ``slurmctld`` and a configless ``slurmd`` in the foreground as our own child processes
   (there is no systemd here), and waits until the node is idle,
5. yields a :class:`SlurmCluster`; run every SLURM command, and Snakemake, with its ``env``,
6. on exit, even after an error: cancels all jobs, stops the daemons by their PIDs, kills
   every process that still carries this cluster's marker variable (slurmstepd and job
   processes left behind), and stops ``munged`` if it started it.

Nothing is written to ``/etc/slurm``. The configuration lives in ``root``; the client
commands find it through ``SLURM_CONF``, and the job steps (which lose ``SLURM_CONF``, see
the configless comment in the config) through the ``/run/slurm/conf`` link that slurmd
maintains and teardown removes. Ports are picked free at start, so no clash with an
earlier run.

Where the cluster cannot be had at all (not root, apt cannot reach the Debian archive,
another SLURM is configured on the machine) it raises :class:`SlurmUnavailable`; a test
turns that into a skip. Any other failure (a daemon that does not start, a node that never
becomes idle) raises :class:`SlurmError` with the daemons' log tails: that is a bug to see.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# The Debian 12 packages that make a one-node cluster: controller, node daemon, the client
# commands (sbatch, squeue, srun, scontrol, sinfo, sacct) and the authentication daemon.
DEBIAN_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
SBIN = Path("/usr/sbin")
MUNGE_SOCKET_DIR = Path("/run/munge")
MUNGE_KEY = Path("/etc/munge/munge.key")
PARTITION = "debug"
CLUSTER_NAME = "convflat-test"
DEFAULT_CONF = Path("/etc/slurm/slurm.conf")
CONFIGLESS_LINK = Path("/run/slurm/conf")
# Environment variable (value: the cluster's root dir) that every process of one cluster
# inherits: daemons, slurmstepd, batch scripts, job steps. Teardown kills by it. SLURM_CONF
# would not do: the Snakemake jobstep plugin removes SLURM_* variables before its srun.
MARKER = "CONVFLAT_TEST_SLURM"
# One private cluster per machine at a time (pytest-xdist may run two SLURM tests at once):
# they would share munged and /run/slurm/conf. The kernel drops the lock if we die.
LOCK_FILE = Path("/run/lock/convflat-slurm-test.lock")
SPOOL_PREFIX = "convflat-slurmd-"
# Character devices that stand in for GPUs: SLURM wants one device file per GPU, and
# never opens it; CUDA does not see them.
FAKE_GPU_FILES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")


class SlurmUnavailable(RuntimeError):
    """This machine cannot run a SLURM cluster (not root, or packages unreachable)."""


class SlurmError(RuntimeError):
    """The cluster could be installed but misbehaved; the message carries the logs."""


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _run(cmd: list[str], *, env: dict | None = None, timeout: float = 60, check: bool = True,
         input: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          input=input, check=False)
    if check and proc.returncode != 0:
        raise SlurmError(
            f"`{' '.join(cmd)}` exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"<no {path}: {exc}>"
    return f"--- last {min(lines, len(text))} lines of {path} ---\n" + "\n".join(text[-lines:])


def _free_ports(n: int) -> list[int]:
    """n distinct TCP ports that are free now (held open together, so they differ)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _node_hardware() -> tuple[int, int]:
    """(CPUs, RealMemory in MB) as slurmd itself detects them (`slurmd -C`).

    slurmd marks a node invalid if the configuration promises more than it finds, and
    os.cpu_count() may count CPUs this container cannot use; so ask slurmd.
    """
    out = _run([str(SBIN / "slurmd"), "-C"], timeout=30).stdout
    cpus = re.search(r"\bCPUs=(\d+)", out)
    memory = re.search(r"\bRealMemory=(\d+)", out)
    if not (cpus and memory):
        raise SlurmError(f"cannot read CPUs and RealMemory from `slurmd -C`:\n{out}")
    return int(cpus.group(1)), int(memory.group(1))


def _is_root() -> bool:
    return os.geteuid() == 0


def _stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL. Only ever our own child."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=10)


def _pids_with_env(key: str, value: str | None) -> list[int]:
    """PIDs of processes whose environment has ``key=value`` (any value if None).

    Every process that belongs to one of our clusters carries that cluster's unique
    ``SLURM_CONF`` path: the daemons (we start them with it), the slurmstepd they fork, the
    job scripts (sbatch --export=ALL) and the steps srun starts. So this finds exactly our
    leftovers, never another user's SLURM or munge processes.
    """
    needle = f"{key}={value}".encode() if value is not None else f"{key}=".encode()
    me = os.getpid()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue  # gone, or a kernel thread
        variables = environ.split(b"\0")
        if (needle in variables if value is not None
                else any(v.startswith(needle) for v in variables)):
            pids.append(int(entry.name))
    return pids


def _unix_socket_paths() -> dict[str, str]:
    """{"socket:[inode]": path} for the machine's named unix sockets."""
    paths = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 8:
                paths[f"socket:[{fields[6]}]"] = fields[7]
    return paths


def _slurmstepd_pids(belongs) -> list[int]:
    """PIDs of slurmstepd processes with an open file or socket path p where belongs(p).

    slurmstepd rewrites its environment (its process title lives there), so the marker
    does not find it. Its open files do: the cluster's slurmd.log and its unix socket in the
    cluster's spool directory.
    """
    sockets = _unix_socket_paths()
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or (entry / "comm").read_text().strip() != "slurmstepd":
                continue
            targets = [os.readlink(fd) for fd in (entry / "fd").iterdir()]
        except OSError:
            continue
        paths = [sockets.get(t, t).removesuffix(" (deleted)") for t in targets]
        if any(path.startswith("/") and belongs(Path(path)) for path in paths):
            pids.append(int(entry.name))
    return pids


def _is_test_cluster_file(path: Path) -> bool:
    """path is <root>/log/... or <spool>/... of a cluster that slurm_cluster() wrote."""
    for conf in (path.parent.parent / "slurm.conf", path.parent / "conf-cache" / "slurm.conf"):
        with contextlib.suppress(OSError):
            if f"ClusterName={CLUSTER_NAME}\n" in conf.read_text():
                return True
    return False


def _kill_all(find_pids, grace: float = 5.0) -> list[int]:
    """SIGTERM what find_pids() returns, wait up to grace s, SIGKILL the rest; their PIDs."""
    pids = find_pids()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and find_pids():
        time.sleep(0.2)
    for pid in find_pids():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return pids


def cluster_pids(root: Path, spool: Path | None = None) -> list[int]:
    """Every live process of the test cluster in root: marked ones and its slurmstepd."""
    dirs = [str(d) + "/" for d in (root, spool) if d is not None]
    return sorted(set(_pids_with_env(MARKER, str(root)))
                  | set(_slurmstepd_pids(lambda p: str(p).startswith(tuple(dirs)))))


# --------------------------------------------------------------------------------------
# installation and munge
# --------------------------------------------------------------------------------------


def _missing_binaries() -> list[str]:
    wanted = [SBIN / "slurmctld", SBIN / "slurmd", SBIN / "munged", Path("/usr/bin/sbatch"),
              Path("/usr/bin/squeue"), Path("/usr/bin/srun"), Path("/usr/bin/munge")]
    return [str(p) for p in wanted if not p.exists()]


def ensure_installed(timeout: float = 600) -> None:
    """Install the Debian packages if any binary is missing; SlurmUnavailable if we cannot."""
    missing = _missing_binaries()
    if not missing:
        return
    if not _is_root():
        raise SlurmUnavailable(
            f"SLURM is not installed ({', '.join(missing)} missing) and installing it needs "
            "root; run as root, or `apt-get install slurmctld slurmd slurm-client munge`."
        )
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"SLURM is not installed ({', '.join(missing)}) and there "
                               "is no apt-get to install it (not a Debian system).")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    update = _run(["apt-get", "update"], env=env, timeout=timeout, check=False)
    if update.returncode != 0:
        raise SlurmUnavailable(f"`apt-get update` failed, the Debian archive looks "
                               f"unreachable:\n{update.stderr[-2000:]}")
    install = _run(["apt-get", "install", "-y", "--no-install-recommends", *DEBIAN_PACKAGES],
                   env=env, timeout=timeout, check=False)
    if install.returncode != 0:
        unreachable = re.search(r"Unable to locate package|Failed to fetch|Could not resolve|"
                                r"Temporary failure|has no installation candidate",
                                install.stdout + install.stderr)
        message = (f"`apt-get install {' '.join(DEBIAN_PACKAGES)}` failed:\n"
                   f"{(install.stdout + install.stderr)[-3000:]}")
        if unreachable:
            raise SlurmUnavailable(message)
        raise SlurmError(message)
    still_missing = _missing_binaries()
    if still_missing:
        raise SlurmError(f"installed {DEBIAN_PACKAGES} but still missing {still_missing}")


def _munge_works() -> bool:
    """True if a munged answers on the default socket: encode, then decode, a credential."""
    try:
        cred = _run(["munge", "-n"], timeout=10, check=False)
        if cred.returncode != 0:
            return False
        return _run(["unmunge"], input=cred.stdout, timeout=10, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _start_munged(log_dir: Path, marker: str,
                  timeout: float = 20) -> subprocess.Popen | None:
    """Start munged unless one already answers; return the process we started, or None.

    Without systemd nobody creates /run/munge (the socket's directory) and munged refuses to
    run as root, so: create the directory for the munge user, make sure the key exists with
    the permissions munged insists on (owned by munge, not readable by others), and start
    munged in the foreground as that user so that we hold its PID.
    """
    if _munge_works():
        return None  # somebody else's munged (a real installation): use it, never stop it
    munge_user = pwd.getpwnam("munge")
    uid, gid = munge_user.pw_uid, munge_user.pw_gid
    for directory in (MUNGE_SOCKET_DIR, Path("/var/lib/munge"), Path("/var/log/munge")):
        directory.mkdir(parents=True, exist_ok=True)
        os.chown(directory, uid, gid)
    MUNGE_SOCKET_DIR.chmod(0o755)  # clients (root here) must reach the socket
    if not MUNGE_KEY.exists():
        MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
        if shutil.which("mungekey") or (SBIN / "mungekey").exists():
            _run([str(SBIN / "mungekey"), "--create", f"--keyfile={MUNGE_KEY}"])
        else:
            MUNGE_KEY.write_bytes(os.urandom(1024))
    os.chown(MUNGE_KEY.parent, uid, gid)
    os.chown(MUNGE_KEY, uid, gid)
    MUNGE_KEY.chmod(0o400)
    # --force: a previous munged that was killed leaves its socket behind; take it over.
    with open(log_dir / "munged.out", "w") as log:
        proc = subprocess.Popen([str(SBIN / "munged"), "--foreground", "--force"],
                                env=dict(os.environ, **{MARKER: marker}),
                                user=uid, group=gid, extra_groups=[], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SlurmError(f"munged exited with {proc.returncode}\n"
                             f"{_tail(log_dir / 'munged.out')}\n"
                             f"{_tail(Path('/var/log/munge/munged.log'))}")
        if _munge_works():
            return proc
        time.sleep(0.2)
    _stop_process(proc)
    raise SlurmError(f"munged did not answer within {timeout} s\n"
                     f"{_tail(Path('/var/log/munge/munged.log'))}")


# --------------------------------------------------------------------------------------
# the cluster
# --------------------------------------------------------------------------------------


@dataclass
class SlurmCluster:
    """A running single-node cluster. Run every SLURM command (and Snakemake) with ``env``."""

    root: Path
    conf: Path
    spool: Path
    hostname: str
    cpus: int
    real_memory_mb: int
    gpus: int
    partition: str = PARTITION
    ctld_port: int = 0
    processes: dict = field(default_factory=dict)
    leftovers: list = field(default_factory=list)  # PIDs teardown had to kill

    @property
    def env(self) -> dict:
        """os.environ plus SLURM_CONF and the cluster marker; /usr/sbin on PATH.

        SLURM_CONF points the client commands (sbatch, squeue, scontrol) at this cluster
        explicitly; job steps find the same file through /run/slurm/conf (configless).
        """
        path = os.environ.get("PATH", "")
        if "/usr/sbin" not in path.split(":"):
            path = f"{path}:/usr/sbin" if path else "/usr/sbin"
        return dict(os.environ, SLURM_CONF=str(self.conf), PATH=path,
                    **{MARKER: str(self.root)})

    @property
    def slurmctld_log(self) -> Path:
        return self.root / "log" / "slurmctld.log"

    @property
    def slurmd_log(self) -> Path:
        return self.root / "log" / "slurmd.log"

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> str:
        """Run a SLURM client command against this cluster; return its stdout."""
        return _run(list(cmd), env=self.env, check=check, timeout=timeout).stdout

    def logs(self, lines: int = 40) -> str:
        return "\n".join(_tail(p, lines) for p in (self.slurmctld_log, self.slurmd_log))

    def jobs(self) -> dict[int, dict[str, str]]:
        """Every job the controller still remembers (MinJobAge keeps finished ones).

        Returns {job id: {"name", "state", "comment", "exit_code", "tres"}} from
        ``scontrol show job``, which, unlike sacct, needs no accounting database.
        """
        out = self.run("scontrol", "--oneliner", "show", "job", check=False)
        jobs = {}
        for line in out.splitlines():
            fields = dict(re.findall(r"(\w+(?:/\w+)?)=(\S*)", line))
            if "JobId" not in fields:
                continue
            jobs[int(fields["JobId"])] = {
                "name": fields.get("JobName", ""),
                "state": fields.get("JobState", ""),
                "comment": fields.get("Comment", ""),
                "exit_code": fields.get("ExitCode", ""),
                "tres": fields.get("TRES", ""),
                "tres_per_job": fields.get("TresPerJob", ""),
                "node": fields.get("NodeList", ""),
            }
        return jobs

    def allocated_job_ids(self) -> list[int]:
        """Job ids the controller's log says it allocated (started) on the node."""
        text = self.slurmctld_log.read_text(errors="replace")
        return sorted({int(m) for m in re.findall(r"sched: Allocate JobId=(\d+)", text)})

    def cancel_all(self) -> None:
        ids = self.run("squeue", "--noheader", "--format=%i", check=False).split()
        if ids:
            self.run("scancel", *ids, check=False)


def _write_conf(cluster: SlurmCluster) -> int:
    """Write slurm.conf (and gres.conf) into cluster.root; return the controller's port."""
    root, spool, hostname, gpus = cluster.root, cluster.spool, cluster.hostname, cluster.gpus
    cpus, memory_mb = cluster.cpus, cluster.real_memory_mb
    ctld_port, slurmd_port = _free_ports(2)
    gres_node = f" Gres=gpu:{gpus}" if gpus else ""
    lines = f"""\
# Written by tests/slurm_cluster.py for a private one-node test cluster.
ClusterName={CLUSTER_NAME}
# The controller runs here; the address avoids any dependence on DNS.
SlurmctldHost={hostname}(127.0.0.1)
# Free ports picked at start: no clash with a real SLURM or an earlier run's leftovers.
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
# Everything runs as root: the daemons read and write only this private directory.
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={root / "state"}
SlurmdSpoolDir={spool}
SlurmctldPidFile={root / "run" / "slurmctld.pid"}
SlurmdPidFile={root / "run" / "slurmd.pid"}
SlurmctldLogFile={root / "log" / "slurmctld.log"}
SlurmdLogFile={root / "log" / "slurmd.log"}
SlurmctldDebug=info
SlurmdDebug=info
# No systemd and no cgroup delegation here: track job processes through /proc, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# No slurmdbd (as on some real clusters): sacct fails, so the plugin must use squeue.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
# Configless: slurmd fetches this file from slurmctld and links it at /run/slurm/conf, the
# place SLURM's commands look when neither SLURM_CONF nor /etc/slurm/slurm.conf is there.
# The job step that the Snakemake plugin starts (`srun` inside the batch job) needs that:
# snakemake-executor-plugin-slurm-jobstep strips every SLURM_* variable, SLURM_CONF
# included, from the environment of that srun.
SlurmctldParameters=enable_configless
# Cores are the booked resource, memory is not (a job asking for more than RealMemory is
# still refused): jobs take the profile's 4 GB default, and booking it would let a small
# CI machine run only one job at a time.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
# Keep finished jobs visible to squeue and scontrol for an hour: the plugin's squeue status
# check needs them (it falls back to sacct when MinJobAge < 3 x its first-check delay), and
# so does the test, which reads every job's record after the workflow is done.
MinJobAge=3600
# A node that was down (an earlier daemon) comes back by itself when slurmd registers.
ReturnToService=2
# Cancelled jobs die quickly at teardown.
KillWait=5
InactiveLimit=0
MailProg=/bin/true
{"GresTypes=gpu" if gpus else "# GresTypes: none (this node has no GPU)"}
NodeName={hostname} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb}{gres_node} State=UNKNOWN
PartitionName={PARTITION} Nodes={hostname} Default=YES MaxTime=INFINITE State=UP
"""
    cluster.conf.write_text(lines)
    if gpus:
        # Stand-in GPUs: SLURM books them like real ones (so --gpus=1 is accepted, queued
        # and scheduled, and CUDA_VISIBLE_DEVICES is set) but the "device files" are
        # /dev/null and friends; CUDA finds no GPU and the code runs on CPU.
        if gpus > len(FAKE_GPU_FILES):
            raise ValueError(f"at most {len(FAKE_GPU_FILES)} stand-in GPUs")
        files = ",".join(FAKE_GPU_FILES[:gpus])
        (root / "gres.conf").write_text(f"NodeName={hostname} Name=gpu File={files}\n")
    return ctld_port


def _wait_until_idle(cluster: SlurmCluster, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        for name, proc in cluster.processes.items():
            if proc.poll() is not None:
                raise SlurmError(f"{name} exited with {proc.returncode} at start\n"
                                 f"{_tail(cluster.root / 'log' / (name + '.out'))}\n"
                                 f"{cluster.logs()}")
        state = cluster.run("sinfo", "--noheader", "--Node", "--format=%T", check=False,
                            timeout=10).strip()
        if state == "idle":
            return
        time.sleep(0.3)
    raise SlurmError(f"node not idle after {timeout} s (state {state!r})\n{cluster.logs()}")


@contextlib.contextmanager
def slurm_cluster(root: Path | str, *, gpus: int = 0, cpus: int | None = None,
                  start_timeout: float = 60) -> Iterator[SlurmCluster]:
    """Install (if needed), start, yield, and always tear down a one-node SLURM cluster.

    root: a directory for the configuration, controller state and daemon logs (kept
        after exit, so a failing test leaves the logs to read).
    gpus: how many GPUs the node advertises (0: none, like a CPU node). They are stand-ins
        backed by /dev/null and friends (see _write_conf): SLURM books them, CUDA does not
        see them.
    cpus: the node's CPU count (default, and at most: what slurmd finds on this machine).
    """
    if not _is_root():
        raise SlurmUnavailable("a private SLURM needs root (it starts munged as the munge "
                               "user and slurmd as root); run the SLURM tests as root")
    ensure_installed()
    with _machine_lock(timeout=900), _cluster(Path(root).resolve(), gpus, cpus,
                                               start_timeout) as cluster:
        yield cluster


@contextlib.contextmanager
def _machine_lock(timeout: float) -> Iterator[None]:
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_FILE, "w") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError as exc:
                if time.monotonic() > deadline:
                    raise SlurmError(
                        f"another test cluster held {LOCK_FILE} for {timeout} s") from exc
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _cluster(root: Path, gpus: int, cpus: int | None,
             start_timeout: float) -> Iterator[SlurmCluster]:
    _check_config_locations()
    for sub in ("state", "run", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    # slurmd puts per-step unix sockets in its spool; their path must stay below 108 bytes,
    # which a deep pytest tmp_path and a long hostname can exceed. Hence a short /tmp dir.
    spool = Path(tempfile.mkdtemp(prefix=SPOOL_PREFIX))
    hostname = socket.gethostname().split(".")[0]
    hw_cpus, hw_memory = _node_hardware()
    cluster = SlurmCluster(
        root=root, conf=root / "slurm.conf", spool=spool, hostname=hostname,
        cpus=min(cpus or hw_cpus, hw_cpus), real_memory_mb=hw_memory, gpus=gpus,
    )
    munged = None
    try:
        munged = _start_munged(root / "log", str(root))
        cluster.ctld_port = _write_conf(cluster)
        daemons = {
            # -D: stay in the foreground, so that the PID we hold is the daemon's.
            # -c: clear any saved state (jobs, node states): this cluster starts clean.
            "slurmctld": ["-D", "-c", "-f", str(cluster.conf)],
            # --conf-server: configless (see slurm.conf); slurmd fetches the config from
            # the controller and publishes it at /run/slurm/conf for the job steps.
            "slurmd": ["-D", "--conf-server", f"127.0.0.1:{cluster.ctld_port}"],
        }
        for name, args in daemons.items():
            env = cluster.env
            if name == "slurmd":
                env.pop("SLURM_CONF")  # it would override --conf-server
            with open(root / "log" / f"{name}.out", "w") as out:
                cluster.processes[name] = subprocess.Popen(
                    [str(SBIN / name), *args], env=env, stdout=out,
                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True)
            if name == "slurmctld":
                _wait_for_controller(cluster, start_timeout)
        _wait_until_idle(cluster, start_timeout)
        yield cluster
    finally:
        _teardown(cluster, munged)


def _check_config_locations() -> None:
    """Clear what a crashed earlier run left; refuse where another SLURM would interfere.

    Called with the machine lock held, so no other test cluster is alive: any process that
    carries our marker, and a /run/slurm/conf link to a convflat-test configuration, are
    leftovers of a run that was killed before its teardown (SIGKILL, power loss).

    The nested srun of each job finds its configuration at /etc/slurm/slurm.conf first and
    at /run/slurm/conf second (SLURM_CONF is stripped, see slurm.conf). A real installation
    in either place would receive our job steps.
    """
    stale = _kill_all(lambda: sorted(set(_pids_with_env(MARKER, None))
                                     | set(_slurmstepd_pids(_is_test_cluster_file))))
    if stale:
        print(f"slurm_cluster: killed {len(stale)} processes of an earlier test cluster")
    for spool in Path(tempfile.gettempdir()).glob(SPOOL_PREFIX + "*"):
        if _is_test_cluster_file(spool / "cred_state"):
            shutil.rmtree(spool, ignore_errors=True)
    if DEFAULT_CONF.exists():
        raise SlurmUnavailable(
            f"{DEFAULT_CONF} exists: this machine has its own SLURM configuration, and the "
            "job steps of a private test cluster would talk to that cluster instead")
    if CONFIGLESS_LINK.is_symlink() or CONFIGLESS_LINK.exists():
        conf = CONFIGLESS_LINK / "slurm.conf"
        try:
            ours = f"ClusterName={CLUSTER_NAME}" in conf.read_text()
        except OSError:
            ours = True  # a dangling link: its slurmd and spool are gone
        if not ours or not CONFIGLESS_LINK.is_symlink():
            raise SlurmUnavailable(
                f"{CONFIGLESS_LINK} ({os.path.realpath(CONFIGLESS_LINK)}) belongs to another "
                "configless slurmd on this machine")
        CONFIGLESS_LINK.unlink()


def _wait_for_controller(cluster: SlurmCluster, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = cluster.processes["slurmctld"]
        if proc.poll() is not None:
            raise SlurmError(f"slurmctld exited with {proc.returncode} at start\n"
                             f"{_tail(cluster.root / 'log' / 'slurmctld.out')}\n"
                             f"{cluster.logs()}")
        if "UP" in cluster.run("scontrol", "ping", check=False, timeout=10):
            return
        time.sleep(0.3)
    raise SlurmError(f"slurmctld did not answer `scontrol ping` in {timeout} s\n"
                     f"{cluster.logs()}")


def _teardown(cluster: SlurmCluster, munged: subprocess.Popen | None) -> None:
    """Stop everything this cluster started; never raises, never touches foreign processes."""
    ctld = cluster.processes.get("slurmctld")
    if ctld is not None and ctld.poll() is None:
        with contextlib.suppress(Exception):
            cluster.cancel_all()
            # Let slurmd end the jobs' steps properly before it goes (KillWait=5).
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and cluster.run(
                    "squeue", "--noheader", "--states=PENDING,RUNNING,COMPLETING",
                    check=False, timeout=10).strip():
                time.sleep(0.5)
    # slurmd before slurmctld: the controller then sees no half-registered node.
    for name in ("slurmd", "slurmctld"):
        proc = cluster.processes.get(name)
        if proc is not None:
            with contextlib.suppress(Exception):
                _stop_process(proc)
    # slurmstepd and job processes can outlive slurmd; find them by marker and open files.
    with contextlib.suppress(Exception):
        cluster.leftovers = _kill_all(lambda: cluster_pids(cluster.root, cluster.spool))
    if munged is not None:
        with contextlib.suppress(Exception):
            _stop_process(munged)
    with contextlib.suppress(OSError):
        if os.path.realpath(CONFIGLESS_LINK).startswith(str(cluster.spool)):
            CONFIGLESS_LINK.unlink()
    shutil.rmtree(cluster.spool, ignore_errors=True)
