//! Out of file descriptors, no listener spins: the proxy and the metrics listener pause between
//! failed accepts (one log line a pause), take their waiting connections once descriptors are
//! back, and the metrics listener is drained with the proxy at shutdown.

use crate::support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use support::Regrelay;

/// CPU time (user + system) of `pid` so far, in clock ticks (100 a second on Linux).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses and may hold spaces): utime is
    // the 14th field of the line, stime the 15th.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// The soft open-file limit of `pid`.
fn soft_nofile(pid: u32) -> String {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(3).unwrap().to_owned()
}

/// Sets the soft open-file limit of `pid` (the hard one stays).
fn set_soft_nofile(pid: u32, soft: &str) {
    let ok = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={soft}:")])
        .status()
        .unwrap();
    assert!(ok.success(), "prlimit --pid {pid} --nofile={soft}:");
}

/// Polls `cond` until it holds or `timeout` passes; whether it held.
fn wait_until(timeout: Duration, cond: impl Fn() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// Lines of `text` that contain every one of `needles`.
fn count(text: &str, needles: &[&str]) -> usize {
    text.lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .count()
}

#[test]
fn out_of_descriptors_accepts_pause_instead_of_spinning_then_resume() {
    support::require("prlimit");
    let mut px = Regrelay::process(&[
        "--registry",
        "http://127.0.0.1:9",
        "--metrics-listen",
        "127.0.0.1:0",
        "--shutdown-delay-secs",
        "0",
    ]);
    let maddr = support::metrics::addr(&px);
    let pid = px.pid();
    let soft = soft_nofile(pid);
    // Descriptors 0-2 are taken and every socket regrelay holds is above 3: with a soft limit of
    // 3 each new descriptor, an accepted connection's too, fails with EMFILE.
    set_soft_nofile(pid, "3");
    // The kernel completes both handshakes into the listeners' backlogs; regrelay cannot take
    // them, and the listeners stay readable.
    let proxy_client = TcpStream::connect(px.addr).unwrap();
    let mut scraper = TcpStream::connect(maddr).unwrap();
    let failing = wait_until(Duration::from_secs(10), || {
        count(&px.output.text(), &["accept failed"]) > 0
    });
    assert!(failing, "no accept failure logged:\n{}", px.output.text());

    // Both listeners fail every accept now. A loop that retries at once spins a core (about
    // 100 ticks a second); pausing ones take next to nothing.
    let (before, at) = (cpu_ticks(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(pid) - before;
    let secs = at.elapsed().as_secs_f64();
    assert!(
        (used as f64) < 20.0 * secs,
        "{used} ticks of CPU in {secs:.1} s while out of descriptors: an accept loop spins\n{}",
        px.output.text()
    );
    // Each listener says so, one line a pause, the pauses doubling to a second: a handful of
    // lines, not thousands.
    let text = px.output.text();
    for listener in ["proxy", "metrics"] {
        assert!(
            count(&text, &["accept failed", listener, "pause_ms"]) > 0,
            "no accept failure logged for the {listener} listener:\n{text}"
        );
    }
    let lines = count(&text, &["accept failed"]);
    eprintln!("out of descriptors: {used} ticks of CPU in {secs:.1} s, {lines} log lines");
    assert!(lines < 60, "{lines} accept-failure lines:\n{text}");

    // Descriptors are back: the waiting scrape is taken and answered.
    set_soft_nofile(pid, &soft);
    scraper
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    scraper
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let _ = scraper.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        px.output
            .wait_for("accepting again", Duration::from_secs(5))
            .is_some(),
        "{}",
        px.output.text()
    );

    // The metrics listener is drained with the proxy: closed once the drain ends, then exit 0.
    drop(proxy_client);
    px.terminate();
    let status = px
        .wait_exit(Duration::from_secs(20))
        .expect("regrelay did not exit after SIGTERM");
    assert!(status.success(), "{status:?}\n{}", px.output.text());
    let out = px.output.settled();
    let drained = out.find("drained").expect("the drain ended");
    let closed = out
        .find("metrics listener closed")
        .unwrap_or_else(|| panic!("the metrics listener was not drained:\n{out}"));
    assert!(
        closed > drained,
        "metrics closed before the drain ended:\n{out}"
    );
}
