//! Measurements of the store backend on this machine's disk: the latency
//! of one fsync'ed commit, and the throughput of the group-commit writer
//! under many concurrent submitters. `capy bench` can print these; the
//! ignored test below prints them too.

use super::db::Db;
use super::entry::{Entry, WriteOp, DEFAULT_K};
use super::error::StoreError;
use crate::id::NodeId;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct CommitFigures {
    pub value_bytes: usize,
    /// One writer, one put per commit, waiting for each.
    pub single_runs: usize,
    pub single_p50: Duration,
    pub single_p99: Duration,
    /// Many submitters on one executor, one put per commit call each.
    pub submitters: usize,
    pub group_commits: u64,
    pub group_elapsed: Duration,
    /// Transactions (fsyncs) the writer needed for them.
    pub group_fsyncs: u64,
}

impl CommitFigures {
    pub fn commits_per_sec(&self) -> f64 {
        self.group_commits as f64 / self.group_elapsed.as_secs_f64()
    }
}

impl std::fmt::Display for CommitFigures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "single commit of a {} B value, {} runs: p50 {:.2} ms, p99 {:.2} ms",
            self.value_bytes,
            self.single_runs,
            self.single_p50.as_secs_f64() * 1e3,
            self.single_p99.as_secs_f64() * 1e3
        )?;
        write!(
            f,
            "group commit, {} concurrent submitters: {} commits in {:.2} s = {:.0} commits/s, {} fsyncs ({:.1} commits per fsync)",
            self.submitters,
            self.group_commits,
            self.group_elapsed.as_secs_f64(),
            self.commits_per_sec(),
            self.group_fsyncs,
            self.group_commits as f64 / self.group_fsyncs.max(1) as f64
        )
    }
}

fn op(i: u64, value: &[u8]) -> WriteOp {
    WriteOp::Put {
        bucket: "bench".into(),
        key: format!("key-{i}"),
        entry: Entry {
            version: 1,
            origin: NodeId(1),
            write_id: i,
            deleted: false,
            k: DEFAULT_K,
            written_at_ms: 0,
            value: value.to_vec(),
        },
    }
}

/// Runs both measurements on a fresh store file inside `dir`.
pub fn measure(
    dir: &Path,
    runs: usize,
    submitters: usize,
    group_for: Duration,
) -> Result<CommitFigures, StoreError> {
    let value = vec![0x5a_u8; 100];
    let db = Db::open(dir.join("bench.redb"))?;
    let mut lat = Vec::with_capacity(runs);
    for i in 0..runs as u64 {
        let t = Instant::now();
        db.commit_blocking(vec![op(i, &value)])?;
        lat.push(t.elapsed());
    }
    lat.sort();
    let pick = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    let (single_p50, single_p99) = if lat.is_empty() {
        (Duration::ZERO, Duration::ZERO)
    } else {
        (pick(0.50), pick(0.99))
    };

    let before = db.writer_stats().commits;
    let ex = smol::LocalExecutor::new();
    let start = Instant::now();
    let deadline = start + group_for;
    let counts = smol::block_on(ex.run(async {
        let tasks: Vec<_> = (0..submitters as u64)
            .map(|s| {
                let db = db.clone();
                let value = value.clone();
                ex.spawn(async move {
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        db.commit(vec![op(1_000_000 * (s + 1) + n, &value)]).await?;
                        n += 1;
                    }
                    Ok::<u64, StoreError>(n)
                })
            })
            .collect();
        let mut total = Vec::new();
        for t in tasks {
            total.push(t.await);
        }
        total
    }));
    let group_elapsed = start.elapsed();
    let mut group_commits = 0;
    for c in counts {
        group_commits += c?;
    }
    Ok(CommitFigures {
        value_bytes: value.len(),
        single_runs: runs,
        single_p50,
        single_p99,
        submitters,
        group_commits,
        group_elapsed,
        group_fsyncs: db.writer_stats().commits - before,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn figures_add_up() {
        let dir = tempfile::tempdir().unwrap();
        let f = super::measure(dir.path(), 20, 8, std::time::Duration::from_millis(200)).unwrap();
        assert!(f.single_p50 <= f.single_p99);
        assert!(f.group_commits > 0);
        assert!(f.group_fsyncs > 0 && f.group_fsyncs <= f.group_commits);
    }

    /// `cargo test --release --lib store::bench -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn print_commit_figures() {
        let dir = std::env::var_os("CAPY_BENCH_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let tmp = tempfile::tempdir_in(dir).unwrap();
        let f = super::measure(tmp.path(), 500, 64, std::time::Duration::from_secs(5)).unwrap();
        println!("{f}");
    }
}
