//! `crucible push` to hosts that have `uv` on the PATH, so the venv step builds with uv instead
//! of `python3 -m venv` and pip. Each host gets the pinned uv release that `.ci/run` downloads.

mod support;

use std::path::Path;

use support::{
    Project, RealHosts, TestHost, assert_exit, assert_serves, assert_success, printed_sudoers_line,
    stderr, step_line,
};

/// uv's system-wide configuration, read by every uv run on the host whatever the user.
/// `offline = true` makes any attempt to reach an index or download a Python an error, so a
/// passing push proves the venv was built from the release's own wheels.
const OFFLINE_CONFIG: &str = "mkdir -p /etc/uv && printf 'offline = true\\n' > /etc/uv/uv.toml";

/// Boots a host, installs uv as /usr/local/bin/uv and turns off uv's network access.
fn boot_with_uv(hosts: &RealHosts, uv: &Path) -> TestHost {
    let host = hosts.boot();
    host.install_uv(uv);
    host.run_checked(OFFLINE_CONFIG);
    let version = host.run_checked("uv --version");
    assert!(
        version.starts_with("uv "),
        "uv runs on the host from the PATH: {version:?}"
    );
    host
}

/// Returns the venv that `release` links as `.venv`, and panics if it links none.
fn venv_of(host: &TestHost, release: &str) -> String {
    host.readlink(&format!("/srv/webapp/releases/{release}/.venv"))
        .unwrap_or_else(|| panic!("release {release} links no venv"))
}

/// Asserts that uv, not `python3 -m venv`, created `venv` from the host's own python3.
fn assert_built_by_uv(host: &TestHost, venv: &str) {
    let config = host.run_checked(&format!("cat {venv}/pyvenv.cfg"));
    assert!(
        config.lines().any(|line| line.starts_with("uv = ")),
        "uv writes its version into pyvenv.cfg, and python3 -m venv does not:\n{config}"
    );
    assert!(
        config.lines().any(|line| line == "home = /usr/bin"),
        "the venv is based on Debian's /usr/bin/python3, not on a Python of uv's own:\n{config}"
    );
    let bottle = host.run_checked(&format!(
        "{venv}/bin/python -c 'import bottle; print(bottle.__version__)'"
    ));
    assert_eq!(
        bottle.trim(),
        "0.13.4",
        "the venv has the wheel from the release's wheels/"
    );
}

#[test]
fn uv_builds_venv_then_reuses_it() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let Some(uv) = support::uv_binary() else {
        return;
    };
    let host = boot_with_uv(&hosts, &uv);
    let project = Project::new();
    project.add_host("test", &host, "root", &[support::QUICK_HEALTH]);

    let output = project.crucible(&["push", "test"]);
    assert_success(&output);
    let first = host.live_release();
    assert_eq!(
        host.readlink("/srv/webapp/current"),
        Some(format!("releases/{first}")),
        "current points at the new release"
    );
    assert_serves(&host, &first);
    let venv_line = step_line(&output, "venv").expect("the report has a venv line");
    assert!(
        venv_line.contains("built"),
        "the venv step says built: {venv_line}"
    );
    let venv = venv_of(&host, &first);
    assert_built_by_uv(&host, &venv);

    project.write_file("VERSION", "2\n");
    let output = project.crucible(&["push", "test"]);
    assert_success(&output);
    let second = host.live_release();
    assert_ne!(first, second, "the second push made a new release");
    assert_serves(&host, &second);
    let venv_line = step_line(&output, "venv").expect("the report has a venv line");
    assert!(
        venv_line.contains("reused"),
        "the venv step says reused: {venv_line}"
    );
    assert_eq!(venv_of(&host, &second), venv, "both releases link one venv");
    assert_eq!(
        host.list_directory("/srv/webapp/venvs"),
        vec![venv.trim_start_matches("/srv/webapp/venvs/").to_string()],
        "no second venv was built"
    );
}

#[test]
fn uv_rejects_wheel_with_wrong_hash() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let Some(uv) = support::uv_binary() else {
        return;
    };
    let host = boot_with_uv(&hosts, &uv);
    let project = Project::new();
    project.add_host("test", &host, "root", &[support::QUICK_HEALTH]);

    // The first digit of the pinned sha256 changes, and the shipped wheel no longer matches.
    let requirements = project.read_file("requirements.txt");
    assert!(
        requirements.contains("--hash=sha256:0"),
        "the example pins bottle's hash:\n{requirements}"
    );
    project.write_file(
        "requirements.txt",
        &requirements.replace("--hash=sha256:0", "--hash=sha256:1"),
    );
    let output = project.crucible(&["push", "test"]);

    assert_exit(&output, 6);
    let report = stderr(&output);
    assert!(
        report.contains("step `venv` failed"),
        "the error names the venv step:\n{report}"
    );
    assert!(
        report.contains("Hash mismatch"),
        "the error shows uv's reason:\n{report}"
    );
    assert_eq!(host.live_release_if_any(), None, "current was not created");
}

#[test]
fn deploy_user_builds_venv_with_uv() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let Some(uv) = support::uv_binary() else {
        return;
    };
    let host = boot_with_uv(&hosts, &uv);
    host.run_checked("install -d -o deploy -g deploy /srv/webapp");
    // deploy may log in but not create ~/.cache, where uv and pip keep their caches by default,
    // as with many service accounts. sshd accepts a home that root owns and only root writes.
    host.run_checked("chown root:root /home/deploy && chmod 0755 /home/deploy");
    let project = Project::new();
    project.add_host("test", &host, "deploy", &[support::QUICK_HEALTH]);
    let line = printed_sudoers_line(&project.crucible(&["push", "test"]));
    host.install_sudoers_line(&line);

    let output = project.crucible(&["push", "test"]);

    assert_success(&output);
    let live = host.live_release();
    assert_serves(&host, &live);
    let venv = venv_of(&host, &live);
    assert_built_by_uv(&host, &venv);
    let owner = host.run_checked(&format!("stat -c %U -- {venv}/pyvenv.cfg"));
    assert_eq!(owner.trim(), "deploy", "deploy owns the venv");
    let cache_owner = host.run_checked("stat -c %U -- /srv/webapp/.crucible/uv-cache");
    assert_eq!(
        cache_owner.trim(),
        "deploy",
        "uv keeps its cache under the deploy path, which deploy owns"
    );
}

#[test]
fn uv_venv_uses_the_hosts_python3() {
    let Some(hosts) = support::real_hosts() else {
        return;
    };
    let Some(uv) = support::uv_binary() else {
        return;
    };
    let host = boot_with_uv(&hosts, &uv);
    // A copy of Debian's python3 where uv keeps the Pythons that `uv python install` downloads.
    // uv prefers those to the PATH's for a request such as `python3`, but crucible's venv key
    // records the version of the python3 on the PATH.
    host.run_checked(
        "set -e; version=$(python3 -c 'import platform; print(platform.python_version())'); \
         directory=$(uv python dir)/cpython-$version-linux-x86_64-gnu/bin; \
         mkdir -p \"$directory\"; cp /usr/bin/python${version%.*} \"$directory/\"; \
         ln -s python${version%.*} \"$directory/python3\"",
    );
    let found = host.run_checked("uv python find python3");
    assert!(
        found.starts_with("/root/.local/share/uv/python/"),
        "uv itself picks the copy for `python3`: {found}"
    );
    let project = Project::new();
    project.add_host("test", &host, "root", &[support::QUICK_HEALTH]);

    let output = project.crucible(&["push", "test"]);

    assert_success(&output);
    let live = host.live_release();
    assert_serves(&host, &live);
    assert_built_by_uv(&host, &venv_of(&host, &live));
}
