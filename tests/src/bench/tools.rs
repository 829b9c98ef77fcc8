//! The load generators and what the benchmark reads from the kernel: wrk
//! and iperf3 runs inside a pod (bounded in time by `timeout`), their
//! output parsed, and a process's CPU time and memory from /proc.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use weft_e2e::Pod;

/// Percentiles the wrk script reports (the latency curves are drawn from these).
pub const PERCENTILES: &[f64] = &[
    1.0, 5.0, 10.0, 20.0, 25.0, 30.0, 40.0, 50.0, 60.0, 70.0, 75.0, 80.0, 90.0, 95.0, 97.5, 99.0,
    99.5, 99.9, 99.99,
];

/// A wrk script whose `done` hook prints one JSON line with the summary,
/// the error counts and every percentile in `PERCENTILES` (microseconds).
pub fn wrk_script() -> String {
    let list = PERCENTILES
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",");
    format!(
        r#"done = function(summary, latency, requests)
  local ps = {{}}
  for _, p in ipairs({{{list}}}) do
    ps[#ps + 1] = string.format('"%s":%d', tostring(p), latency:percentile(p))
  end
  local e = summary.errors
  io.write(string.format('WEFT-BENCH {{"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}},' ..
    '"latency_us":{{"min":%d,"max":%d,"mean":%.3f,"percentiles":{{%s}}}}}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.max, latency.mean, table.concat(ps, ",")))
end
"#
    )
}

/// One wrk run, as its script reported it.
#[derive(Clone, Debug)]
pub struct WrkRun {
    pub requests: u64,
    pub seconds: f64,
    pub bytes: u64,
    pub rps: f64,
    /// Percentile -> latency in microseconds, in `PERCENTILES` order.
    pub percentiles: Vec<(f64, f64)>,
    pub mean_us: f64,
    pub max_us: f64,
}

impl WrkRun {
    pub fn percentile(&self, p: f64) -> f64 {
        self.percentiles
            .iter()
            .find(|(q, _)| (q - p).abs() < 1e-9)
            .map(|(_, v)| *v)
            .unwrap_or(f64::NAN)
    }
}

/// Command inside `pod`, killed if it outlives `limit`.
fn bounded(pod: &Pod, limit: Duration, program: &str) -> Command {
    let mut cmd = pod.command("timeout");
    cmd.args(["-k", "5", &format!("{}", limit.as_secs().max(1)), program]);
    cmd
}

/// `wrk -t<threads> -c<conns> -d<secs> --latency` against `url` from `pod`.
/// Fails on any socket error or non-2xx answer: a number from a broken run
/// is worse than none.
pub fn wrk(
    pod: &Pod,
    script: &Path,
    url: &str,
    threads: u32,
    conns: u32,
    secs: u32,
    close: bool,
) -> Result<WrkRun> {
    let mut cmd = bounded(pod, Duration::from_secs(u64::from(secs) + 30), "wrk");
    cmd.args([
        &format!("-t{threads}"),
        &format!("-c{conns}"),
        &format!("-d{secs}s"),
        "--latency",
        "--timeout",
        "5s",
    ]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg("-s").arg(script).arg(url);
    let out = cmd.output().context("running wrk")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk -t{threads} -c{conns} {url} in pod {} failed ({}): {}{}",
            pod.key(),
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("WEFT-BENCH "))
        .with_context(|| format!("wrk printed no summary:\n{stdout}"))?;
    let v: Value = serde_json::from_str(line).with_context(|| format!("wrk summary {line}"))?;
    let errors = &v["errors"];
    let total_errors: u64 = ["connect", "read", "write", "status", "timeout"]
        .iter()
        .map(|k| errors[k].as_u64().unwrap_or(0))
        .sum();
    if total_errors > 0 {
        bail!(
            "wrk against {url} from {} saw errors {errors}:\n{stdout}",
            pod.key()
        );
    }
    let requests = v["requests"].as_u64().unwrap_or(0);
    let seconds = v["duration_us"].as_f64().unwrap_or(0.0) / 1e6;
    if requests == 0 || seconds <= 0.0 {
        bail!("wrk against {url} completed no request:\n{stdout}");
    }
    let pmap = v["latency_us"]["percentiles"]
        .as_object()
        .context("wrk percentiles")?;
    let percentiles = PERCENTILES
        .iter()
        .map(|p| {
            let us = pmap
                .get(&p.to_string())
                .and_then(Value::as_f64)
                .with_context(|| format!("wrk percentile {p} missing"))?;
            Ok((*p, us))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(WrkRun {
        requests,
        seconds,
        bytes: v["bytes"].as_u64().unwrap_or(0),
        rps: requests as f64 / seconds,
        percentiles,
        mean_us: v["latency_us"]["mean"].as_f64().unwrap_or(f64::NAN),
        max_us: v["latency_us"]["max"].as_f64().unwrap_or(f64::NAN),
    })
}

/// One iperf3 run.
#[derive(Clone, Debug)]
pub struct IperfRun {
    pub gbits: f64,
    /// Bytes the receiver got (the omitted warm-up excluded).
    pub bytes: u64,
    pub retransmits: u64,
}

/// `iperf3 -c <server> -t <secs> -O <omit> [-P n] -J` from `pod`.
pub fn iperf(pod: &Pod, server: Ipv4Addr, secs: u32, omit: u32, streams: u32) -> Result<IperfRun> {
    let limit = Duration::from_secs(u64::from(secs + omit) + 30);
    let mut cmd = bounded(pod, limit, "iperf3");
    cmd.args(["-c", &server.to_string(), "-p", "5201", "-J"])
        .args(["-t", &secs.to_string(), "-O", &omit.to_string()])
        .args(["-P", &streams.to_string()]);
    let out = cmd.output().context("running iperf3")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    if !out.status.success() || v.get("error").is_some() || v.is_null() {
        bail!(
            "iperf3 -P {streams} to {server} from pod {} failed ({}): {} {}",
            pod.key(),
            out.status,
            v.get("error").unwrap_or(&Value::Null),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let recv = &v["end"]["sum_received"];
    let bps = recv["bits_per_second"].as_f64().unwrap_or(0.0);
    let bytes = recv["bytes"].as_u64().unwrap_or(0);
    if bps <= 0.0 || bytes == 0 {
        bail!("iperf3 to {server} moved no data: {}", v["end"]);
    }
    Ok(IperfRun {
        gbits: bps / 1e9,
        bytes,
        retransmits: v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
    })
}

/// Processes named `comm` whose network namespace is the one at
/// `netns_path` (a node's or pod's `/run/netns/<name>`).
pub fn pids_in_netns(netns_path: &Path, comm: &str) -> Result<Vec<u32>> {
    let want = std::fs::metadata(netns_path)
        .with_context(|| format!("stat {}", netns_path.display()))?
        .ino();
    let want = format!("net:[{want}]");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if name.trim() != comm {
            continue;
        }
        let ns = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap_or_default();
        if ns.to_string_lossy() == want {
            found.push(pid);
        }
    }
    Ok(found)
}

/// The pid of the `weft-ztunnel` process in the network namespace at
/// `netns_path`.
pub fn ztunnel_pid(netns_path: &Path) -> Result<u32> {
    match pids_in_netns(netns_path, "weft-ztunnel")?.as_slice() {
        [pid] => Ok(*pid),
        [] => bail!("no weft-ztunnel process runs in {}", netns_path.display()),
        many => bail!(
            "several weft-ztunnel processes in {}: {many:?}",
            netns_path.display()
        ),
    }
}

/// User plus system CPU seconds a process (all its threads) has used.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid} is gone"))?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/<pid>/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        Ok(fields
            .get(i)
            .context("short /proc/<pid>/stat")?
            .parse::<f64>()?)
    };
    // `rest` starts at field 3 (state), so utime (14) is index 11.
    let total = ticks(11)? + ticks(12)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Ok(total / if hz > 0 { hz as f64 } else { 100.0 })
}

/// `VmRSS` and `VmHWM` of a process, in MiB.
pub fn rss_mib(pid: u32) -> Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    let field = |name: &str| -> Result<f64> {
        let kb = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .with_context(|| format!("{name} missing in /proc/{pid}/status"))?;
        Ok(kb / 1024.0)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Resets a process's peak RSS (`VmHWM`) to its current RSS.
pub fn reset_peak_rss(pid: u32) -> Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .with_context(|| format!("resetting the peak RSS of {pid}"))
}

/// Run time and run count of the eBPF programs a process holds open, by
/// program name (from the kernel's per-fd info; needs bpf_stats_enabled).
pub fn bpf_prog_stats(pids: &[u32]) -> Result<BTreeMap<String, (u64, u64)>> {
    let mut ids = BTreeMap::new();
    for pid in pids {
        let dir = format!("/proc/{pid}/fdinfo");
        for entry in std::fs::read_dir(&dir)
            .with_context(|| format!("reading {dir}"))?
            .flatten()
        {
            let info = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let get = |k: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(k))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            };
            if let (Some(id), Some(ns), Some(cnt)) =
                (get("prog_id:"), get("run_time_ns:"), get("run_cnt:"))
            {
                ids.insert(id, (ns, cnt));
            }
        }
    }
    if ids.is_empty() {
        return Ok(BTreeMap::new());
    }
    let out = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
        .context("running bpftool")?;
    let progs: Value = serde_json::from_slice(&out.stdout).context("bpftool prog show --json")?;
    let mut by_name: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for p in progs.as_array().into_iter().flatten() {
        let (Some(id), Some(name)) = (p["id"].as_u64(), p["name"].as_str()) else {
            continue;
        };
        if let Some((ns, cnt)) = ids.get(&id) {
            let e = by_name.entry(name.to_owned()).or_default();
            e.0 += ns;
            e.1 += cnt;
        }
    }
    Ok(by_name)
}

/// Median of the finite values (NaN when there are none).
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}
