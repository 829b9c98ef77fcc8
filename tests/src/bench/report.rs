//! The benchmark's results and their three forms: a table on the terminal
//! (each Weft figure beside the no-mesh baseline and the ratio), a JSON
//! file with every figure and the run's metadata, and an SVG plot of the
//! latency distributions.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::SystemTime;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::tools::{median, WrkRun, PERCENTILES};
use super::{Kind, Scenario, Workload, WORKLOADS};

/// One measured run of one workload in one scenario.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub gbits: Option<f64>,
    pub retransmits: u64,
    pub wrk: Option<WrkRun>,
    /// Bytes moved (iperf3: received; wrk: read by the client).
    pub bytes: u64,
    /// CPU seconds of each node's ztunnel during the run.
    pub cpu_s: [f64; 2],
    /// Peak RSS of each ztunnel during the run.
    pub peak_rss_mib: [f64; 2],
    /// Client connections (as the source ztunnel counted them, for the mesh).
    pub connections: f64,
}

#[derive(Clone, Debug, Default)]
pub struct Cell {
    pub runs: Vec<Sample>,
}

impl Cell {
    fn med(&self, f: impl Fn(&Sample) -> Option<f64>) -> f64 {
        median(self.runs.iter().filter_map(f))
    }
    pub fn gbits(&self) -> f64 {
        self.med(|s| s.gbits)
    }
    pub fn rps(&self) -> f64 {
        self.med(|s| s.wrk.as_ref().map(|w| w.rps))
    }
    pub fn pct(&self, p: f64) -> f64 {
        self.med(|s| s.wrk.as_ref().map(|w| w.percentile(p)))
    }
    /// CPU seconds of both ztunnels together.
    pub fn cpu_s(&self) -> f64 {
        self.med(|s| Some(s.cpu_s[0] + s.cpu_s[1]))
    }
    pub fn cpu_s_per_gb(&self) -> f64 {
        self.med(|s| (s.bytes > 0).then(|| (s.cpu_s[0] + s.cpu_s[1]) / (s.bytes as f64 / 1e9)))
    }
    pub fn cpu_us_per_request(&self) -> f64 {
        self.med(|s| {
            s.wrk
                .as_ref()
                .map(|w| (s.cpu_s[0] + s.cpu_s[1]) * 1e6 / w.requests as f64)
        })
    }
    pub fn cpu_us_per_connection(&self) -> f64 {
        self.med(|s| (s.connections > 0.0).then(|| (s.cpu_s[0] + s.cpu_s[1]) * 1e6 / s.connections))
    }
    pub fn peak_rss_mib(&self) -> [f64; 2] {
        let max = |i: usize| {
            self.runs
                .iter()
                .map(|s| s.peak_rss_mib[i])
                .fold(0.0, f64::max)
        };
        [max(0), max(1)]
    }
}

pub struct Report {
    pub quick: bool,
    pub runs: usize,
    pub seconds: u32,
    pub started: SystemTime,
    pub finished: Option<SystemTime>,
    pub cells: BTreeMap<(&'static str, &'static str), Cell>,
    pub idle_rss_mib: [f64; 2],
    pub idle_rss_after_mib: [f64; 2],
    pub held_rss_mib: [f64; 2],
    pub capture: Value,
}

const BASE: &str = "no_mesh";
const MESH_SCENARIOS: [&str; 2] = ["weft_cross_node", "weft_same_node"];

impl Report {
    pub fn new(quick: bool, runs: usize, seconds: u32, started: SystemTime) -> Report {
        Report {
            quick,
            runs,
            seconds,
            started,
            finished: None,
            cells: BTreeMap::new(),
            idle_rss_mib: [0.0; 2],
            idle_rss_after_mib: [0.0; 2],
            held_rss_mib: [0.0; 2],
            capture: Value::Null,
        }
    }

    fn cell(&self, w: &str, s: &str) -> Cell {
        self.cells
            .iter()
            .find(|((wk, sk), _)| *wk == w && *sk == s)
            .map(|(_, c)| c.clone())
            .unwrap_or_default()
    }

    /// Prints the table and writes `<out>/<stamp>.json` and
    /// `<out>/<stamp>-latency.svg`.
    pub fn write(&self, out: &Path, scenarios: &[Scenario]) -> Result<()> {
        let stamp = utc_stamp(self.started);
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let meta = metadata(self, &stamp);
        let json_path = out.join(format!("{stamp}.json"));
        let svg_path = out.join(format!("{stamp}-latency.svg"));
        let doc = self.json(meta.clone(), scenarios);
        std::fs::write(&json_path, serde_json::to_string_pretty(&doc)?)?;
        std::fs::write(&svg_path, self.svg(scenarios))?;
        println!("{}", self.table(&meta));
        println!(
            "results: {}\nlatency plot: {}",
            json_path.display(),
            svg_path.display()
        );
        Ok(())
    }

    fn json(&self, meta: Value, scenarios: &[Scenario]) -> Value {
        let mut workloads = serde_json::Map::new();
        for w in WORKLOADS {
            let mut per = serde_json::Map::new();
            for s in scenarios {
                let c = self.cell(w.key, s.key);
                let runs: Vec<Value> = c
                    .runs
                    .iter()
                    .map(|r| {
                        json!({
                            "gbit_s": r.gbits,
                            "retransmits": r.retransmits,
                            "bytes": r.bytes,
                            "connections": r.connections,
                            "ztunnel_cpu_s": r.cpu_s,
                            "ztunnel_peak_rss_mib": r.peak_rss_mib,
                            "wrk": r.wrk.as_ref().map(|w| json!({
                                "requests": w.requests, "seconds": w.seconds, "requests_per_s": w.rps,
                                "mean_us": w.mean_us, "max_us": w.max_us,
                                "percentiles_us": w.percentiles.iter()
                                    .map(|(p, v)| (p.to_string(), json!(v)))
                                    .collect::<serde_json::Map<_, _>>(),
                            })),
                        })
                    })
                    .collect();
                let mut m = json!({
                    "runs": runs,
                    "median": {
                        "ztunnel_cpu_s_both": num(c.cpu_s()),
                        "ztunnel_peak_rss_mib": c.peak_rss_mib(),
                    },
                });
                let med = &mut m["median"];
                match w.kind {
                    Kind::Iperf { .. } => {
                        med["gbit_s"] = num(c.gbits());
                        med["cpu_s_per_gb_both"] = num(c.cpu_s_per_gb());
                    }
                    Kind::Wrk { .. } => {
                        med["requests_per_s"] = num(c.rps());
                        for p in PERCENTILES {
                            med[format!("p{p}_us")] = num(c.pct(*p));
                        }
                        med["cpu_us_per_request_both"] = num(c.cpu_us_per_request());
                        med["cpu_us_per_connection_both"] = num(c.cpu_us_per_connection());
                    }
                }
                if s.key != BASE {
                    let base = self.cell(w.key, BASE);
                    m["ratio_to_no_mesh"] = match w.kind {
                        Kind::Iperf { .. } => num(self.ratio(w.key, c.gbits())),
                        Kind::Wrk { .. } => num(self.ratio(w.key, c.rps())),
                    };
                    if let Some(why) = self.baseline_problem(w.key) {
                        m["baseline_problem"] = json!(why);
                    }
                    if let Kind::Wrk { .. } = w.kind {
                        m["added_latency_us"] = json!({
                            "p50": num(c.pct(50.0) - base.pct(50.0)),
                            "p90": num(c.pct(90.0) - base.pct(90.0)),
                            "p99": num(c.pct(99.0) - base.pct(99.0)),
                        });
                    }
                }
                per.insert(s.key.to_owned(), m);
            }
            workloads.insert(
                w.key.to_owned(),
                json!({"title": w.title, "scenarios": per}),
            );
        }
        json!({
            "metadata": meta,
            "scenarios": scenarios.iter().map(|s| json!({
                "key": s.key, "title": s.title, "mesh": s.mesh,
            })).collect::<Vec<_>>(),
            "workloads": workloads,
            "memory_mib": {
                "idle_rss": self.idle_rss_mib,
                "idle_rss_after_load": self.idle_rss_after_mib,
                "rss_with_1000_idle_connections": self.held_rss_mib,
                "peak_rss_by_scenario": scenarios.iter().map(|s| (s.key.to_owned(), json!(self.peak_rss(s.key))))
                    .collect::<serde_json::Map<_, _>>(),
            },
            "capture": self.capture,
            "targets": self.targets().iter().map(|t| json!({
                "target": t.name, "value": num(t.value), "limit": t.limit, "met": t.met,
            })).collect::<Vec<_>>(),
        })
    }

    fn peak_rss(&self, scenario: &str) -> [f64; 2] {
        let mut m = [0.0f64; 2];
        for w in WORKLOADS {
            let p = self.cell(w.key, scenario).peak_rss_mib();
            m = [m[0].max(p[0]), m[1].max(p[1])];
        }
        m
    }

    /// Why workload `w`'s no-mesh cell cannot anchor a ratio, if it cannot:
    /// missing, or below Weft cross-node on the same path (the mesh only
    /// adds work there, so a slower baseline means the baseline itself is
    /// broken on this machine).
    fn baseline_problem(&self, w: &str) -> Option<String> {
        let iperf = w.starts_with("iperf");
        let value = |c: &Cell| if iperf { c.gbits() } else { c.rps() };
        let unit = if iperf { "Gbit/s" } else { "requests/s" };
        let base = value(&self.cell(w, BASE));
        if !base.is_finite() || base <= 0.0 {
            return Some(format!("{w}: no no-mesh measurement"));
        }
        let cross = value(&self.cell(w, "weft_cross_node"));
        (cross > base * 1.05).then(|| {
            format!(
                "{w}: the no-mesh baseline ({base:.2} {unit}) is below Weft cross-node ({cross:.2}) on the same path: the baseline is broken on this machine, so no ratio is printed"
            )
        })
    }

    /// Ratio of `v` to the no-mesh cell of `w`; NaN when the baseline is
    /// implausible.
    fn ratio(&self, w: &str, v: f64) -> f64 {
        if self.baseline_problem(w).is_some() {
            return f64::NAN;
        }
        let b = self.cell(w, BASE);
        v / if w.starts_with("iperf") {
            b.gbits()
        } else {
            b.rps()
        }
    }

    fn targets(&self) -> Vec<Target> {
        let cross = "weft_cross_node";
        let ratio = |w: &str| {
            let c = self.cell(w, cross);
            self.ratio(
                w,
                if w.starts_with("iperf") {
                    c.gbits()
                } else {
                    c.rps()
                },
            )
        };
        let added = |w: &str, p: f64| self.cell(w, cross).pct(p) - self.cell(w, BASE).pct(p);
        let cpu_gb = ["iperf_1", "iperf_8"]
            .iter()
            .map(|w| self.cell(w, cross).cpu_s_per_gb())
            .fold(f64::NAN, f64::max);
        let idle = self.idle_rss_mib[0].max(self.idle_rss_mib[1]);
        vec![
            Target::at_least("1 stream ratio", ratio("iperf_1"), 0.33),
            Target::at_least("8 streams ratio", ratio("iperf_8"), 0.45),
            Target::at_most(
                "keep-alive c1 added p50 (us)",
                added("wrk_c1_keepalive", 50.0),
                40.0,
            ),
            Target::at_most(
                "keep-alive c1 added p99 (us)",
                added("wrk_c1_keepalive", 99.0),
                100.0,
            ),
            Target::at_least(
                "connection-per-request c1 ratio",
                ratio("wrk_c1_close"),
                0.34,
            ),
            Target::at_least(
                "connection-per-request c16 ratio",
                ratio("wrk_c16_close"),
                0.34,
            ),
            Target::at_most("CPU-s per GB, both ztunnels (worst iperf)", cpu_gb, 1.0),
            Target::at_most("idle RSS per ztunnel (MiB)", idle, 12.0),
        ]
    }

    fn table(&self, meta: &Value) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "\nWeft data-path benchmark ({}: median of {} run(s) of {} s)",
            if self.quick { "--quick" } else { "full" },
            self.runs,
            self.seconds
        );
        let _ = writeln!(
            t,
            "commit {}  kernel {}  {} CPUs ({})",
            meta["commit"].as_str().unwrap_or("?"),
            meta["kernel"].as_str().unwrap_or("?"),
            meta["cpus"],
            meta["cpu_model"].as_str().unwrap_or("?"),
        );
        let _ = writeln!(
            t,
            "Ratios are Weft / no mesh; for latency, the added microseconds.\n"
        );
        let _ = writeln!(
            t,
            "| workload | figure | no mesh | Weft cross-node | ratio | Weft same-node | ratio |"
        );
        let _ = writeln!(t, "| --- | --- | ---: | ---: | ---: | ---: | ---: |");
        for w in WORKLOADS {
            let b = self.cell(w.key, BASE);
            let c: Vec<Cell> = MESH_SCENARIOS.iter().map(|s| self.cell(w.key, s)).collect();
            let ratio = |v: f64| self.ratio(w.key, v);
            match w.kind {
                Kind::Iperf { .. } => row(
                    &mut t,
                    w.title,
                    "Gbit/s",
                    b.gbits(),
                    &c,
                    Cell::gbits,
                    2,
                    &ratio,
                ),
                Kind::Wrk { conns, close, .. } => {
                    row(
                        &mut t,
                        w.title,
                        "requests/s",
                        b.rps(),
                        &c,
                        Cell::rps,
                        0,
                        &ratio,
                    );
                    let ps: &[f64] = if conns == 1 && !close {
                        &[50.0, 90.0, 99.0]
                    } else {
                        &[50.0, 99.0]
                    };
                    for p in ps {
                        let base = b.pct(*p);
                        let _ = write!(t, "| | p{p} us | {base:.0} |");
                        for m in &c {
                            let v = m.pct(*p);
                            let _ = write!(t, " {v:.0} | +{:.0} |", v - base);
                        }
                        t.push('\n');
                    }
                }
            }
        }
        let problems: Vec<String> = WORKLOADS
            .iter()
            .filter_map(|w| self.baseline_problem(w.key))
            .collect();
        for p in &problems {
            let _ = writeln!(t, "\nbaseline refused: {p}");
        }
        let _ = writeln!(t, "\nztunnel cost (both ztunnels together)\n");
        let _ = writeln!(
            t,
            "| workload | figure | Weft cross-node | Weft same-node |"
        );
        let _ = writeln!(t, "| --- | --- | ---: | ---: |");
        for w in WORKLOADS {
            let c: Vec<Cell> = MESH_SCENARIOS.iter().map(|s| self.cell(w.key, s)).collect();
            let _ = writeln!(
                t,
                "| {} | CPU-s per run | {:.2} | {:.2} |",
                w.title,
                c[0].cpu_s(),
                c[1].cpu_s()
            );
            match w.kind {
                Kind::Iperf { .. } => {
                    let _ = writeln!(
                        t,
                        "| | CPU-s per GB | {:.3} | {:.3} |",
                        c[0].cpu_s_per_gb(),
                        c[1].cpu_s_per_gb()
                    );
                }
                Kind::Wrk { close, .. } => {
                    let _ = writeln!(
                        t,
                        "| | CPU-us per {} | {:.1} | {:.1} |",
                        if close { "connection" } else { "request" },
                        c[0].cpu_us_per_request(),
                        c[1].cpu_us_per_request()
                    );
                }
            }
        }
        let _ = writeln!(t, "\nztunnel memory (node1 / node2, MiB)\n");
        let _ = writeln!(t, "| figure | node1 ztunnel | node2 ztunnel |");
        let _ = writeln!(t, "| --- | ---: | ---: |");
        let mem = |t: &mut String, name: &str, v: [f64; 2]| {
            let _ = writeln!(t, "| {name} | {:.1} | {:.1} |", v[0], v[1]);
        };
        mem(&mut t, "idle RSS (before traffic)", self.idle_rss_mib);
        mem(&mut t, "idle RSS (after the runs)", self.idle_rss_after_mib);
        for s in ["no_mesh", "weft_cross_node", "weft_same_node"] {
            mem(&mut t, &format!("peak RSS, {s}"), self.peak_rss(s));
        }
        mem(
            &mut t,
            "RSS with 1,000 idle connections (node1 -> node2)",
            self.held_rss_mib,
        );
        let cap = &self.capture;
        let us = |v: &Value| v.as_f64().unwrap_or(f64::NAN) / 1000.0;
        let _ = writeln!(
            t,
            "\ncapture cost of connect() (p50 over {} connects)\n",
            cap["connects"]
        );
        let _ = writeln!(t, "| connect() from | to | p50 us | p99 us |");
        let _ = writeln!(t, "| --- | --- | ---: | ---: |");
        for (from, to, key) in [
            (
                "enrolled pod",
                "remote pod (rewritten to 127.0.0.1:15001)",
                "enrolled_rewritten_to_15001",
            ),
            (
                "enrolled pod",
                "own loopback (not rewritten)",
                "enrolled_loopback_not_rewritten",
            ),
            ("non-enrolled pod", "own loopback", "not_enrolled_loopback"),
            ("non-enrolled pod", "remote pod", "not_enrolled_remote_pod"),
        ] {
            let _ = writeln!(
                t,
                "| {from} | {to} | {:.1} | {:.1} |",
                us(&cap[key]["p50_ns"]),
                us(&cap[key]["p99_ns"])
            );
        }
        let _ = writeln!(
            t,
            "\nadded by capture: {:+.1} us vs a loopback connect, {:+.1} us vs connecting to the pod without the mesh",
            us(&cap["added_p50_ns_vs_loopback"]),
            us(&cap["added_p50_ns_vs_remote_pod"])
        );
        if let Some(progs) = cap["bpf_programs"].as_object() {
            for name in ["weft_connect4", "weft_sockops"] {
                if let Some(p) = progs.get(name) {
                    let _ = writeln!(
                        t,
                        "{name}: {:.0} ns per call over {} calls (kernel bpf_stats)",
                        p["ns_per_call"].as_f64().unwrap_or(f64::NAN),
                        p["calls"]
                    );
                }
            }
        }
        let _ = writeln!(t, "\ntargets (Weft cross-node)\n");
        let _ = writeln!(t, "| target | measured | limit | |");
        let _ = writeln!(t, "| --- | ---: | ---: | --- |");
        for tg in self.targets() {
            let _ = writeln!(
                t,
                "| {} | {:.2} | {} {} | {} |",
                tg.name,
                tg.value,
                if tg.at_least { ">=" } else { "<=" },
                tg.limit,
                if !tg.value.is_finite() {
                    "not measured (baseline refused)"
                } else if tg.met {
                    "met"
                } else {
                    "MISSED"
                }
            );
        }
        t
    }

    /// Latency percentile curves (x: percentile on a 1/(1-p) log scale, y:
    /// microseconds on a log scale), one panel per wrk workload.
    fn svg(&self, scenarios: &[Scenario]) -> String {
        let wrk: Vec<&Workload> = WORKLOADS
            .iter()
            .filter(|w| matches!(w.kind, Kind::Wrk { .. }))
            .collect();
        let (pw, ph, ml, mt, mb, mr) = (440.0, 300.0, 60.0, 40.0, 50.0, 20.0);
        let cols = 2usize;
        let rows = wrk.len().div_ceil(cols);
        let width = cols as f64 * (pw + ml + mr);
        let height = rows as f64 * (ph + mt + mb) + 40.0;
        let colors = ["#555555", "#1f77b4", "#d62728", "#2ca02c"];
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(
            s,
            r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="20" font-size="15">Weft latency distributions (wrk, {}; median of {} run(s))</text>"#,
            if self.quick { "--quick" } else { "full" },
            self.runs
        );
        let xpos = |p: f64| (100.0 / (100.0 - p)).log10() / 4.0;
        for (i, w) in wrk.iter().enumerate() {
            let ox = (i % cols) as f64 * (pw + ml + mr) + ml;
            let oy = (i / cols) as f64 * (ph + mt + mb) + mt + 30.0;
            let curves: Vec<(usize, Vec<(f64, f64)>)> = scenarios
                .iter()
                .enumerate()
                .map(|(k, sc)| {
                    let c = self.cell(w.key, sc.key);
                    (k, PERCENTILES.iter().map(|p| (*p, c.pct(*p))).collect())
                })
                .collect();
            let all: Vec<f64> = curves
                .iter()
                .flat_map(|(_, v)| v.iter().map(|(_, y)| *y))
                .filter(|y| y.is_finite() && *y > 0.0)
                .collect();
            let lo = all.iter().copied().fold(f64::INFINITY, f64::min).max(1.0);
            let hi = all.iter().copied().fold(1.0, f64::max);
            let (lo, hi) = (
                lo.log10().floor(),
                hi.log10().ceil().max(lo.log10().floor() + 1.0),
            );
            let ypos = |us: f64| (us.max(1.0).log10() - lo) / (hi - lo);
            let _ = writeln!(
                s,
                r##"<text x="{ox}" y="{}" font-size="13">{}</text><rect x="{ox}" y="{oy}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>"##,
                oy - 8.0,
                w.title
            );
            for p in [0.0, 50.0, 90.0, 99.0, 99.9, 99.99] {
                let x = ox + xpos(p) * pw;
                let _ = writeln!(
                    s,
                    r##"<line x1="{x:.1}" y1="{oy}" x2="{x:.1}" y2="{}" stroke="#eee"/><text x="{x:.1}" y="{}" text-anchor="middle">p{p}</text>"##,
                    oy + ph,
                    oy + ph + 15.0
                );
            }
            let mut d = lo;
            while d <= hi {
                let y = oy + ph - (d - lo) / (hi - lo) * ph;
                let _ = writeln!(
                    s,
                    r##"<line x1="{ox}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{} us</text>"##,
                    ox + pw,
                    ox - 4.0,
                    y + 4.0,
                    10f64.powf(d)
                );
                d += 1.0;
            }
            for (k, pts) in &curves {
                let path: Vec<String> = pts
                    .iter()
                    .filter(|(_, y)| y.is_finite())
                    .map(|(p, y)| {
                        format!("{:.1},{:.1}", ox + xpos(*p) * pw, oy + ph - ypos(*y) * ph)
                    })
                    .collect();
                let color = colors[k % colors.len()];
                let _ = writeln!(
                    s,
                    r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
                    path.join(" ")
                );
                let _ = writeln!(
                    s,
                    r#"<text x="{}" y="{}" fill="{color}">{}</text>"#,
                    ox + 8.0,
                    oy + 16.0 + 14.0 * *k as f64,
                    scenarios[*k].title
                );
            }
        }
        s.push_str("</svg>\n");
        s
    }
}

#[allow(clippy::too_many_arguments)]
fn row(
    t: &mut String,
    title: &str,
    fig: &str,
    base: f64,
    c: &[Cell],
    f: fn(&Cell) -> f64,
    prec: usize,
    ratio: &dyn Fn(f64) -> f64,
) {
    let _ = write!(t, "| {title} | {fig} | {base:.prec$} |");
    for m in c {
        let v = f(m);
        let r = ratio(v);
        if r.is_finite() {
            let _ = write!(t, " {v:.prec$} | {r:.2} |");
        } else {
            let _ = write!(t, " {v:.prec$} | n/a |");
        }
    }
    t.push('\n');
}

struct Target {
    name: &'static str,
    value: f64,
    limit: f64,
    at_least: bool,
    met: bool,
}

impl Target {
    fn at_least(name: &'static str, value: f64, limit: f64) -> Target {
        Target {
            name,
            value,
            limit,
            at_least: true,
            met: value >= limit,
        }
    }
    fn at_most(name: &'static str, value: f64, limit: f64) -> Target {
        Target {
            name,
            value,
            limit,
            at_least: false,
            met: value <= limit,
        }
    }
}

/// A JSON number, or null for NaN/infinite.
fn num(v: f64) -> Value {
    if v.is_finite() {
        json!(v)
    } else {
        Value::Null
    }
}

/// First line a command prints (stdout, else stderr: `wrk -v` and `nginx -v`
/// print their version there and wrk exits non-zero), or "" if it cannot run.
fn command_line(program: &str, args: &[&str]) -> String {
    let mut cmd = std::process::Command::new(program);
    // git answers for the checkout the benchmark binary was built in.
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        cmd.current_dir(dir);
    }
    cmd.args(args)
        .output()
        .ok()
        .filter(|o| o.status.success() || program != "git")
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            if s.trim().is_empty() {
                s = String::from_utf8_lossy(&o.stderr).into_owned();
            }
            s.lines().next().unwrap_or_default().trim().to_owned()
        })
        .unwrap_or_default()
}

fn metadata(r: &Report, stamp: &str) -> Value {
    let commit = command_line("git", &["rev-parse", "HEAD"]);
    let dirty = !command_line("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let mem_kb = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    let elapsed = r
        .finished
        .and_then(|f| f.duration_since(r.started).ok())
        .map(|d| d.as_secs_f64());
    json!({
        "timestamp_utc": stamp,
        "commit": if commit.is_empty() { "unknown".to_owned() } else { commit },
        "dirty_worktree": dirty,
        "kernel": command_line("uname", &["-r"]),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": cpu_model,
        "memory_gib": mem_kb / 1024.0 / 1024.0,
        "mode": if r.quick { "quick" } else { "full" },
        "runs": r.runs,
        "seconds_per_run": r.seconds,
        "elapsed_s": elapsed,
        "wrk": command_line("wrk", &["-v"]),
        "iperf3": command_line("iperf3", &["--version"]),
        "nginx": command_line("nginx", &["-v"]),
        "server": "nginx serving a 1,024-byte file on 8080 (1 worker); iperf3 -s on 5201",
    })
}

/// `YYYYMMDDTHHMMSSZ` for a time (UTC).
pub fn utc_stamp(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wrk_sample(rps: f64) -> Sample {
        Sample {
            wrk: Some(WrkRun {
                requests: (rps * 10.0) as u64,
                seconds: 10.0,
                bytes: 0,
                rps,
                percentiles: PERCENTILES.iter().map(|p| (*p, 100.0)).collect(),
                mean_us: 100.0,
                max_us: 100.0,
            }),
            ..Sample::default()
        }
    }

    /// A no-mesh connection-per-request rate below the mesh's is refused:
    /// no ratio, and its target is not measured; a sound baseline gives
    /// its ratio.
    #[test]
    fn a_baseline_slower_than_the_mesh_gives_no_ratio() {
        let mut r = Report::new(true, 1, 10, SystemTime::UNIX_EPOCH);
        let mut put = |w: &'static str, s: &'static str, rps: f64| {
            r.cells
                .entry((w, s))
                .or_default()
                .runs
                .push(wrk_sample(rps));
        };
        put("wrk_c1_close", BASE, 1105.0);
        put("wrk_c1_close", "weft_cross_node", 1625.0);
        put("wrk_c16_close", BASE, 6000.0);
        put("wrk_c16_close", "weft_cross_node", 3000.0);
        let why = r.baseline_problem("wrk_c1_close").expect("refused");
        assert!(why.contains("below Weft cross-node"), "{why}");
        assert!(r.ratio("wrk_c1_close", 1625.0).is_nan());
        assert!(r.baseline_problem("wrk_c16_close").is_none());
        assert!((r.ratio("wrk_c16_close", 3000.0) - 0.5).abs() < 1e-9);
        let t = r.targets();
        let c1 = t
            .iter()
            .find(|t| t.name == "connection-per-request c1 ratio")
            .unwrap();
        assert!(!c1.value.is_finite() && !c1.met);
        let table = r.table(&json!({}));
        assert!(table.contains("baseline refused: wrk_c1_close"), "{table}");
        assert!(table.contains("not measured (baseline refused)"), "{table}");
    }
}
