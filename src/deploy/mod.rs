//! Running a push or rollback on one host: the shared context, the step runner, the release log and
//! the interrupt signal. `push`, `rollback` and `activate` hold the steps themselves.

pub mod activate;
pub mod push;
pub mod rollback;
pub mod upload;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio::sync::Notify;

use crate::error::Error;
use crate::plan::HostPlan;
use crate::releases::{Action, History, LogEvent, Outcome};
use crate::remote::facts::{LOG_MARKER, MANIFEST_MARKER};
use crate::remote::lock::{Attempt, DeployLock};
use crate::remote::{self, Layout};
use crate::report::{Reporter, StepRecord, Summary, count};
use crate::ssh::{CommandOutput, Session, SshError};

/// Options shared by push and rollback.
#[derive(Debug, Clone, Default)]
pub struct DeployOptions {
    pub dry_run: bool,
    pub lock_wait: Option<Duration>,
    pub no_rollback: bool,
}

/// Set by the first Ctrl-C or SIGTERM. The steps before the switch stop at once; the steps after
/// it finish, so the host is never left half-way.
#[derive(Clone, Default)]
pub struct Interrupt {
    flag: Arc<AtomicBool>,
    notify: Arc<Notify>,
}

impl Interrupt {
    /// Listens for SIGINT and SIGTERM. A second signal exits the process at once.
    pub fn listen() -> Interrupt {
        let interrupt = Interrupt::default();
        let listener = interrupt.clone();
        tokio::spawn(async move {
            let Ok(mut terminate) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
                if listener.flag.swap(true, Ordering::SeqCst) {
                    eprintln!("interrupted again; exiting at once");
                    std::process::exit(130);
                }
                listener.notify.notify_waiters();
            }
        });
        interrupt
    }

    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Completes when the interrupt is set.
    pub async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_set() {
                return;
            }
            notified.await;
        }
    }
}

/// Facts that `prepare` read from the host.
#[derive(Debug, Default, Clone)]
pub struct HostFacts {
    pub is_root: bool,
    pub python_version: String,
    pub has_uv: bool,
    /// The release `current` points at, if any.
    pub live: Option<String>,
    /// Complete releases on the host.
    pub releases: BTreeSet<String>,
    /// Release id to the venv its `.venv` links, for releases that have one.
    pub venv_links: HashMap<String, String>,
    pub venvs: BTreeSet<String>,
    /// Release id to the sha256 of the artifact its manifest names.
    pub artifacts: HashMap<String, String>,
    /// A complete release with this push's artifact, if one is already there. The push sets it
    /// from [`HostFacts::release_with_artifact`].
    pub existing: Option<String>,
    pub removed_partials: Vec<String>,
    /// How long the host took to prepare the layout and read these facts.
    pub prepare_ms: u64,
    pub history: History,
    pub can_sudo: bool,
    /// `systemctl` is not on the deploy user's PATH.
    pub lacks_systemctl: bool,
    pub unit_load_state: String,
    /// The live release's manifest file, when it has one.
    pub live_manifest: Option<String>,
}

impl HostFacts {
    pub fn parse(output: &str) -> HostFacts {
        let (facts_text, rest) = output
            .split_once(&format!("{LOG_MARKER}\n"))
            .unwrap_or((output, ""));
        let (log_text, manifest) = rest
            .split_once(&format!("{MANIFEST_MARKER}\n"))
            .unwrap_or((rest, ""));
        let mut facts = HostFacts {
            history: History::parse(log_text),
            live_manifest: (!manifest.trim().is_empty()).then(|| manifest.to_string()),
            ..HostFacts::default()
        };
        for (key, value) in remote::parse_facts(facts_text) {
            match key.as_str() {
                "uid" => facts.is_root = value == "0",
                "python" => facts.python_version = value,
                "uv" => facts.has_uv = true,
                "current" if !value.is_empty() => {
                    facts.live = Some(
                        value
                            .trim_start_matches("releases/")
                            .rsplit('/')
                            .next()
                            .unwrap_or("")
                            .to_string(),
                    )
                }
                "release" => {
                    let (id, venv) = value.split_once(' ').unwrap_or((value.as_str(), ""));
                    facts.releases.insert(id.to_string());
                    if !venv.is_empty() {
                        facts.venv_links.insert(id.to_string(), venv.to_string());
                    }
                }
                "venv" => {
                    facts.venvs.insert(value);
                }
                "artifact" => {
                    if let Some((id, sha)) = value.split_once(' ') {
                        facts.artifacts.insert(id.to_string(), sha.to_string());
                    }
                }
                "took_ms" => facts.prepare_ms = value.parse().unwrap_or(0),
                "removed" => facts.removed_partials.push(value),
                "sudo" => facts.can_sudo = value == "ok",
                "systemctl" => facts.lacks_systemctl = value == "missing",
                "unit_load" => facts.unit_load_state = value,
                _ => {}
            }
        }
        facts
    }

    /// Returns the newest complete release built from the artifact `sha256`. Release ids end with
    /// the artifact's short sha, so a release renamed by hand is not taken for it.
    pub fn release_with_artifact(&self, sha256: &str) -> Option<String> {
        let suffix = format!("-{}", &sha256[..8.min(sha256.len())]);
        self.releases
            .iter()
            .rev()
            .find(|id| {
                id.ends_with(&suffix) && self.artifacts.get(*id).map(String::as_str) == Some(sha256)
            })
            .cloned()
    }
}

/// The state of one push or rollback while it runs.
pub struct Context<'a> {
    pub plan: &'a HostPlan,
    pub reporter: &'a mut Reporter,
    pub summary: Summary,
    pub started: Instant,
    pub started_at: OffsetDateTime,
    pub interrupt: Interrupt,
    /// The error of housekeeping that ran during the health gate, if it failed.
    pub housekeeping_failure: Option<String>,
}

impl<'a> Context<'a> {
    pub fn new(
        command: &str,
        plan: &'a HostPlan,
        reporter: &'a mut Reporter,
        interrupt: Interrupt,
    ) -> Context<'a> {
        Context {
            plan,
            reporter,
            summary: Summary {
                command: command.to_string(),
                host: plan.config.host_name.clone(),
                ..Summary::default()
            },
            started: Instant::now(),
            started_at: OffsetDateTime::now_utc(),
            interrupt,
            housekeeping_failure: None,
        }
    }

    pub fn layout(&self) -> &Layout {
        &self.plan.layout
    }

    /// Records a step that ran no remote command.
    pub fn local_step(&mut self, name: &str, started: Instant, ok: bool, detail: String) {
        self.reporter.finish_step(StepRecord {
            name: name.to_string(),
            exit_code: None,
            duration_ms: started.elapsed().as_millis() as u64,
            ok,
            detail,
            stderr_tail: String::new(),
        });
    }

    /// Runs one remote step and reports it. A non-zero exit status becomes [`Error::StepFailed`]
    /// naming the step, its exit status and the last lines of its stderr.
    pub async fn remote_step(
        &mut self,
        session: &Session,
        name: &str,
        command: &str,
        deadline: Duration,
        detail: impl Fn(&CommandOutput) -> String,
    ) -> Result<CommandOutput, Error> {
        self.reporter.start_step(name);
        tracing::info!(step = name, "{command}");
        let started = Instant::now();
        let result = session.run(command, None, deadline).await;
        self.finish_remote_step(name, started, result, detail)
    }

    pub fn finish_remote_step(
        &mut self,
        name: &str,
        started: Instant,
        result: Result<CommandOutput, SshError>,
        detail: impl Fn(&CommandOutput) -> String,
    ) -> Result<CommandOutput, Error> {
        let duration_ms = started.elapsed().as_millis() as u64;
        match result {
            Ok(output) => {
                let ok = output.is_success();
                let stderr_tail = if ok {
                    String::new()
                } else {
                    output.stderr_tail(8)
                };
                // A step's detail describes what it did, which a failed step did not do. Its
                // exit status and stderr show what went wrong instead.
                self.reporter.finish_step(StepRecord {
                    name: name.to_string(),
                    exit_code: output.exit_status,
                    duration_ms,
                    ok,
                    detail: if ok { detail(&output) } else { String::new() },
                    stderr_tail: stderr_tail.clone(),
                });
                if ok {
                    Ok(output)
                } else {
                    let status = output
                        .exit_status
                        .map_or("no exit status (killed by a signal)".to_string(), |code| {
                            format!("exit status {code}")
                        });
                    Err(Error::StepFailed {
                        step: name.to_string(),
                        message: if stderr_tail.is_empty() {
                            status
                        } else {
                            format!("{status}: {stderr_tail}")
                        },
                    })
                }
            }
            Err(error) => {
                self.reporter.finish_step(StepRecord {
                    name: name.to_string(),
                    exit_code: None,
                    duration_ms,
                    ok: false,
                    detail: error.to_string(),
                    stderr_tail: String::new(),
                });
                Err(Error::Ssh(error))
            }
        }
    }

    /// Opens the session and reports it as the `connect` step.
    pub async fn connect(&mut self) -> Result<Session, Error> {
        let started = Instant::now();
        let result = Session::connect(&self.plan.target).await;
        self.report_connect(result, started.elapsed())
    }

    /// Reports a connection attempt that took `took`, which may have run alongside other work.
    pub fn report_connect(
        &mut self,
        result: Result<Session, SshError>,
        took: Duration,
    ) -> Result<Session, Error> {
        self.reporter.start_step("connect");
        let started = Instant::now()
            .checked_sub(took)
            .unwrap_or_else(Instant::now);
        match result {
            Ok(session) => {
                self.local_step("connect", started, true, self.plan.display());
                Ok(session)
            }
            Err(error) => {
                self.local_step("connect", started, false, error.to_string());
                Err(Error::Ssh(error))
            }
        }
    }

    /// The record written beside the lock while this deploy holds it.
    pub fn holder_record(&self) -> String {
        serde_json::json!({
            "user": self.plan.deployer.user,
            "host": self.plan.deployer.host,
            "github_run": self.plan.deployer.github.as_ref().map(|run| format!("{}/actions/runs/{}", run.repository, run.run_id)),
            "pid": std::process::id(),
            "since": crate::releases::timestamp(OffsetDateTime::now_utc()),
            "command": self.summary.command,
        })
        .to_string()
    }

    /// Takes the deploy lock, retrying once a second until `--lock-wait` runs out, and returns
    /// it with the facts the holder read from the host once it held the lock.
    pub async fn lock(
        &mut self,
        session: &Session,
        wait: Option<Duration>,
    ) -> Result<(DeployLock, HostFacts), Error> {
        self.reporter.start_step("lock");
        let started = Instant::now();
        let holder = self.holder_record();
        let deadline = wait.map(|wait| started + wait);
        let mut waited = false;
        loop {
            let attempt = DeployLock::try_acquire(
                session,
                self.layout(),
                &holder,
                &self.plan.config.unit,
                self.plan.config.unit_file.is_none(),
                self.plan.step_deadline(),
            )
            .await;
            match attempt {
                Ok(Attempt::Acquired { lock, facts }) => {
                    let facts = self.report_prepared(started, &facts, waited);
                    return Ok((lock, facts));
                }
                Ok(Attempt::PrepareFailed(message)) => {
                    return Err(self.report_prepare_failure(started, message));
                }
                Ok(Attempt::Taken(record)) => {
                    let holder = describe_holder(&record);
                    match deadline {
                        Some(deadline) if Instant::now() < deadline => {
                            waited = true;
                            let left = deadline.saturating_duration_since(Instant::now()).as_secs();
                            self.reporter.note(&format!(
                                "waiting for the lock held by {holder}; {left}s left"
                            ));
                            tokio::select! {
                                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                                _ = self.interrupt.wait() => return Err(Error::Interrupted),
                            }
                        }
                        _ => {
                            self.local_step("lock", started, false, format!("held by {holder}"));
                            let advice = match wait {
                                Some(wait) => format!(
                                    "--lock-wait {} ran out; wait longer, for example with --lock-wait 10m",
                                    humantime::format_duration(wait)
                                ),
                                None => "wait for it to finish, or pass --lock-wait 5m".to_string(),
                            };
                            return Err(Error::Locked {
                                host: self.plan.config.host_name.clone(),
                                path: self.plan.config.path.clone(),
                                holder,
                                advice,
                            });
                        }
                    }
                }
                Err(error) => {
                    self.local_step("lock", started, false, error.to_string());
                    return Err(Error::Ssh(error));
                }
            }
        }
    }

    /// Reports the `lock` and `prepare` steps of a lock attempt that started at `started` and
    /// succeeded, and parses the facts its holder printed. The holder prepares the host right
    /// after it gets the lock, so the time it reports for that is the `prepare` step's.
    /// `waited` is true when another deploy held the lock at first.
    pub fn report_prepared(
        &mut self,
        started: Instant,
        facts_text: &str,
        waited: bool,
    ) -> HostFacts {
        let facts = HostFacts::parse(facts_text);
        let total = started.elapsed().as_millis() as u64;
        let prepare_ms = facts.prepare_ms.min(total);
        let waited = if waited {
            started.elapsed().as_secs()
        } else {
            0
        };
        self.reporter.finish_step(StepRecord {
            name: "lock".to_string(),
            exit_code: None,
            duration_ms: total - prepare_ms,
            ok: true,
            detail: if waited > 0 {
                format!("acquired after {waited}s")
            } else {
                String::new()
            },
            stderr_tail: String::new(),
        });
        self.reporter.start_step("prepare");
        let live = facts.live.clone().unwrap_or_else(|| "none".to_string());
        self.reporter.finish_step(StepRecord {
            name: "prepare".to_string(),
            exit_code: None,
            duration_ms: prepare_ms,
            ok: true,
            detail: format!("python {}, live release {live}", facts.python_version),
            stderr_tail: String::new(),
        });
        for partial in &facts.removed_partials {
            self.reporter
                .note(&format!("removed {partial}, left by an interrupted push"));
        }
        facts
    }

    /// Reports a lock attempt whose holder got the lock but failed to prepare the host, and
    /// returns the error that ends the deploy. The holder has exited, so the lock is free.
    pub fn report_prepare_failure(&mut self, started: Instant, message: String) -> Error {
        self.local_step("lock", started, true, String::new());
        self.reporter.start_step("prepare");
        self.reporter.finish_step(StepRecord {
            name: "prepare".to_string(),
            exit_code: Some(remote::facts::PREPARE_FAILED),
            duration_ms: 0,
            ok: false,
            detail: String::new(),
            stderr_tail: message.clone(),
        });
        Error::StepFailed {
            step: "prepare".to_string(),
            message: format!(
                "{message}; check that user `{}` may create {} on the host",
                self.plan.config.user, self.plan.config.path
            ),
        }
    }

    /// Appends an event to the release log. A failure here is reported but does not undo the deploy.
    pub async fn log_event(&mut self, session: &Session, event: &LogEvent) {
        let line = serde_json::to_string(event).expect("log events always serialize");
        let command = remote::append_log(self.layout(), &line);
        if let Err(error) = session.run(&command, None, self.plan.step_deadline()).await {
            self.reporter.note(&format!(
                "warning: failed to append to the release log: {error}"
            ));
        }
    }

    pub fn event(&self, action: Action, release: &str, outcome: Outcome) -> LogEvent {
        LogEvent {
            action,
            release: release.to_string(),
            outcome,
            artifact_sha256: self.summary.artifact_sha256.clone().unwrap_or_default(),
            venv_key: self.summary.venv_key.clone(),
            venv_reused: self.summary.venv_reused,
            previous: self.summary.previous_release.clone(),
            deployer: self.plan.deployer.clone(),
            started_at: crate::releases::timestamp(self.started_at),
            duration_ms: self.started.elapsed().as_millis() as u64,
            reason: None,
        }
    }

    /// Removes what retention no longer needs. Runs after the switch, so a failure is a warning
    /// with its own exit code, never a reason to doubt the live release.
    pub async fn prune(
        &mut self,
        session: &Session,
        facts: &HostFacts,
        live: &str,
        history: &History,
    ) -> Result<(), Error> {
        let (releases, venvs) = self.prune_plan(facts, live, history);
        if releases.is_empty() && venvs.is_empty() {
            return Ok(());
        }
        let command = remote::prune(self.layout(), &releases, &venvs);
        let detail = format!(
            "removed {}, {}",
            count(releases.len(), "release"),
            count(venvs.len(), "venv")
        );
        self.remote_step(
            session,
            "prune",
            &command,
            self.plan.step_deadline(),
            |_| detail.clone(),
        )
        .await
        .map(|_| ())
        .map_err(|error| Error::Housekeeping {
            release: live.to_string(),
            message: error.to_string(),
        })
    }

    /// Decides which releases and venvs retention removes once `live` is live.
    pub fn prune_plan(
        &self,
        facts: &HostFacts,
        live: &str,
        history: &History,
    ) -> (Vec<String>, Vec<String>) {
        let mut on_host = facts.releases.clone();
        on_host.insert(live.to_string());
        // `prepare` listed the venv links before this push linked the live release's venv, so a
        // reused venv whose other users are pruned now would otherwise be pruned with them.
        let mut venv_links = facts.venv_links.clone();
        if let Some(key) = &self.summary.venv_key {
            venv_links.insert(live.to_string(), self.layout().venv(key));
        }
        crate::releases::plan_prune(
            history,
            live,
            self.plan.config.keep,
            &on_host,
            &venv_links,
            &facts.venvs,
        )
    }
}

/// Formats a lock holder record for a message: "alice@laptop (pid 42) since 2026-12-04T15:01:02Z".
fn describe_holder(record: &str) -> String {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(record.lines().next().unwrap_or(""))
    else {
        return "another deploy (no holder record)".to_string();
    };
    let field = |name: &str| {
        value
            .get(name)
            .and_then(|field| field.as_str())
            .unwrap_or("?")
            .to_string()
    };
    let mut text = format!(
        "{}@{} (pid {})",
        field("user"),
        field("host"),
        value
            .get("pid")
            .map_or("?".to_string(), |pid| pid.to_string())
    );
    if let Some(run) = value.get("github_run").and_then(|run| run.as_str()) {
        text.push_str(&format!(", GitHub run {run}"));
    }
    format!(
        "{text} running `{}` since {}",
        field("command"),
        field("since")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_parse_prepare_output() {
        let output = "uid=1000\npython=3.11.2\ncurrent=releases/r2\nrelease=r1 /srv/app/venvs/k1\nrelease=r2 \nvenv=k1\nsudo=ok\n---releases.jsonl---\n{bad json\n";
        let facts = HostFacts::parse(output);
        assert!(!facts.is_root);
        assert_eq!(facts.python_version, "3.11.2");
        assert_eq!(facts.live.as_deref(), Some("r2"));
        assert_eq!(facts.releases.len(), 2);
        assert_eq!(
            facts.venv_links.get("r1").map(String::as_str),
            Some("/srv/app/venvs/k1")
        );
        assert!(facts.can_sudo);
        assert!(facts.history.events.is_empty());
    }

    #[test]
    fn existing_release_needs_matching_artifact_and_id() {
        let sha = format!("3f9a1c2e{}", "0".repeat(56));
        let other = format!("3f9a1c2e{}", "1".repeat(56));
        let output = format!(
            "release=20261204T150102Z-3f9a1c2e \nartifact=20261204T150102Z-3f9a1c2e {other}\n\
             release=20261204T160000Z-3f9a1c2e \nartifact=20261204T160000Z-3f9a1c2e {sha}\n\
             release=renamed \nartifact=renamed {sha}\ntook_ms=12\n"
        );
        let facts = HostFacts::parse(&output);
        assert_eq!(facts.prepare_ms, 12);
        assert_eq!(
            facts.release_with_artifact(&sha).as_deref(),
            Some("20261204T160000Z-3f9a1c2e")
        );
        assert_eq!(facts.release_with_artifact(&"0".repeat(64)), None);
    }

    #[test]
    fn holder_description_names_user_and_time() {
        let text = describe_holder(
            r#"{"user":"alice","host":"laptop","pid":42,"since":"2026-12-04T15:01:02Z","command":"push"}"#,
        );
        assert_eq!(
            text,
            "alice@laptop (pid 42) running `push` since 2026-12-04T15:01:02Z"
        );
    }
}
