//! The host's state as crucible reads it before it changes anything: the user, Python, the live release,
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
/// start is on every deploy's critical path. `platform`, `shutil` and `subprocess` took 13 ms of
/// a 30 ms run on the test host, so commands start with `posix_spawn` instead.
const SCRIPT: &str = r#"import os, stat, sys, time

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

_SAFE = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")

def _names(path):
    """Lists the names crucible could have made in path: a name with other characters, such as a
    space or a newline, would break the key=value lines, and a .partial release is unfinished."""
    try:
        names = os.listdir(path)
    except OSError:
        return []
    return sorted(name for name in names if not name.startswith(".") and set(name) <= _SAFE and not name.endswith(".partial"))

def _remove_tree(path):
    """Removes path like rm -rf, after giving owner write permission to each directory in it
    that an app shipped read-only, which the deploy user could not empty otherwise."""
    for directory, _, _ in os.walk(path):
        mode = stat.S_IMODE(os.lstat(directory).st_mode)
        if not mode & stat.S_IWUSR:
            os.chmod(directory, mode | stat.S_IWUSR)
    if _finish(_start(["rm", "-rf", "--", path]))[0] != 0:
        raise OSError("rm -rf %s failed" % path)

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
                _remove_tree(os.path.join(releases, name))
                lines.append("removed=" + name)

    # The two commands run while the files below are read.
    uid = os.geteuid()
    can_sudo = uid == 0
    sudo = None if can_sudo else _start(["sudo", "-n", "-l", "systemctl", "restart", "--", unit])
    load_state = None
    if check_unit:
        load_state = _start(["systemctl", "show", "--property=LoadState", "--value", "--", unit], capture=True)

    lines.append("uid=%d" % uid)
    lines.append("python=" + sys.version.split()[0])
    if _on_path("uv"):
        lines.append("uv=yes")
    if not _on_path("systemctl"):
        lines.append("systemctl=missing")
    lines.append("current=" + _readlink(os.path.join(root, "current")).replace("\n", "?"))
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

    # A missing sudo ends with status 127, so it counts as no rule.
    if not can_sudo:
        can_sudo = _finish(sudo)[0] == 0
    lines.append("sudo=ok" if can_sudo else "sudo=missing")
    if check_unit:
        lines.append("unit_load=" + _finish(load_state)[1].decode("utf-8", "replace").strip())
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

    /// Runs the facts program with this machine's python3 on `root`, as the lock holder would
    /// with `prepare`, and returns its stdout.
    fn run_facts(root: &std::path::Path, prepare: bool) -> String {
        let call = if prepare {
            "prepare_or_exit(sys.argv[1], sys.argv[2], False)"
        } else {
            "write_facts(sys.argv[1], sys.argv[2], False, False)"
        };
        let output = std::process::Command::new("python3")
            .args(["-I", "-S", "-c", &format!("{}{call}\n", script())])
            .arg(root)
            .arg("webapp.service")
            .output()
            .expect("python3 runs");
        assert!(
            output.status.success(),
            "the facts program failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("facts are UTF-8 here")
    }

    #[test]
    fn facts_describe_a_deploy_path() {
        use std::os::unix::fs::symlink;

        let root = tempfile::tempdir().unwrap();
        let path = root.path();
        let sha = format!("3f9a1c2e{}", "0".repeat(56));
        let release = path.join("releases/20261204T150102Z-3f9a1c2e");
        std::fs::create_dir_all(&release).unwrap();
        std::fs::create_dir_all(path.join("releases/20261204T160000Z-aaaaaaaa.partial")).unwrap();
        std::fs::create_dir_all(path.join("venvs/k1")).unwrap();
        std::fs::create_dir_all(path.join(".crucible")).unwrap();
        let manifest = format!(
            "{MANIFEST_HEADER} {sha}\nf\t644\t3\t{}\tapp.py\n",
            "b".repeat(64)
        );
        std::fs::write(release.join(MANIFEST_NAME), &manifest).unwrap();
        symlink(path.join("venvs/k1"), release.join(".venv")).unwrap();
        symlink("releases/20261204T150102Z-3f9a1c2e", path.join("current")).unwrap();
        // A log whose last line lost its newline must not swallow the marker after it.
        std::fs::write(path.join(".crucible/releases.jsonl"), "{\"truncated\":").unwrap();

        let facts = crate::deploy::HostFacts::parse(&run_facts(path, false));
        assert_eq!(facts.live.as_deref(), Some("20261204T150102Z-3f9a1c2e"));
        assert_eq!(facts.releases.len(), 1, "the .partial is not a release");
        assert_eq!(
            facts.release_with_artifact(&sha).as_deref(),
            Some("20261204T150102Z-3f9a1c2e")
        );
        assert!(facts.venvs.contains("k1"));
        assert_eq!(facts.live_manifest.as_deref(), Some(manifest.as_str()));
        assert!(
            facts.removed_partials.is_empty(),
            "inventory removes nothing"
        );

        let prepared = crate::deploy::HostFacts::parse(&run_facts(path, true));
        assert_eq!(
            prepared.removed_partials,
            ["20261204T160000Z-aaaaaaaa.partial"]
        );
        assert!(
            !path
                .join("releases/20261204T160000Z-aaaaaaaa.partial")
                .exists()
        );
        assert!(path.join("shared").is_dir(), "prepare creates the layout");
    }

    #[test]
    fn script_names_match_the_archive() {
        let program = script();
        assert!(program.contains("MANIFEST_NAME = \".crucible-manifest\"\n"));
        assert!(program.contains("MANIFEST_HEADER = \"# crucible manifest v1\"\n"));
        assert!(program.contains("PREPARE_FAILED = 4\n"));
    }
}
