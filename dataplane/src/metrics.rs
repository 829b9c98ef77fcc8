//! The metric families every data-plane process has (`weft_` prefix, base
//! units): config updates applied and rejected, inbound handshake failures
//! by reason, certificate expiry, build information and the process's CPU
//! and memory. Each proxy registers these in its own registry next to its
//! specific families; the controller uses the build and process parts.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

use std::sync::{Arc, OnceLock, Weak};
use std::time::SystemTime;

use crate::certs::CertManager;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    component: &'static str,
    version: &'static str,
}

pub struct CommonMetrics {
    pub config_updates: Counter,
    pub config_rejections: Counter,
    pub handshake_failures: Family<ReasonLabels, Counter>,
    /// Bind the proxy's certificate manager with `certificates.watch`.
    pub certificates: CertExpiry,
}

impl CommonMetrics {
    /// Registers the common families in `registry` (made with the `weft`
    /// prefix), with build info for `component`.
    pub fn register(registry: &mut Registry, component: &'static str) -> Self {
        let m = CommonMetrics {
            config_updates: Counter::default(),
            config_rejections: Counter::default(),
            handshake_failures: Family::default(),
            certificates: CertExpiry::default(),
        };
        registry.register(
            "config_updates",
            "Mesh model versions applied",
            m.config_updates.clone(),
        );
        registry.register(
            "config_rejections",
            "Mesh model updates rejected (the last good one stays)",
            m.config_rejections.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "Inbound mTLS handshakes rejected, by reason",
            m.handshake_failures.clone(),
        );
        registry.register_collector(Box::new(m.certificates.clone()));
        register_process(registry, component);
        m
    }

    pub fn handshake_failed(&self, reason: &str) {
        self.handshake_failures
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }
}

/// Registers `build_info{component, version}` (always 1) and the process
/// collector (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
/// ...; under the registry's prefix) in `registry`.
pub fn register_process(registry: &mut Registry, component: &'static str) {
    let build: Family<BuildLabels, Gauge> = Family::default();
    build
        .get_or_create(&BuildLabels {
            component,
            version: env!("CARGO_PKG_VERSION"),
        })
        .set(1);
    registry.register("build_info", "Component and version of this process", build);
    registry.register_collector(Box::new(ProcessCollector));
}

/// This process's CPU time, memory and file descriptors from `/proc/self`,
/// read at each scrape (the names client libraries use for `process_*`).
#[derive(Debug)]
struct ProcessCollector;

/// What `/proc/self` says; `None` where it could not be read.
#[derive(Debug, Default, PartialEq)]
struct ProcessStats {
    cpu_seconds: Option<f64>,
    resident_bytes: Option<f64>,
    virtual_bytes: Option<f64>,
    start_time_seconds: Option<f64>,
    open_fds: Option<f64>,
    max_fds: Option<f64>,
}

impl ProcessStats {
    fn read() -> Self {
        // SAFETY: sysconf has no preconditions.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let boot = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        let mut s = Self::parse(&stat, &boot, &limits, ticks as f64, page as f64);
        s.open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as f64);
        s
    }

    /// Fields of `/proc/<pid>/stat` (after the command, which may hold
    /// spaces), `btime` of `/proc/stat` and `Max open files` of `limits`.
    fn parse(stat: &str, proc_stat: &str, limits: &str, ticks: f64, page: f64) -> Self {
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        // Numbered from field 3 (state) on: utime is 14, rsslen 24.
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
        let btime = proc_stat
            .lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<f64>().ok());
        let max_fds = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|v| v.parse::<f64>().ok());
        let ticks = ticks.max(1.0);
        Self {
            cpu_seconds: field(14).zip(field(15)).map(|(u, s)| (u + s) / ticks),
            resident_bytes: field(24).map(|p| p * page),
            virtual_bytes: field(23),
            start_time_seconds: btime.zip(field(22)).map(|(b, t)| b + t / ticks),
            open_fds: None,
            max_fds,
        }
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = ProcessStats::read();
        if let Some(v) = s.cpu_seconds {
            let c = ConstCounter::new(v);
            c.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time spent, in seconds",
                None,
                c.metric_type(),
            )?)?;
        }
        for (name, help, value) in [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                s.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                s.virtual_bytes,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch, in seconds",
                s.start_time_seconds,
            ),
            ("process_open_fds", "Open file descriptors", s.open_fds),
            (
                "process_max_fds",
                "Limit of open file descriptors",
                s.max_fds,
            ),
        ] {
            if let Some(v) = value {
                let g = ConstGauge::new(v);
                g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
            }
        }
        Ok(())
    }
}

/// Certificate expiry as a metric: `weft_certificate_expiration_timestamp_seconds`
/// per identity, read from the certificate manager at each scrape, so an
/// alert can fire well before a certificate that stopped renewing expires.
/// Registered before the certificate manager exists; [`CertExpiry::watch`]
/// binds it later. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct CertExpiry {
    certs: Arc<OnceLock<Weak<CertManager>>>,
}

impl CertExpiry {
    /// Reports the certificates of `certs` from now on (the first call wins).
    pub fn watch(&self, certs: &Arc<CertManager>) {
        let _ = self.certs.set(Arc::downgrade(certs));
    }
}

impl Collector for CertExpiry {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(certs) = self.certs.get().and_then(Weak::upgrade) else {
            return Ok(());
        };
        let held: Vec<(String, f64)> = certs
            .status()
            .into_iter()
            .filter_map(|s| {
                let t = s.not_after?.duration_since(SystemTime::UNIX_EPOCH).ok()?;
                Some((s.identity.to_string(), t.as_secs() as f64))
            })
            .collect();
        if held.is_empty() {
            return Ok(());
        }
        let mut family = encoder.encode_descriptor(
            "certificate_expiration_timestamp_seconds",
            "When each workload certificate this process holds expires (Unix time)",
            None,
            ConstGauge::new(0.0f64).metric_type(),
        )?;
        for (identity, at) in held {
            let labels = [("identity", identity)];
            ConstGauge::new(at).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Content type of OpenMetrics text, what [`encode`] produces.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of the Prometheus text format 0.0.4.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `/metrics` for a client that sent `accept`: OpenMetrics when it asks for
/// it (Prometheus does), else the Prometheus text format (curl, promtool,
/// older scrapers), as the Go client library negotiates. Returns (content
/// type, body).
pub fn negotiate(accept: Option<&str>, openmetrics: String) -> (&'static str, String) {
    if accept.is_some_and(|a| a.contains("application/openmetrics-text")) {
        (OPENMETRICS, openmetrics)
    } else {
        (PROMETHEUS_TEXT, openmetrics_to_text(&openmetrics))
    }
}

/// OpenMetrics text as Prometheus text format 0.0.4: a counter's metadata
/// names its `_total` samples, and `# UNIT` and `# EOF` go.
pub fn openmetrics_to_text(om: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for l in om.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            if let Some((name, "counter")) = rest.split_once(' ') {
                counters.insert(name.to_owned());
            }
        }
    }
    let mut out = String::with_capacity(om.len());
    for l in om.lines() {
        if l == "# EOF" || l.starts_with("# UNIT ") {
            continue;
        }
        let meta = l
            .strip_prefix("# HELP ")
            .map(|r| ("# HELP ", r))
            .or_else(|| l.strip_prefix("# TYPE ").map(|r| ("# TYPE ", r)));
        match meta {
            Some((kind, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) {
                    out += &format!("{kind}{name}_total {tail}\n");
                } else {
                    out += l;
                    out += "\n";
                }
            }
            None => {
                out += l;
                out += "\n";
            }
        }
    }
    out
}

/// The text exposition of `registry` (empty if encoding fails).
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, registry).is_err() {
        out.clear();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_stats_from_proc_text() {
        // A command with a space and a parenthesis, as the kernel writes it.
        let stat = "4242 (weft ztun) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 50 0 0 20 0 8 0 12345 104857600 3000 18446744073709551615";
        let s = ProcessStats::parse(
            stat,
            "cpu  1 2 3\nbtime 1700000000\n",
            "Max open files            1024                 524288               files\n",
            100.0,
            4096.0,
        );
        assert_eq!(s.cpu_seconds, Some(3.0));
        assert_eq!(s.resident_bytes, Some(3000.0 * 4096.0));
        assert_eq!(s.virtual_bytes, Some(104857600.0));
        assert_eq!(s.start_time_seconds, Some(1700000000.0 + 123.45));
        assert_eq!(s.max_fds, Some(1024.0));
    }

    #[test]
    fn openmetrics_becomes_prometheus_text() {
        let om = "# HELP weft_x Things.\n# TYPE weft_x counter\nweft_x_total{a=\"1\"} 3\n# HELP weft_g A gauge.\n# TYPE weft_g gauge\n# UNIT weft_g seconds\nweft_g 1.5\n# EOF\n";
        assert_eq!(
            openmetrics_to_text(om),
            "# HELP weft_x_total Things.\n# TYPE weft_x_total counter\nweft_x_total{a=\"1\"} 3\n# HELP weft_g A gauge.\n# TYPE weft_g gauge\nweft_g 1.5\n"
        );
        assert_eq!(
            negotiate(
                Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5"),
                om.into()
            )
            .0,
            OPENMETRICS
        );
        assert_eq!(negotiate(Some("*/*"), om.into()).0, PROMETHEUS_TEXT);
    }

    #[test]
    fn registry_exposes_build_and_process_families() {
        let mut r = Registry::with_prefix("weft");
        let _m = CommonMetrics::register(&mut r, "test");
        let text = encode(&r);
        assert!(
            text.contains("weft_build_info{component=\"test\""),
            "{text}"
        );
        assert!(text.contains("weft_process_cpu_seconds_total "), "{text}");
        assert!(
            text.contains("weft_process_resident_memory_bytes "),
            "{text}"
        );
    }
}
