"""The bubblewrap side of the sandbox (`keye.tools.sandbox`): the command line that builds the namespaces and mounts,
the seccomp filter, the scrubbed environment, and the probe that says once per process what isolation works here.

Not for running a snippet (`keye.tools.sandbox.run_snippet`) or the program that runs inside (`keye.tools.runner`).
"""

from __future__ import annotations

import errno
import functools
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "SANDBOX_INPUTS",
    "SANDBOX_WORKDIR",
    "THYME_OUTPUT_DIR",
    "bwrap_argv",
    "inside",
    "probe",
    "sandbox_env",
    "seccomp_program",
    "version_tuple",
]

# Paths inside the sandbox. Thyme's training data saves processed images to THYME_OUTPUT_DIR; inside the sandbox it is
# a link to the working directory.
SANDBOX_WORKDIR = "/sandbox"
SANDBOX_INPUTS = "/inputs"
THYME_OUTPUT_DIR = "/mnt/data/temp_processed_images"


# --------------------------------------------------------------------------------------------------------------
# bubblewrap command line and seccomp filter
# --------------------------------------------------------------------------------------------------------------

# Files of /etc the interpreter and the dynamic loader read; the rest of /etc (passwd, shadow, ...) stays hidden.
_ETC_FILES = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/alternatives",
    "/etc/fonts",
)
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


@functools.lru_cache(maxsize=8)
def _interpreter_paths(python: str, extra: tuple[str, ...]) -> list[str]:
    """Host directories that hold the sandbox interpreter and its libraries (mounted read-only)."""
    if python == sys.executable:
        prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    else:  # another interpreter: ask it (once: cached)
        out = subprocess.run(
            [python, "-I", "-S", "-c", "import sys; print(sys.prefix); print(sys.base_prefix)"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        prefixes = set(out.stdout.split())
    real = Path(os.path.realpath(python))
    prefixes.add(str(real.parent.parent))  # .../bin/python3.x -> its installation prefix
    paths = sorted(p for p in {os.path.realpath(p) for p in prefixes} | {os.path.realpath(p) for p in extra})
    # Drop paths that a system directory or another listed path already covers.
    kept: list[str] = []
    for p in paths:
        covered = any(p == d or p.startswith(d + "/") for d in (*_SYSTEM_DIRS, *kept))
        if not covered and p != "/":
            kept.append(p)
    return kept


def inside(path: str) -> str:
    """Where a host path of the interpreter appears in the sandbox. Inside, /tmp is the working directory, so an
    interpreter under the host's /tmp (a checkout or CI clone there) is mounted under /.host-tmp instead."""
    return "/.host-tmp/" + path[len("/tmp/") :] if path.startswith("/tmp/") else path


def version_tuple(version: str | None) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version or "")[:3])


def bwrap_argv(
    bwrap: str,
    python: str,
    extra_ro_paths: Sequence[str],
    *,
    inputs_dir: str | None,
    workdir_bytes: int,
    seccomp: bytes | None,
    version: tuple[int, ...] = (0, 8, 0),
) -> tuple[list[str], list[int]]:
    """The bwrap command line (without the command) and the file descriptors it must inherit.

    Needs bwrap >= 0.5 (--perms). Older than 0.7 (Ubuntu 22.04 has 0.6) the working directory has no size cap
    beyond RLIMIT_FSIZE per file; older than 0.8 nested user namespaces are refused by seccomp only.
    """
    argv = [bwrap, "--die-with-parent", "--new-session"]
    argv += ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if os.geteuid() == 0:
        # Real root: no user namespace (its uid 0 would still own every host file and bypass RLIMIT_NPROC).
        # Keep only the two capabilities the runner needs to switch to a fresh uid; switching drops them.
        argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv += ["--unshare-user", *(["--disable-userns"] if version >= (0, 8) else [])]
    argv += ["--hostname", "sandbox"]  # the environment is the one Popen passes: sandbox_env() only
    for d in _SYSTEM_DIRS:
        if os.path.islink(d):
            argv += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            argv += ["--ro-bind", d, d]
    for f in _ETC_FILES:
        argv += ["--ro-bind-try", f, f]
    made: set[str] = set()
    for p in _interpreter_paths(python, tuple(extra_ro_paths)):
        # bwrap creates missing parents as 0700; make them traversable for the unprivileged snippet.
        for parent in reversed(Path(inside(p)).parents):
            s = str(parent)
            if s != "/" and s not in made and not any(s == d or s.startswith(d + "/") for d in _SYSTEM_DIRS):
                argv += ["--perms", "0755", "--dir", s]
                made.add(s)
        argv += ["--ro-bind", p, inside(p)]
    argv += ["--proc", "/proc", "--dev", "/dev"]
    size = ["--size", str(workdir_bytes)] if version >= (0, 7) else []
    argv += ["--perms", "01777", *size, "--tmpfs", SANDBOX_WORKDIR]
    argv += ["--symlink", SANDBOX_WORKDIR, "/tmp"]
    argv += ["--perms", "0755", "--dir", str(Path(THYME_OUTPUT_DIR).parent)]
    argv += ["--symlink", SANDBOX_WORKDIR, THYME_OUTPUT_DIR]
    if inputs_dir is not None:
        argv += ["--ro-bind", inputs_dir, SANDBOX_INPUTS]
    argv += ["--remount-ro", "/", "--chdir", SANDBOX_WORKDIR]
    fds: list[int] = []
    if seccomp is not None:
        r, w = os.pipe()
        os.write(w, seccomp)  # a few hundred bytes: fits the pipe buffer
        os.close(w)
        argv += ["--seccomp", str(r)]
        fds.append(r)
    argv.append("--")
    return argv, fds


# x86-64 syscall numbers (asm/unistd_64.h) that image code never needs and that widen the kernel attack surface.
_X86_64_DENY = {
    "ptrace": 101, "syslog": 103, "pivot_root": 155, "chroot": 161, "acct": 163,
    "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168, "reboot": 169, "init_module": 175,
    "delete_module": 176, "quotactl": 179, "lookup_dcookie": 212, "kexec_load": 246, "add_key": 248,
    "request_key": 249, "keyctl": 250, "unshare": 272, "perf_event_open": 298, "name_to_handle_at": 303,
    "open_by_handle_at": 304, "setns": 308, "process_vm_readv": 310, "process_vm_writev": 311,
    "finit_module": 313, "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323, "io_uring_setup": 425,
    "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430,
    "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
}  # fmt: skip
_X86_64_CLONE = 56
_X86_64_CLONE3 = 435
_AUDIT_ARCH_X86_64 = 0xC000003E
_CLONE_NEW_MASK = 0x7E020000  # CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET


def seccomp_program() -> bytes | None:
    """A classic-BPF seccomp filter for bwrap's --seccomp (None where we have no syscall table for the CPU).

    Written out by hand (91 instructions) so that no native dependency such as libseccomp is needed.
    """
    if platform.machine() != "x86_64":
        return None
    ld_w_abs, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, kill = 0x7FFF0000, 0x80000000  # SECCOMP_RET_ALLOW, SECCOMP_RET_KILL_PROCESS

    def errno_ret(e: int) -> int:
        return 0x00050000 | e  # SECCOMP_RET_ERRNO

    prog = [
        (ld_w_abs, 0, 0, 4),  # A = seccomp_data.arch
        (jeq, 1, 0, _AUDIT_ARCH_X86_64),
        (ret, 0, 0, kill),  # i386 / x32 entry points: different syscall numbers, refuse outright
        (ld_w_abs, 0, 0, 0),  # A = seccomp_data.nr
        (jge, 0, 1, 0x40000000),  # x32 ABI bit
        (ret, 0, 0, kill),
        (
            jeq,
            0,
            1,
            _X86_64_CLONE3,
        ),  # clone3 hides its flags in memory: ENOSYS makes glibc fall back to clone
        (ret, 0, 0, errno_ret(errno.ENOSYS)),
    ]
    for nr in sorted(_X86_64_DENY.values()):
        prog += [(jeq, 0, 1, nr), (ret, 0, 0, errno_ret(errno.EPERM))]
    prog += [
        (jeq, 0, 3, _X86_64_CLONE),  # not clone: allow
        (ld_w_abs, 0, 0, 16),  # A = low 32 bits of args[0] (clone flags)
        (jset, 0, 1, _CLONE_NEW_MASK),
        (ret, 0, 0, errno_ret(errno.EPERM)),
        (ret, 0, 0, allow),
    ]
    return b"".join(struct.pack("<HBBI", *ins) for ins in prog)


def sandbox_env() -> dict[str, str]:
    """The whole environment of the snippet: nothing of the caller's leaks in."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": SANDBOX_WORKDIR,
        "TMPDIR": SANDBOX_WORKDIR,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "MPLBACKEND": "Agg",
        "MPLCONFIGDIR": SANDBOX_WORKDIR + "/.matplotlib",
        # One BLAS/OpenMP thread: threads count against RLIMIT_NPROC, and a thread pool slows numpy's import.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


# --------------------------------------------------------------------------------------------------------------
# Isolation probe
# --------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def probe(bwrap: str, python: str, extra_ro_paths: tuple[str, ...]) -> dict:
    """Start a trivial sandbox once and say what isolation is available (cached per process)."""
    report: dict = {
        "backend": "none",
        "bwrap": None,
        "bwrap_version": None,
        "network": False,
        "filesystem": False,
        "pid": False,
        "user": None,
        "seccomp": False,
        "rlimits": True,
        "workdir_size_cap": False,
        "reason": "",
    }
    path = shutil.which(bwrap)
    if path is None:
        report["reason"] = f"{bwrap}: not found (install the Debian/Ubuntu package 'bubblewrap')"
        return report
    report["bwrap"] = path
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
        report["bwrap_version"] = out.stdout.strip().split()[-1] if out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError) as exc:
        report["reason"] = f"{path}: cannot run: {exc}"
        return report
    seccomp = seccomp_program()
    version = version_tuple(report["bwrap_version"])
    if version < (0, 5):
        report["reason"] = f"{path}: version {report['bwrap_version']} is too old (need 0.5 or newer)"
        return report
    argv, fds = bwrap_argv(
        path, python, extra_ro_paths, inputs_dir=None, workdir_bytes=1 << 20, seccomp=seccomp, version=version
    )
    try:
        out = subprocess.run(
            [*argv, inside(python), "-I", "-S", "-c", "pass"],
            capture_output=True,
            text=True,
            timeout=30,
            pass_fds=fds,
            env=sandbox_env(),
            stdin=subprocess.DEVNULL,
        )
    finally:
        for fd in fds:
            os.close(fd)
    if out.returncode != 0:
        report["reason"] = (
            f"{path}: a test sandbox failed (exit {out.returncode}): {out.stderr.strip()[:300]}"
        )
        return report
    root = os.geteuid() == 0
    report.update(
        backend="bwrap",
        network=True,
        filesystem=True,
        pid=True,
        user="fresh unprivileged uid per run" if root else "user namespace, nested user namespaces disabled",
        seccomp=seccomp is not None,
        workdir_size_cap=version >= (0, 7),
        reason="",
    )
    return report
