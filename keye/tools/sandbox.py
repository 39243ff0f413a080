"""Run one untrusted Python snippet in an isolated, resource-limited process.

This is the execution half of the Thyme-style tool loop: the model writes Python that crops, zooms, rotates or
measures an image, and `run_snippet` runs it where hostile code cannot reach the caller. It is not the model loop,
the protocol parser (`keye.tools.protocol`) or the code repairer (`keye.tools.repair`).

How a snippet runs (one fresh process per snippet, never `exec` in the caller):

- bubblewrap (`bwrap`, Debian package ``bubblewrap``) builds a new mount, PID, network, IPC and UTS namespace. The
  snippet sees a read-only view of the system libraries and of the Python interpreter plus its site-packages,
  read-only copies of its input images under ``/inputs``, and a size-capped private tmpfs ``/sandbox`` that is its
  working directory and the only writable place (``/tmp`` and Thyme's ``/mnt/data/temp_processed_images`` are
  links to it). Nothing else of the host is mounted: not the caller's home, not /tmp, not the project.
- The network namespace has only a loopback device, so no connection leaves the sandbox (the host's 127.0.0.1 is
  a different interface).
- When the caller is root, the snippet drops to a fresh unprivileged uid picked at random for this run, so
  ``RLIMIT_NPROC`` counts only its own processes and it owns no host file. Otherwise bubblewrap maps the caller's
  uid in a user namespace and forbids nested user namespaces.
- A seccomp filter (x86-64) refuses namespace creation, mount, ptrace, bpf, keyctl, io_uring, perf and module
  syscalls: kernel attack surface that image code never needs.
- rlimits: CPU seconds, address space, file size, processes, open files, no core files. The caller enforces the
  wall clock with a deadline on its own reads (no SIGALRM, so any thread may call `run_snippet`) and kills the
  whole sandbox on timeout or runaway output.
- The environment is scrubbed: the snippet gets a fixed, minimal set of variables.

Results travel back over pipes only: stdout and stderr (capped), and a status channel on which the in-sandbox
runner streams the images the snippet saved. The caller never opens a file the snippet created, so symlinks, FIFOs
and hard links in the working directory cannot trick it; every image is checked (PNG/JPEG, size caps) before it is
written to the output folder.

The bubblewrap command line, seccomp filter and probe are in `keye.tools.bwrap`; the program that runs inside is
`keye.tools.runner`. Without bubblewrap there is no isolation beyond rlimits, a private working directory and a scrubbed environment;
`run_snippet` then refuses to run unless ``allow_no_network_isolation=True``.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from keye.errors import ConfigError, ImageLoadError, KeyeInputError
from keye.tools.bwrap import (
    SANDBOX_INPUTS,
    SANDBOX_WORKDIR,
    bwrap_argv,
    inside,
    probe,
    sandbox_env,
    seccomp_program,
    version_tuple,
)
from keye.tools.runner import RUNNER

__all__ = [
    "KILLED_BY",
    "SandboxConfig",
    "SandboxResult",
    "SandboxUnavailableError",
    "isolation_report",
    "run_snippet",
]

KILLED_BY = ("timeout", "memory", "cpu", "output", "processes")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# A fresh uid per run when the caller is root: above systemd-nspawn's dynamic ranges, below 2**31.
_UID_BASE = 0x7FF00000
_UID_SPAN = 0x000FFFFF


class SandboxUnavailableError(RuntimeError):
    """The sandbox cannot isolate the snippet here (no usable bubblewrap) and the caller did not allow that."""


@dataclass
class SandboxConfig:
    """Limits and isolation policy for one snippet. Sizes are bytes, times seconds."""

    timeout_s: float = 10.0  # wall clock, enforced by the caller
    cpu_seconds: int = 10  # RLIMIT_CPU, all threads together
    memory_bytes: int = 1 << 30  # RLIMIT_AS, per process
    max_file_bytes: int = 64 << 20  # RLIMIT_FSIZE
    max_workdir_bytes: int = 256 << 20  # size of the /sandbox tmpfs
    max_processes: int = 8  # RLIMIT_NPROC, threads included (numpy runs with one BLAS thread)
    max_open_files: int = 128  # RLIMIT_NOFILE
    max_stdout_bytes: int = 64 << 10  # kept; the rest is dropped
    max_stderr_bytes: int = 64 << 10  # kept; the rest is dropped
    max_output_bytes: int = 1 << 20  # stdout or stderr beyond this kills the snippet (killed_by="output")
    max_images: int = 8  # output images copied out
    max_image_side: int = 4096  # output images larger than this (either side) are dropped
    max_image_bytes: int = 32 << 20  # per output image file
    max_input_bytes: int = 256 << 20  # per input image
    max_code_bytes: int = 1 << 20
    repair: bool = True  # run keye.tools.repair.repair_code first and report what it changed
    # Where bubblewrap is unusable, run anyway: no namespaces at all, rlimits and a scrubbed environment only.
    allow_no_network_isolation: bool = False
    python: str = sys.executable  # interpreter inside the sandbox; its prefix is mounted read-only
    bwrap: str = "bwrap"  # bubblewrap executable (name on PATH or path)
    extra_ro_paths: tuple[str, ...] = ()  # more host paths to mount read-only (libraries outside the prefix)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
                raise ConfigError(f"SandboxConfig.{f.name}", f"must be positive, got {value!r}")
        if self.max_stdout_bytes > self.max_output_bytes or self.max_stderr_bytes > self.max_output_bytes:
            raise ConfigError("SandboxConfig.max_output_bytes", "must be at least max_stdout/stderr_bytes")
        self.extra_ro_paths = tuple(self.extra_ro_paths)


@dataclass
class SandboxResult:
    """What one snippet produced. `to_dict` gives the JSON object of `keye tools run --json`."""

    ok: bool
    stdout: str
    stderr: str
    images: list[str]  # absolute paths in the output folder; they outlive the call
    error: str | None  # one line, e.g. "ZeroDivisionError: division by zero (line 3)"
    elapsed_s: float
    killed_by: str | None  # None or one of KILLED_BY
    isolation: str = ""  # which isolation ran the snippet, see isolation_report()
    repairs: list[str] = field(default_factory=list)  # what repair_code changed before running
    warnings: list[str] = field(default_factory=list)  # dropped images, truncated output
    stdout_truncated: bool = False
    code: str = ""  # the code that ran (after repairs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def isolation_report(config: SandboxConfig | None = None) -> dict:
    """Which isolation `run_snippet` would use here, for `keye info` and the JSON result.

    Keys: backend ("bwrap" or "none"), bwrap (path), bwrap_version, network / filesystem / pid (bool: that
    namespace is active), user (how the snippet's uid is separated), seccomp (bool), rlimits (always True),
    workdir_size_cap (bool: the working directory is a size-capped tmpfs), reason (why bubblewrap is unusable,
    empty when it works) and summary (one line).
    """
    cfg = config or SandboxConfig()
    report = dict(probe(cfg.bwrap, cfg.python, cfg.extra_ro_paths))
    if report["backend"] == "bwrap":
        parts = ["net", "pid", "ipc", "uts", "mount"]
        report["summary"] = (
            f"bwrap {report['bwrap_version']}: {'+'.join(parts)} namespaces, {report['user']}, "
            f"seccomp {'on' if report['seccomp'] else 'off'}, rlimits"
        )
    else:
        report["summary"] = f"none: rlimits and a scrubbed environment only ({report['reason']})"
    return report


# --------------------------------------------------------------------------------------------------------------
# run_snippet
# --------------------------------------------------------------------------------------------------------------


def _safe_name(name: str, fallback: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(name))[-100:].lstrip(".")
    return name or fallback


def _stage_inputs(images: Sequence[str | os.PathLike], inputs_dir: Path, cap: int) -> list[str]:
    """Copy the input images (read-only) into `inputs_dir`; return their names there, in order."""
    names: list[str] = []
    for i, img in enumerate(images):
        src = Path(img)
        if not src.is_file():
            raise ImageLoadError(src, "no such file" if not src.exists() else "not a regular file")
        size = src.stat().st_size
        if size > cap:
            raise ImageLoadError(src, f"{size} bytes is over the sandbox input cap of {cap} bytes")
        name = _safe_name(src.name, f"image_{i}")
        if name in names:
            name = f"{i}_{name}"
        dst = inputs_dir / name
        shutil.copyfile(src, dst)
        os.chmod(dst, 0o444)
        names.append(name)
    os.chmod(inputs_dir, 0o555)
    return names


def _unique_path(out_dir: Path, name: str) -> tuple[Path, int]:
    """Create a new file in out_dir named like `name` (never overwrite); return it and an open descriptor."""
    stem, dot, suffix = name.rpartition(".")
    for k in range(10_000):
        candidate = out_dir / (name if k == 0 else f"{stem}-{k}{dot}{suffix}")
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except FileExistsError:
            continue
        return candidate, fd
    raise OSError(errno.EEXIST, f"{out_dir}: no free name for {name}")


def _check_image(path: Path, max_side: int) -> str | None:
    """None if `path` is a PNG or JPEG within the size cap, else why not. Reads the header only."""
    from PIL import Image  # lazy: keep `import keye.tools` light

    try:
        with Image.open(path, formats=["PNG", "JPEG"]) as im:
            w, h = im.size
    except Exception as exc:  # any decoder error means "not an image we accept"
        return f"not a PNG or JPEG image ({type(exc).__name__})"
    if max(w, h) > max_side or min(w, h) < 1:
        return f"{w}x{h} is over the {max_side}-pixel cap"
    return None


def _parse_status(
    spool: Path, out_dir: Path | None, cfg: SandboxConfig
) -> tuple[dict | None, list[str], list[str]]:
    """Read the runner's status channel: (status or None, image paths written, warnings)."""
    images: list[str] = []
    warnings: list[str] = []
    status: dict | None = None
    fresh_dir = out_dir is None
    with open(spool, "rb") as f:
        while True:
            line = f.readline(64 << 10)
            if not line:
                break
            if not line.endswith(b"\n"):
                warnings.append("status channel: malformed record")
                break
            kind, _, payload = line.partition(b" ")
            try:
                meta = json.loads(payload)
            except ValueError:
                warnings.append("status channel: malformed record")
                break
            if kind == b"S" and isinstance(meta, dict):
                status = meta
                break
            if kind != b"I" or not isinstance(meta, dict) or not isinstance(meta.get("size"), int):
                warnings.append("status channel: malformed record")
                break
            size = meta["size"]
            if not 0 <= size <= cfg.max_image_bytes:
                warnings.append(f"{meta.get('name')}: image over the size cap, dropped")
                break
            data = f.read(size)
            if len(data) != size:
                warnings.append("status channel: truncated image")
                break
            name = _safe_name(str(meta.get("name", "")).replace("/", "_"), "image.png")
            if len(images) >= cfg.max_images:
                warnings.append(f"{name}: more than {cfg.max_images} images, dropped")
                continue
            if not name.lower().endswith(IMAGE_SUFFIXES):
                warnings.append(f"{name}: not a .png/.jpg name, dropped")
                continue
            if out_dir is None:
                out_dir = Path(tempfile.mkdtemp(prefix="keye-tools-out-"))
            path, fd = _unique_path(out_dir, name)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            why = _check_image(path, cfg.max_image_side)
            if why is not None:
                path.unlink()
                warnings.append(f"{name}: {why}, dropped")
                continue
            images.append(str(path.resolve()))
    if fresh_dir and out_dir is not None and not images:
        out_dir.rmdir()  # every image was dropped: leave no empty folder behind
    return status, images, warnings


def run_snippet(
    code: str,
    images: Sequence[str | os.PathLike],
    *,
    config: SandboxConfig | None = None,
    out_dir: str | os.PathLike | None = None,
) -> SandboxResult:
    """Run `code` in a fresh sandbox with read-only copies of `images`; return its output and saved images.

    Inside, the snippet finds the inputs in the globals ``image_path`` (the first) and ``image_paths`` (all) and
    runs in its working directory; PNG/JPEG files it saves there (or in /tmp, or Thyme's
    /mnt/data/temp_processed_images) come back as `SandboxResult.images`, copied to `out_dir` (created if
    missing; a fresh temporary folder when None) and never overwriting a file there.

    Raises ImageLoadError for a missing input image, KeyeInputError for oversized code, and
    SandboxUnavailableError where bubblewrap cannot isolate the snippet unless
    ``config.allow_no_network_isolation`` is set. Everything the snippet does is reported in the result instead.
    Safe to call from any thread.
    """
    cfg = config or SandboxConfig()
    if len(code.encode("utf-8", "replace")) > cfg.max_code_bytes:
        raise KeyeInputError("code", f"longer than the sandbox cap of {cfg.max_code_bytes} bytes")
    report = isolation_report(cfg)
    isolated = report["backend"] == "bwrap"
    if not isolated and not cfg.allow_no_network_isolation:
        raise SandboxUnavailableError(
            f"cannot isolate the snippet: {report['reason']}; install bubblewrap or pass "
            "allow_no_network_isolation=True (--allow-no-network-isolation) to run it with rlimits only"
        )
    stage = Path(tempfile.mkdtemp(prefix="keye-sbx-"))  # 0700: other host users cannot look in
    try:
        inputs = stage / "inputs"
        inputs.mkdir(mode=0o755)
        names = _stage_inputs(images, inputs, cfg.max_input_bytes)
        repairs: list[str] = []
        if cfg.repair:
            from keye.tools.repair import repair_code

            code, repairs = repair_code(code, image_names=names)
        if isolated:
            workdir = SANDBOX_WORKDIR
            image_paths = [f"{SANDBOX_INPUTS}/{n}" for n in names]
        else:
            host_work = stage / "work"
            host_work.mkdir(mode=0o700)
            workdir = str(host_work)
            image_paths = [str(inputs / n) for n in names]
        result = _execute(code, image_paths, workdir, str(inputs), stage, cfg, report, out_dir)
        result.repairs = repairs
        result.code = code
        return result
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _execute(
    code: str,
    image_paths: list[str],
    workdir: str,
    inputs_dir: str,
    stage: Path,
    cfg: SandboxConfig,
    report: dict,
    out_dir: str | os.PathLike | None,
) -> SandboxResult:
    isolated = report["backend"] == "bwrap"
    status_r, status_w = os.pipe()
    pass_fds = [status_w]
    if isolated:
        argv, bw_fds = bwrap_argv(
            report["bwrap"],
            cfg.python,
            cfg.extra_ro_paths,
            inputs_dir=inputs_dir,
            workdir_bytes=cfg.max_workdir_bytes,
            seccomp=seccomp_program(),
            version=version_tuple(report["bwrap_version"]),
        )
        pass_fds += bw_fds
        env, cwd = sandbox_env(), None
    else:
        argv, bw_fds, cwd = [], [], workdir
        env = {**sandbox_env(), "HOME": workdir, "TMPDIR": workdir, "MPLCONFIGDIR": workdir + "/.matplotlib"}
    argv += [inside(cfg.python) if isolated else cfg.python, "-I", "-B", "-u", "-c", RUNNER]
    rlimits = {
        "RLIMIT_CPU": int(cfg.cpu_seconds),
        "RLIMIT_AS": int(cfg.memory_bytes),
        "RLIMIT_FSIZE": int(cfg.max_file_bytes),
        "RLIMIT_NOFILE": int(cfg.max_open_files),
        "RLIMIT_CORE": 0,
    }
    if isolated:  # per uid: unisolated, it would count (and starve) the caller's own processes
        rlimits["RLIMIT_NPROC"] = int(cfg.max_processes)
    request = {
        "code": code,
        "image_paths": image_paths,
        "workdir": workdir,
        "status_fd": status_w,
        "uid": _UID_BASE + secrets.randbelow(_UID_SPAN) if isolated and os.geteuid() == 0 else None,
        "rlimits": rlimits,
        "max_images": cfg.max_images,
        "max_image_bytes": cfg.max_image_bytes,
        "max_image_side": cfg.max_image_side,
    }
    spool_path = stage / "status"
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=pass_fds,
            env=env,
            cwd=cwd,
            start_new_session=True,  # one process group to kill
        )
    finally:
        os.close(status_w)
        for fd in bw_fds:
            os.close(fd)
    try:
        with open(spool_path, "wb") as spool:
            pump = _Pump(
                proc, status_r, spool, cfg, json.dumps(request).encode(), deadline=start + cfg.timeout_s
            )
            pump.run()
    finally:
        if proc.returncode is None:  # only on an exception in the pump (e.g. KeyboardInterrupt)
            _kill(proc)
            proc.wait()
        os.close(status_r)
    elapsed = time.monotonic() - start

    killed_by = pump.killed_by
    status, images, warnings = (None, [], [])
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    if killed_by is None:
        status, images, warnings = _parse_status(
            spool_path, Path(out_dir) if out_dir is not None else None, cfg
        )
    error: str | None = None
    if killed_by == "timeout":
        error = f"killed: wall-clock timeout of {cfg.timeout_s:g} s"
    elif killed_by == "output":
        error = f"killed: more than {cfg.max_output_bytes} bytes of output"
    elif status is None:
        killed_by, error = _diagnose_exit(proc.returncode, elapsed, cfg)
    else:
        error = status.get("error") if isinstance(status.get("error"), str) else None
        if error is not None and status.get("limit") in KILLED_BY:
            killed_by = status["limit"]
        warnings += [f"{item}, dropped" for item in status.get("dropped") or [] if isinstance(item, str)]
    for name, keep in (("stdout", cfg.max_stdout_bytes), ("stderr", cfg.max_stderr_bytes)):
        if pump.totals[name] > keep:
            warnings.append(f"{name}: kept the first {keep} of {pump.totals[name]} bytes")
    if not isolated:
        warnings.append("ran WITHOUT isolation (no bubblewrap): rlimits and a scrubbed environment only")
    return SandboxResult(
        ok=error is None and killed_by is None,
        stdout=pump.out.decode("utf-8", "replace"),
        stderr=pump.err.decode("utf-8", "replace"),
        images=images,
        error=error,
        elapsed_s=round(elapsed, 4),
        killed_by=killed_by,
        isolation=report["summary"],
        warnings=warnings,
        stdout_truncated=pump.totals["stdout"] > cfg.max_stdout_bytes,
    )


def _diagnose_exit(rc: int, elapsed: float, cfg: SandboxConfig) -> tuple[str | None, str]:
    """(killed_by, error) for a snippet that ended without the runner's report."""
    sig = -rc if rc < 0 else rc - 128 if rc > 128 else 0  # bwrap exits with 128 + signal
    if sig == signal.SIGXCPU:
        return "cpu", f"killed: CPU time limit of {cfg.cpu_seconds} s"
    # We did not send this SIGKILL. RLIMIT_CPU's hard limit sends one after SIGXCPU is ignored; it needs at
    # least cpu_seconds / cores of wall time. (The kernel's OOM killer is the other sender.)
    if sig == signal.SIGKILL and elapsed >= 0.9 * cfg.cpu_seconds / (os.cpu_count() or 1):
        return "cpu", f"killed: CPU time limit of {cfg.cpu_seconds} s (SIGKILL at the hard limit)"
    if sig:
        return None, f"the snippet died from signal {signal.Signals(sig).name}"
    return None, f"the snippet ended without finishing (exit status {rc})"


class _Pump:
    """Feed the request to stdin and drain stdout, stderr and the status channel until the sandbox is gone.

    One `select` loop with a deadline, so no signals and no helper threads: callable from any thread. On the
    deadline or runaway output it kills the sandbox, then keeps draining (discarding) for a short grace period
    so that the call returns after the sandboxed processes have exited, not while they are still dying.
    """

    GRACE_S = 2.0

    def __init__(
        self,
        proc: subprocess.Popen,
        status_fd: int,
        spool,
        cfg: SandboxConfig,
        request: bytes,
        deadline: float,
    ):
        self.proc, self.status_fd, self.spool, self.cfg = proc, status_fd, spool, cfg
        self.pending = memoryview(request)
        self.deadline = deadline
        self.killed_by: str | None = None
        self.out, self.err = bytearray(), bytearray()
        self.totals = {"stdout": 0, "stderr": 0, "status": 0}
        self.spool_cap = cfg.max_images * (cfg.max_image_bytes + 4096) + (1 << 20)

    def kill(self, reason: str) -> None:
        if self.killed_by is None:
            self.killed_by = reason
            _kill(self.proc)
            self.deadline = time.monotonic() + self.GRACE_S

    def run(self) -> None:
        proc = self.proc
        with selectors.DefaultSelector() as sel:
            for f in (proc.stdin, proc.stdout, proc.stderr):
                os.set_blocking(f.fileno(), False)
            os.set_blocking(self.status_fd, False)
            sel.register(proc.stdin, selectors.EVENT_WRITE, "stdin")
            sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
            sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
            sel.register(self.status_fd, selectors.EVENT_READ, "status")
            open_readers = 3
            while open_readers:
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    if self.killed_by is not None:
                        break  # grace period over: give up on processes that closed their pipes
                    self.kill("timeout")
                    continue
                for key, _ in sel.select(remaining):
                    if key.data == "stdin":
                        self._feed(sel, key)
                        continue
                    try:
                        chunk = os.read(key.fd, 1 << 16)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        sel.unregister(key.fileobj)
                        open_readers -= 1
                    elif self.killed_by is None:
                        self._take(key.data, chunk)
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if not f.closed:
                f.close()
        # The pipes are closed: the snippet has ended (or closed them). Wait for bwrap itself.
        try:
            proc.wait(timeout=max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill("timeout")
            proc.wait()

    def _feed(self, sel: selectors.BaseSelector, key: selectors.SelectorKey) -> None:
        try:
            self.pending = self.pending[os.write(key.fd, self.pending) :]
        except BrokenPipeError:
            self.pending = self.pending[:0]
        if not self.pending:
            sel.unregister(key.fileobj)
            self.proc.stdin.close()

    def _take(self, name: str, chunk: bytes) -> None:
        self.totals[name] += len(chunk)
        if name == "status":
            if self.totals["status"] > self.spool_cap:
                self.kill("output")
            else:
                self.spool.write(chunk)
            return
        buf, keep = (
            (self.out, self.cfg.max_stdout_bytes)
            if name == "stdout"
            else (self.err, self.cfg.max_stderr_bytes)
        )
        if len(buf) < keep:
            buf += chunk[: keep - len(buf)]
        if self.totals[name] > self.cfg.max_output_bytes:
            self.kill("output")


def _kill(proc: subprocess.Popen) -> None:
    """Kill the sandbox: bwrap's process group; --die-with-parent and the PID namespace take the rest."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
