//! hosts.toml: its types, how a host's table overrides `[app]`, and errors that name the line and key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

/// The default number of releases kept on a host after each successful push or rollback.
pub const DEFAULT_KEEP: u32 = 5;

/// The default gzip level: on a fast link the host's single-threaded `tar -xz` is the slow end,
/// and level 1 compresses several times faster than level 6 for a slightly larger stream.
pub const DEFAULT_COMPRESSION_LEVEL: u32 = 1;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error(
        "failed to read {path}: {source}; pass --config PATH or create one with `crucible init`"
    )]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("invalid {path}, line {line}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },

    #[error("invalid {path}: {table} is missing `{key}`; {hint}")]
    Missing {
        path: PathBuf,
        table: String,
        key: &'static str,
        hint: &'static str,
    },

    #[error("invalid {path}: {table}.{key} = {value:?}: {message}")]
    Invalid {
        path: PathBuf,
        table: String,
        key: &'static str,
        value: String,
        message: String,
    },

    #[error("host `{name}` not found in {path}; defined hosts: {known}")]
    UnknownHost {
        path: PathBuf,
        name: String,
        known: String,
    },
}

/// The keys of `[app]`, which every `[hosts.NAME]` table may also set to override them.
///
/// Connection keys (`address`, `port`, `user`, `path`, ...) may also stand in `[app]`, where they act as
/// defaults for every host. One struct serves both tables so that `deny_unknown_fields` catches a typo
/// in either of them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub name: Option<String>,
    pub source: Option<PathBuf>,
    pub exclude: Option<Vec<String>>,
    pub requirements: Option<PathBuf>,
    pub unit: Option<String>,
    pub unit_file: Option<PathBuf>,
    pub shared: Option<Vec<String>>,
    pub keep: Option<u32>,
    pub delta: Option<bool>,
    pub compression_level: Option<u32>,
    pub address: Option<String>,
    pub port: Option<u16>,
    pub user: Option<String>,
    pub path: Option<String>,
    pub host_key: Option<String>,
    pub identity: Option<PathBuf>,
    pub known_hosts: Option<PathBuf>,
    pub health: Option<HealthSettings>,
    pub timeouts: Option<TimeoutSettings>,
}

impl Settings {
    /// Returns whether this table sets `key`, a key name as error messages give it.
    fn sets(&self, key: &str) -> bool {
        match key.split('.').next().unwrap_or(key) {
            "name" => self.name.is_some(),
            "source" => self.source.is_some(),
            "exclude" => self.exclude.is_some(),
            "requirements" => self.requirements.is_some(),
            "unit" => self.unit.is_some(),
            "unit_file" => self.unit_file.is_some(),
            "shared" => self.shared.is_some(),
            "keep" => self.keep.is_some(),
            "compression_level" => self.compression_level.is_some(),
            "address" => self.address.is_some(),
            "user" => self.user.is_some(),
            "path" => self.path.is_some(),
            "host_key" => self.host_key.is_some(),
            "identity" => self.identity.is_some(),
            "known_hosts" => self.known_hosts.is_some(),
            "health" => self.health.is_some(),
            "timeouts" => self.timeouts.is_some(),
            _ => true,
        }
    }
}

/// `[app.health]`: what must hold after a restart before a release counts as healthy.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HealthSettings {
    /// A URL probed from the host itself, for example `http://127.0.0.1:8000/health`.
    pub http: Option<String>,
    /// A shell command run in the release directory; exit status 0 means healthy.
    pub command: Option<String>,
    /// How long the probes may keep failing before the release is declared unhealthy.
    pub timeout: Option<String>,
    /// How long the unit must stay active, with no new restarts, after `systemctl restart`.
    pub settle: Option<String>,
}

/// `[app.timeouts]`: a deadline for each kind of remote step.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TimeoutSettings {
    pub connect: Option<String>,
    pub upload: Option<String>,
    pub venv: Option<String>,
    pub restart: Option<String>,
    pub step: Option<String>,
}

/// The whole file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    app: Settings,
    #[serde(default)]
    hosts: BTreeMap<String, Settings>,
}

/// A loaded hosts.toml: where it lives and its tables.
#[derive(Debug)]
pub struct Config {
    pub path: PathBuf,
    pub app: Settings,
    pub hosts: BTreeMap<String, Settings>,
}

/// One host's resolved settings: its table laid over `[app]`, with defaults filled in and paths made
/// absolute against the directory of hosts.toml.
#[derive(Debug, Clone)]
pub struct HostConfig {
    pub host_name: String,
    pub app_name: String,
    pub source: PathBuf,
    pub exclude: Vec<String>,
    pub requirements: Option<PathBuf>,
    pub unit: String,
    pub unit_file: Option<PathBuf>,
    pub shared: Vec<String>,
    pub keep: u32,
    /// Send only the files that differ from the live release.
    pub delta: bool,
    /// gzip level of the upload, 1 (fastest) to 9 (smallest).
    pub compression_level: u32,
    pub address: String,
    pub port: u16,
    pub user: String,
    pub path: String,
    pub host_key: Option<String>,
    pub identity: Option<PathBuf>,
    pub known_hosts: Option<PathBuf>,
    pub health: Health,
    pub timeouts: Timeouts,
}

/// Resolved health gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub http: Option<String>,
    pub command: Option<String>,
    pub timeout: Duration,
    pub settle: Duration,
}

/// Resolved step deadlines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub upload: Duration,
    pub venv: Duration,
    pub restart: Duration,
    pub step: Duration,
}

impl Config {
    /// Reads and parses hosts.toml, rejecting unknown keys.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(path, &text)
    }

    /// Parses hosts.toml text; `path` is only used in messages and to resolve relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let file: File = toml::from_str(text).map_err(|error| {
            let message = error.message().trim_end();
            let Some(span) = error.span() else {
                return ConfigError::Parse {
                    path: path.to_path_buf(),
                    line: 1,
                    message: message.to_string(),
                };
            };
            // Quoting the line names the key or table, which toml's type errors leave out.
            let line_start = text[..span.start].rfind('\n').map_or(0, |index| index + 1);
            let line_end = text[span.start..]
                .find('\n')
                .map_or(text.len(), |index| span.start + index);
            let source_line: String = text[line_start..line_end].trim().chars().take(80).collect();
            ConfigError::Parse {
                path: path.to_path_buf(),
                line: text[..span.start].matches('\n').count() + 1,
                message: if source_line.is_empty() {
                    message.to_string()
                } else {
                    format!("{message}, in `{source_line}`")
                },
            }
        })?;
        Ok(Config {
            path: path.to_path_buf(),
            app: file.app,
            hosts: file.hosts,
        })
    }

    /// Resolves every host, so that a mistake in any of them is reported before anything connects.
    pub fn validate_all(&self) -> Result<(), ConfigError> {
        for name in self.hosts.keys() {
            self.host(name)?;
        }
        Ok(())
    }

    /// Resolves the host called `name`: its table over `[app]`, then defaults and checks.
    pub fn host(&self, name: &str) -> Result<HostConfig, ConfigError> {
        let Some(table) = self.hosts.get(name) else {
            let known: Vec<&str> = self.hosts.keys().map(String::as_str).collect();
            return Err(ConfigError::UnknownHost {
                path: self.path.clone(),
                name: name.to_string(),
                known: if known.is_empty() {
                    "none (add a [hosts.NAME] table)".to_string()
                } else {
                    known.join(", ")
                },
            });
        };
        let merged = overlay(&self.app, table);
        Resolver {
            path: &self.path,
            table: format!("[hosts.{name}]"),
            host: table,
        }
        .resolve(name, merged)
    }
}

/// Lays `host` over `app`: each key the host sets replaces the app's value whole.
fn overlay(app: &Settings, host: &Settings) -> Settings {
    let host = host.clone();
    let app = app.clone();
    Settings {
        name: host.name.or(app.name),
        source: host.source.or(app.source),
        exclude: host.exclude.or(app.exclude),
        requirements: host.requirements.or(app.requirements),
        unit: host.unit.or(app.unit),
        unit_file: host.unit_file.or(app.unit_file),
        shared: host.shared.or(app.shared),
        keep: host.keep.or(app.keep),
        delta: host.delta.or(app.delta),
        compression_level: host.compression_level.or(app.compression_level),
        address: host.address.or(app.address),
        port: host.port.or(app.port),
        user: host.user.or(app.user),
        path: host.path.or(app.path),
        host_key: host.host_key.or(app.host_key),
        identity: host.identity.or(app.identity),
        known_hosts: host.known_hosts.or(app.known_hosts),
        health: host.health.or(app.health),
        timeouts: host.timeouts.or(app.timeouts),
    }
}

struct Resolver<'a> {
    path: &'a Path,
    table: String,
    /// The host's own table, to tell whether a bad value came from it or from `[app]`.
    host: &'a Settings,
}

impl Resolver<'_> {
    fn resolve(&self, host_name: &str, settings: Settings) -> Result<HostConfig, ConfigError> {
        let base = self.path.parent().unwrap_or(Path::new("."));
        let app_name = self.required(settings.name, "name", "set name = \"webapp\" in [app]")?;
        let unit = self.required(
            settings.unit,
            "unit",
            "set unit = \"webapp.service\" in [app]",
        )?;
        let address = self.required(settings.address, "address", "set address = \"HOST\"")?;
        let user = self.required(settings.user, "user", "set user = \"deploy\"")?;
        let path = self.required(settings.path, "path", "set path = \"/srv/APP\"")?;

        self.check_name("name", &app_name)?;
        self.check_unit(&unit)?;
        self.check_remote_path(&path)?;
        for (key, value) in [
            ("requirements", &settings.requirements),
            ("unit_file", &settings.unit_file),
        ] {
            if let Some(value) = value {
                self.check_no_control(key, &value.to_string_lossy())?;
            }
        }
        let shared = settings.shared.unwrap_or_default();
        for entry in &shared {
            self.check_shared(entry)?;
        }
        let keep = settings.keep.unwrap_or(DEFAULT_KEEP);
        if keep < 2 {
            return Err(self.invalid(
                "keep",
                keep.to_string(),
                "must be at least 2, so the live release and its rollback target both stay",
            ));
        }
        let compression_level = settings
            .compression_level
            .unwrap_or(DEFAULT_COMPRESSION_LEVEL);
        if !(1..=9).contains(&compression_level) {
            return Err(self.invalid(
                "compression_level",
                compression_level.to_string(),
                "must be from 1 (fastest) to 9 (smallest)",
            ));
        }
        if let Some(host_key) = &settings.host_key {
            crate::ssh::HostKeyPin::parse(host_key)
                .map_err(|message| self.invalid("host_key", host_key.clone(), &message))?;
        }
        let source = base.join(settings.source.unwrap_or_else(|| PathBuf::from(".")));
        if !source.is_dir() {
            return Err(self.invalid(
                "source",
                source.display().to_string(),
                "is not a directory; set it to the app's directory, relative to hosts.toml",
            ));
        }

        Ok(HostConfig {
            host_name: host_name.to_string(),
            app_name,
            exclude: settings.exclude.unwrap_or_default(),
            requirements: settings.requirements,
            unit,
            unit_file: settings.unit_file,
            shared,
            keep,
            delta: settings.delta.unwrap_or(true),
            compression_level,
            address,
            port: settings.port.unwrap_or(22),
            user,
            path: path.trim_end_matches('/').to_string(),
            host_key: settings.host_key,
            identity: settings.identity.map(|path| expand_home(base, &path)),
            known_hosts: settings.known_hosts.map(|path| expand_home(base, &path)),
            health: self.health(settings.health.unwrap_or_default())?,
            timeouts: self.timeouts(settings.timeouts.unwrap_or_default())?,
            source,
        })
    }

    fn health(&self, health: HealthSettings) -> Result<Health, ConfigError> {
        if let Some(url) = &health.http {
            self.check_no_control("health.http", url)?;
        }
        if let Some(command) = &health.command {
            self.check_no_control("health.command", command)?;
        }
        if let Some(url) = &health.http
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(self.invalid("health.http", url.clone(), "must start with http://"));
        }
        Ok(Health {
            timeout: self.duration("health.timeout", health.timeout, 30)?,
            settle: self.duration("health.settle", health.settle, 3)?,
            http: health.http,
            command: health.command,
        })
    }

    fn timeouts(&self, timeouts: TimeoutSettings) -> Result<Timeouts, ConfigError> {
        Ok(Timeouts {
            connect: self.duration("timeouts.connect", timeouts.connect, 15)?,
            upload: self.duration("timeouts.upload", timeouts.upload, 600)?,
            venv: self.duration("timeouts.venv", timeouts.venv, 900)?,
            restart: self.duration("timeouts.restart", timeouts.restart, 120)?,
            step: self.duration("timeouts.step", timeouts.step, 60)?,
        })
    }

    fn duration(
        &self,
        key: &'static str,
        value: Option<String>,
        default_seconds: u64,
    ) -> Result<Duration, ConfigError> {
        match value {
            None => Ok(Duration::from_secs(default_seconds)),
            Some(text) => humantime::parse_duration(&text).map_err(|error| {
                self.invalid(
                    key,
                    text.clone(),
                    &format!("{error}; write it like \"30s\" or \"5m\""),
                )
            }),
        }
    }

    fn required<T>(
        &self,
        value: Option<T>,
        key: &'static str,
        hint: &'static str,
    ) -> Result<T, ConfigError> {
        value.ok_or_else(|| ConfigError::Missing {
            path: self.path.to_path_buf(),
            table: self.table.clone(),
            key,
            hint,
        })
    }

    fn invalid(&self, key: &'static str, value: String, message: &str) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            table: if self.host.sets(key) {
                self.table.clone()
            } else {
                "[app]".to_string()
            },
            key,
            value,
            message: message.to_string(),
        }
    }

    fn check_name(&self, key: &'static str, value: &str) -> Result<(), ConfigError> {
        let is_valid = !value.is_empty()
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if is_valid {
            Ok(())
        } else {
            Err(self.invalid(
                key,
                value.to_string(),
                "use only letters, digits, '-', '_' and '.'",
            ))
        }
    }

    fn check_unit(&self, unit: &str) -> Result<(), ConfigError> {
        self.check_name("unit", unit)?;
        if unit.contains('.') {
            Ok(())
        } else {
            Err(self.invalid(
                "unit",
                unit.to_string(),
                "name the unit with its suffix, e.g. \"webapp.service\"",
            ))
        }
    }

    fn check_remote_path(&self, path: &str) -> Result<(), ConfigError> {
        self.check_no_control("path", path)?;
        if !path.starts_with('/') {
            return Err(self.invalid(
                "path",
                path.to_string(),
                "must be an absolute path on the host",
            ));
        }
        if path.split('/').any(|part| part == "..") || path.trim_end_matches('/').is_empty() {
            return Err(self.invalid(
                "path",
                path.to_string(),
                "must be a directory below / without `..`",
            ));
        }
        Ok(())
    }

    /// Rejects NUL and other control characters in a value that reaches the host's shell: a NUL
    /// cannot be quoted for a shell at all, and a newline would end a line of a remote script.
    fn check_no_control(&self, key: &'static str, value: &str) -> Result<(), ConfigError> {
        if value.chars().any(char::is_control) {
            return Err(self.invalid(
                key,
                value.to_string(),
                "must not contain control characters such as NUL or a newline",
            ));
        }
        Ok(())
    }

    fn check_shared(&self, entry: &str) -> Result<(), ConfigError> {
        self.check_no_control("shared", entry)?;
        let trimmed = entry.trim_end_matches('/');
        let is_valid = !trimmed.is_empty()
            && !trimmed.starts_with('/')
            && !trimmed
                .split('/')
                .any(|part| part == ".." || part == "." || part.is_empty());
        if is_valid {
            Ok(())
        } else {
            Err(self.invalid(
                "shared",
                entry.to_string(),
                "must be a relative path inside the release, like \".env\" or \"data/\"",
            ))
        }
    }
}

/// Expands a leading `~/` to `$HOME` and makes a relative path relative to hosts.toml's directory.
fn expand_home(base: &Path, path: &Path) -> PathBuf {
    if let Ok(rest) = path.strip_prefix("~")
        && let Some(home) = std::env::var_os("HOME")
    {
        return PathBuf::from(home).join(rest);
    }
    base.join(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = r#"
[app]
name = "webapp"
source = "."
unit = "webapp.service"
path = "/srv/webapp"

[hosts.prod]
address = "203.0.113.10"
user = "deploy"
host_key = "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU"

[hosts.staging]
address = "203.0.113.11"
user = "root"
keep = 3
path = "/opt/webapp"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("hosts.toml"), text)
    }

    #[test]
    fn host_table_overrides_app_keys() {
        let config = parse(VALID).unwrap();
        let staging = config.host("staging").unwrap();
        assert_eq!(staging.path, "/opt/webapp");
        assert_eq!(staging.keep, 3);
        let prod = config.host("prod").unwrap();
        assert_eq!(prod.path, "/srv/webapp");
        assert_eq!(prod.keep, DEFAULT_KEEP);
        assert_eq!(prod.port, 22);
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let text = VALID.replace("user = \"deploy\"", "usr = \"deploy\"");
        let error = parse(&text).unwrap_err().to_string();
        assert!(error.contains("line 10"), "{error}");
        assert!(error.contains("unknown field `usr`"), "{error}");
        assert!(error.contains("hosts.toml"), "{error}");
    }

    #[test]
    fn wrong_type_names_line() {
        let text = VALID.replace("keep = 3", "keep = \"three\"");
        let error = parse(&text).unwrap_err().to_string();
        assert!(error.contains("line 16"), "{error}");
        assert!(
            error.contains("`keep = \"three\"`"),
            "the message quotes the line: {error}"
        );
    }

    #[test]
    fn missing_address_names_table() {
        let text = VALID.replace("address = \"203.0.113.11\"\n", "");
        let error = parse(&text)
            .unwrap()
            .host("staging")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("[hosts.staging] is missing `address`"),
            "{error}"
        );
    }

    #[test]
    fn unknown_host_lists_defined_hosts() {
        let error = parse(VALID).unwrap().host("qa").unwrap_err().to_string();
        assert!(error.contains("host `qa` not found"), "{error}");
        assert!(error.contains("prod, staging"), "{error}");
    }

    #[test]
    fn relative_remote_path_is_rejected() {
        let text = VALID.replace("/opt/webapp", "opt/webapp");
        let error = parse(&text)
            .unwrap()
            .host("staging")
            .unwrap_err()
            .to_string();
        assert!(error.contains("path = \"opt/webapp\""), "{error}");
        assert!(error.contains("absolute"), "{error}");
    }

    #[test]
    fn keep_below_two_is_rejected() {
        let text = VALID.replace("keep = 3", "keep = 1");
        let error = parse(&text)
            .unwrap()
            .host("staging")
            .unwrap_err()
            .to_string();
        assert!(error.contains("keep = \"1\""), "{error}");
        assert!(error.contains("[hosts.staging].keep"), "{error}");
    }

    #[test]
    fn app_value_error_names_app_table() {
        let text = VALID.replace("path = \"/srv/webapp\"", "path = \"/srv/webapp\"\nkeep = 1");
        let error = parse(&text).unwrap().host("prod").unwrap_err().to_string();
        assert!(error.contains("[app].keep"), "{error}");
    }

    #[test]
    fn malformed_host_key_is_rejected() {
        let text = VALID.replace("SHA256:47DEQ", "MD5:47DEQ");
        let error = parse(&text).unwrap().host("prod").unwrap_err().to_string();
        assert!(error.contains("host_key"), "{error}");
    }

    #[test]
    fn bad_duration_says_how_to_write_one() {
        let text = VALID.replace(
            "keep = 3",
            "keep = 3\ntimeouts = { venv = \"ten minutes\" }",
        );
        let error = parse(&text)
            .unwrap()
            .host("staging")
            .unwrap_err()
            .to_string();
        assert!(error.contains("timeouts.venv"), "{error}");
        assert!(error.contains("\"5m\""), "{error}");
    }

    #[test]
    fn shared_path_escaping_release_is_rejected() {
        for bad in ["../secrets", "/etc/passwd", "a/../../b", ""] {
            let text = VALID.replace("keep = 3", &format!("keep = 3\nshared = [{bad:?}]"));
            let result = parse(&text).unwrap().host("staging");
            assert!(result.is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn control_characters_are_rejected() {
        for (key, bad) in [("path", "\"/srv/a\\u0000b\""), ("path", "\"/srv/a\\nb\"")] {
            let text = VALID.replace("path = \"/opt/webapp\"", &format!("{key} = {bad}"));
            let error = parse(&text)
                .unwrap()
                .host("staging")
                .unwrap_err()
                .to_string();
            assert!(error.contains("control characters"), "{bad}: {error}");
        }
    }

    #[test]
    fn unit_without_suffix_is_rejected() {
        let text = VALID.replace("webapp.service", "webapp");
        let error = parse(&text).unwrap().host("prod").unwrap_err().to_string();
        assert!(error.contains("webapp.service"), "{error}");
    }
}
