//! Running crucible in the background, so a test can signal it or cut its connection mid-step,
//! and the project helpers those tests need.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::{Project, TestHost, toml_string, wait_until};

impl Project {
    /// Starts the crucible binary like [`Project::crucible`] without waiting for it. Its stdout
    /// and stderr go to files in the project directory, so they can be read while it runs.
    pub fn spawn_crucible(&self, arguments: &[&str]) -> RunningCrucible {
        static NEXT_RUN: AtomicU32 = AtomicU32::new(0);
        let run = NEXT_RUN.fetch_add(1, Ordering::Relaxed);
        let stdout_path = self.path().join(format!("run-{run}.stdout"));
        let stderr_path = self.path().join(format!("run-{run}.stderr"));
        let stdout = File::create(&stdout_path).expect("failed to create a stdout file");
        let stderr = File::create(&stderr_path).expect("failed to create a stderr file");
        let child = Command::new(env!("CARGO_BIN_EXE_crucible"))
            .args(arguments)
            .current_dir(self.path())
            .env("HOME", self.path().join("home"))
            .env_remove("SSH_AUTH_SOCK")
            .env_remove("CRUCIBLE_SSH_KEY")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("failed to start the crucible binary");
        RunningCrucible {
            child,
            stdout_path,
            stderr_path,
        }
    }

    /// Writes `size` random bytes to `relative_path` inside the app copy. Random bytes do not
    /// compress, so uploading this file means sending all `size` bytes.
    pub fn write_random_file(&self, relative_path: &str, size: u64) {
        let path = self.app_path().join(relative_path);
        let mut source = File::open("/dev/urandom").expect("failed to open /dev/urandom");
        let mut file = File::create(&path)
            .unwrap_or_else(|error| panic!("failed to create {}: {error}", path.display()));
        let copied = io::copy(&mut (&mut source).take(size), &mut file)
            .unwrap_or_else(|error| panic!("failed to write {}: {error}", path.display()));
        assert_eq!(copied, size, "short write to {}", path.display());
    }

    /// Appends a `[hosts.NAME]` table like [`Project::add_host`] does, but with `ssh_address`
    /// as the address and port, for example a [`super::TcpProxy`] in front of the host. The
    /// pinned host key is still `host`'s.
    pub fn add_host_at(
        &self,
        name: &str,
        host: &TestHost,
        ssh_address: SocketAddr,
        user: &str,
        extra_lines: &[&str],
    ) {
        let mut table = format!(
            "\n[hosts.{name}]\naddress = {}\nport = {}\nuser = {}\npath = \"/srv/webapp\"\n\
             host_key = {}\nidentity = {}\n",
            toml_string(&ssh_address.ip().to_string()),
            ssh_address.port(),
            toml_string(user),
            toml_string(host.host_key()),
            toml_string(&host.client_key_path().display().to_string()),
        );
        for line in extra_lines {
            table.push_str(line);
            table.push('\n');
        }
        let mut file = OpenOptions::new()
            .append(true)
            .open(self.path().join("hosts.toml"))
            .expect("failed to open hosts.toml");
        file.write_all(table.as_bytes())
            .expect("failed to append to hosts.toml");
    }
}

/// How often [`RunningCrucible::wait_for_stderr`] reads the stderr file.
const STDERR_POLL: Duration = Duration::from_millis(2);

/// A crucible process started by [`Project::spawn_crucible`]. Dropping it kills the process if
/// it is still running.
pub struct RunningCrucible {
    child: Child,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
}

impl RunningCrucible {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Returns what the process has written to stderr so far.
    pub fn stderr_so_far(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Polls stderr every 2 ms until it contains `text`, so a test can act right after a step
    /// ends. Returns false when `timeout` passes or the process exits first.
    pub fn wait_for_stderr(&mut self, text: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let max_polls = timeout.as_millis() / STDERR_POLL.as_millis() + 1;
        for _ in 0..max_polls {
            if self.stderr_so_far().contains(text) {
                return true;
            }
            if Instant::now() >= deadline || !self.is_running() {
                break;
            }
            thread::sleep(STDERR_POLL);
        }
        self.stderr_so_far().contains(text)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills the process with SIGKILL, which it cannot handle, and reaps it.
    pub fn kill(&mut self) -> ExitStatus {
        let _ = self.child.kill();
        self.child
            .wait()
            .expect("failed to reap the crucible process")
    }

    /// Sends `signal`, a name that `kill -s` accepts such as TERM or INT, to the process.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill")
            .args(["-s", signal, &pid])
            .status()
            .expect("failed to start kill");
        assert!(
            status.success(),
            "`kill -s {signal} {pid}` failed with {status}"
        );
    }

    /// Waits up to `timeout` for the process to exit and returns its status and output. Kills
    /// it and panics if it is still running then.
    pub fn wait(mut self, timeout: Duration) -> Output {
        if !wait_until(timeout, || !self.is_running()) {
            let stderr = self.stderr_so_far();
            self.kill();
            panic!("crucible did not exit within {timeout:?}; its stderr:\n{stderr}");
        }
        let status = self
            .child
            .wait()
            .expect("failed to reap the crucible process");
        Output {
            status,
            stdout: fs::read(&self.stdout_path).unwrap_or_default(),
            stderr: fs::read(&self.stderr_path).unwrap_or_default(),
        }
    }
}

impl Drop for RunningCrucible {
    fn drop(&mut self) {
        if self.is_running() {
            self.kill();
        }
    }
}
