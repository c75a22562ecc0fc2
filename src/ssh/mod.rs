//! One russh session per host: strict host-key checking, public-key authentication, and commands run
//! as exec channels with deadlines. Every remote step shares this one TCP connection.

use std::borrow::Cow;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use russh::client::{self, Handle};
use russh::keys::agent::AgentIdentity;
use russh::keys::agent::client::AgentClient;
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{Channel, ChannelMsg, cipher};
use thiserror::Error;
use tracing::{debug, warn};

mod socket;

use socket::AckingStream;

/// How long the client waits between keepalives when the server sends nothing, and how many
/// unanswered ones end the session. A quiet pip install stays alive; a silently dropped link ends
/// the session after about `KEEPALIVE_INTERVAL * (KEEPALIVE_MAX + 1)`.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_MAX: usize = 3;

#[derive(Debug, Error)]
pub enum SshError {
    #[error(
        "failed to connect to {address}: {source}; check the address and port, and that sshd runs"
    )]
    Connect {
        address: String,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "timed out after {seconds}s connecting to {address}; check the address and any firewall"
    )]
    ConnectTimeout { address: String, seconds: u64 },

    #[error("SSH handshake with {address} failed: {source}")]
    Handshake {
        address: String,
        #[source]
        source: russh::Error,
    },

    #[error("{0}")]
    HostKey(HostKeyRejection),

    #[error(
        "authentication as `{user}` on {address} failed; tried: {tried}. Add the public key to \
         ~{user}/.ssh/authorized_keys on the host, or set `identity` in hosts.toml"
    )]
    Authentication {
        user: String,
        address: String,
        tried: String,
    },

    #[error("failed to start `{command}` on the host: {source}")]
    Channel {
        command: String,
        #[source]
        source: russh::Error,
    },

    #[error(
        "failed to take the deploy lock (flock exited with status {exit_status}): {stderr}; check that flock and python3 are installed on the host"
    )]
    LockFailed { exit_status: u32, stderr: String },

    #[error("the SSH connection was lost while running `{command}`; push again to recover")]
    ConnectionLost { command: String },

    #[error(
        "`{command}` did not finish within {seconds}s; raise the deadline under [app.timeouts]"
    )]
    Timeout { command: String, seconds: u64 },
}

impl SshError {
    pub fn is_host_key_rejection(&self) -> bool {
        matches!(self, SshError::HostKey(_))
    }

    pub fn is_connection_failure(&self) -> bool {
        matches!(
            self,
            SshError::Connect { .. }
                | SshError::ConnectTimeout { .. }
                | SshError::Handshake { .. }
                | SshError::Authentication { .. }
        )
    }
}

/// A rejected host key: the host, both fingerprints and the reason.
#[derive(Debug, Clone)]
pub struct HostKeyRejection {
    pub address: String,
    pub expected: String,
    pub offered: String,
    pub reason: &'static str,
}

impl fmt::Display for HostKeyRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "host key of {} rejected ({}): expected {}, offered {}. If the host was rebuilt, verify the \
             new key out of band (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub on the host) and \
             update host_key in hosts.toml",
            self.address, self.reason, self.expected, self.offered
        )
    }
}

/// The host key a host must present: pinned in hosts.toml, or looked up in a known_hosts file.
#[derive(Debug, Clone)]
pub enum HostKeyPin {
    /// A whole public key, `ssh-ed25519 AAAA...`.
    Key(Box<PublicKey>),
    /// A `SHA256:...` fingerprint as `ssh-keygen -lf` prints it.
    Fingerprint(String),
}

impl HostKeyPin {
    /// Parses a `host_key` value; the error names the form that was expected.
    pub fn parse(text: &str) -> Result<HostKeyPin, String> {
        let text = text.trim();
        if let Some(digest) = text.strip_prefix("SHA256:") {
            let is_base64 = digest.len() == 43
                && digest
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '/');
            return if is_base64 {
                Ok(HostKeyPin::Fingerprint(text.to_string()))
            } else {
                Err("a SHA256 fingerprint has 43 base64 characters after `SHA256:`".to_string())
            };
        }
        PublicKey::from_openssh(text)
            .map(|key| HostKeyPin::Key(Box::new(key)))
            .map_err(|error| format!("expected `ssh-ed25519 AAAA...` or `SHA256:...` ({error})"))
    }

    fn fingerprint(&self) -> String {
        match self {
            HostKeyPin::Key(key) => key.fingerprint(HashAlg::Sha256).to_string(),
            HostKeyPin::Fingerprint(fingerprint) => fingerprint.clone(),
        }
    }

    fn matches(&self, offered: &PublicKey) -> bool {
        match self {
            HostKeyPin::Key(key) => key.key_data() == offered.key_data(),
            HostKeyPin::Fingerprint(fingerprint) => {
                offered.fingerprint(HashAlg::Sha256).to_string() == *fingerprint
            }
        }
    }
}

/// The source the host key is checked against.
#[derive(Debug, Clone)]
pub enum HostKeyPolicy {
    Pinned(HostKeyPin),
    KnownHosts(PathBuf),
}

/// One way to prove the client's identity, tried in the order given.
pub enum Credential {
    /// A private key file, from `identity` or the default `~/.ssh/id_*` names.
    File { path: PathBuf, is_default: bool },
    /// Private key text from `CRUCIBLE_SSH_KEY`; it stays in memory only.
    Text(String),
    /// The ssh-agent listening at this socket.
    Agent(PathBuf),
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::File { path, .. } => write!(f, "File({})", path.display()),
            Credential::Text(_) => write!(f, "Text(<redacted>)"),
            Credential::Agent(path) => write!(f, "Agent({})", path.display()),
        }
    }
}

/// All a session needs to connect, decided in the planning stage.
#[derive(Debug)]
pub struct SshTarget {
    pub address: String,
    pub port: u16,
    pub user: String,
    pub host_key: HostKeyPolicy,
    pub credentials: Vec<Credential>,
    pub passphrase: Option<String>,
    pub connect_timeout: Duration,
}

impl SshTarget {
    /// `address:port`, with brackets around an IPv6 address.
    pub fn display_address(&self) -> String {
        if self.address.contains(':') {
            format!("[{}]:{}", self.address, self.port)
        } else {
            format!("{}:{}", self.address, self.port)
        }
    }
}

/// The output and exit status of a remote command.
#[derive(Debug, Default, Clone)]
pub struct CommandOutput {
    /// The exit status, or `None` when the command was killed by a signal or the channel closed first.
    pub exit_status: Option<u32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl CommandOutput {
    pub fn is_success(&self) -> bool {
        self.exit_status == Some(0)
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Returns the last `lines` lines of stderr, for reports.
    pub fn stderr_tail(&self, lines: usize) -> String {
        tail_lines(&String::from_utf8_lossy(&self.stderr), lines)
    }
}

/// Returns the last `count` non-empty lines of `text`.
pub fn tail_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(count)..].join("\n")
}

struct HostKeyCheck {
    address: String,
    host: String,
    port: u16,
    policy: HostKeyPolicy,
    rejection: Arc<Mutex<Option<HostKeyRejection>>>,
}

impl HostKeyCheck {
    fn verify(&self, offered: &PublicKey) -> Result<(), HostKeyRejection> {
        let offered_fingerprint = offered.fingerprint(HashAlg::Sha256).to_string();
        let reject = |expected: String, reason: &'static str| HostKeyRejection {
            address: self.address.clone(),
            expected,
            offered: offered_fingerprint.clone(),
            reason,
        };
        match &self.policy {
            HostKeyPolicy::Pinned(pin) if pin.matches(offered) => Ok(()),
            HostKeyPolicy::Pinned(pin) => Err(reject(
                pin.fingerprint(),
                "it differs from host_key in hosts.toml",
            )),
            HostKeyPolicy::KnownHosts(path) => {
                if is_revoked(path, offered) {
                    return Err(reject(
                        "any key but this one".into(),
                        "marked @revoked in known_hosts",
                    ));
                }
                match russh::keys::check_known_hosts_path(&self.host, self.port, offered, path) {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(reject(
                        format!("an entry in {}", path.display()),
                        "unknown host: pin host_key in hosts.toml or add it to known_hosts",
                    )),
                    Err(russh::keys::Error::KeyChanged { line }) => Err(reject(
                        format!("the key on line {line} of {}", path.display()),
                        "the host key changed",
                    )),
                    Err(error) => {
                        warn!(path = %path.display(), %error, "failed to read known_hosts");
                        Err(reject(
                            format!("an entry in {}", path.display()),
                            "known_hosts is unreadable",
                        ))
                    }
                }
            }
        }
    }
}

/// Returns whether known_hosts has an `@revoked` line for this key, because russh's parser
/// skips such lines.
fn is_revoked(path: &Path, offered: &PublicKey) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else {
        return false;
    };
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("@revoked"))
        .any(|rest| {
            let mut fields = rest.split_whitespace().skip(1);
            let key_line = fields.by_ref().take(2).collect::<Vec<_>>().join(" ");
            PublicKey::from_openssh(&key_line).is_ok_and(|key| key.key_data() == offered.key_data())
        })
}

impl client::Handler for HostKeyCheck {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        offered: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = offered else {
            return Ok(false);
        };
        match self.verify(key) {
            Ok(()) => Ok(true),
            Err(rejection) => {
                *self.rejection.lock().expect("host key verdict lock") = Some(rejection);
                Ok(false)
            }
        }
    }
}

/// An authenticated SSH session. Cloning the handle is cheap; channels run concurrently on it.
#[derive(Clone)]
pub struct Session {
    handle: Arc<Handle<HostKeyCheck>>,
    pub address: String,
}

impl Session {
    /// Connects, checks the host key before anything else, and authenticates.
    pub async fn connect(target: &SshTarget) -> Result<Session, SshError> {
        let address = target.display_address();
        let rejection = Arc::new(Mutex::new(None));
        let check = HostKeyCheck {
            address: address.clone(),
            host: target.address.clone(),
            port: target.port,
            policy: target.host_key.clone(),
            rejection: rejection.clone(),
        };
        let config = Arc::new(client::Config {
            keepalive_interval: Some(KEEPALIVE_INTERVAL),
            keepalive_max: KEEPALIVE_MAX,
            nodelay: true,
            preferred: russh::Preferred {
                // aes256-gcm first: on CPUs with AES instructions it moves bytes faster than chacha20.
                cipher: Cow::Borrowed(&[
                    cipher::AES_256_GCM,
                    cipher::CHACHA20_POLY1305,
                    cipher::AES_128_GCM,
                ]),
                ..Default::default()
            },
            ..Default::default()
        });

        let socket = tokio::time::timeout(
            target.connect_timeout,
            tokio::net::TcpStream::connect((target.address.as_str(), target.port)),
        )
        .await
        .map_err(|_| SshError::ConnectTimeout {
            address: address.clone(),
            seconds: target.connect_timeout.as_secs(),
        })?
        .map_err(|source| SshError::Connect {
            address: address.clone(),
            source,
        })?;
        socket.set_nodelay(true).ok();

        let handshake = client::connect_stream(config, AckingStream::new(socket), check);
        let result = tokio::time::timeout(target.connect_timeout, handshake)
            .await
            .map_err(|_| SshError::ConnectTimeout {
                address: address.clone(),
                seconds: target.connect_timeout.as_secs(),
            })?;
        let mut handle = match result {
            Ok(handle) => handle,
            Err(source) => {
                if let Some(rejection) = rejection.lock().expect("host key verdict lock").take() {
                    return Err(SshError::HostKey(rejection));
                }
                return Err(SshError::Handshake { address, source });
            }
        };

        authenticate(&mut handle, target, &address).await?;
        Ok(Session {
            handle: Arc::new(handle),
            address,
        })
    }

    /// Opens an exec channel running `command`, for callers that stream stdin or read output live.
    pub async fn open(&self, command: &str) -> Result<Channel<client::Msg>, SshError> {
        debug!(command, "remote command");
        let channel_error = |source| SshError::Channel {
            command: short_command(command),
            source,
        };
        let channel = self
            .handle
            .channel_open_session()
            .await
            .map_err(channel_error)?;
        channel.exec(true, command).await.map_err(channel_error)?;
        Ok(channel)
    }

    /// Runs `command` with `stdin` as its input and waits up to `deadline` for it to finish.
    ///
    /// The exit status may arrive before or after EOF, so this reads until the channel closes.
    pub async fn run(
        &self,
        command: &str,
        stdin: Option<&[u8]>,
        deadline: Duration,
    ) -> Result<CommandOutput, SshError> {
        let work = async {
            let mut channel = self.open(command).await?;
            if let Some(input) = stdin {
                channel
                    .data_bytes(Bytes::copy_from_slice(input))
                    .await
                    .map_err(|source| SshError::Channel {
                        command: short_command(command),
                        source,
                    })?;
            }
            channel.eof().await.ok();
            collect_output(&mut channel, command).await
        };
        tokio::time::timeout(deadline, work)
            .await
            .map_err(|_| SshError::Timeout {
                command: short_command(command),
                seconds: deadline.as_secs(),
            })?
    }

    /// Closes the connection politely; errors are irrelevant at that point.
    pub async fn close(&self) {
        let _ = self
            .handle
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
    }
}

/// Reads a channel to its end, collecting stdout, stderr and the exit status.
pub async fn collect_output(
    channel: &mut Channel<client::Msg>,
    command: &str,
) -> Result<CommandOutput, SshError> {
    let mut output = CommandOutput::default();
    let mut closed = false;
    while let Some(message) = channel.wait().await {
        match message {
            ChannelMsg::Data { data } => {
                tracing::trace!(target: "crucible::remote", "{}", String::from_utf8_lossy(&data));
                output.stdout.extend_from_slice(&data);
            }
            ChannelMsg::ExtendedData { data, ext: 1 } => {
                tracing::trace!(target: "crucible::remote", "{}", String::from_utf8_lossy(&data));
                output.stderr.extend_from_slice(&data);
            }
            ChannelMsg::ExitStatus { exit_status } => output.exit_status = Some(exit_status),
            ChannelMsg::Close => {
                closed = true;
                break;
            }
            _ => {}
        }
    }
    if !closed && output.exit_status.is_none() {
        return Err(SshError::ConnectionLost {
            command: short_command(command),
        });
    }
    Ok(output)
}

/// Returns the first line of a command, shortened for messages, because scripts can be long.
pub fn short_command(command: &str) -> String {
    let first = command.lines().next().unwrap_or_default();
    if first.len() > 80 || command.contains('\n') {
        let cut: String = first.chars().take(77).collect();
        format!("{cut}...")
    } else {
        first.to_string()
    }
}

async fn authenticate(
    handle: &mut Handle<HostKeyCheck>,
    target: &SshTarget,
    address: &str,
) -> Result<(), SshError> {
    let mut tried = Vec::new();
    for credential in &target.credentials {
        let label = match credential {
            Credential::File { path, .. } => path.display().to_string(),
            Credential::Text(_) => "CRUCIBLE_SSH_KEY".to_string(),
            Credential::Agent(path) => format!("ssh-agent at {}", path.display()),
        };
        match try_credential(handle, target, credential).await {
            Ok(true) => {
                debug!(credential = %label, "authenticated");
                return Ok(());
            }
            Ok(false) => tried.push(format!("{label} (rejected by the host)")),
            Err(Skipped::Absent) => {}
            Err(Skipped::Unusable(reason)) => tried.push(format!("{label} ({reason})")),
        }
    }
    Err(SshError::Authentication {
        user: target.user.clone(),
        address: address.to_string(),
        tried: if tried.is_empty() {
            "no key found (set identity in hosts.toml, CRUCIBLE_SSH_KEY, or start ssh-agent)".into()
        } else {
            tried.join("; ")
        },
    })
}

enum Skipped {
    /// A default key file that does not exist: not worth mentioning.
    Absent,
    Unusable(String),
}

async fn try_credential(
    handle: &mut Handle<HostKeyCheck>,
    target: &SshTarget,
    credential: &Credential,
) -> Result<bool, Skipped> {
    let passphrase = target.passphrase.as_deref();
    let key = match credential {
        Credential::File { path, is_default } => {
            if *is_default && !path.exists() {
                return Err(Skipped::Absent);
            }
            russh::keys::load_secret_key(path, passphrase).map_err(describe_key_error)?
        }
        Credential::Text(text) => {
            russh::keys::decode_secret_key(text, passphrase).map_err(describe_key_error)?
        }
        Credential::Agent(socket) => return try_agent(handle, &target.user, socket).await,
    };
    sign_in_with_key(handle, &target.user, key).await
}

fn describe_key_error(error: russh::keys::Error) -> Skipped {
    match error {
        russh::keys::Error::KeyIsEncrypted => {
            Skipped::Unusable("encrypted; set CRUCIBLE_SSH_KEY_PASSPHRASE".to_string())
        }
        russh::keys::Error::IO(error) => Skipped::Unusable(format!("unreadable: {error}")),
        other => Skipped::Unusable(format!(
            "not a usable private key, or a wrong passphrase: {other}"
        )),
    }
}

async fn sign_in_with_key(
    handle: &mut Handle<HostKeyCheck>,
    user: &str,
    key: PrivateKey,
) -> Result<bool, Skipped> {
    let hash = handle
        .best_supported_rsa_hash()
        .await
        .ok()
        .flatten()
        .flatten();
    let key = PrivateKeyWithHashAlg::new(Arc::new(key), hash);
    handle
        .authenticate_publickey(user, key)
        .await
        .map(|result| result.success())
        .map_err(|error| Skipped::Unusable(error.to_string()))
}

async fn try_agent(
    handle: &mut Handle<HostKeyCheck>,
    user: &str,
    socket: &Path,
) -> Result<bool, Skipped> {
    let mut agent = AgentClient::connect_uds(socket)
        .await
        .map_err(|error| Skipped::Unusable(format!("unreachable: {error}")))?;
    let identities = agent
        .request_identities()
        .await
        .map_err(|error| Skipped::Unusable(error.to_string()))?;
    for identity in identities {
        let AgentIdentity::PublicKey { key, .. } = identity else {
            continue;
        };
        let hash = handle
            .best_supported_rsa_hash()
            .await
            .ok()
            .flatten()
            .flatten();
        if let Ok(result) = handle
            .authenticate_publickey_with(user, key, hash, &mut agent)
            .await
            && result.success()
        {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJiZyQGZcsUxRaK3XntfEgA2GWLcWRlfsf241uIoy7c+";

    #[test]
    fn pinned_key_parses_and_matches_itself() {
        let pin = HostKeyPin::parse(KEY).unwrap();
        let key = PublicKey::from_openssh(KEY).unwrap();
        assert!(pin.matches(&key));
    }

    #[test]
    fn fingerprint_pin_matches_key() {
        let key = PublicKey::from_openssh(KEY).unwrap();
        let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
        let pin = HostKeyPin::parse(&fingerprint).unwrap();
        assert!(pin.matches(&key));
    }

    #[test]
    fn garbage_host_key_is_rejected() {
        assert!(HostKeyPin::parse("ssh-ed25519 notbase64").is_err());
        assert!(HostKeyPin::parse("SHA256:short").is_err());
    }

    #[test]
    fn revoked_line_matches_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("known_hosts");
        std::fs::write(&path, format!("@revoked * {KEY}\n")).unwrap();
        let key = PublicKey::from_openssh(KEY).unwrap();
        assert!(is_revoked(&path, &key));
    }

    #[test]
    fn credential_debug_hides_key_text() {
        let shown = format!(
            "{:?}",
            Credential::Text("-----BEGIN OPENSSH PRIVATE KEY-----".into())
        );
        assert!(!shown.contains("BEGIN"));
    }

    #[test]
    fn tail_keeps_last_lines() {
        assert_eq!(tail_lines("a\nb\n\nc\nd\n", 2), "c\nd");
    }
}
