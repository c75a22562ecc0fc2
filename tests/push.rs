//! `crucible push` against real test hosts: each test asserts on the host's state afterwards.

mod support;

use std::process::Output;

use support::{APP_PORT, Project, TestHost};

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn assert_success(output: &Output) {
    assert!(
        output.status.success(),
        "crucible failed with {}:\n{}",
        output.status,
        stderr(output)
    );
}

/// The release id the running app reports on /health.
fn served_release(host: &TestHost) -> String {
    let (status, body) = host
        .http_get(APP_PORT, "/health")
        .expect("the app answers /health");
    assert_eq!(status, 200, "/health body: {body}");
    let value: serde_json::Value = serde_json::from_str(&body).expect("/health returns JSON");
    value["release"]
        .as_str()
        .expect("/health names the release")
        .to_string()
}

fn live_release(host: &TestHost) -> String {
    let target = host
        .readlink("/srv/webapp/current")
        .expect("current exists");
    target.trim_start_matches("releases/").to_string()
}

fn pip_runs(host: &TestHost) -> usize {
    host.run_checked("ls -d /srv/webapp/venvs/*/ 2>/dev/null | wc -l")
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn first_push_to_empty_host_goes_live() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &[]);

    let output = project.crucible(&["push", "test"]);
    assert_success(&output);

    let live = live_release(&host);
    assert!(host.exists(&format!("/srv/webapp/releases/{live}/app.py")));
    assert_eq!(served_release(&host), live);
    assert_eq!(
        host.systemctl_show("webapp.service", "ActiveState"),
        "active"
    );
    assert_eq!(
        host.systemctl_show("webapp.service", "UnitFileState"),
        "enabled"
    );
    let report = stderr(&output);
    for step in [
        "connect", "lock", "prepare", "upload", "venv", "unit", "switch", "restart", "health",
    ] {
        assert!(
            report.contains(&format!(" {step} ")),
            "step {step} missing from report:\n{report}"
        );
    }
    assert!(
        report.contains(&live),
        "final line names the release:\n{report}"
    );
    let releases = host.run_checked("ls /srv/webapp/releases");
    assert!(!releases.contains(".partial"), "left over: {releases}");
}

#[test]
fn code_change_reuses_venv_without_pip() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &[]);
    assert_success(&project.crucible(&["push", "test"]));
    let first = live_release(&host);

    project.write_file("VERSION", "2\n");
    let output = project.crucible(&["push", "test"]);
    assert_success(&output);

    let second = live_release(&host);
    assert_ne!(first, second);
    assert_eq!(served_release(&host), second);
    assert_eq!(pip_runs(&host), 1, "one venv for both releases");
    assert!(
        stderr(&output).contains("reused"),
        "report says the venv was reused:\n{}",
        stderr(&output)
    );
    let first_venv = host.readlink(&format!("/srv/webapp/releases/{first}/.venv"));
    let second_venv = host.readlink(&format!("/srv/webapp/releases/{second}/.venv"));
    assert_eq!(first_venv, second_venv);
}
