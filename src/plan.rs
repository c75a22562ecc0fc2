//! The planning stage: arguments, hosts.toml and the environment become one validated plan. Nothing
//! after this stage reads the environment.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::HostConfig;
use crate::releases::{Deployer, GithubRun};
use crate::remote::Layout;
use crate::report::OutputMode;
use crate::ssh::{Credential, HostKeyPin, HostKeyPolicy, SshTarget};

/// The environment variables crucible uses, read once.
#[derive(Debug, Default)]
pub struct Environment {
    pub home: Option<PathBuf>,
    /// `CRUCIBLE_SSH_KEY`: private key text, kept in memory only.
    pub ssh_key: Option<String>,
    pub passphrase: Option<String>,
    pub agent_socket: Option<PathBuf>,
    pub deployer: Deployer,
    pub no_color: bool,
    pub github_summary: Option<PathBuf>,
    pub is_github: bool,
}

impl Environment {
    pub fn read() -> Environment {
        let var = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
        let is_github = var("GITHUB_ACTIONS").as_deref() == Some("true");
        let github = is_github.then(|| GithubRun {
            actor: var("GITHUB_ACTOR").unwrap_or_default(),
            repository: var("GITHUB_REPOSITORY").unwrap_or_default(),
            run_id: var("GITHUB_RUN_ID").unwrap_or_default(),
            commit: var("GITHUB_SHA").unwrap_or_default(),
        });
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_string())
            .unwrap_or_else(|_| "unknown".to_string());
        Environment {
            home: var("HOME").map(PathBuf::from),
            ssh_key: var("CRUCIBLE_SSH_KEY"),
            passphrase: var("CRUCIBLE_SSH_KEY_PASSPHRASE"),
            agent_socket: var("SSH_AUTH_SOCK").map(PathBuf::from),
            deployer: Deployer {
                user: var("USER")
                    .or_else(|| var("LOGNAME"))
                    .or_else(current_user_name)
                    .unwrap_or_else(|| "unknown".to_string()),
                host,
                github,
            },
            no_color: var("NO_COLOR").is_some(),
            github_summary: if is_github {
                var("GITHUB_STEP_SUMMARY").map(PathBuf::from)
            } else {
                None
            },
            is_github,
        }
    }

    pub fn output_mode(&self, json: bool, quiet: bool) -> OutputMode {
        let is_terminal = std::io::stderr().is_terminal();
        OutputMode {
            json,
            quiet,
            is_terminal,
            color: is_terminal && !self.no_color,
            github_summary: self.github_summary.clone(),
            is_github: self.is_github,
        }
    }
}

/// Everything a command needs to act on one host.
#[derive(Debug)]
pub struct HostPlan {
    pub config: HostConfig,
    pub target: SshTarget,
    pub layout: Layout,
    pub deployer: Deployer,
}

impl HostPlan {
    pub fn new(config: HostConfig, environment: &Environment) -> HostPlan {
        let target = SshTarget {
            address: config.address.clone(),
            port: config.port,
            user: config.user.clone(),
            host_key: host_key_policy(&config, environment.home.as_deref()),
            credentials: credentials(&config, environment),
            passphrase: environment.passphrase.clone(),
            connect_timeout: config.timeouts.connect,
        };
        HostPlan {
            layout: Layout::new(&config.path),
            target,
            deployer: environment.deployer.clone(),
            config,
        }
    }

    pub fn step_deadline(&self) -> Duration {
        self.config.timeouts.step
    }

    pub fn display(&self) -> String {
        format!(
            "{} ({}@{})",
            self.config.host_name,
            self.config.user,
            self.target.display_address()
        )
    }
}

fn host_key_policy(config: &HostConfig, home: Option<&Path>) -> HostKeyPolicy {
    if let Some(pin) = config
        .host_key
        .as_deref()
        .and_then(|text| HostKeyPin::parse(text).ok())
    {
        return HostKeyPolicy::Pinned(pin);
    }
    let path = config.known_hosts.clone().unwrap_or_else(|| {
        home.unwrap_or(Path::new("/nonexistent"))
            .join(".ssh/known_hosts")
    });
    HostKeyPolicy::KnownHosts(path)
}

/// Lists the keys to try, in order: `identity`, `CRUCIBLE_SSH_KEY`, ssh-agent, then the default
/// key files.
fn credentials(config: &HostConfig, environment: &Environment) -> Vec<Credential> {
    let mut credentials = Vec::new();
    if let Some(path) = &config.identity {
        credentials.push(Credential::File {
            path: path.clone(),
            is_default: false,
        });
    }
    if let Some(text) = &environment.ssh_key {
        credentials.push(Credential::Text(text.clone()));
    }
    if let Some(socket) = &environment.agent_socket {
        credentials.push(Credential::Agent(socket.clone()));
    }
    if let Some(home) = &environment.home {
        for name in ["id_ed25519", "id_ecdsa", "id_rsa"] {
            credentials.push(Credential::File {
                path: home.join(".ssh").join(name),
                is_default: true,
            });
        }
    }
    credentials
}

/// Looks up the name of the process's user in /etc/passwd, for shells that set neither `USER`
/// nor `LOGNAME`, such as a root shell entered without sudo.
fn current_user_name() -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self").ok()?.uid().to_string();
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        (fields.nth(1)? == uid).then(|| name.to_string())
    })
}
