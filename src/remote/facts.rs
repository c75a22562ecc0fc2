//! What crucible reads from a host before it changes anything: the user, Python, the live release,
//! the complete releases with their venv links and artifacts, the venvs, the release log and the
//! live release's manifest.
//!
//! One Python program prints them all. Inside the deploy lock's holder it also creates the layout
//! and removes unfinished releases, so a push learns the host's state in the same round trip that
//! takes the lock. `status` and `releases` run it alone, and then it changes nothing.

use super::{Layout, quote};
use crate::archive::{MANIFEST_HEADER, MANIFEST_NAME};

/// Line after which the release log follows verbatim.
pub const LOG_MARKER: &str = "---releases.jsonl---";

/// Line after which the live release's manifest follows verbatim.
pub const MANIFEST_MARKER: &str = "---live-manifest---";

/// Exit status of the holder when the facts could not be read or the layout not created.
pub const PREPARE_FAILED: u32 = 4;

/// Defines `write_facts(root, unit, prepare, check_unit)`. Each fact is a `key=value` line, and
/// `unit_load` is printed only with `check_unit`. A release prints
/// `release=ID VENV_LINK` and, when its manifest names an artifact, `artifact=ID SHA256`.
/// `took_ms` is how long reading them took on the host. The `sudo -n -l` check runs only for
/// users other than root, because root needs no rule.
///
/// It imports only modules built into the interpreter and runs with `python3 -I -S`, because this
/// start is on every deploy's critical path: `platform`, `shutil` and `subprocess` took 13 ms of
/// a 30 ms run on the test host, so commands start with `posix_spawn` instead.
const SCRIPT: &str = r#"import os, sys, time

def _start(argv, capture=False):
    """Starts argv with no input. Returns its pid and the read end of its stdout, or None when
    argv[0] is not found."""
    read_end, write_end = os.pipe()
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_DUP2, write_end, 1) if capture else (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
        (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
    ]
    try:
        pid = os.posix_spawnp(argv[0], argv, os.environ, file_actions=actions)
    except OSError:
        os.close(read_end)
        return None
    finally:
        os.close(write_end)
    return pid, read_end

def _finish(started):
    """Waits for a command from _start. Returns its exit status and its stdout."""
    if started is None:
        return 127, b""
    pid, read_end = started
    chunks = []
    while True:
        chunk = os.read(read_end, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks)

def _on_path(program):
    for directory in os.get_exec_path():
        if os.access(os.path.join(directory, program), os.X_OK):
            return True
    return False

def _readlink(path):
    try:
        return os.readlink(path)
    except OSError:
        return ""

def _names(path):
    try:
        return sorted(name for name in os.listdir(path) if not name.startswith("."))
    except OSError:
        return []

def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""

def _first_line(path):
    try:
        with open(path, "rb") as f:
            return f.readline().decode("utf-8", "replace").rstrip("\n")
    except OSError:
        return ""

def write_facts(root, unit, prepare, check_unit):
    started = time.monotonic()
    releases = os.path.join(root, "releases")
    venvs = os.path.join(root, "venvs")
    lines = []
    if prepare:
        for path in (releases, venvs, os.path.join(root, "shared"), os.path.join(root, ".crucible")):
            os.makedirs(path, exist_ok=True)
        for name in sorted(os.listdir(releases)):
            if name.endswith(".partial"):
                partial = os.path.join(releases, name)
                if _finish(_start(["rm", "-rf", "--", partial]))[0] != 0:
                    raise OSError("rm -rf %s failed" % partial)
                lines.append("removed=" + name)
    # The two commands run while the files below are read.
    uid = os.geteuid()
    sudo = None if uid == 0 else _start(["sudo", "-n", "-l", "systemctl", "restart", "--", unit])
    shown = None
    if check_unit:
        shown = _start(["systemctl", "show", "--property=LoadState", "--value", "--", unit], capture=True)
    lines.append("uid=%d" % uid)
    lines.append("python=" + sys.version.split()[0])
    if _on_path("uv"):
        lines.append("uv=yes")
    lines.append("current=" + _readlink(os.path.join(root, "current")))
    for name in _names(releases):
        manifest = os.path.join(releases, name, MANIFEST_NAME)
        if not os.path.isfile(manifest):
            continue
        lines.append("release=%s %s" % (name, _readlink(os.path.join(releases, name, ".venv"))))
        header = _first_line(manifest)
        if header.startswith(MANIFEST_HEADER + " "):
            lines.append("artifact=%s %s" % (name, header[len(MANIFEST_HEADER) + 1:]))
    for name in _names(venvs):
        if os.path.isdir(os.path.join(venvs, name)):
            lines.append("venv=" + name)
    log = _read(os.path.join(root, ".crucible", "releases.jsonl"))
    if log and not log.endswith(b"\n"):
        log += b"\n"
    live_manifest = _read(os.path.join(root, "current", MANIFEST_NAME))
    if sudo is None or _finish(sudo)[0] == 0:
        lines.append("sudo=ok")
    else:
        lines.append("sudo=missing")
    if check_unit:
        lines.append("unit_load=" + _finish(shown)[1].decode("utf-8", "replace").strip())
    lines.append("took_ms=%d" % ((time.monotonic() - started) * 1000))
    lines.append(LOG_MARKER)
    out = sys.stdout.buffer
    out.write(("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))
    out.write(log)
    out.write((MANIFEST_MARKER + "\n").encode())
    out.write(live_manifest)
    out.flush()

def prepare_or_exit(root, unit, check_unit):
    try:
        write_facts(root, unit, True, check_unit)
    except OSError as error:
        sys.stderr.write("failed to prepare %s: %s\n" % (root, error))
        sys.exit(PREPARE_FAILED)
"#;

/// The Python program that defines `write_facts` and `prepare_or_exit`, with crucible's names
/// filled in, for a caller to append its own main part to.
pub fn script() -> String {
    format!(
        "MANIFEST_NAME = {manifest:?}\nMANIFEST_HEADER = {header:?}\nLOG_MARKER = {log:?}\n\
         MANIFEST_MARKER = {marker:?}\nPREPARE_FAILED = {PREPARE_FAILED}\n{SCRIPT}",
        manifest = MANIFEST_NAME,
        header = MANIFEST_HEADER,
        log = LOG_MARKER,
        marker = MANIFEST_MARKER,
    )
}

/// Prints the facts without changing anything, for `status` and `releases`.
pub fn inventory(layout: &Layout, unit: &str) -> String {
    let program = format!(
        "{}write_facts(sys.argv[1], sys.argv[2], False, False)\n",
        script()
    );
    format!(
        "python3 -I -S -c {} {} {}",
        quote(&program),
        quote(&layout.root),
        quote(unit)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inventory_quotes_root_and_unit() {
        let command = inventory(&Layout::new("/srv/web app"), "web app.service");
        assert!(command.starts_with("python3 -I -S -c "));
        assert!(command.ends_with(" '/srv/web app' 'web app.service'"));
        assert!(command.contains("write_facts(sys.argv[1], sys.argv[2], False, False)"));
    }

    #[test]
    fn script_names_match_the_archive() {
        let program = script();
        assert!(program.contains("MANIFEST_NAME = \".crucible-manifest\"\n"));
        assert!(program.contains("MANIFEST_HEADER = \"# crucible manifest v1\"\n"));
        assert!(program.contains("PREPARE_FAILED = 4\n"));
    }
}
