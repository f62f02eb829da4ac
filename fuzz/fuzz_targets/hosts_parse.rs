//! The hosts-file parser on arbitrary text: it never panics, and a file it accepts writes
//! back out (`to_file_text`) as a file that parses to the same addresses.
//!
//! `Hosts::parse` resolves host names, which may ask DNS. Inputs that name a host other
//! than an IP literal or `localhost` on a line the parser would resolve are skipped, so a
//! fuzzing run sends nothing to the network and stays fast.

#![no_main]

use std::net::IpAddr;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use ringtrain::hosts::Hosts;

/// Whether parsing `text` could look a name up: mirrors the parser's comment and
/// `HOST:PORT` rules, erring towards `true`.
fn could_ask_dns(text: &str) -> bool {
    text.lines().any(|line| {
        let spec = strip_comment(line).trim();
        let Some((host, port)) = spec.rsplit_once(':') else {
            return false;
        };
        let literal = host.parse::<IpAddr>().is_ok()
            || host.starts_with('[')
            || host.contains(':')
            || host.is_empty()
            || host.contains(char::is_whitespace)
            || host == "localhost";
        !literal && port.parse::<u16>().is_ok_and(|p| p != 0)
    })
}

/// The parser's comment rule: `#` at the start of a line or after whitespace.
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

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if could_ask_dns(text) {
        return;
    }
    let path = Path::new("fuzz-hosts.txt");
    let Ok(hosts) = Hosts::parse(path, text) else {
        return;
    };
    assert!(hosts.world_size() >= 1);
    let again = Hosts::parse(path, &hosts.to_file_text()).expect("written hosts parse");
    let addrs = |h: &Hosts| (0..h.world_size()).map(|r| h.addr(r)).collect::<Vec<_>>();
    assert_eq!(addrs(&again), addrs(&hosts));
});
