//! The cluster file of parameter-server mode: which address each task of each job has.
//!
//! TensorFlow's `ClusterSpec` names jobs (`ps`, `worker`) and numbers the tasks of each
//! job from 0 in the order they are listed. The file says the same in plain text:
//!
//! ```text
//! # job  address
//! ps     127.0.0.1:7100    # ps task 0
//! ps     127.0.0.1:7101    # ps task 1
//! worker 127.0.0.1:7000    # worker task 0, the chief
//! worker 127.0.0.1:7001    # worker task 1
//! ```
//!
//! Blank lines and `#` comments are ignored; addresses follow the hosts-file rules
//! ([`crate::hosts`]): `HOST:PORT`, IPv6 in brackets, names resolved when loaded, no
//! address twice. Every problem is a [`ClusterError`] that names the file and the line.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::hosts::{Hosts, HostsError};

/// A job of the cluster: what a task does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Job {
    /// A parameter server: holds a share of the variables and applies the updates.
    Ps,
    /// A worker: computes gradients on its shard of the data; worker 0 is the chief.
    Worker,
}

impl Job {
    /// The name used in cluster files and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Job::Ps => "ps",
            Job::Worker => "worker",
        }
    }
}

impl fmt::Display for Job {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A job name that is neither `ps` nor `worker`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown job {0:?}: expected ps or worker")]
pub struct UnknownJob(pub String);

impl FromStr for Job {
    type Err = UnknownJob;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ps" => Ok(Job::Ps),
            "worker" => Ok(Job::Worker),
            other => Err(UnknownJob(other.to_string())),
        }
    }
}

/// One task of the cluster, for messages: `ps task 1 (127.0.0.1:7101)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Task {
    /// Its job.
    pub job: Job,
    /// Its index within the job.
    pub index: usize,
    /// Its address from the cluster file.
    pub addr: SocketAddr,
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} task {} ({})", self.job, self.index, self.addr)
    }
}

/// What can be wrong with a cluster file or with a task chosen from it.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The file could not be read.
    #[error("{}: cannot read the cluster file; check the path given to --hosts", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why reading failed.
        #[source]
        source: std::io::Error,
    },
    /// A line is not `JOB HOST:PORT`.
    #[error(
        "{} line {line}: expected JOB HOST:PORT such as \"ps 10.0.0.1:7100\", got {text:?}",
        .path.display()
    )]
    Malformed {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The offending text.
        text: String,
    },
    /// A line names a job other than `ps` or `worker`.
    #[error("{} line {line}: unknown job {job:?}; the jobs are ps and worker", .path.display())]
    UnknownJob {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The job as written.
        job: String,
    },
    /// An address is unusable (the hosts-file rules apply).
    #[error(transparent)]
    Address(#[from] HostsError),
    /// No task of a job is listed.
    #[error(
        "{}: no {job} lines; parameter-server mode needs at least one `ps HOST:PORT` and \
         one `worker HOST:PORT` line",
        .path.display()
    )]
    Missing {
        /// The file.
        path: PathBuf,
        /// The job without tasks.
        job: Job,
    },
    /// The task index asked for is not listed.
    #[error(
        "{}: there is no {job} task {task}: the file lists {count} {job} line(s), tasks 0 to \
         {}; pass a smaller --task or add lines",
        .path.display(), .count.saturating_sub(1)
    )]
    TaskOutOfRange {
        /// The file.
        path: PathBuf,
        /// The job.
        job: Job,
        /// The index asked for.
        task: usize,
        /// How many tasks the job has.
        count: usize,
    },
}

/// The tasks of a cluster, by job, each in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSpec {
    path: PathBuf,
    ps: Vec<SocketAddr>,
    workers: Vec<SocketAddr>,
}

impl ClusterSpec {
    /// Reads, parses and resolves the cluster file at `path`.
    pub fn load(path: &Path) -> Result<ClusterSpec, ClusterError> {
        let text = std::fs::read_to_string(path).map_err(|source| ClusterError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses cluster-file `text`; `path` only names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<ClusterSpec, ClusterError> {
        // Split every line into its job and its address; hand the addresses, on their
        // original lines, to the hosts-file parser so both files follow the same rules.
        let mut jobs = Vec::new();
        let mut addr_lines = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = strip_comment(raw).trim();
            if line.is_empty() {
                addr_lines.push("");
                continue;
            }
            let malformed = || ClusterError::Malformed {
                path: path.to_path_buf(),
                line: index + 1,
                text: line.to_string(),
            };
            let mut words = line.split_whitespace();
            let (Some(job), Some(addr), None) = (words.next(), words.next(), words.next()) else {
                return Err(malformed());
            };
            let job = job
                .parse::<Job>()
                .map_err(|UnknownJob(job)| ClusterError::UnknownJob {
                    path: path.to_path_buf(),
                    line: index + 1,
                    job,
                })?;
            jobs.push(job);
            addr_lines.push(addr);
        }

        let missing = |job| ClusterError::Missing {
            path: path.to_path_buf(),
            job,
        };
        if jobs.is_empty() {
            return Err(missing(Job::Ps));
        }
        let hosts = Hosts::parse(path, &addr_lines.join("\n"))?;
        let mut spec = ClusterSpec {
            path: path.to_path_buf(),
            ps: Vec::new(),
            workers: Vec::new(),
        };
        for (job, entry) in jobs.into_iter().zip(hosts.entries()) {
            match job {
                Job::Ps => spec.ps.push(entry.addr),
                Job::Worker => spec.workers.push(entry.addr),
            }
        }
        for job in [Job::Ps, Job::Worker] {
            if spec.tasks(job).is_empty() {
                return Err(missing(job));
            }
        }
        Ok(spec)
    }

    /// A cluster of the given addresses, e.g. free local ports picked by the launcher.
    /// The caller supplies at least one of each and no address twice.
    pub fn from_addrs(ps: Vec<SocketAddr>, workers: Vec<SocketAddr>) -> ClusterSpec {
        ClusterSpec {
            path: PathBuf::from("<generated cluster>"),
            ps,
            workers,
        }
    }

    /// The file these tasks came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The addresses of `job`'s tasks, by task index.
    pub fn tasks(&self, job: Job) -> &[SocketAddr] {
        match job {
            Job::Ps => &self.ps,
            Job::Worker => &self.workers,
        }
    }

    /// Number of ps tasks.
    pub fn ps_count(&self) -> usize {
        self.ps.len()
    }

    /// Number of worker tasks.
    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// Task `index` of `job`, or [`ClusterError::TaskOutOfRange`].
    pub fn task(&self, job: Job, index: usize) -> Result<Task, ClusterError> {
        let tasks = self.tasks(job);
        match tasks.get(index) {
            Some(&addr) => Ok(Task { job, index, addr }),
            None => Err(ClusterError::TaskOutOfRange {
                path: self.path.clone(),
                job,
                task: index,
                count: tasks.len(),
            }),
        }
    }

    /// Every task of `job`, by index.
    pub fn all(&self, job: Job) -> Vec<Task> {
        let tasks = self.tasks(job).iter().enumerate();
        tasks
            .map(|(index, &addr)| Task { job, index, addr })
            .collect()
    }

    /// The cluster-file text: ps lines, then worker lines. [`ClusterSpec::parse`] reads it
    /// back to the same tasks.
    pub fn to_file_text(&self) -> String {
        let mut text = String::new();
        for job in [Job::Ps, Job::Worker] {
            for addr in self.tasks(job) {
                text.push_str(&format!("{:<6} {addr}\n", job.name()));
            }
        }
        text
    }
}

/// Whether a line that a hosts file could not read starts with a job name, i.e. the file
/// is probably a cluster file given to a ring rank (which then wants `--job`).
pub fn names_a_job(line: &str) -> bool {
    let first = line.split_whitespace().next().unwrap_or_default();
    first.parse::<Job>().is_ok()
}

/// Cuts a `#` comment that starts the line or follows whitespace (as in hosts files).
fn strip_comment(line: &str) -> &str {
    let mut previous_is_space = true;
    for (index, c) in line.char_indices() {
        if c == '#' && previous_is_space {
            return &line[..index];
        }
        previous_is_space = c.is_whitespace();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ClusterSpec, ClusterError> {
        ClusterSpec::parse(Path::new("cluster.txt"), text)
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn jobs_number_their_tasks_in_file_order() {
        let spec = parse(
            "# a comment\n\nworker 127.0.0.1:7000\nps 127.0.0.1:7100 # first ps\n\
             \tps\t127.0.0.1:7101\r\nworker 127.0.0.1:7001\n",
        )
        .unwrap();
        assert_eq!((spec.ps_count(), spec.worker_count()), (2, 2));
        let ps1 = spec.task(Job::Ps, 1).unwrap();
        assert_eq!(ps1.addr.port(), 7101);
        assert_eq!(ps1.to_string(), "ps task 1 (127.0.0.1:7101)");
        assert_eq!(spec.task(Job::Worker, 0).unwrap().addr.port(), 7000);
        let again = parse(&spec.to_file_text()).unwrap();
        assert_eq!(again.tasks(Job::Ps), spec.tasks(Job::Ps));
        assert_eq!(again.tasks(Job::Worker), spec.tasks(Job::Worker));
    }

    #[test]
    fn every_problem_names_the_file_and_line() {
        let e = err("ps 127.0.0.1:7100\nchief 127.0.0.1:7000\n");
        assert!(
            e.contains("cluster.txt line 2") && e.contains("\"chief\""),
            "{e}"
        );
        let e = err("ps 127.0.0.1:7100\n127.0.0.1:7000\n");
        assert!(e.contains("line 2") && e.contains("JOB HOST:PORT"), "{e}");
        let e = err("ps 127.0.0.1:7100 extra\n");
        assert!(e.contains("line 1"), "{e}");
        let e = err("ps 127.0.0.1:7100\n\nworker 10.0.0.5\n");
        assert!(
            e.contains("cluster.txt line 3") && e.contains("10.0.0.5"),
            "{e}"
        );
        let e = err("ps 127.0.0.1:7100\nworker 127.0.0.1:7100\n");
        assert!(e.contains("line 2") && e.contains("line 1"), "{e}");
    }

    #[test]
    fn both_jobs_are_required() {
        let e = err("worker 127.0.0.1:7000\n");
        assert!(e.contains("no ps lines"), "{e}");
        let e = err("# nothing\nps 127.0.0.1:7100\n");
        assert!(e.contains("no worker lines"), "{e}");
        let e = err("\n# empty\n");
        assert!(e.contains("no ps lines"), "{e}");
    }

    #[test]
    fn a_task_out_of_range_says_what_exists() {
        let spec = parse("ps 127.0.0.1:7100\nworker 127.0.0.1:7000\nworker [::1]:7001\n").unwrap();
        let e = spec.task(Job::Worker, 2).unwrap_err().to_string();
        assert!(
            e.contains("no worker task 2") && e.contains("tasks 0 to 1"),
            "{e}"
        );
        assert!(spec.task(Job::Ps, 1).is_err());
    }

    #[test]
    fn cluster_lines_are_recognised() {
        assert!(names_a_job("ps 127.0.0.1:7100") && names_a_job("worker\t[::1]:7000"));
        assert!(!names_a_job("127.0.0.1:7000") && !names_a_job("") && !names_a_job("chief x"));
    }

    #[test]
    fn job_names_parse_strictly() {
        assert_eq!("ps".parse::<Job>(), Ok(Job::Ps));
        assert_eq!("worker".parse::<Job>(), Ok(Job::Worker));
        let e = "chief".parse::<Job>().unwrap_err().to_string();
        assert!(e.contains("\"chief\"") && e.contains("ps or worker"), "{e}");
    }
}
