//! Case 9 (`instructions`): what one proxied small request costs each front, in instructions
//! (`valgrind --tool=callgrind`), a figure that does not move with the machine's noise. Each
//! front runs with one worker (regrelay and the bare hyper forwarder on a one-thread runtime,
//! nginx without its master process, HAProxy with one thread) in front of the fast origin, and
//! serves `GET /v2/` on one keep-alive connection: a fresh process for 200 warm-up requests plus
//! `n1`, another for 200 plus `n2`; their totals' difference over `n2 − n1` is one request,
//! start-up and shutdown cancelled out.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::cases::Bench;
use crate::procs::{self, Peer, Proc};
use crate::report::{Case, Goal, Measurement};

/// The requests of the short and the long run, after the warm-up.
const RUNS: (u64, u64) = (300, 1500);
const WARM_UP: u64 = 200;
/// The metric of the rows.
const METRIC: &str = "instructions per GET /v2/";

pub async fn instructions(b: &Bench) -> Case {
    let title = "9. Instructions per proxied small request (callgrind, one worker each)";
    if !procs::have("valgrind") {
        return Case::skip(
            "instructions",
            title,
            "valgrind is not installed (scripts/install-deps installs it)",
        );
    }
    let origin = b.fronts[0].fast.addr;
    let dir = b.work.join("callgrind");
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return Case::skip("instructions", title, e.to_string());
    }
    let mut fronts: Vec<&str> = vec!["regrelay", "bare hyper"];
    fronts.extend(
        Peer::ALL
            .iter()
            .map(|p| p.name())
            .filter(|n| *n != "caddy" && b.s.fronts.iter().any(|f| f == n)),
    );
    let mut ms = vec![];
    for front in fronts {
        let mut totals = vec![];
        let mut failure = None;
        for (run, n) in [RUNS.0, RUNS.1].into_iter().enumerate() {
            match counted(front, &dir.join(format!("{front}-{run}")), origin, n).await {
                Ok(total) => totals.push(total),
                Err(e) => failure = Some(e),
            }
        }
        let value = match totals.as_slice() {
            [short, long] if long > short => Some((long - short) as f64 / (RUNS.1 - RUNS.0) as f64),
            _ => None,
        };
        let mut m = Measurement::new(METRIC, "instr", front, value);
        if let Some(e) = failure {
            eprintln!("    {front}: {e}");
            m.note = e;
        }
        if front == "regrelay" {
            m.goal = Some(Goal::AtLeast {
                vs: "nginx",
                ratio: 1.0,
            });
        }
        eprintln!(
            "  {front}: {:?} instructions per request",
            m.value.map(|v| v.round())
        );
        ms.push(m);
    }
    Case {
        id: "instructions",
        title: title.into(),
        about: format!(
            "callgrind's instruction count (Ir) of the front's process per proxied `GET /v2/` \
             (the fast origin's answer), one keep-alive connection, requests one after another: \
             two fresh processes, {WARM_UP} + {} and {WARM_UP} + {} requests, the difference of \
             their totals over {} requests. Lower is better; the ratio column is the best \
             peer's count over this one. regrelay runs one worker (`REGRELAY_WORKERS=1`: one \
             connection thread beside its accepting one), the bare hyper forwarder one runtime \
             thread (`multi 1`).",
            RUNS.0,
            RUNS.1,
            RUNS.1 - RUNS.0
        ),
        measurements: ms,
        baseline: None,
        skipped: None,
    }
}

/// The instructions `front` executed, from start to exit, serving `WARM_UP + n` requests.
async fn counted(front: &str, dir: &Path, origin: SocketAddr, n: u64) -> Result<u64, String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let out = dir.join("callgrind.out.%p");
    let valgrind = vec![
        "valgrind".to_owned(),
        "--tool=callgrind".to_owned(),
        format!("--callgrind-out-file={}", out.display()),
    ];
    let (proc, addr): (Proc, SocketAddr) = match front {
        "regrelay" => {
            let mut wrapper = vec!["env".to_owned(), "REGRELAY_WORKERS=1".to_owned()];
            wrapper.extend(valgrind);
            let bin = crate::support::regrelay_bin();
            procs::regrelay_under(
                &wrapper,
                &bin,
                "regrelay",
                dir,
                &format!("http://{origin}"),
                &[],
            )?
        }
        "bare hyper" => procs::bare_forwarder(&valgrind, dir, origin, "multi", 1)?,
        peer => {
            let peer = Peer::ALL
                .into_iter()
                .find(|p| p.name() == peer)
                .ok_or_else(|| format!("unknown front {peer}"))?;
            let (p, ports) = peer.start_under(&valgrind, true, dir, origin, origin)?;
            (p, ports.fast)
        }
    };
    let url = format!("http://{addr}/v2/");
    let sent = one_after_another(&url, WARM_UP + n).await;
    // callgrind writes its counts when the process exits.
    tokio::task::block_in_place(|| proc.stop_within(Duration::from_secs(60)));
    sent?;
    total_of(dir)
}

/// `n` `GET`s of `url`, each after the one before, on one connection.
async fn one_after_another(url: &str, n: u64) -> Result<(), String> {
    let client = crate::support::upstream::client();
    for _ in 0..n {
        let req = http::Request::get(url)
            .body(regrelay::body::empty())
            .map_err(|e| e.to_string())?;
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        crate::support::upstream::drain(resp.into_body())
            .await
            .map_err(|e| format!("{e:?}"))?;
        if !status.is_success() {
            return Err(format!("{url}: {status}"));
        }
    }
    Ok(())
}

/// The `totals:` of every callgrind output file in `dir` (a process and its children).
fn total_of(dir: &Path) -> Result<u64, String> {
    let mut total = 0;
    let mut files = 0;
    for entry in std::fs::read_dir(dir).map_err(|e| e.to_string())? {
        let path = entry.map_err(|e| e.to_string())?.path();
        let is_out = path
            .file_name()
            .and_then(|f| f.to_str())
            .is_some_and(|f| f.starts_with("callgrind.out."));
        if !is_out {
            continue;
        }
        let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix("totals:"))
            .ok_or_else(|| format!("{}: no totals line", path.display()))?;
        total += line
            .trim()
            .parse::<u64>()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        files += 1;
    }
    if files == 0 {
        return Err(format!("no callgrind output in {}", dir.display()));
    }
    Ok(total)
}
