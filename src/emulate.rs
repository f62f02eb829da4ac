//! An emulated cluster on one machine: every rank in its own network namespace, behind a
//! shaped link into a shared bridge, optionally with a CPU quota.
//!
//! ```text
//!   netns <id>-r0          netns <id>-br                   netns <id>-r1
//!   eth0 10.77.0.1 ==veth== p0 ┐                  ┌ p1 ==veth== eth0 10.77.0.2
//!   tbf (egress)         tbf   └──── br0 (switch) ┘   tbf         tbf (egress)
//! ```
//!
//! Each rank's `eth0` shapes what the rank sends (its uplink) and the bridge port `pN`
//! shapes what it receives (the switch's port towards it), both with a token bucket at the
//! link rate, so N ranks behave like N machines on a switch with full-duplex links of that
//! rate. `--delay` puts netem (one-way delay) in front of the rank's uplink shaper and is
//! refused with a clear error on kernels without netem; `--loss` drops that share of the
//! rank's outgoing UDP packets with an nftables `numgen random` rule; `--cpu` caps each rank
//! with a cgroup v1 CPU quota; `--mtu` sets the MTU of every link.
//!
//! Addresses come from 10.77.0.0/24 and exist only inside these namespaces; nothing is
//! added to the root namespace, so no traffic can leave the machine. Names carry the PID
//! and a per-process counter, so concurrent runs never collide.
//!
//! [`plan`] turns a [`LinkSpec`] into the list of commands to run, a pure function that the
//! tests check; [`Cluster::create`] runs them and records each namespace and cgroup it made.
//! Everything is removed again when the [`Cluster`] is dropped, on every path, and also on
//! Ctrl-C or SIGTERM: a watcher thread then removes every live cluster (killing what still
//! runs inside its namespaces) and exits the process.

use std::ffi::OsString;
use std::fmt;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use clap::Args;
use tracing::{debug, info, warn};

/// The most ranks one emulated cluster can hold (addresses 10.77.0.1 ..= 10.77.0.250).
pub const MAX_RANKS: usize = 250;

/// Where cgroup v1's CPU controller is mounted.
const CGROUP_CPU: &str = "/sys/fs/cgroup/cpu";

/// CFS period for the CPU quota, in microseconds: short, so a throttled rank pauses for at
/// most a few milliseconds at a time (with the default 100 ms, a rank at half a core
/// could stall a whole ring for 50 ms).
const CFS_PERIOD_US: u64 = 10_000;

/// How much traffic a link queues beyond its burst before it drops, as time at line rate.
const QUEUE_TIME: Duration = Duration::from_millis(20);

/// Why the emulated cluster could not be built or removed.
#[derive(Debug, thiserror::Error)]
pub enum EmulateError {
    /// Network namespaces, tc and cgroups need root.
    #[error(
        "--link needs root (network namespaces, tc and cgroups); run as root or drop --link \
         to run the ranks as plain processes on 127.0.0.1"
    )]
    NotRoot,
    /// A command-line tool is not installed.
    #[error("--link needs `{tool}`, which is not on PATH or in /usr/sbin or /sbin; {hint}")]
    ToolMissing {
        /// The tool.
        tool: &'static str,
        /// How to get it.
        hint: &'static str,
    },
    /// `--cpu` needs cgroup v1's CPU controller.
    #[error(
        "--cpu needs cgroup v1's CPU controller at {CGROUP_CPU} (cpu.cfs_quota_us not found); \
         drop --cpu on this machine"
    )]
    NoCgroup,
    /// The kernel has no netem, so `--delay` cannot be honoured.
    #[error(
        "--delay needs the kernel's netem qdisc, which this kernel lacks (tc said: {detail}); \
         drop --delay, or run on a kernel with sch_netem (modprobe sch_netem)"
    )]
    NoNetem {
        /// What tc printed.
        detail: String,
    },
    /// Too many or too few ranks.
    #[error("an emulated cluster holds 1 to {MAX_RANKS} ranks, not {0}")]
    Size(usize),
    /// A set-up command failed.
    #[error("setting up the emulated cluster failed at `{command}`: {detail}")]
    Command {
        /// The command line.
        command: String,
        /// Its stderr, or why it could not start.
        detail: String,
    },
    /// A cgroup file could not be written.
    #[error("cannot set up cgroup {}: {source}", .path.display())]
    Cgroup {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Ctrl-C or SIGTERM arrived while the cluster was being built.
    #[error("interrupted while setting up the emulated cluster; removed what was built")]
    Interrupted,
    /// Tearing down left something behind.
    #[error("could not remove all of the emulated cluster: {0}; remove it by hand")]
    Teardown(String),
}

/// A link rate in bits per second, written as tc writes it: `1gbit`, `200mbit`, `500kbit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rate(u64);

impl Rate {
    /// A rate of `bits` per second.
    pub fn from_bits_per_sec(bits: u64) -> Rate {
        Rate(bits)
    }

    /// Bits per second.
    pub fn bits_per_sec(self) -> u64 {
        self.0
    }

    /// Bytes per second.
    pub fn bytes_per_sec(self) -> f64 {
        self.0 as f64 / 8.0
    }
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("expected a rate like 1gbit, 200mbit or 500kbit, got {s:?}");
        let lower = s.trim().to_ascii_lowercase();
        let lower = lower.strip_suffix("/s").unwrap_or(&lower);
        let split = lower
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(lower.len());
        let (num, unit) = lower.split_at(split);
        let scale: f64 = match unit {
            "bit" | "b" => 1.0,
            "kbit" | "k" => 1e3,
            "mbit" | "m" => 1e6,
            "gbit" | "g" => 1e9,
            "tbit" | "t" => 1e12,
            _ => return Err(bad()),
        };
        let value: f64 = num.parse().map_err(|_| bad())?;
        let bits = (value * scale).round();
        if !(8_000.0..=1e13).contains(&bits) {
            return Err(format!(
                "link rate must be between 8kbit and 10tbit, got {s:?}"
            ));
        }
        Ok(Rate(bits as u64))
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (scale, unit) in [
            (1_000_000_000, "gbit"),
            (1_000_000, "mbit"),
            (1_000, "kbit"),
        ] {
            if self.0 >= scale && self.0 % scale == 0 {
                return write!(f, "{}{unit}", self.0 / scale);
            }
        }
        write!(f, "{}bit", self.0)
    }
}

/// A one-way delay: `5ms`, `200us`, `1s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delay(pub Duration);

impl FromStr for Delay {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("expected a delay like 5ms, 200us or 1s, got {s:?}");
        let t = s.trim().to_ascii_lowercase();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let scale = match unit {
            "us" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            _ => return Err(bad()),
        };
        let v: f64 = num.parse().map_err(|_| bad())?;
        let secs = v * scale;
        if !(secs.is_finite() && secs > 0.0 && secs <= 10.0) {
            return Err(format!("delay must be above 0 and at most 10s, got {s:?}"));
        }
        Ok(Delay(Duration::from_secs_f64(secs)))
    }
}

/// A share of packets to drop, `0 <= p < 1`: `0.01` or `1%`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Loss(pub f64);

impl FromStr for Loss {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let (num, scale) = match t.strip_suffix('%') {
            Some(num) => (num, 0.01),
            None => (t, 1.0),
        };
        let p = num
            .trim()
            .parse::<f64>()
            .map(|v| v * scale)
            .map_err(|_| format!("expected a loss like 0.01 or 1%, got {s:?}"))?;
        if !(0.0..1.0).contains(&p) {
            return Err(format!("loss must be at least 0 and below 100%, got {s:?}"));
        }
        Ok(Loss(p))
    }
}

/// A CPU quota in cores, e.g. `0.5` or `1`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuShare(pub f64);

impl FromStr for CpuShare {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().parse::<f64>() {
            Ok(v) if (0.1..=1024.0).contains(&v) => Ok(CpuShare(v)),
            _ => Err(format!(
                "expected a CPU share in cores between 0.1 and 1024, like 0.5, got {s:?}"
            )),
        }
    }
}

/// The flags that turn plain local ranks into an emulated cluster.
#[derive(Debug, Clone, Default, PartialEq, Args)]
pub struct LinkArgs {
    /// Emulate a cluster: each rank in its own network namespace on a link of this rate
    /// (e.g. 1gbit, 200mbit) into a shared bridge. Needs root, `ip` and `tc`.
    #[arg(long, value_name = "RATE")]
    pub link: Option<Rate>,
    /// One-way delay added to each rank's uplink (e.g. 5ms); needs the kernel's netem.
    #[arg(long, value_name = "D", requires = "link")]
    pub delay: Option<Delay>,
    /// Share of each rank's outgoing UDP packets to drop (e.g. 0.001 or 0.1%); needs `nft`.
    #[arg(long, value_name = "P", requires = "link")]
    pub loss: Option<Loss>,
    /// CPU quota per rank in cores (e.g. 0.5), through cgroup v1.
    #[arg(long, value_name = "CORES", requires = "link")]
    pub cpu: Option<CpuShare>,
    /// MTU of every emulated link, in bytes [default: 1500].
    #[arg(long, value_name = "BYTES", requires = "link", value_parser = clap::value_parser!(u32).range(1280..=65535))]
    pub mtu: Option<u32>,
}

impl LinkArgs {
    /// The link these flags describe; `None` without `--link`.
    pub fn spec(&self) -> Option<LinkSpec> {
        Some(LinkSpec {
            rate: self.link?,
            delay: self.delay.map(|d| d.0),
            loss: self.loss.map(|l| l.0).filter(|&p| p > 0.0),
            cpu: self.cpu.map(|c| c.0),
            mtu: self.mtu,
        })
    }
}

/// What every emulated link looks like.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkSpec {
    /// Line rate in each direction.
    pub rate: Rate,
    /// One-way delay on each rank's uplink.
    pub delay: Option<Duration>,
    /// Share of each rank's outgoing UDP packets dropped.
    pub loss: Option<f64>,
    /// CPU quota per rank, in cores.
    pub cpu: Option<f64>,
    /// Link MTU; the kernel's default (1500) when `None`.
    pub mtu: Option<u32>,
}

impl LinkSpec {
    /// A plain link of `rate`, nothing else.
    pub fn rate(rate: Rate) -> LinkSpec {
        LinkSpec {
            rate,
            delay: None,
            loss: None,
            cpu: None,
            mtu: None,
        }
    }

    /// The token bucket size in bytes: at least 125 KB and at least 1 ms at line rate, since
    /// smaller buckets make the kernel spend its CPU on throttling.
    pub fn burst_bytes(&self) -> u64 {
        let one_ms = self.rate.bits_per_sec() / 8 / 1000;
        one_ms.max(125_000)
    }

    /// Bytes the shaper queues before dropping: the burst plus `QUEUE_TIME` (20 ms) at line rate.
    pub fn queue_bytes(&self) -> u64 {
        let queued = self.rate.bytes_per_sec() * QUEUE_TIME.as_secs_f64();
        self.burst_bytes() + queued as u64
    }
}

impl fmt::Display for LinkSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} links, MTU {}", self.rate, self.mtu.unwrap_or(1500))?;
        if let Some(d) = self.delay {
            write!(f, ", {} us one-way delay", d.as_micros())?;
        }
        if let Some(p) = self.loss {
            write!(f, ", {:.3}% loss", 100.0 * p)?;
        }
        if let Some(c) = self.cpu {
            write!(f, ", {c} cores per rank")?;
        }
        Ok(())
    }
}

/// The names of one cluster's namespaces and cgroups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    id: String,
}

impl Names {
    /// Names for cluster number `serial` of process `pid`.
    pub fn new(pid: u32, serial: usize) -> Names {
        Names {
            id: format!("ringtrain-{pid}-{serial}"),
        }
    }

    /// The namespace that holds the bridge.
    pub fn bridge_ns(&self) -> String {
        format!("{}-br", self.id)
    }

    /// The namespace of `rank`; its cgroup has the same name.
    pub fn rank_ns(&self, rank: usize) -> String {
        format!("{}-r{rank}", self.id)
    }
}

/// The address of `rank` inside the emulated cluster.
pub fn rank_ip(rank: usize) -> Ipv4Addr {
    debug_assert!(rank < MAX_RANKS, "invariant: rank below MAX_RANKS");
    Ipv4Addr::new(10, 77, 0, rank as u8 + 1)
}

/// One set-up command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The tool and its arguments; the tool is `ip`, `tc` or `nft` by name.
    pub argv: Vec<String>,
    /// Text fed to the command's stdin.
    pub stdin: Option<String>,
    /// The namespace this command creates, to be deleted at teardown.
    pub creates: Option<String>,
    /// This step adds netem, which some kernels lack.
    pub netem: bool,
}

impl Step {
    fn new(argv: &[&str]) -> Step {
        Step {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            stdin: None,
            creates: None,
            netem: false,
        }
    }

    fn creating(mut self, ns: &str) -> Step {
        self.creates = Some(ns.to_string());
        self
    }
}

/// Every command that builds a cluster of `n` ranks with `spec`, in order (cgroups aside).
pub fn plan(names: &Names, n: usize, spec: &LinkSpec) -> Vec<Step> {
    let br = names.bridge_ns();
    let mut steps = vec![
        Step::new(&["ip", "netns", "add", &br]).creating(&br),
        Step::new(&["ip", "-n", &br, "link", "add", "br0", "type", "bridge"]),
        Step::new(&["ip", "-n", &br, "link", "set", "br0", "up"]),
    ];
    for rank in 0..n {
        steps.extend(rank_steps(names, rank, spec));
    }
    steps
}

fn rank_steps(names: &Names, rank: usize, spec: &LinkSpec) -> Vec<Step> {
    let (br, ns) = (names.bridge_ns(), names.rank_ns(rank));
    let port = format!("p{rank}");
    let addr = format!("{}/24", rank_ip(rank));
    let mut steps = vec![
        Step::new(&["ip", "netns", "add", &ns]).creating(&ns),
        Step::new(&["ip", "-n", &ns, "link", "set", "lo", "up"]),
        Step::new(&[
            "ip", "-n", &br, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
            &ns,
        ]),
        Step::new(&["ip", "-n", &br, "link", "set", &port, "master", "br0"]),
    ];
    if let Some(mtu) = spec.mtu {
        let mtu = mtu.to_string();
        steps.push(Step::new(&[
            "ip", "-n", &br, "link", "set", &port, "mtu", &mtu,
        ]));
        steps.push(Step::new(&[
            "ip", "-n", &ns, "link", "set", "eth0", "mtu", &mtu,
        ]));
    }
    steps.extend([
        Step::new(&["ip", "-n", &br, "link", "set", &port, "up"]),
        Step::new(&["ip", "-n", &ns, "addr", "add", &addr, "dev", "eth0"]),
        Step::new(&["ip", "-n", &ns, "link", "set", "eth0", "up"]),
    ]);
    steps.extend(shaping_steps(&ns, "eth0", spec, true));
    steps.extend(shaping_steps(&br, &port, spec, false));
    if let Some(p) = spec.loss {
        let mut step = Step::new(&["ip", "netns", "exec", &ns, "nft", "-f", "-"]);
        step.stdin = Some(loss_rules(p));
        steps.push(step);
    }
    steps
}

/// The tc commands shaping `dev` in `ns`; the uplink also gets the delay, if any.
fn shaping_steps(ns: &str, dev: &str, spec: &LinkSpec, uplink: bool) -> Vec<Step> {
    let tbf = [
        "rate".to_string(),
        format!("{}bit", spec.rate.bits_per_sec()),
        "burst".to_string(),
        spec.burst_bytes().to_string(),
        "limit".to_string(),
        spec.queue_bytes().to_string(),
    ];
    let delay = spec.delay.filter(|_| uplink);
    let mut argv: Vec<String> = ["tc", "-n", ns, "qdisc", "add", "dev", dev]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let Some(delay) = delay else {
        argv.extend(["root".into(), "tbf".into()]);
        argv.extend(tbf);
        return vec![Step {
            argv,
            stdin: None,
            creates: None,
            netem: false,
        }];
    };
    let mut netem = argv.clone();
    let us = format!("{}us", delay.as_micros());
    netem.extend(["root", "handle", "1:", "netem", "delay", &us].map(String::from));
    let mut child = argv;
    child.extend(["parent", "1:", "handle", "10:", "tbf"].map(String::from));
    child.extend(tbf);
    vec![
        Step {
            argv: netem,
            stdin: None,
            creates: None,
            netem: true,
        },
        Step {
            argv: child,
            stdin: None,
            creates: None,
            netem: false,
        },
    ]
}

/// An nftables ruleset dropping the share `p` of outgoing UDP packets.
fn loss_rules(p: f64) -> String {
    let ppm = (p * 1e6).round() as u64;
    format!(
        "table inet ringtrain_loss {{\n  chain out {{\n    type filter hook output priority 0; \
         policy accept;\n    meta l4proto udp numgen random mod 1000000 < {ppm} counter drop\n  \
         }}\n}}\n"
    )
}

/// What a cluster has made so far, for teardown.
#[derive(Debug, Default)]
struct Made {
    namespaces: Vec<String>,
    cgroups: Vec<PathBuf>,
    /// Set once torn down, or once a signal stopped set-up.
    closed: bool,
}

type Shared = Arc<Mutex<Made>>;

/// Every live cluster of this process, for the signal watcher.
static LIVE: Mutex<Vec<Weak<Mutex<Made>>>> = Mutex::new(Vec::new());

/// Numbers the clusters of this process.
static SERIAL: AtomicUsize = AtomicUsize::new(0);

/// Set by the signal watcher before it removes the clusters and exits the process.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// A running emulated cluster. Dropping it removes everything it made.
#[derive(Debug)]
pub struct Cluster {
    names: Names,
    ranks: usize,
    spec: LinkSpec,
    made: Shared,
    sh: Option<PathBuf>,
    ip: PathBuf,
}

impl Cluster {
    /// Builds a cluster of `n` ranks whose links follow `spec`.
    ///
    /// Fails with a clear error when not root, when `ip`, `tc` (or `nft` for `--loss`) are
    /// missing, when the kernel lacks netem for `--delay`, or when a command fails; whatever
    /// was built by then is removed again.
    pub fn create(n: usize, spec: &LinkSpec) -> Result<Cluster, EmulateError> {
        if n == 0 || n > MAX_RANKS {
            return Err(EmulateError::Size(n));
        }
        check_root()?;
        let ip = find_tool("ip", "install iproute2 (apt-get install iproute2)")?;
        let tc = find_tool("tc", "install iproute2 (apt-get install iproute2)")?;
        let nft = match spec.loss {
            Some(_) => Some(find_tool(
                "nft",
                "install nftables (apt-get install nftables)",
            )?),
            None => None,
        };
        if spec.cpu.is_some() && !Path::new(CGROUP_CPU).join("cpu.cfs_quota_us").exists() {
            return Err(EmulateError::NoCgroup);
        }
        watch_signals();

        let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
        let names = Names::new(std::process::id(), serial);
        let made: Shared = Arc::default();
        LIVE.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::downgrade(&made));
        let mut cluster = Cluster {
            names,
            ranks: n,
            spec: spec.clone(),
            made,
            sh: spec.cpu.map(|_| PathBuf::from("/bin/sh")),
            ip: ip.clone(),
        };
        let tools = Tools { ip, tc, nft };
        // On error, `cluster` drops here and removes what was made.
        cluster.build(&tools)?;
        info!(ranks = n, link = %spec, id = %cluster.names.id, "emulated cluster ready");
        Ok(cluster)
    }

    fn build(&mut self, tools: &Tools) -> Result<(), EmulateError> {
        for step in plan(&self.names, self.ranks, &self.spec) {
            self.locked(|made| {
                run_step(tools, &step)?;
                made.namespaces.extend(step.creates.clone());
                Ok(())
            })?;
        }
        if let Some(cores) = self.spec.cpu {
            for rank in 0..self.ranks {
                let dir = Path::new(CGROUP_CPU).join(self.names.rank_ns(rank));
                self.locked(|made| {
                    make_cgroup(&dir, cores)?;
                    made.cgroups.push(dir.clone());
                    Ok(())
                })?;
            }
        }
        Ok(())
    }

    /// Runs `f` with the record of what was made, unless a signal closed the cluster.
    fn locked(
        &self,
        f: impl FnOnce(&mut Made) -> Result<(), EmulateError>,
    ) -> Result<(), EmulateError> {
        let mut made = self.made.lock().unwrap_or_else(|e| e.into_inner());
        if made.closed {
            return Err(EmulateError::Interrupted);
        }
        f(&mut made)
    }

    /// The number of ranks.
    pub fn ranks(&self) -> usize {
        self.ranks
    }

    /// The link every rank has.
    pub fn spec(&self) -> &LinkSpec {
        &self.spec
    }

    /// Every rank's address at `port`, by rank.
    pub fn addrs(&self, port: u16) -> Vec<SocketAddr> {
        (0..self.ranks)
            .map(|r| SocketAddr::new(rank_ip(r).into(), port))
            .collect()
    }

    /// The program that starts a rank; give it [`Cluster::rank_args`].
    pub fn program(&self) -> &Path {
        self.sh.as_deref().unwrap_or(&self.ip)
    }

    /// Arguments for [`Cluster::program`] that run `exe args` as `rank`: in the rank's
    /// cgroup (joined before entering the namespace, which remounts /sys) and namespace.
    pub fn rank_args(&self, rank: usize, exe: &Path, args: Vec<OsString>) -> Vec<OsString> {
        let ns = self.names.rank_ns(rank);
        let mut out: Vec<OsString> = Vec::new();
        if self.sh.is_some() {
            let procs = Path::new(CGROUP_CPU).join(&ns).join("cgroup.procs");
            out.extend(["-c".into(), "echo $$ > \"$0\" && exec \"$@\"".into()]);
            out.push(procs.into_os_string());
            out.push(self.ip.clone().into_os_string());
        }
        out.extend(["netns".into(), "exec".into(), ns.into()]);
        out.push(exe.as_os_str().to_owned());
        out.extend(args);
        out
    }

    /// Removes everything now and says what could not be removed.
    pub fn teardown(self) -> Result<(), EmulateError> {
        let left = teardown(&self.made);
        match left.is_empty() {
            true => Ok(()),
            false => Err(EmulateError::Teardown(left.join("; "))),
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let left = teardown(&self.made);
        if !left.is_empty() {
            warn!(
                "could not remove all of the emulated cluster {}: {}",
                self.names.id,
                left.join("; ")
            );
        }
        // After a signal the ranks die and the caller would report that as a failure and
        // exit first; wait instead for the watcher, which exits with the signal's status.
        if INTERRUPTED.load(Ordering::SeqCst) {
            loop {
                std::thread::park();
            }
        }
    }
}

struct Tools {
    ip: PathBuf,
    tc: PathBuf,
    nft: Option<PathBuf>,
}

fn run_step(tools: &Tools, step: &Step) -> Result<(), EmulateError> {
    let program = match step.argv[0].as_str() {
        "tc" => &tools.tc,
        "nft" => tools.nft.as_ref().unwrap_or(&tools.ip),
        _ => &tools.ip,
    };
    // `ip netns exec NS nft` runs nft by name inside the namespace: give its full path.
    let mut args: Vec<String> = step.argv[1..].to_vec();
    if let (Some(pos), Some(nft)) = (args.iter().position(|a| a == "nft"), &tools.nft) {
        args[pos] = nft.display().to_string();
    }
    let command = step.argv.join(" ");
    debug!(%command, "emulate");
    let output =
        run(program, &args, step.stdin.as_deref()).map_err(|detail| EmulateError::Command {
            command: command.clone(),
            detail,
        })?;
    if output.0 {
        return Ok(());
    }
    let detail = output.1;
    if step.netem {
        return Err(EmulateError::NoNetem { detail });
    }
    Err(EmulateError::Command { command, detail })
}

/// Runs `program args`, feeding `stdin`; returns (success, trimmed stderr).
fn run(program: &Path, args: &[String], stdin: Option<&str>) -> Result<(bool, String), String> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|e| format!("cannot feed {}: {e}", program.display()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("cannot wait for {}: {e}", program.display()))?;
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    Ok((out.status.success(), err))
}

fn make_cgroup(dir: &Path, cores: f64) -> Result<(), EmulateError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| EmulateError::Cgroup { path, source }
    };
    std::fs::create_dir(dir).map_err(io(dir))?;
    // The kernel refuses quotas below 1 ms; CpuShare starts at 0.1 core, 1 ms of 10.
    let quota = ((cores * CFS_PERIOD_US as f64).round() as u64).max(1000);
    let period = dir.join("cpu.cfs_period_us");
    std::fs::write(&period, CFS_PERIOD_US.to_string()).map_err(io(&period))?;
    let file = dir.join("cpu.cfs_quota_us");
    std::fs::write(&file, quota.to_string()).map_err(io(&file))
}

/// Kills what runs in the namespaces, deletes them and the cgroups; returns what is left.
fn teardown(made: &Mutex<Made>) -> Vec<String> {
    let mut made = made.lock().unwrap_or_else(|e| e.into_inner());
    made.closed = true;
    let mut left = Vec::new();
    let ip = find_tool("ip", "").ok();
    // Rank namespaces were made after the bridge's: remove them first.
    for ns in made.namespaces.drain(..).rev() {
        let Some(ip) = &ip else {
            left.push(format!("namespace {ns} (no `ip` to delete it)"));
            continue;
        };
        kill_inside(ip, &ns);
        let args = ["netns".to_string(), "del".to_string(), ns.clone()];
        match run(ip, &args, None) {
            Ok((true, _)) => {}
            Ok((false, e)) | Err(e) => left.push(format!("namespace {ns} ({e})")),
        }
    }
    for dir in made.cgroups.drain(..) {
        if let Err(e) = remove_cgroup(&dir) {
            left.push(format!("cgroup {} ({e})", dir.display()));
        }
    }
    left
}

/// Kills, by PID, every process still inside namespace `ns` (all of them started by us).
fn kill_inside(ip: &Path, ns: &str) {
    let args = ["netns".to_string(), "pids".to_string(), ns.to_string()];
    let Ok(out) = Command::new(ip).args(&args).stderr(Stdio::null()).output() else {
        return;
    };
    let pids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|p| p.parse::<u32>().is_ok())
        .map(String::from)
        .collect();
    if pids.is_empty() {
        return;
    }
    warn!(
        namespace = ns,
        ?pids,
        "killing processes left in the emulated cluster"
    );
    let _ = Command::new("/bin/sh")
        .args(["-c", "kill -KILL \"$@\"", "sh"])
        .args(&pids)
        .stderr(Stdio::null())
        .status();
}

/// Removes a cgroup directory, waiting briefly for killed processes to leave it.
fn remove_cgroup(dir: &Path) -> std::io::Result<()> {
    let mut tries = 0;
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if tries >= 50 => return Err(e),
            Err(_) => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Starts, once per process, a thread that removes every live cluster on Ctrl-C or
/// SIGTERM and then exits (130 or 143, as a shell reports death by those signals).
fn watch_signals() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        let spawned = std::thread::Builder::new()
            .name("ringtrain-emulate-signals".into())
            .spawn(signal_thread);
        if let Err(e) = spawned {
            warn!("cannot watch for Ctrl-C ({e}); an interrupted run may leave namespaces");
        }
    });
}

fn signal_thread() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        warn!("cannot watch for Ctrl-C; an interrupted run may leave namespaces");
        return;
    };
    let code = rt.block_on(async {
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return None;
        };
        tokio::select! {
            _ = int.recv() => Some(130),
            _ = term.recv() => Some(143),
        }
    });
    let Some(code) = code else {
        warn!("cannot watch for Ctrl-C; an interrupted run may leave namespaces");
        return;
    };
    INTERRUPTED.store(true, Ordering::SeqCst);
    let live: Vec<Shared> = LIVE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter_map(Weak::upgrade)
        .collect();
    for made in &live {
        let _ = teardown(made);
    }
    eprintln!("interrupted: removed the emulated cluster");
    std::process::exit(code);
}

fn check_root() -> Result<(), EmulateError> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    match effective_uid(&status) {
        Some(0) => Ok(()),
        _ => Err(EmulateError::NotRoot),
    }
}

/// The effective UID from the text of `/proc/self/status`.
pub fn effective_uid(status: &str) -> Option<u32> {
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Whether this process runs as root and `ip` and `tc` are installed.
pub fn available() -> bool {
    check_root().is_ok() && find_tool("ip", "").is_ok() && find_tool("tc", "").is_ok()
}

/// Finds `tool` on PATH or in the usual system directories.
fn find_tool(tool: &'static str, hint: &'static str) -> Result<PathBuf, EmulateError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from);
    std::env::split_paths(&path)
        .chain(extra)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
        .ok_or(EmulateError::ToolMissing { tool, hint })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_in_tc_units_and_print_back() {
        let r: Rate = "1gbit".parse().unwrap();
        assert_eq!(r.bits_per_sec(), 1_000_000_000);
        assert_eq!(r.to_string(), "1gbit");
        assert_eq!("200Mbit".parse::<Rate>().unwrap().to_string(), "200mbit");
        assert_eq!("1.5gbit".parse::<Rate>().unwrap().to_string(), "1500mbit");
        assert_eq!(
            "100mbit/s".parse::<Rate>().unwrap().bits_per_sec(),
            100_000_000
        );
        // tc reads "mbps" as megabytes per second: too easy to get wrong, so refused.
        for bad in ["", "fast", "1gbyte", "-1gbit", "1bit", "0mbit", "100mbps"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn delay_loss_and_cpu_parse_with_their_units() {
        assert_eq!("5ms".parse::<Delay>().unwrap().0, Duration::from_millis(5));
        assert_eq!(
            "250us".parse::<Delay>().unwrap().0,
            Duration::from_micros(250)
        );
        assert!("5".parse::<Delay>().is_err());
        assert!("0ms".parse::<Delay>().is_err());
        assert_eq!("1%".parse::<Loss>().unwrap().0, 0.01);
        assert_eq!("0.002".parse::<Loss>().unwrap().0, 0.002);
        assert!("100%".parse::<Loss>().is_err());
        assert!("x".parse::<Loss>().is_err());
        assert_eq!("0.5".parse::<CpuShare>().unwrap().0, 0.5);
        assert!("0".parse::<CpuShare>().is_err());
        assert!("0.05".parse::<CpuShare>().is_err());
    }

    #[test]
    fn burst_is_at_least_125_kb_and_one_millisecond() {
        let spec = |r: &str| LinkSpec::rate(r.parse().unwrap());
        assert_eq!(spec("200mbit").burst_bytes(), 125_000);
        assert_eq!(spec("1gbit").burst_bytes(), 125_000);
        assert_eq!(spec("10gbit").burst_bytes(), 1_250_000);
        // 20 ms at 1 Gbit/s is 2.5 MB on top of the burst.
        assert_eq!(spec("1gbit").queue_bytes(), 125_000 + 2_500_000);
    }

    #[test]
    fn names_carry_the_pid_and_serial() {
        let n = Names::new(4242, 3);
        assert_eq!(n.bridge_ns(), "ringtrain-4242-3-br");
        assert_eq!(n.rank_ns(7), "ringtrain-4242-3-r7");
        assert_eq!(rank_ip(0), Ipv4Addr::new(10, 77, 0, 1));
        assert_eq!(rank_ip(MAX_RANKS - 1), Ipv4Addr::new(10, 77, 0, 250));
    }

    #[test]
    fn plan_shapes_both_directions_and_creates_every_namespace() {
        let names = Names::new(1, 0);
        let spec = LinkSpec::rate("1gbit".parse().unwrap());
        let steps = plan(&names, 3, &spec);
        let created: Vec<&str> = steps.iter().filter_map(|s| s.creates.as_deref()).collect();
        assert_eq!(
            created,
            [
                "ringtrain-1-0-br",
                "ringtrain-1-0-r0",
                "ringtrain-1-0-r1",
                "ringtrain-1-0-r2"
            ]
        );
        let tbf: Vec<String> = steps
            .iter()
            .filter(|s| s.argv.contains(&"tbf".to_string()))
            .map(|s| s.argv.join(" "))
            .collect();
        assert_eq!(tbf.len(), 6, "{tbf:?}");
        assert!(tbf.contains(
            &"tc -n ringtrain-1-0-r1 qdisc add dev eth0 root tbf rate 1000000000bit burst 125000 \
              limit 2625000"
                .to_string()
        ));
        assert!(
            tbf.iter()
                .any(|s| s.contains("-br qdisc add dev p2 root tbf"))
        );
        assert!(!steps.iter().any(|s| s.netem || s.stdin.is_some()));
        // Every address lives in a rank's namespace; nothing touches the root namespace.
        for s in &steps {
            let joined = s.argv.join(" ");
            if joined.contains("10.77.") {
                assert!(joined.starts_with("ip -n ringtrain-1-0-r"), "{joined}");
            }
            let in_ns = s.argv.get(1).is_some_and(|a| a == "-n" || a == "netns");
            assert!(in_ns, "{joined} runs outside the cluster's namespaces");
        }
    }

    #[test]
    fn plan_puts_netem_under_the_shaper_and_loss_in_nftables() {
        let names = Names::new(1, 0);
        let mut spec = LinkSpec::rate("200mbit".parse().unwrap());
        spec.delay = Some(Duration::from_millis(2));
        spec.loss = Some(0.001);
        spec.mtu = Some(9000);
        let steps = plan(&names, 1, &spec);
        let netem: Vec<&Step> = steps.iter().filter(|s| s.netem).collect();
        assert_eq!(netem.len(), 1);
        assert!(
            netem[0]
                .argv
                .join(" ")
                .ends_with("eth0 root handle 1: netem delay 2000us")
        );
        assert!(
            steps
                .iter()
                .any(|s| s.argv.join(" ").contains("parent 1: handle 10: tbf"))
        );
        let rules = steps.iter().find_map(|s| s.stdin.clone()).unwrap();
        assert!(
            rules.contains("numgen random mod 1000000 < 1000 counter drop"),
            "{rules}"
        );
        let mtus = steps
            .iter()
            .filter(|s| s.argv.contains(&"mtu".into()))
            .count();
        assert_eq!(mtus, 2);
    }

    #[test]
    fn rank_args_join_the_cgroup_before_the_namespace() {
        let names = Names::new(9, 1);
        let cluster = Cluster {
            names,
            ranks: 2,
            spec: LinkSpec::rate(Rate(1_000_000_000)),
            made: Arc::default(),
            sh: Some("/bin/sh".into()),
            ip: "/usr/sbin/ip".into(),
        };
        let args = cluster.rank_args(1, Path::new("/x/ringtrain"), vec!["bench".into()]);
        let args: Vec<String> = args.iter().map(|a| a.to_string_lossy().into()).collect();
        assert_eq!(args[0], "-c");
        assert_eq!(args[2], "/sys/fs/cgroup/cpu/ringtrain-9-1-r1/cgroup.procs");
        assert_eq!(
            &args[3..],
            [
                "/usr/sbin/ip",
                "netns",
                "exec",
                "ringtrain-9-1-r1",
                "/x/ringtrain",
                "bench"
            ]
        );
        assert_eq!(cluster.program(), Path::new("/bin/sh"));
        // Nothing was made, so dropping it has nothing to remove.
    }

    #[test]
    fn effective_uid_is_the_second_uid_field() {
        let status = "Name:\tx\nUid:\t1000\t0\t1000\t1000\nGid:\t0\n";
        assert_eq!(effective_uid(status), Some(0));
        assert_eq!(effective_uid("Name: x\n"), None);
    }
}
