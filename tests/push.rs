//! `crucible push` against real test hosts: each test asserts on the host's state afterwards.

mod support;

use std::fs;

use support::{
    Project, TestHost, assert_exit, assert_success, printed_sudoers_line, stderr, step_line,
};

/// A requirement that no wheel in wheels/ provides, so pip fails with `--no-index`.
const BROKEN_REQUIREMENT: &str = "not-a-shipped-package==1.0\n";

fn venv_count(host: &TestHost) -> usize {
    host.list_directory("/srv/webapp/venvs").len()
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

    let live = host.live_release();
    assert!(host.exists(&format!("/srv/webapp/releases/{live}/app.py")));
    assert_eq!(host.served_release(), live);
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
    let first = host.live_release();

    project.write_file("VERSION", "2\n");
    let output = project.crucible(&["push", "test"]);
    assert_success(&output);

    let second = host.live_release();
    assert_ne!(first, second);
    assert_eq!(host.served_release(), second);
    assert_eq!(venv_count(&host), 1, "one venv for both releases");
    assert!(
        stderr(&output).contains("reused"),
        "report says the venv was reused:\n{}",
        stderr(&output)
    );
    let first_venv = host.readlink(&format!("/srv/webapp/releases/{first}/.venv"));
    let second_venv = host.readlink(&format!("/srv/webapp/releases/{second}/.venv"));
    assert_eq!(first_venv, second_venv);
}

#[test]
fn changed_requirements_build_new_venv() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &[]);
    assert_success(&project.crucible(&["push", "test"]));
    let first = host.live_release();

    // A comment changes the file's content, and the venv key is a hash of that content.
    let requirements = project.read_file("requirements.txt");
    project.write_file(
        "requirements.txt",
        &format!("{requirements}# pinned again for the test\n"),
    );
    let output = project.crucible(&["push", "test"]);
    assert_success(&output);

    let second = host.live_release();
    assert_ne!(first, second, "the push made a new release");
    assert_eq!(
        host.served_release(),
        second,
        "the app serves the new release"
    );
    assert_eq!(venv_count(&host), 2, "a second venv next to the first");
    let venv_line = step_line(&output, "venv").expect("the report has a venv line");
    assert!(
        venv_line.contains("built"),
        "the venv step says built: {venv_line}"
    );
    let first_venv = host.readlink(&format!("/srv/webapp/releases/{first}/.venv"));
    let second_venv = host.readlink(&format!("/srv/webapp/releases/{second}/.venv"));
    assert_ne!(
        first_venv, second_venv,
        "the new release links the new venv"
    );
    let second_venv = second_venv.expect("the new release links a venv");
    assert!(
        host.exists(&format!("{second_venv}/.crucible-complete")),
        "the new venv {second_venv} is complete"
    );
}

#[test]
fn changed_unit_file_is_reloaded() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &[]);
    assert_success(&project.crucible(&["push", "test"]));

    let unit = project.read_file("deploy/webapp.service");
    let changed = unit.replace(
        "Description=crucible example web app",
        "Description=crucible example web app, second edition",
    );
    assert_ne!(
        unit, changed,
        "the example unit file has the expected Description line"
    );
    project.write_file("deploy/webapp.service", &changed);
    let output = project.crucible(&["push", "test"]);
    assert_success(&output);

    let installed = host.run_checked("cat /etc/systemd/system/webapp.service");
    assert_eq!(installed, changed, "the new unit file is installed");
    assert_eq!(
        host.systemctl_show("webapp.service", "Description"),
        "crucible example web app, second edition",
        "systemd loaded the new unit file, so daemon-reload ran"
    );
    let unit_line = step_line(&output, "unit").expect("the report has a unit line");
    assert!(
        unit_line.contains("installed"),
        "the unit step says installed: {unit_line}"
    );
    assert_eq!(host.served_release(), host.live_release());
}

#[test]
fn failed_venv_step_changes_nothing() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &[]);
    assert_success(&project.crucible(&["push", "test"]));
    let previous = host.live_release();
    let main_pid = host.systemctl_show("webapp.service", "MainPID");

    let requirements = project.read_file("requirements.txt");
    project.write_file(
        "requirements.txt",
        &format!("{requirements}{BROKEN_REQUIREMENT}"),
    );
    let output = project.crucible(&["push", "test"]);

    assert_exit(&output, 6);
    let report = stderr(&output);
    let venv_line = step_line(&output, "venv").expect("the report has a venv line");
    assert!(
        venv_line.starts_with("FAILED venv") && venv_line.contains("exit 1"),
        "the venv step failed with pip's exit status 1: {venv_line}"
    );
    assert!(
        report.contains("    | ") && report.contains("not-a-shipped-package"),
        "the report shows pip's stderr naming the package:\n{report}"
    );
    assert!(
        report.contains("step `venv` failed"),
        "the error names the step:\n{report}"
    );
    assert_eq!(host.live_release(), previous, "current is unchanged");
    assert_eq!(
        host.served_release(),
        previous,
        "the previous release still serves"
    );
    assert_eq!(
        host.systemctl_show("webapp.service", "MainPID"),
        main_pid,
        "the service was not restarted"
    );
    assert_eq!(
        host.list_directory("/srv/webapp/releases"),
        vec![previous.clone()],
        "neither <id> nor <id>.partial of the failed release remains"
    );
}

#[test]
fn mismatched_host_key_exits_4_before_auth() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    let (_key_directory, other_key) = support::generate_key();
    let other_public = fs::read_to_string(other_key.with_extension("pub")).unwrap();
    // deploy is a user that only this attempt logs in as; the harness always uses root.
    project.add_host_without(
        "test",
        &host,
        "deploy",
        &["host_key"],
        &[&format!("host_key = \"{}\"", other_public.trim())],
    );

    let output = project.crucible(&["push", "test"]);

    assert_exit(&output, 4);
    let report = stderr(&output);
    let expected = support::fingerprint(&other_public);
    let offered = support::fingerprint(host.host_key());
    assert!(
        report.contains(&format!("expected {expected}")),
        "the message names the pinned fingerprint {expected}:\n{report}"
    );
    assert!(
        report.contains(&format!("offered {offered}")),
        "the message names the host's fingerprint {offered}:\n{report}"
    );
    let accepted = |user: &str| {
        let script = format!(
            "journalctl --no-pager -u ssh | grep -c 'Accepted publickey for {user} ' || true"
        );
        host.run_checked(&script).trim().parse::<u32>().unwrap()
    };
    // The harness logs in as root, so root's acceptances show that the journal records them.
    assert!(accepted("root") > 0, "sshd's journal records accepted keys");
    assert_eq!(accepted("deploy"), 0, "sshd accepted no key for deploy");
    assert!(!host.exists("/srv/webapp"), "nothing was deployed");
}

#[test]
fn hashed_known_hosts_entry_is_accepted() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    let known_hosts = project.path().join("known_hosts");
    fs::write(
        &known_hosts,
        format!("{} {}\n", host.address(), host.host_key()),
    )
    .unwrap();
    let known_hosts_line = format!("known_hosts = \"{}\"", known_hosts.display());
    project.add_host_without("test", &host, "root", &["host_key"], &[&known_hosts_line]);

    assert_success(&project.crucible(&["push", "test"]));
    let first = host.live_release();
    assert_eq!(
        host.served_release(),
        first,
        "a plain known_hosts entry works"
    );

    let hashed = std::process::Command::new("ssh-keygen")
        .arg("-H")
        .arg("-f")
        .arg(&known_hosts)
        .output()
        .unwrap();
    assert!(hashed.status.success(), "ssh-keygen -H failed: {hashed:?}");
    let text = fs::read_to_string(&known_hosts).unwrap();
    assert!(
        text.starts_with("|1|") && !text.contains(&host.address().to_string()),
        "the entry is hashed: {text}"
    );
    project.write_file("VERSION", "2\n");
    assert_success(&project.crucible(&["push", "test"]));

    let second = host.live_release();
    assert_ne!(first, second, "the push through the hashed entry deployed");
    assert_eq!(host.served_release(), second);
}

#[test]
fn unknown_host_exits_4() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    let known_hosts = project.path().join("known_hosts");
    fs::write(&known_hosts, "").unwrap();
    let known_hosts_line = format!("known_hosts = \"{}\"", known_hosts.display());
    project.add_host_without("test", &host, "root", &["host_key"], &[&known_hosts_line]);

    let output = project.crucible(&["push", "test"]);

    assert_exit(&output, 4);
    let report = stderr(&output);
    assert!(
        report.contains("unknown host"),
        "the message says the host is unknown:\n{report}"
    );
    assert!(
        report.contains(&support::fingerprint(host.host_key())),
        "the message names the offered fingerprint:\n{report}"
    );
    assert!(!host.exists("/srv/webapp"), "nothing was deployed");
}

#[test]
fn unknown_client_key_exits_3() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    let (_key_directory, other_key) = support::generate_key();
    let identity_line = format!("identity = \"{}\"", other_key.display());
    project.add_host_without("test", &host, "root", &["identity"], &[&identity_line]);

    let output = project.crucible(&["push", "test"]);

    assert_exit(&output, 3);
    let report = stderr(&output);
    assert!(
        report.contains("tried:") && report.contains(&other_key.display().to_string()),
        "the message lists the key it tried:\n{report}"
    );
    assert!(
        report.contains("rejected by the host"),
        "the message says why the key failed:\n{report}"
    );
    assert!(!host.exists("/srv/webapp"), "nothing was deployed");
}

#[test]
fn key_from_environment_authenticates() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host_without("test", &host, "root", &["identity"], &[]);
    let key_text = fs::read_to_string(host.client_key_path()).unwrap();

    let output = project.crucible_with_env(&["push", "test"], &[("CRUCIBLE_SSH_KEY", &key_text)]);

    assert_success(&output);
    let live = host.live_release();
    assert_eq!(host.served_release(), live);
    assert!(
        !stderr(&output).contains("PRIVATE KEY"),
        "the key text is never printed"
    );
}

/// Creates /srv/webapp as root and gives it to deploy, which may not write to the root-owned /srv.
fn prepare_deploy_path(host: &TestHost) {
    host.run_checked("install -d -o deploy -g deploy /srv/webapp");
}

#[test]
fn quiet_push_prints_final_line_only() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &[support::QUICK_HEALTH]);

    let output = project.crucible(&["push", "test", "-q"]);

    assert_success(&output);
    let report = stderr(&output);
    let lines: Vec<&str> = report.lines().collect();
    assert_eq!(lines.len(), 1, "one line:\n{report}");
    assert!(
        lines[0].contains("is live on test"),
        "the final line names the outcome:\n{report}"
    );
}

#[test]
fn uncreatable_deploy_path_fails_prepare() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "deploy", &[]);

    // /srv belongs to root on the test host, so deploy cannot create /srv/webapp.
    let output = project.crucible(&["push", "test"]);

    assert_exit(&output, 6);
    let report = stderr(&output);
    assert!(
        report.contains("step `prepare` failed") && report.contains("Permission denied"),
        "the error names the prepare step and the host's reason:\n{report}"
    );
    assert!(
        report.contains("check that user `deploy` may create /srv/webapp"),
        "the error says what to fix:\n{report}"
    );
    assert!(!host.exists("/srv/webapp"), "nothing was created");
}

#[test]
fn deploy_user_without_sudo_rule_changes_nothing() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    prepare_deploy_path(&host);
    let project = Project::new();
    project.add_host("test", &host, "deploy", &[]);

    let output = project.crucible(&["push", "test"]);

    assert_exit(&output, 6);
    let line = printed_sudoers_line(&output);
    assert!(
        line.contains("systemctl restart -- webapp.service"),
        "the sudoers line allows the restart: {line}"
    );
    assert!(
        host.readlink("/srv/webapp/current").is_none(),
        "current was not created"
    );
    assert_eq!(
        host.list_directory("/srv/webapp/releases"),
        Vec::<String>::new(),
        "no release was uploaded"
    );
    assert!(
        !host.exists("/etc/systemd/system/webapp.service"),
        "no unit file was installed"
    );
}

#[test]
fn deploy_user_with_printed_sudo_rule_pushes() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    prepare_deploy_path(&host);
    let project = Project::new();
    project.add_host("test", &host, "deploy", &[]);
    let line = printed_sudoers_line(&project.crucible(&["push", "test"]));

    host.install_sudoers_line(&line);
    let output = project.crucible(&["push", "test"]);

    assert_success(&output);
    let live = host.live_release();
    assert_eq!(host.served_release(), live, "the app serves the release");
    let owner = host.run_checked(&format!("stat -c %U /srv/webapp/releases/{live}/app.py"));
    assert_eq!(owner.trim(), "deploy", "deploy owns the release files");
    assert_eq!(
        host.systemctl_show("webapp.service", "ActiveState"),
        "active"
    );
}

/// Returns the text of a hosts.toml whose host is never contacted, because configuration errors
/// stop crucible first.
fn config_with_host(extra_line: &str) -> String {
    format!(
        r#"[app]
name = "webapp"
source = "app"
requirements = "requirements.txt"
unit = "webapp.service"
unit_file = "deploy/webapp.service"

[hosts.staging]
address = "127.0.0.1"
user = "root"
path = "/srv/webapp"
host_key = "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
{extra_line}
[hosts.production]
address = "127.0.0.1"
user = "root"
path = "/srv/webapp"
host_key = "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
"#
    )
}

#[test]
fn unknown_config_key_exits_2() {
    let project = Project::new();
    project.write_hosts_toml(&config_with_host("adress = \"127.0.0.1\""));

    let output = project.crucible(&["push", "staging"]);

    assert_exit(&output, 2);
    let report = stderr(&output);
    assert!(
        report.contains("invalid hosts.toml, line 13"),
        "the message names the file and the line of the unknown key:\n{report}"
    );
    assert!(
        report.contains("adress"),
        "the message names the unknown key:\n{report}"
    );
}

#[test]
fn unknown_host_name_exits_2() {
    let project = Project::new();
    project.write_hosts_toml(&config_with_host(""));

    let output = project.crucible(&["push", "prod"]);

    assert_exit(&output, 2);
    let report = stderr(&output);
    assert!(
        report.contains("`prod` not found"),
        "the message names the missing host:\n{report}"
    );
    assert!(
        report.contains("production, staging"),
        "the message lists the defined hosts:\n{report}"
    );
}
