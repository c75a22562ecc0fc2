//! `crucible rollback`: switch back to an earlier release, restart, and check it as a push does.

use super::activate;
use super::push::finish_activation;
use super::{Context, DeployOptions, HostFacts};
use crate::error::Error;
use crate::ssh::Session;

/// Runs a whole rollback to `to`, or to the default target when `to` is `None`.
pub async fn run(
    ctx: &mut Context<'_>,
    options: &DeployOptions,
    to: Option<&str>,
) -> Result<(), Error> {
    let session = ctx.connect().await?;
    let (lock, facts) = ctx.lock(&session, options.lock_wait).await?;
    let result = rollback_locked(ctx, &session, facts, options, to).await;
    lock.release().await;
    session.close().await;
    result
}

async fn rollback_locked(
    ctx: &mut Context<'_>,
    session: &Session,
    facts: HostFacts,
    options: &DeployOptions,
    to: Option<&str>,
) -> Result<(), Error> {
    let live = facts.live.clone();
    ctx.summary.previous_release = live.clone();

    let target = match to {
        Some(id) if facts.releases.contains(id) => id.to_string(),
        Some(id) => {
            return Err(Error::Usage(format!(
                "release {id} not found on {}; available releases: {}",
                ctx.plan.config.host_name,
                list_or_none(facts.releases.iter().rev().map(String::as_str))
            )));
        }
        None => match facts
            .history
            .rollback_target(live.as_deref(), &facts.releases)
        {
            Some(id) => id,
            None => {
                // The outcome stays unset, so the summary reports `failed` to match exit 2.
                ctx.reporter.note(&format!(
                    "no earlier release to roll back to (live: {}); nothing changed",
                    live.as_deref().unwrap_or("none")
                ));
                return Err(Error::Usage(format!(
                    "no earlier successful release on {host} to roll back to; available releases: {}. To switch to another of them, run `crucible rollback {host} --to ID`",
                    list_or_none(facts.releases.iter().rev().map(String::as_str)),
                    host = ctx.plan.config.host_name,
                )));
            }
        },
    };
    ctx.summary.release = Some(target.clone());
    ctx.summary.venv_key = facts
        .venv_links
        .get(&target)
        .and_then(|link| link.rsplit('/').next())
        .map(str::to_string);
    if live.as_deref() == Some(target.as_str()) {
        ctx.summary.outcome = "unchanged".to_string();
        return Ok(());
    }
    if options.dry_run {
        ctx.reporter.note(&format!(
            "would switch current from {} to {target}, restart {} and run the health gate",
            live.as_deref().unwrap_or("none"),
            ctx.plan.config.unit
        ));
        ctx.summary.outcome = "dry_run".to_string();
        return Ok(());
    }

    let target_dir = ctx.layout().release(&target);
    activate::install_unit_file(ctx, session, &target_dir, facts.is_root).await?;
    let request = activate::Request {
        release: &target,
        previous: live.as_deref(),
        from_partial: false,
        is_root: facts.is_root,
        no_rollback: options.no_rollback,
        housekeeping: None,
    };
    let activation = activate::activate(ctx, session, request).await;
    finish_activation(ctx, session, &facts, &target, activation).await
}

fn list_or_none<'a>(ids: impl Iterator<Item = &'a str>) -> String {
    let ids: Vec<&str> = ids.collect();
    if ids.is_empty() {
        "none".to_string()
    } else {
        ids.join(", ")
    }
}
