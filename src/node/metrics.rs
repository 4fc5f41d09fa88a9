//! Counters and latency histograms of the node, rendered in Prometheus' text
//! format at `/metrics`. Lock-free atomics: recording never blocks a task.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

/// Upper bounds of the latency buckets, in microseconds.
const BOUNDS_US: [u64; 16] = [
    50, 100, 250, 500, 1_000, 2_000, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 5_000_000, 30_000_000,
];

/// A latency histogram with fixed buckets.
pub struct Histogram {
    buckets: [AtomicU64; BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_us: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn record_us(&self, us: u64) {
        let i = BOUNDS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(BOUNDS_US.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// Upper bound of the bucket holding quantile `q` (0..1), in µs.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let target = ((n as f64) * q).ceil().max(1.0) as u64;
        let mut acc = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            acc += b.load(Relaxed);
            if acc >= target {
                return Some(BOUNDS_US.get(i).copied().unwrap_or(u64::MAX));
            }
        }
        None
    }

    pub(crate) fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut acc = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            acc += b.load(Relaxed);
            let le = match BOUNDS_US.get(i) {
                Some(us) => format!("{}", *us as f64 / 1e6),
                None => "+Inf".into(),
            };
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {acc}");
        }
        let lb = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(
            out,
            "{name}_sum{lb} {}",
            self.sum_us.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{lb} {}", self.count());
    }
}

/// Counters keyed by a label value, for small label sets (message kinds,
/// apps): a mutex-guarded vector, touched once per message.
#[derive(Default)]
pub struct Labeled(Mutex<Vec<(String, u64)>>);

impl Labeled {
    pub fn inc(&self, label: &str) {
        self.add(label, 1)
    }
    pub fn add(&self, label: &str, n: u64) {
        let Ok(mut v) = self.0.lock() else { return };
        if let Some((_, c)) = v.iter_mut().find(|(l, _)| l == label) {
            *c += n;
        } else if v.len() < 256 {
            v.push((label.to_string(), n));
        }
    }
    pub fn get(&self, label: &str) -> u64 {
        self.0
            .lock()
            .ok()
            .and_then(|v| v.iter().find(|(l, _)| l == label).map(|x| x.1))
            .unwrap_or(0)
    }
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

pub struct Metrics {
    pub msgs_in: Labeled,
    pub msgs_out: Labeled,
    pub send_failures: AtomicU64,
    pub refused_peers: AtomicU64,
    /// Deliveries at this node by the number of overlay hops they took.
    pub route_hops: [AtomicU64; 16],
    pub store_ops: Labeled,
    pub store_errors: Labeled,
    pub put_latency: Histogram,
    pub get_latency: Histogram,
    pub replication_lag: Histogram,
    pub commit_latency: Histogram,
    pub http_requests: AtomicU64,
    /// Container starts by kind: "cold" (a new container) or "warm" (an
    /// idle one reused); wired by the functions integration. Both series
    /// are shown from the start (at 0).
    pub container_starts: Labeled,
    pub vnode_changes: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Metrics {
            msgs_in: Labeled::default(),
            msgs_out: Labeled::default(),
            send_failures: AtomicU64::new(0),
            refused_peers: AtomicU64::new(0),
            route_hops: std::array::from_fn(|_| AtomicU64::new(0)),
            store_ops: Labeled::default(),
            store_errors: Labeled::default(),
            put_latency: Histogram::default(),
            get_latency: Histogram::default(),
            replication_lag: Histogram::default(),
            commit_latency: Histogram::default(),
            http_requests: AtomicU64::new(0),
            container_starts: Labeled::default(),
            vnode_changes: AtomicU64::new(0),
        };
        m.container_starts.add("cold", 0);
        m.container_starts.add("warm", 0);
        m
    }
}

impl Metrics {
    pub fn record_hops(&self, hops: u8) {
        let i = (hops as usize).min(self.route_hops.len() - 1);
        self.route_hops[i].fetch_add(1, Relaxed);
    }

    /// Mean overlay hops of the routed messages delivered here.
    pub fn mean_hops(&self) -> Option<f64> {
        let (mut n, mut sum) = (0u64, 0u64);
        for (i, c) in self.route_hops.iter().enumerate() {
            let c = c.load(Relaxed);
            n += c;
            sum += c * i as u64;
        }
        (n > 0).then(|| sum as f64 / n as f64)
    }

    /// Replication lag of copies this node just committed for other roots:
    /// the wall time since their root assigned the version. Anti-entropy
    /// repairs of old copies show up as long lags, which is what they are.
    pub fn record_replication_lag(&self, written_at_ms: &[u64], now_us: u64) {
        for &w in written_at_ms {
            let lag = now_us.saturating_sub(w.saturating_mul(1000));
            self.replication_lag.record_us(lag);
        }
    }
}

/// A label value in the text format: backslash, quote and newline escaped.
pub fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Root timestamps (ms) of the puts in `ops` written by another node's root:
/// the copies whose commit here is replication.
pub fn replica_writes(ops: &[crate::store::WriteOp], own: &[crate::id::NodeId]) -> Vec<u64> {
    ops.iter()
        .filter_map(|op| match op {
            crate::store::WriteOp::Put { entry, .. } if !own.contains(&entry.origin) => {
                Some(entry.written_at_ms)
            }
            _ => None,
        })
        .collect()
}

impl Metrics {
    pub fn render(&self, extra: &[(&str, &str, f64)]) -> String {
        let mut o = String::new();
        let counter = |o: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        let labeled = |o: &mut String, name: &str, help: &str, label: &str, l: &Labeled| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
            for (k, v) in l.snapshot() {
                let _ = writeln!(o, "{name}{{{label}=\"{}\"}} {v}", escape_label(&k));
            }
        };
        let hist = |o: &mut String, name: &str, help: &str, h: &Histogram| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} histogram");
            h.render(o, name, "");
        };
        labeled(
            &mut o,
            "capy_messages_in_total",
            "Cluster messages received.",
            "kind",
            &self.msgs_in,
        );
        labeled(
            &mut o,
            "capy_messages_out_total",
            "Cluster messages sent.",
            "kind",
            &self.msgs_out,
        );
        counter(
            &mut o,
            "capy_send_failures_total",
            "Sends to a peer that failed.",
            self.send_failures.load(Relaxed),
        );
        counter(
            &mut o,
            "capy_refused_peers_total",
            "Peers refused for their certificate or ids.",
            self.refused_peers.load(Relaxed),
        );
        let _ = writeln!(o, "# HELP capy_route_hops Routed messages delivered here, by overlay hops taken.\n# TYPE capy_route_hops histogram");
        let mut acc = 0;
        let mut sum = 0;
        for (i, c) in self.route_hops.iter().enumerate() {
            let c = c.load(Relaxed);
            acc += c;
            sum += c * i as u64;
            let _ = writeln!(o, "capy_route_hops_bucket{{le=\"{i}\"}} {acc}");
        }
        let _ = writeln!(o, "capy_route_hops_bucket{{le=\"+Inf\"}} {acc}\ncapy_route_hops_sum {sum}\ncapy_route_hops_count {acc}");
        labeled(
            &mut o,
            "capy_store_operations_total",
            "Store operations served to clients.",
            "op",
            &self.store_ops,
        );
        labeled(
            &mut o,
            "capy_store_errors_total",
            "Store operations that failed.",
            "op",
            &self.store_errors,
        );
        hist(
            &mut o,
            "capy_put_latency_seconds",
            "Client put latency, until a majority committed.",
            &self.put_latency,
        );
        hist(
            &mut o,
            "capy_get_latency_seconds",
            "Client get latency.",
            &self.get_latency,
        );
        hist(
            &mut o,
            "capy_replication_lag_seconds",
            "Time from a root's write to a replica's commit.",
            &self.replication_lag,
        );
        hist(
            &mut o,
            "capy_commit_latency_seconds",
            "Local redb commit latency (fsync included).",
            &self.commit_latency,
        );
        counter(
            &mut o,
            "capy_http_requests_total",
            "HTTP requests served.",
            self.http_requests.load(Relaxed),
        );
        labeled(
            &mut o,
            "capy_container_starts_total",
            "Function invocations by container start: cold (new container) or warm (reused).",
            "kind",
            &self.container_starts,
        );
        for (name, help, v) in extra {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_and_text() {
        let h = Histogram::default();
        for us in [40, 90, 90, 900, 20_000] {
            h.record_us(us);
        }
        assert_eq!(h.quantile_us(0.5), Some(100));
        assert_eq!(h.quantile_us(1.0), Some(25_000));
        let mut s = String::new();
        h.render(&mut s, "x", "");
        assert!(s.contains("x_bucket{le=\"0.0001\"} 3"), "{s}");
        assert!(s.contains("x_bucket{le=\"+Inf\"} 5"), "{s}");
        assert!(s.contains("x_count 5"), "{s}");
    }

    #[test]
    fn replication_lag_counts_only_other_roots_copies() {
        use crate::id::NodeId;
        use crate::store::{Entry, WriteOp};
        let entry = |origin: u128, at_ms: u64| Entry {
            version: 1,
            origin: NodeId(origin),
            write_id: 1,
            deleted: false,
            k: 3,
            written_at_ms: at_ms,
            value: vec![1],
        };
        let ops = vec![
            WriteOp::Put {
                bucket: "b".into(),
                key: "mine".into(),
                entry: entry(1, 5),
            },
            WriteOp::Put {
                bucket: "b".into(),
                key: "theirs".into(),
                entry: entry(2, 7),
            },
        ];
        let w = replica_writes(&ops, &[NodeId(1)]);
        assert_eq!(w, vec![7]);
        let m = Metrics::default();
        m.record_replication_lag(&w, 7_000 + 1_500);
        m.record_replication_lag(&[9_999], 0); // clock behind: lag 0, not a wrap
        assert_eq!(m.replication_lag.count(), 2);
        assert_eq!(m.replication_lag.quantile_us(1.0), Some(2_000));
        assert_eq!(m.replication_lag.quantile_us(0.5), Some(50));
    }

    #[test]
    fn labels_are_escaped_and_start_series_exist() {
        let m = Metrics::default();
        assert_eq!(escape_label("a\"b\\c\nd"), r#"a\"b\\c\nd"#);
        let t = m.render(&[]);
        assert!(
            t.contains("capy_container_starts_total{kind=\"cold\"} 0"),
            "{t}"
        );
        assert!(
            t.contains("capy_container_starts_total{kind=\"warm\"} 0"),
            "{t}"
        );
    }

    #[test]
    fn labeled_counts() {
        let l = Labeled::default();
        l.inc("put");
        l.add("put", 2);
        l.inc("get");
        assert_eq!(l.get("put"), 3);
        assert_eq!(l.get("get"), 1);
        assert_eq!(l.get("rm"), 0);
    }
}
