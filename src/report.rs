//! The step report, crucible's product output: a line per finished step in a terminal or a log,
//! newline-delimited JSON with `--json`, and groups, annotations and a job summary in GitHub Actions.
//!
//! Text and GitHub workflow commands both go to stderr, so a log shows them in the order they
//! were written. Stdout carries only the JSON events. The runner reads workflow commands from
//! both streams.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

/// The report's output settings, decided once in the planning stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputMode {
    pub json: bool,
    pub quiet: bool,
    /// stderr is a terminal: draw spinners and the upload bar.
    pub is_terminal: bool,
    pub color: bool,
    /// `GITHUB_STEP_SUMMARY` when running in GitHub Actions.
    pub github_summary: Option<PathBuf>,
    pub is_github: bool,
}

/// One finished step.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct StepRecord {
    pub name: String,
    /// The remote command's exit status; `None` for a step that ran no remote command.
    pub exit_code: Option<u32>,
    pub duration_ms: u64,
    pub ok: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub stderr_tail: String,
}

/// The end state of a push or rollback, printed last.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub command: String,
    pub host: String,
    pub release: Option<String>,
    pub previous_release: Option<String>,
    pub artifact_sha256: Option<String>,
    pub venv_key: Option<String>,
    pub venv_reused: Option<bool>,
    pub files_sent: Option<usize>,
    pub bytes_sent: Option<u64>,
    pub files_reused: Option<usize>,
    /// `deployed`, `unchanged`, `dry_run`, `rolled_back`, `failed_before_switch`,
    /// `housekeeping_failed`, `rollback_failed`, `interrupted` or `failed`; the README's `--json`
    /// section describes each.
    pub outcome: String,
    pub exit_code: u8,
    pub duration_ms: u64,
    pub steps: Vec<StepRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Event<'a> {
    StepStarted { step: &'a str },
    StepFinished(&'a StepRecord),
    Note { message: &'a str },
    Summary(&'a Summary),
}

pub struct Reporter {
    mode: OutputMode,
    spinner: Option<ProgressBar>,
    pub steps: Vec<StepRecord>,
}

impl Reporter {
    pub fn new(mode: OutputMode) -> Reporter {
        Reporter {
            mode,
            spinner: None,
            steps: Vec::new(),
        }
    }

    pub fn mode(&self) -> &OutputMode {
        &self.mode
    }

    fn emit(&self, event: &Event<'_>) {
        let line = serde_json::to_string(event).expect("report events always serialize");
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{line}");
        let _ = stdout.flush();
    }

    fn is_live(&self) -> bool {
        self.mode.is_terminal && !self.mode.json && !self.mode.quiet
    }

    /// Announces a step; in a terminal this shows a spinner with the elapsed time.
    pub fn start_step(&mut self, name: &str) {
        if self.mode.json {
            self.emit(&Event::StepStarted { step: name });
            return;
        }
        if self.mode.is_github {
            eprintln!("::group::{name}");
        }
        if self.is_live() {
            let spinner = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            spinner.set_style(
                ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                    .expect("valid spinner template"),
            );
            spinner.set_message(name.to_string());
            spinner.enable_steady_tick(Duration::from_millis(120));
            self.spinner = Some(spinner);
        }
    }

    /// Turns the running step's spinner into a byte counter for the upload, in a terminal only.
    /// Two bars drawn to stderr at once would overwrite each other's lines.
    pub fn upload_bar(&self) -> Option<ProgressBar> {
        let bar = self.spinner.clone()?;
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} upload {bytes} sent ({bytes_per_sec}) {elapsed}",
            )
            .expect("valid upload template"),
        );
        Some(bar)
    }

    pub fn finish_step(&mut self, record: StepRecord) {
        if let Some(spinner) = self.spinner.take() {
            spinner.finish_and_clear();
        }
        if self.mode.json {
            self.emit(&Event::StepFinished(&record));
        } else if !self.mode.quiet || !record.ok {
            eprintln!("{}", self.format_step(&record));
            if !record.ok && !record.stderr_tail.is_empty() {
                for line in record.stderr_tail.lines() {
                    eprintln!("    | {line}");
                }
            }
        }
        if self.mode.is_github {
            if !record.ok {
                let message = if record.stderr_tail.is_empty() {
                    &record.detail
                } else {
                    &record.stderr_tail
                };
                eprintln!(
                    "::error title={}::{}",
                    escape_property(&format!("crucible step {} failed", record.name)),
                    escape_annotation(message)
                );
            }
            if !self.mode.json {
                eprintln!("::endgroup::");
            }
        }
        self.steps.push(record);
    }

    fn format_step(&self, record: &StepRecord) -> String {
        let mark = match (record.ok, self.mode.color) {
            (true, true) => "\x1b[32m✓\x1b[0m",
            (false, true) => "\x1b[31m✗\x1b[0m",
            (true, false) => "ok",
            (false, false) => "FAILED",
        };
        let code = record
            .exit_code
            .map_or("-".to_string(), |code| code.to_string());
        let seconds = record.duration_ms as f64 / 1000.0;
        let detail = if record.detail.is_empty() {
            String::new()
        } else {
            format!("  {}", record.detail)
        };
        format!(
            "{mark} {:<10} exit {code:<3} {seconds:>6.2}s{detail}",
            record.name
        )
    }

    /// Prints a remark that belongs to no step, such as a warning from the host.
    pub fn note(&mut self, message: &str) {
        if self.mode.json {
            self.emit(&Event::Note { message });
        } else if !self.mode.quiet {
            if let Some(spinner) = &self.spinner {
                spinner.suspend(|| eprintln!("  {message}"));
            } else {
                eprintln!("  {message}");
            }
        }
        if self.mode.is_github && message.starts_with("warning") {
            eprintln!("::warning::{}", escape_annotation(message));
        }
    }

    /// Prints the closing line (or JSON summary) and writes the GitHub job summary.
    pub fn finish(&mut self, summary: &Summary) {
        if let Some(spinner) = self.spinner.take() {
            spinner.finish_and_clear();
        }
        if self.mode.json {
            self.emit(&Event::Summary(summary));
        } else {
            let seconds = summary.duration_ms as f64 / 1000.0;
            let release = summary.release.as_deref().unwrap_or("-");
            let line = match summary.outcome.as_str() {
                "deployed" => format!(
                    "{} {release} is live on {} ({seconds:.2}s)",
                    summary.command, summary.host
                ),
                "dry_run" => format!(
                    "dry run of {} on {}: nothing changed ({seconds:.2}s)",
                    summary.command, summary.host
                ),
                "unchanged" => format!(
                    "{release} is already live on {}; nothing to do ({seconds:.2}s)",
                    summary.host
                ),
                "rolled_back" => format!(
                    "{release} failed on {}; {} is live again ({seconds:.2}s)",
                    summary.host,
                    summary
                        .previous_release
                        .as_deref()
                        .unwrap_or("the previous release")
                ),
                "failed_before_switch" => format!(
                    "{} on {} failed before the switch; nothing changed ({seconds:.2}s)",
                    summary.command, summary.host
                ),
                "housekeeping_failed" => format!(
                    "{release} is live on {}, but housekeeping failed ({seconds:.2}s)",
                    summary.host
                ),
                "rollback_failed" => format!(
                    "{release} failed on {} and no healthy release is live; act now ({seconds:.2}s)",
                    summary.host
                ),
                "interrupted" => format!(
                    "{} on {} interrupted before the switch; nothing changed ({seconds:.2}s)",
                    summary.command, summary.host
                ),
                outcome => format!(
                    "{} on {} ended: {} ({seconds:.2}s)",
                    summary.command,
                    summary.host,
                    outcome.replace('_', " ")
                ),
            };
            // Quiet mode keeps the final line, as --help documents.
            eprintln!("{line}");
        }
        if self.mode.is_github
            && let Some(error) = &summary.error
        {
            let title = format!(
                "crucible {} {}: {}",
                summary.command, summary.host, summary.outcome
            );
            eprintln!(
                "::error title={}::{}",
                escape_property(&title),
                escape_annotation(error)
            );
        }
        if let Some(path) = &self.mode.github_summary
            && let Err(error) = append_github_summary(path, summary)
        {
            tracing::warn!(
                "failed to append the job summary to {} (GITHUB_STEP_SUMMARY): {error}",
                path.display()
            );
        }
    }
}

/// Formats a count with its noun, as in "1 file" or "3 files".
pub fn count(number: usize, noun: &str) -> String {
    if number == 1 {
        format!("1 {noun}")
    } else {
        format!("{number} {noun}s")
    }
}

/// GitHub workflow commands end at a newline; `%0A` keeps multi-line messages in one annotation.
pub fn escape_annotation(text: &str) -> String {
    text.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

/// Escapes a workflow command property such as `title=`, where `:` and `,` end the value.
fn escape_property(text: &str) -> String {
    escape_annotation(text)
        .replace(':', "%3A")
        .replace(',', "%2C")
}

fn append_github_summary(path: &PathBuf, summary: &Summary) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(file, "### crucible {} {}", summary.command, summary.host)?;
    writeln!(file)?;
    writeln!(
        file,
        "Outcome: **{}** · release `{}` · previous `{}` · {:.1}s",
        summary.outcome,
        summary.release.as_deref().unwrap_or("-"),
        summary.previous_release.as_deref().unwrap_or("-"),
        summary.duration_ms as f64 / 1000.0
    )?;
    writeln!(file)?;
    writeln!(file, "| step | exit | seconds | detail |")?;
    writeln!(file, "|---|---|---|---|")?;
    for step in &summary.steps {
        writeln!(
            file,
            "| {}{} | {} | {:.2} | {} |",
            if step.ok { "" } else { "❌ " },
            step.name,
            step.exit_code
                .map_or("-".to_string(), |code| code.to_string()),
            step.duration_ms as f64 / 1000.0,
            step.detail.replace('|', "\\|")
        )?;
    }
    if let Some(error) = &summary.error {
        writeln!(file)?;
        writeln!(file, "Error: {}", error.replace('\n', " "))?;
    }
    writeln!(file)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotation_property_escapes_separators() {
        assert_eq!(escape_property("push: a, b"), "push%3A a%2C b");
    }

    #[test]
    fn annotation_escapes_newlines() {
        assert_eq!(escape_annotation("a\nb%"), "a%0Ab%25");
    }

    #[test]
    fn step_line_shows_exit_code_and_detail() {
        let reporter = Reporter::new(OutputMode {
            json: false,
            quiet: false,
            is_terminal: false,
            color: false,
            github_summary: None,
            is_github: false,
        });
        let line = reporter.format_step(&StepRecord {
            name: "venv".into(),
            exit_code: Some(0),
            duration_ms: 1500,
            ok: true,
            detail: "reused".into(),
            stderr_tail: String::new(),
        });
        assert_eq!(line, "ok venv       exit 0     1.50s  reused");
    }
}
