//! `--config train.toml`: training flags from a file, and `--print-config`.
//!
//! The file's keys are the long names of the training flags (`batch-size = 64`,
//! `hidden = [128, 64]`, `optimizer = "adam"`, `quiet = true`), and a file behaves as if its
//! keys had been written as flags after the command line's, for the flags that the command
//! line does not give: a flag on the command line (or its environment variable, such as
//! `RINGTRAIN_KEY`) wins over the file, and the file wins over the built-in default. Keys are
//! checked against the flags that the command itself defines, so every training flag,
//! including ones added later, can be set here without this module knowing about it.
//!
//! Values: a string, number or boolean is the flag's value as typed on the command line
//! (`true` turns a switch such as `quiet` on, `false` leaves it off); an array is joined
//! with commas (`[128, 64]` is `128,64`, `[]` is the empty list). Relative paths are
//! relative to the current directory, as for flags. An unknown key, a key that is not a
//! training setting (`rank`, which differs per process) or a bad value is an error naming
//! the file and the key. Under `launch`, keys that only a rank uses (`hosts`,
//! `rank-from-hostname`) are ignored: the launcher writes its own hosts file.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches};

use crate::cli::Cli;

/// The flags about the configuration itself, shared by `train` and `launch`.
#[derive(Debug, Clone, PartialEq, Eq, Default, clap::Args)]
pub struct ConfigArgs {
    /// Read training settings from this TOML file (keys are flag names); flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration as TOML (flag > --config file > default) and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// Flags that a configuration file cannot set, and why.
const NOT_IN_FILE: [(&str, &str); 5] = [
    (
        "rank",
        "each process has its own rank; pass --rank N, let the launcher's environment \
         say it, or set rank-from-hostname = true",
    ),
    ("config", "a configuration file cannot name another one"),
    ("print-config", "it is a command-line action"),
    ("help", "it is a command-line action"),
    ("version", "it is a command-line action"),
];

/// Why the configuration file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the configuration file {}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("{} is not valid TOML: {message}", .path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A key that is no flag.
    #[error("{}: unknown key {key:?}{hint}; keys are the long flag names of `ringtrain train --help`", .path.display())]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// A suggestion, or empty.
        hint: String,
    },
    /// A flag that cannot come from a file.
    #[error("{}: key {key:?} cannot be set in a configuration file: {why}", .path.display())]
    NotInFile {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// Why not.
        why: &'static str,
    },
    /// A value of the wrong TOML type.
    #[error("{}: key {key:?}: {detail}", .path.display())]
    BadType {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What was expected.
        detail: String,
    },
    /// The flag parser refused a value from the file.
    #[error("{}: {message}; fix the value in the file or override it with the flag", .path.display())]
    BadValue {
        /// The file.
        path: PathBuf,
        /// The flag parser's message.
        message: String,
    },
}

/// Why the command line could not be turned into a [`Cli`].
#[derive(Debug)]
pub enum ParseError {
    /// The command line itself is wrong, or asks for help or the version: clap's own
    /// error, to be shown with [`clap::Error::exit`].
    Clap(clap::Error),
    /// The configuration file is wrong.
    Config(ConfigError),
}

/// The parsed command line with its configuration file applied.
#[derive(Debug)]
pub struct Parsed {
    /// The flags, file values included.
    pub cli: Cli,
    /// The configuration file used, if any.
    pub file: Option<PathBuf>,
    /// Long names of the flags whose value came from the file.
    pub from_file: BTreeSet<String>,
    /// Keys of the file that this command does not use (`hosts` under `launch`).
    pub ignored: Vec<String>,
    matches: ArgMatches,
}

/// Parses `argv` (program name first), reading the `--config` file if one is named.
pub fn parse<I, T>(argv: I) -> Result<Parsed, ParseError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
    let first = Cli::command()
        .try_get_matches_from(&argv)
        .map_err(ParseError::Clap)?;
    let (sub, given) = command_matches(&first);
    // Subcommands without a --config flag (keygen) have nothing to read.
    let path = given
        .try_get_one::<PathBuf>("config")
        .ok()
        .flatten()
        .cloned();
    let Some(path) = path else {
        let cli = Cli::from_arg_matches(&first).map_err(ParseError::Clap)?;
        return Ok(Parsed {
            cli,
            file: None,
            from_file: BTreeSet::new(),
            ignored: Vec::new(),
            matches: first,
        });
    };
    let table = load(&path).map_err(ParseError::Config)?;
    let plan = file_args(&path, &table, sub, given).map_err(ParseError::Config)?;

    let mut all = argv.clone();
    all.extend(plan.args);
    let bad_value = |e: clap::Error| {
        ParseError::Config(ConfigError::BadValue {
            path: path.clone(),
            message: first_line(&e),
        })
    };
    let matches = Cli::command()
        .try_get_matches_from(all)
        .map_err(bad_value)?;
    let cli = Cli::from_arg_matches(&matches).map_err(bad_value)?;
    Ok(Parsed {
        cli,
        file: Some(path),
        from_file: plan.from_file,
        ignored: plan.ignored,
        matches,
    })
}

/// clap's message without its `error: ` prefix and usage lines.
fn first_line(e: &clap::Error) -> String {
    let text = e.to_string();
    let line = text.lines().next().unwrap_or_default();
    line.trim_start_matches("error: ").to_string()
}

/// The subcommand's name (`None` for the default, training) and its matches.
fn command_matches(m: &ArgMatches) -> (Option<&str>, &ArgMatches) {
    match m.subcommand() {
        Some((name, sub)) => (Some(name), sub),
        None => (None, m),
    }
}

/// The clap command that parsed `sub`'s flags.
fn command_for(sub: Option<&str>) -> clap::Command {
    let mut root = Cli::command();
    root.build();
    match sub.and_then(|name| root.find_subcommand(name)) {
        Some(cmd) => cmd.clone(),
        None => root,
    }
}

/// Reads and parses a TOML file.
pub fn load(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    text.parse::<toml::Table>()
        .map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })
}

/// What a file adds to the command line.
struct FilePlan {
    args: Vec<OsString>,
    from_file: BTreeSet<String>,
    ignored: Vec<String>,
}

/// Checks every key of `table` against the training flags and turns the ones that the
/// command line did not give (directly or through a conflicting flag) into flags.
fn file_args(
    path: &Path,
    table: &toml::Table,
    sub: Option<&str>,
    given: &ArgMatches,
) -> Result<FilePlan, ConfigError> {
    let train = command_for(Some("train"));
    let target = command_for(sub);
    // A flag's environment variable (RINGTRAIN_KEY) counts as given too: it is more
    // specific to this process than a file shared by all of them.
    let on_command_line = |id: &str| {
        matches!(
            given.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    };
    let mut plan = FilePlan {
        args: Vec::new(),
        from_file: BTreeSet::new(),
        ignored: Vec::new(),
    };
    for (key, value) in table {
        check_key(path, key, &train)?;
        let Some(arg) = find_long(&target, key) else {
            plan.ignored.push(key.clone());
            continue;
        };
        let overridden = on_command_line(arg.get_id().as_str())
            || target
                .get_arg_conflicts_with(arg)
                .iter()
                .any(|other| on_command_line(other.get_id().as_str()));
        if overridden {
            continue;
        }
        let flags = value_args(key, arg, value).map_err(|detail| ConfigError::BadType {
            path: path.to_path_buf(),
            key: key.clone(),
            detail,
        })?;
        if !flags.is_empty() {
            plan.from_file.insert(key.clone());
        }
        plan.args.extend(flags);
    }
    Ok(plan)
}

fn find_long<'a>(cmd: &'a clap::Command, long: &str) -> Option<&'a clap::Arg> {
    cmd.get_arguments().find(|a| a.get_long() == Some(long))
}

/// Fails unless `key` is a training flag that a file may set.
fn check_key(path: &Path, key: &str, train: &clap::Command) -> Result<(), ConfigError> {
    if let Some((_, why)) = NOT_IN_FILE.iter().find(|(k, _)| *k == key) {
        return Err(ConfigError::NotInFile {
            path: path.to_path_buf(),
            key: key.to_string(),
            why,
        });
    }
    if find_long(train, key).is_some() {
        return Ok(());
    }
    let dashed = key.replace('_', "-");
    let hint = if dashed != key && find_long(train, &dashed).is_some() {
        format!(" (did you mean {dashed:?}?)")
    } else {
        String::new()
    };
    Err(ConfigError::UnknownKey {
        path: path.to_path_buf(),
        key: key.to_string(),
        hint,
    })
}

/// The command-line flags that `key = value` stands for.
fn value_args(key: &str, arg: &clap::Arg, value: &toml::Value) -> Result<Vec<OsString>, String> {
    use toml::Value as V;
    if !arg.get_action().takes_values() {
        return match value {
            V::Boolean(true) => Ok(vec![format!("--{key}").into()]),
            V::Boolean(false) => Ok(Vec::new()),
            other => Err(format!("expected true or false, got {other}")),
        };
    }
    let text = match value {
        V::Array(items) => {
            let parts: Result<Vec<String>, String> = items.iter().map(scalar).collect();
            parts?.join(",")
        }
        other => scalar(other)?,
    };
    Ok(vec![format!("--{key}={text}").into()])
}

fn scalar(value: &toml::Value) -> Result<String, String> {
    use toml::Value as V;
    match value {
        V::String(s) => Ok(s.clone()),
        V::Integer(i) => Ok(i.to_string()),
        V::Float(f) => Ok(f.to_string()),
        V::Boolean(b) => Ok(b.to_string()),
        other => Err(format!(
            "expected a string, number, boolean or array of them, got {other}"
        )),
    }
}

impl Parsed {
    /// The effective configuration as TOML: every setting of this command with its value
    /// and where that came from; settings without a value are commented out. The output,
    /// saved as a file, is a valid `--config` for the same command.
    pub fn effective_toml(&self) -> String {
        let (sub, m) = command_matches(&self.matches);
        let cmd = command_for(sub);
        let train = command_for(Some("train"));
        let name = sub.unwrap_or("train");
        let file = self.file.as_ref().map(|p| p.display().to_string());
        let mut out = format!(
            "# effective configuration of `ringtrain {name}`: command line > {} > default\n",
            file.as_deref().unwrap_or("--config file")
        );
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if NOT_IN_FILE.iter().any(|(k, _)| *k == long) {
                continue;
            }
            let id = arg.get_id().as_str();
            let source = match m.value_source(id) {
                Some(ValueSource::CommandLine) if self.from_file.contains(long) => {
                    file.clone().unwrap_or_default()
                }
                Some(ValueSource::CommandLine) => "command line".to_string(),
                Some(ValueSource::EnvVariable) => "environment".to_string(),
                _ => "default".to_string(),
            };
            let value = effective_value(m, arg);
            // Flags of `launch` alone (--np) are shown but cannot come from a file.
            let in_file = find_long(&train, long).is_some();
            let _ = match (value, in_file) {
                (Some(v), true) => writeln!(out, "{long} = {v}  # {source}"),
                (Some(v), false) => writeln!(out, "# {long} = {v}  (a flag only)"),
                (None, _) => writeln!(out, "# {long} is not set"),
            };
        }
        out
    }
}

/// The value of `arg` in `m` as TOML, `None` when it has none.
fn effective_value(m: &ArgMatches, arg: &clap::Arg) -> Option<toml::Value> {
    let id = arg.get_id().as_str();
    if !arg.get_action().takes_values() {
        let on = m.try_get_one::<bool>(id).ok().flatten().copied();
        return Some(toml::Value::Boolean(on.unwrap_or(false)));
    }
    let raw: Vec<String> = m
        .try_get_raw(id)
        .ok()
        .flatten()?
        .map(|v| v.to_string_lossy().into_owned())
        .collect();
    match raw.as_slice() {
        [] => None,
        [one] => Some(typed(one)),
        many => Some(toml::Value::Array(many.iter().map(|s| typed(s)).collect())),
    }
}

/// A flag's text as the TOML type it reads as; any type works when read back, since
/// values are passed on as text.
fn typed(text: &str) -> toml::Value {
    if let Ok(i) = text.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    match text.parse::<f64>() {
        Ok(f) if f.is_finite() && text.contains(['.', 'e']) => toml::Value::Float(f),
        _ => toml::Value::String(text.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Command;

    fn parse_with(file: &str, args: &[&str]) -> Result<Parsed, ParseError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.toml");
        std::fs::write(&path, file).unwrap();
        let mut argv: Vec<OsString> = vec!["ringtrain".into()];
        argv.extend(args.iter().map(OsString::from));
        argv.extend(["--config".into(), path.into_os_string()]);
        parse(argv)
    }

    fn config_err(r: Result<Parsed, ParseError>) -> String {
        match r {
            Err(ParseError::Config(e)) => e.to_string(),
            Err(ParseError::Clap(e)) => panic!("expected a config error, got clap's {e}"),
            Ok(p) => panic!("expected an error, got {:?}", p.cli),
        }
    }

    fn train_opts(p: &Parsed) -> &crate::cli::TrainOpts {
        match &p.cli.command {
            Some(Command::Train(t)) => &t.opts,
            Some(Command::Launch(l)) => &l.opts,
            Some(other) => panic!("no training flags in {other:?}"),
            None => &p.cli.train.opts,
        }
    }

    const FILE: &str = "epochs = 7\nlr = 0.5\nhidden = [32, 16]\noptimizer = \"adam\"\n\
                        quiet = true\nhosts = \"h.txt\"\n";

    #[test]
    fn flag_beats_file_beats_default() {
        let p = parse_with(FILE, &["train", "--lr", "0.25"]).unwrap();
        let o = train_opts(&p);
        assert_eq!(o.epochs, 7, "from the file");
        assert_eq!(o.lr, Some(0.25), "the flag wins");
        assert_eq!(o.batch_size, 64, "the default stays");
        assert_eq!(o.hidden.0, vec![32, 16]);
        assert!(o.quiet);
        assert!(p.from_file.contains("epochs") && !p.from_file.contains("lr"));
        let toml = p.effective_toml();
        assert!(toml.contains("lr = 0.25  # command line"), "{toml}");
        assert!(toml.contains("epochs = 7  # "), "{toml}");
        assert!(toml.contains("batch-size = 64  # default"), "{toml}");
        assert!(toml.contains("# steps is not set"), "{toml}");
    }

    #[test]
    fn the_printed_configuration_reads_back_the_same() {
        let p = parse_with(FILE, &["--seed", "3"]).unwrap();
        let again = parse_with(&p.effective_toml(), &[]).unwrap();
        assert_eq!(train_opts(&again), train_opts(&p));
        assert_eq!(again.cli.train.hosts, Some(PathBuf::from("h.txt")));
    }

    #[test]
    fn launch_ignores_rank_only_keys() {
        let p = parse_with(FILE, &["launch", "--np", "2"]).unwrap();
        assert_eq!(p.ignored, vec!["hosts".to_string()]);
        assert_eq!(train_opts(&p).epochs, 7);
        assert!(p.effective_toml().contains("# np = 2  (a flag only)"));
    }

    #[test]
    fn unknown_keys_name_the_file_and_key() {
        let err = config_err(parse_with("epochs = 1\nbatch_size = 3\n", &[]));
        assert!(
            err.contains("train.toml") && err.contains("\"batch_size\""),
            "{err}"
        );
        assert!(err.contains("did you mean \"batch-size\""), "{err}");
        let err = config_err(parse_with("[model]\nwidth = 3\n", &[]));
        assert!(err.contains("unknown key \"model\""), "{err}");
        let err = config_err(parse_with("rank = 1\n", &[]));
        assert!(err.contains("\"rank\" cannot be set"), "{err}");
    }

    #[test]
    fn bad_values_name_the_file() {
        let err = config_err(parse_with("epochs = \"many\"\n", &[]));
        assert!(
            err.contains("train.toml") && err.contains("--epochs"),
            "{err}"
        );
        let err = config_err(parse_with("quiet = 1\n", &[]));
        assert!(err.contains("\"quiet\": expected true or false"), "{err}");
        let err = config_err(parse_with("epochs = \n", &[]));
        assert!(err.contains("not valid TOML"), "{err}");
    }

    #[test]
    fn a_flag_that_excludes_a_file_key_wins() {
        let p = parse_with("rank-from-hostname = true\n", &["--rank", "1"]).unwrap();
        assert_eq!(p.cli.train.rank, Some(1));
        assert!(!p.cli.train.rank_from_hostname);
        let p = parse_with("rank-from-hostname = true\nhidden = []\n", &[]).unwrap();
        assert!(p.cli.train.rank_from_hostname);
        assert!(train_opts(&p).hidden.0.is_empty());
    }

    #[test]
    fn no_file_no_change() {
        let p = parse(["ringtrain", "train", "--epochs", "3"]).unwrap();
        assert_eq!(train_opts(&p).epochs, 3);
        assert!(p.file.is_none());
        assert!(matches!(
            parse(["ringtrain", "--bogus"]),
            Err(ParseError::Clap(_))
        ));
    }
}
