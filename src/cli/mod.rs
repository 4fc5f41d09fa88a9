//! Command line: `capy run`, `capy ca`, `capy put/get/rm/status`, `capy sim`,
//! `capy bench`.

/// Entry point of the `capy` binary; returns the process exit code.
pub fn main() -> i32 {
    0
}
