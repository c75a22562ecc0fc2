//! Everyday CLI behaviour: init, completions, help text, push --dry-run and logs.

mod support;

use std::fs;

use support::{Project, assert_success, stderr, stdout};

const SUBCOMMANDS: &[&str] = &[
    "push",
    "rollback",
    "releases",
    "status",
    "check",
    "logs",
    "init",
    "completions",
];

#[test]
fn init_writes_commented_hosts_toml() {
    let project = Project::new();

    let output = project.crucible(&["init", "--config", "fresh/hosts.toml"]);

    assert_success(&output);
    let text = fs::read_to_string(project.path().join("fresh/hosts.toml"))
        .expect("init wrote fresh/hosts.toml");
    assert!(
        text.lines()
            .filter(|line| line.trim_start().starts_with('#'))
            .count()
            >= 5,
        "the starter hosts.toml explains its keys in comments:\n{text}"
    );
    assert!(
        toml::from_str::<toml::Table>(&text).is_ok(),
        "the starter hosts.toml is valid TOML:\n{text}"
    );
}

#[test]
fn init_never_overwrites_hosts_toml() {
    let project = Project::new();
    assert_success(&project.crucible(&["init", "--config", "fresh/hosts.toml"]));
    let path = project.path().join("fresh/hosts.toml");
    fs::write(&path, "# edited by hand\n").expect("failed to edit hosts.toml");

    let output = project.crucible(&["init", "--config", "fresh/hosts.toml"]);

    assert!(!output.status.success(), "a second init fails");
    assert!(
        stderr(&output).contains("already exists"),
        "the error says why: {}",
        stderr(&output)
    );
    assert_eq!(
        fs::read_to_string(&path).expect("hosts.toml is still there"),
        "# edited by hand\n",
        "the existing hosts.toml is unchanged"
    );
}

#[test]
fn init_workflow_writes_deploy_yml() {
    let project = Project::new();

    let output = project.crucible(&["init", "--workflow", "--config", "fresh/hosts.toml"]);

    assert_success(&output);
    let written = fs::read_to_string(project.path().join("fresh/.github/workflows/deploy.yml"))
        .expect("init --workflow wrote .github/workflows/deploy.yml");
    let shipped = include_str!("../.github/workflows/deploy.yml");
    assert_eq!(
        written, shipped,
        "the workflow is the one this repository ships"
    );
    assert!(
        written.contains("crucible push prod"),
        "the workflow pushes to prod:\n{written}"
    );
}

#[test]
fn completions_print_shell_scripts() {
    let project = Project::new();
    for shell in ["bash", "zsh", "fish"] {
        let output = project.crucible(&["completions", shell]);

        assert_success(&output);
        let script = stdout(&output);
        assert!(
            script.contains("rollback") && script.contains("--lock-wait"),
            "the {shell} script completes subcommands and options:\n{script}"
        );
    }
}

/// Splits long `--help` output into the help blocks of each option, leaving out --help and
/// --version, whose text clap writes.
fn option_blocks(help: &str) -> Vec<String> {
    let options = help.split("\nOptions:\n").nth(1).unwrap_or("");
    options
        .split("\n\n")
        .map(str::trim)
        .filter(|block| block.starts_with('-'))
        .filter(|block| !block.contains("--help") && !block.contains("--version"))
        .map(str::to_string)
        .collect()
}

#[test]
fn help_gives_every_option_example() {
    let project = Project::new();
    for subcommand in SUBCOMMANDS {
        let output = project.crucible(&[subcommand, "--help"]);
        assert_success(&output);
        let help = stdout(&output);

        assert!(
            help.contains("Example: crucible"),
            "`{subcommand} --help` shows an example command:\n{help}"
        );
        let blocks = option_blocks(&help);
        assert!(
            !blocks.is_empty(),
            "`{subcommand} --help` lists options:\n{help}"
        );
        for block in blocks {
            assert!(
                block.contains("Example:"),
                "an option in `{subcommand} --help` has no example:\n{block}"
            );
        }
    }
}

#[test]
fn dry_run_push_changes_nothing() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &[]);

    let output = project.crucible(&["push", "test", "--dry-run"]);

    assert_success(&output);
    let plan = stderr(&output);
    assert!(
        plan.contains("upload 4 files"),
        "the plan counts the files:\n{plan}"
    );
    assert!(plan.contains(" MB)"), "the plan gives the size:\n{plan}");
    assert!(
        plan.contains("switch /srv/webapp/current -> releases/"),
        "the plan names the release id it would switch to:\n{plan}"
    );
    assert!(
        plan.contains("restart webapp.service"),
        "the plan lists the restart:\n{plan}"
    );
    assert!(
        !host.exists("/srv/webapp"),
        "a dry run creates nothing on the host"
    );
}

#[test]
fn logs_print_unit_journal_lines() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let host = hosts.boot();
    let project = Project::new();
    project.add_host("test", &host, "root", &[]);
    assert_success(&project.crucible(&["push", "test"]));

    let output = project.crucible(&["logs", "test", "-n", "5"]);

    assert_success(&output);
    let journal = stdout(&output);
    let lines: Vec<&str> = journal.lines().collect();
    assert!(
        !lines.is_empty() && lines.len() <= 5,
        "logs -n 5 prints 1 to 5 lines, got {}:\n{journal}",
        lines.len()
    );
    assert!(
        lines.iter().all(|line| line.contains("webapp")),
        "every line is from the webapp unit:\n{journal}"
    );
}
