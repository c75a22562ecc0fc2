//! The health gate after a restart: the unit must stay active without new restarts for a settle
//! window, and the optional HTTP and command probes must pass before their deadline.

use std::time::{Duration, Instant};

use super::{quote, unit_state};
use crate::config::Health;
use crate::ssh::{CommandOutput, Session, SshError};

/// Probes an HTTP URL from the host itself with python3, so no curl is needed there. It prints
/// the status code and a body excerpt, and exits 0 only for a 2xx response.
const HTTP_PROBE: &str = r#"import sys, urllib.request, urllib.error
url, timeout = sys.argv[1], float(sys.argv[2])
try:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        status, body = response.status, response.read(300)
except urllib.error.HTTPError as error:
    status, body = error.code, error.read(300)
except Exception as error:
    print("no answer: %s" % error)
    sys.exit(2)
print("%d %s" % (status, body.decode("utf-8", "replace").strip()))
sys.exit(0 if 200 <= status < 300 else 1)
"#;

/// Delay before the first probe retry; each retry doubles it up to [`MAX_RETRY_DELAY`].
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(200);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(2);

/// How often the unit's state is read during the settle window.
const SETTLE_POLL: Duration = Duration::from_millis(250);

pub fn http_probe(url: &str, timeout: Duration) -> String {
    format!(
        "python3 -c {} {} {}",
        quote(HTTP_PROBE),
        quote(url),
        timeout.as_secs().max(1)
    )
}

pub fn command_probe(release_dir: &str, command: &str) -> String {
    format!("cd -- {} && sh -c {}", quote(release_dir), quote(command))
}

/// The systemd properties the gate reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnitState {
    pub active_state: String,
    pub sub_state: String,
    pub load_state: String,
    pub restarts: u64,
    pub main_pid: u64,
    pub active_since: String,
}

impl UnitState {
    pub fn parse(text: &str) -> UnitState {
        let mut state = UnitState::default();
        for line in text.lines() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            match key {
                "ActiveState" => state.active_state = value.to_string(),
                "SubState" => state.sub_state = value.to_string(),
                "LoadState" => state.load_state = value.to_string(),
                "NRestarts" => state.restarts = value.parse().unwrap_or(0),
                "MainPID" => state.main_pid = value.parse().unwrap_or(0),
                "ActiveEnterTimestamp" => state.active_since = value.to_string(),
                _ => {}
            }
        }
        state
    }

    pub fn summary(&self) -> String {
        format!(
            "ActiveState={} SubState={} NRestarts={} MainPID={}",
            self.active_state, self.sub_state, self.restarts, self.main_pid
        )
    }
}

/// The reason a release was declared unhealthy.
#[derive(Debug, Clone)]
pub struct Unhealthy {
    pub check: &'static str,
    pub reason: String,
}

pub async fn read_unit_state(
    session: &Session,
    unit: &str,
    deadline: Duration,
) -> Result<UnitState, SshError> {
    let output = session.run(&unit_state(unit), None, deadline).await?;
    Ok(UnitState::parse(&output.stdout_text()))
}

/// Watches the unit for the settle window: it must stay active and its restart count must not grow
/// past `restarts_before`.
pub async fn settle(
    session: &Session,
    unit: &str,
    restarts_before: u64,
    window: Duration,
    step_deadline: Duration,
) -> Result<Result<UnitState, Unhealthy>, SshError> {
    let end = Instant::now() + window;
    let mut state;
    // A manual restart may reset NRestarts, so the lower of the counts before and just after the
    // restart is the baseline. A new main process during the window counts as a restart too.
    let mut baseline = restarts_before;
    let mut first_pid = None;
    loop {
        state = read_unit_state(session, unit, step_deadline).await?;
        baseline = baseline.min(state.restarts);
        if state.sub_state == "auto-restart" {
            return Ok(Err(Unhealthy {
                check: "unit",
                reason: format!(
                    "the unit exited and systemd is restarting it: {}",
                    state.summary()
                ),
            }));
        }
        if state.main_pid != 0 {
            let pid = *first_pid.get_or_insert(state.main_pid);
            if pid != state.main_pid {
                return Ok(Err(Unhealthy {
                    check: "unit",
                    reason: format!(
                        "the unit's main process changed from {pid} during the settle window: {}",
                        state.summary()
                    ),
                }));
            }
        }
        if state.active_state != "active" && state.active_state != "activating" {
            return Ok(Err(Unhealthy {
                check: "unit",
                reason: format!("the unit is not active: {}", state.summary()),
            }));
        }
        if state.restarts > baseline {
            return Ok(Err(Unhealthy {
                check: "unit",
                reason: format!(
                    "systemd restarted the unit {} time(s) since the deploy: {}",
                    state.restarts - baseline,
                    state.summary()
                ),
            }));
        }
        if Instant::now() >= end {
            break;
        }
        tokio::time::sleep(SETTLE_POLL.min(end.saturating_duration_since(Instant::now()))).await;
    }
    if state.active_state != "active" {
        return Ok(Err(Unhealthy {
            check: "unit",
            reason: format!(
                "the unit did not become active within the settle window: {}",
                state.summary()
            ),
        }));
    }
    Ok(Ok(state))
}

/// Runs `command` until it exits 0 or `health.timeout` passes, backing off between tries.
/// Returns the last output either way.
pub async fn probe_until_healthy(
    session: &Session,
    command: &str,
    timeout: Duration,
    step_deadline: Duration,
) -> Result<(bool, CommandOutput), SshError> {
    let end = Instant::now() + timeout;
    let mut delay = FIRST_RETRY_DELAY;
    loop {
        let remaining = end.saturating_duration_since(Instant::now());
        let output = session
            .run(
                command,
                None,
                step_deadline.min(remaining.max(Duration::from_secs(1))),
            )
            .await;
        let output = match output {
            Ok(output) => output,
            Err(SshError::Timeout { .. }) => CommandOutput {
                exit_status: None,
                stdout: b"probe timed out".to_vec(),
                stderr: Vec::new(),
            },
            Err(error) => return Err(error),
        };
        if output.is_success() {
            return Ok((true, output));
        }
        if Instant::now() + delay >= end {
            return Ok((false, output));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_RETRY_DELAY);
    }
}

/// Runs the whole gate: settle, then the HTTP probe, then the command probe.
pub async fn check(
    session: &Session,
    unit: &str,
    release_dir: &str,
    restarts_before: u64,
    health: &Health,
    step_deadline: Duration,
) -> Result<Result<String, Unhealthy>, SshError> {
    if let Err(unhealthy) =
        settle(session, unit, restarts_before, health.settle, step_deadline).await?
    {
        return Ok(Err(unhealthy));
    }
    let mut passed = vec![format!("unit active for {}s", health.settle.as_secs_f32())];
    if let Some(url) = &health.http {
        let command = http_probe(url, Duration::from_secs(5));
        let (is_healthy, output) =
            probe_until_healthy(session, &command, health.timeout, step_deadline).await?;
        let answer = output.stdout_text().trim().to_string();
        if !is_healthy {
            return Ok(Err(Unhealthy {
                check: "http",
                reason: format!(
                    "{url} did not return 2xx within {}s: {answer}",
                    health.timeout.as_secs()
                ),
            }));
        }
        passed.push(format!(
            "{url} answered {}",
            answer.chars().take(80).collect::<String>()
        ));
    }
    if let Some(probe) = &health.command {
        let command = command_probe(release_dir, probe);
        let (is_healthy, output) =
            probe_until_healthy(session, &command, health.timeout, step_deadline).await?;
        if !is_healthy {
            return Ok(Err(Unhealthy {
                check: "command",
                reason: format!(
                    "`{probe}` kept failing for {}s (last exit status {}): {}",
                    health.timeout.as_secs(),
                    output
                        .exit_status
                        .map_or("none".to_string(), |code| code.to_string()),
                    output.stderr_tail(5)
                ),
            }));
        }
        passed.push(format!("`{probe}` passed"));
    }
    Ok(Ok(passed.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_state_parses_systemctl_show() {
        let state = UnitState::parse(
            "ActiveState=active\nSubState=running\nNRestarts=2\nMainPID=42\nLoadState=loaded\n",
        );
        assert_eq!(state.active_state, "active");
        assert_eq!(state.sub_state, "running");
        assert_eq!(state.restarts, 2);
        assert_eq!(state.main_pid, 42);
    }

    #[test]
    fn http_probe_quotes_url() {
        let command = http_probe(
            "http://127.0.0.1:8000/health?a=1&b=2",
            Duration::from_secs(5),
        );
        assert!(command.ends_with("'http://127.0.0.1:8000/health?a=1&b=2' 5"));
    }

    #[test]
    fn command_probe_runs_in_release() {
        assert_eq!(
            command_probe("/srv/app/releases/r1", "test -f ok"),
            "cd -- /srv/app/releases/r1 && sh -c 'test -f ok'"
        );
    }
}
