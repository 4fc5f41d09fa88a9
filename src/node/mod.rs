//! Node runtime: the one place that wires the parts together on one smol
//! executor.
