//! The read-only commands (`releases`, `status`, `check`, `logs`) and `init`.

use std::path::Path;
use std::time::{Duration, Instant};

use russh::ChannelMsg;
use serde::Serialize;

use crate::deploy::HostFacts;
use crate::error::Error;
use crate::plan::HostPlan;
use crate::remote::{self, health, lock, quote};
use crate::report::Reporter;
use crate::ssh::{Session, SshError};

/// The starter hosts.toml that `crucible init` writes.
const STARTER_HOSTS: &str = include_str!("starter-hosts.toml");

/// The deploy workflow that `crucible init --workflow` writes; the same file this repository ships.
const DEPLOY_WORKFLOW: &str = include_str!("../.github/workflows/deploy.yml");

async fn read_facts(plan: &HostPlan, session: &Session) -> Result<HostFacts, Error> {
    let command = remote::inventory(&plan.layout, &"0".repeat(64), &plan.config.unit);
    let output = session.run(&command, None, plan.step_deadline()).await?;
    Ok(HostFacts::parse(&output.stdout_text()))
}

/// One row of `crucible releases`.
#[derive(Debug, Serialize)]
pub struct ReleaseRow {
    pub id: String,
    pub deployed_at: Option<String>,
    pub deployed_by: Option<String>,
    pub venv_reused: Option<bool>,
    pub is_live: bool,
    pub is_rollback_target: bool,
    pub last_outcome: Option<String>,
}

/// Lists the releases on the host, newest first, marking the live one and the rollback target.
pub async fn releases(plan: &HostPlan, json: bool) -> Result<(), Error> {
    let session = Session::connect(&plan.target).await?;
    let facts = read_facts(plan, &session).await?;
    session.close().await;

    let target = facts
        .history
        .rollback_target(facts.live.as_deref(), &facts.releases);
    // Newest first by the log, which records the order of pushes whatever the clocks of the
    // machines that pushed them said; releases the log never saw come last, by id.
    let mut ordered: Vec<&String> = facts.releases.iter().collect();
    ordered.sort_by_key(|id| {
        let position = facts
            .history
            .events
            .iter()
            .position(|event| &event.release == *id);
        (
            std::cmp::Reverse(position.map_or(0, |index| index + 1)),
            std::cmp::Reverse(*id),
        )
    });
    let rows: Vec<ReleaseRow> = ordered
        .into_iter()
        .map(|id| {
            let first = facts.history.first_deploy(id);
            ReleaseRow {
                id: id.clone(),
                deployed_at: first.map(|event| event.started_at.clone()),
                deployed_by: first.map(|event| event.deployer.describe()),
                venv_reused: first.and_then(|event| event.venv_reused),
                is_live: facts.live.as_deref() == Some(id.as_str()),
                is_rollback_target: target.as_deref() == Some(id.as_str()),
                last_outcome: facts
                    .history
                    .latest(id)
                    .map(|event| format!("{} {}", event.action.name(), event.outcome.name())),
            }
        })
        .collect();

    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).expect("rows always serialize")
        );
        return Ok(());
    }
    if rows.is_empty() {
        println!("no releases on {}", plan.config.host_name);
        return Ok(());
    }
    println!(
        "{:<28} {:<20} {:<32} {:<12} {:<22} MARK",
        "RELEASE", "DEPLOYED", "BY", "VENV", "LAST EVENT"
    );
    for row in rows {
        let mark = if row.is_live {
            "* live"
        } else if row.is_rollback_target {
            "  rollback target"
        } else {
            ""
        };
        let venv = match row.venv_reused {
            Some(true) => "venv reused",
            Some(false) => "venv built",
            None => "",
        };
        println!(
            "{:<28} {:<20} {:<32} {:<12} {:<22} {mark}",
            row.id,
            row.deployed_at.as_deref().unwrap_or("-"),
            row.deployed_by.as_deref().unwrap_or("-"),
            venv,
            row.last_outcome.as_deref().unwrap_or("-"),
        );
    }
    Ok(())
}

#[derive(Debug, Serialize)]
struct StatusReport {
    host: String,
    live_release: Option<String>,
    live_since: Option<String>,
    active_state: String,
    sub_state: String,
    main_pid: u64,
    active_since: String,
    restarts: u64,
    deploy_in_progress: Option<String>,
}

/// Shows the live release, the unit's state and any deploy in progress.
pub async fn status(plan: &HostPlan, json: bool) -> Result<(), Error> {
    let session = Session::connect(&plan.target).await?;
    let facts = read_facts(plan, &session).await?;
    let state = health::read_unit_state(&session, &plan.config.unit, plan.step_deadline()).await?;
    let probe = session
        .run(
            &lock::probe_command(&plan.layout),
            None,
            plan.step_deadline(),
        )
        .await?;
    session.close().await;

    let probe = probe.stdout_text();
    let in_progress = probe
        .strip_prefix("held")
        .map(|holder| holder.trim().to_string());
    let live_since = facts.live.as_deref().and_then(|live| {
        facts
            .history
            .events
            .iter()
            .rev()
            .find(|event| event.release == live)
            .map(|event| event.started_at.clone())
    });
    let report = StatusReport {
        host: plan.config.host_name.clone(),
        live_release: facts.live.clone(),
        live_since,
        active_state: state.active_state,
        sub_state: state.sub_state,
        main_pid: state.main_pid,
        active_since: state.active_since,
        restarts: state.restarts,
        deploy_in_progress: in_progress,
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("status always serializes")
        );
        return Ok(());
    }
    println!("host:     {}", report.host);
    println!(
        "release:  {} (live since {})",
        report.live_release.as_deref().unwrap_or("none"),
        report.live_since.as_deref().unwrap_or("unknown")
    );
    println!(
        "unit:     {} {}/{} pid {} since {} ({} automatic restarts)",
        plan.config.unit,
        report.active_state,
        report.sub_state,
        report.main_pid,
        report.active_since,
        report.restarts
    );
    println!(
        "deploy:   {}",
        report
            .deploy_in_progress
            .as_deref()
            .map_or("none in progress".to_string(), |holder| format!(
                "in progress: {holder}"
            ))
    );
    Ok(())
}

/// One prerequisite and its verdict.
struct Check {
    name: String,
    ok: bool,
    detail: String,
}

/// Checks every prerequisite of a push and prints each with the exact fix.
pub async fn check(plan: &HostPlan, reporter: &mut Reporter) -> Result<(), Error> {
    let mut checks = Vec::new();
    let address = plan.target.display_address();

    let reachable = tokio::time::timeout(
        plan.target.connect_timeout,
        tokio::net::TcpStream::connect((plan.target.address.as_str(), plan.target.port)),
    )
    .await;
    let is_reachable = matches!(reachable, Ok(Ok(_)));
    checks.push(Check {
        name: "address reachable".into(),
        ok: is_reachable,
        detail: if is_reachable {
            address.clone()
        } else {
            format!("{address} did not accept a TCP connection; check address, port and firewall")
        },
    });

    let session = if is_reachable {
        match Session::connect(&plan.target).await {
            Ok(session) => {
                checks.push(Check {
                    name: "host key".into(),
                    ok: true,
                    detail: "matches".into(),
                });
                checks.push(Check {
                    name: "authentication".into(),
                    ok: true,
                    detail: format!("as {}", plan.config.user),
                });
                Some(session)
            }
            Err(SshError::HostKey(rejection)) => {
                checks.push(Check {
                    name: "host key".into(),
                    ok: false,
                    detail: rejection.to_string(),
                });
                None
            }
            Err(error) => {
                checks.push(Check {
                    name: "host key".into(),
                    ok: true,
                    detail: "matches".into(),
                });
                checks.push(Check {
                    name: "authentication".into(),
                    ok: false,
                    detail: error.to_string(),
                });
                None
            }
        }
    } else {
        None
    };

    if let Some(session) = &session {
        let output = session
            .run(&host_checks(plan), None, plan.step_deadline())
            .await?;
        for line in output.stdout_text().lines() {
            let mut fields = line.splitn(3, '\t');
            let (Some(name), Some(verdict), detail) = (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            checks.push(Check {
                name: name.to_string(),
                ok: verdict == "ok",
                detail: detail.unwrap_or("").to_string(),
            });
        }
        session.close().await;
    }

    let failed = checks.iter().filter(|check| !check.ok).count();
    let color = reporter.mode().color;
    let quiet = reporter.mode().quiet;
    for check in checks.iter().filter(|check| !quiet || !check.ok) {
        let mark = match (check.ok, color) {
            (true, true) => "\x1b[32m✓\x1b[0m",
            (false, true) => "\x1b[31m✗\x1b[0m",
            (true, false) => "ok  ",
            (false, false) => "FAIL",
        };
        println!("{mark} {:<20} {}", check.name, check.detail);
    }
    if failed > 0 {
        return Err(Error::CheckFailed {
            failed,
            total: checks.len(),
        });
    }
    Ok(())
}

/// The on-host half of `check`: one tab-separated `name, ok|fail, detail` line per prerequisite.
fn host_checks(plan: &HostPlan) -> String {
    let config = &plan.config;
    let root = quote(&config.path);
    let unit = quote(&config.unit);
    let sudoers = quote(&remote::sudoers_line(&config.user, &config.unit));
    let mut script = String::from("report() { printf '%s\\t%s\\t%s\\n' \"$1\" \"$2\" \"$3\"; }\n");
    script.push_str(&format!(
        "if mkdir -p -- {root} 2>/dev/null && [ -w {root} ]; then report 'deploy path' ok {root}; \
         else report 'deploy path' fail \"cannot write {path}; as root run: install -d -o {user} {path}\"; fi\n",
        path = config.path,
        user = config.user,
    ));
    for tool in ["tar", "gzip", "flock", "python3", "systemctl"] {
        script.push_str(&format!(
            "if command -v {tool} >/dev/null 2>&1; then report {tool} ok \"$(command -v {tool})\"; \
             else report {tool} fail 'missing; install it (Debian: apt-get install {package})'; fi\n",
            package = match tool {
                "flock" => "util-linux",
                "systemctl" => "systemd",
                other => other,
            }
        ));
    }
    script.push_str(
        "if python3 -c 'import venv, ensurepip' 2>/dev/null; then report 'python3 venv' ok 'venv and ensurepip present'; \
         else report 'python3 venv' fail 'missing; install it (Debian: apt-get install python3-venv)'; fi\n",
    );
    script.push_str(&format!(
        "if [ \"$(id -u)\" = 0 ]; then report 'sudo rule' ok 'deploying as root'; \
         elif sudo -n -l systemctl restart -- {unit} >/dev/null 2>&1; then report 'sudo rule' ok 'systemctl restart allowed'; \
         else report 'sudo rule' fail \"missing; add with visudo -f /etc/sudoers.d/crucible: \"{sudoers}; fi\n"
    ));
    if config.unit_file.is_some() {
        script.push_str(&format!(
            "report unit ok 'installed from unit_file on push: {}'\n",
            config.unit
        ));
    } else {
        script.push_str(&format!(
            "state=$(systemctl show --property=LoadState --value -- {unit} 2>/dev/null); \
             if [ \"$state\" = loaded ]; then report unit ok loaded; \
             else report unit fail \"{plain} is $state; install it or set unit_file in hosts.toml\"; fi\n",
            plain = config.unit,
        ));
    }
    let needed_kb = (app_size_bytes(&config.source) / 1024) * 2 + 100 * 1024;
    script.push_str(&format!(
        "free=$(df -Pk -- {root} 2>/dev/null | awk 'NR==2 {{print $4}}'); \
         if [ -n \"$free\" ] && [ \"$free\" -ge {needed_kb} ]; then report 'free disk' ok \"${{free}} KiB free\"; \
         else report 'free disk' fail \"${{free:-unknown}} KiB free, need {needed_kb} KiB for one more release\"; fi\n"
    ));
    script
}

/// The app directory's size in bytes, counting every file below it, as an estimate for the disk check.
fn app_size_bytes(source: &Path) -> u64 {
    let mut total = 0;
    let mut pending = vec![source.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(metadata) = entry.metadata() else {
                continue;
            };
            if metadata.is_dir() && entry.file_name() != ".git" {
                pending.push(entry.path());
            } else if metadata.is_file() {
                total += metadata.len();
            }
        }
    }
    total
}

/// Prints the unit's journal; with `follow`, keeps printing until interrupted.
pub async fn logs(plan: &HostPlan, lines: u32, follow: bool) -> Result<(), Error> {
    let session = Session::connect(&plan.target).await?;
    let facts = read_facts(plan, &session).await?;
    let mut command = remote::journal(&plan.config.unit, lines, facts.is_root);
    if follow {
        command = format!(
            "journalctl --no-pager --output=short-iso -f -n {lines} -u {}",
            quote(&plan.config.unit)
        );
    }
    let mut channel = session.open(&command).await?;
    let _ = channel.eof().await;
    let started = Instant::now();
    loop {
        let message = tokio::select! {
            message = channel.wait() => message,
            _ = tokio::signal::ctrl_c() => break,
            _ = tokio::time::sleep(Duration::from_secs(3600)), if !follow => break,
        };
        match message {
            Some(ChannelMsg::Data { data }) => print!("{}", String::from_utf8_lossy(&data)),
            Some(ChannelMsg::ExtendedData { data, .. }) => {
                eprint!("{}", String::from_utf8_lossy(&data))
            }
            Some(ChannelMsg::ExitStatus { exit_status }) if exit_status != 0 => {
                return Err(Error::StepFailed {
                    step: "logs".into(),
                    message: format!(
                        "journalctl exited with status {exit_status}; the deploy user may need the systemd-journal group"
                    ),
                });
            }
            Some(ChannelMsg::Close) | None => break,
            _ => {}
        }
    }
    tracing::debug!(seconds = started.elapsed().as_secs(), "logs finished");
    session.close().await;
    Ok(())
}

/// Writes a starter hosts.toml (and the deploy workflow with `workflow`) without overwriting.
pub fn init(config_path: &Path, workflow: bool) -> Result<(), Error> {
    let mut targets = vec![(config_path.to_path_buf(), STARTER_HOSTS)];
    if workflow {
        let base = config_path.parent().unwrap_or(Path::new("."));
        targets.push((base.join(".github/workflows/deploy.yml"), DEPLOY_WORKFLOW));
    }
    let (existing, missing): (Vec<_>, Vec<_>) =
        targets.into_iter().partition(|(path, _)| path.exists());
    for (path, _) in &existing {
        eprintln!("{} already exists; left unchanged", path.display());
    }
    if missing.is_empty() {
        return Err(Error::Usage(format!(
            "nothing written: {} already exists, and crucible init never overwrites; move it away first",
            existing
                .iter()
                .map(|(path, _)| path.display().to_string())
                .collect::<Vec<_>>()
                .join(" and ")
        )));
    }
    for (path, text) in missing {
        if let Some(parent) = path
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
        {
            std::fs::create_dir_all(parent).map_err(|source| Error::WriteFile {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        std::fs::write(&path, text).map_err(|source| Error::WriteFile {
            path: path.clone(),
            source,
        })?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
