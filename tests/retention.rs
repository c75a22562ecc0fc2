//! Pruning that runs while the health gate waits: it removes what retention drops, and never
//! what an automatic rollback needs.

mod support;

use support::{Project, TestHost, assert_exit, assert_success, stderr};

fn releases_on(host: &TestHost) -> Vec<String> {
    host.list_directory("/srv/webapp/releases")
}

#[test]
fn steady_state_prunes_during_health_gate() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host(
        "test",
        &host,
        "root",
        &["keep = 3", "[hosts.test.health]", "settle = \"1s\""],
    );
    let mut deployed = Vec::new();
    for version in 1..=3 {
        project.write_file("VERSION", &format!("{version}\n"));
        assert_success(&project.crucible(&["push", "test"]));
        deployed.push(host.live_release());
    }

    project.write_file("VERSION", "4\n");
    let output = project.crucible(&["push", "test"]);
    assert_success(&output);

    let report = stderr(&output);
    assert!(
        report.contains("during the health gate"),
        "the prune ran during the gate:\n{report}"
    );
    let live = host.live_release();
    assert_eq!(host.served_release(), live);
    let releases = releases_on(&host);
    assert_eq!(
        releases.len(),
        3,
        "keep = 3 leaves three releases: {releases:?}"
    );
    assert!(
        !releases.contains(&deployed[0]),
        "the oldest release is gone: {releases:?}"
    );
    assert!(releases.contains(&deployed[1]), "{releases:?}");
    assert!(releases.contains(&deployed[2]), "{releases:?}");
}

#[test]
fn rollback_after_early_prune_keeps_previous_target() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &["keep = 3"]);
    let mut deployed = Vec::new();
    for version in 1..=3 {
        project.write_file("VERSION", &format!("{version}\n"));
        assert_success(&project.crucible(&["push", "test"]));
        deployed.push(host.live_release());
    }

    // The new release dies 1 s after it starts, so the gate rolls back to the third release.
    // Pruning during the gate drops the first release, but not the second, which is the third's
    // own rollback target.
    project.write_file(
        "app.py",
        "import sys\nimport time\n\ntime.sleep(1)\nsys.exit(1)\n",
    );
    let output = project.crucible(&["push", "test"]);
    assert_exit(&output, 7);

    assert_eq!(
        host.live_release(),
        deployed[2],
        "the third release is live again"
    );
    assert_eq!(host.served_release(), deployed[2]);
    let releases = releases_on(&host);
    assert!(
        releases.contains(&deployed[1]),
        "the rollback target survives: {releases:?}"
    );

    let output = project.crucible(&["rollback", "test"]);
    assert_success(&output);
    assert_eq!(
        host.live_release(),
        deployed[1],
        "a manual rollback still reaches it"
    );
    assert_eq!(host.served_release(), deployed[1]);
}
