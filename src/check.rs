//! `crucible check`: every prerequisite of a push, each printed with a mark and the exact fix.

use std::path::Path;

use crate::error::Error;
use crate::plan::HostPlan;
use crate::remote::{self, quote};
use crate::report::Reporter;
use crate::ssh::{Session, SshError};

/// One prerequisite and its verdict.
struct Check {
    name: String,
    ok: bool,
    detail: String,
}

/// Checks every prerequisite of a push and prints each with the exact fix.
pub async fn check(plan: &HostPlan, reporter: &mut Reporter) -> Result<(), Error> {
    let mut checks = Vec::new();
    let address = plan.target.display_address();

    let reachable = tokio::time::timeout(
        plan.target.connect_timeout,
        tokio::net::TcpStream::connect((plan.target.address.as_str(), plan.target.port)),
    )
    .await;
    let is_reachable = matches!(reachable, Ok(Ok(_)));
    checks.push(Check {
        name: "address reachable".into(),
        ok: is_reachable,
        detail: if is_reachable {
            address.clone()
        } else {
            format!("{address} did not accept a TCP connection; check address, port and firewall")
        },
    });

    let session = if is_reachable {
        match Session::connect(&plan.target).await {
            Ok(session) => {
                checks.push(Check {
                    name: "host key".into(),
                    ok: true,
                    detail: "matches".into(),
                });
                checks.push(Check {
                    name: "authentication".into(),
                    ok: true,
                    detail: format!("as {}", plan.config.user),
                });
                Some(session)
            }
            Err(SshError::HostKey(rejection)) => {
                checks.push(Check {
                    name: "host key".into(),
                    ok: false,
                    detail: rejection.to_string(),
                });
                None
            }
            Err(error) => {
                checks.push(Check {
                    name: "host key".into(),
                    ok: true,
                    detail: "matches".into(),
                });
                checks.push(Check {
                    name: "authentication".into(),
                    ok: false,
                    detail: error.to_string(),
                });
                None
            }
        }
    } else {
        None
    };

    if let Some(session) = &session {
        let output = session
            .run(&host_checks(plan), None, plan.step_deadline())
            .await?;
        for line in output.stdout_text().lines() {
            let mut fields = line.splitn(3, '\t');
            let (Some(name), Some(verdict), detail) = (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            checks.push(Check {
                name: name.to_string(),
                ok: verdict == "ok",
                detail: detail.unwrap_or("").to_string(),
            });
        }
        session.close().await;
    }

    let failed = checks.iter().filter(|check| !check.ok).count();
    let color = reporter.mode().color;
    let quiet = reporter.mode().quiet;
    for check in checks.iter().filter(|check| !quiet || !check.ok) {
        let mark = match (check.ok, color) {
            (true, true) => "\x1b[32m✓\x1b[0m",
            (false, true) => "\x1b[31m✗\x1b[0m",
            (true, false) => "ok  ",
            (false, false) => "FAIL",
        };
        println!("{mark} {:<20} {}", check.name, check.detail);
    }
    if failed > 0 {
        return Err(Error::CheckFailed {
            failed,
            total: checks.len(),
        });
    }
    Ok(())
}

/// Builds the on-host half of `check`, a script that prints one tab-separated
/// `name, ok|fail, detail` line per prerequisite.
fn host_checks(plan: &HostPlan) -> String {
    let config = &plan.config;
    let root = quote(&config.path);
    let unit = quote(&config.unit);
    let sudoers = quote(&remote::sudoers_line(&config.user, &config.unit));
    let mut script = String::from("report() { printf '%s\\t%s\\t%s\\n' \"$1\" \"$2\" \"$3\"; }\n");
    script.push_str(&format!(
        "if mkdir -p -- {root} 2>/dev/null && [ -w {root} ]; then report 'deploy path' ok {root}; \
         else report 'deploy path' fail \"cannot write {path}; as root run: install -d -o {user} {path}\"; fi\n",
        path = config.path,
        user = config.user,
    ));
    for tool in ["tar", "gzip", "flock", "python3", "systemctl"] {
        script.push_str(&format!(
            "if command -v {tool} >/dev/null 2>&1; then report {tool} ok \"$(command -v {tool})\"; \
             else report {tool} fail 'missing; install it (Debian: apt-get install {package})'; fi\n",
            package = match tool {
                "flock" => "util-linux",
                "systemctl" => "systemd",
                other => other,
            }
        ));
    }
    script.push_str(
        "if python3 -c 'import venv, ensurepip' 2>/dev/null; then report 'python3 venv' ok 'venv and ensurepip present'; \
         else report 'python3 venv' fail 'missing; install it (Debian: apt-get install python3-venv)'; fi\n",
    );
    script.push_str(&format!(
        "if [ \"$(id -u)\" = 0 ]; then report 'sudo rule' ok 'deploying as root'; \
         elif sudo -n -l systemctl restart -- {unit} >/dev/null 2>&1; then report 'sudo rule' ok 'systemctl restart allowed'; \
         else report 'sudo rule' fail \"missing; add with visudo -f /etc/sudoers.d/crucible: \"{sudoers}; fi\n"
    ));
    if config.unit_file.is_some() {
        script.push_str(&format!(
            "report unit ok 'installed from unit_file on push: {}'\n",
            config.unit
        ));
    } else {
        script.push_str(&format!(
            "state=$(systemctl show --property=LoadState --value -- {unit} 2>/dev/null); \
             if [ \"$state\" = loaded ]; then report unit ok loaded; \
             else report unit fail \"{plain} is $state; install it or set unit_file in hosts.toml\"; fi\n",
            plain = config.unit,
        ));
    }
    let needed_kb = (app_size_bytes(&config.source) / 1024) * 2 + 100 * 1024;
    script.push_str(&format!(
        "free=$(df -Pk -- {root} 2>/dev/null | awk 'NR==2 {{print $4}}'); \
         if [ -n \"$free\" ] && [ \"$free\" -ge {needed_kb} ]; then report 'free disk' ok \"${{free}} KiB free\"; \
         else report 'free disk' fail \"${{free:-unknown}} KiB free, need {needed_kb} KiB for one more release\"; fi\n"
    ));
    script
}

/// Returns the app directory's size in bytes, counting every file below it. The disk check uses
/// it as an estimate of one more release.
fn app_size_bytes(source: &Path) -> u64 {
    let mut total = 0;
    let mut pending = vec![source.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(metadata) = entry.metadata() else {
                continue;
            };
            if metadata.is_dir() && entry.file_name() != ".git" {
                pending.push(entry.path());
            } else if metadata.is_file() {
                total += metadata.len();
            }
        }
    }
    total
}
