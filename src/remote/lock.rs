//! The deploy lock: a `flock` held by a remote process that lives exactly as long as the SSH session.
//!
//! The holder reads its stdin. When the client dies or the TCP connection is cut, sshd closes that
//! stdin, the holder exits and the kernel releases the lock at once. For a silent drop (no FIN, no
//! RST) the holder also gives up when no heartbeat line arrived for [`HOLDER_TIMEOUT_SECONDS`], so no
//! lock outlives its deployer and no force-unlock command is needed.

use std::sync::Arc;
use std::time::Duration;

use russh::ChannelMsg;
use russh::client::Msg;
use tokio::task::JoinHandle;

use super::{Layout, quote};
use crate::ssh::{Session, SshError, short_command};

/// How often the client sends a heartbeat line to the holder.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

/// How long the holder waits for a heartbeat before it exits and frees the lock.
const HOLDER_TIMEOUT_SECONDS: u32 = 15;

/// `flock`'s exit status when the lock is taken (its `-E` option).
const LOCK_TAKEN: u32 = 75;

/// The holder process: it records who holds the lock, reports `locked`, then reads heartbeats until
/// EOF or a timeout.
const HOLDER: &str = r#"import os, select, sys
path, holder, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
with open(path + ".tmp", "w") as f:
    f.write(holder + "\n")
os.replace(path + ".tmp", path)
sys.stdout.write("locked\n")
sys.stdout.flush()
while True:
    ready, _, _ = select.select([0], [], [], timeout)
    if not ready:
        sys.exit(3)
    if not os.read(0, 4096):
        break
"#;

pub fn lock_path(layout: &Layout) -> String {
    format!("{}/lock", layout.state())
}

pub fn holder_path(layout: &Layout) -> String {
    format!("{}/lock.holder", layout.state())
}

/// Tries the lock once. On success the holder prints `locked` and keeps running; when another
/// deploy holds it, the command prints that deploy's holder record and exits with [`LOCK_TAKEN`].
///
/// Only the process that got the lock writes the holder file, so a deployer that failed to get
/// the lock never overwrites or releases someone else's.
pub fn acquire_command(layout: &Layout, holder_json: &str) -> String {
    let holder_file = quote(&holder_path(layout));
    format!(
        "mkdir -p -- {state} && flock -n -E {LOCK_TAKEN} {lock} python3 -c {script} {holder_file} {holder} {HOLDER_TIMEOUT_SECONDS}; \
         status=$?; if [ $status -eq {LOCK_TAKEN} ]; then cat -- {holder_file} 2>/dev/null; fi; exit $status",
        state = quote(&layout.state()),
        lock = quote(&lock_path(layout)),
        script = quote(HOLDER),
        holder = quote(holder_json),
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
    Acquired(DeployLock),
    /// Another deploy holds the lock; the text is its holder record.
    Taken(String),
}

/// A held lock. Dropping it without [`DeployLock::release`] still frees it once the session ends.
pub struct DeployLock {
    writer: Arc<russh::ChannelWriteHalf<Msg>>,
    heartbeat: JoinHandle<()>,
}

impl DeployLock {
    /// Makes one attempt to take the lock, waiting at most `deadline` for the holder to start.
    pub async fn try_acquire(
        session: &Session,
        layout: &Layout,
        holder_json: &str,
        deadline: Duration,
    ) -> Result<Attempt, SshError> {
        let command = acquire_command(layout, holder_json);
        let channel = session.open(&command).await?;
        let (mut reader, writer) = channel.split();
        let wait_for_holder = async {
            let mut stdout = Vec::new();
            let mut stderr = Vec::new();
            while let Some(message) = reader.wait().await {
                match message {
                    ChannelMsg::Data { data } => {
                        stdout.extend_from_slice(&data);
                        // A host whose python3 prints a banner first still reports `locked`
                        // on a line of its own.
                        if stdout
                            .split(|byte| *byte == b'\n')
                            .any(|line| line == b"locked")
                            && stdout.ends_with(b"\n")
                        {
                            return Ok(None);
                        }
                    }
                    ChannelMsg::ExtendedData { data, .. } => stderr.extend_from_slice(&data),
                    ChannelMsg::ExitStatus { exit_status } if exit_status == LOCK_TAKEN => {
                        return Ok(Some(String::from_utf8_lossy(&stdout).trim().to_string()));
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
        let holder = tokio::time::timeout(deadline, wait_for_holder)
            .await
            .map_err(|_| SshError::Timeout {
                command: "flock (deploy lock)".to_string(),
                seconds: deadline.as_secs(),
            })??;
        if let Some(holder) = holder {
            return Ok(Attempt::Taken(holder));
        }

        let writer = Arc::new(writer);
        let heartbeat_writer = writer.clone();
        let heartbeat = tokio::spawn(async move {
            // Keep the reader alive too: dropping it would stop the channel's message flow.
            let _reader = reader;
            let mut ticks = tokio::time::interval(HEARTBEAT_INTERVAL);
            loop {
                ticks.tick().await;
                if heartbeat_writer.data_bytes(&b"\n"[..]).await.is_err() {
                    break;
                }
            }
        });
        Ok(Attempt::Acquired(DeployLock { writer, heartbeat }))
    }

    /// Frees the lock by closing the holder's stdin.
    pub async fn release(self) {
        self.heartbeat.abort();
        let _ = self.writer.eof().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acquire_writes_holder_only_after_flock() {
        let command = acquire_command(&Layout::new("/srv/app"), r#"{"user":"ci"}"#);
        let flock = command
            .find("flock -n -E 75 /srv/app/.crucible/lock python3")
            .unwrap();
        let holder = command.find(r#"'{"user":"ci"}'"#).unwrap();
        assert!(flock < holder);
        assert!(command.ends_with("exit $status"));
    }

    #[test]
    fn probe_does_not_write() {
        let command = probe_command(&Layout::new("/srv/app"));
        assert!(!command.contains(">>"));
        assert!(!command.contains(" > "));
    }
}
