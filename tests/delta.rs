//! Delta push: only changed files travel, and the new release still matches the local tree exactly.

mod support;

use std::os::unix::fs::PermissionsExt;

use support::{Project, QUICK_HEALTH, TestHost, assert_success, json_summary};

/// Runs `push --json` and returns its summary event.
fn push_summary(project: &Project) -> serde_json::Value {
    let output = project.crucible(&["push", "test", "--json"]);
    assert_success(&output);
    json_summary(&output)
}

/// Runs `push --json` and returns the id of the release it made.
fn push_release(project: &Project) -> String {
    let summary = push_summary(project);
    summary["release"]
        .as_str()
        .unwrap_or_else(|| panic!("the summary names no release: {summary}"))
        .to_string()
}

/// Returns the contents of the file at `path` inside `release` on the host.
fn read_release_file(host: &TestHost, release: &str, path: &str) -> String {
    host.run_checked(&format!("cat /srv/webapp/releases/{release}/{path}"))
}

/// Lists a release's tree with type, mode and content hash, leaving out what crucible adds.
fn release_listing(host: &TestHost, release: &str) -> String {
    host.run_checked(&format!(
        "cd /srv/webapp/releases/{release} && find . -mindepth 1 \
         -not -name .venv -not -name .crucible-manifest -printf '%y %m %p %l\\n' | sort && \
         find . -type f -not -name .crucible-manifest -exec sha256sum {{}} + | sort -k 2"
    ))
}

fn write_many_files(project: &Project, count: usize) {
    for index in 0..count {
        project.write_file(
            &format!("pkg/module_{index:03}.py"),
            &format!("VALUE = {index}\n"),
        );
    }
}

#[test]
fn one_file_change_sends_one_file() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &[QUICK_HEALTH]);
    write_many_files(&project, 50);
    let first = push_summary(&project);
    assert!(
        first["files_sent"].as_u64().unwrap() > 50,
        "first push sends everything: {first}"
    );

    project.write_file("pkg/module_007.py", "VALUE = 'changed'\n");
    let second = push_summary(&project);

    assert_eq!(second["outcome"], "deployed");
    assert_eq!(second["files_sent"], 1, "summary: {second}");
    assert!(
        second["files_reused"].as_u64().unwrap() > 50,
        "summary: {second}"
    );
    let live = host.live_release();
    let content = read_release_file(&host, &live, "pkg/module_007.py");
    assert_eq!(content, "VALUE = 'changed'\n");
    assert_eq!(
        host.served_release(),
        live,
        "/health names the live release"
    );
}

#[test]
fn delta_release_matches_full_upload() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &[QUICK_HEALTH]);
    write_many_files(&project, 10);
    project.write_file("bin/run.sh", "#!/bin/sh\necho run\n");
    // A directory that holds only unchanged files is created on the host by the hard-link step,
    // which runs beside tar: its mode must still come from the archive.
    for index in 0..40 {
        project.write_file(&format!("private/nested/file_{index}.txt"), "same\n");
    }
    let private = project.app_path().join("private");
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o750)).unwrap();
    push_summary(&project);

    // Delete a file, change a mode, add a symlink, replace a file with a directory.
    project.remove_file("pkg/module_003.py");
    let script = project.app_path().join("bin/run.sh");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("pkg/module_001.py", project.app_path().join("alias.py")).unwrap();
    project.remove_file("pkg/module_004.py");
    project.write_file("pkg/module_004.py/inner.py", "INNER = 1\n");
    let delta = push_summary(&project);
    let delta_release = delta["release"].as_str().unwrap().to_string();
    assert!(
        delta["files_reused"].as_u64().unwrap() > 5,
        "summary: {delta}"
    );

    // The same tree pushed to a second host without a live release is a full upload.
    let other = hosts.boot();
    project.add_host("fresh", &other, "root", &[QUICK_HEALTH]);
    let output = project.crucible(&["push", "fresh", "--json"]);
    assert_success(&output);
    let full_release = other.live_release();

    assert_eq!(
        delta_release.rsplit('-').next(),
        full_release.rsplit('-').next(),
        "the artifact hash does not depend on what was sent"
    );
    assert_eq!(
        release_listing(&host, &delta_release),
        release_listing(&other, &full_release),
        "a delta release has the same tree as a full upload"
    );
    assert!(!host.exists(&format!(
        "/srv/webapp/releases/{delta_release}/pkg/module_003.py"
    )));
}

#[test]
fn unchanged_tree_uploads_nothing() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &[QUICK_HEALTH]);
    let first = push_summary(&project);
    let pid = host.systemctl_show("webapp.service", "MainPID");

    let second = push_summary(&project);

    assert_eq!(second["outcome"], "unchanged", "summary: {second}");
    assert_eq!(second["release"], first["release"]);
    assert_eq!(second["files_sent"], 0);
    assert_eq!(
        host.systemctl_show("webapp.service", "MainPID"),
        pid,
        "no restart"
    );
}

#[test]
fn tampered_live_release_falls_back_to_full_upload() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &[QUICK_HEALTH]);
    write_many_files(&project, 5);
    push_summary(&project);
    let live = host.live_release();
    host.run_checked(&format!(
        "echo extra >> /srv/webapp/releases/{live}/pkg/module_002.py"
    ));

    project.write_file("pkg/module_000.py", "VALUE = 'new'\n");
    let output = project.crucible(&["push", "test"]);
    assert_success(&output);

    let report = String::from_utf8_lossy(&output.stderr);
    assert!(
        report.contains("does not match its manifest"),
        "report:\n{report}"
    );
    let next = host.live_release();
    let copied = read_release_file(&host, &next, "pkg/module_002.py");
    assert_eq!(
        copied, "VALUE = 2\n",
        "the new release has the local content"
    );
}

#[test]
fn same_size_edit_falls_back_to_full_upload() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &[QUICK_HEALTH]);
    write_many_files(&project, 5);
    push_summary(&project);
    let live = host.live_release();
    // Same size and mode, so only the modification time shows the edit.
    host.run_checked(&format!(
        "printf 'VALUE = 9\\n' > /srv/webapp/releases/{live}/pkg/module_002.py"
    ));

    project.write_file("pkg/module_000.py", "VALUE = 'new'\n");
    let summary = push_summary(&project);

    assert_eq!(summary["files_reused"], 0, "every file was sent: {summary}");
    let next = host.live_release();
    let copied = read_release_file(&host, &next, "pkg/module_002.py");
    assert_eq!(
        copied, "VALUE = 2\n",
        "the new release has the local content"
    );
}

#[test]
fn delta_off_sends_every_file() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &["delta = false", QUICK_HEALTH]);
    let first = push_summary(&project);
    project.write_file("VERSION", "2\n");
    let second = push_summary(&project);
    assert_eq!(
        second["files_sent"].as_u64().unwrap(),
        first["files_sent"].as_u64().unwrap() + 1
    );
    assert_eq!(second["files_reused"], 0);
}

#[test]
fn in_place_write_reaches_linked_release() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &[QUICK_HEALTH]);
    project.write_file("state.txt", "original\n");
    let first = push_release(&project);
    project.write_file("VERSION", "2\n");
    let second = push_release(&project);

    // Unchanged files are hard links, so the two releases share them: an in-place write shows
    // in both, while a write that replaces the file through rename leaves the old one alone.
    host.run_checked(&format!(
        "echo appended >> /srv/webapp/releases/{second}/state.txt"
    ));
    let shared = read_release_file(&host, &first, "state.txt");
    assert_eq!(shared, "original\nappended\n");
    host.run_checked(&format!(
        "cd /srv/webapp/releases/{second} && echo replaced > state.tmp && mv state.tmp state.txt"
    ));
    let kept = read_release_file(&host, &first, "state.txt");
    assert_eq!(kept, "original\nappended\n");
}
