//! Deploy safety against real test hosts: the deploy lock, the health gate with its automatic
//! rollback, interrupted and killed clients, cut connections, atomic switches and pushes of an
//! artifact that is already on the host. Every test asserts on the host's state afterwards.

mod support;

use std::time::Duration;

use support::{
    APP_PORT, Project, QUICK_HEALTH, RunningCrucible, TcpProxy, TestHost, assert_exit,
    assert_serves, assert_success, json_summary, stderr, wait_until,
};

const LOCK_FILE: &str = "/srv/webapp/.crucible/lock";

/// Size of a random file added to the app so the upload lasts long enough to interrupt. The
/// tests wait for the upload's .partial directory rather than for a fixed time.
const BIG_FILE_SIZE: u64 = 100_000_000;

/// How long a lock may outlive its killed or cut-off deployer: sshd has to notice the closed
/// connection and the holder its closed stdin.
const LOCK_RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bound for a push that is expected to finish, venv build included.
const PUSH_TIMEOUT: Duration = Duration::from_secs(180);

fn is_lock_free(host: &TestHost) -> bool {
    host.run_as_root(&format!("flock -n {LOCK_FILE} true"))
        .status
        .success()
}

fn assert_lock_freed(host: &TestHost) {
    assert!(
        wait_until(LOCK_RELEASE_TIMEOUT, || is_lock_free(host)),
        "the deploy lock is still held {LOCK_RELEASE_TIMEOUT:?} after the deployer stopped"
    );
}

fn partial_releases(host: &TestHost) -> Vec<String> {
    host.run_checked("ls -A /srv/webapp/releases")
        .lines()
        .filter(|name| name.ends_with(".partial"))
        .map(str::to_string)
        .collect()
}

/// Returns whether `release` is a finished release directory, renamed from .partial and
/// containing its manifest.
fn is_complete_release(host: &TestHost, release: &str) -> bool {
    host.exists(&format!(
        "/srv/webapp/releases/{release}/.crucible-manifest"
    ))
}

fn has_log_event(host: &TestHost, release: &str, outcome: &str) -> bool {
    host.log_events()
        .iter()
        .any(|event| event["release"] == release && event["outcome"] == outcome)
}

/// Polls the host every 100 ms until `script` exits 0 there, or panics after `timeout`.
fn wait_for_host(host: &TestHost, script: &str, timeout: Duration, what: &str) {
    assert!(
        wait_until(timeout, || host.run_as_root(script).status.success()),
        "timed out after {timeout:?} waiting for {what}"
    );
}

/// Waits until `running` is past the start of its upload, then leaves it running.
fn wait_for_upload(host: &TestHost, running: &mut RunningCrucible) {
    let started = wait_until(Duration::from_secs(60), || {
        !running.is_running()
            || host
                .run_as_root("ls -d /srv/webapp/releases/*.partial")
                .status
                .success()
    });
    assert!(started, "no .partial directory appeared within 60 s");
    assert!(
        running.is_running(),
        "crucible finished before the test could interrupt its upload; stderr:\n{}",
        running.stderr_so_far()
    );
}

/// Asserts what every interrupted deploy must leave: `current` on a complete release that the
/// service runs, and the lock free. Returns the live release.
fn assert_host_recovers(host: &TestHost) -> String {
    assert_lock_freed(host);
    let live = host.live_release();
    assert!(
        is_complete_release(host, &live),
        "current points at {live}, which is not a complete release"
    );
    assert_serves(host, &live);
    live
}

/// Pushes again after an interrupted push and asserts that the new release goes live in place
/// of `previous` and that no .partial upload is left. Returns the new release.
fn push_after_interruption(project: &Project, host: &TestHost, previous: &str) -> String {
    assert_success(&project.crucible(&["push", "test"]));
    let release = host.live_release();
    assert_ne!(
        release, previous,
        "the push after the interruption made a new release"
    );
    assert_serves(host, &release);
    assert!(
        partial_releases(host).is_empty(),
        "the push after the interruption removed the leftover uploads: {:?}",
        partial_releases(host)
    );
    release
}

#[test]
fn second_push_waits_for_lock() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    // The first deployer's health command sleeps, so it holds the lock for at least 10 s.
    let slow = Project::new();
    slow.add_host(
        "test",
        &host,
        "root",
        &[r#"health = { settle = "1s", command = "sleep 10", timeout = "30s" }"#],
    );
    let fast = Project::new();
    fast.add_host("test", &host, "root", &[QUICK_HEALTH]);
    fast.write_file("VERSION", "fast\n");

    let first = slow.spawn_crucible(&["push", "test"]);
    wait_for_host(
        &host,
        &format!("test -e {LOCK_FILE} && ! flock -n {LOCK_FILE} true"),
        Duration::from_secs(30),
        "the first push to take the lock",
    );

    let refused = fast.crucible(&["push", "test"]);
    assert_exit(&refused, 5);
    let message = stderr(&refused);
    assert!(
        message.contains(&format!("(pid {})", first.pid())),
        "the refusal names the holder's pid {}:\n{message}",
        first.pid()
    );
    assert!(
        message.contains("held by") && message.contains(" since "),
        "the refusal says who holds the lock since when:\n{message}"
    );
    let holder = host.run_checked("cat /srv/webapp/.crucible/lock.holder");
    assert!(
        holder.contains(&format!("\"pid\":{}", first.pid())),
        "the refused push must not overwrite the holder record: {holder}"
    );

    let timed_out = fast.crucible(&["push", "test", "--lock-wait", "2s"]);
    assert_exit(&timed_out, 5);
    assert!(
        stderr(&timed_out).contains("waiting for the lock"),
        "--lock-wait prints a countdown:\n{}",
        stderr(&timed_out)
    );
    assert!(
        stderr(&timed_out).contains("--lock-wait 2s ran out"),
        "the error says the wait ran out instead of suggesting --lock-wait:\n{}",
        stderr(&timed_out)
    );

    let waited = fast.crucible(&["push", "test", "--lock-wait", "60s"]);
    assert_success(&waited);
    let first = first.wait(PUSH_TIMEOUT);
    assert_success(&first);

    let events = host.log_events();
    let deployed: Vec<&str> = events
        .iter()
        .filter(|event| event["outcome"] == "deployed")
        .filter_map(|event| event["release"].as_str())
        .collect();
    assert_eq!(
        deployed.len(),
        2,
        "both pushes are in the log: {deployed:?}"
    );
    let live = host.live_release();
    assert_eq!(live, deployed[1], "the push that waited is live");
    assert_serves(&host, &live);
    assert!(is_lock_free(&host), "no lock is left after both pushes");
    assert!(
        wait_until(LOCK_RELEASE_TIMEOUT, || !host
            .exists("/srv/webapp/.crucible/lock.holder")),
        "a finished holder removes its record, so no refusal can name it"
    );
}

#[test]
fn crashing_unit_is_rolled_back() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    // The crashing app exits 1 s after it starts and systemd restarts it 1 s later, so the
    // settle window must be longer than 2 s: the 3 s default.
    project.add_host("test", &host, "root", &[]);
    assert_success(&project.crucible(&["push", "test"]));
    let good = host.live_release();

    project.write_file(
        "app.py",
        "import sys\nimport time\n\ntime.sleep(1)\nsys.exit(1)\n",
    );
    let output = project.crucible(&["--json", "push", "test"]);
    assert_exit(&output, 7);

    let summary = json_summary(&output);
    let bad = summary["release"]
        .as_str()
        .expect("the summary names the release");
    assert_ne!(bad, good);
    assert_eq!(summary["outcome"], "rolled_back");
    assert_eq!(host.live_release(), good, "current is back on {good}");
    assert_serves(&host, &good);
    assert_eq!(
        host.systemctl_show("webapp.service", "ActiveState"),
        "active"
    );
    assert!(
        has_log_event(&host, bad, "rolled_back"),
        "the log records {bad} as rolled_back: {:?}",
        host.log_events()
    );
    let health = summary["steps"]
        .as_array()
        .expect("the summary lists its steps")
        .iter()
        .find(|step| step["name"] == "health" && step["ok"] == false)
        .expect("a failed health step is reported");
    let detail = health["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("NRestarts") || detail.contains("not active"),
        "the health step shows the unit state: {detail}"
    );
    assert!(is_lock_free(&host), "no lock is left after the rollback");
}

#[test]
fn failing_http_probe_is_rolled_back() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    let health = format!(
        r#"health = {{ settle = "1s", http = "http://{}:{APP_PORT}/health", timeout = "2s" }}"#,
        host.address()
    );
    project.add_host("test", &host, "root", &[&health]);
    assert_success(&project.crucible(&["push", "test"]));
    let good = host.live_release();

    let app = std::fs::read_to_string(project.app_path().join("app.py")).unwrap();
    let failing = app.replace(
        "    return {\"release\": RELEASE}",
        "    bottle.response.status = 500\n    return {\"release\": RELEASE}",
    );
    assert_ne!(
        app, failing,
        "the example app's /health handler changed shape"
    );
    project.write_file("app.py", &failing);

    let output = project.crucible(&["push", "test"]);
    assert_exit(&output, 7);
    let report = stderr(&output);
    assert!(
        report.contains("rolled back"),
        "the report says it rolled back:\n{report}"
    );
    assert!(
        report.contains("500"),
        "the report shows the probe's 500:\n{report}"
    );
    assert_eq!(host.live_release(), good);
    assert_serves(&host, &good);

    // Without a rollback the failing release stays live, and that is a different exit code.
    let output = project.crucible(&["push", "test", "--no-rollback"]);
    assert_exit(&output, 9);
    let broken = host.live_release();
    assert_ne!(
        broken, good,
        "--no-rollback leaves the failing release live"
    );
    assert!(
        has_log_event(&host, &broken, "broken"),
        "the log records {broken} as broken: {:?}",
        host.log_events()
    );
}

#[test]
fn killed_client_leaves_host_recoverable() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &[QUICK_HEALTH]);
    assert_success(&project.crucible(&["push", "test"]));
    let first = host.live_release();

    // Killed during the upload.
    project.write_random_file("upload-1.bin", BIG_FILE_SIZE);
    let mut running = project.spawn_crucible(&["push", "test"]);
    wait_for_upload(&host, &mut running);
    running.kill();
    assert_eq!(
        assert_host_recovers(&host),
        first,
        "the upload never went live"
    );

    // Killed while the venv is built: new requirements make a new venv key.
    project.remove_file("upload-1.bin");
    let requirements = std::fs::read_to_string(project.app_path().join("requirements.txt"))
        .expect("the example app has requirements.txt");
    project.write_file(
        "requirements.txt",
        &format!("{requirements}# a new venv key\n"),
    );
    let mut running = project.spawn_crucible(&["push", "test"]);
    let building = wait_until(Duration::from_secs(60), || {
        host.run_as_root(
            "for venv in /srv/webapp/venvs/*/; do \
             [ -d \"$venv\" ] && [ ! -e \"$venv/.crucible-complete\" ] && exit 0; done; exit 1",
        )
        .status
        .success()
    });
    assert!(building, "no half-built venv appeared within 60 s");
    assert!(running.is_running(), "the push ended before the kill");
    running.kill();
    assert_eq!(
        assert_host_recovers(&host),
        first,
        "the venv step is before the switch"
    );

    let second = push_after_interruption(&project, &host, &first);

    // Killed as soon as the switch step is reported, before the health gate can finish. The
    // switch and the restart are one remote command, so the host restarts the unit on the new
    // release without the client. The push that follows still has to run the gate, because no
    // gate ever passed for this release.
    project.write_file("VERSION", "after the switch\n");
    let mut running = project.spawn_crucible(&["push", "test"]);
    assert!(
        running.wait_for_stderr("ok switch", Duration::from_secs(60)),
        "the switch step was not reported within 60 s:\n{}",
        running.stderr_so_far()
    );
    running.kill();
    assert_lock_freed(&host);
    let third = host.live_release();
    assert_ne!(third, second, "the kill came after the switch");
    assert!(
        is_complete_release(&host, &third),
        "current points at {third}, which is not a complete release"
    );
    assert_serves(&host, &third);

    let output = project.crucible(&["push", "test"]);
    assert_success(&output);
    assert_eq!(host.live_release(), third);
    assert_serves(&host, &third);
    assert!(
        has_log_event(&host, &third, "deployed"),
        "the push after the kill ran the health gate and logged {third}: {:?}",
        host.log_events()
    );
    assert!(is_lock_free(&host), "no lock is left after the last push");
}

#[test]
fn cut_connection_leaves_host_recoverable() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let proxy = TcpProxy::start(host.address(), (host.address(), 22).into(), None);
    let project = Project::new();
    project.add_host_at("test", &host, proxy.address(), "root", &[QUICK_HEALTH]);
    assert_success(&project.crucible(&["push", "test"]));
    let first = host.live_release();

    project.write_random_file("upload-1.bin", BIG_FILE_SIZE);
    let mut running = project.spawn_crucible(&["push", "test"]);
    wait_for_upload(&host, &mut running);
    assert!(proxy.cut_all() > 0, "the push had a connection to cut");
    let output = running.wait(Duration::from_secs(60));
    assert!(
        !output.status.success(),
        "a push whose connection was cut cannot succeed:\n{}",
        stderr(&output)
    );
    assert_eq!(
        assert_host_recovers(&host),
        first,
        "the upload never went live"
    );

    project.remove_file("upload-1.bin");
    project.write_file("VERSION", "after the cut\n");
    push_after_interruption(&project, &host, &first);
    assert!(is_lock_free(&host), "no lock is left after the last push");
}

#[test]
fn current_never_missing_during_switches() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &[r#"health = { settle = "0s" }"#]);
    assert_success(&project.crucible(&["push", "test"]));
    let first = host.live_release();
    project.write_file("VERSION", "2\n");
    assert_success(&project.crucible(&["push", "test"]));
    let second = host.live_release();

    // Python reads the link in a tight loop (an estimated million times a second), so even a short
    // gap between unlink and symlink would be seen. The loop ends on a stop file, a deadline
    // or an iteration cap, whichever comes first.
    host.run_checked(
        r#"cat > /tmp/reader.py <<'EOF'
import os, time
deadline = time.monotonic() + 600
reads = failures = 0
while reads < 2_000_000_000 and time.monotonic() < deadline:
    if reads % 1000 == 0 and os.path.exists("/tmp/reader.stop"):
        break
    try:
        os.readlink("/srv/webapp/current")
    except OSError as error:
        failures += 1
        with open("/tmp/reader.failed", "a") as marker:
            marker.write("%s\n" % error)
    reads += 1
with open("/tmp/reader.done", "w") as done:
    done.write("%d %d\n" % (reads, failures))
EOF
nohup python3 /tmp/reader.py >/dev/null 2>&1 &"#,
    );

    const SWITCHES: usize = 50;
    for switch in 0..SWITCHES {
        let target = if switch % 2 == 0 { &first } else { &second };
        let output = project.crucible(&["-q", "rollback", "test", "--to", target]);
        assert_success(&output);
    }

    host.run_checked("touch /tmp/reader.stop");
    wait_for_host(
        &host,
        "test -s /tmp/reader.done",
        Duration::from_secs(10),
        "the reader loop to stop",
    );
    let result = host.run_checked("cat /tmp/reader.done");
    let (reads, failures) = result
        .trim()
        .split_once(' ')
        .expect("the reader writes `READS FAILURES`");
    assert_eq!(
        failures,
        "0",
        "readlink failed during the switches: {}",
        host.run_as_root("cat /tmp/reader.failed")
            .stdout
            .escape_ascii()
    );
    assert!(
        reads.parse::<u64>().unwrap() > 100_000,
        "the reader ran only {reads} reads, too few to cover the switches"
    );
    assert_eq!(
        host.live_release(),
        second,
        "the last rollback went to {second}"
    );
    assert_serves(&host, &second);
}

#[test]
fn same_artifact_uploads_nothing() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &[QUICK_HEALTH]);
    assert_success(&project.crucible(&["push", "test"]));
    let first = host.live_release();
    let main_pid = host.systemctl_show("webapp.service", "MainPID");

    let output = project.crucible(&["--json", "push", "test"]);
    assert_success(&output);
    let summary = json_summary(&output);
    assert_eq!(summary["outcome"], "unchanged");
    assert_eq!(summary["files_sent"], 0);
    assert_eq!(summary["release"], first.as_str());
    let text = project.crucible(&["push", "test"]);
    assert_success(&text);
    assert!(
        stderr(&text).contains("unchanged") || stderr(&text).contains("already live"),
        "the report says nothing changed:\n{}",
        stderr(&text)
    );
    assert_eq!(
        host.systemctl_show("webapp.service", "MainPID"),
        main_pid,
        "an unchanged push does not restart the service"
    );

    project.write_file("VERSION", "2\n");
    assert_success(&project.crucible(&["push", "test"]));
    let second = host.live_release();
    assert_ne!(second, first);

    // The first tree again: its release is on the host but not live.
    project.remove_file("VERSION");
    let output = project.crucible(&["--json", "push", "test"]);
    assert_success(&output);
    let summary = json_summary(&output);
    assert_eq!(summary["outcome"], "deployed");
    assert_eq!(summary["files_sent"], 0, "the upload is skipped");
    assert_eq!(summary["release"], first.as_str());
    let upload = summary["steps"]
        .as_array()
        .expect("the summary lists its steps")
        .iter()
        .find(|step| step["name"] == "upload")
        .expect("the upload step is reported");
    assert!(
        upload["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("skipped"),
        "the upload step says it was skipped: {upload}"
    );
    assert_eq!(host.live_release(), first);
    assert_serves(&host, &first);
}

#[test]
fn terminated_upload_changes_nothing() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &[QUICK_HEALTH]);
    assert_success(&project.crucible(&["push", "test"]));
    let live = host.live_release();
    let main_pid = host.systemctl_show("webapp.service", "MainPID");

    project.write_random_file("upload-1.bin", BIG_FILE_SIZE);
    let mut running = project.spawn_crucible(&["push", "test"]);
    wait_for_upload(&host, &mut running);
    running.signal("TERM");
    let output = running.wait(Duration::from_secs(30));
    assert_exit(&output, 130);

    assert_eq!(host.live_release(), live, "current is untouched");
    assert_eq!(
        host.systemctl_show("webapp.service", "MainPID"),
        main_pid,
        "the service was not restarted"
    );
    assert_serves(&host, &live);
    assert!(
        partial_releases(&host).is_empty(),
        "the interrupted upload was removed: {:?}",
        partial_releases(&host)
    );
    // The client releases the lock itself before it exits, so there is nothing to wait for.
    assert!(is_lock_free(&host), "the lock was released on exit");
}

#[test]
fn scan_error_frees_early_lock() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &[QUICK_HEALTH]);
    assert_success(&project.crucible(&["push", "test"]));
    let live = host.live_release();

    // The first lock attempt runs while the tree is scanned. A tree that fails its checks must
    // still leave the lock free for the next deploy.
    project.write_file(".crucibleignore", "requirements.txt\n");
    let output = project.crucible(&["push", "test"]);
    assert_exit(&output, 2);
    assert!(
        stderr(&output).contains("excluded"),
        "the error names the excluded requirements file:\n{}",
        stderr(&output)
    );

    assert_lock_freed(&host);
    assert_eq!(host.live_release(), live, "nothing changed");
    project.remove_file(".crucibleignore");
    assert_success(&project.crucible(&["push", "test"]));
}
