//! `ferryfs`: clap dispatch only; each subcommand lives in `cmd/`.

use clap::{Parser, Subcommand};

use ferryfs::cmd;

#[derive(Parser)]
#[command(
    name = "ferryfs",
    version,
    about = "A journaled, replicating FUSE filesystem",
    long_about = "ferryfs mounts a FUSE filesystem over a backing directory and records every change in a \
crc-checked, memory-mapped write-ahead journal before it answers. See `ferryfs <command> --help`, \
README.md and docs/ (FORMAT.md, OPERATIONS.md, PERFORMANCE.md)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Mount(cmd::mount::MountArgs),
    Replay(cmd::replay::ReplayArgs),
    Inspect(cmd::inspect::InspectArgs),
    Target(cmd::target::TargetArgs),
    Bunker(cmd::bunker::BunkerArgs),
    Failover(cmd::failover::FailoverArgs),
    Catchup(cmd::catchup::CatchupArgs),
    Failback(cmd::failback::FailbackArgs),
    Demo(cmd::demo::DemoArgs),
    Status(cmd::status::StatusArgs),
}

fn main() {
    ferryfs::os::restore_sigpipe();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRYFS_LOG").unwrap_or_else(|_| "warn,fuser=error".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Mount(a) => cmd::mount::run(a),
        Command::Replay(a) => cmd::replay::run(a),
        Command::Inspect(a) => cmd::inspect::run(a),
        Command::Target(a) => cmd::target::run(a),
        Command::Bunker(a) => cmd::bunker::run(a),
        Command::Failover(a) => cmd::failover::run(a),
        Command::Catchup(a) => cmd::catchup::run(a),
        Command::Failback(a) => cmd::failback::run(a),
        Command::Demo(a) => cmd::demo::run(a),
        Command::Status(a) => cmd::status::run(a),
    };
    if let Err(e) = result {
        eprintln!("ferryfs: error: {e:#}");
        std::process::exit(1);
    }
}
