//! The hosts file: which address each rank listens on.
//!
//! Rank `N` is the `N`-th address in the file and the world size is the number of
//! addresses. The format is plain text:
//!
//! ```text
//! # comments start with '#', on their own line or after whitespace
//! 10.0.0.1:7000      # rank 0
//! node-2:7000        # host names are resolved when the file is loaded
//! [fd00::3]:7000     # IPv6 addresses go in brackets
//! ```
//!
//! Blank lines are ignored, surrounding whitespace is trimmed and Windows line endings
//! are accepted. Every problem is reported as a [`HostsError`] that names the file and,
//! where there is one, the 1-based line.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

/// The name used in messages for a [`Hosts`] built by [`Hosts::from_addrs`].
const GENERATED: &str = "<generated hosts>";

/// The cluster's addresses: rank N is the N-th address; world size = number of addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hosts {
    /// Where the addresses came from, for error messages.
    path: PathBuf,
    /// One entry per rank, in rank order.
    entries: Vec<HostEntry>,
}

/// One address in the hosts file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostEntry {
    /// 1-based line in the file.
    pub line: usize,
    /// The address as written, e.g. `"node-1:7000"`, without comment or whitespace.
    pub spec: String,
    /// The resolved socket address.
    pub addr: SocketAddr,
}

/// What can be wrong with a hosts file or with a rank chosen from it.
///
/// Messages are short and say what to do. An underlying I/O or resolver error is kept
/// as the [`source`](std::error::Error::source), so print the chain (`{:#}` with
/// `anyhow`) to see it.
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    /// The file could not be read (missing, unreadable, not UTF-8).
    #[error("{}: cannot read hosts file; check the path given to --hosts", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why reading failed.
        #[source]
        source: io::Error,
    },

    /// The file holds no addresses, only blank lines and comments.
    #[error("{}: no addresses; write one HOST:PORT per line", .path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },

    /// A line is not of the form `HOST:PORT`.
    #[error("{} line {line}: expected HOST:PORT, got {text:?}", .path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The offending text.
        text: String,
    },

    /// The port is not a number from 1 to 65535.
    #[error(
        "{} line {line}: bad port {port:?} in {text:?}; use a number from 1 to 65535",
        .path.display()
    )]
    BadPort {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The offending text.
        text: String,
        /// The port as written.
        port: String,
    },

    /// The port is 0, which would mean "any port" and cannot be dialled by peers.
    #[error(
        "{} line {line}: port 0 in {text:?}; every rank needs a fixed port from 1 to 65535",
        .path.display()
    )]
    PortZero {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The offending text.
        text: String,
    },

    /// The host part holds colons but no brackets, or brackets without an IPv6 address.
    #[error(
        "{} line {line}: expected [IPV6]:PORT, got {text:?}; write IPv6 addresses in \
         brackets, as in [::1]:7000",
        .path.display()
    )]
    BadIpv6 {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The offending text.
        text: String,
    },

    /// A host name did not resolve to any address.
    #[error(
        "{} line {line}: cannot resolve host name {host:?}; check the name or write an \
         IP address",
        .path.display()
    )]
    Unresolvable {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The host name as written.
        host: String,
        /// The resolver's error, if it gave one (it may also just return nothing).
        #[source]
        source: Option<io::Error>,
    },

    /// Two lines name the same address, so two ranks would listen on one socket.
    #[error(
        "{} line {line}: address {addr} is already on line {first_line}; give each rank \
         its own HOST:PORT",
        .path.display()
    )]
    Duplicate {
        /// The file.
        path: PathBuf,
        /// 1-based line number of the second occurrence.
        line: usize,
        /// 1-based line number of the first occurrence.
        first_line: usize,
        /// The resolved address both lines share.
        addr: SocketAddr,
    },

    /// The rank asked for is not below the world size.
    #[error(
        "{}: rank {rank} is out of range for world size {world}; pass a rank below \
         {world} or add addresses to the file",
        .path.display()
    )]
    RankOutOfRange {
        /// The file.
        path: PathBuf,
        /// The rank asked for.
        rank: usize,
        /// The number of addresses in the file.
        world: usize,
    },
}

impl Hosts {
    /// Reads, parses and resolves the hosts file at `path`.
    pub fn load(path: &Path) -> Result<Hosts, HostsError> {
        let text = std::fs::read_to_string(path).map_err(|source| HostsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and resolves hosts-file `text`; `path_for_messages` only names it in errors.
    ///
    /// Host names are resolved with [`ToSocketAddrs`], which may block on DNS; the first
    /// IPv4 result is used if there is one, otherwise the first result.
    pub fn parse(path_for_messages: &Path, text: &str) -> Result<Hosts, HostsError> {
        let mut entries = Vec::new();
        let mut seen = HashMap::new();

        for (index, raw) in text.lines().enumerate() {
            let spec = strip_comment(raw).trim();
            if spec.is_empty() {
                continue;
            }
            let at = Where {
                path: path_for_messages,
                line: index + 1,
                spec,
            };
            let addr = parse_spec(&at)?;
            if let Some(&first_line) = seen.get(&addr) {
                return Err(at.duplicate(first_line, addr));
            }
            seen.insert(addr, at.line);
            entries.push(at.entry(addr));
        }

        if entries.is_empty() {
            let path = path_for_messages.to_path_buf();
            return Err(HostsError::Empty { path });
        }
        Ok(Hosts {
            path: path_for_messages.to_path_buf(),
            entries,
        })
    }

    /// Builds hosts from addresses already known, e.g. free ports picked by the launcher.
    ///
    /// Entry `i` gets line `i + 1` and its address as its spec. Duplicates are not
    /// checked: the caller supplies distinct addresses.
    pub fn from_addrs(addrs: Vec<SocketAddr>) -> Hosts {
        let entries = addrs
            .into_iter()
            .enumerate()
            .map(|(index, addr)| HostEntry {
                line: index + 1,
                spec: addr.to_string(),
                addr,
            })
            .collect();
        Hosts {
            path: PathBuf::from(GENERATED),
            entries,
        }
    }

    /// The number of ranks: one per address.
    pub fn world_size(&self) -> usize {
        self.entries.len()
    }

    /// The file these hosts came from (`<generated hosts>` for [`Hosts::from_addrs`]).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All entries, in rank order.
    pub fn entries(&self) -> &[HostEntry] {
        &self.entries
    }

    /// The address of `rank`.
    ///
    /// # Panics
    ///
    /// If `rank >= self.world_size()`; validate a user-given rank with
    /// [`Hosts::check_rank`] first.
    pub fn addr(&self, rank: usize) -> SocketAddr {
        self.entry(rank).addr
    }

    /// The entry of `rank`.
    ///
    /// # Panics
    ///
    /// If `rank >= self.world_size()`; validate a user-given rank with
    /// [`Hosts::check_rank`] first.
    pub fn entry(&self, rank: usize) -> &HostEntry {
        &self.entries[rank]
    }

    /// Err([`HostsError::RankOutOfRange`]) naming the file, the rank and the world size
    /// when `rank >= world`.
    pub fn check_rank(&self, rank: usize) -> Result<(), HostsError> {
        let world = self.world_size();
        if rank < world {
            return Ok(());
        }
        Err(HostsError::RankOutOfRange {
            path: self.path.clone(),
            rank,
            world,
        })
    }

    /// Writes the hosts file format: one resolved `HOST:PORT` per line, IPv6 as
    /// `[addr]:port`. [`Hosts::parse`] reads it back to the same addresses.
    pub fn to_file_text(&self) -> String {
        let mut text = String::new();
        for entry in &self.entries {
            text.push_str(&entry.addr.to_string());
            text.push('\n');
        }
        text
    }
}

/// Cuts a `#` comment that starts the line or follows whitespace.
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

/// Turns one trimmed, comment-free spec into a socket address.
fn parse_spec(at: &Where) -> Result<SocketAddr, HostsError> {
    if at.spec.contains(char::is_whitespace) {
        return Err(at.malformed());
    }
    if let Ok(addr) = at.spec.parse::<SocketAddr>() {
        return match addr.port() {
            0 => Err(at.port_zero()),
            _ => Ok(addr),
        };
    }

    // Not a literal IP address with a good port: find out what is wrong, or resolve.
    let (host, port) = split_host_port(at)?;
    let port = parse_port(at, port)?;
    resolve(at, host, port)
}

/// Splits `HOST:PORT` or `[IPV6]:PORT` into its two parts.
fn split_host_port<'a>(at: &Where<'a>) -> Result<(&'a str, &'a str), HostsError> {
    if let Some(rest) = at.spec.strip_prefix('[') {
        let (host, port) = rest.split_once("]:").ok_or_else(|| at.malformed())?;
        if host.parse::<Ipv6Addr>().is_err() {
            return Err(at.bad_ipv6());
        }
        return Ok((host, port));
    }

    let (host, port) = at.spec.rsplit_once(':').ok_or_else(|| at.malformed())?;
    if host.contains(':') {
        return Err(at.bad_ipv6());
    }
    if host.is_empty() {
        return Err(at.malformed());
    }
    Ok((host, port))
}

/// Parses a port from 1 to 65535.
fn parse_port(at: &Where, port: &str) -> Result<u16, HostsError> {
    match port.parse::<u16>() {
        Ok(0) => Err(at.port_zero()),
        Ok(port) => Ok(port),
        Err(_) => Err(at.bad_port(port)),
    }
}

/// Resolves a host name, preferring the first IPv4 result.
fn resolve(at: &Where, host: &str, port: u16) -> Result<SocketAddr, HostsError> {
    let found: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|source| at.unresolvable(host, Some(source)))?
        .collect();
    let ipv4 = found.iter().find(|addr| addr.is_ipv4());
    ipv4.or(found.first())
        .copied()
        .ok_or_else(|| at.unresolvable(host, None))
}

/// Where a spec sits in the file; builds the errors that point at it.
struct Where<'a> {
    path: &'a Path,
    line: usize,
    spec: &'a str,
}

impl Where<'_> {
    fn entry(&self, addr: SocketAddr) -> HostEntry {
        HostEntry {
            line: self.line,
            spec: self.spec.to_owned(),
            addr,
        }
    }

    fn malformed(&self) -> HostsError {
        HostsError::Malformed {
            path: self.path.to_path_buf(),
            line: self.line,
            text: self.spec.to_owned(),
        }
    }

    fn bad_port(&self, port: &str) -> HostsError {
        HostsError::BadPort {
            path: self.path.to_path_buf(),
            line: self.line,
            text: self.spec.to_owned(),
            port: port.to_owned(),
        }
    }

    fn port_zero(&self) -> HostsError {
        HostsError::PortZero {
            path: self.path.to_path_buf(),
            line: self.line,
            text: self.spec.to_owned(),
        }
    }

    fn bad_ipv6(&self) -> HostsError {
        HostsError::BadIpv6 {
            path: self.path.to_path_buf(),
            line: self.line,
            text: self.spec.to_owned(),
        }
    }

    fn unresolvable(&self, host: &str, source: Option<io::Error>) -> HostsError {
        HostsError::Unresolvable {
            path: self.path.to_path_buf(),
            line: self.line,
            host: host.to_owned(),
            source,
        }
    }

    fn duplicate(&self, first_line: usize, addr: SocketAddr) -> HostsError {
        HostsError::Duplicate {
            path: self.path.to_path_buf(),
            line: self.line,
            first_line,
            addr,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{IpAddr, Ipv4Addr};

    fn parse(text: &str) -> Result<Hosts, HostsError> {
        Hosts::parse(Path::new("hosts.txt"), text)
    }

    fn addrs(hosts: &Hosts) -> Vec<SocketAddr> {
        hosts.entries().iter().map(|entry| entry.addr).collect()
    }

    fn v4(last: u8, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, last)), port)
    }

    #[test]
    fn parses_one_address_per_line_in_rank_order() {
        let hosts = parse("10.0.0.1:7000\n10.0.0.2:7001\n10.0.0.3:7002\n").unwrap();
        assert_eq!(hosts.world_size(), 3);
        assert_eq!(addrs(&hosts), vec![v4(1, 7000), v4(2, 7001), v4(3, 7002)]);
        assert_eq!(hosts.addr(1), v4(2, 7001));
        assert_eq!(hosts.entry(2).line, 3);
        assert_eq!(hosts.entry(2).spec, "10.0.0.3:7002");
    }

    #[test]
    fn skips_blank_lines_comments_and_whitespace() {
        let text = "# cluster\n\n  10.0.0.1:7000   # rank 0\n\t# indented comment\n\
                    10.0.0.2:7000#not-a-comment-without-space\n";
        let err = parse(text).unwrap_err();
        assert!(matches!(err, HostsError::BadPort { line: 5, .. }), "{err}");

        let hosts =
            parse("# cluster\n\n  10.0.0.1:7000   # rank 0\n\t#x\n10.0.0.2:7000\n").unwrap();
        assert_eq!(addrs(&hosts), vec![v4(1, 7000), v4(2, 7000)]);
        assert_eq!(hosts.entry(0).line, 3);
        assert_eq!(hosts.entry(0).spec, "10.0.0.1:7000");
        assert_eq!(hosts.entry(1).line, 5);
    }

    #[test]
    fn accepts_windows_line_endings() {
        let hosts = parse("# header\r\n10.0.0.1:7000\r\n\r\n10.0.0.2:7000 # two\r\n").unwrap();
        assert_eq!(addrs(&hosts), vec![v4(1, 7000), v4(2, 7000)]);
        assert_eq!(hosts.entry(1).spec, "10.0.0.2:7000");
    }

    #[test]
    fn accepts_bracketed_ipv6() {
        let hosts = parse("[::1]:7000\n[fd00::3]:7001\n").unwrap();
        assert_eq!(hosts.addr(0), "[::1]:7000".parse().unwrap());
        assert_eq!(hosts.addr(1), "[fd00::3]:7001".parse().unwrap());
    }

    #[test]
    fn rejects_ipv6_without_brackets() {
        for text in ["::1:7000", "fd00::3", "[not-ipv6]:7000"] {
            let err = parse(text).unwrap_err();
            assert!(
                matches!(err, HostsError::BadIpv6 { line: 1, .. }),
                "{text}: {err}"
            );
            assert!(err.to_string().contains("[::1]:7000"), "{err}");
        }
    }

    #[test]
    fn resolves_localhost_preferring_ipv4() {
        let hosts = parse("localhost:7000\n").unwrap();
        let addr = hosts.addr(0);
        assert!(addr.ip().is_loopback(), "{addr}");
        assert_eq!(addr.port(), 7000);
        assert_eq!(hosts.entry(0).spec, "localhost:7000");
        let has_ipv4 = ("localhost", 7000)
            .to_socket_addrs()
            .unwrap()
            .any(|a| a.is_ipv4());
        assert_eq!(addr.is_ipv4(), has_ipv4);
    }

    #[test]
    fn empty_and_comment_only_files_have_no_addresses() {
        for text in ["", "\n\n", "# only a comment\n   # another\n"] {
            let err = parse(text).unwrap_err();
            assert!(matches!(err, HostsError::Empty { .. }), "{err}");
            assert_eq!(
                err.to_string(),
                "hosts.txt: no addresses; write one HOST:PORT per line"
            );
        }
    }

    #[test]
    fn malformed_line_names_file_line_and_text() {
        let err = parse("10.0.0.1:7000\n10.0.0.2:7000\n10.0.0.5\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "hosts.txt line 3: expected HOST:PORT, got \"10.0.0.5\""
        );
        for text in [":7000", "10.0.0.1 7000", "[::1]", "10.0.0.1:7000 extra"] {
            let err = parse(text).unwrap_err();
            assert!(
                matches!(err, HostsError::Malformed { line: 1, .. }),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn rejects_bad_ports() {
        for (text, port) in [("10.0.0.1:70000", "70000"), ("node:x", "x"), ("[::1]:", "")] {
            match parse(text).unwrap_err() {
                HostsError::BadPort {
                    line: 1, port: got, ..
                } => assert_eq!(got, port),
                err => panic!("{text}: unexpected error {err}"),
            }
        }
        let err = parse("10.0.0.1:7000\n10.0.0.1:-1\n").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("hosts.txt line 2: bad port \"-1\""),
            "{err}"
        );
    }

    #[test]
    fn rejects_port_zero() {
        for text in ["10.0.0.1:0", "[::1]:0", "localhost:0"] {
            let err = parse(text).unwrap_err();
            assert!(
                matches!(err, HostsError::PortZero { line: 1, .. }),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn unresolvable_host_names_line_and_name() {
        let err = parse("10.0.0.1:7000\nno-such-host.invalid:7000\n").unwrap_err();
        assert!(
            matches!(&err, HostsError::Unresolvable { line: 2, host, .. }
                if host == "no-such-host.invalid"),
            "{err}"
        );
        let message = err.to_string();
        assert!(
            message.starts_with("hosts.txt line 2: cannot resolve"),
            "{message}"
        );
        assert!(message.contains("\"no-such-host.invalid\""), "{message}");
    }

    #[test]
    fn duplicate_address_names_both_lines() {
        let err = parse("10.0.0.1:7000\n# gap\n10.0.0.2:7000\n10.0.0.1:7000\n").unwrap_err();
        assert!(
            matches!(
                err,
                HostsError::Duplicate {
                    line: 4,
                    first_line: 1,
                    ..
                }
            ),
            "{err}"
        );
        let message = err.to_string();
        assert!(
            message.contains("line 4") && message.contains("line 1"),
            "{message}"
        );
    }

    #[test]
    fn duplicate_detection_compares_resolved_addresses() {
        let err = parse("127.0.0.1:7000\nlocalhost:7000\n").unwrap_err();
        assert!(
            matches!(
                err,
                HostsError::Duplicate {
                    line: 2,
                    first_line: 1,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn check_rank_names_file_rank_and_world() {
        let hosts = parse("10.0.0.1:7000\n10.0.0.2:7000\n").unwrap();
        assert!(hosts.check_rank(0).is_ok());
        assert!(hosts.check_rank(1).is_ok());
        let err = hosts.check_rank(2).unwrap_err();
        assert!(matches!(
            err,
            HostsError::RankOutOfRange {
                rank: 2,
                world: 2,
                ..
            }
        ));
        let message = err.to_string();
        assert!(message.starts_with("hosts.txt: rank 2 "), "{message}");
        assert!(message.contains("world size 2"), "{message}");
    }

    #[test]
    fn load_reads_a_file_and_reports_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hosts.txt");
        std::fs::write(&path, "10.0.0.1:7000\n").unwrap();
        assert_eq!(addrs(&Hosts::load(&path).unwrap()), vec![v4(1, 7000)]);
        assert_eq!(Hosts::load(&path).unwrap().path(), path.as_path());

        let missing = dir.path().join("missing.txt");
        let err = Hosts::load(&missing).unwrap_err();
        let HostsError::Read { path, source } = &err else {
            panic!("unexpected error {err}");
        };
        assert_eq!(path, &missing);
        assert_eq!(source.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("missing.txt"), "{err}");
    }

    #[test]
    fn example_hosts_file_in_repo_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("hosts.txt");
        let hosts = Hosts::load(&path).unwrap();
        assert_eq!(hosts.world_size(), 4);
        let local = |port| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        assert_eq!(addrs(&hosts), (7000..7004).map(local).collect::<Vec<_>>());
    }

    #[test]
    fn from_addrs_keeps_order_and_names_generated_source() {
        let hosts = Hosts::from_addrs(vec![v4(1, 1), v4(2, 2)]);
        assert_eq!(hosts.world_size(), 2);
        assert_eq!(hosts.entry(1).line, 2);
        assert_eq!(hosts.to_file_text(), "10.0.0.1:1\n10.0.0.2:2\n");
        let message = hosts.check_rank(5).unwrap_err().to_string();
        assert!(
            message.starts_with("<generated hosts>: rank 5"),
            "{message}"
        );
    }

    fn socket_addr() -> impl Strategy<Value = SocketAddr> {
        let ip = prop_oneof![
            any::<[u8; 4]>().prop_map(IpAddr::from),
            any::<[u16; 8]>().prop_map(IpAddr::from),
        ];
        (ip, 1..=u16::MAX).prop_map(|(ip, port)| SocketAddr::new(ip, port))
    }

    proptest! {
        #[test]
        fn to_file_text_round_trips_through_parse(
            set in prop::collection::hash_set(socket_addr(), 1..16)
        ) {
            let original: Vec<SocketAddr> = set.into_iter().collect();
            let text = Hosts::from_addrs(original.clone()).to_file_text();
            let parsed = parse(&text).unwrap();
            prop_assert_eq!(addrs(&parsed), original);
        }
    }
}
