//! The `ringtrain` binary: parses flags, installs logging, runs a rank or a local cluster.

use std::ffi::OsString;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Parser;
use ringtrain::cli::{Cli, Command, LaunchArgs, TrainArgs};
use ringtrain::hosts::Hosts;
use ringtrain::launch;
use ringtrain::train::{self, Summary, TrainError};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let result = match cli.command {
        None => run_rank(&cli.train),
        Some(Command::Train(args)) => run_rank(&args),
        Some(Command::Launch(args)) => run_launch(&args),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            let code = match (
                e.downcast_ref::<TrainError>(),
                e.downcast_ref::<LaunchFailed>(),
            ) {
                (Some(t), _) => t.exit_code(),
                (_, Some(l)) => l.0,
                _ => 2,
            };
            ExitCode::from(code.clamp(1, 255) as u8)
        }
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
}

fn run_rank(args: &TrainArgs) -> anyhow::Result<u8> {
    let Some(hosts) = &args.hosts else {
        bail!(
            "--hosts FILE is required (one HOST:PORT per line); to try ringtrain on one \
               machine run `ringtrain launch --np 4`"
        );
    };
    let Some(rank) = args.rank else {
        bail!(
            "--rank N is required: this process's line in {} (0 is the first)",
            hosts.display()
        );
    };
    let cfg = args.opts.to_config().map_err(anyhow::Error::msg)?;
    let span = tracing::info_span!("rank", rank);
    let _guard = span.enter();
    let trained = train::run_from_hosts(&cfg, hosts, rank)?;
    report(&trained.summary);
    Ok(0)
}

fn report(s: &Summary) {
    println!("rank {} finished: param_digest {}", s.rank, s.param_digest);
    if s.rank != 0 {
        return;
    }
    println!(
        "summary: {} ranks, {} steps of {} samples per rank, test accuracy {:.2}%, final loss {:.4}",
        s.world_size,
        s.steps,
        s.batch_size,
        100.0 * s.test_accuracy,
        s.final_loss
    );
    println!(
        "summary: {:.0} samples/s, all-reduce p50 {:.3} ms p99 {:.3} ms ({:.0}% of the loop), \
         {:.0} bytes sent per step per rank",
        s.samples_per_sec,
        s.allreduce_ms_p50,
        s.allreduce_ms_p99,
        100.0 * s.comm_fraction,
        s.bytes_sent_per_step
    );
}

fn run_launch(args: &LaunchArgs) -> anyhow::Result<u8> {
    if args.np == 0 {
        bail!("--np must be at least 1");
    }
    args.opts.to_config().map_err(anyhow::Error::msg)?;
    let addrs = launch::free_local_addrs(args.np).context("cannot pick local ports")?;
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let hosts_path = dir.path().join("hosts.txt");
    std::fs::write(&hosts_path, Hosts::from_addrs(addrs).to_file_text())
        .with_context(|| format!("cannot write {}", hosts_path.display()))?;
    let program = std::env::current_exe().context("cannot find the ringtrain executable")?;
    let args_for = |rank: usize| {
        let mut opts = args.opts.clone();
        if rank != 0 {
            // The chief's summary is the cluster's; the others would only overwrite it.
            opts.metrics_out = None;
        }
        let mut a: Vec<OsString> = vec!["train".into(), "--hosts".into()];
        a.push(hosts_path.clone().into_os_string());
        a.extend(["--rank".into(), rank.to_string().into()]);
        a.extend(opts.to_args());
        a
    };
    tracing::info!(np = args.np, hosts = %hosts_path.display(), "launching");
    let report = launch::run_ranks(&program, args.np, &args_for, &[])?;
    if report.success() {
        return Ok(0);
    }
    let code = report.exit_code();
    bail!(LaunchFailed(code, report.first_failed));
}

#[derive(Debug)]
struct LaunchFailed(i32, Option<usize>);

impl std::fmt::Display for LaunchFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.1 {
            Some(rank) => write!(
                f,
                "rank {rank} failed first (exit code {}); stopped the others",
                self.0
            ),
            None => write!(f, "the launch failed (exit code {})", self.0),
        }
    }
}

impl std::error::Error for LaunchFailed {}
