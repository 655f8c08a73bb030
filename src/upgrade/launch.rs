//! `regrelay upgrade FLAGS…`: what systemd's `ExecReload=` runs. It starts `regrelay serve
//! FLAGS…` from the binary on disk now (the one just installed), in its own process group so
//! it outlives this command, and waits until that process has taken the sockets over (exit 0)
//! or has exited without doing so (its exit code; the running regrelay serves on, and the new
//! process's own error line, on the same stderr, says why). The new process reports through its
//! standard input, one end of a socket pair: a line when it took over, or end-of-file when it
//! dies.
//!
//! systemd follows the new process because it sends `MAINPID=` while the reload runs
//! ([`super::notify`]); this command only has to finish after that.

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode, Stdio};

/// The hidden `serve` flag of a process started by `regrelay upgrade`: it must take over (never
/// bind a port of its own) and report on its standard input.
pub const LAUNCHED_FLAG: &str = "--launched-by-upgrade";

/// Starts `regrelay serve ARGS… --launched-by-upgrade` and waits for its report.
pub fn run(serve_args: &[OsString]) -> ExitCode {
    match launch(serve_args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("regrelay upgrade: cannot start the new regrelay: {e}");
            ExitCode::FAILURE
        }
    }
}

fn launch(serve_args: &[OsString]) -> io::Result<ExitCode> {
    let exe = std::env::current_exe()?;
    let (ours, theirs) = UnixStream::pair()?;
    let mut child = Command::new(&exe)
        .arg("serve")
        .args(serve_args)
        .arg(LAUNCHED_FLAG)
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        // Its own group: a ^C meant for this command does not reach the new server.
        .process_group(0)
        .spawn()?;
    // `Command` is gone: the child holds the only other end, so its death is end-of-file.
    let mut line = String::new();
    BufReader::new(&ours).read_line(&mut line)?;
    if let Some(report) = line.strip_prefix("took-over ") {
        println!("regrelay upgrade: {}", report.trim_end());
        return Ok(ExitCode::SUCCESS);
    }
    let status = child.wait()?;
    eprintln!(
        "regrelay upgrade: the new regrelay (pid {}, {}) exited ({status}) without taking \
         over; the running regrelay serves on",
        child.id(),
        exe.display()
    );
    let code = status
        .code()
        .and_then(|c| u8::try_from(c).ok())
        .unwrap_or(1);
    Ok(ExitCode::from(code.max(1)))
}

/// The new process's side: its standard input, when `regrelay upgrade` started it.
pub struct Launcher(UnixStream);

impl Launcher {
    /// The report channel (standard input, a socket from [`run`]).
    pub fn from_stdin() -> io::Result<Launcher> {
        let fd = io::stdin().as_fd().try_clone_to_owned()?;
        Ok(Launcher(UnixStream::from(fd)))
    }

    /// Reports the takeover: `regrelay upgrade` prints it and exits 0.
    pub fn took_over(mut self, from_pid: u32) {
        let line = format!(
            "took-over pid {} took over from pid {from_pid}, which drains and exits\n",
            std::process::id()
        );
        if let Err(e) = self.0.write_all(line.as_bytes()) {
            tracing::warn!(error = %e, "cannot tell `regrelay upgrade` that the takeover is done");
        }
    }
}
