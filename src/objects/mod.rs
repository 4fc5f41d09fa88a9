//! Objects: classes, objects, ordered and exactly-once invocations.
//!
//! Owns the object model of the OaaS paper on capy's own parts: packages
//! ([`package`]: classes with inheritance and overriding, state specs with
//! structured fields and named blobs, access modifiers, built-in / TASK /
//! MACRO functions, validated with file, line and field in every error),
//! the object record with its per-object sequencer and exactly-once log
//! ([`record`]), MACRO dataflow planning and orchestration ([`dataflow`])
//! and presigned blob URLs ([`presign`]). Everything here is sans-IO: the
//! node runtime (`node::objects`) routes calls to an object's root, keeps
//! the per-object queue there, runs TASK functions through `containers`
//! and commits records through the store. May call: `id` only.

pub mod dataflow;
pub mod package;
pub mod presign;
pub mod record;
pub mod yaml;

pub use dataflow::{Macro, MacroRun, StepCall, StepResult};
pub use package::{
    parse_package, Access, Body, Caller, Class, Function, Level, Locality, Package, PkgError,
    Refusal, Task,
};
pub use presign::{BlobMethod, Grant, PresignError, Signer};
pub use record::{BlobRef, Effect, InvStatus, LogEntry, LogError, ObjectRecord};
