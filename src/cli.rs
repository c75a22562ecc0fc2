//! Command-line arguments and their help text.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Deploy a Python web app to systemd hosts over one SSH session.
#[derive(Debug, Parser)]
#[command(name = "crucible", version, about, long_about = None)]
pub struct Cli {
    /// Path of hosts.toml, relative to the working directory; `init` writes its starter file there.
    /// Example: -c deploy/hosts.toml
    #[arg(
        short,
        long,
        global = true,
        env = "CRUCIBLE_CONFIG",
        default_value = "hosts.toml"
    )]
    pub config: PathBuf,

    /// Print each remote command before it runs (-v), and also stream remote output (-vv).
    /// Example: crucible push prod -vv
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Print only failed steps and the final line. Example: crucible push prod -q
    #[arg(short, long, global = true)]
    pub quiet: bool,

    /// Print JSON on stdout instead of text. Push and rollback print newline-delimited events and a
    /// summary, whose schema the README's `--json` section describes. Releases and status print
    /// one JSON document, and check, logs and init print text. Example: crucible push prod --json
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Package the app, upload it, switch `current` to it and restart the unit.
    ///
    /// Example: crucible push prod
    Push(PushArgs),

    /// Switch back to an earlier release and restart the unit.
    ///
    /// Without --to, goes to the release deployed before the live one. Each further rollback goes
    /// one release further back. Example: crucible rollback prod --to 20261204T150102Z-3f9a1c2e
    Rollback(RollbackArgs),

    /// List the releases kept on a host, newest first.
    ///
    /// Example: crucible releases prod --json
    Releases(HostArgs),

    /// Show the live release, the unit's state and any deploy in progress.
    ///
    /// Example: crucible status prod
    Status(HostArgs),

    /// Verify every prerequisite on a host and print the fix for each one missing.
    ///
    /// Example: crucible check prod
    Check(HostArgs),

    /// Show the unit's journal.
    ///
    /// Example: crucible logs prod -n 100 -f
    Logs(LogsArgs),

    /// Write a commented starter hosts.toml; never overwrites.
    ///
    /// Example: crucible init --workflow
    Init(InitArgs),

    /// Print a shell completion script.
    ///
    /// Example: crucible completions bash > /etc/bash_completion.d/crucible
    Completions {
        /// The shell to print the script for: bash, zsh, fish, elvish or powershell.
        /// Example: crucible completions zsh > ~/.zfunc/_crucible
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
pub struct HostArgs {
    /// A host name from hosts.toml, the NAME of a [hosts.NAME] table. Example: prod
    pub host: String,
}

#[derive(Debug, Args)]
pub struct DeployOptions {
    /// Print the plan and change nothing on the host. A push lists files, size, release id and
    /// remote steps without connecting. A rollback connects and names the release it would switch
    /// to. Example: crucible push prod --dry-run
    #[arg(long)]
    pub dry_run: bool,

    /// How long to wait for another deploy's lock before failing, as a duration with a unit
    /// (s, m, h). Without it a held lock fails at once. Example: --lock-wait 5m
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub lock_wait: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct PushArgs {
    #[command(flatten)]
    pub host: HostArgs,

    #[command(flatten)]
    pub options: DeployOptions,

    /// Leave a release that fails its health check live instead of rolling back, for debugging.
    /// Example: crucible push staging --no-rollback
    #[arg(long)]
    pub no_rollback: bool,
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    #[command(flatten)]
    pub host: HostArgs,

    #[command(flatten)]
    pub options: DeployOptions,

    /// The release id to go back to, as `crucible releases` lists it.
    /// Example: --to 20261204T150102Z-3f9a1c2e
    #[arg(long, value_name = "RELEASE")]
    pub to: Option<String>,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    #[command(flatten)]
    pub host: HostArgs,

    /// Keep printing new lines as they arrive, until Ctrl-C. Example: crucible logs prod -f
    #[arg(short, long)]
    pub follow: bool,

    /// How many of the latest journal lines to print (a count of lines). Example: -n 200
    #[arg(short = 'n', long, default_value_t = 50)]
    pub lines: u32,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Also write .github/workflows/deploy.yml beside hosts.toml: a GitHub Actions workflow
    /// that runs `crucible push prod` on every push to main. Example: crucible init --workflow
    #[arg(long)]
    pub workflow: bool,
}
