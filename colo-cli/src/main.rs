//! The `colo` command: runs COLO nodes and the demo, and inspects streams.

use anyhow::Result;
use clap::{Parser, Subcommand};

/// COLO virtual-machine replication.
#[derive(Debug, Parser)]
#[command(name = "colo", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a replicated pair on the mock backend, on loopback.
    Demo,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("colo: {e:#}");
        std::process::exit(2);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Demo => anyhow::bail!("the checkpoint engine is not built yet; `colo demo` will run a replicated pair once it is"),
    }
}
