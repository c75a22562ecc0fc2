//! The read-only commands that report on a host: `releases`, `status` and `logs`.

use std::time::{Duration, Instant};

use russh::ChannelMsg;
use serde::Serialize;

use crate::deploy::HostFacts;
use crate::error::Error;
use crate::plan::HostPlan;
use crate::remote::{self, health, lock, quote};
use crate::ssh::Session;

/// Reads the host's facts without changing anything, as `prepare` would print them.
async fn read_facts(plan: &HostPlan, session: &Session) -> Result<HostFacts, Error> {
    let command = remote::facts::inventory(&plan.layout, &plan.config.unit);
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
    // pushing machines showed. Releases the log never saw come last, by id.
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
    match report.live_release.as_deref() {
        Some(live) if !facts.releases.contains(live) => println!(
            "release:  {live} (current points at it, but releases/{live} is missing or incomplete; push again)"
        ),
        live => println!(
            "release:  {} (live since {})",
            live.unwrap_or("none"),
            report.live_since.as_deref().unwrap_or("unknown")
        ),
    }
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
