//! Run a whole cluster on one machine, the way `horovodrun` or `torchrun` do.
//!
//! [`run_ranks`] starts one child process per rank, re-prints every line a child writes
//! with a `[rank N] ` prefix, and watches the children. The first rank to fail (non-zero
//! exit or death by a signal) brings the others down: the launcher kills them, reaps
//! them and reports what happened to each. [`free_local_addrs`] picks loopback ports for
//! a generated hosts file.
//!
//! Children are never left running when [`run_ranks`] returns, on any path. The
//! launcher only kills its own children, by PID: a grandchild that a rank started
//! itself is not tracked.

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread;
use std::time::{Duration, Instant};

/// How often the launcher checks whether a child has exited.
const POLL_INTERVAL: Duration = Duration::from_millis(25);

/// How long to wait, after every child is reaped, for their output to drain. Output
/// pipes stay open past this only if a rank left a grandchild holding them.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// What can go wrong while launching or supervising the ranks.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// Asked to run zero ranks.
    #[error("nothing to launch: the number of ranks is 0; pass --np 1 or more")]
    NoRanks,

    /// A rank's process could not be started.
    #[error(
        "cannot start rank {rank} as {}; check that the program exists and is executable",
        .program.display()
    )]
    Spawn {
        /// The program that was to run.
        program: PathBuf,
        /// The rank it was to run as.
        rank: usize,
        /// Why starting failed.
        #[source]
        source: io::Error,
    },

    /// The thread that forwards a rank's output could not be started.
    #[error("cannot start the output thread for rank {rank}; the system may be out of threads")]
    OutputThread {
        /// The rank whose output it was to forward.
        rank: usize,
        /// Why starting the thread failed.
        #[source]
        source: io::Error,
    },

    /// The launcher's event loop (used to catch Ctrl-C) could not be built.
    #[error("cannot start the launcher's event loop")]
    Runtime {
        /// Why building it failed.
        #[source]
        source: io::Error,
    },

    /// Asking the OS whether a rank had exited failed; all ranks were stopped.
    #[error("cannot check whether rank {rank} is still running; all ranks were stopped")]
    Wait {
        /// The rank being checked.
        rank: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// No free UDP port could be reserved on the loopback interface.
    #[error("cannot reserve a free UDP port on 127.0.0.1; check that loopback networking is up")]
    FreePort {
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// Ctrl-C arrived; every rank was killed and reaped before returning.
    #[error("interrupted by Ctrl-C; stopped all {np} ranks")]
    Interrupted {
        /// How many ranks were running.
        np: usize,
    },
}

/// Picks `n` free UDP ports on 127.0.0.1 (bind UdpSocket to port 0, read the port,
/// then drop the sockets all at the end so the ports are distinct).
///
/// The ports are free when this returns; another process could still take one before
/// a rank binds it, which is unlikely on a quiet machine.
pub fn free_local_addrs(n: usize) -> Result<Vec<SocketAddr>, LaunchError> {
    let mut sockets = Vec::with_capacity(n);
    for _ in 0..n {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(|source| LaunchError::FreePort { source })?;
        sockets.push(socket);
    }
    sockets
        .iter()
        .map(|socket| socket.local_addr())
        .collect::<io::Result<Vec<_>>>()
        .map_err(|source| LaunchError::FreePort { source })
}

/// What happened to one rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankExit {
    /// The rank.
    pub rank: usize,
    /// The exit code, if the process exited normally.
    pub code: Option<i32>,
    /// The signal that ended the process, on Unix, if one did.
    pub signal: Option<i32>,
    /// Whether this rank was the first to fail.
    pub first_failure: bool,
    /// Whether the launcher killed this rank (after another rank failed, or on Ctrl-C).
    pub killed: bool,
}

impl RankExit {
    /// A rank the launcher killed but could not reap, so its status is unknown.
    fn unknown(rank: usize) -> RankExit {
        RankExit {
            rank,
            code: None,
            signal: None,
            first_failure: false,
            killed: true,
        }
    }

    /// Describes the exit for a log line, e.g. "exited with code 3".
    pub fn describe(&self) -> String {
        match (self.code, self.signal) {
            (Some(code), _) => format!("exited with code {code}"),
            (None, Some(signal)) => format!("was ended by signal {signal}"),
            (None, None) => "ended without an exit code".to_owned(),
        }
    }
}

/// What happened to every rank of one launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchReport {
    /// One exit per rank, indexed by rank.
    pub exits: Vec<RankExit>,
    /// Index (= rank) of the first rank that failed, if any.
    pub first_failed: Option<usize>,
}

impl LaunchReport {
    /// True when every rank exited with code 0.
    pub fn success(&self) -> bool {
        self.first_failed.is_none()
    }

    /// Exit code to use: 0 on success, else the first failed rank's code (or 1).
    pub fn exit_code(&self) -> i32 {
        let Some(rank) = self.first_failed else {
            return 0;
        };
        match self.exits.get(rank).and_then(|exit| exit.code) {
            Some(code) if code != 0 => code,
            _ => 1,
        }
    }
}

/// Which of a child's output streams a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

/// Receives each line a child prints, without its line ending.
pub(crate) type LineSink = Arc<dyn Fn(usize, Stream, &str) + Send + Sync>;

/// Starts one child process per rank: `program` with `args_for(rank)` and the extra
/// environment `env`. Every line a child prints on stdout or stderr is re-printed by
/// the launcher prefixed with `"[rank N] "` (stdout lines to stdout, stderr lines to
/// stderr), one whole line at a time, flushed per line.
///
/// If any rank exits non-zero (or by a signal), the launcher logs which rank failed
/// first and how, kills the remaining children, waits for them, and returns the
/// report. If every rank exits 0 the report is a success. Children get a null stdin.
///
/// Ctrl-C kills and reaps every child, then returns [`LaunchError::Interrupted`]. The
/// Ctrl-C handler, once installed, stays for the life of the process, so the caller
/// should exit after this returns that error.
pub fn run_ranks(
    program: &Path,
    np: usize,
    args_for: &dyn Fn(usize) -> Vec<OsString>,
    env: &[(OsString, OsString)],
) -> Result<LaunchReport, LaunchError> {
    run_ranks_with_sink(program, np, args_for, env, Arc::new(print_line))
}

/// [`run_ranks`] with the destination of the children's lines chosen by the caller.
pub(crate) fn run_ranks_with_sink(
    program: &Path,
    np: usize,
    args_for: &dyn Fn(usize) -> Vec<OsString>,
    env: &[(OsString, OsString)],
    sink: LineSink,
) -> Result<LaunchReport, LaunchError> {
    if np == 0 {
        return Err(LaunchError::NoRanks);
    }
    let (done_tx, done_rx) = mpsc::channel();
    let mut cluster = Cluster::default();

    // On an early return `cluster` is dropped, which kills and reaps what was started.
    for rank in 0..np {
        let child = spawn_rank(program, rank, &args_for(rank), env)?;
        cluster.children.push(Some(child));
        let readers = forward_output(&mut cluster, rank, &sink, &done_tx)?;
        cluster.readers += readers;
    }
    drop(done_tx);

    let outcome = supervise(&mut cluster);
    drain_output(&done_rx, cluster.readers);
    outcome
}

/// Writes one child line to the launcher's own stdout or stderr, with its rank prefix.
fn print_line(rank: usize, stream: Stream, line: &str) {
    let text = prefixed(rank, line);
    // A closed terminal or pipe must not take the launcher down; the line is dropped.
    let _ = match stream {
        Stream::Stdout => write_line(&mut io::stdout().lock(), &text),
        Stream::Stderr => write_line(&mut io::stderr().lock(), &text),
    };
}

/// The line as the launcher prints it.
fn prefixed(rank: usize, line: &str) -> String {
    format!("[rank {rank}] {line}")
}

/// Writes `text` and a newline in one call, then flushes.
fn write_line(out: &mut impl Write, text: &str) -> io::Result<()> {
    writeln!(out, "{text}")?;
    out.flush()
}

/// Starts one rank with piped stdout and stderr.
fn spawn_rank(
    program: &Path,
    rank: usize,
    args: &[OsString],
    env: &[(OsString, OsString)],
) -> Result<Child, LaunchError> {
    Command::new(program)
        .args(args)
        .envs(env.iter().map(|(key, value)| (key, value)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| LaunchError::Spawn {
            program: program.to_path_buf(),
            rank,
            source,
        })
}

/// Starts the reader threads for the newest child; returns how many were started.
fn forward_output(
    cluster: &mut Cluster,
    rank: usize,
    sink: &LineSink,
    done: &Sender<()>,
) -> Result<usize, LaunchError> {
    let Some(Some(child)) = cluster.children.last_mut() else {
        return Ok(0);
    };
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();

    let mut started = 0;
    if let Some(pipe) = stdout {
        spawn_reader(pipe, rank, Stream::Stdout, sink, done)?;
        started += 1;
    }
    if let Some(pipe) = stderr {
        spawn_reader(pipe, rank, Stream::Stderr, sink, done)?;
        started += 1;
    }
    Ok(started)
}

/// Starts a thread that hands each line of `pipe` to `sink` and signals `done` at EOF.
fn spawn_reader(
    pipe: impl Read + Send + 'static,
    rank: usize,
    stream: Stream,
    sink: &LineSink,
    done: &Sender<()>,
) -> Result<(), LaunchError> {
    let sink = Arc::clone(sink);
    let done = done.clone();
    thread::Builder::new()
        .name(format!("rank-{rank}-{stream:?}").to_lowercase())
        .spawn(move || {
            read_lines(pipe, |line| sink(rank, stream, line));
            let _ = done.send(());
        })
        .map(drop)
        .map_err(|source| LaunchError::OutputThread { rank, source })
}

/// Calls `each` for every line of `pipe` (lossy UTF-8, line ending removed) until EOF
/// or a read error. A last line without a newline is passed on too.
fn read_lines(pipe: impl Read, mut each: impl FnMut(&str)) {
    let mut reader = BufReader::new(pipe);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&buf);
        each(line.trim_end_matches(['\n', '\r']));
    }
}

/// Waits until the reader threads report EOF, or until the grace period runs out.
fn drain_output(done: &Receiver<()>, readers: usize) {
    let deadline = Instant::now() + DRAIN_GRACE;
    for _ in 0..readers {
        let left = deadline.saturating_duration_since(Instant::now());
        if done.recv_timeout(left).is_err() {
            tracing::warn!("some rank output is still open; a rank may have left a subprocess");
            return;
        }
    }
}

/// Polls the children until all have exited, stopping the rest at the first failure
/// or on Ctrl-C.
fn supervise(cluster: &mut Cluster) -> Result<LaunchReport, LaunchError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| LaunchError::Runtime { source })?;
    runtime.block_on(watch(cluster))
}

/// The body of [`supervise`]: poll every [`POLL_INTERVAL`], or stop early on Ctrl-C.
async fn watch(cluster: &mut Cluster) -> Result<LaunchReport, LaunchError> {
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut ctrl_c_live = true;

    loop {
        if cluster.poll()? {
            return Ok(cluster.report());
        }
        tokio::select! {
            caught = &mut ctrl_c, if ctrl_c_live => match caught {
                Ok(()) => return Err(cluster.interrupt()),
                Err(error) => {
                    tracing::warn!(%error, "cannot catch Ctrl-C; ranks run on regardless");
                    ctrl_c_live = false;
                }
            },
            () = tokio::time::sleep(POLL_INTERVAL) => {}
        }
    }
}

/// The running ranks. Dropping it kills and reaps any child not yet reaped.
#[derive(Default)]
struct Cluster {
    /// Per rank: the child until it has been reaped.
    children: Vec<Option<Child>>,
    /// Per rank: how it ended, once it has.
    exits: Vec<Option<RankExit>>,
    /// The first rank that failed.
    first_failed: Option<usize>,
    /// How many output reader threads were started.
    readers: usize,
}

impl Cluster {
    /// Reaps any child that has exited; on the first failure, stops all the others.
    /// Returns true when every child has been reaped.
    fn poll(&mut self) -> Result<bool, LaunchError> {
        self.exits.resize(self.children.len(), None);
        for rank in 0..self.children.len() {
            let Some(child) = self.children[rank].as_mut() else {
                continue;
            };
            let status = child.try_wait();
            let status = status.map_err(|source| LaunchError::Wait { rank, source })?;
            if let Some(status) = status {
                self.record(rank, status, false);
            }
        }
        Ok(self.children.iter().all(Option::is_none))
    }

    /// Stores how `rank` ended; a first failure kills and reaps all the others.
    fn record(&mut self, rank: usize, status: ExitStatus, killed: bool) {
        self.children[rank] = None;
        let mut exit = exit_of(rank, status, killed);
        let failed = !status.success() && !killed;
        if failed && self.first_failed.is_none() {
            exit.first_failure = true;
            self.first_failed = Some(rank);
            let others = self.children.iter().flatten().count();
            tracing::error!(
                rank,
                "rank {rank} failed first: it {}; stopping the other \
                {others} running ranks",
                exit.describe()
            );
            self.exits[rank] = Some(exit);
            self.kill_all();
            return;
        }
        self.exits[rank] = Some(exit);
    }

    /// Kills and reaps every child still running, recording each as killed.
    fn kill_all(&mut self) {
        self.exits.resize(self.children.len(), None);
        for rank in 0..self.children.len() {
            let Some(mut child) = self.children[rank].take() else {
                continue;
            };
            // If waiting fails the child is still killed; its status is just unknown.
            let exit = match kill_and_reap(&mut child) {
                Some(status) => exit_of(rank, status, true),
                None => RankExit::unknown(rank),
            };
            self.exits[rank] = Some(exit);
        }
    }

    /// Handles Ctrl-C: stops every rank and builds the error to return.
    fn interrupt(&mut self) -> LaunchError {
        let np = self.children.len();
        tracing::error!("interrupted by Ctrl-C; stopping all {np} ranks");
        self.kill_all();
        LaunchError::Interrupted { np }
    }

    /// The report, once every child has been reaped.
    fn report(&self) -> LaunchReport {
        let exits = self.exits.iter().flatten().cloned().collect();
        LaunchReport {
            exits,
            first_failed: self.first_failed,
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in self.children.iter_mut().flatten() {
            kill_and_reap(child);
        }
    }
}

/// Kills one child by PID (harmless if it already exited) and waits for it.
fn kill_and_reap(child: &mut Child) -> Option<ExitStatus> {
    let _ = child.kill();
    child.wait().ok()
}

/// How `rank` ended, from its status.
fn exit_of(rank: usize, status: ExitStatus, killed: bool) -> RankExit {
    RankExit {
        rank,
        code: status.code(),
        signal: signal_of(status),
        first_failure: false,
        killed,
    }
}

#[cfg(unix)]
fn signal_of(status: ExitStatus) -> Option<i32> {
    use std::os::unix::process::ExitStatusExt;
    status.signal()
}

#[cfg(not(unix))]
fn signal_of(_status: ExitStatus) -> Option<i32> {
    None
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Mutex;

    type Lines = Arc<Mutex<Vec<(usize, Stream, String)>>>;

    /// A sink that records every line, and the record it writes to.
    fn recording_sink() -> (LineSink, Lines) {
        let lines: Lines = Arc::default();
        let record = Arc::clone(&lines);
        let sink: LineSink = Arc::new(move |rank, stream, line: &str| {
            record.lock().unwrap().push((rank, stream, line.to_owned()));
        });
        (sink, lines)
    }

    /// Runs `np` ranks of `/bin/sh -c script(rank)`, recording their lines.
    fn run_sh(
        np: usize,
        script: impl Fn(usize) -> String,
    ) -> (Result<LaunchReport, LaunchError>, Lines) {
        let (sink, lines) = recording_sink();
        let args_for = |rank| vec![OsString::from("-c"), OsString::from(script(rank))];
        let env = [(OsString::from("RT_TEST_VAR"), OsString::from("hello"))];
        let result = run_ranks_with_sink(Path::new("/bin/sh"), np, &args_for, &env, sink);
        (result, lines)
    }

    #[test]
    fn all_ranks_exit_zero_is_success_with_every_line_forwarded() {
        let (result, lines) = run_sh(3, |rank| {
            format!("echo out $RT_TEST_VAR {rank}; echo err {rank} >&2; printf 'tail {rank}'")
        });
        let report = result.unwrap();
        assert!(report.success());
        assert_eq!(report.exit_code(), 0);
        assert_eq!(report.exits.len(), 3);
        for (rank, exit) in report.exits.iter().enumerate() {
            assert_eq!((exit.rank, exit.code, exit.killed), (rank, Some(0), false));
        }

        let lines = lines.lock().unwrap();
        for rank in 0..3 {
            let want = [
                (rank, Stream::Stdout, format!("out hello {rank}")),
                (rank, Stream::Stderr, format!("err {rank}")),
                (rank, Stream::Stdout, format!("tail {rank}")),
            ];
            for line in want {
                assert!(lines.contains(&line), "missing {line:?} in {lines:?}");
            }
        }
        assert_eq!(lines.len(), 9, "{lines:?}");
    }

    #[test]
    fn printed_lines_carry_the_rank_prefix() {
        assert_eq!(prefixed(2, "loss 0.5"), "[rank 2] loss 0.5");
        let mut out = Vec::new();
        write_line(&mut out, &prefixed(0, "x")).unwrap();
        assert_eq!(out, b"[rank 0] x\n");
    }

    #[test]
    fn read_lines_strips_crlf_and_keeps_an_unterminated_tail() {
        let mut seen = Vec::new();
        read_lines(&b"a\r\nb\n\nc"[..], |line| seen.push(line.to_owned()));
        assert_eq!(seen, ["a", "b", "", "c"]);
    }

    #[test]
    fn first_failure_stops_the_other_ranks_quickly() {
        let started = Instant::now();
        let (result, _lines) = run_sh(4, |rank| match rank {
            2 => "sleep 0.2; exit 3".to_owned(),
            _ => "exec sleep 30".to_owned(),
        });
        let elapsed = started.elapsed();
        let report = result.unwrap();

        assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
        assert!(!report.success());
        assert_eq!(report.first_failed, Some(2));
        assert_eq!(report.exit_code(), 3);
        let failed = &report.exits[2];
        assert_eq!(
            (failed.code, failed.first_failure, failed.killed),
            (Some(3), true, false)
        );
        for rank in [0, 1, 3] {
            let exit = &report.exits[rank];
            assert_eq!(exit.rank, rank);
            assert!(exit.killed && !exit.first_failure, "{exit:?}");
            assert_eq!((exit.code, exit.signal), (None, Some(9)), "{exit:?}");
        }
    }

    #[test]
    fn death_by_signal_counts_as_failure_with_exit_code_one() {
        let (result, _lines) = run_sh(2, |rank| match rank {
            0 => "kill -TERM $$".to_owned(),
            _ => "exec sleep 30".to_owned(),
        });
        let report = result.unwrap();
        assert_eq!(report.first_failed, Some(0));
        assert_eq!(report.exits[0].signal, Some(15));
        assert_eq!(report.exit_code(), 1);
        assert!(report.exits[1].killed);
    }

    #[test]
    fn leftover_grandchild_holding_output_delays_return_only_by_the_grace() {
        let started = Instant::now();
        let (result, lines) = run_sh(1, |_| "sleep 6 & echo started".to_owned());
        let elapsed = started.elapsed();

        assert!(result.unwrap().success());
        assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
        let lines = lines.lock().unwrap();
        assert_eq!(lines[0], (0, Stream::Stdout, "started".to_owned()));
    }

    #[test]
    fn spawn_failure_names_program_and_rank() {
        let (sink, _lines) = recording_sink();
        let program = Path::new("/nonexistent/ringtrain-launch-test");
        let result = run_ranks_with_sink(program, 2, &|_| Vec::new(), &[], sink);
        let err = result.unwrap_err();
        assert!(matches!(err, LaunchError::Spawn { rank: 0, .. }), "{err}");
        assert!(err.to_string().contains("ringtrain-launch-test"), "{err}");
    }

    #[test]
    fn zero_ranks_is_an_error() {
        let (sink, _lines) = recording_sink();
        let result = run_ranks_with_sink(Path::new("/bin/sh"), 0, &|_| Vec::new(), &[], sink);
        assert!(matches!(result, Err(LaunchError::NoRanks)));
    }

    #[test]
    fn free_local_addrs_are_distinct_loopback_ports() {
        let addrs = free_local_addrs(8).unwrap();
        assert_eq!(addrs.len(), 8);
        let ports: HashSet<u16> = addrs.iter().map(SocketAddr::port).collect();
        assert_eq!(ports.len(), 8);
        assert!(addrs.iter().all(|a| a.ip().is_loopback() && a.port() != 0));
    }

    #[test]
    fn report_exit_code_falls_back_to_one() {
        let exit = |code| RankExit {
            rank: 0,
            code,
            signal: None,
            first_failure: true,
            killed: false,
        };
        let report = |code| LaunchReport {
            exits: vec![exit(code)],
            first_failed: Some(0),
        };
        assert_eq!(report(Some(7)).exit_code(), 7);
        assert_eq!(report(None).exit_code(), 1);
    }
}
