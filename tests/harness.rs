//! Checks that the real-host harness boots working hosts and stops them again.

mod support;

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use support::{APP_PORT, Project, wait_until};

fn stdout_of(output: &std::process::Output) -> String {
    assert!(
        output.status.success(),
        "command failed with {}:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

#[test]
fn two_hosts_boot_and_stop_independently() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let first = hosts.boot();
    let second = hosts.boot();
    assert_ne!(first.address(), second.address());

    for host in [&first, &second] {
        let init = stdout_of(&host.run_as_root("ps -p 1 -o comm="));
        assert_eq!(init, "systemd", "PID 1 on {}", host.address());

        // `--wait` blocks until boot finishes; `timeout` bounds it in case it never does.
        let state = stdout_of(&host.run_as_root("timeout 30 systemctl is-system-running --wait"));
        assert_eq!(state, "running", "system state on {}", host.address());

        let user = stdout_of(&host.run_as("deploy", "id -un"));
        assert_eq!(user, "deploy", "login as deploy on {}", host.address());
    }

    let address = SocketAddr::from((first.address(), 22));
    drop(first);
    let is_closed = TcpStream::connect_timeout(&address, Duration::from_secs(1)).is_err();
    assert!(
        is_closed,
        "sshd at {address} still accepts connections after drop"
    );

    let second_user = stdout_of(&second.run_as_root("id -un"));
    assert_eq!(
        second_user, "root",
        "the second host stopped together with the first"
    );
}

#[test]
fn state_readers_report_started_service() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();

    let script = format!(
        "ln -s /srv /tmp/link-to-srv && \
         systemd-run --unit=probe --working-directory=/srv \
         python3 -m http.server --bind {} {APP_PORT}",
        host.address()
    );
    host.run_checked(&script);

    assert_eq!(host.readlink("/tmp/link-to-srv").as_deref(), Some("/srv"));
    assert_eq!(host.readlink("/srv"), None);
    assert!(host.exists("/srv"));
    assert!(!host.exists("/srv/webapp"));

    let answered = wait_until(Duration::from_secs(10), || {
        host.http_get(APP_PORT, "/").is_ok()
    });
    assert!(
        answered,
        "nothing answered on {}:{APP_PORT}",
        host.address()
    );
    let (status, body) = host
        .http_get(APP_PORT, "/")
        .expect("GET / from the probe server");
    assert_eq!(status, 200);
    assert!(
        body.contains("Directory listing"),
        "unexpected body: {body}"
    );

    assert_eq!(
        host.systemctl_show("probe.service", "ActiveState"),
        "active"
    );
    assert_eq!(host.systemctl_show("probe.service", "User"), "");
}

#[test]
fn project_writes_pinned_host_table() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "deploy", &["# extra line"]);
    project.write_file("static/hello.txt", "hello\n");
    project.remove_file("requirements.txt");

    assert!(project.app_path().join("app.py").is_file());
    assert!(project.app_path().join("static/hello.txt").is_file());
    assert!(!project.app_path().join("requirements.txt").exists());

    let text = std::fs::read_to_string(project.path().join("hosts.toml")).expect("read hosts.toml");
    let config: toml::Table = text.parse().expect("hosts.toml is valid TOML");
    let table = &config["hosts"]["test"];
    assert_eq!(
        table["address"].as_str(),
        Some(host.address().to_string().as_str())
    );
    assert_eq!(table["user"].as_str(), Some("deploy"));
    assert_eq!(table["host_key"].as_str(), Some(host.host_key()));
    let identity = table["identity"].as_str().expect("identity is a string");
    assert!(std::path::Path::new(identity).is_file());
    assert_eq!(config["app"]["source"].as_str(), Some("app"));
}
