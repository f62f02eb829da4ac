//! Which rank this process is, when a launcher (srun, mpirun, torchrun, a Kubernetes
//! StatefulSet) started it rather than a person typing `--rank`.
//!
//! Everything here is a pure function of an environment map and a host name, so tests
//! never touch the process environment; [`process_env`] and [`system_hostname`] read the
//! real ones for the binary.
//!
//! # Where the rank comes from
//!
//! 1. `--rank N` or `--rank-from-hostname` (at most one of them) when given;
//! 2. otherwise the first launcher in [`LAUNCHERS`] whose rank variable is set.
//!
//! [`LAUNCHERS`] is ordered from the innermost launcher to the outermost: a process that
//! `mpirun` (or `mpiexec`, or `torchrun`) starts inside a Slurm allocation also inherits
//! the allocation's `SLURM_PROCID` (0 in a batch script), and only the inner launcher's
//! variable is right. A variable set to the empty string counts as unset.
//!
//! When an explicit rank is given *and* a launcher variable is set, they must agree: a
//! disagreement is an error rather than a silent choice, because a wrong rank stalls or
//! mislabels the whole ring. Whenever a launcher variable is used or checked, its world
//! size must equal the number of addresses in the hosts file.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// An environment: variable name to value.
pub type EnvMap = BTreeMap<String, String>;

/// The pair of variables through which one launcher passes rank and world size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LauncherVars {
    /// Who sets them, for messages.
    pub launcher: &'static str,
    /// The rank variable, `0 .. world`.
    pub rank: &'static str,
    /// The world size variable.
    pub size: &'static str,
}

/// The launchers recognised, in the order they are tried (innermost launcher first).
pub const LAUNCHERS: [LauncherVars; 4] = [
    LauncherVars {
        launcher: "Open MPI's mpirun",
        rank: "OMPI_COMM_WORLD_RANK",
        size: "OMPI_COMM_WORLD_SIZE",
    },
    LauncherVars {
        launcher: "MPICH/Intel MPI's mpiexec (PMI)",
        rank: "PMI_RANK",
        size: "PMI_SIZE",
    },
    LauncherVars {
        launcher: "torchrun",
        rank: "RANK",
        size: "WORLD_SIZE",
    },
    LauncherVars {
        launcher: "Slurm's srun",
        rank: "SLURM_PROCID",
        size: "SLURM_NTASKS",
    },
];

/// A rank and world size read from a launcher's variables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnvRank {
    /// The rank.
    pub rank: usize,
    /// The world size the launcher announced.
    pub world: usize,
    /// The variables they came from.
    pub vars: LauncherVars,
}

/// How the rank was asked for on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RankRequest {
    /// Neither `--rank` nor `--rank-from-hostname`: ask the launcher's environment.
    #[default]
    FromEnv,
    /// `--rank N`.
    Flag(usize),
    /// `--rank-from-hostname`.
    Hostname,
}

/// Where the rank in use came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RankSource {
    /// `--rank N`.
    Flag,
    /// The StatefulSet ordinal at the end of this host name.
    Hostname(String),
    /// A launcher's variables.
    Launcher(LauncherVars),
}

impl fmt::Display for RankSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RankSource::Flag => f.write_str("--rank"),
            RankSource::Hostname(h) => write!(f, "the ordinal of host name {h:?}"),
            RankSource::Launcher(v) => write!(f, "{}/{} ({})", v.rank, v.size, v.launcher),
        }
    }
}

/// The rank this process takes, where it came from, and the launcher variables that agreed
/// with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedRank {
    /// The rank.
    pub rank: usize,
    /// Where it came from.
    pub source: RankSource,
    /// The launcher variables that were set, if any (the source itself, or ones that were
    /// checked against `--rank` / the host name).
    pub env: Option<EnvRank>,
}

/// Why no usable rank could be found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LaunchEnvError {
    /// No flag, no launcher variable.
    #[error(
        "no rank: pass --rank N (this process's line in {}, from 0), start under a launcher \
         that sets one of {}, or pass --rank-from-hostname on a Kubernetes StatefulSet",
        .hosts.display(),
        rank_var_list()
    )]
    NoRank {
        /// The hosts file, for the message.
        hosts: PathBuf,
    },
    /// A launcher variable is not a number.
    #[error("{var}={value:?} is not a non-negative integer; fix or unset it")]
    NotANumber {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
    },
    /// The rank variable is set but its world-size partner is not.
    #[error(
        "{rank_var} is set but {size_var} is not; {launcher} sets both, so set both or neither"
    )]
    HalfSet {
        /// The rank variable.
        rank_var: &'static str,
        /// The missing world-size variable.
        size_var: &'static str,
        /// Who should have set them.
        launcher: &'static str,
    },
    /// The launcher's rank is not below its own world size.
    #[error(
        "{rank_var}={rank} is not below {size_var}={world}; the launcher's variables are inconsistent"
    )]
    RankNotBelowSize {
        /// The rank variable.
        rank_var: &'static str,
        /// Its value.
        rank: usize,
        /// The world-size variable.
        size_var: &'static str,
        /// Its value.
        world: usize,
    },
    /// `--rank` or the host name says one rank and the launcher another.
    #[error(
        "{given_by} says rank {explicit} but {var}={env} ({launcher}); drop {given_by} to use \
         the launcher's rank, or unset {var}"
    )]
    Conflict {
        /// `--rank` or the host name, in words.
        given_by: String,
        /// The rank it gave.
        explicit: usize,
        /// The launcher's rank variable.
        var: &'static str,
        /// Its value.
        env: usize,
        /// Which launcher.
        launcher: &'static str,
    },
    /// The launcher's world size differs from the hosts file's.
    #[error(
        "{var}={world} ({launcher}) but {} lists {listed} addresses; start as many \
         processes as the hosts file has lines, or fix the hosts file",
        .hosts.display()
    )]
    WorldMismatch {
        /// The world-size variable.
        var: &'static str,
        /// Its value.
        world: usize,
        /// Which launcher.
        launcher: &'static str,
        /// The hosts file.
        hosts: PathBuf,
        /// How many addresses it lists.
        listed: usize,
    },
    /// `--rank-from-hostname` but the host name has no `-N` ending.
    #[error(
        "--rank-from-hostname: host name {host:?} does not end in -N (a StatefulSet pod is \
         named NAME-0, NAME-1, ...); pass --rank N instead"
    )]
    NoOrdinal {
        /// The host name.
        host: String,
    },
    /// `--rank-from-hostname` but the host name could not be found.
    #[error(
        "--rank-from-hostname: cannot find this machine's host name (HOSTNAME is unset and \
         {} is unreadable); set HOSTNAME or pass --rank N",
        .tried.display()
    )]
    NoHostname {
        /// The last file tried.
        tried: PathBuf,
    },
    /// The rank is not a line of the hosts file.
    #[error("rank {rank} from {from} is not below the {listed} addresses of {}", .hosts.display())]
    OutOfRange {
        /// The rank.
        rank: usize,
        /// Where it came from, in words.
        from: String,
        /// How many addresses the hosts file lists.
        listed: usize,
        /// The hosts file.
        hosts: PathBuf,
    },
}

fn rank_var_list() -> String {
    let names: Vec<&str> = LAUNCHERS.iter().map(|v| v.rank).collect();
    names.join(", ")
}

/// The value of `name` in `env`, treating an empty value as unset.
fn get<'a>(env: &'a EnvMap, name: &str) -> Option<&'a str> {
    env.get(name).map(String::as_str).filter(|v| !v.is_empty())
}

fn number(var: &'static str, value: &str) -> Result<usize, LaunchEnvError> {
    value
        .trim()
        .parse()
        .map_err(|_| LaunchEnvError::NotANumber {
            var,
            value: value.to_string(),
        })
}

/// The first launcher in [`LAUNCHERS`] whose rank variable is set, read and checked.
///
/// `Ok(None)` when no launcher's rank variable is set. A rank variable without its world
/// size, a value that is not a number, or a rank not below the world size is an error.
pub fn env_rank(env: &EnvMap) -> Result<Option<EnvRank>, LaunchEnvError> {
    let Some(vars) = LAUNCHERS.iter().find(|v| get(env, v.rank).is_some()) else {
        return Ok(None);
    };
    let rank = number(vars.rank, get(env, vars.rank).unwrap_or_default())?;
    let Some(size) = get(env, vars.size) else {
        return Err(LaunchEnvError::HalfSet {
            rank_var: vars.rank,
            size_var: vars.size,
            launcher: vars.launcher,
        });
    };
    let world = number(vars.size, size)?;
    if rank >= world {
        return Err(LaunchEnvError::RankNotBelowSize {
            rank_var: vars.rank,
            rank,
            size_var: vars.size,
            world,
        });
    }
    Ok(Some(EnvRank {
        rank,
        world,
        vars: *vars,
    }))
}

/// The StatefulSet ordinal of a host name: the number after the last `-` of its first
/// DNS label, so `trainer-3` and `trainer-3.trainer.default.svc.cluster.local` give 3.
pub fn hostname_ordinal(host: &str) -> Result<usize, LaunchEnvError> {
    let label = host.trim().split('.').next().unwrap_or_default();
    let digits = label.rsplit_once('-').map(|(_, d)| d).unwrap_or_default();
    let all_digits = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
    match digits.parse() {
        Ok(n) if all_digits => Ok(n),
        _ => Err(LaunchEnvError::NoOrdinal {
            host: host.trim().to_string(),
        }),
    }
}

/// Decides this process's rank from the request, the environment and the host name
/// (needed only for [`RankRequest::Hostname`]), and checks it against the hosts file's
/// `listed` addresses. See the [module docs](self) for the rules.
pub fn resolve(
    request: RankRequest,
    env: &EnvMap,
    hostname: Option<&str>,
    hosts: &Path,
    listed: usize,
) -> Result<ResolvedRank, LaunchEnvError> {
    let from_env = env_rank(env)?;
    let explicit = match request {
        RankRequest::FromEnv => None,
        RankRequest::Flag(r) => Some((r, RankSource::Flag)),
        RankRequest::Hostname => {
            let Some(host) = hostname else {
                return Err(LaunchEnvError::NoHostname {
                    tried: PathBuf::from("/etc/hostname"),
                });
            };
            Some((
                hostname_ordinal(host)?,
                RankSource::Hostname(host.trim().into()),
            ))
        }
    };
    let (rank, source) = match (explicit, from_env) {
        (Some((r, source)), Some(e)) if r != e.rank => {
            return Err(LaunchEnvError::Conflict {
                given_by: source.to_string(),
                explicit: r,
                var: e.vars.rank,
                env: e.rank,
                launcher: e.vars.launcher,
            });
        }
        (Some(explicit), _) => explicit,
        (None, Some(e)) => (e.rank, RankSource::Launcher(e.vars)),
        (None, None) => {
            return Err(LaunchEnvError::NoRank {
                hosts: hosts.to_path_buf(),
            });
        }
    };
    if let Some(e) = from_env
        && e.world != listed
    {
        return Err(LaunchEnvError::WorldMismatch {
            var: e.vars.size,
            world: e.world,
            launcher: e.vars.launcher,
            hosts: hosts.to_path_buf(),
            listed,
        });
    }
    if rank >= listed {
        return Err(LaunchEnvError::OutOfRange {
            rank,
            from: source.to_string(),
            listed,
            hosts: hosts.to_path_buf(),
        });
    }
    Ok(ResolvedRank {
        rank,
        source,
        env: from_env,
    })
}

/// The process's environment as an [`EnvMap`] (variables that are not UTF-8 are left out).
pub fn process_env() -> EnvMap {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect()
}

/// This machine's host name: `HOSTNAME` from `env` when set (Kubernetes sets it to the
/// pod name), else the kernel's (`/proc/sys/kernel/hostname`), else `/etc/hostname`.
pub fn system_hostname(env: &EnvMap) -> Option<String> {
    if let Some(h) = get(env, "HOSTNAME") {
        return Some(h.to_string());
    }
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_string())
        .find(|s| !s.is_empty())
}

/// Every launcher variable set to the empty string, which [`env_rank`] reads as unset:
/// the environment `ringtrain launch` gives its children, which get `--rank` from it and
/// must not inherit an outer launcher's rank.
pub fn cleared_vars() -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
    LAUNCHERS
        .iter()
        .flat_map(|v| [v.rank, v.size])
        .map(|name| (name.into(), std::ffi::OsString::new()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> EnvMap {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn resolve_env(pairs: &[(&str, &str)], listed: usize) -> Result<ResolvedRank, LaunchEnvError> {
        resolve(
            RankRequest::FromEnv,
            &env(pairs),
            None,
            Path::new("h.txt"),
            listed,
        )
    }

    #[test]
    fn each_launchers_variables_give_the_rank() {
        for vars in LAUNCHERS {
            let got = resolve_env(&[(vars.rank, "2"), (vars.size, "4")], 4).unwrap();
            assert_eq!(got.rank, 2, "{vars:?}");
            assert_eq!(got.source, RankSource::Launcher(vars));
            assert!(got.source.to_string().contains(vars.rank));
        }
    }

    #[test]
    fn the_innermost_launcher_wins() {
        // mpirun inside an sbatch script: Slurm's batch step says 0 for every process.
        let pairs = [
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
            ("OMPI_COMM_WORLD_RANK", "3"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
        ];
        let got = resolve_env(&pairs, 4).unwrap();
        assert_eq!(got.rank, 3);
        assert_eq!(got.env.unwrap().vars.rank, "OMPI_COMM_WORLD_RANK");
        let pairs = [
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("PMI_RANK", "0"),
            ("PMI_SIZE", "2"),
        ];
        assert_eq!(resolve_env(&pairs, 2).unwrap().rank, 0);
    }

    #[test]
    fn empty_variables_count_as_unset() {
        let pairs = [
            ("OMPI_COMM_WORLD_RANK", ""),
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "2"),
        ];
        assert_eq!(resolve_env(&pairs, 2).unwrap().rank, 1);
        let cleared: Vec<(String, String)> = cleared_vars()
            .into_iter()
            .map(|(k, v)| (k.into_string().unwrap(), v.into_string().unwrap()))
            .collect();
        let mut e: EnvMap = cleared.into_iter().collect();
        assert_eq!(env_rank(&e).unwrap(), None);
        e.insert("OTHER".into(), "1".into());
        let err = resolve(RankRequest::FromEnv, &e, None, Path::new("h.txt"), 2).unwrap_err();
        assert!(matches!(err, LaunchEnvError::NoRank { .. }), "{err}");
        assert!(err.to_string().contains("--rank N"), "{err}");
    }

    #[test]
    fn bad_launcher_values_are_named() {
        let err = resolve_env(&[("PMI_RANK", "x1"), ("PMI_SIZE", "2")], 2).unwrap_err();
        assert!(err.to_string().contains("PMI_RANK=\"x1\""), "{err}");
        let err = resolve_env(&[("RANK", "0")], 2).unwrap_err();
        assert!(err.to_string().contains("WORLD_SIZE is not"), "{err}");
        let err = resolve_env(&[("SLURM_PROCID", "2"), ("SLURM_NTASKS", "2")], 2).unwrap_err();
        assert!(
            err.to_string().contains("not below SLURM_NTASKS=2"),
            "{err}"
        );
    }

    #[test]
    fn a_world_size_other_than_the_hosts_file_is_an_error() {
        let err = resolve_env(&[("SLURM_PROCID", "1"), ("SLURM_NTASKS", "3")], 2).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("SLURM_NTASKS=3") && msg.contains("h.txt lists 2"),
            "{msg}"
        );
        // Also when --rank agrees with the launcher.
        let e = env(&[("RANK", "1"), ("WORLD_SIZE", "3")]);
        let err = resolve(RankRequest::Flag(1), &e, None, Path::new("h.txt"), 2).unwrap_err();
        assert!(matches!(err, LaunchEnvError::WorldMismatch { .. }), "{err}");
    }

    #[test]
    fn rank_flag_conflicting_with_the_launcher_is_an_error() {
        let e = env(&[("OMPI_COMM_WORLD_RANK", "2"), ("OMPI_COMM_WORLD_SIZE", "4")]);
        let err = resolve(RankRequest::Flag(1), &e, None, Path::new("h"), 4).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("--rank says rank 1 but OMPI_COMM_WORLD_RANK=2"),
            "{msg}"
        );
        let agreed = resolve(RankRequest::Flag(2), &e, None, Path::new("h"), 4).unwrap();
        assert_eq!((agreed.rank, agreed.source), (2, RankSource::Flag));
        let alone = resolve(
            RankRequest::Flag(3),
            &EnvMap::new(),
            None,
            Path::new("h"),
            4,
        );
        assert_eq!(alone.unwrap().env, None);
    }

    #[test]
    fn hostname_ordinals() {
        assert_eq!(hostname_ordinal("trainer-3").unwrap(), 3);
        assert_eq!(hostname_ordinal("my-train-job-12\n").unwrap(), 12);
        let fqdn = "ring-0.ring.default.svc.cluster.local";
        assert_eq!(hostname_ordinal(fqdn).unwrap(), 0);
        for bad in ["trainer", "trainer-", "trainer-x", "trainer-+1", "", "a-1b"] {
            let err = hostname_ordinal(bad).unwrap_err();
            assert!(
                err.to_string().contains("does not end in -N"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn rank_from_hostname_is_checked_against_hosts_and_env() {
        let none = EnvMap::new();
        let req = RankRequest::Hostname;
        let got = resolve(req, &none, Some("ring-1"), Path::new("h"), 2).unwrap();
        assert_eq!(
            (got.rank, got.source),
            (1, RankSource::Hostname("ring-1".into()))
        );
        let err = resolve(req, &none, Some("ring-5"), Path::new("h"), 2).unwrap_err();
        assert!(err.to_string().contains("rank 5 from the ordinal"), "{err}");
        let e = env(&[("RANK", "0"), ("WORLD_SIZE", "2")]);
        let err = resolve(req, &e, Some("ring-1"), Path::new("h"), 2).unwrap_err();
        assert!(matches!(err, LaunchEnvError::Conflict { .. }), "{err}");
        let err = resolve(req, &none, None, Path::new("h"), 2).unwrap_err();
        assert!(matches!(err, LaunchEnvError::NoHostname { .. }), "{err}");
    }

    #[test]
    fn hostname_comes_from_the_env_map_first() {
        let e = env(&[("HOSTNAME", "pod-7")]);
        assert_eq!(system_hostname(&e).as_deref(), Some("pod-7"));
    }
}
