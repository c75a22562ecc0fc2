//! Release ids and the release log, `<path>/.crucible/releases.jsonl`.
//!
//! The log, not file modification times, decides which release is previous, what `releases` lists
//! and what pruning may delete.

use std::collections::{BTreeSet, HashMap, HashSet};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::macros::format_description;
use tracing::warn;

/// Builds a release id that sorts by time and carries the short artifact hash,
/// like `20261204T150102Z-3f9a1c2e`.
pub fn release_id(now: OffsetDateTime, short_sha: &str) -> String {
    let stamp = now
        .to_offset(time::UtcOffset::UTC)
        .format(format_description!(
            "[year][month][day]T[hour][minute][second]Z"
        ))
        .expect("a UTC timestamp always formats");
    format!("{stamp}-{short_sha}")
}

/// RFC 3339 UTC time for log entries and reports.
pub fn timestamp(now: OffsetDateTime) -> String {
    now.to_offset(time::UtcOffset::UTC)
        .replace_nanosecond(0)
        .expect("zero nanoseconds are always valid")
        .format(&time::format_description::well_known::Rfc3339)
        .expect("a UTC timestamp always formats")
}

/// What happened.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Push,
    Rollback,
}

/// The outcome of a push or rollback.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The release went live and passed its health gate.
    Deployed,
    /// A step failed before the switch; the release never went live.
    Failed,
    /// The release went live, failed its health gate, and the previous one was restored.
    RolledBack,
    /// The release went live and failed, and restoring the previous one failed too.
    Broken,
}

/// The person or CI run behind a deploy.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Deployer {
    pub user: String,
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub github: Option<GithubRun>,
}

/// A GitHub Actions run, when the deploy ran in one.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct GithubRun {
    pub actor: String,
    pub repository: String,
    pub run_id: String,
    pub commit: String,
}

impl Action {
    /// Returns the name the release log uses.
    pub fn name(self) -> &'static str {
        match self {
            Action::Push => "push",
            Action::Rollback => "rollback",
        }
    }
}

impl Outcome {
    /// Returns the name the release log uses.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Deployed => "deployed",
            Outcome::Failed => "failed",
            Outcome::RolledBack => "rolled_back",
            Outcome::Broken => "broken",
        }
    }
}

impl Deployer {
    pub fn describe(&self) -> String {
        match &self.github {
            Some(run) => format!(
                "{} (GitHub Actions run {} of {})",
                run.actor, run.run_id, run.repository
            ),
            None => format!("{}@{}", self.user, self.host),
        }
    }
}

/// One line of the release log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LogEvent {
    pub action: Action,
    pub release: String,
    pub outcome: Outcome,
    #[serde(default)]
    pub artifact_sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub venv_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub venv_reused: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    pub deployer: Deployer,
    pub started_at: String,
    pub duration_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The parsed log, oldest event first.
#[derive(Debug, Clone, Default)]
pub struct History {
    pub events: Vec<LogEvent>,
}

impl History {
    /// Parses the log, skipping (with a warning) lines that do not parse, such as a last line cut
    /// short by a crash mid-write.
    pub fn parse(text: &str) -> History {
        let mut events = Vec::new();
        for (index, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<LogEvent>(line) {
                Ok(event) => events.push(event),
                Err(error) => {
                    warn!(line = index + 1, %error, "skipping an unreadable line of releases.jsonl")
                }
            }
        }
        History { events }
    }

    /// Releases that went live through a successful push, in the order they were first deployed.
    pub fn deployed_in_order(&self) -> Vec<&str> {
        let mut seen = HashSet::new();
        let mut order = Vec::new();
        for event in &self.events {
            let went_live = event.action == Action::Push && event.outcome == Outcome::Deployed;
            if went_live && seen.insert(event.release.as_str()) {
                order.push(event.release.as_str());
            }
        }
        order
    }

    /// Returns the default rollback target: the newest release that was successfully deployed
    /// before the live one and is still on the host.
    ///
    /// Each rollback therefore steps one release further back in deploy order: after A, B, C, a
    /// rollback goes to B and a second one to A. To go forward again, use `rollback --to` or push.
    /// Releases whose push failed, or that were rolled back automatically, are never targets.
    pub fn rollback_target(
        &self,
        live: Option<&str>,
        on_host: &BTreeSet<String>,
    ) -> Option<String> {
        let order = self.deployed_in_order();
        let candidates: Vec<&str> =
            match live.and_then(|live| order.iter().position(|id| *id == live)) {
                Some(position) => order[..position].to_vec(),
                None => order.clone(),
            };
        candidates
            .into_iter()
            .rev()
            .find(|id| Some(*id) != live && on_host.contains(*id))
            .map(str::to_string)
    }

    /// Returns the latest event about `release`.
    pub fn latest(&self, release: &str) -> Option<&LogEvent> {
        self.events
            .iter()
            .rev()
            .find(|event| event.release == release)
    }

    /// Returns the first successful push of `release`, which records when and by which user it
    /// was deployed.
    pub fn first_deploy(&self, release: &str) -> Option<&LogEvent> {
        self.events.iter().find(|event| {
            event.release == release
                && event.action == Action::Push
                && event.outcome == Outcome::Deployed
        })
    }
}

/// Decides which releases and venvs to remove after a successful switch.
///
/// Keeps the `keep` newest deployed releases, and always the live release and the default rollback
/// target. A release on the host that the log never saw deployed sorts as oldest. Venvs that no
/// kept release links are removed too.
pub fn plan_prune(
    history: &History,
    live: &str,
    keep: u32,
    on_host: &BTreeSet<String>,
    venv_links: &HashMap<String, String>,
    venvs_on_host: &BTreeSet<String>,
) -> (Vec<String>, Vec<String>) {
    let order = history.deployed_in_order();
    let mut ranked: Vec<&String> = on_host.iter().collect();
    ranked.sort_by_key(|id| {
        order
            .iter()
            .position(|deployed| deployed == id)
            .map_or(0, |index| index + 1)
    });
    ranked.reverse();

    let mut kept: BTreeSet<String> = BTreeSet::new();
    kept.insert(live.to_string());
    if let Some(target) = history.rollback_target(Some(live), on_host) {
        kept.insert(target);
    }
    for id in ranked {
        if kept.len() >= keep as usize {
            break;
        }
        kept.insert(id.clone());
    }

    let releases: Vec<String> = on_host
        .iter()
        .filter(|id| !kept.contains(*id))
        .cloned()
        .collect();
    let kept_venvs: HashSet<&str> = kept
        .iter()
        .filter_map(|id| venv_links.get(id))
        .filter_map(|link| link.rsplit('/').next())
        .collect();
    let venvs = venvs_on_host
        .iter()
        .filter(|key| !kept_venvs.contains(key.as_str()))
        .cloned()
        .collect();
    (releases, venvs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(action: Action, release: &str, outcome: Outcome) -> LogEvent {
        LogEvent {
            action,
            release: release.to_string(),
            outcome,
            artifact_sha256: String::new(),
            venv_key: None,
            venv_reused: None,
            previous: None,
            deployer: Deployer::default(),
            started_at: String::new(),
            duration_ms: 0,
            reason: None,
        }
    }

    fn on_host(ids: &[&str]) -> BTreeSet<String> {
        ids.iter().map(|id| id.to_string()).collect()
    }

    fn history(events: Vec<LogEvent>) -> History {
        History { events }
    }

    #[test]
    fn release_id_sorts_by_time_and_carries_hash() {
        let now = OffsetDateTime::from_unix_timestamp(1_796_396_462).unwrap();
        assert_eq!(release_id(now, "3f9a1c2e"), "20261204T150102Z-3f9a1c2e");
    }

    #[test]
    fn truncated_last_line_is_skipped() {
        let line = serde_json::to_string(&event(Action::Push, "a", Outcome::Deployed)).unwrap();
        let text = format!("{line}\n{}", &line[..line.len() / 2]);
        assert_eq!(History::parse(&text).events.len(), 1);
    }

    #[test]
    fn rollback_skips_failed_pushes() {
        let history = history(vec![
            event(Action::Push, "a", Outcome::Deployed),
            event(Action::Push, "b", Outcome::Failed),
            event(Action::Push, "c", Outcome::Deployed),
        ]);
        assert_eq!(
            history.rollback_target(Some("c"), &on_host(&["a", "b", "c"])),
            Some("a".into())
        );
    }

    #[test]
    fn second_rollback_steps_further_back() {
        let history = history(vec![
            event(Action::Push, "a", Outcome::Deployed),
            event(Action::Push, "b", Outcome::Deployed),
            event(Action::Push, "c", Outcome::Deployed),
            event(Action::Rollback, "b", Outcome::Deployed),
        ]);
        let host = on_host(&["a", "b", "c"]);
        assert_eq!(history.rollback_target(Some("b"), &host), Some("a".into()));
        assert_eq!(history.rollback_target(Some("a"), &host), None);
    }

    #[test]
    fn rolled_back_release_is_never_a_target() {
        let history = history(vec![
            event(Action::Push, "a", Outcome::Deployed),
            event(Action::Push, "b", Outcome::RolledBack),
            event(Action::Rollback, "a", Outcome::Deployed),
        ]);
        assert_eq!(
            history.rollback_target(Some("a"), &on_host(&["a", "b"])),
            None
        );
    }

    #[test]
    fn prune_keeps_live_and_target() {
        let history = history(vec![
            event(Action::Push, "a", Outcome::Deployed),
            event(Action::Push, "b", Outcome::Deployed),
            event(Action::Push, "c", Outcome::Deployed),
            event(Action::Push, "d", Outcome::Deployed),
        ]);
        let links: HashMap<String, String> = [
            ("a".to_string(), "/srv/app/venvs/v1".to_string()),
            ("c".to_string(), "/srv/app/venvs/v2".to_string()),
            ("d".to_string(), "/srv/app/venvs/v2".to_string()),
        ]
        .into();
        let (releases, venvs) = plan_prune(
            &history,
            "d",
            2,
            &on_host(&["a", "b", "c", "d"]),
            &links,
            &on_host(&["v1", "v2"]),
        );
        assert_eq!(releases, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(venvs, vec!["v1".to_string()]);
    }

    #[test]
    fn prune_after_rollback_keeps_target_not_newer() {
        let history = history(vec![
            event(Action::Push, "a", Outcome::Deployed),
            event(Action::Push, "b", Outcome::Deployed),
            event(Action::Push, "c", Outcome::Deployed),
            event(Action::Rollback, "b", Outcome::Deployed),
        ]);
        let (releases, _) = plan_prune(
            &history,
            "b",
            2,
            &on_host(&["a", "b", "c"]),
            &HashMap::new(),
            &BTreeSet::new(),
        );
        assert_eq!(releases, vec!["c".to_string()]);
    }
}
