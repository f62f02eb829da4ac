//! The `ringtrain` binary: parses flags, installs logging, runs a rank or a local cluster.

use std::ffi::OsString;
use std::process::ExitCode;

use anyhow::{Context, bail};
use ringtrain::auth::Credential;
use ringtrain::cli::{Cli, Command, KeygenArgs, LaunchArgs, LaunchMode, TrainArgs};
use ringtrain::cluster::{ClusterSpec, Job};
use ringtrain::config::{self, ParseError, Parsed};
use ringtrain::hosts::Hosts;
use ringtrain::launch;
use ringtrain::launchenv::{self, RankRequest, RankSource};
use ringtrain::progress::{LogFormat, LogWriter, ProgressMode};
use ringtrain::ps::PsError;
use ringtrain::train::{self, Summary, TrainError};

/// mimalloc, with transparent huge pages off for the process (its `no_thp` feature), keeps
/// the all-reduce's frame-sized buffers (256 KiB each) in its heaps. With glibc's malloc a
/// profile of `bench allreduce --np 2 --sizes 16M` spent about 6% of the CPU faulting,
/// zeroing and unmapping pages; mimalloc with huge pages spent over 20% zeroing 2 MiB
/// pages, and without them under 1%. Measured in the README's "What mattered" table.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let parsed = match config::parse(std::env::args_os()) {
        Ok(parsed) => parsed,
        Err(ParseError::Clap(e)) => e.exit(),
        Err(ParseError::Config(e)) => {
            eprintln!("error: {:#}", anyhow::Error::from(e));
            return ExitCode::from(2);
        }
    };
    if print_config_asked(&parsed.cli) {
        print!("{}", parsed.effective_toml());
        return ExitCode::SUCCESS;
    }
    let (quiet, format) = output_flags(&parsed.cli);
    init_logging(quiet, format);
    let note = config_note(&parsed);
    let cli = parsed.cli;
    let result = match cli.command {
        None => run_rank(&cli.train, note.as_deref()),
        Some(Command::Train(args)) => run_rank(&args, note.as_deref()),
        Some(Command::Launch(args)) => {
            note.iter().for_each(|n| tracing::info!("{n}"));
            run_launch(&args)
        }
        Some(Command::Bench(args)) => ringtrain::bench::run(&args)
            .map(|()| 0)
            .map_err(anyhow::Error::from),
        Some(Command::Keygen(args)) => run_keygen(&args),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            let ps_code = e.downcast_ref::<PsError>().map(PsError::exit_code);
            let code = match (
                e.downcast_ref::<TrainError>(),
                e.downcast_ref::<LaunchFailed>(),
            ) {
                (Some(t), _) => t.exit_code(),
                (_, Some(l)) => l.0,
                _ => ps_code.unwrap_or(2),
            };
            ExitCode::from(code.clamp(1, 255) as u8)
        }
    }
}

fn print_config_asked(cli: &Cli) -> bool {
    match &cli.command {
        None => cli.train.config.print_config,
        Some(Command::Train(t)) => t.config.print_config,
        Some(Command::Launch(l)) => l.config.print_config,
        _ => false,
    }
}

/// `--quiet` and `--log-format` of the command, when it has them.
fn output_flags(cli: &Cli) -> (bool, LogFormat) {
    let opts = match &cli.command {
        None => &cli.train.opts,
        Some(Command::Train(t)) => &t.opts,
        Some(Command::Launch(l)) => &l.opts,
        _ => return (false, LogFormat::Text),
    };
    (opts.quiet, opts.log_format)
}

/// Logs to stderr through [`LogWriter`] (which keeps a progress bar intact). `--quiet`
/// shows errors only, whatever `RUST_LOG` says; otherwise `RUST_LOG` decides (default
/// `info`).
fn init_logging(quiet: bool, format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = if quiet {
        EnvFilter::new("error")
    } else {
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(LogWriter);
    match format {
        LogFormat::Text => builder.with_ansi(stderr_is_terminal()).init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_thread_names(true)
            .init(),
    }
}

fn stderr_is_terminal() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr())
}

/// Which configuration file was read and which of its keys took effect, for the log.
fn config_note(parsed: &Parsed) -> Option<String> {
    let file = parsed.file.as_ref()?;
    let keys: Vec<&str> = parsed.from_file.iter().map(String::as_str).collect();
    let mut note = format!("read {}: {}", file.display(), keys.join(", "));
    if !parsed.ignored.is_empty() {
        note += &format!(" (unused here: {})", parsed.ignored.join(", "));
    }
    Some(note)
}

/// The rank from `--rank`, `--rank-from-hostname` or the launcher's environment, checked
/// against the hosts file (see [`launchenv`]).
fn resolve_rank(args: &TrainArgs, hosts: &std::path::Path) -> anyhow::Result<(usize, String)> {
    let listed = Hosts::load(hosts).map_err(cluster_file_hint)?.world_size();
    let env = launchenv::process_env();
    let request = match (args.rank, args.rank_from_hostname) {
        (Some(r), _) => RankRequest::Flag(r),
        (None, true) => RankRequest::Hostname,
        (None, false) => RankRequest::FromEnv,
    };
    let host = match request {
        RankRequest::Hostname => launchenv::system_hostname(&env),
        _ => None,
    };
    let resolved = launchenv::resolve(request, &env, host.as_deref(), hosts, listed)?;
    let checked = match (&resolved.source, resolved.env) {
        (RankSource::Launcher(_), _) | (_, None) => String::new(),
        (_, Some(e)) => format!(", agreeing with {}", e.vars.rank),
    };
    let how = format!(
        "rank {} of {listed} from {}{checked}",
        resolved.rank, resolved.source
    );
    Ok((resolved.rank, how))
}

fn run_rank(args: &TrainArgs, config_note: Option<&str>) -> anyhow::Result<u8> {
    if args.job.is_some() || args.task.is_some() {
        return run_task(args);
    }
    let Some(hosts) = &args.hosts else {
        bail!(
            "--hosts FILE is required (one HOST:PORT per line); to try ringtrain on one \
               machine run `ringtrain launch --np 4`"
        );
    };
    let mut cfg = args.opts.to_config().map_err(anyhow::Error::msg)?;
    let (rank, how) = resolve_rank(args, hosts)?;
    let span = tracing::info_span!("rank", rank);
    let _guard = span.enter();
    config_note.iter().for_each(|n| tracing::info!("{n}"));
    tracing::info!("{how}");
    if stderr_is_terminal() && !args.opts.quiet && args.opts.log_format == LogFormat::Text {
        cfg.progress = ProgressMode::Bar;
    }
    let trained = train::run_from_hosts(&cfg, hosts, rank)?;
    report(&trained.summary, args.opts.log_format);
    Ok(0)
}

fn report(s: &Summary, format: LogFormat) {
    if format == LogFormat::Json {
        // Machines get every rank's whole summary, one JSON object per line.
        let json = serde_json::to_string(s).expect("the summary always serializes");
        println!("{json}");
        return;
    }
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
    match args.mode {
        LaunchMode::Ring if args.ps.is_some() => bail!("--ps applies only to --mode ps"),
        LaunchMode::Ring => {}
        LaunchMode::Ps => return launch_ps(args),
        LaunchMode::InGraph => return launch_in_graph(args),
    }
    args.opts.to_config().map_err(anyhow::Error::msg)?;
    let addrs = launch::free_local_addrs(args.np).context("cannot pick local ports")?;
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let hosts_path = dir.path().join("hosts.txt");
    std::fs::write(&hosts_path, Hosts::from_addrs(addrs).to_file_text())
        .with_context(|| format!("cannot write {}", hosts_path.display()))?;
    // A fresh cluster key per run, so that even a local cluster admits only its own ranks.
    let mut shared = args.opts.clone();
    if shared.key.is_none() && !shared.insecure {
        let key = dir.path().join("cluster.key");
        Credential::generate()?.write_new(&key)?;
        shared.key = Some(key);
    }
    let program = std::env::current_exe().context("cannot find the ringtrain executable")?;
    let args_for = |rank: usize| {
        let mut opts = shared.clone();
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
    // The children get their rank from --rank; an outer launcher's variables (when this
    // runs inside srun or mpirun) must not contradict it.
    let env = launchenv::cleared_vars();
    let report = launch::run_ranks(&program, args.np, &args_for, &env)?;
    if let Some(path) = &args.opts.timeline {
        merge_timelines(path, args.np);
    }
    if report.success() {
        return Ok(0);
    }
    let code = report.exit_code();
    bail!(LaunchFailed(code, report.first_failed));
}

/// Joins the ranks' timelines into `path`; a failure only costs the merged file.
fn merge_timelines(path: &std::path::Path, np: usize) {
    let parts: Vec<_> = (0..np)
        .map(|r| ringtrain::timeline::rank_path(path, r))
        .filter(|p| p.exists())
        .collect();
    if parts.is_empty() {
        tracing::warn!(path = %path.display(), "no rank wrote a timeline");
        return;
    }
    match ringtrain::timeline::merge(&parts, path) {
        Ok(events) => {
            tracing::info!(path = %path.display(), ranks = parts.len(), events, "timeline merged")
        }
        Err(e) => tracing::warn!("{e}; the per-rank files are still there"),
    }
}

/// A hosts-file error, with a hint when the file is a cluster file of parameter-server mode.
fn cluster_file_hint(e: ringtrain::hosts::HostsError) -> anyhow::Error {
    use ringtrain::hosts::HostsError;
    match &e {
        HostsError::Malformed { text, .. } if ringtrain::cluster::names_a_job(text) => {
            anyhow::Error::new(e).context(
                "this is a cluster file of parameter-server mode; pass --job ps|worker \
                 --task N instead of a rank",
            )
        }
        _ => e.into(),
    }
}

/// One task of a parameter-server cluster: `--hosts CLUSTER --job ps|worker --task N`.
fn run_task(args: &TrainArgs) -> anyhow::Result<u8> {
    let Some(job) = args.job else {
        bail!("--task needs --job ps or --job worker (parameter-server mode)");
    };
    let Some(file) = &args.hosts else {
        bail!(
            "--hosts FILE is required with --job: the cluster file, one `JOB HOST:PORT` per line"
        );
    };
    let Some(task) = args.task else {
        bail!(
            "--task N is required with --job: this task's index among the {job} lines of {} \
             (0 is the first)",
            file.display()
        );
    };
    let cfg = args.opts.to_config().map_err(anyhow::Error::msg)?;
    let cluster = ClusterSpec::load(file).map_err(PsError::from)?;
    let opts = args.opts.ps_options();
    match job {
        Job::Ps => {
            let r = ringtrain::ps::run_ps_task(&cfg, &opts, &cluster, task)?;
            let names = r.tensors.join(", ");
            let (j, updates, len) = (r.task.index, r.updates, r.shard_len);
            println!("ps task {j} finished: {updates} updates of {len} parameters ({names})");
        }
        Job::Worker => {
            let trained = ringtrain::ps::run_worker(&cfg, &opts, &cluster, task)?;
            report_ps(&trained.summary, args.opts.log_format);
        }
    }
    Ok(0)
}

fn report_ps(s: &Summary, format: LogFormat) {
    if format == LogFormat::Json {
        return report(s, format);
    }
    println!(
        "worker {} finished: param_digest {}",
        s.rank, s.param_digest
    );
    if s.rank != 0 {
        return;
    }
    let (ps, sync) = (s.ps_tasks.unwrap_or(0), s.ps_sync.as_deref().unwrap_or("?"));
    println!(
        "summary: {} workers, {ps} ps tasks ({sync}), {} steps of {} samples per worker, test \
         accuracy {:.2}%, final loss {:.4}",
        s.world_size,
        s.steps,
        s.batch_size,
        100.0 * s.test_accuracy,
        s.final_loss
    );
    let stale = match (s.staleness_p50, s.staleness_p99, s.staleness_max) {
        (Some(a), Some(b), Some(c)) => format!(", staleness p50 {a} p99 {b} max {c}"),
        _ => String::new(),
    };
    println!(
        "summary: {:.0} samples/s, push+pull p50 {:.3} ms p99 {:.3} ms ({:.0}% of the loop), \
         {:.0} bytes sent and {:.0} received per step per worker{stale}",
        s.samples_per_sec,
        s.allreduce_ms_p50,
        s.allreduce_ms_p99,
        100.0 * s.comm_fraction,
        s.bytes_sent_per_step,
        s.bytes_received_per_step.unwrap_or(0.0),
    );
}

/// `launch --mode ps --ps K --np N`: N worker processes, then K ps processes.
fn launch_ps(args: &LaunchArgs) -> anyhow::Result<u8> {
    let ps = args.ps.unwrap_or(1);
    if ps == 0 {
        bail!("--ps must be at least 1");
    }
    let cfg = args.opts.to_config().map_err(anyhow::Error::msg)?;
    // Refused here once rather than by every task after it started.
    ringtrain::ingraph::reject_ring_only(&cfg, "ps")?;
    let np = args.np + ps;
    let addrs = launch::free_local_addrs(np).context("cannot pick local ports")?;
    let cluster = ClusterSpec::from_addrs(addrs[args.np..].to_vec(), addrs[..args.np].to_vec());
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let file = dir.path().join("cluster.txt");
    std::fs::write(&file, cluster.to_file_text())
        .with_context(|| format!("cannot write {}", file.display()))?;
    let mut shared = args.opts.clone();
    if shared.key.is_none() && !shared.insecure {
        let key = dir.path().join("cluster.key");
        Credential::generate()?.write_new(&key)?;
        shared.key = Some(key);
    }
    let program = std::env::current_exe().context("cannot find the ringtrain executable")?;
    let args_for = |i: usize| {
        let (job, task) = if i < args.np {
            ("worker", i)
        } else {
            ("ps", i - args.np)
        };
        let mut opts = shared.clone();
        if i != 0 {
            // Worker 0, the chief, writes the cluster's summary.
            opts.metrics_out = None;
        }
        let mut a: Vec<OsString> = vec!["train".into(), "--hosts".into()];
        a.push(file.clone().into_os_string());
        a.extend([
            "--job".into(),
            job.into(),
            "--task".into(),
            task.to_string().into(),
        ]);
        a.extend(opts.to_args());
        a
    };
    tracing::info!(
        workers = args.np,
        ps,
        cluster = %file.display(),
        "launching: [rank 0..{}] are workers 0..{0}, [rank {}..{}] are ps tasks 0..{}",
        args.np - 1,
        args.np,
        np - 1,
        ps - 1
    );
    let env = launchenv::cleared_vars();
    let report = launch::run_ranks(&program, np, &args_for, &env)?;
    if report.success() {
        return Ok(0);
    }
    bail!(LaunchFailed(report.exit_code(), report.first_failed));
}

/// `launch --mode in-graph --np K`: K replica threads in this process.
fn launch_in_graph(args: &LaunchArgs) -> anyhow::Result<u8> {
    if args.ps.is_some() {
        bail!("--ps applies only to --mode ps");
    }
    let cfg = args.opts.to_config().map_err(anyhow::Error::msg)?;
    let trained = ringtrain::ingraph::run(&cfg, args.np)?;
    let s = &trained.summary;
    if args.opts.log_format == LogFormat::Json {
        report(s, args.opts.log_format);
        return Ok(0);
    }
    println!(
        "summary: {} replicas (in-graph), {} steps of {} samples per replica, test accuracy \
         {:.2}%, final loss {:.4}, param_digest {}",
        s.world_size,
        s.steps,
        s.batch_size,
        100.0 * s.test_accuracy,
        s.final_loss,
        s.param_digest
    );
    println!(
        "summary: {:.0} samples/s, in-memory reduce p50 {:.3} ms p99 {:.3} ms ({:.1}% of the \
         loop), no network",
        s.samples_per_sec,
        s.allreduce_ms_p50,
        s.allreduce_ms_p99,
        100.0 * s.comm_fraction
    );
    Ok(0)
}

fn run_keygen(args: &KeygenArgs) -> anyhow::Result<u8> {
    let credential = Credential::generate()?;
    credential.write_new(&args.out)?;
    let path = args.out.display();
    println!("wrote cluster key {} to {path}", credential.id());
    println!(
        "copy it to every machine, readable only by the user who runs ringtrain, and start \
         every rank with --key {path} (or RINGTRAIN_KEY={path}); whoever holds it can join"
    );
    Ok(0)
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
