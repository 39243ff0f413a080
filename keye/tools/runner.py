"""The program the sandbox interpreter runs (`keye.tools.sandbox`): as source text, executed with ``python -I -B -u -c``
inside bubblewrap, so it can import nothing of keye.
"""

# --------------------------------------------------------------------------------------------------------------
# The runner: executed by the sandbox interpreter with `python -I -B -u -c`. It reads one JSON request on stdin,
# applies the rlimits, drops privileges, runs the snippet, then streams the saved images and a status line to
# the status descriptor. It must only use the standard library (and PIL if present, to pre-check image sizes).
# --------------------------------------------------------------------------------------------------------------

RUNNER = r"""
import builtins, errno, gc, json, linecache, os, resource, stat, sys, traceback

def _main():
    req = json.loads(sys.stdin.buffer.read())
    status_fd = req["status_fd"]
    used = sum(os.times()[:2])
    for name, value in req["rlimits"].items():
        soft = hard = value
        if name == "RLIMIT_CPU":  # SIGXCPU at the soft limit, SIGKILL one second later
            soft = int(used) + value
            hard = soft + 1
        resource.setrlimit(getattr(resource, name), (soft, hard))
    if req["uid"] is not None:
        os.setgroups([])
        os.setgid(req["uid"])
        os.setuid(req["uid"])
        with open("/proc/self/status") as f:
            st = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
        for key in ("CapPrm", "CapEff", "CapAmb"):
            if int(st[key].strip(), 16) != 0:
                os.write(2, b"sandbox runner: capabilities survived the uid switch; refusing to run\n")
                os._exit(70)
        if st["NoNewPrivs"].strip() != "1":
            os.write(2, b"sandbox runner: no_new_privs is not set; refusing to run\n")
            os._exit(70)
    workdir = req["workdir"]
    os.chdir(workdir)

    class _NoCv2:  # last on sys.meta_path: only reached when no real cv2 is installed
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == "cv2":
                raise ModuleNotFoundError(
                    "No module named 'cv2': OpenCV is not installed in this sandbox; use PIL "
                    "(Image, ImageOps, ImageEnhance, ImageFilter) and numpy instead", name="cv2")
            return None
    sys.meta_path.append(_NoCv2)

    code = req["code"]
    linecache.cache["<snippet>"] = (len(code), None, code.splitlines(True), "<snippet>")
    g = {"__name__": "__main__", "__builtins__": builtins, "image_path": req["image_paths"][0] if req["image_paths"] else None,
         "image_paths": list(req["image_paths"]), "temp_output_dir": workdir}
    getpid, _exit, write = os.getpid, os._exit, os.write
    me = getpid()
    status = {"error": None, "limit": None}
    try:
        exec(compile(code, "<snippet>", "exec"), g)
    except SystemExit as e:
        if getpid() != me:
            _exit(0)
        if e.code not in (None, 0):
            status["error"] = f"SystemExit: {e.code}"
    except BaseException as e:
        if getpid() != me:  # a process the snippet forked: never report
            _exit(1)
        status["error"], status["limit"] = _describe(e)
        try:
            te = traceback.TracebackException.from_exception(e)
            te.stack = traceback.StackSummary.from_list([f for f in te.stack if f.filename != "<string>"])
            sys.stderr.write("".join(te.format()))
        except BaseException:
            pass
    if getpid() != me:
        _exit(0)
    g.clear()
    gc.collect()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    _send(status_fd, workdir, req, status)
    _exit(0)

def _describe(e):
    where = ""
    tb = e.__traceback__
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<snippet>":
            line = tb.tb_lineno
        tb = tb.tb_next
    if isinstance(e, SyntaxError) and e.filename == "<snippet>":
        line = e.lineno
    if line is not None:
        where = f" (line {line})"
    msg = str(e).splitlines()[0] if str(e) else ""
    text = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    limit = None
    if isinstance(e, MemoryError):
        limit = "memory"
    elif isinstance(e, OSError) and e.errno == errno.EAGAIN:
        limit = "processes"  # fork/clone refused by RLIMIT_NPROC
    elif isinstance(e, RuntimeError) and "can't start new thread" in str(e):
        limit = "processes"
    elif isinstance(e, OSError) and e.errno in (errno.EFBIG, errno.ENOSPC):
        limit = "output"  # RLIMIT_FSIZE or the working directory is full
    return (text[:500] + where), limit

def _send(fd, workdir, req, status):
    found, dropped = [], []
    for dirpath, dirnames, filenames in os.walk(workdir):
        depth = dirpath[len(workdir):].count("/")
        if depth >= 3:
            dirnames[:] = []
        for name in filenames:
            if not name.lower().endswith((".png", ".jpg", ".jpeg")):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, workdir)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                dropped.append(f"{rel}: not a regular file")
                continue
            found.append((st.st_mtime_ns, rel, path, st.st_size))
        if len(found) > 1000:
            break
    found.sort()
    try:
        from PIL import Image
    except ImportError:
        Image = None
    sent = 0
    for _, rel, path, size in found:
        if size > req["max_image_bytes"]:
            dropped.append(f"{rel}: {size} bytes is over the {req['max_image_bytes']}-byte cap")
            continue
        if Image is not None:
            try:
                with Image.open(path) as im:
                    w, h = im.size
            except Exception as e:
                dropped.append(f"{rel}: not a readable image ({type(e).__name__})")
                continue
            if max(w, h) > req["max_image_side"]:
                dropped.append(f"{rel}: {w}x{h} is over the {req['max_image_side']}-pixel cap")
                continue
        if sent >= req["max_images"]:
            dropped.append(f"{rel}: more than {req['max_images']} images")
            continue
        try:
            fl = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with os.fdopen(fl, "rb") as f:
                data = f.read(req["max_image_bytes"] + 1)
        except OSError as e:
            dropped.append(f"{rel}: {e.strerror}")
            continue
        if len(data) > req["max_image_bytes"]:
            dropped.append(f"{rel}: over the size cap")
            continue
        _write_all(fd, b"I " + json.dumps({"name": rel, "size": len(data)}).encode() + b"\n" + data)
        sent += 1
    status["dropped"] = dropped
    _write_all(fd, b"S " + json.dumps(status).encode() + b"\n")

def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]

_main()
"""
