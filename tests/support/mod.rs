//! Real-host test harness: boots Debian test hosts with systemd as PID 1 (through the
//! `testhost` script beside this file), writes projects with a hosts.toml for them, runs the
//! crucible binary and reads the hosts' state over OpenSSH.
//!
//! ```ignore
//! let Some(hosts) = support::real_hosts() else { return };
//! let host = hosts.boot();
//! let project = Project::new();
//! project.add_host("test", &host, "root", &[]);
//! let output = project.crucible(&["push", "test"]);
//! ```
//!
//! Hosts share this machine's network namespace, and each listens on its own loopback address
//! 127.0.0.N, so tests reach sshd and the app straight from the test process.

// Each test crate compiles its own copy of this module and uses only part of it.
#![allow(dead_code)]

mod process;
mod proxy;

// Only some test crates use these.
#[allow(unused_imports)]
pub use process::RunningCrucible;
#[allow(unused_imports)]
pub use proxy::TcpProxy;

use std::borrow::Cow;
use std::env;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

const TESTHOST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/testhost");
const EXAMPLE_APP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/webapp");

/// Test hosts get addresses 127.0.0.FIRST_HOST_NUMBER ..= 127.0.0.LAST_HOST_NUMBER. Addresses
/// below 10 are left to the demo (127.0.0.2) and to whatever else uses 127.0.0.1.
const FIRST_HOST_NUMBER: u32 = 10;
const LAST_HOST_NUMBER: u32 = 250;

/// A listening socket on ADDRESS:RESERVATION_PORT marks an address as taken. The kernel
/// rejects a second listener on it from any process and frees it when the owner exits, so
/// concurrent test processes never share an address and a crashed one leaves no stale lock.
const RESERVATION_PORT: u16 = 9;

/// Ports a test host serves on: sshd and the example app (`WEBAPP_PORT` in /etc/default/webapp).
const SSH_PORT: u16 = 22;
pub const APP_PORT: u16 = 8000;

/// Path of the release log on a test host, under the deploy path that `Project::add_host` writes.
pub const RELEASE_LOG: &str = "/srv/webapp/.crucible/releases.jsonl";

/// A settle window shorter than the 3 s default, for tests that do not probe the settle window.
pub const QUICK_HEALTH: &str = r#"health = { settle = "1s" }"#;

/// How long `assert_serves` waits for the app to serve a release after a restart.
const SERVE_TIMEOUT: Duration = Duration::from_secs(15);

const BOOT_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const POLL_INTERVAL: Duration = Duration::from_millis(100);
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// Value of `CRUCIBLE_REAL_HOSTS` that turns a skipped real-host test into a failure, for CI.
const REQUIRED: &str = "required";

/// Path where `.ci/run fetch-uv` extracts the pinned uv release, unless `CRUCIBLE_TEST_UV` names
/// another binary.
const DEFAULT_UV_BINARY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/target/test-tools/uv");

/// Path where [`TestHost::install_uv`] puts uv on a host, in a directory on the PATH that sshd
/// gives every user.
pub const HOST_UV_PATH: &str = "/usr/local/bin/uv";

/// Proof that this machine can boot test hosts; `real_hosts` returns one.
pub struct RealHosts {
    host_key: String,
    client_key: PathBuf,
}

/// Returns a `RealHosts` when this process can boot test hosts, and `None` after printing why
/// not. With `CRUCIBLE_REAL_HOSTS=required` it panics instead of returning `None`.
///
/// The first call in a process builds the cached rootfs if it is missing, which took 25 s on
/// a 2-core machine.
pub fn real_hosts() -> Option<RealHosts> {
    if let Err(reason) = check_prerequisites() {
        if env::var("CRUCIBLE_REAL_HOSTS").as_deref() == Ok(REQUIRED) {
            panic!("real-host tests cannot run but CRUCIBLE_REAL_HOSTS=required: {reason}");
        }
        // Written to stderr directly because libtest hides `eprintln!` output of passing tests.
        let _ = writeln!(
            io::stderr(),
            "skipped: real-host tests need root and systemd-nspawn ({reason})"
        );
        return None;
    }

    static PREPARED: OnceLock<(String, PathBuf)> = OnceLock::new();
    let (host_key, client_key) =
        PREPARED.get_or_init(|| (read_rootfs_host_key(), create_client_key()));
    Some(RealHosts {
        host_key: host_key.clone(),
        client_key: client_key.clone(),
    })
}

/// Returns the uv binary that tests install into hosts, or `None` after printing why there is
/// none. With `CRUCIBLE_REAL_HOSTS=required` it panics instead of returning `None`.
///
/// Tests download nothing themselves. The binary is `CRUCIBLE_TEST_UV` when set, else the one
/// that `.ci/run` downloads into target/test-tools.
pub fn uv_binary() -> Option<PathBuf> {
    let path = env::var_os("CRUCIBLE_TEST_UV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_UV_BINARY));
    if path.is_file() {
        return Some(path);
    }

    let reason = format!(
        "no uv binary at {}; run `.ci/run fetch-uv` to download the pinned release, or set \
         CRUCIBLE_TEST_UV to a uv binary for x86_64 Linux",
        path.display()
    );
    if env::var("CRUCIBLE_REAL_HOSTS").as_deref() == Ok(REQUIRED) {
        panic!("uv tests cannot run but CRUCIBLE_REAL_HOSTS=required: {reason}");
    }
    let _ = writeln!(io::stderr(), "skipped: {reason}");
    None
}

fn check_prerequisites() -> Result<(), String> {
    if !is_root() {
        return Err("not running as root".to_string());
    }
    for program in ["systemd-nspawn", "mmdebstrap", "ssh", "ssh-keygen"] {
        if find_in_path(program).is_none() {
            return Err(format!("`{program}` not found in PATH"));
        }
    }
    Ok(())
}

/// Reads the effective uid from /proc, which avoids a libc dependency for one number.
fn is_root() -> bool {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        == Some("0")
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|directory| directory.join(program))
        .find(|candidate| candidate.is_file())
}

fn read_rootfs_host_key() -> String {
    let output = run_checked(Command::new(TESTHOST).arg("host-key"));
    let key = String::from_utf8_lossy(&output.stdout).trim().to_string();
    assert!(
        key.starts_with("ssh-ed25519 "),
        "`testhost host-key` printed {key:?}, expected an `ssh-ed25519 AAAA...` line"
    );
    key
}

/// Creates the client key pair that every test host authorizes, once per target directory.
/// It lives under Cargo's test temp directory so that runs reuse it and no private key is
/// left behind in /tmp. It is a test key and authorizes nothing but test hosts.
fn create_client_key() -> PathBuf {
    let parent = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let directory = parent.join("crucible-test-client-key");
    let key = directory.join("id_ed25519");
    if key.is_file() {
        return key;
    }

    // Generate into a staging directory and rename it into place, so a concurrent test
    // process never reads half a key pair. A rename that loses the race leaves the winner's key.
    let staging = tempfile::Builder::new()
        .prefix("crucible-test-client-key.")
        .tempdir_in(parent)
        .expect("failed to create a staging directory under CARGO_TARGET_TMPDIR");
    let staged_key = staging.path().join("id_ed25519");
    run_checked(
        Command::new("ssh-keygen")
            .args([
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "crucible-test-client",
            ])
            .arg("-f")
            .arg(&staged_key),
    );
    if fs::rename(staging.path(), &directory).is_err() {
        assert!(
            key.is_file(),
            "failed to move the test client key into {}; remove that directory and rerun",
            directory.display()
        );
    }
    key
}

impl RealHosts {
    /// Boots a test host on a free loopback address and waits until its sshd accepts the
    /// client key. Dropping the host stops it.
    pub fn boot(&self) -> TestHost {
        let (address, reservation) = reserve_address();
        let runtime_directory = tempfile::Builder::new()
            .prefix("crucible-testhost.")
            .tempdir()
            .expect("failed to create a runtime directory for a test host");

        let known_hosts = runtime_directory.path().join("known_hosts");
        fs::write(&known_hosts, format!("{address} {}\n", self.host_key))
            .expect("failed to write the test host's known_hosts file");

        let console_log = runtime_directory.path().join("console.log");
        let console = File::create(&console_log).expect("failed to create the console log");
        let console_for_errors = console
            .try_clone()
            .expect("failed to clone the console log");

        // The machine name is also the host name inside; the pid keeps it unique on this machine.
        let name = format!("crucible-{}-{}", std::process::id(), address.octets()[3]);
        let nspawn = Command::new(TESTHOST)
            .arg("boot")
            .arg(&name)
            .arg(address.to_string())
            .arg(self.client_key.with_extension("pub"))
            .env(
                "CRUCIBLE_TESTHOST_RUNTIME_DIR",
                runtime_directory.path().join("testhost"),
            )
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(console_for_errors)
            .spawn()
            .unwrap_or_else(|error| panic!("failed to start `{TESTHOST} boot`: {error}"));

        let mut host = TestHost {
            address,
            host_key: self.host_key.clone(),
            client_key: self.client_key.clone(),
            known_hosts,
            console_log,
            nspawn,
            _reservation: reservation,
            _runtime_directory: runtime_directory,
        };
        host.wait_for_sshd();
        host
    }
}

/// Picks the next loopback address that no test process here has reserved and that has
/// nothing listening on the ports a host needs.
fn reserve_address() -> (Ipv4Addr, TcpListener) {
    static NEXT_HOST_NUMBER: AtomicU32 = AtomicU32::new(FIRST_HOST_NUMBER);
    let host_count = LAST_HOST_NUMBER - FIRST_HOST_NUMBER + 1;

    for _ in 0..host_count {
        let offset = NEXT_HOST_NUMBER.fetch_add(1, Ordering::Relaxed) - FIRST_HOST_NUMBER;
        let number = FIRST_HOST_NUMBER + offset % host_count;
        let address = Ipv4Addr::new(127, 0, 0, number as u8);

        let Ok(reservation) = TcpListener::bind((address, RESERVATION_PORT)) else {
            continue;
        };
        // A host left running by a killed test process still listens on its ports.
        if is_port_free(address, SSH_PORT) && is_port_free(address, APP_PORT) {
            return (address, reservation);
        }
    }
    panic!(
        "no free test-host address in 127.0.0.{FIRST_HOST_NUMBER}-{LAST_HOST_NUMBER}; \
         look for leftover systemd-nspawn processes with `ps -C systemd-nspawn -f` and stop them"
    );
}

fn is_port_free(address: Ipv4Addr, port: u16) -> bool {
    TcpListener::bind((address, port)).is_ok()
}

/// A booted Debian test host. Dropping it stops the host, also when a test panics.
pub struct TestHost {
    address: Ipv4Addr,
    host_key: String,
    client_key: PathBuf,
    known_hosts: PathBuf,
    console_log: PathBuf,
    nspawn: Child,
    _reservation: TcpListener,
    _runtime_directory: TempDir,
}

impl TestHost {
    /// Returns the loopback address that the host's sshd and app listen on.
    pub fn address(&self) -> Ipv4Addr {
        self.address
    }

    /// Returns the host's ed25519 public key as an OpenSSH line, `ssh-ed25519 AAAA...`.
    pub fn host_key(&self) -> &str {
        &self.host_key
    }

    /// Returns the path of the private key that the host authorizes for root and deploy.
    pub fn client_key_path(&self) -> &Path {
        &self.client_key
    }

    /// Returns the path of a known_hosts file that pins this host's key at its address.
    pub fn known_hosts_path(&self) -> &Path {
        &self.known_hosts
    }

    /// Runs `script` with root's login shell on the host, through the OpenSSH client.
    pub fn run_as_root(&self, script: &str) -> Output {
        self.run_as("root", script)
    }

    /// Runs `script` with `user`'s login shell on the host, through the OpenSSH client.
    pub fn run_as(&self, user: &str, script: &str) -> Output {
        self.ssh_command(user, script)
            .output()
            .unwrap_or_else(|error| panic!("failed to start ssh: {error}"))
    }

    /// Installs `line` as /etc/sudoers.d/crucible, after `visudo` accepted it.
    pub fn install_sudoers_line(&self, line: &str) {
        self.run_checked(&format!(
            "printf '%s\\n' {} > /etc/sudoers.d/crucible && chmod 0440 /etc/sudoers.d/crucible \
             && visudo -c -f /etc/sudoers.d/crucible",
            shlex::try_quote(line).expect("a sudoers line has no NUL byte")
        ));
    }

    /// Runs `script` as root, panics unless it exits with status 0, and returns its stdout.
    pub fn run_checked(&self, script: &str) -> String {
        let output = self.run_as_root(script);
        assert!(
            output.status.success(),
            "`{script}` on {} failed with {}:\n{}",
            self.address,
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Copies the local file `source` to `destination` on the host as a root-owned executable,
    /// through ssh's stdin, and panics unless the whole file arrived.
    pub fn install_executable(&self, source: &Path, destination: &str) {
        let file = File::open(source)
            .unwrap_or_else(|error| panic!("failed to open {}: {error}", source.display()));
        let size = file
            .metadata()
            .unwrap_or_else(|error| {
                panic!("failed to read the size of {}: {error}", source.display())
            })
            .len();

        // Written beside the destination and renamed, so a cut copy is never left executable.
        let partial = quote(&format!("{destination}.partial")).into_owned();
        let script = format!(
            "set -e; cat > {partial}; \
             test \"$(stat -c %s -- {partial})\" = {size}; \
             chmod 0755 -- {partial}; mv -f -- {partial} {}",
            quote(destination)
        );
        let output = self
            .ssh_command("root", &script)
            .stdin(file)
            .output()
            .unwrap_or_else(|error| panic!("failed to start ssh: {error}"));
        assert!(
            output.status.success(),
            "failed to copy {} to {destination} on {} ({}):\n{}",
            source.display(),
            self.address,
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Installs the local uv binary `uv` (from [`uv_binary`]) as [`HOST_UV_PATH`], where
    /// crucible's facts program finds it.
    pub fn install_uv(&self, uv: &Path) {
        self.install_executable(uv, HOST_UV_PATH);
    }

    /// Returns the target of the symbolic link at `path`, or `None` if `path` is not one.
    pub fn readlink(&self, path: &str) -> Option<String> {
        let output = self.run_as_root(&format!("readlink -- {}", quote(path)));
        output.status.success().then(|| {
            String::from_utf8_lossy(&output.stdout)
                .trim_end()
                .to_string()
        })
    }

    /// Returns the id of the release that `/srv/webapp/current` points at, and panics if there
    /// is no `current` link.
    pub fn live_release(&self) -> String {
        self.live_release_if_any()
            .expect("/srv/webapp/current is a symbolic link")
    }

    /// Returns the id of the release that `/srv/webapp/current` points at, or `None` when no
    /// push has created `current` yet, for tests that check a failed push left none behind.
    pub fn live_release_if_any(&self) -> Option<String> {
        self.readlink("/srv/webapp/current")
            .map(|target| target.trim_start_matches("releases/").to_string())
    }

    /// Returns the release id that the running app reports on `GET /health`, and panics unless
    /// the app responds 200 with a release now.
    pub fn served_release(&self) -> String {
        self.try_served_release()
            .unwrap_or_else(|error| panic!("{error}"))
    }

    /// Returns the release id that the running app reports on `GET /health`, or why there is
    /// none, so that a test can poll an app that is still starting.
    pub fn try_served_release(&self) -> Result<String, String> {
        let (status, body) = self
            .http_get(APP_PORT, "/health")
            .map_err(|error| format!("no response on /health: {error}"))?;
        if status != 200 {
            return Err(format!("/health returned {status}: {body}"));
        }
        let value: serde_json::Value = serde_json::from_str(&body)
            .map_err(|error| format!("/health body {body:?}: {error}"))?;
        value["release"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("/health body {body:?} has no release"))
    }

    /// Waits until the app responds to `GET /health`, which takes a moment after a restart, and
    /// returns the release id of that first response. Unlike [`assert_serves`], it does not wait
    /// for a particular release, so the caller compares the first release the app serves.
    pub fn wait_for_served_release(&self, timeout: Duration) -> String {
        let mut served = Err(String::from("no request sent yet"));
        let answered = wait_until(timeout, || {
            served = self.try_served_release();
            served.is_ok()
        });
        assert!(
            answered,
            "the app did not respond to /health within {timeout:?}: {}",
            served.unwrap_err()
        );
        served.expect("the app responded to /health")
    }

    /// Returns the events of the release log, oldest first, and panics on a line that is not
    /// JSON.
    pub fn log_events(&self) -> Vec<serde_json::Value> {
        self.run_checked(&format!("cat {RELEASE_LOG}"))
            .lines()
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|error| panic!("release log line {line:?}: {error}"))
            })
            .collect()
    }

    /// Returns the names in `directory` (hidden ones included), sorted, or none if it is missing.
    pub fn list_directory(&self, directory: &str) -> Vec<String> {
        let output = self.run_as_root(&format!("ls -A -- {} 2>/dev/null", quote(directory)));
        let mut names: Vec<String> = String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        names.sort();
        names
    }

    /// Returns whether a file or directory exists at `path`.
    pub fn exists(&self, path: &str) -> bool {
        self.run_as_root(&format!("test -e {}", quote(path)))
            .status
            .success()
    }

    /// Returns one property of a systemd unit, as `systemctl show --value` prints it.
    pub fn systemctl_show(&self, unit: &str, property: &str) -> String {
        let script = format!(
            "systemctl show --value --property={} -- {}",
            quote(property),
            quote(unit)
        );
        self.run_checked(&script).trim_end().to_string()
    }

    /// Sends `GET path` to the host's `port` straight from the test process and returns the
    /// status code and body. Errors are returned, not raised, so tests can poll a starting app.
    pub fn http_get(&self, port: u16, path: &str) -> io::Result<(u16, String)> {
        let address = SocketAddr::from((self.address, port));
        let mut stream = TcpStream::connect_timeout(&address, HTTP_TIMEOUT)?;
        stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
        stream.set_write_timeout(Some(HTTP_TIMEOUT))?;

        // HTTP/1.0 makes the server close the connection after one response, so the body
        // ends where the stream ends.
        write!(
            stream,
            "GET {path} HTTP/1.0\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.address
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        parse_http_response(&response).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("invalid HTTP response from {address}: {response:?}"),
            )
        })
    }

    fn ssh_command(&self, user: &str, script: &str) -> Command {
        let mut command = Command::new("ssh");
        command
            // No user or system ssh_config, so the options below are all that apply.
            .args(["-F", "/dev/null"])
            .args(["-o", "BatchMode=yes"])
            .args(["-o", "StrictHostKeyChecking=yes"])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", self.known_hosts.display()))
            .args(["-o", "IdentitiesOnly=yes"])
            .args(["-o", "ConnectTimeout=5"])
            .args(["-o", "LogLevel=ERROR"])
            .arg("-i")
            .arg(&self.client_key)
            .arg(format!("{user}@{}", self.address))
            .arg("--")
            .arg(script)
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null());
        command
    }

    fn wait_for_sshd(&mut self) {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let max_attempts = BOOT_TIMEOUT.as_millis() / POLL_INTERVAL.as_millis();
        let mut last_error = String::new();

        for _ in 0..max_attempts {
            if let Ok(Some(status)) = self.nspawn.try_wait() {
                panic!(
                    "test host {} stopped during boot with {status}; console output:\n{}",
                    self.address,
                    self.console_tail()
                );
            }
            let output = self.run_as_root("true");
            if output.status.success() {
                return;
            }
            last_error = String::from_utf8_lossy(&output.stderr).into_owned();
            if Instant::now() >= deadline {
                break;
            }
            thread::sleep(POLL_INTERVAL);
        }
        panic!(
            "test host {} did not accept ssh within {BOOT_TIMEOUT:?}; last ssh error: {}\n\
             console output:\n{}",
            self.address,
            last_error.trim(),
            self.console_tail()
        );
    }

    fn console_tail(&self) -> String {
        let console = fs::read_to_string(&self.console_log).unwrap_or_default();
        let lines: Vec<&str> = console.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Sends SIGTERM to nspawn, which shuts the host down, and kills the host's processes if
    /// that takes longer than STOP_TIMEOUT. Never panics because it runs during unwinding.
    fn stop(&mut self) {
        if let Ok(Some(_)) = self.nspawn.try_wait() {
            return;
        }
        let pid = self.nspawn.id().to_string();
        if let Err(error) = Command::new("kill").args(["-TERM", &pid]).status() {
            eprintln!(
                "failed to run `kill -TERM {pid}` for test host {}: {error}",
                self.address
            );
        }

        let stopped = wait_until(STOP_TIMEOUT, || {
            matches!(self.nspawn.try_wait(), Ok(Some(_)) | Err(_))
        });
        if !stopped {
            eprintln!(
                "test host {} did not stop within {STOP_TIMEOUT:?} after SIGTERM; killing it",
                self.address
            );
            // SIGKILL to nspawn alone would leave the host's processes running.
            match Command::new(TESTHOST).args(["force-stop", &pid]).status() {
                Ok(status) if status.success() => {}
                Ok(status) => eprintln!("`testhost force-stop {pid}` failed with {status}"),
                Err(error) => eprintln!("failed to start `testhost force-stop {pid}`: {error}"),
            }
            let _ = self.nspawn.wait();
        }
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        self.stop();
    }
}

fn parse_http_response(response: &str) -> Option<(u16, String)> {
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status_line = head.lines().next()?;
    let status = status_line.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

fn quote(word: &str) -> Cow<'_, str> {
    shlex::try_quote(word).unwrap_or_else(|error| panic!("cannot quote {word:?}: {error}"))
}

/// Calls `condition` every 100 ms until it returns true or `timeout` passes, and returns
/// whether it did. The loop is bounded by both the deadline and an attempt count.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let max_attempts = timeout.as_millis() / POLL_INTERVAL.as_millis() + 1;

    for _ in 0..max_attempts {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            break;
        }
        thread::sleep(POLL_INTERVAL);
    }
    condition()
}

fn run_checked(command: &mut Command) -> Output {
    let output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|error| panic!("failed to start {command:?}: {error}"));
    assert!(
        output.status.success(),
        "{command:?} failed with {}:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Returns what crucible wrote to stdout: command output, or the events of `--json`.
pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Returns the report and error text that crucible wrote to stderr.
pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Panics with crucible's stderr unless it exited with status 0.
pub fn assert_success(output: &Output) {
    assert!(
        output.status.success(),
        "crucible failed with {}:\n{}",
        output.status,
        stderr(output)
    );
}

/// Panics with crucible's stderr unless it exited with `code`.
pub fn assert_exit(output: &Output, code: i32) {
    assert_eq!(
        output.status.code(),
        Some(code),
        "crucible exited with {}, expected exit status {code}; stderr:\n{}",
        output.status,
        stderr(output)
    );
}

/// Returns the first line of crucible's stderr that reports `step`, such as `ok venv exit 0 ...`.
pub fn step_line(output: &Output, step: &str) -> Option<String> {
    stderr(output)
        .lines()
        .find(|line| line.split_whitespace().nth(1) == Some(step))
        .map(str::to_string)
}

/// Returns the summary event that `--json` prints last on stdout.
pub fn json_summary(output: &Output) -> serde_json::Value {
    stdout(output)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|event| event["event"] == "summary")
        .unwrap_or_else(|| panic!("no summary event on stdout; stderr:\n{}", stderr(output)))
}

/// Returns the sudoers line that crucible prints after "add:" when the deploy user has no rule.
pub fn printed_sudoers_line(output: &Output) -> String {
    let report = stderr(output);
    let line = report
        .lines()
        .find(|line| line.trim_start().starts_with("deploy ALL=(root) NOPASSWD:"))
        .unwrap_or_else(|| panic!("crucible printed no sudoers line:\n{report}"));
    line.trim().to_string()
}

/// Waits until the app on `host` serves `release`, which takes a moment after a restart, and
/// panics with the last response if it does not within 15 s.
pub fn assert_serves(host: &TestHost, release: &str) {
    let mut last = String::new();
    let serves = wait_until(SERVE_TIMEOUT, || match host.try_served_release() {
        Ok(served) => {
            last = served;
            last == release
        }
        Err(error) => {
            last = error;
            false
        }
    });
    assert!(
        serves,
        "the app should serve {release}; last response: {last}"
    );
}

/// Generates an ed25519 key pair in a new temporary directory and returns the directory and
/// the private key's path; the public key is beside it with a `.pub` extension.
pub fn generate_key() -> (TempDir, PathBuf) {
    let directory = tempfile::Builder::new()
        .prefix("crucible-test-key.")
        .tempdir()
        .expect("failed to create a directory for a test key");
    let key = directory.path().join("id_ed25519");
    run_checked(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "crucible-test-other"])
            .arg("-f")
            .arg(&key),
    );
    (directory, key)
}

/// Returns the SHA256 fingerprint (`SHA256:...`) of an OpenSSH public key line.
pub fn fingerprint(public_key: &str) -> String {
    let directory = tempfile::tempdir().expect("failed to create a temporary directory");
    let path = directory.path().join("key.pub");
    fs::write(&path, format!("{}\n", public_key.trim())).expect("failed to write a public key");
    let output = run_checked(
        Command::new("ssh-keygen")
            .args(["-E", "sha256", "-l", "-f"])
            .arg(&path),
    );
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .nth(1)
        .expect("ssh-keygen -l prints the fingerprint second")
        .to_string()
}

/// A temporary project: a copy of examples/webapp in `app/` and a hosts.toml beside it.
pub struct Project {
    directory: TempDir,
}

impl Project {
    /// Copies the example app and writes a hosts.toml with its `[app]` table and no hosts.
    pub fn new() -> Project {
        let directory = tempfile::Builder::new()
            .prefix("crucible-project.")
            .tempdir()
            .expect("failed to create a project directory");
        copy_tree(Path::new(EXAMPLE_APP), &directory.path().join("app"))
            .expect("failed to copy examples/webapp into the project");
        fs::create_dir(directory.path().join("home")).expect("failed to create the project HOME");

        let project = Project { directory };
        project.write_hosts_toml(
            r#"[app]
name = "webapp"
source = "app"
exclude = ["*.pyc", "tests/"]
requirements = "requirements.txt"
unit = "webapp.service"
unit_file = "deploy/webapp.service"
"#,
        );
        project
    }

    /// Returns the project directory, which contains hosts.toml.
    pub fn path(&self) -> &Path {
        self.directory.path()
    }

    /// Returns the directory of the example app's copy.
    pub fn app_path(&self) -> PathBuf {
        self.path().join("app")
    }

    /// Replaces hosts.toml with `contents`, for tests of invalid configurations.
    pub fn write_hosts_toml(&self, contents: &str) {
        fs::write(self.path().join("hosts.toml"), contents).expect("failed to write hosts.toml");
    }

    /// Appends a `[hosts.NAME]` table for `host` that logs in as `user` (root or deploy)
    /// with the test key and pins the host key. `extra_lines` are appended to the table as
    /// raw TOML.
    pub fn add_host(&self, name: &str, host: &TestHost, user: &str, extra_lines: &[&str]) {
        self.add_host_without(name, host, user, &[], extra_lines);
    }

    /// Like [`Project::add_host`], but leaves out the keys named in `omitted` (`"host_key"`,
    /// `"identity"`), so a test can pin the host key or pass the client key another way.
    pub fn add_host_without(
        &self,
        name: &str,
        host: &TestHost,
        user: &str,
        omitted: &[&str],
        extra_lines: &[&str],
    ) {
        let mut table = format!(
            "\n[hosts.{name}]\naddress = {}\nport = {SSH_PORT}\nuser = {}\npath = \"/srv/webapp\"\n",
            toml_string(&host.address().to_string()),
            toml_string(user),
        );
        if !omitted.contains(&"host_key") {
            table.push_str(&format!("host_key = {}\n", toml_string(host.host_key())));
        }
        if !omitted.contains(&"identity") {
            let identity = host.client_key_path().display().to_string();
            table.push_str(&format!("identity = {}\n", toml_string(&identity)));
        }
        for line in extra_lines {
            table.push_str(line);
            table.push('\n');
        }

        let mut file = fs::OpenOptions::new()
            .append(true)
            .open(self.path().join("hosts.toml"))
            .expect("failed to open hosts.toml");
        file.write_all(table.as_bytes())
            .expect("failed to append to hosts.toml");
    }

    /// Writes `contents` to `relative_path` inside the app copy, creating parent directories.
    pub fn write_file(&self, relative_path: &str, contents: &str) {
        let path = self.app_path().join(relative_path);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)
                .unwrap_or_else(|error| panic!("failed to create {}: {error}", parent.display()));
        }
        fs::write(&path, contents)
            .unwrap_or_else(|error| panic!("failed to write {}: {error}", path.display()));
    }

    /// Returns the contents of the file at `relative_path` inside the app copy.
    pub fn read_file(&self, relative_path: &str) -> String {
        let path = self.app_path().join(relative_path);
        fs::read_to_string(&path)
            .unwrap_or_else(|error| panic!("failed to read {}: {error}", path.display()))
    }

    /// Removes the file at `relative_path` inside the app copy.
    pub fn remove_file(&self, relative_path: &str) {
        let path = self.app_path().join(relative_path);
        fs::remove_file(&path)
            .unwrap_or_else(|error| panic!("failed to remove {}: {error}", path.display()));
    }

    /// Runs the crucible binary in the project directory with a fresh HOME and no ssh-agent
    /// or key from the environment, so only hosts.toml decides how it connects.
    pub fn crucible(&self, arguments: &[&str]) -> Output {
        self.crucible_with_env(arguments, &[])
    }

    /// Like [`Project::crucible`], but sets the environment variables in `variables` after
    /// clearing the inherited ones, for tests of `CRUCIBLE_SSH_KEY` and similar settings.
    pub fn crucible_with_env(&self, arguments: &[&str], variables: &[(&str, &str)]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_crucible"));
        command
            .args(arguments)
            .current_dir(self.path())
            .env("HOME", self.path().join("home"))
            .env_remove("SSH_AUTH_SOCK")
            .env_remove("CRUCIBLE_SSH_KEY")
            .stdin(Stdio::null());
        for (name, value) in variables {
            command.env(name, value);
        }
        command
            .output()
            .expect("failed to start the crucible binary")
    }
}

/// Copies a directory tree, leaving out virtual environments and bytecode caches that a
/// local run of the example app may have created.
fn copy_tree(source: &Path, destination: &Path) -> io::Result<()> {
    fs::create_dir_all(destination)?;
    for entry in fs::read_dir(source)? {
        let entry = entry?;
        let name = entry.file_name();
        if name == ".venv" || name == "__pycache__" {
            continue;
        }
        let target = destination.join(&name);
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

fn toml_string(value: &str) -> String {
    toml::Value::String(value.to_string()).to_string()
}
