//! Attacks on crucible against real test hosts: hung restarts, pruning after a venv is reused,
//! hostile host state and hostile app trees. Each test is a bug found by trying to break a push,
//! minimised, and it asserts on the host's state afterwards.

mod support;

use support::{
    Project, QUICK_HEALTH, assert_exit, assert_serves, assert_success, json_summary, stderr,
};

#[test]
fn restart_past_deadline_is_rolled_back() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host(
        "test",
        &host,
        "root",
        &[QUICK_HEALTH, r#"timeouts = { restart = "2s" }"#],
    );
    assert_success(&project.crucible(&["push", "test"]));
    let good = host.live_release();

    // `systemctl restart` waits for ExecStartPre, so it runs past the 2 s restart deadline.
    let unit = project.read_file("deploy/webapp.service");
    project.write_file(
        "deploy/webapp.service",
        &unit.replace("ExecStart=", "ExecStartPre=/bin/sleep 30\nExecStart="),
    );
    let output = project.crucible(&["push", "test"]);

    assert_exit(&output, 7);
    assert_eq!(
        host.live_release(),
        good,
        "current should be back on the release before the hung one"
    );
    assert_serves(&host, &good);
}

#[test]
fn reused_venv_survives_pruning() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &[QUICK_HEALTH, "keep = 2"]);
    let requirements = project.read_file("requirements.txt");
    let app = project.read_file("app.py");
    assert_success(&project.crucible(&["push", "test"]));

    // The second release gets a venv of its own; the third goes back to the first venv, whose
    // only other user, the first release, is pruned by that same push.
    project.write_file("requirements.txt", &format!("{requirements}# second\n"));
    project.write_file("app.py", &format!("{app}# second\n"));
    assert_success(&project.crucible(&["push", "test"]));
    project.write_file("requirements.txt", &requirements);
    project.write_file("app.py", &format!("{app}# third\n"));
    assert_success(&project.crucible(&["push", "test"]));

    let venv = host
        .readlink("/srv/webapp/current/.venv")
        .expect("the live release links a venv");
    assert!(
        host.exists(&format!("{venv}/bin/python")),
        "the live release's venv {venv} should survive pruning; venvs left: {:?}",
        host.list_directory("/srv/webapp/venvs")
    );
}

#[test]
fn shared_path_through_app_symlink_is_rejected() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &[QUICK_HEALTH]);
    assert_success(&project.crucible(&["push", "test"]));
    let good = host.live_release();

    // The app ships `outside -> /tmp`, so linking the shared path `outside/escaped/` into the
    // release would create /tmp/escaped on the host.
    std::os::unix::fs::symlink("/tmp", project.app_path().join("outside"))
        .expect("failed to create the symbolic link in the app");
    project.add_host(
        "escape",
        &host,
        "root",
        &[QUICK_HEALTH, r#"shared = ["outside/escaped/"]"#],
    );
    let output = project.crucible(&["push", "escape"]);

    assert_exit(&output, 6);
    assert!(
        stderr(&output).contains("outside/escaped"),
        "the error should name the shared path: {}",
        stderr(&output)
    );
    assert!(
        !host.exists("/tmp/escaped"),
        "the shared link must not be created outside the release"
    );
    assert_eq!(host.live_release(), good, "current should be unchanged");
}

#[test]
fn python_banner_does_not_block_lock() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    // A python3 that prints a line before running anything, as some wrappers and sitecustomize
    // hooks do. The lock holder's `locked` line then arrives second.
    host.run_checked(
        "printf '#!/bin/sh\\necho python wrapper banner\\nexec /usr/bin/python3 \"$@\"\\n' \
         > /usr/local/bin/python3 && chmod +x /usr/local/bin/python3",
    );
    let project = Project::new();
    project.add_host("test", &host, "root", &[QUICK_HEALTH]);
    let output = project.crucible(&["--json", "push", "test"]);

    assert_success(&output);
    let summary = json_summary(&output);
    let release = summary["release"]
        .as_str()
        .expect("the summary names the release");
    assert_eq!(
        host.live_release(),
        release,
        "current should point at the push"
    );
    assert_serves(&host, release);
}
