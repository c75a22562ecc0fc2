//! Release history on real test hosts: `rollback`, retention, shared files, the release log,
//! `releases` and `status`. Each test asserts on where `current` points and what the running
//! service reports.

mod support;

use support::{Project, RELEASE_LOG, TestHost, assert_exit, assert_success, stderr, step_line};

/// Changes the app's VERSION file so the push makes a new release, pushes it and returns its id.
fn push_version(project: &Project, host: &TestHost, version: u32) -> String {
    project.write_file("VERSION", &format!("{version}\n"));
    let output = project.crucible(&["push", "test"]);
    assert_success(&output);
    let live = host.live_release();
    assert_eq!(
        host.served_release(),
        live,
        "push of VERSION {version} serves its release"
    );
    live
}

/// Asserts that `release` is where `current` points and what the running app reports.
fn assert_live(host: &TestHost, release: &str) {
    assert_eq!(host.live_release(), release, "current points at {release}");
    assert_eq!(host.served_release(), release, "the service runs {release}");
}

/// Returns the release log's events, skipping lines that are not JSON. Unlike
/// `TestHost::log_events`, it tolerates the truncated line that a crash in the middle of an
/// append leaves, which is the case one test here sets up.
fn readable_log_events(host: &TestHost) -> Vec<serde_json::Value> {
    host.run_checked(&format!("cat {RELEASE_LOG}"))
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// The service's main process and the release log's text, which a rejected rollback must
/// leave as they are.
struct ServiceAndLog {
    main_pid: String,
    log: String,
}

impl ServiceAndLog {
    fn record(host: &TestHost) -> ServiceAndLog {
        ServiceAndLog {
            main_pid: host.systemctl_show("webapp.service", "MainPID"),
            log: host.run_checked(&format!("cat {RELEASE_LOG}")),
        }
    }

    fn assert_unchanged(&self, host: &TestHost) {
        assert_eq!(
            host.systemctl_show("webapp.service", "MainPID"),
            self.main_pid,
            "the service was not restarted"
        );
        assert_eq!(
            host.run_checked(&format!("cat {RELEASE_LOG}")),
            self.log,
            "the release log is unchanged"
        );
    }
}

/// Runs `crucible releases test --json` and returns its rows.
fn release_rows(project: &Project) -> Vec<serde_json::Value> {
    let output = project.crucible(&["releases", "test", "--json"]);
    assert_success(&output);
    serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "releases --json printed invalid JSON ({error}):\n{}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

fn row_ids(rows: &[serde_json::Value]) -> Vec<String> {
    rows.iter()
        .map(|row| row["id"].as_str().expect("each row has an id").to_string())
        .collect()
}

/// Returns the ids of the rows whose boolean `field` is true.
fn rows_with(rows: &[serde_json::Value], field: &str) -> Vec<String> {
    rows.iter()
        .filter(|row| row[field].as_bool() == Some(true))
        .map(|row| row["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn rollback_restores_previous_release() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &[]);
    let first = push_version(&project, &host, 1);
    let second = push_version(&project, &host, 2);
    assert_ne!(first, second);

    let output = project.crucible(&["rollback", "test"]);

    assert_success(&output);
    assert_live(&host, &first);
    let restart = step_line(&output, "restart").expect("the report has a restart line");
    assert!(
        restart.contains("exit 0"),
        "the restart line shows exit status 0: {restart}"
    );
    assert_eq!(
        host.systemctl_show("webapp.service", "ActiveState"),
        "active"
    );
}

#[test]
fn rollback_to_older_release() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &[]);
    let first = push_version(&project, &host, 1);
    push_version(&project, &host, 2);
    push_version(&project, &host, 3);

    let output = project.crucible(&["rollback", "test", "--to", &first]);

    assert_success(&output);
    assert_live(&host, &first);
}

#[test]
fn rollback_to_unknown_id_changes_nothing() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &[]);
    let first = push_version(&project, &host, 1);
    let second = push_version(&project, &host, 2);
    let before = ServiceAndLog::record(&host);

    let output = project.crucible(&["rollback", "test", "--to", "20200101T000000Z-deadbeef"]);

    assert!(!output.status.success(), "rollback to an unknown id fails");
    let report = stderr(&output);
    assert!(
        report.contains("20200101T000000Z-deadbeef"),
        "the message names the requested id:\n{report}"
    );
    assert!(
        report.contains(&format!("{second}, {first}")),
        "the message lists the available ids, newest first:\n{report}"
    );
    assert_live(&host, &second);
    before.assert_unchanged(&host);
}

#[test]
fn repeated_rollback_steps_further_back() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &[]);
    let first = push_version(&project, &host, 1);
    let second = push_version(&project, &host, 2);
    push_version(&project, &host, 3);

    assert_success(&project.crucible(&["rollback", "test"]));
    assert_live(&host, &second);

    assert_success(&project.crucible(&["rollback", "test"]));
    assert_live(&host, &first);

    let before = ServiceAndLog::record(&host);
    let output = project.crucible(&["rollback", "test"]);
    assert!(
        !output.status.success(),
        "a third rollback has nothing earlier to go to"
    );
    let report = stderr(&output);
    assert!(
        report.contains("no earlier"),
        "the message says there is no earlier release:\n{report}"
    );
    assert_live(&host, &first);
    before.assert_unchanged(&host);
}

#[test]
fn keep_two_prunes_releases_and_venvs() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &["keep = 2"]);
    let first = push_version(&project, &host, 1);
    let first_venv = host
        .readlink(&format!("/srv/webapp/releases/{first}/.venv"))
        .expect("the first release links a venv");
    push_version(&project, &host, 2);

    // New requirements content gives the last two pushes a second venv.
    let requirements = project.read_file("requirements.txt");
    project.write_file(
        "requirements.txt",
        &format!("{requirements}# second venv\n"),
    );
    let third = push_version(&project, &host, 3);
    let fourth = push_version(&project, &host, 4);
    let second_venv = host
        .readlink(&format!("/srv/webapp/releases/{fourth}/.venv"))
        .expect("the fourth release links a venv");
    assert_ne!(first_venv, second_venv, "the pushes use two venvs");

    let mut expected = vec![third.clone(), fourth.clone()];
    expected.sort();
    assert_eq!(
        host.list_directory("/srv/webapp/releases"),
        expected,
        "only the live release and the rollback target remain"
    );
    assert!(
        !host.exists(&first_venv),
        "the venv no kept release links ({first_venv}) was removed"
    );
    assert!(host.exists(&second_venv), "the live release's venv stays");
    assert_eq!(host.list_directory("/srv/webapp/venvs").len(), 1);

    assert_success(&project.crucible(&["rollback", "test"]));
    assert_live(&host, &third);
}

#[test]
fn log_not_mtimes_decides_prune_and_rollback() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &["keep = 3"]);
    let first = push_version(&project, &host, 1);
    let second = push_version(&project, &host, 2);
    let third = push_version(&project, &host, 3);
    // The oldest releases look newest and the newest looks oldest.
    host.run_checked(&format!(
        "cd /srv/webapp/releases && touch -d 2030-01-01 {first} {second} \
         && touch -d 2000-01-01 {third}"
    ));

    let fourth = push_version(&project, &host, 4);

    let mut expected = vec![second.clone(), third.clone(), fourth.clone()];
    expected.sort();
    assert_eq!(
        host.list_directory("/srv/webapp/releases"),
        expected,
        "pruning removed the release deployed first ({first})"
    );
    assert_success(&project.crucible(&["rollback", "test"]));
    assert_live(&host, &third);
    let rows = release_rows(&project);
    assert_eq!(
        rows_with(&rows, "is_rollback_target"),
        vec![second.clone()],
        "the next rollback goes to the release deployed before {third}"
    );
}

#[test]
fn failed_push_is_never_rollback_target() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &[]);
    let first = push_version(&project, &host, 1);

    let requirements = project.read_file("requirements.txt");
    project.write_file(
        "requirements.txt",
        &format!("{requirements}not-a-shipped-package==1.0\n"),
    );
    project.write_file("VERSION", "2\n");
    assert_exit(&project.crucible(&["push", "test"]), 6);
    let events = host.log_events();
    let failed = events
        .last()
        .expect("the failed push is in the release log");
    assert_eq!(failed["outcome"], "failed", "the log records the failure");
    assert_eq!(failed["action"], "push");
    let failed_id = failed["release"].as_str().unwrap().to_string();
    // Put a complete copy under the failed id, so only the log can tell it never went live.
    host.run_checked(&format!(
        "cp -a /srv/webapp/releases/{first} /srv/webapp/releases/{failed_id}"
    ));

    project.write_file("requirements.txt", &requirements);
    let third = push_version(&project, &host, 3);
    let rows = release_rows(&project);
    assert_eq!(
        rows_with(&rows, "is_rollback_target"),
        vec![first.clone()],
        "releases marks the last deployed release, not the failed one, as the target"
    );

    assert_success(&project.crucible(&["rollback", "test"]));

    assert_live(&host, &first);
    assert_ne!(third, failed_id);
}

/// Creates /srv/webapp/shared/.env on the host before the first push.
fn write_shared_env(host: &TestHost) {
    host.run_checked(
        "mkdir -p /srv/webapp/shared && printf 'SECRET=from-shared\\n' > /srv/webapp/shared/.env",
    );
}

fn assert_shared_links(host: &TestHost) {
    assert_eq!(
        host.readlink("/srv/webapp/current/.env").as_deref(),
        Some("/srv/webapp/shared/.env"),
        "the live release's .env links into shared/"
    );
    assert_eq!(
        host.run_checked("cat /srv/webapp/current/.env"),
        "SECRET=from-shared\n",
        "the shared .env is unchanged"
    );
    assert_eq!(
        host.readlink("/srv/webapp/current/data").as_deref(),
        Some("/srv/webapp/shared/data"),
        "the live release's data/ links into shared/"
    );
}

const SHARED: &str = r#"shared = [".env", "data/"]"#;

#[test]
fn shared_files_survive_pushes_and_rollback() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    write_shared_env(&host);
    let project = Project::new();
    project.add_host("test", &host, "root", &[SHARED]);

    push_version(&project, &host, 1);
    assert_shared_links(&host);
    host.run_checked("printf 'kept\\n' > /srv/webapp/current/data/file");
    let second = push_version(&project, &host, 2);
    assert_shared_links(&host);
    push_version(&project, &host, 3);
    assert_shared_links(&host);

    assert_success(&project.crucible(&["rollback", "test"]));

    assert_live(&host, &second);
    assert_shared_links(&host);
    assert_eq!(
        host.run_checked("cat /srv/webapp/current/data/file"),
        "kept\n",
        "a file written into data/ is still there"
    );
}

#[test]
fn missing_shared_file_fails_before_switch() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    write_shared_env(&host);
    let project = Project::new();
    project.add_host("test", &host, "root", &[SHARED]);
    let first = push_version(&project, &host, 1);
    host.run_checked("rm /srv/webapp/shared/.env");

    project.write_file("VERSION", "2\n");
    let output = project.crucible(&["push", "test"]);

    assert_exit(&output, 6);
    let report = stderr(&output);
    assert!(
        report.contains("/srv/webapp/shared/.env is missing"),
        "the message names the missing path:\n{report}"
    );
    assert_live(&host, &first);
    assert_eq!(
        host.list_directory("/srv/webapp/releases"),
        vec![first],
        "the failed release was removed"
    );
}

#[test]
fn shared_copy_replaces_release_file() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    write_shared_env(&host);
    let project = Project::new();
    project.add_host("test", &host, "root", &[SHARED]);
    project.write_file(".env", "SECRET=from-release\n");

    let output = project.crucible(&["push", "test"]);

    assert_success(&output);
    assert_shared_links(&host);
    let report = stderr(&output);
    assert!(
        report.contains("warning: the release contains .env"),
        "the report warns that the shared copy replaced the release's .env:\n{report}"
    );

    // The live release's .env is now a symlink into shared/: the next upload must replace it
    // without writing through it.
    project.write_file(".env", "SECRET=from-release-2\n");
    let second = push_version(&project, &host, 2);
    assert_live(&host, &second);
    assert_shared_links(&host);
}

#[test]
fn truncated_log_line_is_tolerated() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &[]);
    let first = push_version(&project, &host, 1);
    let second = push_version(&project, &host, 2);
    // Half an event and no newline, as a crash in the middle of an append leaves it.
    host.run_checked(&format!(
        "printf '%s' '{{\"action\":\"push\",\"release\":\"2030' >> {RELEASE_LOG}"
    ));

    let rows = release_rows(&project);
    assert_eq!(
        row_ids(&rows),
        vec![second.clone(), first.clone()],
        "releases still lists both"
    );

    assert_success(&project.crucible(&["rollback", "test"]));
    assert_live(&host, &first);
    let events = readable_log_events(&host);
    let last = events.last().expect("the log has events");
    assert_eq!(
        (last["action"].as_str(), last["release"].as_str()),
        (Some("rollback"), Some(first.as_str())),
        "the rollback's event is readable after the truncated line"
    );

    let third = push_version(&project, &host, 3);
    assert_live(&host, &third);
    let last = readable_log_events(&host).pop().unwrap();
    assert_eq!(last["release"].as_str(), Some(third.as_str()));
    assert_eq!(last["outcome"], "deployed");
}

#[test]
fn releases_json_marks_live_and_target() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &[]);
    let first = push_version(&project, &host, 1);
    let second = push_version(&project, &host, 2);
    let third = push_version(&project, &host, 3);

    let rows = release_rows(&project);
    assert_eq!(
        row_ids(&rows),
        vec![third.clone(), second.clone(), first.clone()],
        "newest first"
    );
    assert_eq!(rows_with(&rows, "is_live"), vec![third.clone()]);
    assert_eq!(rows_with(&rows, "is_rollback_target"), vec![second.clone()]);

    assert_success(&project.crucible(&["rollback", "test"]));
    let rows = release_rows(&project);
    assert_eq!(
        row_ids(&rows),
        vec![third.clone(), second.clone(), first.clone()],
        "a rollback does not reorder the list"
    );
    assert_eq!(rows_with(&rows, "is_live"), vec![second.clone()]);
    assert_eq!(rows_with(&rows, "is_rollback_target"), vec![first.clone()]);
}

#[test]
fn status_shows_live_release_and_state() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &[]);
    let live = push_version(&project, &host, 1);

    let output = project.crucible(&["status", "test"]);
    assert_success(&output);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains(&format!("release:  {live}")),
        "status names the live release:\n{text}"
    );
    assert!(
        text.contains("active/running"),
        "status shows ActiveState/SubState:\n{text}"
    );

    let output = project.crucible(&["status", "test", "--json"]);
    assert_success(&output);
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["live_release"].as_str(), Some(live.as_str()));
    assert_eq!(
        report["active_state"].as_str().map(str::to_string),
        Some(host.systemctl_show("webapp.service", "ActiveState"))
    );
    assert_eq!(
        report["main_pid"].as_u64().map(|pid| pid.to_string()),
        Some(host.systemctl_show("webapp.service", "MainPID"))
    );
}
