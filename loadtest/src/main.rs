//! `lockstep-load`: lockstep's own load generator.
//!
//! Subcommands (one module each):
//! - [`idle`]: open N joined-but-idle WebSocket sessions and measure the server's RSS per
//!   connection.
//! - [`locks`]: closed-loop `lock.acquire` + `lock.release` round trips, latency histograms
//!   and throughput, with or without contention.
//! - [`crossnode`]: two gateway nodes on one Redis: cursor and presence latency from a
//!   client on one node to a client on the other, lock latency with clients on both nodes, and
//!   a bare `SET NX` to the same Redis as the floor.
//! - [`fanout`]: rooms × members, every member sending cursors at a rate, every receiver
//!   timing them end to end; speaks lockstep, Socket.IO 4 and the bare relay's protocol, so
//!   `side-by-side.sh` compares the three with one driver.
//! - [`scale`]: the studio workload (cursors, focus changes, lock cycles) on two nodes, one
//!   driver process's share; `scale-merge` adds up several (`scale.sh` runs it all).
//! - [`ping`]: the same harness with bare `ping` → `pong`, the baseline a lock round trip is
//!   compared with.
//!
//! Every result is one JSON object on stdout; progress goes to stderr. Network failures never
//! abort a run: they are counted per kind and reported in the result's `errors` object.

mod bench;
mod client;
mod crossnode;
mod fanout;
mod idle;
mod locks;
mod ping;
mod procfs;
mod scale;
mod stats;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "lockstep-load",
    version,
    about = "Load generator for the lockstep gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Hold N joined, idle connections and report the server's memory per connection.
    Idle(idle::Args),
    /// Lock acquire/release round-trip latency and throughput.
    Locks(locks::Args),
    /// ping → pong round-trip latency: the baseline for `locks`.
    Ping(ping::Args),
    /// Two nodes sharing one Redis: cross-node cursor/presence latency, lock latency with
    /// clients on both nodes, and a bare Redis SET NX round trip for comparison.
    Crossnode(crossnode::Args),
    /// Room fan-out: cursors at a rate from every member of rooms × members, end-to-end
    /// latency, deliveries per server CPU-second (lockstep, Socket.IO or the bare relay).
    Fanout(fanout::Args),
    /// The studio workload on two nodes: one driver process's share (see `loadtest/scale.sh`).
    Scale(scale::Args),
    /// Adds up the `--out` files of several `scale` driver processes.
    ScaleMerge(scale::MergeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The error chain on one line; no backtrace noise for an expected failure such as
            // an unreachable server.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let limit = procfs::raise_fd_limit();
    match limit {
        Ok(n) => eprintln!("open-files limit: {n}"),
        Err(e) => eprintln!("warning: could not raise the open-files limit: {e}"),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let output = runtime.block_on(async {
        match cli.command {
            Command::Idle(args) => idle::run(args).await,
            Command::Locks(args) => locks::run(args).await,
            Command::Ping(args) => ping::run(args).await,
            Command::Crossnode(args) => crossnode::run(args).await,
            Command::Fanout(args) => fanout::run(args).await,
            Command::Scale(args) => scale::run(args).await,
            Command::ScaleMerge(args) => scale::merge(args),
        }
    })?;
    println!("{}", serde_json::to_string_pretty(&output)?);
    Ok(())
}
