use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = crucible::cli::Cli::parse();
    crucible::run(cli).into()
}
