//! Store: redb buckets on each node, and the sans-IO replication core that
//! places every key on its root and the root's closest leaf-set neighbours.
