//! SIGTERM and SIGINT, the signals that stop the server: listened to for the life of the
//! process; what each one does is [`crate::lifecycle`]'s.

use std::time::Duration;

/// Signals closer together than this are one request to stop: `timeout` and a kill of the
/// process group deliver SIGTERM twice at once, and only a second signal sent on purpose should
/// end the drain.
pub const SIGNAL_BURST: Duration = Duration::from_secs(1);

/// SIGTERM and SIGINT, listened to from the first call for the life of the process (a signal
/// arriving between two waits is not lost).
pub struct ShutdownSignals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl ShutdownSignals {
    /// Starts listening (a signal that cannot be caught is waited for never).
    pub fn listen() -> ShutdownSignals {
        use tokio::signal::unix::{signal, SignalKind};
        ShutdownSignals {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
        }
    }

    /// The next SIGTERM or SIGINT, by name.
    pub async fn next(&mut self) -> &'static str {
        async fn one(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        }
        tokio::select! {
            () = one(&mut self.term) => "SIGTERM",
            () = one(&mut self.int) => "SIGINT",
        }
    }
}
