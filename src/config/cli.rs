//! What clap's own errors leave out: a bad value that came from a `REGRELAY_*` variable (clap
//! blames the flag the user never typed), and flags given without a subcommand.

use std::ffi::OsString;

use clap::error::{ContextKind, ContextValue, ErrorKind};

/// A fuller message for `err`, or `None` when clap's says it all. `cmd` is the whole command,
/// `args` the process's arguments (program name first).
pub fn explain(err: &clap::Error, cmd: &clap::Command, args: &[OsString]) -> Option<String> {
    let args: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    match err.kind() {
        ErrorKind::ValueValidation | ErrorKind::InvalidValue => from_environment(err, cmd, &args),
        ErrorKind::UnknownArgument => without_subcommand(cmd, &args),
        _ => None,
    }
}

/// The flag's value came from its environment variable when the flag is not on the command line
/// and the variable is set.
fn from_environment(err: &clap::Error, cmd: &clap::Command, args: &[String]) -> Option<String> {
    let Some(ContextValue::String(invalid_arg)) = err.get(ContextKind::InvalidArg) else {
        return None;
    };
    let long = invalid_arg.strip_prefix("--")?.split([' ', '=']).next()?;
    let sub = cmd.find_subcommand(args.get(1)?)?;
    let arg = sub.get_arguments().find(|a| a.get_long() == Some(long))?;
    let env = arg.get_env()?.to_string_lossy().into_owned();
    let typed = args[2..]
        .iter()
        .any(|a| a == &format!("--{long}") || a.starts_with(&format!("--{long}=")));
    let value = std::env::var_os(&env)?.to_string_lossy().into_owned();
    if typed {
        return None;
    }
    let why = std::error::Error::source(err).map_or(String::new(), |e| format!(": {e}"));
    Some(format!(
        "error: invalid value {value:?} in the environment variable {env} (it sets \
         {invalid_arg}){why}\n\nFix or unset {env}; a --{long} flag on the command line would \
         win over it."
    ))
}

/// `regrelay --registry …`: flags belong to a subcommand.
fn without_subcommand(cmd: &clap::Command, args: &[String]) -> Option<String> {
    let first = args.get(1)?;
    if !first.starts_with("--") || cmd.find_subcommand(first).is_some() {
        return None;
    }
    let names: Vec<&str> = cmd
        .get_subcommands()
        .map(|s| s.get_name())
        .filter(|n| *n != "help")
        .collect();
    let rest = args[1..].join(" ");
    Some(format!(
        "error: {first} comes before any subcommand; regrelay needs one first, e.g.\n\n    \
         regrelay serve {rest}\n\nSubcommands: {} (see `regrelay --help`).",
        names.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Args, Parser, Subcommand};

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Cmd,
    }
    #[derive(Subcommand)]
    enum Cmd {
        Serve(Flags),
        CheckConfig(Flags),
    }
    #[derive(Args)]
    struct Flags {
        #[arg(long, env = "REGRELAY_CLI_TEST_MAX", value_name = "N")]
        max: Option<usize>,
    }

    fn explained(args: &[&str]) -> Option<String> {
        use clap::CommandFactory;
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        let err = Cli::try_parse_from(&args).err().expect("an error");
        explain(&err, &Cli::command(), &args)
    }

    #[test]
    fn a_bad_value_from_the_environment_names_the_variable() {
        std::env::set_var("REGRELAY_CLI_TEST_MAX", "abc");
        let said = explained(&["regrelay", "serve"]).expect("explained");
        assert!(
            said.contains("REGRELAY_CLI_TEST_MAX") && said.contains("\"abc\""),
            "{said}"
        );
        assert!(said.contains("invalid digit"), "{said}");
        // Typed on the command line, clap's own message (naming the flag) is right.
        assert_eq!(explained(&["regrelay", "serve", "--max", "x"]), None);
        std::env::remove_var("REGRELAY_CLI_TEST_MAX");
    }

    #[test]
    fn flags_without_a_subcommand_are_shown_with_one() {
        let said = explained(&["regrelay", "--max", "3"]).expect("explained");
        assert!(said.contains("regrelay serve --max 3"), "{said}");
        assert!(said.contains("serve, check-config"), "{said}");
    }
}
