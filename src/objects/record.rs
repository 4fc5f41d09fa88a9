//! One object as the store holds it, under one key: structured state, blob
//! version pointers, and the object's invocation log with its sequencer and
//! applied offset. Because all of it is one value, one store write commits
//! a new state together with the offset of the invocation that produced it
//! (the OaaS paper's offset check, with the log beside the state instead of
//! in a broker): an invocation is applied iff its sequence number is at or
//! below `applied`, so a replayed or retried invocation is applied once.
//!
//! Sans-IO: the root loads the record, calls [`ObjectRecord::accept`] /
//! [`ObjectRecord::apply`] on a working copy, writes it through the store,
//! and only then answers. A crash before the write leaves the last
//! committed record, whose log still holds every accepted invocation not
//! yet applied.

use super::package::Caller;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, VecDeque};

/// Most accepted, not yet applied invocations per object.
pub const MAX_LOG: usize = 256;
/// Most bytes of arguments held in one object's log.
pub const MAX_LOG_BYTES: usize = 1 << 20;
/// Results of this many latest async invocations are kept for
/// `GET /api/inv/{id}`.
pub const MAX_RESULTS: usize = 128;
/// Bytes of one kept result; a larger output is kept as a note saying so.
pub const MAX_RESULT_BYTES: usize = 16 << 10;

/// Where one blob's committed content lives: `(object, blob, version)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    pub version: u64,
    pub size: u64,
}

/// An accepted async invocation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    pub seq: u64,
    pub function: String,
    pub args: Value,
    pub caller: Caller,
    /// Wall clock at acceptance, milliseconds.
    pub accepted_ms: u64,
}

/// How an applied async invocation ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InvResult {
    pub seq: u64,
    pub ok: bool,
    /// The output, or the error message.
    pub output: Value,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ObjectRecord {
    pub id: String,
    pub pkg: String,
    pub class: String,
    pub state: Map<String, Value>,
    pub blobs: BTreeMap<String, BlobRef>,
    /// Grows by one with every committed change of state or blobs.
    pub version: u64,
    /// The sequencer: the number the next accepted invocation gets.
    pub next_seq: u64,
    /// The offset: every invocation numbered up to here is applied.
    pub applied: u64,
    /// Accepted invocations `applied + 1 ..= next_seq - 1`, in order.
    pub log: VecDeque<LogEntry>,
    pub results: VecDeque<InvResult>,
    /// The invocation that created this object, when a function did
    /// (an `immutable` MACRO re-running a step finds it here).
    #[serde(default)]
    pub created_by: Option<String>,
}

/// What an invocation did, to be applied to the record.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// New state (None: unchanged) and blob pointers moved, with the
    /// output.
    Ok {
        state: Option<Map<String, Value>>,
        blobs: BTreeMap<String, BlobRef>,
        output: Value,
    },
    /// The function failed: nothing changes but the offset.
    Failed(String),
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LogError {
    #[error("the object's invocation queue is full ({0} waiting); try again later")]
    Full(usize),
    #[error("invocation {seq} is already applied (offset {applied})")]
    AlreadyApplied { seq: u64, applied: u64 },
    #[error("invocation {seq} is not the next to apply (offset {applied})")]
    OutOfOrder { seq: u64, applied: u64 },
}

/// Where an async invocation stands.
#[derive(Clone, Debug, PartialEq)]
pub enum InvStatus {
    /// Accepted, `ahead` invocations before it.
    Pending {
        ahead: usize,
    },
    Done(InvResult),
    /// Applied, but its result is no longer kept.
    Applied,
    /// Never accepted by this object.
    Unknown,
}

impl ObjectRecord {
    pub fn new(id: &str, pkg: &str, class: &str, state: Map<String, Value>) -> ObjectRecord {
        ObjectRecord {
            id: id.to_string(),
            pkg: pkg.to_string(),
            class: class.to_string(),
            state,
            blobs: BTreeMap::new(),
            version: 1,
            next_seq: 1,
            applied: 0,
            log: VecDeque::new(),
            results: VecDeque::new(),
            created_by: None,
        }
    }

    pub fn encode(&self) -> Result<Vec<u8>, String> {
        serde_json::to_vec(self).map_err(|e| format!("encoding object {}: {e}", self.id))
    }

    pub fn decode(bytes: &[u8]) -> Result<ObjectRecord, String> {
        let r: ObjectRecord =
            serde_json::from_slice(bytes).map_err(|e| format!("stored object is corrupt: {e}"))?;
        r.check()?;
        Ok(r)
    }

    /// The invariants a stored record must hold.
    fn check(&self) -> Result<(), String> {
        if self.applied >= self.next_seq {
            return Err(format!(
                "stored object {}: offset {} not below the next sequence number {}",
                self.id, self.applied, self.next_seq
            ));
        }
        let contiguous = self
            .log
            .iter()
            .enumerate()
            .all(|(i, e)| e.seq == self.applied + 1 + i as u64);
        if !contiguous || self.log.len() as u64 != self.next_seq - 1 - self.applied {
            return Err(format!("stored object {}: its log has gaps", self.id));
        }
        Ok(())
    }

    fn log_bytes(&self) -> usize {
        self.log.iter().map(|e| e.args.to_string().len()).sum()
    }

    /// Sequences an async invocation into the log. It counts as accepted
    /// once the record holding it is committed.
    pub fn accept(
        &mut self,
        function: &str,
        args: Value,
        caller: Caller,
        now_ms: u64,
    ) -> Result<u64, LogError> {
        if self.log.len() >= MAX_LOG || self.log_bytes() + args.to_string().len() > MAX_LOG_BYTES {
            return Err(LogError::Full(self.log.len()));
        }
        let seq = self.next_seq;
        self.log.push_back(LogEntry {
            seq,
            function: function.to_string(),
            args,
            caller,
            accepted_ms: now_ms,
        });
        self.next_seq += 1;
        Ok(seq)
    }

    /// The next accepted invocation to apply.
    pub fn next_pending(&self) -> Option<&LogEntry> {
        self.log.front()
    }

    /// Applies the effect of logged invocation `seq` and moves the offset,
    /// refusing anything but the next one (the offset check).
    pub fn apply(&mut self, seq: u64, effect: Effect) -> Result<(), LogError> {
        if seq <= self.applied {
            return Err(LogError::AlreadyApplied {
                seq,
                applied: self.applied,
            });
        }
        if self.log.front().map(|e| e.seq) != Some(seq) {
            return Err(LogError::OutOfOrder {
                seq,
                applied: self.applied,
            });
        }
        let result = match effect {
            Effect::Ok {
                state,
                blobs,
                output,
            } => {
                self.change(state, blobs);
                InvResult {
                    seq,
                    ok: true,
                    output: bounded(output),
                }
            }
            Effect::Failed(e) => InvResult {
                seq,
                ok: false,
                output: Value::String(e.chars().take(MAX_RESULT_BYTES).collect()),
            },
        };
        self.log.pop_front();
        self.applied = seq;
        self.results.push_back(result);
        while self.results.len() > MAX_RESULTS {
            self.results.pop_front();
        }
        Ok(())
    }

    /// A change made by a sync call (no log entry).
    pub fn change(&mut self, state: Option<Map<String, Value>>, blobs: BTreeMap<String, BlobRef>) {
        let changed = state.is_some() || !blobs.is_empty();
        if let Some(s) = state {
            self.state = s;
        }
        for (k, b) in blobs {
            self.blobs.insert(k, b);
        }
        if changed {
            self.version += 1;
        }
    }

    pub fn status(&self, seq: u64) -> InvStatus {
        if seq == 0 || seq >= self.next_seq {
            return InvStatus::Unknown;
        }
        if seq > self.applied {
            return InvStatus::Pending {
                ahead: (seq - self.applied - 1) as usize,
            };
        }
        match self.results.iter().find(|r| r.seq == seq) {
            Some(r) => InvStatus::Done(r.clone()),
            None => InvStatus::Applied,
        }
    }
}

fn bounded(v: Value) -> Value {
    let n = v.to_string().len();
    if n <= MAX_RESULT_BYTES {
        v
    } else {
        serde_json::json!({ "truncated": true, "bytes": n })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn rec() -> ObjectRecord {
        ObjectRecord::new("00", "p", "C", Map::new())
    }

    fn push(list: i64) -> Effect {
        Effect::Ok {
            state: None,
            blobs: BTreeMap::new(),
            output: json!(list),
        }
    }

    #[test]
    fn offset_check_refuses_replays_and_gaps() {
        let mut r = rec();
        let a = r.accept("f", json!(1), Caller::External, 0).unwrap();
        let b = r.accept("f", json!(2), Caller::External, 0).unwrap();
        assert_eq!((a, b), (1, 2));
        assert_eq!(
            r.apply(2, push(0)),
            Err(LogError::OutOfOrder { seq: 2, applied: 0 })
        );
        r.apply(1, push(0)).unwrap();
        assert_eq!(
            r.apply(1, push(0)),
            Err(LogError::AlreadyApplied { seq: 1, applied: 1 })
        );
        assert_eq!(
            r.status(1),
            InvStatus::Done(InvResult {
                seq: 1,
                ok: true,
                output: json!(0)
            })
        );
        assert_eq!(r.status(2), InvStatus::Pending { ahead: 0 });
        assert_eq!(r.status(3), InvStatus::Unknown);
        r.apply(2, Effect::Failed("boom".into())).unwrap();
        assert!(matches!(
            r.status(2),
            InvStatus::Done(InvResult { ok: false, .. })
        ));
        // A failed invocation moved the offset but not the version.
        assert_eq!(r.version, 1);
        let back = ObjectRecord::decode(&r.encode().unwrap()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn the_log_is_bounded() {
        let mut r = rec();
        for i in 0..MAX_LOG {
            r.accept("f", json!(i), Caller::External, 0).unwrap();
        }
        assert_eq!(
            r.accept("f", json!(0), Caller::External, 0),
            Err(LogError::Full(MAX_LOG))
        );
        let mut r = rec();
        let big = json!("x".repeat(MAX_LOG_BYTES / 2));
        r.accept("f", big.clone(), Caller::External, 0).unwrap();
        assert!(r.accept("f", big, Caller::External, 0).is_err());
    }

    #[test]
    fn corrupt_records_are_refused() {
        let mut r = rec();
        r.accept("f", json!(1), Caller::External, 0).unwrap();
        let mut bad = r.clone();
        bad.log.clear();
        assert!(ObjectRecord::decode(&bad.encode().unwrap()).is_err());
        let mut bad = r.clone();
        bad.applied = 5;
        assert!(ObjectRecord::decode(&bad.encode().unwrap()).is_err());
        assert!(ObjectRecord::decode(b"{not json").is_err());
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// Submit an invocation; the commit happens, fails before the
        /// write, or writes but loses the answer.
        Submit(u8),
        /// Apply the next pending invocation, committing or crashing.
        Apply(u8),
        /// A stale copy of an applied invocation comes back.
        Replay,
        Crash,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => any::<u8>().prop_map(Op::Submit),
            3 => any::<u8>().prop_map(Op::Apply),
            1 => Just(Op::Replay),
            1 => Just(Op::Crash),
        ]
    }

    /// The effect of invocation `inv`: append it to the state's list.
    fn effect(r: &ObjectRecord, inv: &Value) -> Effect {
        let mut s = r.state.clone();
        let list = s.entry("list").or_insert(json!([]));
        if let Value::Array(a) = list {
            a.push(inv.clone());
        }
        Effect::Ok {
            state: Some(s),
            blobs: BTreeMap::new(),
            output: inv.clone(),
        }
    }

    proptest! {
        /// A root that crashes at any point, loses answers and sees stale
        /// replays: after recovery, every acknowledged invocation is in the
        /// state exactly once, nothing is in it twice, and the order is the
        /// sequence order.
        #[test]
        fn each_accepted_invocation_is_applied_exactly_once(ops in proptest::collection::vec(op(), 1..120)) {
            let mut store = rec();
            let mut working: Option<ObjectRecord> = None;
            let mut acked: Vec<u64> = Vec::new();
            let mut n = 0u64;
            let mut applied_entries: Vec<LogEntry> = Vec::new();
            for o in ops {
                let w = working.get_or_insert_with(|| store.clone());
                match o {
                    Op::Submit(coin) => {
                        n += 1;
                        if w.accept("f", json!(n), Caller::External, 0).is_err() {
                            continue;
                        }
                        match coin % 3 {
                            0 => { store = w.clone(); acked.push(n); }
                            1 => { store = w.clone(); } // committed, answer lost
                            _ => { working = None; }    // crashed before the write
                        }
                    }
                    Op::Apply(coin) => {
                        let Some(e) = w.next_pending().cloned() else { continue };
                        let eff = effect(w, &e.args);
                        w.apply(e.seq, eff).unwrap();
                        applied_entries.push(e);
                        if coin % 2 == 0 { store = w.clone(); } else { working = None; }
                    }
                    Op::Replay => {
                        if let Some(e) = applied_entries.first().cloned() {
                            if e.seq <= w.applied {
                                let eff = effect(w, &e.args);
                                prop_assert!(w.apply(e.seq, eff).is_err());
                            }
                        }
                    }
                    Op::Crash => working = None,
                }
            }
            // Recovery: a fresh root drains the log.
            let mut w = store.clone();
            while let Some(e) = w.next_pending().cloned() {
                let eff = effect(&w, &e.args);
                w.apply(e.seq, eff).unwrap();
            }
            let store = ObjectRecord::decode(&w.encode().unwrap()).unwrap();
            let list: Vec<u64> = store.state.get("list").and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_u64).collect()).unwrap_or_default();
            for a in &acked {
                prop_assert_eq!(list.iter().filter(|x| *x == a).count(), 1, "acked {} in {:?}", a, list);
            }
            let mut sorted = list.clone();
            sorted.sort();
            sorted.dedup();
            prop_assert_eq!(sorted.len(), list.len(), "duplicates in {:?}", list);
            prop_assert_eq!(&sorted, &list, "not in sequence order");
            prop_assert!(store.log.is_empty());
            prop_assert_eq!(store.applied + 1, store.next_seq);
        }
    }
}
