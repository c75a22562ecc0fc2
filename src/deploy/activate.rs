//! Making a release live: switch `current`, restart the unit, pass the health gate, and switch back
//! to the previous release when the gate fails.

use std::time::Instant;

use super::Context;
use crate::error::Error;
use crate::remote::{self, health};
use crate::report::StepRecord;
use crate::ssh::Session;

/// Pruning that runs while the health gate waits, because it removes nothing the new release or
/// a rollback to the previous one needs.
pub struct Housekeeping {
    pub command: String,
    pub detail: String,
}

/// The release to make live, and what to do if it fails.
pub struct Request<'a> {
    pub release: &'a str,
    /// The release to go back to when `release` fails its health gate.
    pub previous: Option<&'a str>,
    /// `release` is still named `<id>.partial` and is renamed in the switch step.
    pub from_partial: bool,
    pub is_root: bool,
    pub no_rollback: bool,
    pub housekeeping: Option<Housekeeping>,
}

/// The end state of an activation.
#[derive(Debug)]
pub enum Activation {
    /// The release is live and healthy.
    Healthy,
    /// The release failed the gate; the previous release is live and healthy again.
    RolledBack { reason: String },
    /// The release failed the gate and no healthy release is live.
    Broken { reason: String },
}

/// Points `current` at `release` and restarts the unit. The caller has already checked, before
/// this point, everything that can be checked without touching the live service.
pub async fn switch(
    ctx: &mut Context<'_>,
    session: &Session,
    release: &str,
    from_partial: bool,
) -> Result<(), Error> {
    let mut command = remote::switch_current(ctx.layout(), release);
    if from_partial {
        command = format!("{} && {command}", remote::finalize(ctx.layout(), release));
    }
    let target = release.to_string();
    ctx.remote_step(
        session,
        "switch",
        &command,
        ctx.plan.step_deadline(),
        |_| format!("current -> releases/{target}"),
    )
    .await
    .map(|_| ())
}

/// Restarts the unit and runs the health gate. Returns `Err(reason)` when the release is unhealthy.
pub async fn restart_and_check(
    ctx: &mut Context<'_>,
    session: &Session,
    release: &str,
    is_root: bool,
) -> Result<Result<(), String>, Error> {
    let unit = ctx.plan.config.unit.clone();
    let deadline = ctx.plan.step_deadline();
    let before = health::read_unit_state(session, &unit, deadline)
        .await?
        .restarts;

    let restart = remote::restart(&unit, is_root);
    if let Err(error) = ctx
        .remote_step(
            session,
            "restart",
            &restart,
            ctx.plan.config.timeouts.restart,
            |_| String::new(),
        )
        .await
    {
        return match error {
            Error::StepFailed { message, .. } => {
                Ok(Err(format!("systemctl restart failed: {message}")))
            }
            other => Err(other),
        };
    }

    ctx.reporter.start_step("health");
    let started = Instant::now();
    let release_dir = ctx.layout().release(release);
    let verdict = health::check(
        session,
        &unit,
        &release_dir,
        before,
        &ctx.plan.config.health,
        deadline,
    )
    .await?;
    match verdict {
        Ok(detail) => {
            ctx.local_step("health", started, true, detail);
            Ok(Ok(()))
        }
        Err(unhealthy) => {
            let journal = session
                .run(&remote::journal(&unit, 15, is_root), None, deadline)
                .await
                .map(|output| output.stdout_text())
                .unwrap_or_default();
            ctx.reporter.finish_step(StepRecord {
                name: "health".to_string(),
                exit_code: None,
                duration_ms: started.elapsed().as_millis() as u64,
                ok: false,
                detail: format!("{} check failed: {}", unhealthy.check, unhealthy.reason),
                stderr_tail: crate::ssh::tail_lines(&journal, 15),
            });
            Ok(Err(unhealthy.reason))
        }
    }
}

/// Switches to `release`, restarts and checks it; when it is unhealthy and `previous` is known,
/// switches back and checks the previous release the same way.
pub async fn activate(
    ctx: &mut Context<'_>,
    session: &Session,
    request: Request<'_>,
) -> Result<Activation, Error> {
    let Request {
        release,
        previous,
        from_partial,
        is_root,
        no_rollback,
        housekeeping,
    } = request;
    switch(ctx, session, release, from_partial).await?;

    let deadline = ctx.plan.step_deadline();
    let background = async {
        let housekeeping = housekeeping?;
        let started = Instant::now();
        let result = session.run(&housekeeping.command, None, deadline).await;
        Some((housekeeping.detail, started.elapsed(), result))
    };
    let (checked, pruned) = tokio::join!(
        restart_and_check(ctx, session, release, is_root),
        background
    );
    // Reported once the gate is done, with the time the pruning itself took.
    if let Some((detail, took, result)) = pruned
        && let Err(error) =
            ctx.finish_remote_step("prune", Instant::now() - took, result, |_| detail.clone())
    {
        ctx.housekeeping_failure = Some(error.to_string());
    }

    // From here on `current` names the new release, so an error such as a restart that runs past
    // its deadline counts as a failed gate. Returning the error instead would report the push as
    // failed before the switch and leave the release live without a rollback.
    let reason = match checked {
        Ok(Ok(())) => return Ok(Activation::Healthy),
        Ok(Err(reason)) => reason,
        Err(error) => error.to_string(),
    };
    if no_rollback {
        return Ok(Activation::Broken {
            reason: format!("{reason}; left live because of --no-rollback"),
        });
    }
    let Some(previous) = previous else {
        return Ok(Activation::Broken {
            reason: format!("{reason}; there is no earlier release to roll back to"),
        });
    };

    ctx.reporter.note(&format!("rolling back to {previous}"));
    let previous_dir = ctx.layout().release(previous);
    if let Err(error) = install_unit_file(ctx, session, &previous_dir, is_root).await {
        return Ok(Activation::Broken {
            reason: format!("{reason}; reinstalling the unit file of {previous} failed: {error}"),
        });
    }
    if let Err(error) = switch(ctx, session, previous, false).await {
        return Ok(Activation::Broken {
            reason: format!("{reason}; switching back to {previous} failed: {error}"),
        });
    }
    match restart_and_check(ctx, session, previous, is_root).await {
        Ok(Ok(())) => Ok(Activation::RolledBack { reason }),
        Ok(Err(second)) => Ok(Activation::Broken {
            reason: format!("{reason}; the previous release {previous} is unhealthy too: {second}"),
        }),
        Err(error) => Ok(Activation::Broken {
            reason: format!("{reason}; checking the previous release {previous} failed: {error}"),
        }),
    }
}

/// Installs the unit file of the release in `release_dir` when hosts.toml sets `unit_file`, as
/// the `unit` step; does nothing otherwise.
pub async fn install_unit_file(
    ctx: &mut Context<'_>,
    session: &Session,
    release_dir: &str,
    is_root: bool,
) -> Result<(), Error> {
    let Some(unit_file) = ctx.plan.config.unit_file.clone() else {
        return Ok(());
    };
    let command = remote::install_unit(
        release_dir,
        &unit_file.to_string_lossy(),
        &ctx.plan.config.unit,
        is_root,
    );
    let deadline = ctx.plan.step_deadline();
    ctx.remote_step(session, "unit", &command, deadline, |output| {
        if output.stdout_text().contains("unit=installed") {
            "installed, daemon-reload".to_string()
        } else {
            "unchanged".to_string()
        }
    })
    .await
    .map(|_| ())
}
