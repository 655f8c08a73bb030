//! Measurements and their reports: a Markdown table per case (also printed), a JSON file with
//! every figure, and a hand-written SVG bar chart of the throughput and request-rate figures.

use std::fmt::Write as _;

/// The paths that are peers (for "best peer").
pub const PEERS: [&str; 3] = ["nginx", "haproxy", "caddy"];

/// Front CPU cost of a measurement.
#[derive(Clone, Copy, Debug)]
pub enum Cpu {
    /// CPU seconds per GiB moved.
    PerGib(f64),
    /// CPU microseconds per request.
    PerRequestUs(f64),
}

/// What a figure should reach, stated in its row and checked against the run.
#[derive(Clone, Copy, Debug)]
pub enum Goal {
    /// At least `ratio` times the figure of path `vs` for the same metric (a ratio as in the
    /// table: above 1 is better, so for a latency `vs`'s figure over this one).
    AtLeast {
        /// The other path.
        vs: &'static str,
        /// The least ratio.
        ratio: f64,
    },
    /// Below this value, in the figure's unit.
    Below(f64),
}

/// One figure of one path in one case.
#[derive(Clone, Debug)]
pub struct Measurement {
    /// What was measured, e.g. `upload`, `HTTP/2 download`, `HEAD blob p99`.
    pub metric: String,
    /// `MB/s`, `req/s` (higher is better) or `ms` (lower is better).
    pub unit: &'static str,
    /// `direct`, `regrelay`, `nginx`, `haproxy`, `caddy`.
    pub path: String,
    /// The figure (median over rounds), or `None` when it failed.
    pub value: Option<f64>,
    /// The front's CPU (none for the direct path).
    pub cpu: Option<Cpu>,
    /// The front's peak RSS over the case, MiB (all its processes).
    pub peak_rss_mib: Option<f64>,
    /// A failure or a caveat.
    pub note: String,
    /// What the figure should reach, if anything.
    pub goal: Option<Goal>,
}

impl Measurement {
    /// A figure without CPU, RSS or note (set them with the fields).
    pub fn new(
        metric: impl Into<String>,
        unit: &'static str,
        path: impl Into<String>,
        value: Option<f64>,
    ) -> Measurement {
        Measurement {
            metric: metric.into(),
            unit,
            path: path.into(),
            value,
            cpu: None,
            peak_rss_mib: None,
            note: String::new(),
            goal: None,
        }
    }

    fn higher_is_better(&self) -> bool {
        !matches!(self.unit, "ms" | "instr")
    }
}

/// One case of the bench and what it measured (or why it did not run).
#[derive(Debug)]
pub struct Case {
    /// Short id (the BENCH_CASES name).
    pub id: &'static str,
    /// Title in the report.
    pub title: String,
    /// One paragraph: what it does.
    pub about: String,
    /// Its figures.
    pub measurements: Vec<Measurement>,
    /// The path of the second ratio column instead of the best peer (a case without peers).
    pub baseline: Option<&'static str>,
    /// Why it was skipped, if it was.
    pub skipped: Option<String>,
}

impl Case {
    /// A case that did not run.
    pub fn skip(id: &'static str, title: impl Into<String>, why: impl Into<String>) -> Case {
        Case {
            id,
            title: title.into(),
            about: String::new(),
            measurements: vec![],
            baseline: None,
            skipped: Some(why.into()),
        }
    }
}

/// `m` relative to `reference`, above 1 when `m` is better (faster, or lower latency).
fn ratio(m: &Measurement, reference: Option<f64>) -> Option<f64> {
    let (v, r) = (m.value?, reference?);
    if v <= 0.0 || r <= 0.0 {
        return None;
    }
    Some(if m.higher_is_better() { v / r } else { r / v })
}

/// The figure of `path` for the metric of `m` in `case`.
fn figure_of(case: &Case, m: &Measurement, path: &str) -> Option<f64> {
    case.measurements
        .iter()
        .find(|o| o.metric == m.metric && o.path == path)
        .and_then(|o| o.value)
}

/// For each measurement of `case`: its ratio to the direct path and to the best peer.
pub fn ratios(case: &Case, m: &Measurement) -> (Option<f64>, Option<f64>) {
    let same = || case.measurements.iter().filter(|o| o.metric == m.metric);
    let direct = figure_of(case, m, "direct");
    let peers: Vec<f64> = same()
        .filter(|o| PEERS.contains(&o.path.as_str()))
        .filter_map(|o| o.value)
        .collect();
    let best = if m.higher_is_better() {
        peers.iter().cloned().reduce(f64::max)
    } else {
        peers.iter().cloned().reduce(f64::min)
    };
    (ratio(m, direct), ratio(m, best))
}

/// `m` relative to the figure of the case's baseline path, if it has one.
fn vs_baseline(case: &Case, m: &Measurement) -> Option<f64> {
    ratio(m, figure_of(case, m, case.baseline?))
}

/// The goal of `m` as the report states it, and whether the run reached it (`None`: no figure).
pub fn goal(case: &Case, m: &Measurement) -> Option<(String, Option<bool>)> {
    Some(match m.goal? {
        Goal::AtLeast { vs, ratio: least } => (
            format!("≥ {least:.2}× {vs}"),
            ratio(m, figure_of(case, m, vs)).map(|r| r >= least),
        ),
        Goal::Below(max) => (
            format!("< {} {}", num(max), m.unit),
            m.value.map(|v| v < max),
        ),
    })
}

fn goal_text(g: Option<(String, Option<bool>)>) -> String {
    match g {
        None => "–".into(),
        Some((text, Some(true))) => format!("{text}: met"),
        Some((text, Some(false))) => format!("{text}: **missed**"),
        Some((text, None)) => format!("{text}: no figure"),
    }
}

fn num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map(f).unwrap_or_else(|| "–".into())
}

fn cpu_text(c: Option<Cpu>) -> String {
    match c {
        Some(Cpu::PerGib(s)) => format!("{s:.2} s/GiB"),
        Some(Cpu::PerRequestUs(us)) => format!("{us:.0} µs/req"),
        None => "–".into(),
    }
}

/// The Markdown report: a header (`meta` lines) and one table per case.
pub fn markdown(meta: &[(String, String)], cases: &[Case]) -> String {
    let mut out = String::from("# regrelay benchmark\n\n");
    for (k, v) in meta {
        let _ = writeln!(out, "- {k}: {v}");
    }
    out.push_str(
        "\n`× direct` and `× best peer`: the figure relative to the direct path (client to origin, \
         no front) and to the best of nginx, HAProxy and Caddy for the same case and metric; above 1 is \
         better (faster, or lower latency). `front CPU`: the front's user+system CPU time \
         (/proc/PID/stat, all its processes) over its own transfers, per GiB moved or per \
         request. `peak RSS`: the front's VmHWM over the case (reset at its start), summed over \
         its processes.\n",
    );
    for case in cases {
        let _ = writeln!(out, "\n## {}\n", case.title);
        if let Some(why) = &case.skipped {
            let _ = writeln!(out, "SKIP: {why}");
            continue;
        }
        if !case.about.is_empty() {
            let _ = writeln!(out, "{}\n", case.about);
        }
        let second = case.baseline.unwrap_or("best peer");
        let goals = case.measurements.iter().any(|m| m.goal.is_some());
        let _ = write!(
            out,
            "| metric | path | value | × direct | × {second} | front CPU | peak RSS |{}\n\
             |---|---|--:|--:|--:|--:|--:|{}\n",
            if goals { " goal |" } else { "" },
            if goals { "---|" } else { "" },
        );
        let mut notes = vec![];
        for m in &case.measurements {
            let (vs_direct, mut vs_peer) = ratios(case, m);
            if case.baseline.is_some() {
                vs_peer = vs_baseline(case, m);
            }
            let mut value = opt(m.value, num);
            if m.value.is_none() {
                value = "FAIL".into();
            }
            if !m.note.is_empty() {
                // Identical notes (e.g. the direct path's caveat on every metric) share a number.
                let i = match notes.iter().position(|n| *n == m.note) {
                    Some(i) => i,
                    None => {
                        notes.push(m.note.clone());
                        notes.len() - 1
                    }
                };
                value.push_str(&format!(" [{}]", i + 1));
            }
            let _ = writeln!(
                out,
                "| {} {} | {} | {} | {} | {} | {} | {} |{}",
                m.metric,
                m.unit,
                m.path,
                value,
                opt(vs_direct, |r| format!("{r:.2}")),
                opt(vs_peer, |r| format!("{r:.2}")),
                cpu_text(m.cpu),
                opt(m.peak_rss_mib, |r| format!("{r:.0} MiB")),
                if goals {
                    format!(" {} |", goal_text(goal(case, m)))
                } else {
                    String::new()
                },
            );
        }
        for (i, n) in notes.iter().enumerate() {
            let _ = writeln!(out, "\n[{}] {n}", i + 1);
        }
    }
    out
}

/// Every figure, with its ratios, as JSON.
pub fn json(meta: &[(String, String)], cases: &[Case]) -> serde_json::Value {
    let cases: Vec<serde_json::Value> = cases
        .iter()
        .map(|case| {
            let ms: Vec<serde_json::Value> = case
                .measurements
                .iter()
                .map(|m| {
                    let (vs_direct, vs_peer) = ratios(case, m);
                    let goal = goal(case, m);
                    let (cpu_s_per_gib, cpu_us_per_req) = match m.cpu {
                        Some(Cpu::PerGib(s)) => (Some(s), None),
                        Some(Cpu::PerRequestUs(us)) => (None, Some(us)),
                        None => (None, None),
                    };
                    serde_json::json!({
                        "metric": m.metric,
                        "unit": m.unit,
                        "higher_is_better": m.higher_is_better(),
                        "path": m.path,
                        "value": m.value,
                        "vs_direct": vs_direct,
                        "vs_best_peer": vs_peer,
                        "vs_baseline": vs_baseline(case, m),
                        "goal": goal.as_ref().map(|(text, _)| text),
                        "goal_met": goal.and_then(|(_, met)| met),
                        "cpu_s_per_gib": cpu_s_per_gib,
                        "cpu_us_per_request": cpu_us_per_req,
                        "peak_rss_mib": m.peak_rss_mib,
                        "note": m.note,
                    })
                })
                .collect();
            serde_json::json!({
                "id": case.id,
                "title": case.title,
                "about": case.about,
                "baseline": case.baseline,
                "skipped": case.skipped,
                "measurements": ms,
            })
        })
        .collect();
    let meta: serde_json::Map<String, serde_json::Value> = meta
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    serde_json::json!({ "meta": meta, "cases": cases })
}

fn color(path: &str) -> &'static str {
    match path {
        "direct" => "#8c8c8c",
        "regrelay" => "#d62728",
        "regrelay+cache hit" => "#e377c2",
        "regrelay+cache miss" => "#8c564b",
        "nginx" => "#2ca02c",
        "haproxy" => "#1f77b4",
        "caddy" => "#ff7f0e",
        _ => "#9467bd",
    }
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A horizontal grouped bar chart of the MB/s and req/s figures: one group per case and
/// metric, one bar per path, each group scaled to its own largest bar.
pub fn svg(title: &str, cases: &[Case]) -> String {
    const WIDTH: f64 = 960.0;
    const LABEL: f64 = 300.0;
    const BAR_AREA: f64 = 540.0;
    const BAR: f64 = 13.0;
    const GAP: f64 = 3.0;
    let mut groups: Vec<(String, Vec<&Measurement>)> = vec![];
    for case in cases {
        let short = case.title.split(':').next().unwrap_or(&case.title);
        for m in &case.measurements {
            if m.unit == "ms" {
                continue;
            }
            let label = format!("{short} · {} {}", m.metric, m.unit);
            match groups.iter_mut().find(|(l, _)| *l == label) {
                Some((_, bars)) => bars.push(m),
                None => groups.push((label, vec![m])),
            }
        }
    }
    let mut paths: Vec<&str> = vec![];
    for (_, bars) in &groups {
        for m in bars {
            if !paths.contains(&m.path.as_str()) {
                paths.push(&m.path);
            }
        }
    }
    let mut body = String::new();
    let mut y = 56.0;
    for (label, bars) in &groups {
        let max = bars.iter().filter_map(|m| m.value).fold(0.0, f64::max);
        let _ = writeln!(
            body,
            r#"<text x="8" y="{:.1}" font-weight="bold">{}</text>"#,
            y + 11.0,
            xml(label)
        );
        y += 16.0;
        for m in bars {
            let _ = writeln!(
                body,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                LABEL - 6.0,
                y + BAR - 2.5,
                xml(&m.path)
            );
            match m.value {
                Some(v) if max > 0.0 => {
                    let w = (v / max * BAR_AREA).max(1.0);
                    let _ = writeln!(
                        body,
                        r#"<rect x="{LABEL}" y="{y:.1}" width="{w:.1}" height="{BAR}" fill="{}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
                        color(&m.path),
                        LABEL + w + 4.0,
                        y + BAR - 2.5,
                        num(v)
                    );
                }
                _ => {
                    let _ = writeln!(
                        body,
                        r##"<text x="{:.1}" y="{:.1}" fill="#b00">FAIL</text>"##,
                        LABEL + 4.0,
                        y + BAR - 2.5
                    );
                }
            }
            y += BAR + GAP;
        }
        y += 10.0;
    }
    let mut legend = String::new();
    let mut x = 8.0;
    for p in &paths {
        let _ = write!(
            legend,
            r#"<rect x="{x:.1}" y="30" width="12" height="12" fill="{}"/><text x="{:.1}" y="40">{}</text>"#,
            color(p),
            x + 16.0,
            xml(p)
        );
        x += 24.0 + 8.0 * p.len() as f64;
    }
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{:.0}" font-family="sans-serif" font-size="11">
<rect width="100%" height="100%" fill="white"/>
<text x="8" y="18" font-size="14" font-weight="bold">{}</text>
{legend}
{body}</svg>
"#,
        y + 8.0,
        xml(title)
    )
}
