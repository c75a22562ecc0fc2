//! Every row of the exit-code table in src/error.rs, each produced by a real scenario: a real
//! test host where one is needed, and the host's state checked where the code promises one.

mod support;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{Project, TestHost, assert_exit, stderr, stdout};

/// An app.py whose process exits with status 1 a second after each start, failing the health gate.
const DYING_APP: &str = "import sys, time\ntime.sleep(1)\nsys.exit(1)\n";

/// How long the app may take to respond to /health after crucible has restarted it.
const SERVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Writes a fresh ed25519 public key into the project and returns it as an OpenSSH line. It is
/// valid but belongs to no test host.
fn unrelated_public_key(project: &Project) -> String {
    let key = project.path().join("unrelated_key");
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .stdin(Stdio::null())
        .status()
        .expect("failed to start ssh-keygen");
    assert!(status.success(), "ssh-keygen failed with {status}");
    let public = std::fs::read_to_string(key.with_extension("pub")).expect("public key written");
    public
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Lets the user deploy push to /srv/webapp with the sudo rule that `crucible check` prints.
fn allow_deploy_user(host: &TestHost) {
    host.run_checked(
        "install -d -o deploy -g deploy /srv/webapp && \
         echo 'deploy ALL=(root) NOPASSWD: /usr/bin/systemctl restart -- webapp.service, \
         /usr/bin/systemctl daemon-reload, /usr/bin/systemctl enable webapp.service, \
         /usr/bin/tee /etc/systemd/system/webapp.service, \
         /usr/bin/journalctl --no-pager --output=short-iso -n * -u webapp.service' \
         > /etc/sudoers.d/crucible && chmod 0440 /etc/sudoers.d/crucible && visudo -c -q",
    );
}

#[test]
fn exit_0_when_push_goes_live() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &[]);

    let output = project.crucible(&["push", "test"]);

    assert_exit(&output, 0);
    let live = host.live_release();
    assert_eq!(
        host.wait_for_served_release(SERVE_TIMEOUT),
        live,
        "the app serves the live release"
    );
}

#[test]
fn exit_1_when_check_finds_gap() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    host.run_checked("install -d -o deploy -g deploy /srv/webapp");
    let project = Project::new();
    project.add_host("test", &host, "deploy", &[]);

    let output = project.crucible(&["check", "test"]);

    assert_exit(&output, 1);
    let checks = stdout(&output);
    assert!(
        checks.contains("FAIL sudo rule"),
        "check names the missing sudo rule:\n{checks}"
    );
    assert!(
        stderr(&output).contains("1 of 13 checks failed"),
        "check counts the failures: {}",
        stderr(&output)
    );

    let quiet = project.crucible(&["check", "test", "-q"]);
    let quiet_stdout = stdout(&quiet);
    assert_eq!(
        quiet_stdout.lines().count(),
        1,
        "check -q prints only the failed check:\n{quiet_stdout}"
    );
}

#[test]
fn exit_2_for_invalid_hosts_toml() {
    let project = Project::new();
    project.write_hosts_toml(
        "[app]\nname = \"webapp\"\nsource = \"app\"\nunit = \"webapp.service\"\nkeep = 1\n\n\
         [hosts.test]\naddress = \"127.0.0.1\"\nuser = \"root\"\npath = \"/srv/webapp\"\n",
    );

    let output = project.crucible(&["push", "test"]);

    assert_exit(&output, 2);
    assert!(
        stderr(&output).contains("keep"),
        "the error names the invalid key: {}",
        stderr(&output)
    );
}

#[test]
fn exit_3_when_nothing_listens() {
    let project = Project::new();
    let public_key = unrelated_public_key(&project);
    // Bound and dropped at once: the kernel just gave this port out, so nothing listens on it.
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("failed to find a free port")
        .port();
    let identity = project.path().join("unrelated_key");
    std::fs::write(
        project.path().join("hosts.toml"),
        format!(
            "[app]\nname = \"webapp\"\nsource = \"app\"\nunit = \"webapp.service\"\n\
             requirements = \"requirements.txt\"\nunit_file = \"deploy/webapp.service\"\n\n\
             [hosts.test]\naddress = \"127.0.0.1\"\nport = {port}\nuser = \"root\"\n\
             path = \"/srv/webapp\"\nhost_key = \"{public_key}\"\nidentity = \"{}\"\n",
            identity.display()
        ),
    )
    .expect("failed to write hosts.toml");

    let output = project.crucible(&["push", "test"]);

    assert_exit(&output, 3);
    assert!(
        stderr(&output).contains(&port.to_string()),
        "the error names the address that refused: {}",
        stderr(&output)
    );
}

#[test]
fn exit_4_when_host_key_differs() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    let wrong_key = unrelated_public_key(&project);
    project.add_host_without(
        "test",
        &host,
        "root",
        &["host_key"],
        &[&format!("host_key = \"{wrong_key}\"")],
    );

    let output = project.crucible(&["push", "test"]);

    assert_exit(&output, 4);
    assert!(
        !host.exists("/srv/webapp"),
        "nothing is created on a host whose key was rejected"
    );
}

#[test]
fn exit_5_when_lock_is_held() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    // Another deploy, as far as crucible can tell: a process holding the flock.
    host.run_checked(
        "mkdir -p /srv/webapp/.crucible && systemd-run --quiet --unit=hold-deploy-lock \
         flock /srv/webapp/.crucible/lock sleep 300",
    );
    let held = support::wait_until(Duration::from_secs(5), || {
        !host
            .run_as_root("flock -n /srv/webapp/.crucible/lock true")
            .status
            .success()
    });
    assert!(
        held,
        "the lock-holding process did not take the lock within 5 s"
    );
    let project = Project::new();
    project.add_host("test", &host, "root", &[]);

    let output = project.crucible(&["push", "test"]);

    assert_exit(&output, 5);
    assert!(
        stderr(&output).contains("--lock-wait"),
        "the error says how to wait for the lock: {}",
        stderr(&output)
    );
    assert_eq!(
        host.live_release_if_any(),
        None,
        "a locked push changes nothing"
    );
}

#[test]
fn exit_6_when_step_fails_before_switch() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &["shared = [\"config.ini\"]"]);

    let output = project.crucible(&["push", "test"]);

    assert_exit(&output, 6);
    assert_eq!(
        host.live_release_if_any(),
        None,
        "no current after a failed first push"
    );
    let releases = host.run_checked("ls -A /srv/webapp/releases");
    assert_eq!(releases.trim(), "", "the unfinished release was removed");
}

#[test]
fn exit_7_when_release_is_rolled_back() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &[]);
    assert_exit(&project.crucible(&["push", "test"]), 0);
    let first = host.live_release();
    project.write_file("app.py", DYING_APP);

    let output = project.crucible(&["push", "test"]);

    assert_exit(&output, 7);
    assert_eq!(
        host.live_release_if_any(),
        Some(first.clone()),
        "current points back at the first release"
    );
    assert_eq!(
        host.wait_for_served_release(SERVE_TIMEOUT),
        first,
        "the first release serves again"
    );
}

#[test]
fn exit_8_when_pruning_fails() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    allow_deploy_user(&host);
    let project = Project::new();
    project.add_host("test", &host, "deploy", &["keep = 2"]);
    assert_exit(&project.crucible(&["push", "test"]), 0);
    let oldest = host.live_release();
    // deploy cannot unlink a file inside a root-owned directory, so `rm -rf` of this release
    // fails.
    host.run_checked(&format!(
        "install -d -o root -g root /srv/webapp/releases/{oldest}/root-owned && \
         touch /srv/webapp/releases/{oldest}/root-owned/file"
    ));
    project.write_file("second.txt", "2\n");
    assert_exit(&project.crucible(&["push", "test"]), 0);
    project.write_file("third.txt", "3\n");

    let output = project.crucible(&["push", "test"]);

    assert_exit(&output, 8);
    let live = host.live_release();
    assert!(
        stderr(&output).contains(&format!("release {live} is live, but housekeeping failed")),
        "the report says the new release is live: {}",
        stderr(&output)
    );
    assert_eq!(
        host.wait_for_served_release(SERVE_TIMEOUT),
        live,
        "the third release serves"
    );
    assert!(
        host.exists(&format!("/srv/webapp/releases/{oldest}/root-owned/file")),
        "the root-owned file is still there, so the prune really failed"
    );
}

#[test]
fn exit_9_when_no_release_is_healthy() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &[]);
    project.write_file("app.py", DYING_APP);

    let output = project.crucible(&["push", "test"]);

    assert_exit(&output, 9);
    assert!(
        stderr(&output).contains("there is no earlier release to roll back to"),
        "the error says why nothing could be rolled back to: {}",
        stderr(&output)
    );
}

#[test]
fn exit_130_when_interrupted_before_switch() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &[]);

    let mut child = Command::new(env!("CARGO_BIN_EXE_crucible"))
        .args(["--json", "push", "test"])
        .current_dir(project.path())
        .env("HOME", project.path().join("home"))
        .env_remove("SSH_AUTH_SOCK")
        .env_remove("CRUCIBLE_SSH_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("failed to start crucible");
    // The venv step takes seconds on a fresh host, long enough to interrupt it. The loop ends
    // when crucible closes stdout at the latest.
    let stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
    let mut saw_venv = false;
    for line in stdout.lines().map_while(Result::ok) {
        if line.contains(r#""event":"step_started","step":"venv""#) {
            saw_venv = true;
            let status = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status()
                .expect("failed to start kill");
            assert!(status.success(), "kill -INT failed with {status}");
        }
    }
    let output = child
        .wait_with_output()
        .expect("failed to wait for crucible");

    assert!(saw_venv, "crucible never started the venv step");
    assert_exit(&output, 130);
    assert_eq!(
        host.live_release_if_any(),
        None,
        "an interrupted first push creates no current"
    );
    let releases = host.run_checked("ls -A /srv/webapp/releases");
    assert_eq!(releases.trim(), "", "the unfinished release was removed");
}
