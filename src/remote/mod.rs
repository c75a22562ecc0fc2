//! The host steps, built as data: each function returns the exact shell text one exec channel runs.
//!
//! Every value that reaches the host's shell passes through [`quote`]; nothing is interpolated by
//! hand. The host needs only sh, coreutils, tar, flock, python3 and systemd.

pub mod facts;
pub mod health;
pub mod lock;

use std::fmt::Write as _;

/// Quotes one argument for a POSIX shell.
///
/// Config validation rejects control characters, NUL among them, in every value that reaches the
/// host's shell. NUL is the only input `shlex` cannot quote, so this never fails on a valid plan.
pub fn quote(value: &str) -> String {
    shlex::try_quote(value)
        .map(|quoted| quoted.into_owned())
        .unwrap_or_else(|_| "''".to_string())
}

/// The files crucible owns under a host's deploy path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub root: String,
}

impl Layout {
    pub fn new(root: &str) -> Layout {
        Layout {
            root: root.trim_end_matches('/').to_string(),
        }
    }

    pub fn releases(&self) -> String {
        format!("{}/releases", self.root)
    }

    pub fn release(&self, id: &str) -> String {
        format!("{}/releases/{id}", self.root)
    }

    /// Returns the directory a release is unpacked and prepared in, renamed to
    /// [`Layout::release`] once complete.
    pub fn partial(&self, id: &str) -> String {
        format!("{}/releases/{id}.partial", self.root)
    }

    pub fn current(&self) -> String {
        format!("{}/current", self.root)
    }

    pub fn venvs(&self) -> String {
        format!("{}/venvs", self.root)
    }

    pub fn venv(&self, key: &str) -> String {
        format!("{}/venvs/{key}", self.root)
    }

    /// Returns the path of the lock held while the venv for `key` is built.
    pub fn venv_lock(&self, key: &str) -> String {
        format!("{}/.crucible/venv-{key}.lock", self.root)
    }

    pub fn shared(&self) -> String {
        format!("{}/shared", self.root)
    }

    /// crucible's own state: the lock, its holder and the release log.
    pub fn state(&self) -> String {
        format!("{}/.crucible", self.root)
    }

    pub fn log(&self) -> String {
        format!("{}/.crucible/releases.jsonl", self.root)
    }
}

/// Marker written into a venv after its last package installed: a venv without it is half-built.
pub const VENV_COMPLETE: &str = ".crucible-complete";

/// Unpacks the tar.gz arriving on stdin into the `.partial` directory, which the concurrent
/// hard-link step may already have created. `prepare` removed any older one under the lock.
///
/// `--no-same-owner` gives the files to the deploy user even when it is root, and `-p` keeps the
/// archive's mode bits exactly instead of applying the remote umask.
pub fn unpack(layout: &Layout, id: &str) -> String {
    let partial = quote(&layout.partial(id));
    format!("mkdir -p -- {partial} && tar -xzf - --no-same-owner -p -C {partial}")
}

/// Ensures the venv for `key` exists, building it in place when its marker is missing, and links
/// it as `<release>/.venv`.
///
/// A venv cannot be moved once built (its scripts hold absolute paths), so it is built at its final
/// path and the marker, written last, marks a complete venv apart from one cut short.
pub fn sync_venv(
    layout: &Layout,
    release_dir: &str,
    key: &str,
    requirements: &str,
    use_uv: bool,
) -> String {
    let venv = quote(&layout.venv(key));
    let release = quote(release_dir);
    let requirements = quote(requirements);
    // Each command has its own line, because `set -e` ignores the failure of any command but the
    // last in an `a && b` list, and the script would go on to mark a failed build complete.
    let install = if use_uv {
        // uv gets the full path of the python3 on the PATH, whose version is part of the venv
        // key, because for a bare `python3` it prefers a Python that `uv python install` put in
        // the user's home. UV_PYTHON_DOWNLOADS=never keeps it from downloading one. The cache
        // sits under the deploy path: with an unwritable home uv fails where pip only warns, and
        // with the cache on another file system it copies files instead of hard-linking them.
        let cache = quote(&format!("{}/uv-cache", layout.state()));
        format!(
            "export UV_CACHE_DIR={cache} UV_PYTHON_DOWNLOADS=never\n\
             uv venv --python \"$(command -v python3)\" {venv}\n\
             VIRTUAL_ENV={venv} uv pip install -r {requirements}"
        )
    } else {
        format!(
            "python3 -m venv -- {venv}\n\
             {venv}/bin/pip install --disable-pip-version-check --no-input -r {requirements}"
        )
    };
    let build = format!(
        "set -e\n\
         if [ -f {venv}/{VENV_COMPLETE} ]; then echo venv=reused; else\n\
         rm -rf -- {venv}\n\
         cd -- {release}\n\
         {install}\n\
         touch -- {venv}/{VENV_COMPLETE}\n\
         echo venv=built\n\
         fi\n\
         ln -sfn -- {venv} {release}/.venv\n"
    );
    // An interrupted push stops crucible but not a pip already running on the host. Holding a
    // lock per venv for the whole build makes the next push wait for that pip, instead of
    // deleting the venv under it and letting it write the marker into a half-built one.
    format!(
        "flock -x {} sh -c {}",
        quote(&layout.venv_lock(key)),
        quote(&build)
    )
}

/// Links each shared path from `<path>/shared` into the release.
///
/// A shared directory (written with a trailing `/`) is created when missing; a missing shared file
/// is an error that names where to put it. When the release itself contains a shared path, the
/// shared copy wins and a `warning=` line reports it.
pub fn link_shared(layout: &Layout, release_dir: &str, shared: &[String]) -> String {
    let mut script = String::from("set -e\n");
    for entry in shared {
        let is_directory = entry.ends_with('/');
        let name = entry.trim_end_matches('/');
        let source = quote(&format!("{}/{name}", layout.shared()));
        let target = quote(&format!("{release_dir}/{name}"));
        let parent = quote(&format!(
            "{release_dir}/{}",
            name.rsplit_once('/')
                .map(|(parent, _)| parent)
                .unwrap_or(".")
        ));
        // A symlink in the release, such as `data -> /var/lib/app`, would make the `rm -rf` and
        // `ln` below act outside the release, so the target's parent must resolve inside it.
        let _ = writeln!(
            script,
            "case \"$(realpath -m -- {parent})/\" in \"$(realpath -- {release})\"/*) ;; *) echo {message} >&2; exit 4;; esac",
            release = quote(release_dir),
            message = quote(&format!(
                "shared path {name} leads out of the release through a symbolic link in the app; \
                 remove the link from the app or change shared in hosts.toml"
            )),
        );
        if is_directory {
            let _ = writeln!(script, "mkdir -p -- {source}");
        } else {
            let _ = writeln!(
                script,
                "if [ ! -e {source} ]; then echo {message} >&2; exit 3; fi",
                message = quote(&format!(
                    "shared file {}/{name} is missing; create it on the host before pushing",
                    layout.shared()
                )),
            );
        }
        let _ = writeln!(
            script,
            "if [ -e {target} ] || [ -L {target} ]; then rm -rf -- {target}; echo {warning}; fi",
            warning = quote(&format!(
                "warning=the release contains {name}; the shared copy replaces it"
            )),
        );
        let _ = writeln!(script, "mkdir -p -- {parent}");
        let _ = writeln!(script, "ln -s -- {source} {target}");
    }
    script
}

/// `sudo -n ` for a non-root deploy user; `-n` fails at once instead of prompting for a password.
pub fn privilege(is_root: bool) -> &'static str {
    if is_root { "" } else { "sudo -n " }
}

/// Installs the release's unit file when it differs from the installed one, then reloads systemd
/// and enables the unit. Prints `unit=installed` or `unit=unchanged`.
pub fn install_unit(release_dir: &str, unit_file: &str, unit: &str, is_root: bool) -> String {
    let sudo = privilege(is_root);
    let source = quote(&format!("{release_dir}/{unit_file}"));
    let installed = quote(&format!("/etc/systemd/system/{unit}"));
    let unit = quote(unit);
    format!(
        "set -e\n\
         if cmp -s -- {source} {installed}; then echo unit=unchanged; exit 0; fi\n\
         {sudo}tee {installed} < {source} > /dev/null\n\
         {sudo}systemctl daemon-reload\n\
         {sudo}systemctl enable {unit}\n\
         echo unit=installed\n"
    )
}

/// Renames the prepared `.partial` directory to its final name.
pub fn finalize(layout: &Layout, id: &str) -> String {
    format!(
        "mv -T -- {} {}",
        quote(&layout.partial(id)),
        quote(&layout.release(id))
    )
}

/// Points `current` at the release in one `rename(2)`: a new symlink is made under a temporary name
/// and moved over the old one, so a reader always finds either the old or the new target. `ln -sfn`
/// would unlink first and leave a moment without `current`.
pub fn switch_current(layout: &Layout, id: &str) -> String {
    let next = quote(&format!("{}/.current.next", layout.root));
    let target = quote(&format!("releases/{id}"));
    format!(
        "rm -f -- {next} && ln -s -- {target} {next} && mv -T -- {next} {current}",
        current = quote(&layout.current())
    )
}

/// Line that [`switch_then_restart`] prints once `current` points at the new release.
pub const SWITCHED: &str = "switched";

/// Runs `switch` and, only when it succeeds, prints [`SWITCHED`] and runs `restart`, as one
/// command. The shell ignores SIGPIPE, so a client that dies after sending it does not stop it
/// between the two. It exits with the failing part's status.
pub fn switch_then_restart(switch: &str, restart: &str) -> String {
    format!("trap '' PIPE; {{ {switch}; }} || exit $?; echo {SWITCHED}; {restart}")
}

/// Restarts the unit after clearing its start rate limit with `reset-failed`.
///
/// systemd refuses a start after `StartLimitBurst` starts (5 by default) within
/// `StartLimitIntervalSec` (10 s), and a crashing release's automatic restarts count too, so
/// without the reset the restart of the previous release during a rollback could be refused.
/// The reset may fail quietly, for a deploy user whose sudo rule lacks it, and the restart runs
/// either way.
///
/// It first prints `restarts_before=N`, the unit's restart count before this restart, which the
/// health gate compares against; reading it here saves a round trip.
pub fn restart(unit: &str, is_root: bool) -> String {
    let sudo = privilege(is_root);
    let unit = quote(unit);
    format!(
        "echo \"{RESTARTS_BEFORE}=$(systemctl show --property=NRestarts --value -- {unit})\"; \
         {sudo}systemctl restart -- {unit} || \
         {{ {sudo}systemctl reset-failed -- {unit} 2>/dev/null; {sudo}systemctl restart -- {unit}; }}"
    )
}

/// The key of the line in [`restart`]'s output that carries the earlier restart count.
pub const RESTARTS_BEFORE: &str = "restarts_before";

/// Returns a command that prints the unit's state as `key=value` lines, without privileges.
pub fn unit_state(unit: &str) -> String {
    format!(
        "systemctl show --property=ActiveState,SubState,NRestarts,MainPID,ActiveEnterTimestamp,LoadState -- {}",
        quote(unit)
    )
}

/// Returns a command that prints the unit's last `lines` journal lines, through sudo for a user
/// outside the journal groups.
///
/// NOTE: the lines can predate this release's restart, for example an earlier release's crash.
/// Narrowing them needs other journalctl arguments, which the printed sudoers line would have to
/// allow.
pub fn journal(unit: &str, lines: u32, is_root: bool) -> String {
    let unit = quote(unit);
    let plain = format!("journalctl --no-pager --output=short-iso -n {lines} -u {unit}");
    if is_root {
        plain
    } else {
        format!("{plain} 2>/dev/null || sudo -n {plain}")
    }
}

/// Appends one line to the release log. A crash mid-write leaves at most a truncated last line,
/// which readers skip. That line has no newline, so one is added first: otherwise this event
/// would be glued to the fragment and skipped with it.
pub fn append_log(layout: &Layout, line: &str) -> String {
    let log = quote(&layout.log());
    format!(
        "if [ -s {log} ] && [ -n \"$(tail -c 1 -- {log})\" ]; then echo >> {log}; fi; \
         printf '%s\\n' {} >> {log}",
        quote(line)
    )
}

/// Removes the given releases and venvs; run only after the switch.
pub fn prune(layout: &Layout, releases: &[String], venvs: &[String]) -> String {
    let mut paths: Vec<String> = releases
        .iter()
        .map(|id| quote(&layout.release(id)))
        .collect();
    for key in venvs {
        paths.push(quote(&layout.venv(key)));
        paths.push(quote(&layout.venv_lock(key)));
    }
    remove_trees(&paths.join(" "))
}

/// Removes a release that failed before the switch, whichever name it has reached.
pub fn discard(layout: &Layout, id: &str) -> String {
    let paths = format!(
        "{} {}",
        quote(&layout.partial(id)),
        quote(&layout.release(id))
    );
    remove_trees(&paths)
}

/// Removes the quoted `paths`. A deploy user may not delete the entries of a directory that an
/// app ships read-only, so those directories get owner write permission first. Files are left
/// alone, because releases share them through hard links.
fn remove_trees(paths: &str) -> String {
    format!(
        "find {paths} -type d ! -perm -u+w -exec chmod u+w -- {{}} + 2>/dev/null; rm -rf -- {paths}"
    )
}

/// Returns the sudoers line that lets `user` run exactly the privileged commands crucible needs.
pub fn sudoers_line(user: &str, unit: &str) -> String {
    format!(
        "{user} ALL=(root) NOPASSWD: /usr/bin/systemctl restart -- {unit}, \
         /usr/bin/systemctl reset-failed -- {unit}, /usr/bin/systemctl daemon-reload, \
         /usr/bin/systemctl enable {unit}, /usr/bin/tee /etc/systemd/system/{unit}, \
         /usr/bin/journalctl --no-pager --output=short-iso -n * -u {unit}"
    )
}

/// Parses `key=value` lines; repeated keys keep every value in order.
pub fn parse_facts(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout::new("/srv/web app/")
    }

    #[test]
    fn quote_wraps_spaces_and_quotes() {
        assert_eq!(quote("plain"), "plain");
        assert_eq!(quote("two words"), "'two words'");
        assert_eq!(quote("it's"), "\"it's\"");
        assert_eq!(quote("$(reboot)"), "'$(reboot)'");
    }

    #[test]
    fn layout_trims_trailing_slash() {
        assert_eq!(layout().current(), "/srv/web app/current");
        assert_eq!(layout().partial("r1"), "/srv/web app/releases/r1.partial");
    }

    #[test]
    fn unpack_quotes_release_path() {
        assert_eq!(
            unpack(&layout(), "20261204T150102Z-3f9a1c2e"),
            "mkdir -p -- '/srv/web app/releases/20261204T150102Z-3f9a1c2e.partial' && tar -xzf - \
             --no-same-owner -p -C '/srv/web app/releases/20261204T150102Z-3f9a1c2e.partial'"
        );
    }

    #[test]
    fn switch_renames_over_current() {
        assert_eq!(
            switch_current(&layout(), "r2"),
            "rm -f -- '/srv/web app/.current.next' && ln -s -- releases/r2 '/srv/web app/.current.next' \
             && mv -T -- '/srv/web app/.current.next' '/srv/web app/current'"
        );
    }

    #[test]
    fn restart_uses_sudo_only_for_non_root() {
        let count = "echo \"restarts_before=$(systemctl show --property=NRestarts --value -- \
                     webapp.service)\"; ";
        assert_eq!(
            restart("webapp.service", true),
            format!(
                "{count}systemctl restart -- webapp.service || {{ systemctl reset-failed -- \
                 webapp.service 2>/dev/null; systemctl restart -- webapp.service; }}"
            )
        );
        assert_eq!(
            restart("webapp.service", false),
            format!(
                "{count}sudo -n systemctl restart -- webapp.service || {{ sudo -n systemctl \
                 reset-failed -- webapp.service 2>/dev/null; sudo -n systemctl restart -- \
                 webapp.service; }}"
            )
        );
    }

    #[test]
    fn restart_runs_only_after_a_switch() {
        assert_eq!(
            switch_then_restart("mv a b", "systemctl restart -- u"),
            "trap '' PIPE; { mv a b; } || exit $?; echo switched; systemctl restart -- u"
        );
    }

    #[test]
    fn log_line_is_quoted() {
        let command = append_log(&Layout::new("/srv/app"), r#"{"who":"o'brien"}"#);
        assert_eq!(
            command,
            r#"if [ -s /srv/app/.crucible/releases.jsonl ] && [ -n "$(tail -c 1 -- /srv/app/.crucible/releases.jsonl)" ]; then echo >> /srv/app/.crucible/releases.jsonl; fi; printf '%s\n' "{\"who\":\"o'brien\"}" >> /srv/app/.crucible/releases.jsonl"#
        );
    }

    #[test]
    fn venv_script_checks_marker_before_building() {
        let script = sync_venv(
            &Layout::new("/srv/app"),
            "/srv/app/releases/r1.partial",
            "abc",
            "requirements.txt",
            false,
        );
        let marker = script.find(".crucible-complete ]").unwrap();
        let build = script.find("python3 -m venv").unwrap();
        assert!(marker < build);
        assert!(
            !script.contains("&&"),
            "under set -e a failure inside an && list would not stop the script:\n{script}"
        );
        assert!(
            script.contains("ln -sfn -- /srv/app/venvs/abc /srv/app/releases/r1.partial/.venv")
        );
    }

    #[test]
    fn uv_venv_uses_the_paths_python3() {
        let script = sync_venv(
            &Layout::new("/srv/app"),
            "/srv/app/releases/r1.partial",
            "abc",
            "requirements.txt",
            true,
        );
        assert_eq!(
            script,
            "flock -x /srv/app/.crucible/venv-abc.lock sh -c 'set -e\n\
             if [ -f /srv/app/venvs/abc/.crucible-complete ]; then echo venv=reused; else\n\
             rm -rf -- /srv/app/venvs/abc\n\
             cd -- /srv/app/releases/r1.partial\n\
             export UV_CACHE_DIR=/srv/app/.crucible/uv-cache UV_PYTHON_DOWNLOADS=never\n\
             uv venv --python \"$(command -v python3)\" /srv/app/venvs/abc\n\
             VIRTUAL_ENV=/srv/app/venvs/abc uv pip install -r requirements.txt\n\
             touch -- /srv/app/venvs/abc/.crucible-complete\n\
             echo venv=built\n\
             fi\n\
             ln -sfn -- /srv/app/venvs/abc /srv/app/releases/r1.partial/.venv\n'"
        );
    }

    #[test]
    fn shared_file_missing_is_an_error() {
        let script = link_shared(
            &Layout::new("/srv/app"),
            "/srv/app/releases/r1.partial",
            &[".env".into()],
        );
        assert!(script.contains("if [ ! -e /srv/app/shared/.env ]; then"));
        assert!(script.contains("ln -s -- /srv/app/shared/.env /srv/app/releases/r1.partial/.env"));
    }

    #[test]
    fn shared_directory_is_created() {
        let script = link_shared(
            &Layout::new("/srv/app"),
            "/srv/app/releases/r1.partial",
            &["data/".into()],
        );
        assert!(script.contains("mkdir -p -- /srv/app/shared/data"));
        assert!(!script.contains("exit 3"));
    }

    #[test]
    fn shared_target_must_resolve_inside_release() {
        let script = link_shared(
            &Layout::new("/srv/app"),
            "/srv/app/releases/r1.partial",
            &["data/cache/".into()],
        );
        let check = script
            .find(r#"case "$(realpath -m -- /srv/app/releases/r1.partial/data)/" in "$(realpath -- /srv/app/releases/r1.partial)"/*)"#)
            .expect("the script checks where the target's parent resolves");
        let remove = script.find("rm -rf").unwrap();
        assert!(
            check < remove,
            "the check must run before anything is removed"
        );
    }

    #[test]
    fn prune_names_each_path() {
        let command = prune(&Layout::new("/srv/app"), &["r1".into()], &["k1".into()]);
        let paths = "/srv/app/releases/r1 /srv/app/venvs/k1 /srv/app/.crucible/venv-k1.lock";
        assert_eq!(
            command,
            format!(
                "find {paths} -type d ! -perm -u+w -exec chmod u+w -- {{}} + 2>/dev/null; \
                 rm -rf -- {paths}"
            )
        );
    }

    #[test]
    fn facts_keep_repeated_keys() {
        let facts = parse_facts("uid=0\nrelease=a /v/1\nrelease=b \nnoise\n");
        assert_eq!(facts.len(), 3);
        assert_eq!(facts[1], ("release".to_string(), "a /v/1".to_string()));
    }
}
