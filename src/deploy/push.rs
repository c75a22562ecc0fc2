//! `crucible push`: scan, connect, lock, prepare, upload, venv, shared, unit, then activate.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::activate::{self, Activation};
use super::{Context, DeployOptions, HostFacts, upload};
use crate::archive::{ArchiveError, Manifest};
use crate::error::Error;
use crate::releases::{Action, History, Outcome, release_id};
use crate::remote;
use crate::remote::lock::{Attempt, DeployLock};
use crate::report::count;
use crate::ssh::{Session, SshError};

/// How long a failed or interrupted push waits for the lock holder to finish linking files into
/// the unfinished release before it removes that release.
///
/// NOTE: a holder still linking after this can create directories of the removed release again.
/// The next push removes that `.partial`.
const LINKS_AFTER_FAILURE: Duration = Duration::from_secs(15);

/// The local inputs of a push, checked before anything connects.
pub struct Artifact {
    pub manifest: Manifest,
    /// Requirements file path relative to the release, and its content.
    pub requirements: Option<(String, Vec<u8>)>,
}

impl Artifact {
    /// The venv key: the requirements' content and the host's Python version, hashed.
    pub fn venv_key(&self, python_version: &str) -> Option<String> {
        let (_, content) = self.requirements.as_ref()?;
        let mut hasher = Sha256::new();
        hasher.update(content);
        hasher.update(b"\0python=");
        hasher.update(python_version.as_bytes());
        Some(hex::encode(hasher.finalize())[..16].to_string())
    }
}

/// Scans the app tree and checks that the files hosts.toml names are part of it.
pub fn scan(ctx: &mut Context<'_>) -> Result<Artifact, Error> {
    let config = &ctx.plan.config;
    ctx.reporter.start_step("scan");
    let started = Instant::now();
    let scanned = Manifest::scan(&config.source, &config.exclude);
    check_scan(ctx, started, scanned)
}

/// Hashes the tree while the SSH connection is set up, because neither needs the other. The scan
/// is still reported first, and its error wins over a connection error, as when they ran in turn.
async fn scan_while_connecting(
    ctx: &mut Context<'_>,
) -> Result<(Artifact, Session, Option<EarlyLock>), Error> {
    let plan = ctx.plan;
    let holder = ctx.holder_record();
    let layout = ctx.layout().clone();
    let unit = plan.config.unit.clone();
    let check_unit = plan.config.unit_file.is_none();
    let connect_started = Instant::now();
    // The lock needs no artifact, so the first attempt to take it also runs during the scan.
    let connecting = async {
        let result = Session::connect(&plan.target).await;
        let took = connect_started.elapsed();
        let lock = match &result {
            Ok(session) => {
                let started = Instant::now();
                let attempt = DeployLock::try_acquire(
                    session,
                    &layout,
                    &holder,
                    &unit,
                    check_unit,
                    plan.step_deadline(),
                )
                .await;
                Some((started, attempt))
            }
            Err(_) => None,
        };
        (result, took, lock)
    };
    tokio::pin!(connecting);

    ctx.reporter.start_step("scan");
    let started = Instant::now();
    let (source, exclude) = (plan.config.source.clone(), plan.config.exclude.clone());
    let mut scanning = tokio::task::spawn_blocking(move || Manifest::scan(&source, &exclude));
    let mut connected = None;
    let scanned = loop {
        tokio::select! {
            scanned = &mut scanning => break scanned,
            result = &mut connecting, if connected.is_none() => connected = Some(result),
        }
    };
    let scanned = scanned.unwrap_or_else(|error| std::panic::resume_unwind(error.into_panic()));
    let checked = check_scan(ctx, started, scanned);

    let (result, took, lock) = match connected {
        Some(connected) => connected,
        None => connecting.await,
    };
    let artifact = match checked {
        Ok(artifact) => artifact,
        Err(error) => {
            if let Some((_, Ok(Attempt::Acquired { lock, .. }))) = lock {
                lock.release().await;
            }
            if let Ok(session) = result {
                session.close().await;
            }
            return Err(error);
        }
    };
    let session = ctx.report_connect(result, took)?;
    Ok((artifact, session, lock))
}

/// The first lock attempt, made while the tree was being scanned, and when it started.
type EarlyLock = (Instant, Result<Attempt, SshError>);

/// Checks that the files hosts.toml names are part of the scanned tree, and reports the scan.
fn check_scan(
    ctx: &mut Context<'_>,
    started: Instant,
    scanned: Result<Manifest, ArchiveError>,
) -> Result<Artifact, Error> {
    let config = &ctx.plan.config;
    let manifest = scanned.map_err(|error| Error::Usage(error.to_string()))?;

    let contains = |path: &str| manifest.entries.iter().any(|entry| entry.path == path);
    let mut requirements = None;
    if let Some(relative) = &config.requirements {
        let relative = relative.to_string_lossy().to_string();
        let path = config.source.join(&relative);
        // A wrong path here is a hosts.toml mistake, so it exits 2 like a bad unit_file.
        let content = std::fs::read(&path).map_err(|source| {
            Error::Usage(format!(
                "failed to read the requirements file {}: {source}; fix `requirements` in hosts.toml (relative to source), or remove it if the app has none",
                path.display()
            ))
        })?;
        if !contains(&relative) {
            return Err(Error::Usage(format!(
                "requirements file {relative} is excluded from the release; remove it from exclude, .gitignore or .crucibleignore"
            )));
        }
        requirements = Some((relative, content));
    }
    if let Some(unit_file) = &config.unit_file {
        let unit_file = unit_file.to_string_lossy();
        if !contains(&unit_file) {
            return Err(Error::Usage(format!(
                "unit_file {unit_file} is not in the app directory {} (or is excluded); fix unit_file in hosts.toml",
                config.source.display()
            )));
        }
    }

    let detail = format!(
        "{}, {:.1} MB, sha256 {}",
        count(manifest.file_count(), "file"),
        manifest.total_bytes() as f64 / 1e6,
        manifest.short_sha()
    );
    ctx.local_step("scan", started, true, detail);
    ctx.summary.artifact_sha256 = Some(manifest.sha256.clone());
    Ok(Artifact {
        manifest,
        requirements,
    })
}

/// Runs a whole push; the summary in `ctx` records how far it got.
pub async fn run(ctx: &mut Context<'_>, options: &DeployOptions) -> Result<(), Error> {
    if options.dry_run {
        let artifact = scan(ctx)?;
        print_plan(ctx, &artifact);
        ctx.summary.outcome = "dry_run".to_string();
        return Ok(());
    }
    let (artifact, session, early_lock) = scan_while_connecting(ctx).await?;
    let (lock, mut facts) = match early_lock {
        Some((started, Ok(Attempt::Acquired { lock, facts }))) => {
            ctx.reporter.start_step("lock");
            let facts = ctx.report_prepared(started, &facts, false);
            (lock, facts)
        }
        Some((started, Ok(Attempt::PrepareFailed(message)))) => {
            ctx.reporter.start_step("lock");
            let error = ctx.report_prepare_failure(started, message);
            session.close().await;
            return Err(error);
        }
        // Held by another deploy, or the attempt failed: the normal path waits with
        // --lock-wait, or reports the holder or the error.
        _ => ctx.lock(&session, options.lock_wait).await?,
    };
    facts.existing = facts.release_with_artifact(&artifact.manifest.sha256);
    let result = push_locked(ctx, &session, &lock, &artifact, facts, options).await;
    lock.release().await;
    session.close().await;
    result
}

fn print_plan(ctx: &mut Context<'_>, artifact: &Artifact) {
    let config = &ctx.plan.config;
    let id = release_id(OffsetDateTime::now_utc(), artifact.manifest.short_sha());
    let layout = ctx.layout().clone();
    let mut steps = vec![
        format!("connect to {}", ctx.plan.display()),
        format!("lock {}", remote::lock::lock_path(&layout)),
        "prepare (with the lock): create the layout, read the live release and the release log"
            .to_string(),
        format!(
            "upload {} files ({:.1} MB) into {}",
            artifact.manifest.file_count(),
            artifact.manifest.total_bytes() as f64 / 1e6,
            layout.partial(&id)
        ),
    ];
    if let Some((path, _)) = &artifact.requirements {
        steps.push(format!(
            "venv: install {path} into a new venv (uv when the host has it, else pip), unless an identical venv exists"
        ));
    }
    if !config.shared.is_empty() {
        steps.push(format!(
            "shared: link {} from {}",
            config.shared.join(", "),
            layout.shared()
        ));
    }
    if let Some(unit_file) = &config.unit_file {
        steps.push(format!(
            "unit: install {} as /etc/systemd/system/{} if it changed",
            unit_file.display(),
            config.unit
        ));
    }
    steps.push(format!("switch {} -> releases/{id}", layout.current()));
    steps.push(format!("restart {}, then the health gate", config.unit));
    steps.push(format!("prune to {} releases", config.keep));
    ctx.summary.release = Some(id);
    for (number, step) in steps.iter().enumerate() {
        ctx.reporter.note(&format!("{}. {step}", number + 1));
    }
}

async fn push_locked(
    ctx: &mut Context<'_>,
    session: &Session,
    lock: &DeployLock,
    artifact: &Artifact,
    facts: HostFacts,
    options: &DeployOptions,
) -> Result<(), Error> {
    check_privileges(ctx, &facts)?;
    ctx.summary.previous_release = facts.live.clone();
    ctx.summary.venv_key = artifact.venv_key(&facts.python_version);

    if let Some(existing) = &facts.existing
        && facts.live.as_deref() == Some(existing.as_str())
        && is_recorded_live(&facts.history, existing)
    {
        ctx.summary.release = Some(existing.clone());
        ctx.summary.files_sent = Some(0);
        ctx.summary.bytes_sent = Some(0);
        ctx.summary.outcome = "unchanged".to_string();
        return Ok(());
    }
    let is_fresh = facts.existing.is_none();
    let id = facts
        .existing
        .clone()
        .unwrap_or_else(|| release_id(OffsetDateTime::now_utc(), artifact.manifest.short_sha()));
    ctx.summary.release = Some(id.clone());

    let interrupt = ctx.interrupt.clone();
    let prepared = tokio::select! {
        result = prepare_release(ctx, session, lock, artifact, &facts, &id, is_fresh) => result,
        _ = interrupt.wait() => Err(Error::Interrupted),
    };
    if let Err(error) = prepared {
        if is_fresh {
            lock.wait_for_links(LINKS_AFTER_FAILURE).await;
            let command = remote::discard(ctx.layout(), &id);
            let _ = ctx
                .remote_step(
                    session,
                    "cleanup",
                    &command,
                    ctx.plan.step_deadline(),
                    |_| "removed the unfinished release".to_string(),
                )
                .await;
        }
        let mut event = ctx.event(Action::Push, &id, Outcome::Failed);
        event.reason = Some(error.to_string());
        ctx.log_event(session, &event).await;
        ctx.summary.outcome = if matches!(error, Error::Interrupted) {
            "interrupted"
        } else {
            "failed_before_switch"
        }
        .to_string();
        return Err(error);
    }

    // A push killed after its switch leaves `current` on a release whose restart and health
    // gate may never have run. Pushing it again activates it, falling back to the last release
    // the log records as deployed.
    // Only a complete release on the host is a place to go back to: a `current` that points
    // at nothing, or at a directory crucible did not write, falls back to the log's choice.
    let previous = match &facts.live {
        Some(live) if *live != id && facts.releases.contains(live) => Some(live.clone()),
        _ => facts.history.rollback_target(Some(&id), &facts.releases),
    };
    ctx.summary.previous_release = previous.clone();
    let (housekeeping, facts_after) = early_housekeeping(ctx, &facts, &id, previous.as_deref());
    let request = activate::Request {
        release: &id,
        previous: previous.as_deref(),
        from_partial: is_fresh,
        is_root: facts.is_root,
        no_rollback: options.no_rollback,
        housekeeping,
    };
    let activation = activate::activate(ctx, session, request).await;
    if ctx.interrupt.is_set() {
        ctx.reporter
            .note("interrupted after the switch: the restart and health check were finished first");
    }
    finish_activation(ctx, session, &facts_after, &id, activation).await
}

/// Plans the pruning that can run during the health gate: what retention removes once `id` is
/// live, less the previous release and its own rollback target, which an automatic rollback
/// would need. Returns it with the host facts as they will be after it ran.
fn early_housekeeping(
    ctx: &Context<'_>,
    facts: &HostFacts,
    id: &str,
    previous: Option<&str>,
) -> (Option<activate::Housekeeping>, HostFacts) {
    let mut history = facts.history.clone();
    history
        .events
        .push(ctx.event(Action::Push, id, Outcome::Deployed));
    let (releases, venvs) = ctx.prune_plan(facts, id, &history);

    let mut protected: HashSet<String> = HashSet::new();
    if let Some(previous) = previous {
        protected.insert(previous.to_string());
        let target = facts
            .history
            .rollback_target(Some(previous), &facts.releases);
        protected.extend(target);
    }
    let protected_venvs: HashSet<&str> = protected
        .iter()
        .filter_map(|release| facts.venv_links.get(release))
        .filter_map(|link| link.rsplit('/').next())
        .collect();
    let releases: Vec<String> = releases
        .into_iter()
        .filter(|r| !protected.contains(r))
        .collect();
    let venvs: Vec<String> = venvs
        .into_iter()
        .filter(|key| !protected_venvs.contains(key.as_str()))
        .collect();

    let mut after = facts.clone();
    if releases.is_empty() && venvs.is_empty() {
        return (None, after);
    }
    for release in &releases {
        after.releases.remove(release);
        after.venv_links.remove(release);
    }
    for key in &venvs {
        after.venvs.remove(key);
    }
    let housekeeping = activate::Housekeeping {
        command: remote::prune(ctx.layout(), &releases, &venvs),
        detail: format!(
            "removed {}, {} during the health gate",
            count(releases.len(), "release"),
            count(venvs.len(), "venv")
        ),
    };
    (Some(housekeeping), after)
}

/// Logs how the activation ended and prunes after a success.
pub async fn finish_activation(
    ctx: &mut Context<'_>,
    session: &Session,
    facts: &HostFacts,
    id: &str,
    activation: Result<Activation, Error>,
) -> Result<(), Error> {
    let mut history = facts.history.clone();
    let action = if ctx.summary.command == "rollback" {
        Action::Rollback
    } else {
        Action::Push
    };
    match activation {
        Ok(Activation::Healthy) => {
            let event = ctx.event(action, id, Outcome::Deployed);
            ctx.log_event(session, &event).await;
            history.events.push(event);
            ctx.summary.outcome = "deployed".to_string();
            if let Some(message) = ctx.housekeeping_failure.take() {
                ctx.summary.outcome = "housekeeping_failed".to_string();
                return Err(Error::Housekeeping {
                    release: id.to_string(),
                    message,
                });
            }
            if let Err(error) = ctx.prune(session, facts, id, &history).await {
                ctx.summary.outcome = "housekeeping_failed".to_string();
                return Err(error);
            }
            Ok(())
        }
        Ok(Activation::RolledBack { reason }) => {
            let previous = ctx.summary.previous_release.clone().unwrap_or_default();
            let mut failed = ctx.event(action, id, Outcome::RolledBack);
            failed.reason = Some(reason.clone());
            ctx.log_event(session, &failed).await;
            let mut restored = ctx.event(Action::Rollback, &previous, Outcome::Deployed);
            restored.reason = Some(format!("automatic: {id} failed its health check"));
            restored.previous = Some(id.to_string());
            // The restored release's artifact and venv are its own, not the failed push's.
            let earlier = facts.history.latest(&previous);
            restored.artifact_sha256 = earlier
                .map(|event| event.artifact_sha256.clone())
                .unwrap_or_default();
            restored.venv_key = earlier.and_then(|event| event.venv_key.clone());
            restored.venv_reused = None;
            ctx.log_event(session, &restored).await;
            ctx.summary.outcome = "rolled_back".to_string();
            ctx.reporter.note(&format!("{id} failed: {reason}"));
            Err(Error::RolledBack {
                release: id.to_string(),
                previous,
            })
        }
        Ok(Activation::Broken { reason }) => {
            let mut event = ctx.event(action, id, Outcome::Broken);
            event.reason = Some(reason.clone());
            ctx.log_event(session, &event).await;
            ctx.summary.outcome = "rollback_failed".to_string();
            Err(Error::RollbackFailed {
                release: id.to_string(),
                message: reason,
            })
        }
        Err(error) => {
            // The switch step itself failed, so `current` still points where it did.
            let mut event = ctx.event(action, id, Outcome::Failed);
            event.reason = Some(error.to_string());
            ctx.log_event(session, &event).await;
            ctx.summary.outcome = "failed_before_switch".to_string();
            Err(error)
        }
    }
}

/// Returns whether the newest `deployed` event of the release log names `release`. Only then is
/// the live release known to have passed its health gate.
fn is_recorded_live(history: &History, release: &str) -> bool {
    history
        .events
        .iter()
        .rev()
        .find(|event| event.outcome == Outcome::Deployed)
        .is_some_and(|event| event.release == release)
}

/// Fails before any change when the deploy user cannot restart the unit, or the unit is unknown.
fn check_privileges(ctx: &mut Context<'_>, facts: &HostFacts) -> Result<(), Error> {
    let config = &ctx.plan.config;
    if facts.lacks_systemctl {
        return Err(Error::StepFailed {
            step: "prepare".to_string(),
            message: format!(
                "systemctl is not on the PATH of user `{}` on the host, so crucible cannot read \
                 the unit's state; fix that user's PATH (for example in /etc/environment)",
                config.user
            ),
        });
    }
    if !facts.is_root && !facts.can_sudo {
        return Err(Error::StepFailed {
            step: "prepare".to_string(),
            message: format!(
                "user `{}` may not run `systemctl restart {}` through sudo without a password; as root on the host, \
                 run `visudo -f /etc/sudoers.d/crucible` and add:\n    {}",
                config.user,
                config.unit,
                remote::sudoers_line(&config.user, &config.unit)
            ),
        });
    }
    if config.unit_file.is_none() && facts.unit_load_state == "not-found" {
        return Err(Error::StepFailed {
            step: "prepare".to_string(),
            message: format!(
                "unit {} is not known to systemd on the host; install it, or set unit_file in hosts.toml",
                config.unit
            ),
        });
    }
    Ok(())
}

/// Everything before the switch: upload, venv, shared paths, unit file. Nothing here touches
/// `current` or the running service, so stopping at any point leaves the host as it was.
async fn prepare_release(
    ctx: &mut Context<'_>,
    session: &Session,
    lock: &DeployLock,
    artifact: &Artifact,
    facts: &HostFacts,
    id: &str,
    is_fresh: bool,
) -> Result<(), Error> {
    let release_dir = if is_fresh {
        ctx.layout().partial(id)
    } else {
        ctx.layout().release(id)
    };
    if is_fresh {
        upload::send_release(ctx, session, artifact, facts, lock, id).await?;
    } else {
        ctx.local_step(
            "upload",
            Instant::now(),
            true,
            format!("skipped: {id} is already on the host"),
        );
        ctx.summary.files_sent = Some(0);
        ctx.summary.bytes_sent = Some(0);
        ctx.summary.files_reused = Some(artifact.manifest.file_count());
    }

    if let (Some((requirements, _)), Some(key)) =
        (&artifact.requirements, ctx.summary.venv_key.clone())
    {
        let command =
            remote::sync_venv(ctx.layout(), &release_dir, &key, requirements, facts.has_uv);
        let output = ctx
            .remote_step(
                session,
                "venv",
                &command,
                ctx.plan.config.timeouts.venv,
                |output| {
                    if output.stdout_text().contains("venv=reused") {
                        format!("reused {key}")
                    } else {
                        format!("built {key}")
                    }
                },
            )
            .await?;
        ctx.summary.venv_reused = Some(output.stdout_text().contains("venv=reused"));
    }

    if !ctx.plan.config.shared.is_empty() {
        let command = remote::link_shared(ctx.layout(), &release_dir, &ctx.plan.config.shared);
        let linked = ctx.plan.config.shared.len();
        let output = ctx
            .remote_step(
                session,
                "shared",
                &command,
                ctx.plan.step_deadline(),
                |_| format!("linked {}", count(linked, "shared path")),
            )
            .await?;
        for (key, warning) in remote::parse_facts(&output.stdout_text()) {
            if key == "warning" {
                ctx.reporter.note(&format!("warning: {warning}"));
            }
        }
    }

    activate::install_unit_file(ctx, session, &release_dir, facts.is_root).await
}
