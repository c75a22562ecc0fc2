//! `--json` output and `crucible check` output compared with golden files in tests/golden.
//!
//! Values that change from run to run (release ids, hashes, venv keys, durations, byte counts,
//! the host's address) are replaced by placeholders before the comparison. Run with
//! `CRUCIBLE_UPDATE_GOLDEN=1` to rewrite the golden files after an intended change, and review
//! the diff.

mod support;

use std::fs;
use std::path::PathBuf;
use std::process::Output;

use serde_json::Value;
use support::{Project, TestHost, assert_exit, stdout};

/// An app.py whose process exits with status 1 a second after each start, failing the health gate.
const DYING_APP: &str = "import sys, time\ntime.sleep(1)\nsys.exit(1)\n";

fn golden_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

/// Compares `actual` with the golden file `name`, or rewrites the file when
/// `CRUCIBLE_UPDATE_GOLDEN=1`.
fn assert_golden(name: &str, actual: &str) {
    let path = golden_path(name);
    if std::env::var("CRUCIBLE_UPDATE_GOLDEN").as_deref() == Ok("1") {
        fs::write(&path, actual).expect("failed to write the golden file");
        return;
    }
    let expected = fs::read_to_string(&path).unwrap_or_else(|error| {
        panic!(
            "failed to read {}: {error}; run with CRUCIBLE_UPDATE_GOLDEN=1 to create it",
            path.display()
        )
    });
    assert_eq!(
        actual,
        expected,
        "output differs from {}; if the change is intended, rerun with CRUCIBLE_UPDATE_GOLDEN=1",
        path.display()
    );
}

/// Parses stdout as newline-delimited JSON, one event per line.
fn parse_events(output: &Output) -> Vec<Value> {
    stdout(output)
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|error| panic!("stdout line is not JSON ({error}): {line}"))
        })
        .collect()
}

/// Replaces each run of ASCII digits in `text` with `N`, except digits right after a letter,
/// which are part of a name such as `sha256`.
fn mask_numbers(text: &str) -> String {
    let mut masked = String::with_capacity(text.len());
    let mut in_number = false;
    let mut in_name = false;
    for character in text.chars() {
        if character.is_ascii_digit() && !in_name {
            if !in_number {
                masked.push('N');
            }
            in_number = true;
            continue;
        }
        masked.push(character);
        in_number = false;
        in_name = character.is_ascii_alphabetic() || (in_name && character.is_ascii_digit());
    }
    masked
}

/// Cuts the reason off a failed unit check. How far systemd got restarting a dying unit when
/// the gate looked depends on timing, and so does which symptom the gate saw first.
fn cut_unit_state(text: &str) -> String {
    if !text.contains("ActiveState=") {
        return text.to_string();
    }
    match text.find("failed: ") {
        Some(start) => format!("{}<UNIT FAILURE>", &text[..start + "failed: ".len()]),
        None => text.to_string(),
    }
}

/// Lists the run-specific strings of a push with the placeholders that replace them, longest
/// first so a short hash never cuts into a longer value that contains it.
fn volatile_strings(summary: &Value, host: &TestHost) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut add = |value: Option<&str>, placeholder: &str| {
        if let Some(value) = value.filter(|value| !value.is_empty()) {
            pairs.push((value.to_string(), placeholder.to_string()));
        }
    };
    add(summary["release"].as_str(), "<RELEASE>");
    add(summary["previous_release"].as_str(), "<PREVIOUS>");
    add(summary["artifact_sha256"].as_str(), "<SHA256>");
    add(
        summary["artifact_sha256"].as_str().map(|sha| &sha[..8]),
        "<SHORT_SHA>",
    );
    add(summary["venv_key"].as_str(), "<VENV_KEY>");
    add(Some(&host.address().to_string()), "<ADDRESS>");
    pairs.sort_by_key(|(value, _)| std::cmp::Reverse(value.len()));
    pairs
}

fn replace_all(text: &str, pairs: &[(String, String)]) -> String {
    let mut text = text.to_string();
    for (value, placeholder) in pairs {
        text = text.replace(value, placeholder);
    }
    text
}

/// Normalises one value: strings get their run-specific parts replaced, and free text (step
/// details, notes, errors) gets its numbers masked; durations and byte counts become 0.
fn normalise(value: &mut Value, key: &str, pairs: &[(String, String)]) {
    match value {
        Value::Object(map) => {
            // The journal lines after a failed health check depend on when systemd restarted
            // the unit, so only their presence is compared.
            if map.get("name").and_then(Value::as_str) == Some("health")
                && let Some(tail) = map.get_mut("stderr_tail")
            {
                *tail = Value::from("<JOURNAL>");
            }
            for (field, inner) in map.iter_mut() {
                normalise(inner, field, pairs);
            }
        }
        Value::Array(items) => {
            for item in items {
                normalise(item, key, pairs);
            }
        }
        Value::String(text) => {
            let replaced = replace_all(text, pairs);
            *text = match key {
                "detail" | "message" | "error" | "stderr_tail" => {
                    mask_numbers(&cut_unit_state(&replaced))
                }
                _ => replaced,
            };
        }
        Value::Number(_) if matches!(key, "duration_ms" | "bytes_sent") => {
            *value = Value::from(0);
        }
        _ => {}
    }
}

/// Normalises a push's `--json` events and renders them as a pretty-printed JSON array.
fn normalised_events(output: &Output, host: &TestHost) -> String {
    let mut events = parse_events(output);
    let summary = events
        .last()
        .filter(|event| event["event"] == "summary")
        .cloned()
        .unwrap_or_else(|| panic!("the last event is not the summary: {events:?}"));
    let pairs = volatile_strings(&summary, host);
    for event in &mut events {
        normalise(event, "", &pairs);
    }
    serde_json::to_string_pretty(&events).expect("events serialize") + "\n"
}

/// Makes a test run independent of the environment it runs in, such as a GitHub runner.
const PLAIN_ENVIRONMENT: &[(&str, &str)] = &[("GITHUB_ACTIONS", ""), ("NO_COLOR", "")];

#[test]
fn json_report_of_deployed_push() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &[]);

    let output = project.crucible_with_env(&["--json", "push", "test"], PLAIN_ENVIRONMENT);

    assert_exit(&output, 0);
    assert_golden("push-deployed.json", &normalised_events(&output, &host));
}

#[test]
fn json_report_of_rolled_back_push() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &[]);
    assert_exit(&project.crucible(&["push", "test"]), 0);
    project.write_file("app.py", DYING_APP);

    let output = project.crucible_with_env(&["--json", "push", "test"], PLAIN_ENVIRONMENT);

    assert_exit(&output, 7);
    assert_golden("push-rolled-back.json", &normalised_events(&output, &host));
}

#[test]
fn json_report_of_failed_push() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    // The shared file config.ini is not in <path>/shared, so the `shared` step fails before
    // the switch.
    project.add_host("test", &host, "root", &["shared = [\"config.ini\"]"]);

    let output = project.crucible_with_env(&["--json", "push", "test"], PLAIN_ENVIRONMENT);

    assert_exit(&output, 6);
    assert_golden(
        "push-failed-before-switch.json",
        &normalised_events(&output, &host),
    );
}

#[test]
fn check_reports_missing_sudo_rule() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    host.run_checked("install -d -o deploy -g deploy /srv/webapp");
    let project = Project::new();
    project.add_host("test", &host, "deploy", &[]);

    let output = project.crucible_with_env(&["check", "test"], PLAIN_ENVIRONMENT);

    assert_exit(&output, 1);
    let checks = stdout(&output);
    let address = host.address().to_string();
    let normalised = checks
        .replace(&address, "<ADDRESS>")
        .lines()
        .map(|line| {
            // Free disk space changes from run to run.
            if line.contains("free disk") {
                mask_numbers(line)
            } else {
                line.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n";
    assert_golden("check-missing-sudo-rule.txt", &normalised);
}
