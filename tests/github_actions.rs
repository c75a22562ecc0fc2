//! GitHub Actions output of `crucible push`: log groups, error annotations and the job summary,
//! checked on real test hosts with `GITHUB_ACTIONS=true` and a temporary `GITHUB_STEP_SUMMARY`.

mod support;

use std::fs;
use std::process::Output;

use support::{Project, assert_exit, assert_success, stderr};

/// Runs `crucible push test` as GitHub Actions would and returns its output and the job summary.
fn push_in_github_actions(project: &Project) -> (Output, String) {
    let summary = project.path().join("step-summary.md");
    let summary_path = summary.to_str().expect("temporary paths are UTF-8");
    let output = project.crucible_with_env(
        &["push", "test"],
        &[
            ("GITHUB_ACTIONS", "true"),
            ("GITHUB_STEP_SUMMARY", summary_path),
            ("GITHUB_REPOSITORY", "example/webapp"),
            ("GITHUB_RUN_ID", "42"),
        ],
    );
    let text = fs::read_to_string(&summary).unwrap_or_else(|error| {
        panic!(
            "crucible wrote no job summary to GITHUB_STEP_SUMMARY ({error}); stderr:\n{}",
            stderr(&output)
        )
    });
    (output, text)
}

#[test]
fn github_push_groups_each_step() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &[]);

    let (output, summary) = push_in_github_actions(&project);

    assert_success(&output);
    let report = stderr(&output);
    let live = host.live_release();
    for step in ["scan", "connect", "upload", "venv", "switch", "health"] {
        assert!(
            report.contains(&format!("::group::{step}\n")),
            "no log group for step {step} in:\n{report}"
        );
    }
    assert_eq!(
        report.matches("::group::").count(),
        report.matches("::endgroup::").count(),
        "every group is closed in:\n{report}"
    );
    assert!(
        !report.contains("::error"),
        "a successful push has no error annotation:\n{report}"
    );
    assert!(
        summary.contains(&format!("release `{live}`")),
        "the job summary names the live release {live}:\n{summary}"
    );
    assert!(
        summary.contains("Outcome: **deployed**"),
        "the job summary states the outcome:\n{summary}"
    );
    assert!(
        summary.contains("| switch | 0 |"),
        "the job summary has a row for the switch step:\n{summary}"
    );
}

#[test]
fn github_failed_push_annotates_error() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &["shared = [\"config.ini\"]"]);

    let (output, summary) = push_in_github_actions(&project);

    assert_exit(&output, 6);
    assert!(
        !host.exists("/srv/webapp/current"),
        "a push that failed before the switch creates no current"
    );
    let report = stderr(&output);
    assert!(
        report.contains("::error title=crucible step shared failed::shared file"),
        "the failed step is an error annotation naming the missing file:\n{report}"
    );
    assert!(
        report.contains("::error title=crucible push test%3A failed_before_switch::"),
        "the push's outcome is an error annotation:\n{report}"
    );
    assert!(
        summary.contains("Outcome: **failed_before_switch**"),
        "the job summary states the outcome:\n{summary}"
    );
    assert!(
        summary.contains("| ❌ shared | 3 |"),
        "the job summary marks the failed step with its exit status:\n{summary}"
    );
    assert!(
        summary.contains("Error: step `shared` failed"),
        "the job summary ends with the error:\n{summary}"
    );
}
