//! crucible deploys a Python web app to systemd hosts over one SSH session.
//!
//! [`run`] is the whole program: plan from arguments and hosts.toml, execute, report, and return the
//! exit code. `main.rs` only calls it.

pub mod archive;
pub mod check;
pub mod cli;
pub mod config;
pub mod deploy;
pub mod error;
pub mod init;
pub mod inspect;
pub mod plan;
pub mod releases;
pub mod remote;
pub mod report;
pub mod ssh;

use std::path::Path;

use clap::CommandFactory;

use crate::cli::{Cli, Command};
use crate::config::Config;
use crate::deploy::{Context, DeployOptions, Interrupt};
use crate::error::{Error, Exit};
use crate::plan::{Environment, HostPlan};
use crate::report::Reporter;

/// Runs one crucible command and returns its exit code.
pub fn run(cli: Cli) -> Exit {
    init_tracing(cli.verbose);
    let environment = Environment::read();
    let mode = environment.output_mode(cli.json, cli.quiet);

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: failed to start the async runtime: {error}");
            return Exit::Failure;
        }
    };
    let result = runtime.block_on(execute(cli, &environment, Reporter::new(mode.clone())));
    match result {
        Ok(exit) => exit,
        Err(error) => {
            // Printed with --json too, because no JSON was written for these errors and stderr
            // keeps stdout parseable.
            eprintln!("error: {error}");
            if mode.is_github {
                eprintln!(
                    "::error title=crucible failed::{}",
                    report::escape_annotation(&error.to_string())
                );
            }
            error.exit()
        }
    }
}

async fn execute(
    cli: Cli,
    environment: &Environment,
    mut reporter: Reporter,
) -> Result<Exit, Error> {
    match cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "crucible",
                &mut std::io::stdout(),
            );
            Ok(Exit::Success)
        }
        Command::Init(args) => init::init(&cli.config, args.workflow).map(|()| Exit::Success),
        Command::Push(args) => {
            let plan = load_plan(&cli.config, &args.host.host, environment)?;
            let options = DeployOptions {
                dry_run: args.options.dry_run,
                lock_wait: args.options.lock_wait,
                no_rollback: args.no_rollback,
            };
            let interrupt = Interrupt::listen();
            let mut ctx = Context::new("push", &plan, &mut reporter, interrupt);
            let result = deploy::push::run(&mut ctx, &options).await;
            Ok(finish(ctx, result))
        }
        Command::Rollback(args) => {
            let plan = load_plan(&cli.config, &args.host.host, environment)?;
            let options = DeployOptions {
                dry_run: args.options.dry_run,
                lock_wait: args.options.lock_wait,
                no_rollback: false,
            };
            let interrupt = Interrupt::listen();
            let mut ctx = Context::new("rollback", &plan, &mut reporter, interrupt);
            let result = deploy::rollback::run(&mut ctx, &options, args.to.as_deref()).await;
            Ok(finish(ctx, result))
        }
        Command::Releases(args) => {
            let plan = load_plan(&cli.config, &args.host, environment)?;
            inspect::releases(&plan, cli.json)
                .await
                .map(|()| Exit::Success)
        }
        Command::Status(args) => {
            let plan = load_plan(&cli.config, &args.host, environment)?;
            inspect::status(&plan, cli.json)
                .await
                .map(|()| Exit::Success)
        }
        Command::Check(args) => {
            let plan = load_plan(&cli.config, &args.host, environment)?;
            check::check(&plan, &mut reporter)
                .await
                .map(|()| Exit::Success)
        }
        Command::Logs(args) => {
            let plan = load_plan(&cli.config, &args.host.host, environment)?;
            inspect::logs(&plan, args.lines, args.follow)
                .await
                .map(|()| Exit::Success)
        }
    }
}

/// Loads hosts.toml, validates every host in it, and plans the one named.
fn load_plan(config_path: &Path, host: &str, environment: &Environment) -> Result<HostPlan, Error> {
    let config = Config::load(config_path)?;
    config.validate_all()?;
    let host = config.host(host)?;
    Ok(HostPlan::new(host, environment))
}

/// Completes the summary, prints it, and turns the result into the exit code.
fn finish(ctx: Context<'_>, result: Result<(), Error>) -> Exit {
    let Context {
        reporter,
        mut summary,
        started,
        ..
    } = ctx;
    let exit = match &result {
        Ok(()) => Exit::Success,
        Err(error) => error.exit(),
    };
    if summary.outcome.is_empty() {
        summary.outcome = if result.is_ok() { "deployed" } else { "failed" }.to_string();
    }
    summary.exit_code = exit as u8;
    summary.duration_ms = started.elapsed().as_millis() as u64;
    summary.steps = reporter.steps.clone();
    if let Err(error) = &result {
        summary.error = Some(error.to_string());
    }
    reporter.finish(&summary);
    if let Err(error) = result
        && !reporter.mode().json
    {
        eprintln!("error: {error}");
    }
    exit
}

/// Diagnostics go to stderr through `tracing`: warnings by default, each remote command with -v,
/// remote output with -vv. `RUST_LOG` overrides the level.
fn init_tracing(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "warn,crucible=info",
        _ => "warn,crucible=trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .try_init();
}
