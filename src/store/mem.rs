//! An in-memory backend with the same apply rule as the redb one: for
//! property tests and for the simulator, where thousands of nodes each need
//! a store and none of them needs a disk.

use super::entry::{Entry, Meta, Pos, WriteOp};
use super::error::StoreError;
use super::replica::Backend;
use std::collections::BTreeMap;
use std::ops::Bound;

#[derive(Default, Clone, Debug)]
pub struct MemBackend {
    map: BTreeMap<Pos, Entry>,
}

impl MemBackend {
    pub fn new() -> MemBackend {
        MemBackend::default()
    }

    /// Applies ops in order under the never-backwards rule; invalid ops are
    /// refused as a whole, like the redb writer does.
    pub fn apply(&mut self, ops: &[WriteOp]) -> Result<(), StoreError> {
        for op in ops {
            op.validate()?;
        }
        for op in ops {
            let pos = Pos::new(op.bucket(), op.key());
            let held = self.map.get(&pos).map(Entry::stamp);
            if !op.applies_over(held) {
                continue;
            }
            match op {
                WriteOp::Put { entry, .. } => {
                    self.map.insert(pos, entry.clone());
                }
                WriteOp::Remove { .. } => {
                    self.map.remove(&pos);
                }
            }
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Pos, &Entry)> {
        self.map.iter()
    }
}

impl Backend for MemBackend {
    fn get(&self, bucket: &str, key: &str) -> Result<Option<Entry>, StoreError> {
        Ok(self.map.get(&Pos::new(bucket, key)).cloned())
    }

    fn meta(&self, bucket: &str, key: &str) -> Result<Option<Meta>, StoreError> {
        Ok(self.map.get(&Pos::new(bucket, key)).map(Entry::meta))
    }

    fn scan_meta(&self, after: Option<&Pos>, limit: usize) -> Result<Vec<(Pos, Meta)>, StoreError> {
        let start = match after {
            Some(p) => Bound::Excluded(p.clone()),
            None => Bound::Unbounded,
        };
        Ok(self
            .map
            .range((start, Bound::Unbounded))
            .take(limit)
            .map(|(p, e)| (p.clone(), e.meta()))
            .collect())
    }
}
