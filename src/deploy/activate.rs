//! Making a release live: switch `current`, restart the unit, pass the health gate, and switch back
//! to the previous release when the gate fails.

use std::time::{Duration, Instant};

use russh::client::Msg;
use russh::{Channel, ChannelMsg};

use super::Context;
use crate::error::Error;
use crate::remote::{self, health};
use crate::report::StepRecord;
use crate::ssh::{CommandOutput, Session, SshError};

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

/// Points `current` at `release` and restarts the unit, as the `switch` and `restart` steps of
/// one remote command. Returns the unit's restart count from just before the restart, or
/// `Err(reason)` when the restart failed after the switch. An error means `current` was not
/// switched, or that crucible could not tell.
///
/// One command leaves no gap between the two in which a killed client has switched `current`
/// while the old process goes on serving.
async fn switch_and_restart(
    ctx: &mut Context<'_>,
    session: &Session,
    release: &str,
    from_partial: bool,
    is_root: bool,
) -> Result<Result<u64, String>, Error> {
    let mut switch = remote::switch_current(ctx.layout(), release);
    if from_partial {
        switch = format!("{} && {switch}", remote::finalize(ctx.layout(), release));
    }
    let restart = remote::restart(&ctx.plan.config.unit, is_root);
    let command = remote::switch_then_restart(&switch, &restart);
    let deadlines = (ctx.plan.step_deadline(), ctx.plan.config.timeouts.restart);

    ctx.reporter.start_step("switch");
    let started = Instant::now();
    let mut switched_at = None;
    let result = match session.open(&command).await {
        Ok(mut channel) => {
            let on_switched = || {
                ctx.reporter.finish_step(StepRecord {
                    name: "switch".to_string(),
                    exit_code: Some(0),
                    duration_ms: started.elapsed().as_millis() as u64,
                    ok: true,
                    detail: format!("current -> releases/{release}"),
                    stderr_tail: String::new(),
                });
                ctx.reporter.start_step("restart");
                switched_at = Some(Instant::now());
            };
            read_switch_then_restart(&mut channel, deadlines, on_switched).await
        }
        Err(error) => Err(error),
    };

    let Some(switched_at) = switched_at else {
        ctx.finish_remote_step("switch", started, result, |_| String::new())?;
        // Exit 0 without the `switched` line: the host's shell did not run the script as written.
        return Err(Error::StepFailed {
            step: "switch".to_string(),
            message: "the host did not confirm the switch; run `crucible status` to see where current points".to_string(),
        });
    };
    let output = match ctx.finish_remote_step("restart", switched_at, result, |_| String::new()) {
        Ok(output) => output,
        Err(Error::StepFailed { message, .. }) => {
            return Ok(Err(format!("systemctl restart failed: {message}")));
        }
        // `current` names the new release already, so this counts as a failed gate.
        Err(other) => return Ok(Err(other.to_string())),
    };
    let before = remote::parse_facts(&output.stdout_text())
        .into_iter()
        .find(|(key, _)| key == remote::RESTARTS_BEFORE)
        .and_then(|(_, value)| value.parse().ok())
        // Unknown: the gate then takes its first reading after the restart as the baseline.
        .unwrap_or(u64::MAX);
    Ok(Ok(before))
}

/// Reads the channel of [`remote::switch_then_restart`] to its end. Calls `on_switched` when the
/// switch is done, and from then on allows the restart's deadline instead of the switch's.
async fn read_switch_then_restart(
    channel: &mut Channel<Msg>,
    (switch_deadline, restart_deadline): (Duration, Duration),
    mut on_switched: impl FnMut(),
) -> Result<CommandOutput, SshError> {
    let mut output = CommandOutput::default();
    let mut phase = ("switch", switch_deadline);
    let mut until = Instant::now() + switch_deadline;
    let switched_line = format!("{}\n", remote::SWITCHED);
    loop {
        let message = tokio::time::timeout_at(until.into(), channel.wait())
            .await
            .map_err(|_| SshError::Timeout {
                command: phase.0.to_string(),
                seconds: phase.1.as_secs(),
            })?;
        match message {
            Some(ChannelMsg::Data { data }) => {
                output.stdout.extend_from_slice(&data);
                if phase.0 == "switch" && output.stdout_text().contains(&switched_line) {
                    on_switched();
                    phase = ("systemctl restart", restart_deadline);
                    until = Instant::now() + restart_deadline;
                }
            }
            Some(ChannelMsg::ExtendedData { data, ext: 1 }) => {
                output.stderr.extend_from_slice(&data)
            }
            Some(ChannelMsg::ExitStatus { exit_status }) => output.exit_status = Some(exit_status),
            Some(ChannelMsg::Close) | None => break,
            Some(_) => {}
        }
    }
    if output.exit_status.is_none() {
        return Err(SshError::ConnectionLost {
            command: phase.0.to_string(),
        });
    }
    Ok(output)
}

/// Runs the health gate on `release` as the `health` step, after a restart that left the unit's
/// restart count at `before`.
async fn check_health(
    ctx: &mut Context<'_>,
    session: &Session,
    release: &str,
    is_root: bool,
    before: u64,
) -> Result<Result<(), String>, Error> {
    let unit = ctx.plan.config.unit.clone();
    let deadline = ctx.plan.step_deadline();
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
    let restarted = switch_and_restart(ctx, session, release, from_partial, is_root).await?;

    // Pruning waits for the restart, so it never slows the restart down, and then runs while the
    // health gate waits. A failed restart skips it: nothing needs it before the rollback.
    let checked = match restarted {
        Ok(before) => {
            let deadline = ctx.plan.step_deadline();
            let background = async {
                let housekeeping = housekeeping?;
                let started = Instant::now();
                let result = session.run(&housekeeping.command, None, deadline).await;
                Some((housekeeping.detail, started.elapsed(), result))
            };
            let (checked, pruned) = tokio::join!(
                check_health(ctx, session, release, is_root, before),
                background
            );
            // Reported once the gate is done, with the time the pruning itself took.
            if let Some((detail, took, result)) = pruned
                && let Err(error) =
                    ctx.finish_remote_step("prune", Instant::now() - took, result, |_| {
                        detail.clone()
                    })
            {
                ctx.housekeeping_failure = Some(error.to_string());
            }
            checked
        }
        Err(reason) => Ok(Err(reason)),
    };

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
    let checked = match switch_and_restart(ctx, session, previous, false, is_root).await {
        Ok(Ok(before)) => check_health(ctx, session, previous, is_root, before).await,
        Ok(Err(reason)) => Ok(Err(reason)),
        Err(error) => {
            return Ok(Activation::Broken {
                reason: format!("{reason}; switching back to {previous} failed: {error}"),
            });
        }
    };
    match checked {
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
