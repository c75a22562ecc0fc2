//! Hosts that make the lock holder's work hard: a read-only directory in the app, a `current`
//! outside releases/, a symlinked directory in the live release, and a state directory the
//! deploy user cannot write.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;

use support::{Project, QUICK_HEALTH, TestHost, assert_success, stderr, stdout};

/// Gives /srv/webapp to deploy, which may not write to the root-owned /srv.
fn give_deploy_path(host: &TestHost) {
    host.run_checked("install -d -o deploy -g deploy /srv/webapp");
}

/// Lets deploy push `project` to /srv/webapp with the sudo rule that crucible prints.
fn allow_deploy_user(host: &TestHost, project: &Project) {
    give_deploy_path(host);
    let line = support::printed_sudoers_line(&project.crucible(&["push", "test"]));
    host.install_sudoers_line(&line);
}

/// Formats a run's stdout and stderr for a failure message.
fn report(output: &std::process::Output) -> String {
    format!("stdout:\n{}\nstderr:\n{}", stdout(output), stderr(output))
}

#[test]
fn deploy_user_delta_into_read_only_directory() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "deploy", &[QUICK_HEALTH]);
    allow_deploy_user(&host, &project);
    // Enough unchanged files ahead of it that the holder is still linking when tar, done with
    // the one changed file, applies the directory's mode.
    for index in 0..5000 {
        project.write_file(&format!("many/file_{index:04}.txt"), &format!("{index}\n"));
    }
    project.write_file("zz_readonly/data.txt", "kept\n");
    let directory = project.app_path().join("zz_readonly");
    fs::set_permissions(&directory, fs::Permissions::from_mode(0o555)).unwrap();
    assert_success(&project.crucible(&["push", "test"]));

    project.write_file(
        "app.py",
        &format!("{}\n# changed\n", project.read_file("app.py")),
    );
    let output = project.crucible(&["push", "test", "--json"]);

    // tar sets the directory's mode 0555 while the holder still links into it.
    assert!(
        output.status.success(),
        "second push failed:\n{}",
        report(&output)
    );
    let summary = support::json_summary(&output);
    assert_eq!(summary["files_sent"], 1, "the delta held: {summary}");
    let live = host.live_release();
    let content = host.run_checked(&format!(
        "cat /srv/webapp/releases/{live}/zz_readonly/data.txt"
    ));
    assert_eq!(content, "kept\n");
    let mode = host.run_checked(&format!(
        "stat -c %a /srv/webapp/releases/{live}/zz_readonly"
    ));
    assert_eq!(mode.trim(), "555", "the directory keeps the archive's mode");
}

#[test]
fn delta_with_current_outside_releases() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &[QUICK_HEALTH]);
    assert_success(&project.crucible(&["push", "test"]));
    let live = host.live_release();
    host.run_checked(&format!(
        "mkdir -p /srv/moved && mv /srv/webapp/releases/{live} /srv/moved/ && \
         ln -sfn /srv/moved/{live} /srv/webapp/current"
    ));

    project.write_file(
        "app.py",
        &format!("{}\n# changed\n", project.read_file("app.py")),
    );
    let output = project.crucible(&["push", "test"]);

    // The live manifest is read through `current`, but the files are linked from releases/ID.
    assert!(output.status.success(), "push failed:\n{}", report(&output));
    support::assert_serves(&host, &host.live_release());
}

#[test]
fn delta_ignores_directory_symlink_in_release() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &[QUICK_HEALTH]);
    project.write_file("pkg/data.txt", "original\n");
    assert_success(&project.crucible(&["push", "test"]));
    let live = host.live_release();
    // Same name, size and mode as the manifest gives, other content, outside the release.
    host.run_checked(&format!(
        "mkdir -p /srv/outside && printf 'tampered\\n' > /srv/outside/data.txt && \
         chmod 0644 /srv/outside/data.txt && rm -rf /srv/webapp/releases/{live}/pkg && \
         ln -s /srv/outside /srv/webapp/releases/{live}/pkg"
    ));

    project.write_file(
        "app.py",
        &format!("{}\n# changed\n", project.read_file("app.py")),
    );
    assert_success(&project.crucible(&["push", "test"]));

    let new = host.live_release();
    let content = host.run_checked(&format!("cat /srv/webapp/releases/{new}/pkg/data.txt"));
    assert_eq!(
        content, "original\n",
        "the new release took a file from /srv/outside"
    );
}

#[test]
fn unwritable_state_directory_fails_without_traceback() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    give_deploy_path(&host);
    // The lock file exists, so flock opens it, and writing the holder record beside it fails.
    host.run_checked(
        "install -d -o root -g root -m 0755 /srv/webapp/.crucible && touch /srv/webapp/.crucible/lock",
    );
    let project = Project::new();
    project.add_host("test", &host, "deploy", &[QUICK_HEALTH]);

    let output = project.crucible(&["push", "test"]);

    assert!(
        !output.status.success(),
        "push succeeded:\n{}",
        report(&output)
    );
    let text = stderr(&output);
    assert!(
        !text.contains("Traceback"),
        "a Python traceback reached the user:\n{text}"
    );
    assert!(
        text.contains("/srv/webapp/.crucible"),
        "the message names no path:\n{text}"
    );
}
