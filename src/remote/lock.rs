//! The deploy lock: a `flock` held by a remote process that lives exactly as long as the SSH session.
//!
//! The holder reads its stdin. When the client dies or the TCP connection is cut, sshd closes that
//! stdin, the holder exits and the kernel releases the lock at once. For a silent drop (no FIN, no
//! RST) the holder also gives up when no heartbeat line arrived for [`HOLDER_TIMEOUT_SECONDS`], so no
//! lock outlives its deployer and no force-unlock command is needed.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use russh::ChannelMsg;
use russh::client::Msg;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use super::{Layout, facts, quote};
use crate::archive::{FIXED_MTIME, ReusedFile};
use crate::ssh::{Session, SshError, short_command};

/// How often the client sends a heartbeat line to the holder.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

/// How long the holder waits for a heartbeat before it exits and frees the lock.
const HOLDER_TIMEOUT_SECONDS: u32 = 15;

/// `flock`'s exit status when the lock is taken (its `-E` option).
const LOCK_TAKEN: u32 = 75;

/// Printed by the holder on a line of its own once it holds the lock and has printed the facts.
const LOCKED_MARKER: &str = "---locked---";

/// The holder's main part, appended to [`facts::script`]: it records who holds the lock, prepares
/// the layout and prints the host's facts, prints [`LOCKED_MARKER`], then reads its stdin until
/// EOF or until no line arrived for the timeout. An empty line is a heartbeat. A `link` request
/// (see [`DeployLock::link_reused`]) gets a reply of one line on stdout.
///
/// A delta push's unchanged files are linked here, by a Python process that is already running,
/// rather than by a new command: that saves a process start and a channel on the push's critical
/// path. Each file must still have the size and mode its manifest gives, the modification time
/// that tar gave it, and only real directories above it, or the reply is `mismatch=PATH` and the
/// push sends every file instead.
const HOLDER: &str = r#"path, holder, timeout, root, unit = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4], sys.argv[5]
check_unit = sys.argv[6] == "1"
try:
    with open(path + ".tmp", "w") as f:
        f.write(holder + "\n")
    os.replace(path + ".tmp", path)
except OSError as error:
    sys.stderr.write("failed to write the lock holder record %s: %s\n" % (path, error))
    sys.exit(PREPARE_FAILED)
prepare_or_exit(root, unit, check_unit)
import select, stat
out = sys.stdout.buffer
out.write(b"\n" + LOCKED_MARKER.encode() + b"\n")
out.flush()
lines, position, tail = [], 0, b""

def next_line():
    global lines, position, tail
    while position == len(lines):
        ready, _, _ = select.select([0], [], [], timeout)
        if not ready:
            sys.exit(3)
        chunk = os.read(0, 1 << 16)
        if not chunk:
            return None
        lines = (tail + chunk).split(b"\n")
        tail = lines.pop()
        position = 0
    position += 1
    return lines[position - 1].decode("utf-8", "surrogateescape")

def _real_directory(old_fd, parent, checked):
    """Returns whether parent and each directory above it in the old release is a directory and
    not a symlink, so that linking through it cannot reach files outside the release."""
    if not parent or parent in checked:
        return True
    if not _real_directory(old_fd, os.path.dirname(parent), checked):
        return False
    try:
        info = os.lstat(parent, dir_fd=old_fd)
    except OSError:
        return False
    if not stat.S_ISDIR(info.st_mode):
        return False
    checked.add(parent)
    return True

def _open_up(new, parent, opened):
    """Adds owner write permission to parent and the directories above it in the new release.
    tar may already have given them a read-only mode from the archive; link_reused restores it."""
    while True:
        path = os.path.join(new, parent) if parent else new
        try:
            mode = stat.S_IMODE(os.lstat(path).st_mode)
        except FileNotFoundError:
            mode = stat.S_IWUSR
        if not mode & stat.S_IWUSR:
            opened.setdefault(path, mode)
            os.chmod(path, mode | stat.S_IWUSR)
        if not parent:
            return
        parent = os.path.dirname(parent)

def link_reused(old, new, entries):
    os.makedirs(new, exist_ok=True)
    old_fd = os.open(old, os.O_RDONLY | os.O_DIRECTORY)
    new_fd = os.open(new, os.O_RDONLY | os.O_DIRECTORY)
    created, checked, opened = set(), set(), {}
    try:
        for entry in entries:
            name, size, mode = entry.split("\t")
            parent = os.path.dirname(name)
            try:
                info = os.lstat(name, dir_fd=old_fd)
            except OSError:
                info = None
            # Every file tar unpacks gets ARCHIVE_MTIME, and a write in place changes it.
            if info is None or not stat.S_ISREG(info.st_mode) or info.st_size != int(size) \
                    or stat.S_IMODE(info.st_mode) != int(mode, 8) or int(info.st_mtime) != ARCHIVE_MTIME \
                    or not _real_directory(old_fd, parent, checked):
                return "mismatch=" + name
            for attempt in (1, 2):
                try:
                    if parent and parent not in created:
                        os.makedirs(os.path.join(new, parent), exist_ok=True)
                        created.add(parent)
                    os.link(name, name, src_dir_fd=old_fd, dst_dir_fd=new_fd, follow_symlinks=False)
                    break
                except PermissionError:
                    if attempt == 2:
                        raise
                    _open_up(new, parent, opened)
    finally:
        for path in sorted(opened, key=len, reverse=True):
            os.chmod(path, opened[path])
        os.close(old_fd)
        os.close(new_fd)
    return "linked=%d" % len(entries)

def serve():
    while True:
        line = next_line()
        if line is None:
            return
        if not line.startswith("link\t"):
            continue
        try:
            _, old, new, count = line.split("\t")
            count = int(count)
        except ValueError:
            out.write(b"failed=malformed link request\n")
            out.flush()
            continue
        entries = [next_line() for _ in range(count)]
        if None in entries:
            return
        try:
            reply = link_reused(old, new, entries)
        except Exception as error:
            reply = "failed=%s" % error
        out.write(reply.encode("utf-8", "surrogateescape") + b"\n")
        out.flush()

# The record goes while the lock is still held, so a deploy that finds the lock taken never
# reads the record of a holder that has finished.
try:
    serve()
finally:
    try:
        os.unlink(path)
    except OSError:
        pass
"#;

pub fn lock_path(layout: &Layout) -> String {
    format!("{}/lock", layout.state())
}

pub fn holder_path(layout: &Layout) -> String {
    format!("{}/lock.holder", layout.state())
}

/// Tries the lock once. On success the holder prepares the layout, prints the host's facts and
/// [`LOCKED_MARKER`], and keeps running. When another deploy has the lock, the command prints that
/// deploy's holder record and exits with [`LOCK_TAKEN`].
///
/// Only the process that got the lock writes the holder file, so a deployer that failed to get
/// the lock never overwrites or releases someone else's.
///
/// With `check_unit` the facts include the unit's load state, which a push needs only when it
/// does not install the unit file itself.
pub fn acquire_command(layout: &Layout, holder_json: &str, unit: &str, check_unit: bool) -> String {
    let holder_file = quote(&holder_path(layout));
    let program = format!(
        "{}LOCKED_MARKER = {LOCKED_MARKER:?}\nARCHIVE_MTIME = {FIXED_MTIME}\n{HOLDER}",
        facts::script()
    );
    format!(
        "mkdir -p -- {state} || exit {prepare_failed}; \
         flock -n -E {LOCK_TAKEN} {lock} python3 -I -S -c {program} {holder_file} {holder} {HOLDER_TIMEOUT_SECONDS} {root} {unit} {check_unit}; \
         status=$?; if [ $status -eq {LOCK_TAKEN} ]; then cat -- {holder_file} 2>/dev/null; fi; exit $status",
        prepare_failed = facts::PREPARE_FAILED,
        state = quote(&layout.state()),
        lock = quote(&lock_path(layout)),
        program = quote(&program),
        holder = quote(holder_json),
        root = quote(&layout.root),
        unit = quote(unit),
        check_unit = u8::from(check_unit),
    )
}

/// Prints `free`, or `held` followed by the holder record, without taking the lock.
pub fn probe_command(layout: &Layout) -> String {
    format!(
        "if [ ! -e {lock} ] || flock -n {lock} true; then echo free; else echo held; cat -- {holder} 2>/dev/null; fi",
        lock = quote(&lock_path(layout)),
        holder = quote(&holder_path(layout)),
    )
}

/// Outcome of one attempt.
pub enum Attempt {
    /// The lock is held, and the text is the host's facts as [`facts::script`] prints them.
    Acquired { lock: DeployLock, facts: String },
    /// Creating the layout or reading the facts failed, or the state directory could not be created.
    /// The text is the host's stderr. The holder has exited, so the lock is free again.
    PrepareFailed(String),
    /// Another deploy holds the lock; the text is its holder record.
    Taken(String),
}

/// A held lock. Dropping it without [`DeployLock::release`] still frees it once the session ends.
pub struct DeployLock {
    /// Locked for each write, so a heartbeat never lands inside a request.
    writer: Arc<Mutex<russh::ChannelWriteHalf<Msg>>>,
    reader: Arc<Mutex<russh::ChannelReadHalf>>,
    heartbeat: JoinHandle<()>,
    /// A link request was sent and its reply not read, because the caller stopped waiting.
    unanswered: AtomicBool,
}

/// The holder's reply to a [`DeployLock::link_reused`] request.
#[derive(Debug, PartialEq, Eq)]
pub enum Linked {
    /// Every file was linked.
    All,
    /// This file no longer has the size or mode its manifest gives, so linking stopped there.
    Mismatch(String),
    /// Creating a directory or a link failed with this error.
    Failed(String),
}

impl Linked {
    fn parse(reply: &str) -> Linked {
        if let Some(path) = reply.strip_prefix("mismatch=") {
            Linked::Mismatch(path.to_string())
        } else if let Some(error) = reply.strip_prefix("failed=") {
            Linked::Failed(error.to_string())
        } else if reply.starts_with("linked=") {
            Linked::All
        } else {
            Linked::Failed(format!("unexpected reply from the lock holder: {reply}"))
        }
    }
}

/// The outcome that the holder's output reported: the lock is ours, another deploy's, or given up.
enum HolderOutcome {
    ByUs(String),
    ByOther(String),
    NotPrepared(String),
}

/// Returns the facts once the output ends with the marker line, without that line.
fn facts_before_marker(stdout: &[u8]) -> Option<String> {
    let marker = format!("\n{LOCKED_MARKER}\n");
    let facts = stdout.strip_suffix(marker.as_bytes())?;
    Some(String::from_utf8_lossy(facts).into_owned())
}

impl DeployLock {
    /// Makes one attempt to take the lock. It fails when the holder sends nothing for `deadline`.
    pub async fn try_acquire(
        session: &Session,
        layout: &Layout,
        holder_json: &str,
        unit: &str,
        check_unit: bool,
        deadline: Duration,
    ) -> Result<Attempt, SshError> {
        let command = acquire_command(layout, holder_json, unit, check_unit);
        let channel = session.open(&command).await?;
        let (mut reader, writer) = channel.split();
        // The deadline is for silence, not for the whole read: on a slow link the facts, with the
        // live release's manifest, can take longer to arrive than a step may take.
        let wait_for_holder = async {
            let mut stdout = Vec::new();
            let mut stderr = Vec::new();
            loop {
                let message = tokio::time::timeout(deadline, reader.wait())
                    .await
                    .map_err(|_| SshError::Timeout {
                        command: "the lock holder (flock, then the host's facts)".to_string(),
                        seconds: deadline.as_secs(),
                    })?;
                let Some(message) = message else {
                    break;
                };
                match message {
                    ChannelMsg::Data { data } => {
                        stdout.extend_from_slice(&data);
                        if let Some(facts) = facts_before_marker(&stdout) {
                            return Ok(HolderOutcome::ByUs(facts));
                        }
                    }
                    ChannelMsg::ExtendedData { data, .. } => stderr.extend_from_slice(&data),
                    ChannelMsg::ExitStatus { exit_status } if exit_status == LOCK_TAKEN => {
                        let record = String::from_utf8_lossy(&stdout).trim().to_string();
                        return Ok(HolderOutcome::ByOther(record));
                    }
                    ChannelMsg::ExitStatus { exit_status }
                        if exit_status == facts::PREPARE_FAILED =>
                    {
                        let message = String::from_utf8_lossy(&stderr).trim().to_string();
                        return Ok(HolderOutcome::NotPrepared(message));
                    }
                    ChannelMsg::ExitStatus { exit_status } => {
                        return Err(SshError::LockFailed {
                            exit_status,
                            stderr: String::from_utf8_lossy(&stderr).trim().to_string(),
                        });
                    }
                    _ => {}
                }
            }
            Err(SshError::ConnectionLost {
                command: short_command(&command),
            })
        };
        let holder = wait_for_holder.await?;
        let facts = match holder {
            HolderOutcome::ByUs(facts) => facts,
            HolderOutcome::ByOther(record) => return Ok(Attempt::Taken(record)),
            HolderOutcome::NotPrepared(message) => return Ok(Attempt::PrepareFailed(message)),
        };

        let writer = Arc::new(Mutex::new(writer));
        let reader = Arc::new(Mutex::new(reader));
        let heartbeat_writer = writer.clone();
        // The task keeps the reader alive too: dropping it would stop the channel's message flow.
        let kept_reader = reader.clone();
        let heartbeat = tokio::spawn(async move {
            let _reader = kept_reader;
            let mut ticks = tokio::time::interval(HEARTBEAT_INTERVAL);
            loop {
                ticks.tick().await;
                let sent = heartbeat_writer.lock().await.data_bytes(&b"\n"[..]).await;
                if sent.is_err() {
                    break;
                }
            }
        });
        Ok(Attempt::Acquired {
            lock: DeployLock {
                writer,
                reader,
                heartbeat,
                unanswered: AtomicBool::new(false),
            },
            facts,
        })
    }

    /// Asks the holder to hard-link `files` of the release directory `from` into `into`, creating
    /// the directories they need, and waits for the reply.
    ///
    /// Hard links cost no copy, but the releases then share those files' inodes: an app that
    /// rewrites a file of its release in place changes it in the earlier release too. Writes that
    /// replace a file (write a new one, then rename) leave the other release alone.
    pub async fn link_reused(
        &self,
        from: &str,
        into: &str,
        files: &[ReusedFile],
    ) -> Result<Linked, SshError> {
        let request = link_request(from, into, files);
        let lost = || SshError::ConnectionLost {
            command: "hard-linking in the lock holder".to_string(),
        };
        let mut reader = self.reader.lock().await;
        self.unanswered.store(true, Ordering::SeqCst);
        self.writer
            .lock()
            .await
            .data_bytes(request.into_bytes())
            .await
            .map_err(|_| lost())?;
        let reply = read_reply(&mut reader).await.ok_or_else(lost)?;
        self.unanswered.store(false, Ordering::SeqCst);
        Ok(Linked::parse(&reply))
    }

    /// Waits at most `timeout` for the reply to a link request whose caller stopped waiting, such
    /// as a push interrupted while the holder links. Removing the unfinished release before the
    /// holder is done would race its links and leave a partial tree behind.
    pub async fn wait_for_links(&self, timeout: Duration) {
        if !self.unanswered.load(Ordering::SeqCst) {
            return;
        }
        let mut reader = self.reader.lock().await;
        if tokio::time::timeout(timeout, read_reply(&mut reader))
            .await
            .is_ok()
        {
            self.unanswered.store(false, Ordering::SeqCst);
        }
    }

    /// Frees the lock by closing the holder's stdin.
    pub async fn release(self) {
        self.heartbeat.abort();
        let _ = self.writer.lock().await.eof().await;
    }
}

/// Reads the holder's next one-line reply, or returns `None` when its channel ends first.
async fn read_reply(reader: &mut russh::ChannelReadHalf) -> Option<String> {
    let mut reply = Vec::new();
    while let Some(message) = reader.wait().await {
        if let ChannelMsg::Data { data } = message {
            reply.extend_from_slice(&data);
            if let Some(line) = reply.strip_suffix(b"\n") {
                return Some(String::from_utf8_lossy(line).into_owned());
            }
        }
    }
    None
}

/// Formats a `link` request: a header line with the two directories and the file count, then one
/// `path\tsize\tmode` line per file, the mode in octal.
fn link_request(from: &str, into: &str, files: &[ReusedFile]) -> String {
    let mut request = format!("link\t{from}\t{into}\t{}\n", files.len());
    for file in files {
        let _ = writeln!(request, "{}\t{}\t{:o}", file.path, file.size, file.mode);
    }
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acquire_writes_holder_only_after_flock() {
        let command = acquire_command(
            &Layout::new("/srv/app"),
            r#"{"user":"ci"}"#,
            "webapp.service",
            true,
        );
        let flock = command
            .find("flock -n -E 75 /srv/app/.crucible/lock python3 -I -S -c")
            .unwrap();
        let holder = command.find(r#"'{"user":"ci"}'"#).unwrap();
        assert!(flock < holder);
        assert!(command.ends_with("exit $status"));
    }

    #[test]
    fn link_request_lists_octal_modes() {
        let files = [
            ReusedFile {
                path: "app.py".to_string(),
                size: 858,
                mode: 0o644,
            },
            ReusedFile {
                path: "bin/run".to_string(),
                size: 12,
                mode: 0o755,
            },
        ];
        assert_eq!(
            link_request(
                "/srv/app/releases/r1",
                "/srv/app/releases/r2.partial",
                &files
            ),
            "link\t/srv/app/releases/r1\t/srv/app/releases/r2.partial\t2\napp.py\t858\t644\nbin/run\t12\t755\n"
        );
    }

    #[test]
    fn holder_replies_parse() {
        assert_eq!(Linked::parse("linked=3"), Linked::All);
        assert_eq!(
            Linked::parse("mismatch=app.py"),
            Linked::Mismatch("app.py".to_string())
        );
        assert!(matches!(Linked::parse("garbage"), Linked::Failed(_)));
    }

    #[test]
    fn probe_does_not_write() {
        let command = probe_command(&Layout::new("/srv/app"));
        assert!(!command.contains(">>"));
        assert!(!command.contains(" > "));
    }
}
